"""Decoder-only language model (GPT-2 and Llama shapes), the field guide's "decoder: causal".

Shape legend: B batch, T time, C d_model, V vocab.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnlab.config import ModelConfig
from attnlab.inference.cache import KVCache
from attnlab.layers.block import Block
from attnlab.layers.norm import build_norm
from attnlab.layers.position import RotaryEmbedding, sinusoidal_table
from attnlab.models.base import AttnlabModel


class DecoderLM(AttnlabModel):
    """Token embedding -> N causal blocks -> (final norm) -> LM head.

    ``forward(input_ids, cache=None, attention_mask=None) -> logits (B, T, V)``. With a cache the new
    tokens attend to everything cached before them; ``attention_mask`` marks padding (0) among them.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.position == "learned" else None
        self.rope = (
            RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta) if cfg.position == "rope" else None
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, causal=True) for _ in range(cfg.n_layers))
        # Pre-Norm leaves the residual stream unnormalised, so a final norm precedes the head.
        self.norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias) if cfg.norm_position == "pre" else None
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.init_weights()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def new_cache(self, batch: int, max_len: int | None = None, *, dtype: torch.dtype | None = None) -> KVCache:
        cfg = self.config
        max_len = cfg.max_seq_len if max_len is None else max_len
        if max_len > cfg.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds the model's context max_seq_len={cfg.max_seq_len}")
        return KVCache(cfg.n_layers, batch, cfg.n_kv_heads, cfg.head_dim, max_len,
                       dtype=dtype or self.dtype, device=self.device)

    def forward(self, input_ids: Tensor, cache: KVCache | None = None, attention_mask: Tensor | None = None) -> Tensor:
        B, T = input_ids.shape
        cfg = self.config
        if cache is None:
            if T > cfg.max_seq_len:
                raise ValueError(
                    f"input of {T} tokens is longer than the model's context (max_seq_len={cfg.max_seq_len}); "
                    f"truncate it to the last {cfg.max_seq_len} tokens"
                )
            if attention_mask is None:
                positions = torch.arange(T, device=input_ids.device)[None].expand(B, T)
                key_mask = None
            else:
                key_mask = attention_mask.to(torch.bool)
                positions = (attention_mask.long().cumsum(1) - 1).clamp_min(0)
                if bool(key_mask.all()):
                    key_mask = None
        else:
            if cache.batch_size != B:
                raise ValueError(f"cache was made for batch {cache.batch_size}, input has batch {B}")
            positions, key_mask = cache.begin(T, attention_mask)
            if int(positions.max()) >= cfg.max_seq_len:
                raise ValueError(
                    f"position {int(positions.max())} is beyond the model's context (max_seq_len={cfg.max_seq_len})"
                )

        x = self.embed(input_ids)  # (B, T, C)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        elif cfg.position == "sinusoidal":
            x = x + sinusoidal_table(positions, cfg.d_model, x.dtype)
        x = self.drop(x)
        rope = self.rope(positions, x.dtype) if self.rope is not None else None
        for i, block in enumerate(self.blocks):
            x = block(x, rope=rope, key_mask=key_mask, cache=cache, layer=i)
        if cache is not None:
            cache.commit(T, attention_mask)
        if self.norm is not None:
            x = self.norm(x)
        return self.lm_head(x)  # (B, T, V)
