"""Turning logits into the next token: greedy, temperature, top-k, top-p, repetition penalty.

``logits_to_probs`` is the one place where the filters are applied, so plain sampling and speculative
sampling (which must transform target and draft distributions identically) share it.
Shape legend: B batch, V vocab.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnlab.inference.sampling_args import check_sampling_args


def apply_repetition_penalty(logits: Tensor, previous: Tensor, penalty: float) -> Tensor:
    """CTRL-style penalty (Keskar et al. 2019): divide positive, multiply negative logits of seen tokens."""
    seen = torch.gather(logits, 1, previous)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, previous, seen)


def filter_logits(logits: Tensor, *, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest nucleus of mass top_p."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # mass before this token already >= p
        drop[..., 0] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def logits_to_probs(logits: Tensor, *, temperature: float, top_k: int | None = None,
                    top_p: float | None = None) -> Tensor:
    """(..., V) logits -> (..., V) float32 probabilities after temperature, top-k and top-p."""
    logits = logits.float() / temperature
    return torch.softmax(filter_logits(logits, top_k=top_k, top_p=top_p), dim=-1)


def sample_next(logits: Tensor, *, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """(B, V) logits -> (B,) token ids. ``temperature == 0`` is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = logits_to_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(seed))


__all__ = ["apply_repetition_penalty", "check_sampling_args", "filter_logits", "logits_to_probs", "make_generator",
           "sample_next"]
