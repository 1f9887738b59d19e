"""Training: corpus, tokenizer, data, trainer, checkpoints."""
