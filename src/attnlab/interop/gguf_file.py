"""The GGUF container read directly: header, metadata and tensor directory parsed from a memory map, each
tensor's bytes reachable as stored (no copy, no NumPy).

Layout (little-endian, GGUF v2/v3): ``b"GGUF"``, version u32, tensor count u64, metadata count u64; then
the metadata ``key (string), value type u32, value``; then per tensor ``name (string), n_dims u32,
dims u64 x n_dims (innermost first), ggml type u32, offset u64``; the tensor data starts at the next
multiple of ``general.alignment`` (default 32) and each offset is relative to that start. A string is a
u64 length and UTF-8 bytes; an array is an item type u32, a count u64 and the items.

Why not the ``gguf`` package's reader: it builds a NumPy memmap view per field part (two per string),
~250k views for SmolLM2's 49k-token vocabulary and merges, which took most of a cold load. Here the
header is walked with ``struct`` on the map, and nothing of the map is kept once the header is read:
``raw()`` maps the file again for the tensors a caller asks for, and that map lives exactly as long as
the tensors viewing it.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

MAGIC = b"GGUF"
# metadata value types -> struct format (None: string / array, read specially)
_SCALARS: dict[int, str] = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
                            11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# ggml tensor types: id -> (name, elements per block, bytes per block). The common ones are listed here so
# that reading needs no other package; the rest come from the ``gguf`` package's table when it is installed.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    30: ("BF16", 1, 2),
}


def ggml_type_info(ggml_type: int) -> tuple[str, int, int]:
    """(name, block elements, block bytes) of a ggml tensor type; ValueError for an unknown id."""
    if ggml_type in GGML_TYPES:
        return GGML_TYPES[ggml_type]
    try:
        import gguf

        kind = gguf.GGMLQuantizationType(ggml_type)
        block, size = gguf.GGML_QUANT_SIZES[kind]
        return kind.name, int(block), int(size)
    except (ImportError, ValueError, KeyError):
        raise ValueError(f"unknown ggml tensor type {ggml_type}") from None


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the directory: ``shape`` in PyTorch order (outermost first), data at ``offset``."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # absolute, in bytes from the start of the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return ggml_type_info(self.ggml_type)[0]


@dataclass(frozen=True)
class RawTensor:
    """A tensor's bytes as stored: ``data`` is a uint8 view of the memory-mapped file (copy-on-write, the
    file is never written), one row of ``shape[-1]`` elements per ``data.shape[0]``-th slice."""

    name: str
    data: Tensor  # (rows, bytes per row) uint8
    ggml_type: int
    shape: tuple[int, ...]  # PyTorch order, outermost first

    @property
    def type_name(self) -> str:
        return ggml_type_info(self.ggml_type)[0]


class _Cursor:
    """Sequential little-endian reads from a buffer, with a clear error past its end."""

    def __init__(self, buf: Any, size: int) -> None:
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise ValueError(f"the header ends early (need {n} bytes at offset {self.pos}, file has {self.size})")
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > self.size:
            raise ValueError(f"a string of {n} bytes at offset {self.pos} runs past the end of the file")
        text = self.buf[self.pos:self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return text

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.take("<I"), self.take("<Q")
            if item in _SCALARS:
                fmt = _SCALARS[item]
                n = struct.calcsize(fmt) * count
                if self.pos + n > self.size:
                    raise ValueError(f"an array of {count} items at offset {self.pos} runs past the end")
                values = list(struct.unpack_from(f"<{count}{fmt[1]}", self.buf, self.pos))
                self.pos += n
                return values
            return [self.value(item) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {kind} at offset {self.pos}")


class GGUFFile:
    """A parsed GGUF header: ``metadata`` (key -> value) and ``tensors`` (name -> TensorInfo)."""

    def __init__(self, path: Path, metadata: dict[str, Any], tensors: dict[str, TensorInfo]) -> None:
        self.path, self.metadata, self.tensors = path, metadata, tensors

    def has(self, key: str) -> bool:
        return key in self.metadata

    def meta(self, key: str, default: Any = ...) -> Any:
        """A metadata value (str, number, bool or list); a missing key without default is an error."""
        if key not in self.metadata:
            if default is ...:
                raise ValueError(f"{self.path}: the GGUF metadata has no {key!r}; the file is incomplete")
            return default
        return self.metadata[key]

    def raw(self, names: list[str] | None = None, *, read: bool = False) -> dict[str, RawTensor]:
        """The stored bytes of ``names`` (default: every tensor) as uint8 tensors: views of one fresh memory
        map of the file, which is unmapped when the last of the returned views is freed; or, with ``read``,
        tensors of their own filled by reading the file (what a caller that keeps the bytes but copies some
        of them wants: a mapped page once read stays resident while the map lives, even when nothing uses
        it any more)."""
        names = list(self.tensors) if names is None else names
        out = {}
        with open(self.path, "rb") as fh:
            if not read:
                mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)  # private: writes never reach the file
                whole = torch.frombuffer(mapped, dtype=torch.uint8)  # holds `mapped` alive while any view lives
            for name in names:
                info = self.tensors[name]
                _, block, size = ggml_type_info(info.ggml_type)
                row_bytes = info.shape[-1] // block * size if info.shape else size
                if read:
                    data = torch.empty(info.nbytes, dtype=torch.uint8)
                    fh.seek(info.offset)
                    if fh.readinto(memoryview(data.numpy())) != info.nbytes:
                        raise ValueError(f"{self.path}: tensor {name!r} runs past the end of the file")
                else:
                    data = whole[info.offset:info.offset + info.nbytes]
                out[name] = RawTensor(name, data.view(-1, row_bytes), info.ggml_type, info.shape)
        return out


def parse_header(path: Path) -> GGUFFile:
    """Read and check a GGUF header (ValueError with the reason for anything malformed or truncated)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if size < 24:
            raise ValueError(f"the file has {size} bytes, fewer than a GGUF header")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(path, buf, size)


def _parse(path: Path, buf: mmap.mmap, size: int) -> GGUFFile:
    cur = _Cursor(buf, size)
    if bytes(buf[:4]) != MAGIC:
        raise ValueError(f"the file does not start with {MAGIC!r} (found {bytes(buf[:4])!r})")
    cur.pos = 4
    version = cur.take("<I")
    if version not in (2, 3):
        swapped = struct.unpack("<I", struct.pack(">I", version))[0]
        if swapped in (2, 3):
            raise ValueError("a big-endian GGUF file; attnlab reads little-endian GGUF files (what llama.cpp writes "
                             "by default)")
        raise ValueError(f"GGUF version {version} is not supported (versions 2 and 3 are)")
    n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
    if n_tensors > size or n_kv > size:
        raise ValueError(f"the header claims {n_tensors} tensors and {n_kv} metadata entries in {size} bytes")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.take("<I")
        if n_dims > 8:
            raise ValueError(f"tensor {name!r} claims {n_dims} dimensions")
        dims = [cur.take("<Q") for _ in range(n_dims)]
        infos.append((name, tuple(reversed(dims)), cur.take("<I"), cur.take("<Q")))
    alignment = int(metadata.get("general.alignment", 32))
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"general.alignment={alignment} is not a power of two")
    start = (cur.pos + alignment - 1) // alignment * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, shape, kind, offset in infos:
        type_name, block, type_size = ggml_type_info(kind)
        numel = 1
        for d in shape:
            numel *= d
        if shape and shape[-1] % block:
            raise ValueError(f"tensor {name!r} ({type_name}) has rows of {shape[-1]} elements, not a multiple of "
                             f"its block of {block}")
        nbytes = numel // block * type_size
        if start + offset + nbytes > size:
            raise ValueError(f"tensor {name!r} ends at byte {start + offset + nbytes}, past the end of the file "
                             f"({size} bytes)")
        tensors[name] = TensorInfo(name, shape, kind, start + offset, nbytes)
    return GGUFFile(path, metadata, tensors)
