"""The attention probabilities of one layer, for inspection (attention maps in the tour, alignments in the
seq2seq task): softmax(Q K^T / sqrt(D) + mask) over the keys, computed as the naive kernel does, from the
layer's own projections, so it works on a plain ``MultiHeadAttention`` and on the fused-QKV layer that
``prepare_for_decode`` swaps in (which has no ``q_proj``).

Shape legend: B batch, T queries, S keys, C d_model, H query heads, K kv heads, D head dim.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor

from attnlab.attention.masks import build_bool_mask
from attnlab.layers.position import apply_rope


class ProjectingAttention(Protocol):
    """What the probabilities need of a layer: its head counts, causality and Q / K-V projections."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    causal: bool

    def project_q(self, x: Tensor) -> Tensor:
        """(B, T, C) -> queries (B, H, T, D), positions not applied."""

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, S, C) -> keys, values (B, K, S, D), positions not applied."""


@torch.no_grad()
def attention_probabilities(layer: ProjectingAttention, x: Tensor, *, memory: Tensor | None = None,
                            rope: tuple[Tensor, Tensor] | None = None, key_mask: Tensor | None = None) -> Tensor:
    """(B, H, T, S) probabilities of ``layer`` on input ``x`` (B, T, C).

    Self-attention: keys from ``x``, ``rope`` (the (cos, sin) the stack passes) applied to Q and K, causal if
    the layer is. Cross-attention: keys from ``memory`` (B, S, C), no positions. ``key_mask`` (B, S) as the layer
    gets it (True = a real key). Rows with no visible key are all zeros."""
    q = layer.project_q(x)  # (B, H, T, D)
    k, _ = layer.project_kv(x if memory is None else memory)  # (B, K, S, D)
    if rope is not None and memory is None:
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    B, H, T, D = q.shape
    S = k.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    k = k.to(acc).repeat_interleave(H // layer.n_kv_heads, dim=1)  # (B, H, S, D)
    scores = torch.matmul(q.to(acc), k.transpose(-1, -2)) / math.sqrt(D)  # (B, H, T, S)
    allowed = build_bool_mask(T, S, causal=layer.causal and memory is None, mask=key_mask, device=q.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))  # (B or 1, 1, T, S) over the heads
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)
