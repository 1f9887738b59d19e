"""attnlab's own CPU kernels for decode-time matrix products, built on first use with PyTorch's extension
builder (``torch.utils.cpp_extension.load``: the C++ compiler ``torch.compile`` needs anyway, and ninja).

Two operators, one library per instruction set:

- ``rows_matmul(x, weight, scales=None, bias=None)`` (``csrc/rows_matmul.cpp``) is ``x @ W.T (* scales)
  (+ bias)`` for a few rows of ``x`` and a float32, bfloat16 or int8 weight. It streams the weight once,
  converts it to float32 in registers and accumulates in float32, so a bf16 or int8 weight is read at its
  own size on any AVX2 CPU, and every output element is the same sequence of operations whatever the
  number of rows or threads (decoding a token alone or verifying it among others is bit-identical).
- ``qmatmul(x, blocks, qtype, bias=None)`` (``csrc/qblocks.cpp``) multiplies by a weight kept in a GGUF
  block format (Q8_0, Q4_0, Q4_1, Q4_K) with integer dot products against activations quantised per block
  of 32 (``layers/qblocks.py`` holds the formats and the module that calls it).

**Instruction sets, chosen at run time.** The same sources are built per variant: ``avx2`` (AVX2 + FMA +
F16C: ``vpmaddubsw``/``vpmaddwd`` integer dots), ``avx512_vnni`` (adds AVX-512 F/BW/VL and VNNI: one
``vpdpbusd``) and ``avx_vnni`` (AVX-VNNI's ``vpdpbusd``, e.g. Alder Lake and later). :func:`best_isa` picks
the newest one the CPU's flags (``/proc/cpuinfo``) allow; only that variant is built and loaded.
``ATTNLAB_KERNEL_ISA=avx2`` forces a variant (one the CPU lacks is refused). Where the CPU is not x86 with
AVX2, the compiler or ninja is missing, or ``ATTNLAB_KERNELS=0``, :func:`available` is False and the callers
use their portable PyTorch paths (``unavailable_reason()`` says why); :func:`kernels_disabled` does the same
inside a ``with`` block (tests, comparisons).

The libraries live under ``$ATTNLAB_CACHE/kernels/<isa>-<key>`` (default ``~/.cache/attnlab``), the key
hashing the sources, the flags, the PyTorch and Python versions: a change to any of them builds anew (once
per machine, ~30-60 s); ``cpp_extension.load`` locks the directory, so concurrent processes build once.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from attnlab.cachedir import cache_dir as attnlab_cache_dir

CSRC = Path(__file__).with_name("csrc")
SOURCE = CSRC / "rows_matmul.cpp"  # the float/bf16/int8 few-row kernel (bench linear --against reads it)
SOURCES = [SOURCE, CSRC / "qblocks.cpp"]
MAX_ROWS = 16  # beyond this a BLAS GEMM (which reuses each weight element across rows in registers) wins
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-w"]
# per variant: extra compiler flags, and the /proc/cpuinfo flags the CPU must report to run it
ISAS: dict[str, tuple[list[str], set[str]]] = {
    "avx512_vnni": (["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-DATTNLAB_VNNI=1"],
                    {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}),
    "avx_vnni": (["-mavxvnni", "-DATTNLAB_VNNI=2"], {"avx2", "fma", "f16c", "avx_vnni"}),
    "avx2": ([], {"avx2", "fma", "f16c"}),
}

_state: dict = {"loaded": None, "reason": None, "enabled": True, "isa": None}


def cache_dir() -> Path:
    return attnlab_cache_dir("kernels")


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux names them (``/proc/cpuinfo``); empty where that file is missing."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def best_isa(flags: set[str] | None = None) -> str | None:
    """The newest kernel variant the CPU can run (``avx512_vnni``, ``avx_vnni``, ``avx2``), or None."""
    flags = cpu_flags() if flags is None else flags
    if not flags and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags = ISAS["avx2"][1]  # no /proc/cpuinfo (not Linux): PyTorch's own check vouches for AVX2
    return next((name for name, (_, needs) in ISAS.items() if needs <= flags), None)


def _flags(isa: str) -> list[str]:
    return [*FLAGS, *ISAS[isa][0]]


def _build_key(isa: str) -> str:
    h = hashlib.sha256()
    for src in SOURCES:
        h.update(src.read_bytes())
    h.update(" ".join([torch.__version__, sys.version, *_flags(isa)]).encode())
    return h.hexdigest()[:16]


def build(isa: str) -> Path:
    """Build (or find in the cache) and load the variant ``isa``; returns the library's path. The CPU must
    be able to run it: loading runs its initialisers."""
    from torch.utils import cpp_extension

    key = _build_key(isa)
    directory = cache_dir() / f"{isa}-{key}"
    directory.mkdir(parents=True, exist_ok=True)
    name = f"attnlab_kernels_{isa}_{key}"
    if not (directory / f"{name}.so").exists():
        print(f"attnlab: building the CPU kernels for {isa} (once per machine, ~1 min) ...", file=sys.stderr,
              flush=True)
    lib = cpp_extension.load(name, [str(s) for s in SOURCES], extra_cflags=_flags(isa), extra_ldflags=["-fopenmp"],
                             build_directory=str(directory), is_python_module=False, verbose=False)
    return Path(lib) if lib else directory / f"{name}.so"


def compile_only(isa: str) -> None:
    """Compile every source for the variant ``isa`` to object files and discard them, without loading: checks
    that a variant this CPU cannot run (e.g. ``avx512_vnni`` on an AVX2-only CPU) still compiles.
    Raises RuntimeError with the compiler's message when it does not."""
    from torch.utils import cpp_extension

    with tempfile.TemporaryDirectory() as tmp:
        for src in SOURCES:
            cmd = [os.environ.get("CXX", "c++"), *_flags(isa), "-fPIC", "-std=c++17", "-c", str(src),
                   "-o", str(Path(tmp) / f"{src.stem}.o"),
                   f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
            for inc in cpp_extension.include_paths():
                cmd += ["-isystem", inc]
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            if result.returncode != 0:
                raise RuntimeError(f"{src.name} does not compile for {isa}: {result.stderr.strip()[-800:]}")


def _load() -> bool:
    if _state["loaded"] is not None:
        return _state["loaded"]
    _state["loaded"] = False
    if os.environ.get("ATTNLAB_KERNELS", "1") == "0":
        _state["reason"] = "switched off by ATTNLAB_KERNELS=0"
        return False
    isa = best_isa()
    forced = os.environ.get("ATTNLAB_KERNEL_ISA")
    if forced:
        if forced not in ISAS:
            _state["reason"] = f"ATTNLAB_KERNEL_ISA={forced!r} is not one of {', '.join(ISAS)}"
            return False
        missing = ISAS[forced][1] - cpu_flags()
        if missing:
            _state["reason"] = f"ATTNLAB_KERNEL_ISA={forced}: this CPU lacks {', '.join(sorted(missing))}"
            return False
        isa = forced
    if isa is None:
        _state["reason"] = (f"the kernels need an x86 CPU with AVX2, FMA and F16C; this one reports "
                            f"{torch.backends.cpu.get_cpu_capability()}")
        return False
    try:
        build(isa)
    except (RuntimeError, OSError, ImportError, subprocess.CalledProcessError) as exc:
        _state["reason"] = f"building the {isa} kernels failed: {str(exc).strip()[-600:]}"
        print(f"attnlab: CPU kernels unavailable, using PyTorch's kernels ({_state['reason']})", file=sys.stderr)
        return False
    torch.library.register_fake("attnlab_kernels::rows_matmul")(_fake)
    torch.library.register_fake("attnlab_kernels::qmatmul")(_fake_q)
    _state["loaded"] = True
    _state["isa"] = isa
    return True


def _fake(x: Tensor, weight: Tensor, scales: Tensor | None, bias: Tensor | None) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def _fake_q(x: Tensor, blocks: Tensor, qtype: int, bias: Tensor | None) -> Tensor:
    return x.new_empty(x.shape[0], blocks.shape[0])


def load_attempted() -> bool:
    """Whether this process has already tried to build/load the kernels (successfully or not)."""
    return _state["loaded"] is not None


def available() -> bool:
    """True when the kernels are built and loaded (building them on the first call) and not switched off."""
    return _state["enabled"] and _load()


def unavailable_reason() -> str | None:
    if not _state["enabled"]:
        return "switched off by kernels_disabled()"
    return None if _load() else _state["reason"]


def isa() -> str | None:
    """The instruction-set variant loaded (``avx2``, ``avx512_vnni``, ``avx_vnni``), None when unavailable."""
    return _state["isa"] if available() else None


@contextlib.contextmanager
def switched_off(state: dict) -> Iterator[None]:
    """Within this block ``state["enabled"]`` is False; its previous value comes back after."""
    previous = state["enabled"]
    state["enabled"] = False
    try:
        yield
    finally:
        state["enabled"] = previous


def kernels_disabled() -> contextlib.AbstractContextManager[None]:
    """Within this block :func:`available` is False: layers use their PyTorch paths (tests, comparisons)."""
    return switched_off(_state)


def rows_matmul(x: Tensor, weight: Tensor, scales: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """(..., C) @ (F, C).T -> (..., F) in ``x``'s dtype, float32 accumulation (see the module docstring)."""
    return call_rows(torch.ops.attnlab_kernels.rows_matmul, x, weight, scales, bias)


def call_rows(op, x: Tensor, weight: Tensor, scales: Tensor | None, bias: Tensor | None) -> Tensor:
    """``op`` (a ``rows_matmul`` operator) on ``x`` flattened to rows, the leading dims restored."""
    y = op(x.reshape(-1, x.shape[-1]), weight, scales, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


def qmatmul(x: Tensor, blocks: Tensor, qtype: int, bias: Tensor | None = None) -> Tensor:
    """(..., C) @ W.T (+ bias) -> (..., F) for W stored as GGUF blocks of ggml type ``qtype``, ``blocks``
    uint8 (F, row_bytes); see ``csrc/qblocks.cpp`` and ``layers/qblocks.py``."""
    y = torch.ops.attnlab_kernels.qmatmul(x.reshape(-1, x.shape[-1]), blocks, qtype, bias)
    return y.view(*x.shape[:-1], blocks.shape[0])


def quantize_q8(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The kernel's activation quantisation of rows (N, C): (q int8 (N, C), d float32 (N, C/32), sums int32
    (N, C/32)); ``layers/qblocks.quantize_activations`` is its PyTorch twin."""
    return torch.ops.attnlab_kernels.quantize_q8(x)
