"""Fused projections for decoding: one weight read where the model definition has two or three.

``prepare_for_decode(fuse=True)`` (``inference/fast.py``) puts these in place of a block's modules:

- ``FusedSelfAttention`` replaces a self-attention layer: its Q, K and V projections become one
  (H + 2K)·D x C matrix; positions, cache, kernel and output projection are the original layer's
  (``MultiHeadAttention.attend``), so the two compute the same function;
- ``FusedSwiGLU`` replaces a SwiGLU FFN: gate and up become one 2F x C matrix.

The rows are the original rows, concatenated. With attnlab's CPU kernel each output element is the same
dot product whether its weight row sits in a narrow or a wide matrix, so fp32 outputs are bit-identical;
through PyTorch's GEMM they agree to float rounding. The originals are dropped (their Parameters become
the fused matrix's rows), which is why a fused model cannot be saved: ``prepare_lazily`` never fuses.

Shape legend: B batch, T new tokens, C d_model, H query heads, K kv heads, D head dim, F d_ff.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.attention.mha import MultiHeadAttention
from attnlab.inference.cache import AttentionCache
from attnlab.layers.ffn import FFN
from attnlab.layers.kernel_linear import KernelLinear
from attnlab.layers.qblocks import BlockLinear


def concat_linear(parts: list[nn.Module]) -> nn.Module:
    """One linear layer whose output rows are the rows of ``parts`` in order (biases likewise): float
    ``nn.Linear`` parts give a ``KernelLinear``, ``BlockLinear`` parts of one GGUF format a ``BlockLinear``
    (whole rows of blocks concatenated, as stored). See :func:`fusable`."""
    has_bias = any(p.bias is not None for p in parts)
    bias = None
    if has_bias:
        ref = next(p.bias for p in parts if p.bias is not None)
        bias = torch.cat([p.bias.detach() if p.bias is not None else
                          torch.zeros(p.out_features, dtype=ref.dtype, device=ref.device) for p in parts])
    if isinstance(parts[0], BlockLinear):
        return BlockLinear(torch.cat([p.blocks for p in parts]), parts[0].fmt, parts[0].in_features, bias)
    weight = torch.cat([p.weight.detach() for p in parts], dim=0)
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    fused.bias = None if bias is None else nn.Parameter(bias.to(weight.dtype), requires_grad=False)
    return KernelLinear.sharing(fused)


def fusable(parts: list[nn.Module]) -> bool:
    """Whether :func:`concat_linear` can join ``parts``: all float ``nn.Linear`` of one dtype, or all
    ``BlockLinear`` of one format (a GGUF that mixes formats, e.g. Q4_K with Q6_K, keeps them apart)."""
    if all(isinstance(p, nn.Linear) for p in parts):
        return len({p.weight.dtype for p in parts}) == 1
    return all(isinstance(p, BlockLinear) for p in parts) and len({p.fmt for p in parts}) == 1


class FusedSelfAttention(nn.Module):
    """A self-attention layer with its Q, K, V projections as one product (see the module docstring)."""

    def __init__(self, attn: MultiHeadAttention) -> None:
        super().__init__()
        if attn.cross:
            raise ValueError("cross-attention takes K/V from the encoder output: its projections do not fuse")
        self.n_heads, self.n_kv_heads, self.head_dim = attn.n_heads, attn.n_kv_heads, attn.head_dim
        self.qkv_proj = concat_linear([attn.q_proj, attn.k_proj, attn.v_proj])
        del attn.q_proj, attn.k_proj, attn.v_proj
        self.attn = attn  # its attend(): positions, cache, kernel, output projection
        self.causal = attn.causal

    def project_q(self, x: Tensor) -> Tensor:
        """(B, T, C) -> (B, H, T, D): the query rows of the fused product (attention_probabilities uses it)."""
        B, T, _ = x.shape
        return self.qkv_proj(x)[..., :self.n_heads * self.head_dim].view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, S, C) -> k, v (B, K, S, D) from the fused product."""
        B, S, _ = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        _, k, v = self.qkv_proj(x).split([H * D, K * D, K * D], dim=-1)
        return k.view(B, S, K, D).transpose(1, 2), v.view(B, S, K, D).transpose(1, 2)

    def forward(self, x: Tensor, *, rope: tuple[Tensor, Tensor] | None = None, key_mask: Tensor | None = None,
                cache: AttentionCache | None = None, layer: int = 0, memory: Tensor | None = None) -> Tensor:
        B, T, _ = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv_proj(x).split([H * D, K * D, K * D], dim=-1)  # (B, T, H*D), (B, T, K*D) x 2
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, K, D).transpose(1, 2)
        return self.attn.attend(q, k, v, rope=rope, key_mask=key_mask, cache=cache, layer=layer)


class FusedSwiGLU(nn.Module):
    """A SwiGLU FFN with its gate and up projections as one product: silu(x G^T) * (x U^T), then down."""

    def __init__(self, ffn: FFN) -> None:
        super().__init__()
        if ffn.kind != "swiglu":
            raise ValueError(f"only a SwiGLU FFN has gate and up projections to fuse, not ffn={ffn.kind!r}")
        self.gate_up = concat_linear([ffn.gate, ffn.up])
        self.down, self.dropout = ffn.down, ffn.dropout

    def forward(self, x: Tensor) -> Tensor:  # (B, T, C) -> (B, T, C)
        g, u = self.gate_up(x).chunk(2, dim=-1)  # (B, T, F) each
        return self.dropout(self.down(F.silu(g) * u))
