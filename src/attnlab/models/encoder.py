"""Bidirectional encoder (BERT shape): the field guide's "encoder: sees everything".

Every token attends to every other real token (no causal mask); padding is masked out of the keys.
Optional token-type embeddings, an embedding norm, a pooled output (tanh-dense of the first token) and
a masked-LM head (dense, activation, norm, projection tied to the token table).

``forward(input_ids, attention_mask=None, token_type_ids=None)`` returns MLM logits (B, T, V) when the
model has an MLM head (``mlm_head=True``) and the hidden states (B, T, C) otherwise; ``encode`` always
returns hidden states and ``pool`` the pooled vector.

Shape legend: B batch, T time, C d_model, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.config import ModelConfig
from attnlab.layers.norm import build_norm
from attnlab.layers.stack import Stack, check_length, check_token_ids, positions_from_mask
from attnlab.models.base import AttnlabModel

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swiglu": F.silu,
               "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


class EncoderModel(Stack, AttnlabModel):
    def __init__(self, cfg: ModelConfig) -> None:
        Stack.__init__(self, cfg, cfg.n_layers, causal=False)
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.type_embed = nn.Embedding(cfg.type_vocab_size, cfg.d_model) if cfg.type_vocab_size else None
        self.pooler = nn.Linear(cfg.d_model, cfg.d_model) if cfg.pooler else None
        if cfg.mlm_head:
            self.mlm_dense = nn.Linear(cfg.d_model, cfg.d_model)
            self.mlm_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias)
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.lm_head_bias)
        self.act = ACTIVATIONS[cfg.ffn]
        self.init_weights()
        if cfg.mlm_head and cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def output_embeddings(self) -> nn.Module | None:
        return self.lm_head if self.config.mlm_head else None

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None,
               token_type_ids: Tensor | None = None) -> Tensor:
        B, T = input_ids.shape
        check_length(T, self.config.max_seq_len)
        check_token_ids(input_ids, self.config.vocab_size)
        mask = None if attention_mask is None else attention_mask.to(torch.bool)
        key_mask = None if mask is None or bool(mask.all()) else mask
        positions = positions_from_mask(None, B, T, input_ids.device)  # right padding: real tokens first
        extra = None
        if self.type_embed is not None:
            types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            extra = self.type_embed(types)
        elif token_type_ids is not None:
            raise ValueError("token_type_ids given, but the model has no token-type embeddings (type_vocab_size=0)")
        return self.run_stack(self.embed(input_ids), positions, key_mask=key_mask, token_mask=mask, extra=extra)

    def pool(self, hidden: Tensor) -> Tensor:
        """(B, T, C) -> (B, C): tanh(dense(first token)), as BERT's pooler."""
        if self.pooler is None:
            raise ValueError("this encoder has no pooler (pooler=False in its config)")
        return torch.tanh(self.pooler(hidden[:, 0]))

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        if not self.config.mlm_head:
            raise ValueError("this encoder has no masked-LM head (mlm_head=False in its config)")
        return self.lm_head(self.mlm_norm(self.act(self.mlm_dense(hidden))))  # (B, T, V)

    def forward(self, input_ids: Tensor, cache=None, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        if cache is not None:
            raise ValueError("an encoder sees the whole sequence at once; it has no cache and does not generate")
        hidden = self.encode(input_ids, attention_mask, token_type_ids)
        return self.mlm_logits(hidden) if self.config.mlm_head else hidden

    def new_cache(self, batch: int, max_len: int | None = None):
        raise ValueError("an encoder (family='encoder') does not generate text; use a decoder or seq2seq model")
