"""A stack of residual blocks with what surrounds it: positions, an optional embedding norm, the final norm.

Shared by the decoder LM, the encoder, and both halves of the encoder-decoder. The token embedding
itself lives in the model (an encoder-decoder shares one table between its two stacks).

Shape legend: B batch, T time, S source length, C d_model.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from attnlab.config import ModelConfig
from attnlab.inference.cache import AttentionCache
from attnlab.layers.block import Block
from attnlab.layers.norm import build_norm
from attnlab.layers.position import RotaryEmbedding, sinusoidal_table

if TYPE_CHECKING:
    from attnlab.inference.infini_state import InfiniState


class Stack(nn.Module):
    """positions -> (embedding norm) -> dropout -> N blocks -> (final norm, for pre/sandwich placement)."""

    def __init__(self, cfg: ModelConfig, n_layers: int, *, causal: bool, cross: bool = False) -> None:
        super().__init__()
        self.cfg_position = cfg.position
        self.embed_multiplier = math.sqrt(cfg.d_model) if cfg.embed_scale else 1.0
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.position == "learned" else None
        # (a streaming mechanism, Infini-attention, applies RoPE itself within each segment: see unbounded_context)
        self.rope = (RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
                     if cfg.position == "rope" and not cfg.unbounded_context else None)
        self.embed_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias) if cfg.embed_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, causal=causal, cross=cross) for _ in range(n_layers))
        # Pre-Norm (and sandwich) leave the residual stream unnormalised, so a final norm closes the stack.
        self.norm = (build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias)
                     if cfg.norm_position != "post" else None)

    def run_stack(
        self,
        tok: Tensor,
        positions: Tensor,
        *,
        key_mask: Tensor | None = None,
        token_mask: Tensor | None = None,
        cache: AttentionCache | InfiniState | None = None,  # what the layers' attention takes (static: StaticSlots)
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        extra: Tensor | None = None,
        rope: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """``tok`` (B, T, C) token embeddings (``extra`` is added too, e.g. token types) -> (B, T, C).
        ``rope``: the (cos, sin) of ``self.rope(positions, dtype)``, when the caller computed them already."""
        x = tok * self.embed_multiplier if self.embed_multiplier != 1.0 else tok
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        elif self.cfg_position == "sinusoidal":
            x = x + sinusoidal_table(positions, x.shape[-1], x.dtype)
        if extra is not None:
            x = x + extra
        if self.embed_norm is not None:
            x = self.embed_norm(x, token_mask)
        x = self.drop(x)
        if rope is None and self.rope is not None:
            rope = self.rope(positions, x.dtype)
        for i, block in enumerate(self.blocks):
            x = block(x, rope=rope, key_mask=key_mask, token_mask=token_mask, cache=cache, layer=i,
                      memory=memory, memory_mask=memory_mask)
        return self.norm(x, token_mask) if self.norm is not None else x


def check_length(T: int, max_seq_len: int, what: str = "input") -> None:
    if T > max_seq_len:
        raise ValueError(
            f"{what} of {T} tokens is longer than the model's context (max_seq_len={max_seq_len}); "
            f"truncate it to at most {max_seq_len} tokens"
        )


def check_token_ids(input_ids: Tensor, vocab_size: int, what: str = "input_ids") -> None:
    """``ValueError`` naming an id outside ``[0, vocab_size)`` (the embedding would fail with an IndexError).

    One min/max reduction over the batch (no per-element Python); skipped while torch.compile traces, where
    a data-dependent branch would break the graph (compiled decode steps feed back ids sampled from the
    model's own vocabulary).
    """
    if input_ids.numel() == 0 or torch.compiler.is_compiling():
        return
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"{what} must be integer token ids, got dtype {input_ids.dtype}")
    low, high = (int(v) for v in torch.aminmax(input_ids))
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"{what} holds token id {bad}, outside this model's vocabulary [0, {vocab_size}) "
                         f"(vocab_size={vocab_size}); ids must come from the model's own tokenizer")


def positions_from_mask(attention_mask: Tensor | None, B: int, T: int, device: torch.device) -> Tensor:
    """(B, T) positions counting real tokens only (left padding gets position 0)."""
    if attention_mask is None:
        return torch.arange(T, device=device)[None].expand(B, T)
    return (attention_mask.long().cumsum(1) - 1).clamp_min(0)
