"""The cache protocols every model's cache implements, and the KV cache: preallocated, sized by
``n_kv_heads``, written in place, with ``crop`` for rollback.

The protocols (``typing.Protocol``: a cache implements them by having the members, no base class):

- ``Cache``: what every cache offers the generation loops: ``batch_size``, ``length`` (tokens fed so far),
  ``max_len`` (capacity), ``nbytes()``, ``crop(n)``. ``KVCache``, ``Seq2SeqCache``, ``RWKVState``, ``InfiniState``.
- ``SequenceCache``: what a Transformer stack's forward asks: ``begin`` registers new tokens (their positions and
  the key mask), ``commit`` advances once every layer has used them. ``KVCache``, ``Seq2SeqCache``, ``InfiniState``.
- ``SlotCache``: rows that accept different numbers of speculative tokens: ``drop_slots`` and ``compact``.
  ``KVCache``, ``RWKVState`` (batch size 1). Runtime-checkable: a drafter asks whether its cache is one.
- ``ReorderCache``: ``reorder(index)`` selects batch rows (beam search). ``KVCache``, ``Seq2SeqCache``.
- ``AttentionCache``: what a softmax attention layer (attention/mha.py) asks of the cache it is handed:
  ``update`` joins the new K/V to the cached ones, ``attention_kernel`` names a kernel for the cache's layout
  (None: the layer's own). ``KVCache``, ``Seq2SeqCache``, ``StaticSlots`` (inference/static.py).
- ``CrossAttentionCache``: also ``cross_kv``, the encoder output's K/V computed once per layer and kept:
  what a cross-attention layer is handed. ``Seq2SeqCache``.

Shape legend: L layers, B batch, K kv heads, S cache slots (max_len, or more: ``slots``), T new tokens, D head dim.

The cache stores K/V once per *KV head*: a GQA model with K = H/4 needs a quarter of an MHA cache,
and ``nbytes()`` measures exactly that from the allocated buffers. When a batch has padding (left-padded
prompts, or rows of a speculative batch that accepted fewer tokens) a per-position key mask marks the
slots that hold no real token; it is allocated only then, so a padding-free cache holds K/V alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


class Cache(Protocol):
    """A model's decoding state, whatever it holds (K/V, a recurrent state, a compressive memory)."""

    batch_size: int
    length: int  # tokens fed so far
    max_len: int  # tokens it can hold (2**62 for a constant-size state)

    def nbytes(self) -> int:
        """Bytes of the tensors it has allocated."""

    def crop(self, n: int) -> None:
        """Roll back to the first ``n`` tokens (speculative decoding drops rejected proposals this way)."""


class SequenceCache(Cache, Protocol):
    """A cache fed by a Transformer stack: each forward registers its tokens, every layer uses them, then it
    advances."""

    def begin(self, n_new: int, attention_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Register ``n_new`` tokens: their positions (B, T) and the key mask to attend with (None: all real)."""

    def commit(self, n_new: int, attention_mask: Tensor | None) -> None:
        """Advance past the tokens registered by ``begin``."""


@runtime_checkable
class SlotCache(Cache, Protocol):
    """A cache whose rows can keep different numbers of tokens (batched speculative decoding)."""

    def drop_slots(self, keep: Tensor) -> None:
        """Keep (True) or drop (False) each row's last ``keep.shape[1]`` tokens."""

    def compact(self) -> None:
        """Squeeze out the dropped tokens to make room."""


class ReorderCache(Cache, Protocol):
    """A cache whose batch rows can be selected (beam search follows its beams)."""

    def reorder(self, index: Tensor) -> None:
        """Keep the rows ``index`` (B',), in that order."""


class AttentionCache(Protocol):
    """The per-call cache a self-attention layer writes its new K/V into and reads every cached K/V from."""

    attention_kernel: str | None  # a kernel-registry key for this cache's layout; None: the layer's own kernel

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store layer ``layer``'s new (B, K, T, D) keys/values; return all of them so far, (B, K, S, D)."""


class CrossAttentionCache(AttentionCache, Protocol):
    """An encoder-decoder's cache: cross-attention's K/V over the encoder output, computed on first use."""

    def cross_kv(self, layer: int, compute: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """Layer ``layer``'s cross K/V (B, K, S, D): ``compute()`` the first time, the kept pair after."""


class KVCache:
    attention_kernel: str | None = None  # None: attention runs the layer's own kernel over ``update``'s K/V

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        slots: int | None = None,
    ) -> None:
        if batch <= 0 or max_len <= 0:
            raise ValueError(f"a cache needs batch > 0 and max_len > 0, got batch={batch}, max_len={max_len}")
        # ``slots`` >= max_len allocates more positions than may be used: static-shape decoding
        # (inference/static.py) rounds the capacity up so that one compiled graph serves many max_len.
        slots = max_len if slots is None else slots
        if slots < max_len:
            raise ValueError(f"slots={slots} must be at least max_len={max_len}")
        shape = (n_layers, batch, n_kv_heads, slots, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, K, S, D)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.key_mask: Tensor | None = None  # (B, S) bool, True = a real token; None = all real
        self.seen = torch.zeros(batch, dtype=torch.long, device=device)  # real tokens per row
        self.length = 0
        self.max_len = max_len
        self.slots = slots
        self.batch_size = batch
        # (k, v, per-layer views of k, of v): built by ``layer_views`` and rebuilt when the buffers change
        self._layer_views: tuple[Tensor, Tensor, list[Tensor], list[Tensor]] | None = None

    # ---------------------------------------------------------------- protocol
    def nbytes(self) -> int:
        """Bytes actually allocated for the cache's tensors (K, V, and the key mask if any)."""
        total = self.k.nbytes + self.v.nbytes
        if self.key_mask is not None:
            total += self.key_mask.nbytes
        return total

    def crop(self, n: int) -> None:
        """Keep the first ``n`` positions (speculative decoding rolls rejected tokens back this way)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot crop a cache of length {self.length} to {n}")
        self.length = n
        if self.key_mask is not None:
            self.seen = self.key_mask[:, :n].sum(dim=1)
        else:
            self.seen.fill_(n)

    def reset(self) -> None:
        self.crop(0)

    def drop_slots(self, keep: Tensor) -> None:
        """Mark the last ``keep.shape[1]`` slots of each row as kept (True) or holes (False).

        A batched speculative step accepts a different number of tokens per row: the rejected ones
        become holes that attention skips; positions keep counting real tokens only.
        """
        n = keep.shape[1]
        if n > self.length:
            raise ValueError(f"cannot drop {n} slots from a cache of length {self.length}")
        if self.key_mask is None:
            if bool(keep.all()):
                return
            self.key_mask = torch.ones(self.batch_size, self.slots, dtype=torch.bool, device=self.k.device)
        self.key_mask[:, self.length - n:self.length] &= keep.to(self.key_mask.device)
        self.seen = self.key_mask[:, :self.length].sum(dim=1)

    def compact(self) -> None:
        """Squeeze out holes: each row's real slots move to the end of a left-padded layout."""
        if self.key_mask is None:
            return
        real = self.key_mask[:, :self.length]  # (B, S)
        counts = real.sum(dim=1)
        width = int(counts.max())
        # order each row's slots so that holes come first (stable), then take the last `width`
        order = torch.argsort(real.to(torch.int8), dim=1, stable=True)[:, self.length - width:]  # (B, width)
        idx = order[None, :, None, :, None].expand(self.k.shape[0], -1, self.k.shape[2], -1, self.k.shape[4])
        self.k[:, :, :, :width] = torch.gather(self.k[:, :, :, :self.length], 3, idx)
        self.v[:, :, :, :width] = torch.gather(self.v[:, :, :, :self.length], 3, idx)
        self.key_mask[:, :width] = torch.gather(real, 1, order)
        self.key_mask[:, width:] = True
        self.length = width

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (beam search keeps the cache of each surviving beam)."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)
        self.seen = self.seen.index_select(0, index)
        if self.key_mask is not None:
            self.key_mask = self.key_mask.index_select(0, index)
        self.batch_size = int(index.numel())

    def layer_views(self) -> tuple[list[Tensor], list[Tensor]]:
        """Per-layer views of the K and V buffers, L each of (B, K, S, D); kept until the buffers are
        replaced (``reorder``), so a compiled decode step is handed the same view objects every call."""
        views = self._layer_views
        if views is None or views[0] is not self.k or views[1] is not self.v:
            views = (self.k, self.v, list(self.k.unbind(0)), list(self.v.unbind(0)))
            self._layer_views = views
        return views[2], views[3]

    # ---------------------------------------------------------------- used by the model
    def begin(self, n_new: int, attention_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Register ``n_new`` incoming tokens; return their positions (B, T) and the key mask to use.

        ``attention_mask`` (B, T) marks real (1) and padding (0) tokens among the new ones.
        """
        if self.length + n_new > self.max_len:
            raise ValueError(
                f"the KV cache holds {self.max_len} positions and already has {self.length}; "
                f"{n_new} more do not fit. Create the cache with a larger max_len "
                f"(model.new_cache(batch, max_len)) or generate fewer tokens"
            )
        start, end = self.length, self.length + n_new
        if attention_mask is not None:
            new_mask = attention_mask.to(device=self.k.device, dtype=torch.bool)
            if self.key_mask is None and not bool(new_mask.all()):
                self.key_mask = torch.ones(self.batch_size, self.slots, dtype=torch.bool, device=self.k.device)
        else:
            new_mask = None
        if self.key_mask is not None:
            self.key_mask[:, start:end] = True if new_mask is None else new_mask
        if new_mask is None:
            positions = self.seen[:, None] + torch.arange(n_new, device=self.k.device)[None, :]
        else:
            positions = self.seen[:, None] + new_mask.long().cumsum(dim=1) - 1
            positions = positions.clamp_min(0)
        return positions, (None if self.key_mask is None else self.key_mask[:, :end])

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write (B, K, T, D) keys/values at the current length; return all keys/values so far."""
        T = k.shape[2]
        end = self.length + T
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, K, length + T, D)

    def commit(self, n_new: int, attention_mask: Tensor | None) -> None:
        """Advance past the tokens registered by ``begin`` once every layer has written them."""
        self.length += n_new
        if attention_mask is None:
            self.seen += n_new
        else:
            self.seen += attention_mask.to(self.seen.device).long().sum(dim=1)
