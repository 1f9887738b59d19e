"""Multi-head attention: *what* is computed. The kernel (kernels.py) decides *how*.

Separate Q, K, V and output projections (Vaswani et al. 2017). ``n_kv_heads`` < ``n_heads`` shares each
K/V head between a group of query heads: grouped-query attention (Ainslie et al. 2023), down to one
K/V head, multi-query attention (Shazeer 2019). K/V are never repeated in memory: the cache stores
K heads and the kernels broadcast over the groups.

Self-attention takes K/V from its own input (causal in a decoder, bidirectional in an encoder).
Cross-attention (``cross=True``) takes queries from the decoder and K/V from the encoder's output — the
"fusion" of an encoder-decoder; during generation those K/V are computed once and kept in the cache.

Shape legend: B batch, T new tokens, S keys so far (or source length), C d_model, H query heads,
K kv heads, D head dim.
"""

from __future__ import annotations

import functools
from typing import cast

from torch import Tensor, nn

from attnlab.attention.kernels import get_kernel
from attnlab.config import ModelConfig
from attnlab.inference.cache import AttentionCache, CrossAttentionCache
from attnlab.layers.position import apply_rope


class MultiHeadAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, *, causal: bool, cross: bool = False) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.causal, self.cross = causal and not cross, cross
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.attn_qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attn_qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attn_qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.attn_out_bias)
        self.dropout = nn.Dropout(cfg.dropout)
        self.kernel = get_kernel(cfg.attention_kernel)
        if cfg.attention_kernel == "ring":  # the layout the sequence was sharded with
            self.kernel = functools.partial(self.kernel, layout=cfg.ring_layout)

    def project_q(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        B, S, _ = x.shape
        k = self.k_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, S, D)
        v = self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, S, D)
        return k, v

    def forward(
        self,
        x: Tensor,
        *,
        rope: tuple[Tensor, Tensor] | None = None,
        key_mask: Tensor | None = None,
        cache: AttentionCache | None = None,
        layer: int = 0,
        memory: Tensor | None = None,
    ) -> Tensor:
        q = self.project_q(x)  # (B, H, T, D)
        if self.cross:
            if cache is not None:  # computed on the first decode step, reused by every later one
                # a cross-attention layer sits in an encoder-decoder's decoder, handed its Seq2SeqCache
                k, v = cast(CrossAttentionCache, cache).cross_kv(layer, lambda: self.project_kv(memory))
            else:
                k, v = self.project_kv(memory)  # (B, K, S, D) from the encoder output
            return self.attend(q, k, v, key_mask=key_mask)
        k, v = self.project_kv(x)  # (B, K, T, D)
        return self.attend(q, k, v, rope=rope, key_mask=key_mask, cache=cache, layer=layer)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, rope: tuple[Tensor, Tensor] | None = None,
               key_mask: Tensor | None = None, cache: AttentionCache | None = None, layer: int = 0) -> Tensor:
        """Positions, cache and kernel for projected q (B, H, T, D), k/v (B, K, T, D) -> (B, T, C).

        With a cache, the new K/V join everything cached so far; a cache whose layout needs its own kernel
        names it (``cache.attention_kernel``, a key of the kernel registry: the static-shape decode step's
        ``"static_slots"``, inference/static.py), else the layer's configured kernel runs."""
        B, _, T, _ = q.shape
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        kernel = self.kernel
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, K, S, D): everything cached so far plus the new tokens
            if cache.attention_kernel is not None:
                kernel = get_kernel(cache.attention_kernel)
        out, _ = kernel(q, k, v, causal=self.causal, mask=key_mask, scale=None)  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*D)
        return self.dropout(self.o_proj(out))
