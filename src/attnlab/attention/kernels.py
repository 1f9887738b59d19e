"""Attention kernels: *how* attention is computed, kept apart from *what* it computes (mha.py).

Every kernel has one signature::

    kernel(q, k, v, *, causal: bool, mask: BoolTensor | None, scale: float | None) -> (out, lse)

Shapes: q (B, H, Tq, D); k, v (B, K, Tk, D) with H a multiple of K (GQA/MQA: no copy of K/V is made);
mask (B, Tk) is a *key padding* mask, True where a key may be attended; out (B, H, Tq, D);
lse (B, H, Tq) float32, the log-sum-exp of each row's scaled scores (-inf for a row with no key), or
None for a kernel that cannot expose it (sdpa).

Causal masking with Tq < Tk is bottom-right aligned: query i sits at absolute position Tk - Tq + i,
which is what a decode step over a KV cache needs. A row with no key to attend to gives zeros, not NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Kernel = Callable[..., tuple[Tensor, Tensor | None]]
KERNELS: dict[str, Kernel] = {}


def register_kernel(name: str) -> Callable[[Kernel], Kernel]:
    def wrap(fn: Kernel) -> Kernel:
        KERNELS[name] = fn
        return fn

    return wrap


def get_kernel(name: str) -> Kernel:
    if name not in KERNELS:
        # Kernels living in their own modules register on import.
        if name == "flash":
            from attnlab.attention import flash  # noqa: F401
        elif name == "ring":
            from attnlab.attention.ring import ring_kernel

            KERNELS["ring"] = ring_kernel
    if name not in KERNELS:
        raise ValueError(f"attention kernel {name!r} is not available; choose one of: {sorted(KERNELS)}")
    return KERNELS[name]


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


@register_kernel("naive")
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


@register_kernel("sdpa")
def sdpa_attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, mask: Tensor | None = None, scale: float | None = None
) -> tuple[Tensor, None]:
    """PyTorch's fused ``scaled_dot_product_attention`` (GQA via ``enable_gqa``, no K/V copy).

    It does not expose the log-sum-exp, so ``lse`` is None.
    """
    check_shapes(q, k, v, mask)
    Tq, Tk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if mask is None and (not causal or Tq == 1):
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa), None
    if mask is None and Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa), None
    allowed = build_bool_mask(Tq, Tk, causal=causal, mask=mask, device=q.device)
    empty = ~allowed.any(dim=-1, keepdim=True)  # (B|1, 1, Tq, 1): rows with nothing to attend to
    if bool(empty.any()):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | empty, scale=scale, enable_gqa=gqa)
        return out.masked_fill(empty, 0.0), None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa), None
