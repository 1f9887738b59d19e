"""The prepared-weights cache: what a slow conversion made from a model file (a GGUF dequantised, renamed and
re-ordered into attnlab's state dict, in one dtype), kept on disk and memory-mapped on later loads.

Where and what. ``$ATTNLAB_CACHE/weights/<source>.<variant>.attnlab-<version>.safetensors`` (``cachedir.py``),
one safetensors file per (source file content, variant such as ``float32``, attnlab version). Nothing in it
is executed or unpickled; its ``__metadata__`` repeats the key (source SHA-256, variant, version), carries
the JSON the caller stores beside the weights (the model config), a CRC-32 of every tensor's bytes, and a
CRC-32 of the header itself (each tensor's dtype and shape, the JSON, the tensors' CRCs).

The key is the source file's **content** (SHA-256), not its name or date: a copied or renamed file finds
its entry, a changed file never does. Hashing ~100 MB takes a fraction of a second, so the digest is
remembered per path in ``weights/sources/`` together with the file's (size, mtime, ctime, inode, device),
as git's index does: a later load trusts the digest only while all five are unchanged. Any write to the
file changes its ctime, which no tool can set back (``touch``/``os.utime`` set mtime, and change ctime too),
so an edited file is hashed again. A digest is not remembered for a file changed less than two seconds
before it was hashed (a same-tick rewrite could then go unseen, git's "racy" case).

Trust. An entry is used only when its header parses and matches its own CRC-32 (a flipped byte in the stored
config once read back as another, valid-looking config: ``tie_embeddings`` became ``t3e_embeddings``), its key
and the file's length match, and every tensor's CRC-32 matches (checked in two threads; the pages are read once, and would be by the first
forward pass anyway). Anything else — truncated, bytes flipped, another version — is reported in one warning
and rebuilt. Writes go to a temporary name and are renamed into place (``atomic.atomic_write_file``):
two processes filling the same entry each write their own temporary file and the second rename wins, so a
reader sees one whole file or none; a process that mapped the old file keeps reading its (unlinked) inode.

Memory. Each tensor is mapped on its own (copy-on-write: a write never reaches the file), so the pages of a
tensor that is later replaced (fused, converted to another dtype) are unmapped when it is freed, and the
resident weights are the file's pages, shared with the page cache and any other process mapping the entry.

``ATTNLAB_WEIGHTS_CACHE=0`` turns the cache off (every load converts the file again).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import sys
import time
import warnings
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from attnlab import version
from attnlab.atomic import TMP_MARK, atomic_write_file, atomic_write_text
from attnlab.cachedir import cache_dir

FORMAT = "2"  # 2: the header carries a CRC-32 of its own contents
RACY_SECONDS = 2.0  # a file changed this recently is hashed again on every load
_DTYPES: dict[str, torch.dtype] = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                                   "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                                   "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}  # safetensors' names, as its header spells them


def enabled() -> bool:
    return os.environ.get("ATTNLAB_WEIGHTS_CACHE", "1").strip().lower() not in ("0", "off", "false", "no")


def attnlab_version() -> str:
    """attnlab's version, read at call time (a test may change it)."""
    return version.current()


def weights_dir() -> Path:
    return cache_dir("weights")


# ----------------------------------------------------------------------------- the source's digest
def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        buf = bytearray(1 << 24)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def source_digest(path: str | Path) -> str:
    """SHA-256 of a file's content, remembered per path while its stat fields are unchanged (see above)."""
    path = Path(path).resolve()
    st = path.stat()
    memo = weights_dir() / "sources" / (hashlib.sha256(str(path).encode()).hexdigest()[:24] + ".json")
    try:
        data = json.loads(memo.read_text(encoding="utf-8"))
        if data.get("path") == str(path) and data.get("stat") == _stat_key(st) and len(data.get("sha256", "")) == 64:
            return str(data["sha256"])
    except (OSError, ValueError, AttributeError):
        pass
    started = time.time()
    digest = _sha256_file(path)
    after = path.stat()
    changed = max(after.st_mtime_ns, after.st_ctime_ns) / 1e9
    if _stat_key(after) == _stat_key(st) and started - changed > RACY_SECONDS and enabled():
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(memo, json.dumps({"path": str(path), "stat": _stat_key(st), "sha256": digest}))
        except OSError:
            pass  # a read-only cache: hash again next time
    return digest


# ----------------------------------------------------------------------------- entries
def entry_path(digest: str, variant: str, suffix: str = "safetensors") -> Path:
    return weights_dir() / f"{digest[:32]}.{variant}.attnlab-{attnlab_version()}.{suffix}"


def _crc(buf: Any, offset: int, n: int) -> int:
    """CRC-32 of ``n`` bytes of ``buf`` from ``offset``, read in place (no copy)."""
    with memoryview(buf) as whole, whole[offset:offset + n] as part:
        return zlib.crc32(part)


def _tensor_bytes(t: Tensor) -> memoryview:
    """The bytes safetensors writes for ``t`` (little-endian, C order)."""
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())


def write_entry(path: Path, state: dict[str, Tensor], key: dict[str, str], info: dict) -> None:
    """Save ``state`` (+ key, ``info`` JSON and per-tensor CRC-32s) as a safetensors entry, atomically."""
    from safetensors.torch import save_file

    crcs = {name: zlib.crc32(_tensor_bytes(t)) for name, t in state.items()}
    metadata = {**key, "attnlab.cache": FORMAT, "info": json.dumps(info, sort_keys=True),
                "crc32": json.dumps(crcs, sort_keys=True)}
    layout = {name: [_DTYPE_NAMES[t.dtype], list(t.shape)] for name, t in state.items()}
    metadata["header.crc32"] = str(_header_crc(layout, metadata))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_file(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))


def _header_crc(layout: dict[str, list], meta: dict[str, str]) -> int:
    """CRC-32 of what an entry's header says: each tensor's dtype and shape, and every metadata value."""
    text = json.dumps([layout, {k: v for k, v in meta.items() if k != "header.crc32"}], sort_keys=True)
    return zlib.crc32(text.encode())


def _header(fh: Any, size: int) -> tuple[dict, int]:
    head = fh.read(8)
    if len(head) < 8:
        raise ValueError("shorter than a safetensors header")
    n = struct.unpack("<Q", head)[0]
    if n > min(size - 8, 1 << 28):
        raise ValueError(f"header length {n} does not fit the file ({size} bytes)")
    header = json.loads(fh.read(n))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header, 8 + n


def read_entry(path: Path, key: dict[str, str]) -> tuple[dict, dict[str, Tensor]]:
    """(info, state) of a checked entry, each tensor memory-mapped on its own; ValueError says what is wrong."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        header, start = _header(fh, size)
        meta = header.pop("__metadata__", None) or {}
        if meta.get("attnlab.cache") != FORMAT or any(meta.get(k) != v for k, v in key.items()):
            raise ValueError("made for another file, variant or attnlab version")
        layout = {name: [h["dtype"], list(h["shape"])] for name, h in header.items()}
        if meta.get("header.crc32") != str(_header_crc(layout, meta)):
            raise ValueError("the header does not match its checksum")
        crcs = json.loads(meta["crc32"])
        info = json.loads(meta["info"])
        spans = sorted((int(h["data_offsets"][0]), int(h["data_offsets"][1]), name) for name, h in header.items())
        end = 0
        for lo, hi, name in spans:
            if lo != end or hi < lo:
                raise ValueError(f"tensor {name!r} is not where the header says")
            end = hi
        if start + end != size:
            raise ValueError(f"{size} bytes where the header describes {start + end}")
        if set(crcs) != set(header):
            raise ValueError("the checksums do not list the tensors of the file")
        page = mmap.ALLOCATIONGRANULARITY
        maps = {}
        for name, h in header.items():
            lo, hi = (start + int(x) for x in h["data_offsets"])
            base = lo // page * page
            maps[name] = (mmap.mmap(fh.fileno(), hi - base, offset=base, access=mmap.ACCESS_COPY) if hi > lo
                          else None, lo - base, hi - lo)

    def crc(name: str) -> bool:
        mapped, off, n = maps[name]
        return (_crc(mapped, off, n) if mapped is not None else zlib.crc32(b"")) == crcs[name]

    with ThreadPoolExecutor(max_workers=2) as pool:  # zlib releases the GIL: two cores read at once
        bad = [name for name, ok in zip(maps, pool.map(crc, maps)) if not ok]
    if bad:
        raise ValueError(f"checksum mismatch in {bad[:3]}")
    state = {}
    for name, h in header.items():
        dtype = _DTYPES.get(h["dtype"])
        if dtype is None:
            raise ValueError(f"tensor {name!r} has dtype {h['dtype']!r}")
        mapped, off, n = maps[name]
        flat = (torch.frombuffer(mapped, dtype=torch.uint8, count=n, offset=off) if mapped is not None
                else torch.empty(0, dtype=torch.uint8))  # the tensor keeps its own map alive, and only that
        state[name] = flat.view(dtype).reshape([int(d) for d in h["shape"]])
    return info, state


def _clean_stale(directory: Path, older_than: float = 3600.0) -> None:
    """Temporary files of writes that were killed (an hour old or more)."""
    now = time.time()
    for entry in directory.glob(f".*{TMP_MARK}*"):
        try:
            if now - entry.stat().st_mtime > older_than:
                entry.unlink()
        except OSError:
            pass


def cached_state(source: str | Path, variant: str, build: Callable[[], tuple[dict, dict[str, Tensor]]], *,
                 what: str) -> tuple[dict, dict[str, Tensor]]:
    """(info, state) for ``source`` in ``variant``: from the cache when a valid entry exists, else from
    ``build()`` — announced on stderr as ``what`` — then written to the cache and mapped back from it."""
    if not enabled():
        return build()
    digest = source_digest(source)
    path = entry_path(digest, variant)
    key = {"source.sha256": digest, "variant": variant, "attnlab.version": attnlab_version()}
    if path.is_file():
        try:
            return read_entry(path, key)
        except (ValueError, KeyError, TypeError, OSError, RuntimeError) as exc:
            warnings.warn(f"the cached weights {path} are damaged or stale ({exc}); rebuilding them", stacklevel=3)
    print(f"attnlab: {what} (first load of this file; cached in {path.parent} for the next)", file=sys.stderr,
          flush=True)
    info, state = build()
    try:
        write_entry(path, state, key, info)
        _clean_stale(path.parent)
        for old in path.parent.glob(f"{digest[:32]}.{variant}.attnlab-*.safetensors"):  # other versions' entries
            if old != path:
                old.unlink(missing_ok=True)
        return read_entry(path, key)
    except (OSError, ValueError) as exc:  # a read-only or full disk: run from the converted weights
        warnings.warn(f"cannot cache the converted weights in {path.parent} ({exc}); the next load converts "
                      f"the file again", stacklevel=3)
        return info, state


def cached_text(source: str | Path, variant: str, build: Callable[[], str]) -> str:
    """A text made from ``source`` (e.g. a tokenizer's JSON), cached like the weights, checked by SHA-256."""
    if not enabled():
        return build()
    path = entry_path(source_digest(source), variant, "json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        text = data["text"]
        if hashlib.sha256(text.encode("utf-8")).hexdigest() == data["sha256"]:
            return text
        warnings.warn(f"the cached {variant} {path} is damaged (checksum mismatch); rebuilding it", stacklevel=3)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        warnings.warn(f"the cached {variant} {path} is damaged ({exc}); rebuilding it", stacklevel=3)
    text = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
                                            "text": text}))
    except OSError:
        pass
    return text
