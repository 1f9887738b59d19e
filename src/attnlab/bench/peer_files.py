"""The GGUF siblings ``attnlab bench peer`` compares at: the shipped file re-encoded as F32, BF16, F16 and Q8_0
by llama.cpp's own quantizer (``llama_model_quantize`` through llama-cpp-python's low-level binding).

Each sibling is written once into ``$ATTNLAB_CACHE/peer/<stem>-<hash>/``, where ``<hash>`` is the first 16
hex digits of the SHA-256 of the source file's bytes together with the quantizer's version: a changed source
file (or a new llama.cpp) gets a new directory, never a stale sibling. A sibling is written under a temporary
name and renamed into place only once the quantizer returned success, so a run killed half-way leaves no
file that a later run would trust; a cached file that does not start with the GGUF magic is rebuilt.

The quantizer dequantises each tensor of the source (``allow_requantize``: the shipped file is Q4_1) to
float32 and encodes it in the target type, so F32 holds exactly the weights attnlab and Hugging Face load
from the shipped file (both dequantise it to float32 too).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from attnlab.atomic import atomic_write_file
from attnlab.cachedir import cache_dir

# target format -> llama.cpp's ``llama_ftype`` (include/llama.h: LLAMA_FTYPE_ALL_F32 = 0, MOSTLY_F16 = 1,
# MOSTLY_Q8_0 = 7, MOSTLY_BF16 = 32); the names are checked against the binding's constants when it runs.
FTYPES: dict[str, int] = {"F32": 0, "BF16": 32, "F16": 1, "Q8_0": 7}
FTYPE_NAMES: dict[str, str] = {"F32": "LLAMA_FTYPE_ALL_F32", "BF16": "LLAMA_FTYPE_MOSTLY_BF16",
                               "F16": "LLAMA_FTYPE_MOSTLY_F16", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}
GGUF_MAGIC = b"GGUF"

# (source, destination, ftype) -> None; raises on failure. Injected in tests.
Quantizer = Callable[[Path, Path, int], None]


def file_hash(path: str | Path, *, salt: str = "") -> str:
    """First 16 hex digits of SHA-256(salt + the file's bytes): the cache key of a source file."""
    digest = hashlib.sha256(salt.encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def source_stem(path: Path) -> str:
    """``SmolLM2-135M-Instruct.Q4_1.gguf`` -> ``SmolLM2-135M-Instruct`` (the format suffix dropped)."""
    stem = path.name.removesuffix(".gguf")
    head, dot, tail = stem.rpartition(".")
    return head if dot and tail.upper().replace("_", "").isalnum() and tail[:1].upper() in "QFB" else stem


def sibling_dir(source: Path, *, quantizer_version: str, root: Path | None = None) -> Path:
    """``<root>/<stem>-<hash>``: where the siblings of ``source`` live (root: ``$ATTNLAB_CACHE/peer``)."""
    root = cache_dir("peer") if root is None else root
    return root / f"{source_stem(source)}-{file_hash(source, salt=quantizer_version)}"


def is_gguf(path: Path) -> bool:
    """A complete-looking GGUF file: exists and starts with the magic (a truncated/garbled one is rebuilt)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def write_siblings(source: str | Path, formats: list[str], *, quantize: Quantizer, quantizer_version: str,
                   root: Path | None = None, progress: Callable[[str], None] | None = None) -> dict[str, Path]:
    """The sibling of ``source`` in each format (written if absent or not a GGUF), as {format: path}."""
    source = Path(source)
    unknown = [f for f in formats if f not in FTYPES]
    if unknown:
        raise ValueError(f"no llama.cpp ftype for {unknown}; sibling formats are {', '.join(FTYPES)}")
    directory = sibling_dir(source, quantizer_version=quantizer_version, root=root)
    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for fmt in formats:
        target = directory / f"{source_stem(source)}.{fmt}.gguf"
        if not is_gguf(target):
            if progress is not None:
                progress(f"writing {target.name} with llama.cpp's quantizer (once; cached in {directory})")

            def write(tmp: Path, fmt: str = fmt) -> None:
                quantize(source, tmp, FTYPES[fmt])
                if not is_gguf(tmp):
                    raise RuntimeError(f"the quantizer wrote no GGUF file at {tmp}")

            atomic_write_file(target, write)
        out[fmt] = target
    return out


_QUANTIZE_SCRIPT = """
import ctypes, sys
import llama_cpp
src, dst, ftype, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
llama_cpp.llama_backend_init()
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = ftype
params.nthread = threads
params.allow_requantize = True
sys.exit(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)))
"""


def llama_quantizer(threads: int = 2) -> tuple[Quantizer, str]:
    """llama.cpp's quantizer, run in a child process (its log goes to a pipe, shown only on failure), and
    its version string (part of the cache key)."""
    import llama_cpp

    for fmt, name in FTYPE_NAMES.items():  # the numbers above must be the binding's
        if getattr(llama_cpp, name, FTYPES[fmt]) != FTYPES[fmt]:
            raise RuntimeError(f"llama_cpp.{name} is {getattr(llama_cpp, name)}, expected {FTYPES[fmt]}")

    def quantize(src: Path, dst: Path, ftype: int) -> None:
        done = subprocess.run([sys.executable, "-c", _QUANTIZE_SCRIPT, str(src), str(dst), str(ftype), str(threads)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            raise RuntimeError(f"llama_model_quantize({src.name} -> ftype {ftype}) failed "
                               f"(exit {done.returncode}):\n{tail}")

    return quantize, f"llama-cpp-python {llama_cpp.__version__}"
