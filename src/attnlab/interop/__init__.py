"""Checkpoint interop: Hugging Face directories and GGUF files."""
