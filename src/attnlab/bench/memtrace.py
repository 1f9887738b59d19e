"""Which tensors are live at a peak: a dispatch-mode tracker of tensor storages, for memory breakdowns.

Every tensor an aten op produces while the tracker is active is recorded once per storage, with its size and
the attnlab source line that made it; a storage counts until the last tensor seen on it is garbage collected.
The tracker keeps the largest live total per phase ("fwd", "bwd", set by the caller) and what was live then.
Tensors that existed before (the inputs) are excluded with ``exclude``. It counts tensor storages only
(not allocator overhead or communication library buffers), so compare it with the resident-set figures of
``attnlab bench ring``, which it matched to 0.1 MiB here.
"""

from __future__ import annotations

import os
import traceback
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LiveTensors(TorchDispatchMode):
    """Use as ``with LiveTensors() as tr: ...``; set ``tr.phase`` between phases; ``tr.report(unit)``."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list] = {}  # storage address -> [bytes, label, tensors seen on it]
        self.total = 0
        self.phase = "fwd"
        self.peaks: dict[str, tuple[int, list[tuple[int, str]]]] = {}  # phase -> (bytes, [(bytes, label)])
        self._ignore: set[int] = set()

    def exclude(self, *tensors: torch.Tensor) -> None:
        """Do not count these tensors' storages (inputs that exist before the measured call)."""
        self._ignore.update(t.untyped_storage().data_ptr() for t in tensors)

    def _label(self, func) -> str:
        for frame in reversed(traceback.extract_stack(limit=16)):
            if "attnlab" in frame.filename and not frame.filename.endswith("memtrace.py"):
                return f"{os.path.basename(frame.filename)}:{frame.lineno} `{(frame.line or '').strip()[:80]}`"
        return f"({func.__name__})"

    def _release(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is not None:
            entry[2] -= 1
            if entry[2] == 0:
                self.total -= entry[0]
                del self.live[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or ptr in self._ignore:
                continue
            entry = self.live.get(ptr)
            if entry is None:
                entry = self.live[ptr] = [nbytes, f"[{self.phase}] {self._label(func)}", 0]
                self.total += nbytes
                if self.total > self.peaks.get(self.phase, (0, []))[0]:
                    self.peaks[self.phase] = (self.total, [(e[0], e[1]) for e in self.live.values()])
            entry[2] += 1
            weakref.finalize(t, self._release, ptr)
        return out

    def report(self, unit: int, unit_name: str = "u", top: int = 12) -> str:
        """Per phase: the peak and its live tensors grouped by source line, in MiB and in ``unit`` bytes."""
        lines = []
        for phase, (peak, snapshot) in self.peaks.items():
            lines.append(f"{phase} peak {peak / 2**20:.1f} MiB = {peak / unit:.2f} {unit_name}")
            groups: dict[str, list[int]] = {}
            for nbytes, label in snapshot:
                g = groups.setdefault(label, [0, 0])
                g[0], g[1] = g[0] + 1, g[1] + nbytes
            for label, (count, nbytes) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]:
                lines.append(f"  {nbytes / unit:5.2f} {unit_name} {nbytes / 2**20:7.1f} MiB  x{count:<3d} {label}")
        return "\n".join(lines)
