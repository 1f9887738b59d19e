"""The static-slot decode kernel: a few new queries against every slot of a preallocated KV cache.

Registered as ``"static_slots"`` in ``kernels.py``. It is what a static-shape decode step
(``inference/static.py``) attends with: the cache's K/V buffers have S slots whatever the number of tokens
cached so far, so the graph compiled for a call has shapes that do not change from step to step. Which slot
each new query may see is the caller's mask, not the cache length.

The kernel signature, with one documented extension::

    static_slots_attention(q, k, v, *, causal, mask, scale) -> (out, lse)

- q (B, H, n, D): the n new queries; k, v (B, K, S, D): every slot of the cache, the new tokens' K/V
  already written at their slots; H a multiple of K.
- mask (B, n, S) bool, **per query** (the other kernels take a (B, S) key padding mask): True where query i
  may attend to slot j. Required. Causality is part of it (slot j <= length + i), since slot order is not
  the bottom-right alignment ``causal`` means for the other kernels; ``causal`` is accepted for the shared
  signature and not applied again.
- out (B, H, n, D) in q's dtype; lse (B, H, n) float32 (-inf for a query that sees no slot, whose out is 0).

Softmax: scores s_ij = scale · q_i·k_j over the visible slots, m_i = max_j s_ij, p_ij = exp(s_ij - m_i),
out_i = Σ_j p_ij v_j / Σ_j p_ij, lse_i = m_i + log Σ_j p_ij. Accumulated in float32 (or q's wider dtype).

Width invariance (the policy of ``inference/fast.py``): a query's bits must not depend on how many queries
share the call, nor on how many slots the cache has:

- rows: the BLAS works through a product's rows in blocks of ``ROW_BLOCK`` (4) and sums leftover rows in
  another order, so a query's scores among 3 query rows (G = 3 heads per K/V head, one token) differed
  from its scores among 15 (five tokens) in the last bits. Every product is zero-padded to a whole number
  of blocks (``pad_rows``; measured invariant on MKL for 4 to 48 rows at any position);
- slots: plain and speculative decoding of one prompt can get caches of 256 and 512 slots (speculation asks
  for γ + 1 more positions), and MKL's fp32 product of one query over 256 vs 512 slots differed in the last
  bits (on SmolLM2 in bf16 that grew to 0.25 in the logits after 30 layers and flipped a near-tie).
  Attention works on fixed blocks of ``SLOT_BLOCK`` slots, each block's products of one shape whatever S,
  and adds the blocks' results in order: the blocks past the visible slots add exact zeros.

Shape legend: B batch, H query heads, K kv heads, G = H / K, n new queries, S slots, D head dim,
R = G·n query rows per K/V head.
"""

from __future__ import annotations

import torch
from torch import Tensor

SLOT_BLOCK = 256
ROW_BLOCK = 4


def pad_rows(x: Tensor) -> Tensor:
    """(..., R, C) -> (..., R', C) with zero rows up to a multiple of ``ROW_BLOCK`` (see the docstring)."""
    pad = -x.shape[-2] % ROW_BLOCK
    return x if pad == 0 else torch.cat([x, x.new_zeros(*x.shape[:-2], pad, x.shape[-1])], dim=-2)


def static_slots_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, mask: Tensor | None = None,
                           scale: float | None = None) -> tuple[Tensor, Tensor]:
    """q (B, H, n, D), k/v (B, K, S, D) slots, mask (B, n, S) per query -> (out (B, H, n, D), lse (B, H, n))."""
    if mask is None or mask.dim() != 3:
        raise ValueError("static_slots attention needs a (B, n, S) per-query mask of the visible slots")
    B, H, n, D = q.shape
    K, S = k.shape[1], k.shape[2]
    G, R = H // K, H // K * n
    scale = D ** -0.5 if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)
    nb = S // SLOT_BLOCK if S % SLOT_BLOCK == 0 else 1  # blocks of slots (see the docstring)
    blk = S // nb
    qg = q.reshape(B, K, R, D).to(acc)  # query heads grouped by the K/V head they share
    kb = k.to(acc).view(B, K, nb, blk, D)
    scores = torch.matmul(pad_rows(qg).unsqueeze(2), kb.transpose(-1, -2))[:, :, :, :R]  # (B, K, nb, R, blk)
    scores = scores.permute(0, 1, 3, 2, 4).reshape(B, K, G, n, S) * scale
    scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    top = scores.amax(dim=-1, keepdim=True)  # (B, K, G, n, 1)
    top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)  # a query with no slot gives zeros
    p = torch.exp(scores - top).view(B, K, R, S)
    pb = pad_rows(p).view(B, K, -1, nb, blk).permute(0, 1, 3, 2, 4)  # (B, K, nb, R', blk)
    parts = torch.matmul(pb, v.to(acc).view(B, K, nb, blk, D))  # (B, K, nb, R', D)
    sums = p.view(B, K, R, nb, blk).sum(dim=-1)  # (B, K, R, nb)
    out, den = parts[:, :, 0], sums[..., 0]
    for i in range(1, nb):  # block after block, in order: blocks past the visible slots add exact zeros
        out, den = out + parts[:, :, i], den + sums[..., i]
    out = out[:, :, :R] / den[..., None].clamp_min(1e-30)
    lse = (top.view(B, K, R) + torch.log(den)).float()  # -inf where den = 0 (nothing visible)
    return out.view(B, H, n, D).to(q.dtype), lse.view(B, H, n)
