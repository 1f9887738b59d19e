"""FlashAttention in plain PyTorch: exact attention, tile by tile, without the (Tq, Tk) score matrix.

``flash_attention`` (Dao et al. 2022, "FlashAttention: Fast and Memory-Efficient Exact Attention with
IO-Awareness"; FlashAttention-2, Dao 2023) runs the tile engine of tiles.py over the whole key sequence:
the forward keeps per row a running maximum, softmax denominator and unnormalised output, rescaled by the
online softmax as each key tile arrives (out = acc / l, lse = m + log l); the backward recomputes each
tile's probabilities from Q, K and the saved log-sum-exp, so training memory is O(T). tiles.py's
docstring derives both.

This module holds what is specific to one process holding all of Q, K and V: the (B, H, T, D) <-> row
layout around the engine, the autograd function (it saves Q, K, V, O and the lse), the input checks and
the registry kernel ``flash_kernel`` (listed in kernels.py).

Shape legend: B batch, H query heads, K key/value heads, G = H // K query heads per K/V head,
Tq queries, Tk keys, D head dim, BK = B * K.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from attnlab.attention.masks import check_shapes
from attnlab.attention.merge import merge_partials
from attnlab.attention.tiles import backward_rows, default_block_sizes, flat_rows, forward_rows, from_rows

__all__ = ["default_block_sizes", "flash_attention", "flash_kernel", "merge_partials"]

_NEG_INF = float("-inf")


def _forward(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, scale: float, bq: int, bk: int
) -> tuple[Tensor, Tensor]:
    """Tiled online-softmax forward. Returns out (B, H, Tq, D) in q.dtype and lse (B, H, Tq) float32+."""
    B, H, Tq, D = q.shape
    K, Tk = k.shape[1], k.shape[2]
    G = H // K
    acc = torch.promote_types(q.dtype, torch.float32)  # accumulate in float32 at least
    out = torch.zeros(B * K, Tq * G, D, dtype=acc, device=q.device)  # (BK, Tq*G, D)
    lse = torch.full((B * K, Tq * G), _NEG_INF, dtype=acc, device=q.device)  # (BK, Tq*G)
    forward_rows(flat_rows(q, K), k.reshape(B * K, Tk, D), v.reshape(B * K, Tk, D), mask, G, causal, scale, bq, bk,
                 out, lse)
    out4 = from_rows(out.view(B, K, Tq * G, D), G)  # (B, H, Tq, D): a view for G = 1
    return out4.to(q.dtype), from_rows(lse.view(B, K, Tq * G), G)  # (B, H, Tq, D), (B, H, Tq)


def _backward(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor, dlse: Tensor | None,
    mask: Tensor | None, causal: bool, scale: float, bq: int, bk: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """FlashAttention-2 backward: recompute each tile's probabilities from the saved lse."""
    B, H, Tq, D = q.shape
    K, Tk = k.shape[1], k.shape[2]
    G = H // K
    acc = torch.promote_types(q.dtype, torch.float32)
    dq = torch.zeros(B * K, Tq * G, D, dtype=acc, device=q.device)  # (BK, Tq*G, D)
    dk = torch.zeros(B * K, Tk, D, dtype=acc, device=q.device)  # (BK, Tk, D)
    dv = torch.zeros_like(dk)
    backward_rows(flat_rows(q, K), k.reshape(B * K, Tk, D), v.reshape(B * K, Tk, D), flat_rows(out, K),
                  flat_rows(lse, K), flat_rows(dout, K), None if dlse is None else flat_rows(dlse, K), mask, G, causal,
                  scale, bq, bk, dq, dk, dv)
    dq4 = from_rows(dq.view(B, K, Tq * G, D), G)  # (B, H, Tq, D): a view for G = 1
    return dq4.to(q.dtype), dk.view(B, K, Tk, D).to(k.dtype), dv.view(B, K, Tk, D).to(v.dtype)


class _FlashAttention(torch.autograd.Function):
    """Autograd wrapper: saves Q, K, V, O and the lse (O(T) memory), recomputes the scores in backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, scale: float, bq: int, bk: int
    ) -> tuple[Tensor, Tensor]:
        out, lse = _forward(q, k, v, mask, causal, scale, bq, bk)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.causal, ctx.scale, ctx.bq, ctx.bk = causal, scale, bq, bk  # type: ignore[attr-defined]
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, dout: Tensor, dlse: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        q, k, v, out, lse, mask = ctx.saved_tensors  # type: ignore[attr-defined]
        dq, dk, dv = _backward(
            q, k, v, out, lse, dout, dlse, mask, ctx.causal, ctx.scale, ctx.bq, ctx.bk  # type: ignore[attr-defined]
        )
        return dq, dk, dv, None, None, None, None, None


def _check(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, block_q: int | None, block_k: int | None) -> None:
    check_shapes(q, k, v, mask)
    if not (q.is_floating_point() and q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one floating point dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if mask is not None and mask.device != q.device:
        raise ValueError(f"key_padding_mask is on {mask.device} but q is on {q.device}")
    for name, size in (("block_q", block_q), ("block_k", block_k)):
        if size is not None and (not isinstance(size, int) or size < 1):
            raise ValueError(f"{name} must be a positive int or None; got {size!r}")


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact softmax attention computed tile by tile (FlashAttention, Dao et al. 2022; FlashAttention-2, Dao 2023).

    Args:
        q: (B, H, Tq, D) queries.
        k, v: (B, K, Tk, D) keys and values; H must be a multiple of K (MHA, GQA, MQA). K/V are not repeated.
        causal: query i (at absolute position Tk - Tq + i, bottom-right aligned) sees keys at positions <= its own.
        key_padding_mask: (B, Tk) bool, True where a key may be attended.
        scale: score scale, default 1 / sqrt(D).
        block_q, block_k: queries and keys per tile; default ``default_block_sizes(Tq, Tk, H // K)``.

    Returns:
        ``(out, lse)``: out (B, H, Tq, D) in q's dtype (accumulated in float32), lse (B, H, Tq) float32
        (float64 for float64 inputs), the log-sum-exp of each row's scaled scores. A row with no key to
        attend to gives zeros and lse = -inf. Both are differentiable (backward recomputes the tiles).
    """
    _check(q, k, v, key_padding_mask, block_q, block_k)
    Tq, D = q.shape[2], q.shape[3]
    K, Tk = k.shape[1], k.shape[2]
    default_q, default_k = default_block_sizes(Tq, Tk, q.shape[1] // K)
    bq, bk = block_q or default_q, block_k or default_k
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    mask = None if key_padding_mask is None or bool(key_padding_mask.all()) else key_padding_mask
    return _FlashAttention.apply(q, k, v, mask, causal, scale, bq, bk)


def flash_kernel(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, mask: Tensor | None = None, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """The registry entry (``attention_kernel="flash"``): ``mask`` is the (B, Tk) bool key padding mask."""
    return flash_attention(q, k, v, causal=causal, key_padding_mask=mask, scale=scale)
