"""Merging partial attention results by log-sum-exp.

Attention over a key set that is split in two disjoint parts A and B can be computed part by part: each
part gives its normalised output and the log-sum-exp (LSE) of its scaled scores, and the two are combined
exactly by weighting each output with its share of the total softmax mass::

    lse = log(exp(lse_a) + exp(lse_b))
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

This is the identity behind FlashAttention's online softmax (Dao et al. 2022, "FlashAttention: Fast and
Memory-Efficient Exact Attention with IO-Awareness"; Milakov & Gimelshein 2018, "Online normalizer
calculation for softmax") and behind ring attention (Liu et al. 2023), which merges the partial result of
each K/V block passed around the ring.

Shape legend: B batch, H query heads, T queries, D head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor


def merge_partials(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Combine attention over two disjoint key sets into attention over their union.

    Args:
        out_a, out_b: (B, H, T, D) normalised partial outputs (any float dtype; the result has ``out_a``'s).
        lse_a, lse_b: (B, H, T) log-sum-exp of each part's scaled scores; ``-inf`` where a part has no key
            for that query (its output row is then ignored).

    Returns:
        ``(out, lse)``: (B, H, T, D) in ``out_a.dtype`` and (B, H, T) float32 (float64 if given float64).
        A row that is empty on both sides gives zeros and ``-inf``, never NaN, and its gradient is zero.

    Differentiable with respect to all four inputs (plain tensor ops).
    """
    if out_a.shape != out_b.shape or out_a.dim() < 1:
        raise ValueError(f"out_a and out_b must have the same shape (B, H, T, D); got {tuple(out_a.shape)}, {tuple(out_b.shape)}")
    if lse_a.shape != out_a.shape[:-1] or lse_b.shape != out_a.shape[:-1]:
        raise ValueError(
            f"lse_a and lse_b must have shape {tuple(out_a.shape[:-1])} (out without its last dim); "
            f"got {tuple(lse_a.shape)}, {tuple(lse_b.shape)}"
        )
    for name, t in (("out_a", out_a), ("out_b", out_b), ("lse_a", lse_a), ("lse_b", lse_b)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating point tensor; got {t.dtype}")
    acc = torch.promote_types(torch.promote_types(lse_a.dtype, lse_b.dtype), torch.float32)
    la, lb = lse_a.to(acc), lse_b.to(acc)  # (B, H, T)
    m = torch.maximum(la, lb)
    empty = torch.isneginf(m)  # no key on either side
    m = m.masked_fill(empty, 0.0)  # keep exp(-inf - m) = 0 and avoid -inf - -inf = NaN
    wa, wb = torch.exp(la - m), torch.exp(lb - m)  # (B, H, T), each in [0, 1], the larger is exactly 1
    total = (wa + wb).masked_fill(empty, 1.0)
    out_acc = torch.promote_types(out_a.dtype, acc)
    out = (wa[..., None] * out_a.to(out_acc) + wb[..., None] * out_b.to(out_acc)) / total[..., None]  # (B, H, T, D)
    lse = (m + torch.log(total)).masked_fill(empty, float("-inf"))
    return out.to(out_a.dtype), lse
