"""The Hub: kyutai checkpoints both ways, quantization, the model card and pushing a model."""
