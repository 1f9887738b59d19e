"""The readable reference kernel (``attention_kernel="naive"``): materialise the (Tq, Tk) score matrix,
softmax it, weight the values::

    out = softmax(Q K^T * scale + mask) V,    lse = logsumexp(Q K^T * scale + mask)   (per query row)

with mask 0 where a key may be seen and -inf elsewhere (masks.py: key padding, bottom-right aligned
causal). Memory O(Tq * Tk) per head; the other kernels are checked against it. A row with no key to attend
to gives zeros and lse = -inf, not NaN.

Shape legend: B batch, H query heads, K key/value heads, G = H // K, Tq queries, Tk keys, D head dim.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnlab.attention.masks import build_bool_mask, check_shapes

__all__ = ["naive_attention"]


def naive_attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, mask: Tensor | None = None, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """The readable reference: materialise the (Tq, Tk) score matrix, softmax, weight the values."""
    check_shapes(q, k, v, mask)
    B, H, Tq, D = q.shape
    K, Tk = k.shape[1], k.shape[2]
    G = H // K
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)  # accumulate in float32 at least (float64 stays)
    qg = q.reshape(B, K, G, Tq, D).to(acc)  # (B, K, G, Tq, D): query heads grouped by the KV head they share
    scores = torch.matmul(qg, k.to(acc)[:, :, None].transpose(-1, -2)) * scale  # (B, K, G, Tq, Tk)
    allowed = build_bool_mask(Tq, Tk, causal=causal, mask=mask, device=q.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed[:, :, None], float("-inf"))  # broadcast over (K, G)
    lse = torch.logsumexp(scores, dim=-1)  # (B, K, G, Tq)
    empty = torch.isneginf(lse)
    probs = torch.exp(scores - torch.where(empty, torch.zeros_like(lse), lse)[..., None])
    out = torch.matmul(probs, v.to(acc)[:, :, None])  # (B, K, G, Tq, D)
    return out.reshape(B, H, Tq, D).to(q.dtype), lse.reshape(B, H, Tq).float()
