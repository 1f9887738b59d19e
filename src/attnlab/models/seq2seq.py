"""Encoder-decoder with cross-attention (BART / Marian shape): the field guide's translation model.

The encoder reads the whole source bidirectionally; each decoder block runs causal self-attention over
the target so far, then *cross-attention* whose queries come from the decoder and whose keys/values come
from the encoder output (the fusion of the two stacks), then its FFN.

Training: ``model(decoder_input_ids, encoder_input_ids=src, encoder_attention_mask=src_mask)``.
Generation: ``begin_generation`` encodes the source once into a ``Seq2SeqCache`` and starts the decoder
from ``decoder_start_token_id``; then ``model(token, cache=cache)`` like any decoder.

Shape legend: B batch, S source length, T target length, C d_model, V vocab.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnlab.config import ModelConfig
from attnlab.inference.cache import KVCache
from attnlab.inference.seq2seq_cache import Seq2SeqCache
from attnlab.layers.stack import Stack, check_length, check_token_ids, positions_from_mask
from attnlab.models.base import AttnlabModel


class Seq2SeqLM(AttnlabModel):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)  # the encoder's (and, if shared, decoder's)
        self.decoder_embed = None if cfg.share_embeddings else nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Stack(cfg, cfg.encoder_layers, causal=False)
        self.decoder = Stack(cfg, cfg.n_layers, causal=True, cross=True)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.lm_head_bias)
        self.init_weights()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.target_embed.weight

    @property
    def target_embed(self) -> nn.Embedding:
        return self.embed if self.decoder_embed is None else self.decoder_embed

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, S) source ids -> (B, S, C) encoder output."""
        B, S = input_ids.shape
        check_length(S, self.config.max_seq_len, "source")
        check_token_ids(input_ids, self.config.vocab_size, "source ids")
        mask = None if attention_mask is None else attention_mask.to(torch.bool)
        key_mask = None if mask is None or bool(mask.all()) else mask
        positions = positions_from_mask(None, B, S, input_ids.device)  # right-padded sources
        return self.encoder.run_stack(self.embed(input_ids), positions, key_mask=key_mask, token_mask=mask)

    def new_cache(self, batch: int, max_len: int | None = None, *, memory: Tensor | None = None,
                  memory_mask: Tensor | None = None, dtype: torch.dtype | None = None) -> Seq2SeqCache:
        cfg = self.config
        max_len = cfg.max_seq_len if max_len is None else max_len
        if max_len > cfg.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds the model's context max_seq_len={cfg.max_seq_len}")
        if memory is None:
            raise ValueError("an encoder-decoder cache needs the encoder output: new_cache(batch, max_len, memory=...)")
        self_cache = KVCache(cfg.n_layers, batch, cfg.n_kv_heads, cfg.head_dim, max_len,
                             dtype=dtype or self.dtype, device=self.device)
        mask = None if memory_mask is None or bool(memory_mask.all()) else memory_mask.to(torch.bool)
        return Seq2SeqCache(self_cache, cfg.n_layers, memory, mask)

    def begin_generation(self, input_ids: Tensor, attention_mask: Tensor | None, max_new_tokens: int):
        """Encode the source; return (cache, decoder prompt (B, 1), its mask)."""
        start = self.config.decoder_start_token_id
        if start is None:
            raise ValueError("decoder_start_token_id is not set in this seq2seq model's config")
        memory = self.encode(input_ids, attention_mask)
        B = input_ids.shape[0]
        if max_new_tokens + 1 > self.config.max_seq_len:
            raise ValueError(f"max_new_tokens={max_new_tokens} exceeds the decoder's context "
                             f"({self.config.max_seq_len} - 1 for the start token)")
        cache = self.new_cache(B, max_new_tokens + 1, memory=memory, memory_mask=attention_mask)
        return cache, torch.full((B, 1), start, dtype=torch.long, device=input_ids.device), None

    def forward(self, input_ids: Tensor, cache: Seq2SeqCache | None = None, attention_mask: Tensor | None = None,
                *, encoder_input_ids: Tensor | None = None, encoder_attention_mask: Tensor | None = None,
                encoder_out: Tensor | None = None) -> Tensor:
        """Decoder logits (B, T, V) for ``input_ids`` given a source (ids, or encoder output, or a cache)."""
        B, T = input_ids.shape
        check_token_ids(input_ids, self.config.vocab_size)
        token_mask = None if attention_mask is None else attention_mask.to(torch.bool)
        if cache is not None:
            memory, memory_mask = cache.memory, cache.memory_mask
            positions, key_mask = cache.begin(T, attention_mask)
            if int(positions.max()) >= self.config.max_seq_len:
                raise ValueError(f"decoder position {int(positions.max())} is beyond max_seq_len={self.config.max_seq_len}")
        else:
            if encoder_out is None:
                if encoder_input_ids is None:
                    raise ValueError("a seq2seq forward needs the source: encoder_input_ids=... (or encoder_out=...)")
                encoder_out = self.encode(encoder_input_ids, encoder_attention_mask)
            memory = encoder_out
            memory_mask = None if encoder_attention_mask is None else encoder_attention_mask.to(torch.bool)
            check_length(T, self.config.max_seq_len, "target")
            positions = positions_from_mask(attention_mask, B, T, input_ids.device)
            key_mask = None if token_mask is None or bool(token_mask.all()) else token_mask
        x = self.decoder.run_stack(self.target_embed(input_ids), positions, key_mask=key_mask, token_mask=token_mask,
                                   cache=cache, memory=memory, memory_mask=memory_mask)
        if cache is not None:
            cache.commit(T, attention_mask)
        return self.lm_head(x)  # (B, T, V)
