"""The encoder-decoder's cache: the decoder's growing self-attention K/V, plus cross-attention K/V that
are computed from the encoder output once per generation and reused at every step.

Shape legend: L decoder layers, B batch, K kv heads, S source length, D head dim, C d_model.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from attnlab.inference.cache import KVCache


class Seq2SeqCache:
    attention_kernel: str | None = None  # the layers' own kernels (see KVCache)

    def __init__(self, self_cache: KVCache, n_layers: int, memory: Tensor, memory_mask: Tensor | None) -> None:
        self.self_cache = self_cache
        self.memory = memory  # (B, S, C) encoder output
        self.memory_mask = memory_mask  # (B, S) bool, True = real source token; None = no padding
        self.cross_k: list[Tensor | None] = [None] * n_layers  # each (B, K, S, D) once computed
        self.cross_v: list[Tensor | None] = [None] * n_layers
        self.cross_computations = 0  # how many times cross K/V were projected (tests count it)

    # ---- the cache protocol, delegated to the self-attention cache
    @property
    def length(self) -> int:
        return self.self_cache.length

    @property
    def max_len(self) -> int:
        return self.self_cache.max_len

    @property
    def batch_size(self) -> int:
        return self.self_cache.batch_size

    def crop(self, n: int) -> None:
        self.self_cache.crop(n)

    def nbytes(self) -> int:
        cross = sum(t.nbytes for t in self.cross_k + self.cross_v if t is not None)
        return self.self_cache.nbytes() + cross

    def begin(self, n_new: int, attention_mask: Tensor | None):
        return self.self_cache.begin(n_new, attention_mask)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.self_cache.update(layer, k, v)

    def commit(self, n_new: int, attention_mask: Tensor | None) -> None:
        self.self_cache.commit(n_new, attention_mask)

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (beam search)."""
        self.self_cache.reorder(index)
        self.memory = self.memory.index_select(0, index)
        if self.memory_mask is not None:
            self.memory_mask = self.memory_mask.index_select(0, index)
        self.cross_k = [None if t is None else t.index_select(0, index) for t in self.cross_k]
        self.cross_v = [None if t is None else t.index_select(0, index) for t in self.cross_v]

    # ---- cross-attention
    def cross_kv(self, layer: int, compute: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        if self.cross_k[layer] is None:
            self.cross_k[layer], self.cross_v[layer] = compute()
            self.cross_computations += 1
        return self.cross_k[layer], self.cross_v[layer]
