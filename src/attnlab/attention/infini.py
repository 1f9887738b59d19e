"""Infini-attention (Munkhdalai, Faruqui & Gopal 2024, "Leave No Context Behind: Efficient Infinite Context
Transformers with Infini-attention").

The sequence is cut into segments of ``segment_len`` tokens. Inside a segment: ordinary causal
dot-product attention. Across segments: a per-KV-head compressive memory M (D x D) and normaliser z (D),

    read:    A_mem = σ(Q) M / (σ(Q) z)                        σ = ELU + 1
    linear:  M <- M + σ(K)ᵀ V                                 z <- z + Σ_t σ(K_t)
    delta:   M <- M + σ(K)ᵀ (V - σ(K) M / (σ(K) z))           z <- z + Σ_t σ(K_t)

and a learned per-head gate mixes the two: A = sigmoid(β) A_mem + (1 - sigmoid(β)) A_local. Memory is
written once a segment is complete, so every token reads the memory of the segments before its own.
RoPE (if any) uses positions *within* the segment, so a stream can be arbitrarily long; the memory is
position-free. A division by a zero normaliser (empty memory) reads as zero: we divide by max(σ(Q)z, ε).
Works with GQA: memory is kept per KV head and read by its group of query heads. The streaming state (each
layer's ``InfiniLayerState`` and the model's ``InfiniState`` around them) is the decoder's cache, in
``inference/infini_state.py`` with the other caches.

Shape legend: B batch, H query heads, K kv heads, G = H / K, T new tokens, L segment length, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.attention.kernels import get_kernel
from attnlab.config import ModelConfig
from attnlab.inference.infini_state import InfiniLayerState, InfiniState
from attnlab.layers.position import RotaryEmbedding, apply_rope

EPS = 1e-6


def sigma(x: Tensor) -> Tensor:
    """ELU + 1: a positive feature map."""
    return F.elu(x) + 1.0


def memory_read(q: Tensor, M: Tensor, z: Tensor) -> Tensor:
    """q (B, K, G, T, D), M (B, K, D, D), z (B, K, D) -> (B, K, G, T, D)."""
    sq = sigma(q)
    num = torch.matmul(sq, M[:, :, None])  # (B, K, G, T, D)
    den = torch.matmul(sq, z[:, :, None, :, None])  # (B, K, G, T, 1)
    return num / den.clamp_min(EPS)


def memory_write(M: Tensor, z: Tensor, k: Tensor, v: Tensor, rule: str) -> tuple[Tensor, Tensor]:
    """Fold one whole segment's k, v (B, K, L, D) into (M, z)."""
    sk = sigma(k)  # (B, K, L, D)
    if rule == "delta":  # write only what the memory cannot already retrieve
        retrieved = torch.matmul(sk, M) / torch.matmul(sk, z[..., None]).clamp_min(EPS)  # (B, K, L, D)
        v = v - retrieved
    return M + torch.matmul(sk.transpose(-1, -2), v), z + sk.sum(dim=2)


class InfiniAttention(nn.Module):
    """Drop-in replacement for MultiHeadAttention (same Q/K/V/O projection names) plus a gate β per head."""

    def __init__(self, cfg: ModelConfig, *, causal: bool = True) -> None:
        super().__init__()
        if not causal:
            raise ValueError("Infini-attention is a causal (decoder) mechanism")
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.seg_len, self.rule, self.bptt = cfg.segment_len, cfg.memory_update, cfg.infini_bptt_segments
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.attn_qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attn_qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attn_qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.attn_out_bias)
        self.gate = nn.Parameter(torch.zeros(cfg.n_heads))  # β: sigmoid(0) = an even mix at initialisation
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.segment_len, cfg.rope_theta) if cfg.position == "rope" else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.kernel = get_kernel(cfg.attention_kernel)

    def new_state(self, batch: int, dtype: torch.dtype, device) -> InfiniLayerState:
        return InfiniLayerState(batch, self.n_kv_heads, self.head_dim, self.seg_len, dtype, device)

    def _rotate(self, x: Tensor, start: int) -> Tensor:
        if self.rope is None:
            return x
        pos = torch.arange(start, start + x.shape[2], device=x.device)[None]  # in-segment positions
        cos, sin = self.rope(pos, x.dtype)
        return apply_rope(x, cos, sin)

    def _segment_step(self, q: Tensor, k_seg: Tensor, v_seg: Tensor, M: Tensor, z: Tensor, fill: int) -> Tensor:
        """Queries (B, H, c, D) at in-segment offsets fill..fill+c-1 against the segment's keys so far."""
        B, H, c, D = q.shape
        K, G = self.n_kv_heads, H // self.n_kv_heads
        local, _ = self.kernel(self._rotate(q, fill), self._rotate(k_seg, 0), v_seg, causal=True, mask=None,
                               scale=None)  # (B, H, c, D)
        mem = memory_read(q.reshape(B, K, G, c, D).to(M.dtype), M, z).reshape(B, H, c, D)
        g = torch.sigmoid(self.gate).view(1, H, 1, 1)
        return (g * mem + (1 - g) * local.to(mem.dtype)).to(q.dtype)

    def forward(self, x: Tensor, *, rope=None, key_mask: Tensor | None = None, cache: InfiniState | None = None,
                layer: int = 0, memory: Tensor | None = None) -> Tensor:
        if key_mask is not None:
            raise ValueError("Infini-attention does not support padding; give sequences of equal length")
        B, T, _ = x.shape
        H, K, D, L = self.n_heads, self.n_kv_heads, self.head_dim, self.seg_len
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(B, T, K, D).transpose(1, 2)
        outs = []
        if cache is None:  # training / one call: fresh memory, segments from position 0, gradients flow
            f32 = torch.promote_types(x.dtype, torch.float32)
            M = torch.zeros(B, K, D, D, dtype=f32, device=x.device)
            z = torch.zeros(B, K, D, dtype=f32, device=x.device)
            for n, s in enumerate(range(0, T, L)):
                ks, vs = k[:, :, s:s + L], v[:, :, s:s + L]
                outs.append(self._segment_step(q[:, :, s:s + L], ks, vs, M, z, 0))
                if ks.shape[2] == L:
                    M, z = memory_write(M, z, ks.to(f32), vs.to(f32), self.rule)
                    if self.bptt and (n + 1) % self.bptt == 0:  # truncated backprop through the memory
                        M, z = M.detach(), z.detach()
        else:  # streaming: continue the layer's state, token chunks aligned to segment boundaries
            st: InfiniLayerState = cache.layers[layer]
            s = 0
            while s < T:
                c = min(T - s, L - st.fill)
                st.k[:, :, st.fill:st.fill + c] = k[:, :, s:s + c]
                st.v[:, :, st.fill:st.fill + c] = v[:, :, s:s + c]
                end = st.fill + c
                outs.append(self._segment_step(q[:, :, s:s + c], st.k[:, :, :end], st.v[:, :, :end], st.M, st.z, st.fill))
                st.fill = end
                if st.fill == L:  # the segment is complete: fold it into the memory
                    st.prev = (st.M, st.z, st.k.clone(), st.v.clone())
                    st.M, st.z = memory_write(st.M, st.z, st.k.to(st.M.dtype), st.v.to(st.M.dtype), self.rule)
                    st.fill = 0
                s += c
        out = torch.cat(outs, dim=2).transpose(1, 2).reshape(B, T, H * D)  # (B, T, H*D)
        return self.dropout(self.o_proj(out))
