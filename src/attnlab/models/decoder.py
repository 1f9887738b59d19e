"""Decoder-only language model (GPT-2 and Llama shapes), the field guide's "decoder: causal".

Shape legend: B batch, T time, C d_model, V vocab.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnlab.config import ModelConfig
from attnlab.inference.cache import KVCache, SequenceCache
from attnlab.inference.infini_state import InfiniState
from attnlab.layers.stack import Stack, check_length, check_token_ids, positions_from_mask
from attnlab.models.base import AttnlabModel


class DecoderLM(Stack, AttnlabModel):
    """Token embedding -> N causal blocks -> (final norm) -> LM head.

    ``forward(input_ids, cache=None, attention_mask=None) -> logits (B, T, V)``. With a cache the new
    tokens attend to everything cached before them; ``attention_mask`` marks padding (0) among them.

    With ``head_vocab_size`` N > 0 the head scores only the N tokens in the buffer ``head_token_ids``
    (a draft that proposes only frequent tokens: a cheaper head per step, and exactness is untouched since
    a speculative draft may propose from any support); the logits of the others are -inf, so callers
    still see (B, T, V). ``forward(..., full_vocab=False)`` returns the (B, T, N) head logits (training).

    Nothing here is decode-only: ``prepare_for_decode`` (inference/fast.py) swaps in fused and kernel
    modules from outside, and with ``compile`` routes ``forward`` through the object it records on the model
    (``model.static_decoder``, inference/static.py).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        Stack.__init__(self, cfg, cfg.n_layers, causal=True)
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.head_vocab_size or cfg.vocab_size, bias=cfg.lm_head_bias)
        if cfg.head_vocab_size:
            self.register_buffer("head_token_ids", torch.arange(cfg.head_vocab_size))
        self.init_weights()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def new_cache(self, batch: int, max_len: int | None = None, *,
                  dtype: torch.dtype | None = None) -> KVCache | InfiniState:
        cfg = self.config
        if cfg.unbounded_context:  # a stream: a constant-size state, whatever the length
            layers = [b.attn.new_state(batch, dtype or self.dtype, self.device) for b in self.blocks]
            return InfiniState(layers, batch, cfg.segment_len)
        max_len = cfg.max_seq_len if max_len is None else max_len
        if max_len > cfg.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds the model's context max_seq_len={cfg.max_seq_len}")
        return KVCache(cfg.n_layers, batch, cfg.n_kv_heads, cfg.head_dim, max_len,
                       dtype=dtype or self.dtype, device=self.device)

    def forward(self, input_ids: Tensor, cache: SequenceCache | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, full_vocab: bool = True) -> Tensor:
        """``position_ids`` (B, T) or (T,) overrides the positions (e.g. a context-parallel shard's global ones)."""
        B, T = input_ids.shape
        cfg = self.config
        check_token_ids(input_ids, cfg.vocab_size)
        token_mask = None if attention_mask is None else attention_mask.to(torch.bool)
        unbounded = cfg.unbounded_context
        if cache is None:
            if not unbounded:
                check_length(T, cfg.max_seq_len)
            positions = positions_from_mask(attention_mask, B, T, input_ids.device)
            key_mask = None if token_mask is None or bool(token_mask.all()) else token_mask
        else:
            if cache.batch_size != B:
                raise ValueError(f"cache was made for batch {cache.batch_size}, input has batch {B}")
            positions, key_mask = cache.begin(T, attention_mask)
            if not unbounded and int(positions.max()) >= cfg.max_seq_len:
                raise ValueError(
                    f"position {int(positions.max())} is beyond the model's context (max_seq_len={cfg.max_seq_len})"
                )
        if position_ids is not None:
            positions = torch.as_tensor(position_ids, device=input_ids.device).expand(B, T)
        x = self.run_stack(self.embed(input_ids), positions, key_mask=key_mask, token_mask=token_mask, cache=cache)
        if cache is not None:
            cache.commit(T, attention_mask)
        return self.head(x, full_vocab=full_vocab)

    def head(self, x: Tensor, *, full_vocab: bool = True) -> Tensor:
        """Final hidden states (B, T, C) -> logits (B, T, V); a head over N tokens scatters its (B, T, N)
        into -inf (unless ``full_vocab=False``)."""
        logits = self.lm_head(x)
        if not self.config.head_vocab_size or not full_vocab:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.config.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.head_token_ids, logits)
