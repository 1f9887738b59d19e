"""``attnlab bench linear``: the decode-time matrix products alone, attnlab's CPU kernel against PyTorch's.

A decoder's step is dominated by multiplying a few rows (1 token, or the γ + 1 a speculative verifier
scores) by every weight. This runs the linear layers of a SmolLM2-135M-shaped stack (30 layers of fused
Q/K/V 960x576, O 576x576, gate/up 3072x576, down 576x1536; 425 MB in fp32, far beyond the caches) once per
repeat, for each precision and row count, through:

- ``pytorch``: what a PyTorch model calls — ``F.linear`` (fp32, bf16; oneDNN's packed bf16 product where
  the CPU has bf16 units) and ``torch._weight_int8pack_mm`` (int8 weight, bf16 activations);
- ``fallback``: attnlab's layers with the kernel switched off (``layers/kernel_linear.py`` weight-first product
  for fp32; the PyTorch kernels for bf16/int8);
- ``kernel``: attnlab's ``rows_matmul`` (``layers/cpu_kernels.py``); for the GGUF block formats (``q8_0``,
  ``q4_0``, ``q4_1``, ``q4_k``) its ``qmatmul``: the blocks as stored, integer dot products
  (``layers/qblocks.py``), where ``pytorch`` is ``F.linear`` with the weight dequantised to float32 (what a
  GGUF loader that widens every tensor runs) and ``fallback`` the portable path (blocks dequantised per call);
- ``kernel@REV`` (with ``--against REV``): the kernel as it was at git revision REV, built beside the
  current one, so that a change to the kernel is timed against its predecessor in the same run.

Reported: ms per pass, bytes per weight, weight GB/s (bytes of the stored weights streamed per second), fraction of the memory bandwidth probe taken in the same run, and
each path's speed-up over ``pytorch``. Every path is measured interleaved with the others (round robin, each
round starting with the next path, best of the repeats).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F

from attnlab.bench.clock import Stopwatch
from attnlab.bench.common import machine, markdown_table, write_json
from attnlab.commands.args import add_precision, parser

SMOLLM2_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
BLOCK_FORMATS = ["q8_0", "q4_0", "q4_1", "q4_k"]
PRECISIONS = ["fp32", "bf16", "int8", *BLOCK_FORMATS]  # the weight formats timed (--precisions)


def weight_bytes(precision: str, weights: list) -> int:
    """Bytes of the stored weights one pass streams (a q4_k stack holds Q4_1 where 256 does not divide C)."""
    if precision in BLOCK_FORMATS:
        from attnlab.layers.qblocks import format_for

        return sum(w.shape[0] * format_for(precision, w.shape[1]).row_bytes(w.shape[1]) for w in weights)
    return sum(w.numel() for w in weights) * {"fp32": 4, "bf16": 2, "int8": 1}[precision]


def load_revision(rev: str):
    """The few-row kernel (``csrc/rows_matmul.cpp``) as it was at git revision ``rev`` of this checkout,
    built under the op namespace ``attnlab_kernels_<rev>`` so that it loads beside the current one; returns
    its ``rows_matmul``, called like ``cpu_kernels.rows_matmul`` (same Python cost). For timing a change to
    the kernel against its predecessor in one process (``--against REV``)."""
    from torch.utils import cpp_extension

    from attnlab.layers import cpu_kernels

    name = re.sub(r"\W", "_", rev)
    source = cpu_kernels.SOURCE
    rel = source.relative_to(source.parents[4]).as_posix()  # src/attnlab/layers/csrc/rows_matmul.cpp
    try:
        text = subprocess.run(["git", "show", f"{rev}:{rel}"], cwd=source.parent, capture_output=True, text=True,
                              check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        raise ValueError(f"cannot read the kernel at revision {rev!r} ({str(detail).strip()}); "
                         f"--against needs a git checkout and a revision that has {rel}") from None
    text = text.replace("attnlab_kernels", f"attnlab_kernels_{name}")
    flags = [*cpu_kernels.FLAGS, "-std=c++20"]
    key = hashlib.sha256(" ".join([text, torch.__version__, sys.version, *flags]).encode()).hexdigest()[:16]
    directory = cpu_kernels.cache_dir() / f"rev-{name}-{key}"
    directory.mkdir(parents=True, exist_ok=True)
    src = directory / "rows_matmul.cpp"
    if not src.exists() or src.read_text() != text:
        fd, tmp = tempfile.mkstemp(suffix=".cpp", dir=directory)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, src)
    cpp_extension.load(f"attnlab_rev_{name}_{key}", [str(src)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                       build_directory=str(directory), is_python_module=False, verbose=False)
    op = getattr(torch.ops, f"attnlab_kernels_{name}").rows_matmul

    def past_rows_matmul(x, weight, scales=None, bias=None):
        return cpu_kernels.call_rows(op, x, weight, scales, bias)

    return past_rows_matmul


def _paths(precision: str, weights: list, against: dict | None = None) -> dict:
    """name -> one ``(function, extra args)`` per weight; each is called as ``function(x, *extra)``."""
    from attnlab.layers import cpu_kernels, quant
    from attnlab.layers import kernel_linear as L

    kernel = cpu_kernels.available()
    paths = {}
    if precision == "fp32":
        paths["pytorch"] = [(F.linear, (w,)) for w in weights]
        paths["fallback"] = [(L.skinny_rows, (w,)) for w in weights]
        if kernel:
            paths["kernel"] = [(cpu_kernels.rows_matmul, (w,)) for w in weights]
        for rev, op in (against or {}).items():
            paths[f"kernel@{rev}"] = [(op, (w,)) for w in weights]
    elif precision == "bf16":
        with cpu_kernels.kernels_disabled():
            packed = [quant.PackedLinear(w, None) for w in weights]
        paths["pytorch"] = [(F.linear, (w.bfloat16(),)) for w in weights]
        if packed[0].packed:  # oneDNN's packed product, where the CPU has bf16 units
            paths["fallback"] = [(m, ()) for m in packed]
        if kernel:
            paths["kernel"] = [(cpu_kernels.rows_matmul, (w.bfloat16(),)) for w in weights]
        for rev, op in (against or {}).items():
            paths[f"kernel@{rev}"] = [(op, (w.bfloat16(),)) for w in weights]
    elif precision in BLOCK_FORMATS:
        from attnlab.layers.qblocks import BlockLinear, format_for

        with cpu_kernels.kernels_disabled():  # q4_k: Q4_1 where 256 does not divide the in-features (576)
            portable = [BlockLinear.from_float(w, None, format_for(precision, w.shape[1])) for w in weights]
        paths["pytorch"] = [(F.linear, (m.dequantized(),)) for m in portable]
        paths["fallback"] = [(m, ()) for m in portable]
        if kernel:
            paths["kernel"] = [(cpu_kernels.qmatmul, (m.blocks, m.fmt.ggml_type)) for m in portable]
    else:
        with cpu_kernels.kernels_disabled():
            int8 = [quant.Int8Linear(w, None) for w in weights]
        paths["pytorch"] = [(torch._weight_int8pack_mm, (m.qweight, m.scales)) for m in int8]
        if kernel:
            paths["kernel"] = [(cpu_kernels.rows_matmul, (m.qweight, m.scales32)) for m in int8]
        for rev, op in (against or {}).items():
            paths[f"kernel@{rev}"] = [(op, (m.qweight, m.scales32)) for m in int8]
    return paths


def run(precisions: list[str], rows_list: list[int], layers: int, repeats: int,
        against: list[str] | None = None) -> list[dict]:
    from attnlab.bench.decode import bandwidth_probe
    from attnlab.layers import cpu_kernels

    cpu_kernels.available()  # build it before timing anything
    previous = {rev: load_revision(rev) for rev in against or []}
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(f, c, generator=g) * 0.02 for _ in range(layers) for f, c in SMOLLM2_SHAPES]
    bandwidth = bandwidth_probe(repeats=3)
    rows_out = []
    for precision in precisions:
        paths = _paths(precision, weights, previous)
        nbytes = weight_bytes(precision, weights)
        act = torch.bfloat16 if precision in ("bf16", "int8") else torch.float32
        for n in rows_list:
            xs = {c: torch.randn(n, c, generator=g).to(act) for _, c in SMOLLM2_SHAPES}
            best = {name: float("inf") for name in paths}
            with torch.inference_mode():
                names = list(paths)
                for rnd in range(repeats + 1):  # the first round warms up
                    # each round starts with another path: the one after PyTorch's ran measurably slower
                    for name in names[rnd % len(names):] + names[:rnd % len(names)]:
                        fns = paths[name]
                        with Stopwatch() as clock:
                            for (fn, extra), w in zip(fns, weights):
                                fn(xs[w.shape[1]], *extra)
                        if rnd:
                            best[name] = min(best[name], clock.seconds)
            for name, seconds in best.items():
                rows_out.append({"precision": precision, "rows": n, "path": name, "ms": seconds * 1e3,
                                 "bytes_per_weight": nbytes / sum(w.numel() for w in weights),
                                 "GBps": nbytes / seconds / 1e9, "roofline": nbytes / seconds / bandwidth,
                                 "vs_pytorch": best["pytorch"] / seconds, "bandwidth_GBps": bandwidth / 1e9})
    return rows_out


def main(argv: list[str]) -> int:
    p = parser("attnlab bench linear", "Few-row matrix products of a SmolLM2-shaped stack: kernel vs PyTorch.")
    add_precision(p, PRECISIONS, default=PRECISIONS, flag="--precisions", nargs="+",
                  help="the weight formats to time (default: all)")
    p.add_argument("--rows", nargs="+", type=int, default=[1, 2, 4, 5, 8, 16])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's choice)")
    p.add_argument("--against", nargs="+", default=[], metavar="REV",
                   help="also time the kernel as it was at these git revisions (built beside the current one)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if min(args.rows) < 1 or args.layers < 1 or args.repeats < 1:
        raise ValueError("--rows, --layers and --repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.precisions, args.rows, args.layers, args.repeats, args.against)
    print(markdown_table(rows, ["precision", "rows", "path", "ms", "bytes_per_weight", "GBps", "roofline",
                                      "vs_pytorch"]))
    write_json(args.json, {"machine": machine(), "rows": rows})
    return 0
