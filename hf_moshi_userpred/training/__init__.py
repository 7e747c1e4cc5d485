"""Fine-tuning: the Trainer with the combined loss and curriculum, the training modes, the `train` entry point."""
