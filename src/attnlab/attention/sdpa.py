"""PyTorch's fused kernel (``attention_kernel="sdpa"``): ``torch.nn.functional.scaled_dot_product_attention``
behind the registry's signature, with GQA through ``enable_gqa`` (no K/V copy), the bottom-right aligned
causal rule of masks.py (PyTorch's ``is_causal`` is top-left aligned, so it is used only when Tq = Tk) and
zeros, not NaN, for a row with no key to attend to. It does not expose the log-sum-exp: ``lse`` is None.

Shape legend: B batch, H query heads, K key/value heads, Tq queries, Tk keys, D head dim.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from attnlab.attention.masks import build_bool_mask, check_shapes

__all__ = ["sdpa_attention"]


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
