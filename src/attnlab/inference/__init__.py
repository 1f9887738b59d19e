"""Inference: caches, sampling, generation."""
