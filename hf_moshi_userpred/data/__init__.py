"""Data: audio and tokenizer I/O, word alignments on the frame grid, encoding moshi-finetune folders into codes,
the training collator and the voice-activity targets."""
