"""Turning logits into the next token: greedy, temperature, top-k, top-p, repetition penalty.

``logits_to_probs`` is the one place where the filters are applied, so plain sampling and speculative
sampling (which must transform target and draft distributions identically) share it.
Shape legend: B batch, V vocab.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _real(value: object) -> bool:
    """A real number (int or float, not bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None,
                        repetition_penalty: float | None = None, *, flags: bool = False) -> None:
    """The one validator of sampling settings (generate, speculative decoding, ``attnlab generate``/``chat``).

    Raises ``ValueError`` naming the setting: ``temperature`` a finite number >= 0 (0 = greedy); ``top_k`` an
    integer >= 1 or None; ``top_p`` in (0, 1] or None; ``repetition_penalty`` a finite number > 0 or None.
    NaN and infinity are refused (a NaN temperature turns every probability into NaN). ``flags=True`` names
    them as the CLI flags (``--top-k``) so that a command can check them before it loads a model.
    """
    def name(key: str) -> str:
        return "--" + key.replace("_", "-") + " " if flags else key + "="

    if not _real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"{name('temperature')}{temperature!r}: the temperature must be a finite number >= 0 "
                         f"(0 means greedy)")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"{name('top_k')}{top_k!r}: top-k must be an integer >= 1 (or unset, for no top-k filter)")
    if top_p is not None and (not _real(top_p) or not (0.0 < top_p <= 1.0)):
        raise ValueError(f"{name('top_p')}{top_p!r}: top-p must be in (0, 1] (or unset, for no nucleus filter)")
    if repetition_penalty is not None and (not _real(repetition_penalty) or not math.isfinite(repetition_penalty)
                                           or repetition_penalty <= 0):
        raise ValueError(f"{name('repetition_penalty')}{repetition_penalty!r}: the repetition penalty must be a "
                         f"finite number > 0 (1 = none)")


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
