"""Shape checks and masks shared by the attention kernels.

Conventions (every kernel of kernels.py follows them):

- q (B, H, Tq, D); k, v (B, K, Tk, D) with H a multiple of K (MHA K = H, GQA, MQA K = 1).
- A key padding mask is (B, Tk) bool, True where a key may be attended.
- Causal masking with Tq < Tk is bottom-right aligned: query i sits at absolute position Tk - Tq + i and
  sees the keys at positions <= its own, which is what a decode step over a KV cache needs. A single
  query (Tq = 1) sits at the last position and sees every key, so it needs no causal mask at all.

Shape legend: B batch, H query heads, K key/value heads, Tq queries, Tk keys, D head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["build_bool_mask", "causal_mask", "check_shapes"]


def check_shapes(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> None:
    """User-facing shape checks shared by the kernels (ValueError with the shapes)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, T, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, _, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k and v must be (B, K, Tk, D) matching q {tuple(q.shape)}; got {tuple(k.shape)}, {tuple(v.shape)}")
    if H % k.shape[1] != 0:
        raise ValueError(f"query heads H={H} must be a multiple of key/value heads K={k.shape[1]}")
    if mask is not None and (mask.shape != (B, k.shape[2]) or mask.dtype != torch.bool):
        raise ValueError(f"mask must be a bool key padding mask of shape (B, Tk)={(B, k.shape[2])}; got {tuple(mask.shape)} {mask.dtype}")


def causal_mask(tq: int, tk: int, device: torch.device) -> Tensor:
    """(Tq, Tk) bool, True where query i (at absolute position tk - tq + i) may see key j."""
    qpos = torch.arange(tk - tq, tk, device=device)[:, None]
    kpos = torch.arange(tk, device=device)[None, :]
    return kpos <= qpos


def build_bool_mask(tq: int, tk: int, *, causal: bool, mask: Tensor | None, device: torch.device) -> Tensor | None:
    """Combine causal and key-padding masks into (B or 1, 1, Tq, Tk) bool, or None if nothing is masked."""
    out = None
    if causal and tq > 1:  # a single query sits at the last position and sees every key
        out = causal_mask(tq, tk, device)[None, None]
    if mask is not None:
        pad = mask[:, None, None, :]
        out = pad if out is None else (out & pad)
    return out
