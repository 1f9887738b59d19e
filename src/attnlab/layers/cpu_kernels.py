"""attnlab's own CPU kernel for decode-time matrix products, built on first use with the C++ compiler that
``torch.compile`` needs anyway.

``rows_matmul(x, weight, scales=None, bias=None)`` is ``x @ W.T (* scales) (+ bias)`` for a few rows of
``x`` and a float32, bfloat16 or int8 weight (``csrc/rows_matmul.cpp``, AVX2 + FMA). It streams the weight
once, converts it to float32 in registers and accumulates in float32, so

- a bf16 or int8 weight is read at its own size on any AVX2 CPU, including those without bf16/VNNI units,
  where PyTorch's bf16 products fall back to a scalar loop;
- every output element is the same sequence of operations whatever the number of rows or threads:
  decoding a token alone or verifying it among others gives bit-identical results.

The compiled library is cached under ``$ATTNLAB_CACHE/kernels`` (default ``~/.cache/attnlab/kernels``), keyed by the
source, the PyTorch version and the compiler flags; building takes ~20 s once per machine. When the CPU
is not x86 with AVX2, no compiler works, or ``ATTNLAB_KERNELS=0``, :func:`available` is False and the
callers keep PyTorch's kernels (``unavailable_reason()`` says why). ``kernels_disabled()`` switches it off
for comparisons.
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

SOURCE = Path(__file__).with_name("csrc") / "rows_matmul.cpp"
MAX_ROWS = 16  # beyond this a BLAS GEMM (which reuses each weight element across rows in registers) wins
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c++20", "-w"]

_state: dict = {"loaded": None, "reason": None, "enabled": True}


def cache_dir() -> Path:
    return attnlab_cache_dir("kernels")


def _build_key() -> str:
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(" ".join([torch.__version__, sys.version, *FLAGS]).encode())
    return h.hexdigest()[:16]


def _compile(out: Path, source: Path = SOURCE) -> None:
    from torch.utils import cpp_extension

    lib_dirs = cpp_extension.library_paths()
    cmd = [os.environ.get("CXX", "c++"), *FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    for inc in cpp_extension.include_paths():
        cmd += ["-I", inc]
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd += [str(source), "-o", tmp, *[f"-L{d}" for d in lib_dirs], "-lc10", "-ltorch_cpu",
            *[f"-Wl,-rpath,{d}" for d in lib_dirs]]
    print("attnlab: building the CPU decode kernel (once per machine, ~20 s) ...", file=sys.stderr, flush=True)
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        os.unlink(tmp)
        raise RuntimeError(f"could not run the C++ compiler ({exc})") from exc
    if result.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"the C++ compiler failed: {result.stderr.strip()[-600:]}")
    os.replace(tmp, out)  # atomic: a concurrent process sees the whole library or none


def _load() -> bool:
    if _state["loaded"] is not None:
        return _state["loaded"]
    _state["loaded"] = False
    if os.environ.get("ATTNLAB_KERNELS", "1") == "0":
        _state["reason"] = "switched off by ATTNLAB_KERNELS=0"
        return False
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        _state["reason"] = f"the kernel needs an x86 CPU with AVX2; this one reports {capability}"
        return False
    lib = cache_dir() / f"rows_matmul-{_build_key()}.so"
    try:
        if not lib.exists():
            _compile(lib)
        torch.ops.load_library(str(lib))
    except (RuntimeError, OSError) as exc:
        _state["reason"] = str(exc)
        print(f"attnlab: CPU decode kernel unavailable, using PyTorch's kernels ({exc})", file=sys.stderr)
        return False
    torch.library.register_fake("attnlab_kernels::rows_matmul")(_fake)
    _state["loaded"] = True
    return True


def _fake(x: Tensor, weight: Tensor, scales: Tensor | None, bias: Tensor | None) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def available() -> bool:
    """True when the kernel is built and loaded (building it on the first call) and not switched off."""
    return _state["enabled"] and _load()


def unavailable_reason() -> str | None:
    if not _state["enabled"]:
        return "switched off by kernels_disabled()"
    return None if _load() else _state["reason"]


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
    """Within this block :func:`available` is False: layers use PyTorch's kernels (for comparisons)."""
    return switched_off(_state)


def rows_matmul(x: Tensor, weight: Tensor, scales: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """(..., C) @ (F, C).T -> (..., F) in ``x``'s dtype, float32 accumulation (see the module docstring)."""
    return _call(torch.ops.attnlab_kernels.rows_matmul, x, weight, scales, bias)


def _call(op, x: Tensor, weight: Tensor, scales: Tensor | None, bias: Tensor | None) -> Tensor:
    y = op(x.reshape(-1, x.shape[-1]), weight, scales, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


def load_revision(rev: str):
    """The kernel as it was at git revision ``rev`` of this checkout, built under the op namespace
    ``attnlab_kernels_<rev>`` so that it loads beside the current one; returns its ``rows_matmul``, called
    like :func:`rows_matmul`.
    For timing a change to the kernel against its predecessor in one process (``attnlab bench linear
    --against REV``)."""
    import re

    name = re.sub(r"\W", "_", rev)
    rel = SOURCE.relative_to(SOURCE.parents[4]).as_posix()  # src/attnlab/layers/csrc/rows_matmul.cpp
    try:
        text = subprocess.run(["git", "show", f"{rev}:{rel}"], cwd=SOURCE.parent, capture_output=True, text=True,
                              check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        raise ValueError(f"cannot read the kernel at revision {rev!r} ({str(detail).strip()}); "
                         f"--against needs a git checkout and a revision that has {rel}") from None
    text = text.replace("attnlab_kernels", f"attnlab_kernels_{name}")
    src = cache_dir() / f"rows_matmul-{name}.cpp"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_text(text)
    h = hashlib.sha256(text.encode())
    h.update(" ".join([torch.__version__, sys.version, *FLAGS]).encode())
    lib = cache_dir() / f"rows_matmul-{name}-{h.hexdigest()[:16]}.so"
    if not lib.exists():
        _compile(lib, src)
    torch.ops.load_library(str(lib))
    op = getattr(torch.ops, f"attnlab_kernels_{name}").rows_matmul

    def past_rows_matmul(x: Tensor, weight: Tensor, scales: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
        return _call(op, x, weight, scales, bias)  # called as the current one is: same Python cost

    return past_rows_matmul
