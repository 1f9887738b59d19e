"""InfiniState: the Infini-attention decoder's cache — per layer (``InfiniLayerState``) a compressive memory,
its normaliser and the current segment's K/V. Its size depends on the segment length, never on how much was
streamed. ``attention/infini.py`` reads and writes the layer states; this module owns them.

``crop(n)`` rolls back within the current segment, or across one segment boundary (the state before the
last memory write is kept for that); further back raises. ``save``/``load`` write the state as
safetensors so a stream can resume exactly after a restart
(written atomically: a temporary file renamed over the old one).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from attnlab.atomic import atomic_write_file


class InfiniLayerState:
    """One layer's streaming state: memory, normaliser, the current segment's K/V (preallocated).

    The previous segment's state is kept too, so ``crop`` can roll back across one segment boundary.
    """

    def __init__(self, batch: int, n_kv: int, head_dim: int, seg_len: int, dtype: torch.dtype, device) -> None:
        f32 = torch.promote_types(dtype, torch.float32)
        self.M = torch.zeros(batch, n_kv, head_dim, head_dim, dtype=f32, device=device)
        self.z = torch.zeros(batch, n_kv, head_dim, dtype=f32, device=device)
        self.k = torch.zeros(batch, n_kv, seg_len, head_dim, dtype=dtype, device=device)  # un-rotated keys
        self.v = torch.zeros(batch, n_kv, seg_len, head_dim, dtype=dtype, device=device)
        self.fill = 0
        self.prev = (self.M.clone(), self.z.clone(), self.k.clone(), self.v.clone())

    def tensors(self) -> dict[str, Tensor]:
        return {"M": self.M, "z": self.z, "k": self.k, "v": self.v, "prev_M": self.prev[0], "prev_z": self.prev[1],
                "prev_k": self.prev[2], "prev_v": self.prev[3]}

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors().values())


class InfiniState:
    def __init__(self, layers: list[InfiniLayerState], batch: int, seg_len: int) -> None:
        self.layers = layers
        self.batch_size = batch
        self.seg_len = seg_len
        self.length = 0  # tokens streamed so far
        self.max_len = 2**62  # unbounded: memory does not grow with the input

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def begin(self, n_new: int, attention_mask: Tensor | None) -> tuple[Tensor, None]:
        if attention_mask is not None and not bool(torch.as_tensor(attention_mask).bool().all()):
            raise ValueError("Infini-attention streams do not support padding; give prompts of equal length")
        device = self.layers[0].M.device
        positions = self.length + torch.arange(n_new, device=device)[None].expand(self.batch_size, n_new)
        return positions, None

    def commit(self, n_new: int, attention_mask: Tensor | None) -> None:
        self.length += n_new

    def crop(self, n: int) -> None:
        back = self.length - n
        if back < 0:
            raise ValueError(f"cannot crop a stream of length {self.length} to {n}")
        fill = self.layers[0].fill
        if back > fill + self.seg_len or (back > fill and self.length - fill - self.seg_len < 0):
            raise ValueError(f"an Infini-attention state can roll back at most into the previous segment "
                             f"({fill + self.seg_len} tokens here), not {back}")
        for st in self.layers:
            if back <= st.fill:
                st.fill -= back
            else:  # undo the last memory write and reopen the previous segment
                st.M, st.z, k, v = st.prev
                st.k.copy_(k)
                st.v.copy_(v)
                st.fill = self.seg_len - (back - st.fill)
        self.length = n

    def save(self, path: str | Path) -> None:
        tensors = {f"{i}.{name}": t.contiguous() for i, st in enumerate(self.layers) for name, t in st.tensors().items()}
        meta = {"length": str(self.length), "fill": str(self.layers[0].fill), "seg_len": str(self.seg_len)}
        # atomically: a crash mid-save leaves the previous state file, never a truncated one
        atomic_write_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    def load(self, path: str | Path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        if int(meta["seg_len"]) != self.seg_len:
            raise ValueError(f"{path}: saved with segment_len={meta['seg_len']}, this model uses {self.seg_len}")
        tensors = load_file(str(path))
        for i, st in enumerate(self.layers):
            own = st.tensors()
            for name in own:
                saved = tensors[f"{i}.{name}"]
                if saved.shape != own[name].shape:
                    raise ValueError(f"{path}: state tensor {i}.{name} has shape {tuple(saved.shape)}, "
                                     f"expected {tuple(own[name].shape)}")
            st.M, st.z = tensors[f"{i}.M"], tensors[f"{i}.z"]
            st.k.copy_(tensors[f"{i}.k"])
            st.v.copy_(tensors[f"{i}.v"])
            st.prev = (tensors[f"{i}.prev_M"], tensors[f"{i}.prev_z"], tensors[f"{i}.prev_k"], tensors[f"{i}.prev_v"])
            st.fill = int(meta["fill"])
        self.length = int(meta["length"])
