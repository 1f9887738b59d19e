"""RWKVState: the RWKV family's cache — per layer the last input of each mixing layer (token shift) and the
time-mixing state — a constant size, however long the sequence (``nbytes()`` measures it). RWKV-4 keeps the
WKV sums (num, den, p), each (B, C); RWKV-7 keeps one (N x N) matrix per head, ``S`` (B, H, N, N). All fp32.

``crop(n)`` rolls back by *keeping snapshots*: after each of the last ``SNAPSHOTS`` tokens fed a few at a
time (decoding, speculative verification) the state is copied; rolling back restores a copy (re-running
would need the tokens again). Rolling back further than the snapshots reach, or into a prompt fed as one
chunk, raises a clear error. A speculative batch whose rows accept different numbers of tokens would need
per-row snapshots: ``drop_slots`` supports batch size 1 only.
"""

from __future__ import annotations

import torch
from torch import Tensor

STEP_MAX = 16  # calls with at most this many tokens run token by token (and keep snapshots)
SNAPSHOTS = 32
FIELDS = ("att_x", "ffn_x", "num", "den", "p")  # RWKV-4


def layer_shapes(version: int, d_model: int, n_heads: int = 1) -> dict[str, tuple[int, ...]]:
    """The per-sequence shape of each field of one layer's state."""
    if version == 4:
        return {f: (d_model,) for f in FIELDS}
    assert version == 7 and d_model % n_heads == 0, (version, d_model, n_heads)
    N = d_model // n_heads
    return {"att_x": (d_model,), "ffn_x": (d_model,), "S": (n_heads, N, N)}


class RWKVState:
    def __init__(self, n_layers: int, batch: int, d_model: int, *, version: int = 4, n_heads: int = 1,
                 device: torch.device | str = "cpu") -> None:
        from attnlab.models.rwkv.wkv4 import EMPTY

        if batch <= 0:
            raise ValueError(f"an RWKV state needs batch > 0, got {batch}")
        shapes = layer_shapes(version, d_model, n_heads)
        # (L, B, C) each for RWKV-4; RWKV-7's S is (L, B, H, N, N)
        self.t = {f: torch.zeros((n_layers, batch, *shape), dtype=torch.float32, device=device)
                  for f, shape in shapes.items()}
        if "p" in self.t:
            self.t["p"].fill_(EMPTY)
        self.version = version
        self.batch_size = batch
        self.length = 0
        self.max_len = 2**62  # unbounded: the state does not grow
        self._snapshots: dict[int, dict[str, Tensor]] = {0: {f: x.clone() for f, x in self.t.items()}}

    @classmethod
    def for_config(cls, cfg, batch: int, *, device: torch.device | str = "cpu") -> RWKVState:
        """The state of a model built from ``cfg`` (an RWKV ``ModelConfig``)."""
        return cls(cfg.n_layers, batch, cfg.d_model, version=cfg.rwkv_version, n_heads=cfg.n_heads, device=device)

    def nbytes(self) -> int:
        return sum(x.nbytes for x in self.t.values())

    def layer(self, i: int) -> _LayerView:
        return _LayerView(self.t, i)

    def advance(self, n: int, *, snapshot: bool) -> None:
        self.length += n
        if snapshot:
            self._snapshots[self.length] = {f: x.clone() for f, x in self.t.items()}
            for old in [k for k in self._snapshots if k < self.length - SNAPSHOTS]:
                del self._snapshots[old]

    def crop(self, n: int) -> None:
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot crop an RWKV state of length {self.length} to {n}")
        if n == self.length:
            return
        if n not in self._snapshots:
            raise ValueError(f"an RWKV state keeps snapshots of its last {SNAPSHOTS} single-step positions; "
                             f"position {n} is not among them (length {self.length})")
        for f, x in self._snapshots[n].items():
            self.t[f].copy_(x)
        self._snapshots = {k: v for k, v in self._snapshots.items() if k <= n}
        self.length = n

    def reset(self) -> None:
        self.crop(0) if 0 in self._snapshots else None

    def drop_slots(self, keep: Tensor) -> None:
        if self.batch_size != 1:
            raise ValueError("speculative decoding with an RWKV model works at batch size 1 (its state cannot "
                             "drop tokens per row)")
        self.crop(self.length - keep.shape[1] + int(keep.sum()))

    def compact(self) -> None:
        """Nothing to squeeze: the state has no slots."""


class _LayerView(dict):
    """Layer ``i`` of the state as a dict of (B, ...) tensors; assignments write through."""

    def __init__(self, t: dict[str, Tensor], i: int) -> None:
        super().__init__({f: x[i] for f, x in t.items()})
        self._t, self._i = t, i

    def __setitem__(self, key: str, value: Tensor) -> None:
        self._t[key][self._i].copy_(value)
        super().__setitem__(key, self._t[key][self._i])

    def update(self, other: dict[str, Tensor]) -> None:  # type: ignore[override]
        for key, value in other.items():
            self[key] = value
