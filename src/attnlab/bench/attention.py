"""``attnlab bench attention``: naive vs sdpa vs flash, time and peak extra memory against sequence length.

For each sequence length T, causal or not, float32 or bfloat16, MHA (8 query heads, 8 K/V heads) and GQA
(8 query heads, 2 K/V heads), with B=1 and D=64, and for each kernel it measures:

* forward and forward+backward wall time (median of repeats, in this process, after a warm-up call;
  the kernels of a case are timed round-robin so that load from other processes hits them alike);
* peak *extra* memory of one forward and of one forward+backward above the inputs (q, k, v, dO), as the
  process resident-set high-water mark (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``) in a
  fresh subprocess per case, with glibc's mmap threshold pinned to 64 KiB so that freed blocks leave
  the resident set at once. ``tracemalloc`` cannot see torch's allocations, hence RSS. It includes
  everything the call allocates (outputs, gradients, temporaries); ~1 MiB is noise.

The naive kernel materialises the (T, T) scores, so it is skipped (with a note) where its estimated
footprint would exceed ``--naive-max-gb``. Results: a table on stdout (plain and Markdown), a JSON list of
rows and a log-log PNG of time and memory against T in ``--out``.

Shape legend: B batch, H query heads, K key/value heads, T sequence length (Tq = Tk = T), D head dim.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from attnlab.atomic import atomic_write_text
from attnlab.bench.clock import Stopwatch
from attnlab.bench.common import markdown_table
from attnlab.commands.args import add_precision, parser, run_command, torch_dtype
from attnlab.figures import save_figure

KERNEL_NAMES = ("naive", "sdpa", "flash")
DTYPES = ("fp32", "bf16")  # the precisions the kernels are timed in (--dtypes)
CONFIGS = {"mha": (8, 8), "gqa": (8, 2)}  # name -> (H query heads, K kv heads)
DEFAULT_SEQS = (512, 1024, 2048, 4096, 8192, 16384)
QUICK_SEQS = (256, 512, 1024)
MEMORY_METHOD = ("process RSS high-water (VmHWM reset via /proc/self/clear_refs), "
                 "one fresh subprocess per (config, T, causal, dtype)")


def _kernel(name: str) -> Callable[..., tuple[Tensor, Tensor | None]]:
    from attnlab.attention.kernels import get_kernel

    return get_kernel(name)


def _inputs(cfg: str, T: int, dtype: torch.dtype, grad: bool, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    H, K = CONFIGS[cfg]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, H, T, 64, generator=g).to(dtype).requires_grad_(grad)  # (B, H, T, D)
    k = torch.randn(1, K, T, 64, generator=g).to(dtype).requires_grad_(grad)  # (B, K, T, D)
    v = torch.randn(1, K, T, 64, generator=g).to(dtype).requires_grad_(grad)
    dout = torch.randn(1, H, T, 64, generator=g).to(dtype)  # upstream gradient of out
    return q, k, v, dout


def _run(kernel: str, mode: str, q: Tensor, k: Tensor, v: Tensor, dout: Tensor, causal: bool) -> None:
    fn = _kernel(kernel)
    if mode == "fwd":
        with torch.no_grad():
            fn(q, k, v, causal=causal, mask=None, scale=None)
        return
    for t in (q, k, v):
        t.grad = None
    out, _ = fn(q, k, v, causal=causal, mask=None, scale=None)
    out.backward(dout)
    for t in (q, k, v):
        t.grad = None


def naive_bytes(cfg: str, T: int, mode: str) -> float:
    """Footprint estimate of the naive kernel: float32 (H, T, T) score-sized tensors alive at once
    (measured: ~3 for a forward, ~5 for forward+backward)."""
    H, _ = CONFIGS[cfg]
    copies = 3.2 if mode == "fwd" else 5.3
    return copies * H * T * T * 4


def time_case(runs: dict[str, list[str]], cfg: str, T: int, causal: bool, dtype: torch.dtype, *, min_time: float,
              max_repeats: int) -> dict[tuple[str, str], list[float]]:
    """Wall times (s) of each (kernel, mode) after one warm-up call each.

    The kernels are timed round-robin (naive, sdpa, flash, naive, ...), so that load from other processes
    on a shared machine hits them alike; fewer repeats when one call is slow.
    """
    inputs = {mode: _inputs(cfg, T, dtype, grad=mode == "fwdbwd") for ms in runs.values() for mode in ms}
    pairs = [(kern, mode) for kern, ms in runs.items() for mode in ms]
    slowest = 0.0
    for kern, mode in pairs:  # warm-up
        with Stopwatch() as clock:
            _run(kern, mode, *inputs[mode], causal)
        slowest = max(slowest, clock.seconds)
    repeats = max(1, min(max_repeats, int(min_time / max(slowest, 1e-6))))
    times: dict[tuple[str, str], list[float]] = {pair: [] for pair in pairs}
    for _ in range(repeats):
        for kern, mode in pairs:
            with Stopwatch() as clock:
                _run(kern, mode, *inputs[mode], causal)
            times[(kern, mode)].append(clock.seconds)
    return times


# ---------------------------------------------------------------- memory probe (runs in a subprocess)
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: freed memory may stay resident, the peak is then an upper bound
        pass


def _peak_extra(kernel: str, mode: str, q: Tensor, k: Tensor, v: Tensor, dout: Tensor, causal: bool) -> int:
    _trim()
    base = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    _run(kernel, mode, q, k, v, dout, causal)
    return max(0, _status_kb("VmHWM") - base) * 1024


def probe(spec: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Peak extra bytes of one forward and one forward+backward per kernel (run in a fresh process).

    ``spec["runs"]`` maps kernel -> modes. The kernels of one case share the process: with the mmap
    threshold pinned and ``malloc_trim`` between runs, what one run frees leaves the resident set.
    """
    torch.set_num_threads(spec["threads"])
    dtype = torch_dtype(spec["dtype"])
    out: dict[str, dict[str, int]] = {}
    for kernel, modes in spec["runs"].items():
        out[kernel] = {}
        for mode in modes:
            tiny = _inputs(spec["cfg"], 64, dtype, grad=mode == "fwdbwd")
            _run(kernel, mode, *tiny, spec["causal"])  # load code paths, thread pools, allocator arenas
            del tiny
            q, k, v, dout = _inputs(spec["cfg"], spec["T"], dtype, grad=mode == "fwdbwd")
            out[kernel][mode] = _peak_extra(kernel, mode, q, k, v, dout, spec["causal"])
            del q, k, v, dout
    return out


def measure_memory(spec: dict[str, Any]) -> dict[str, dict[str, int]] | None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    cmd = [sys.executable, "-m", "attnlab.bench.attention", "--probe", json.dumps(spec)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        print(f"memory probe failed for {spec}: {res.stderr.strip()[-400:]}", file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- report
def _fmt_time(x: float | None) -> str:
    return "-" if x is None else (f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s")


def _fmt_mem(x: int | None) -> str:
    return "-" if x is None else f"{x / 2**20:.1f} MiB"


COLUMNS = ("cfg", "T", "causal", "dtype", "kernel", "fwd", "fwd+bwd", "fwd mem", "fwd+bwd mem", "note")


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    return [[r["cfg"], str(r["T"]), "yes" if r["causal"] else "no", r["dtype"], r["kernel"], _fmt_time(r["fwd_s"]),
             _fmt_time(r["fwdbwd_s"]), _fmt_mem(r["fwd_mem_bytes"]), _fmt_mem(r["fwdbwd_mem_bytes"]), r["note"]]
            for r in rows]


def plain_table(rows: list[dict[str, Any]]) -> str:
    body = [list(COLUMNS)] + table_rows(rows)
    widths = [max(len(line[i]) for line in body) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in body)


def markdown(rows: list[dict[str, Any]]) -> str:
    return markdown_table([dict(zip(COLUMNS, line)) for line in table_rows(rows)], COLUMNS)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("fwd_s", "forward time (s)"), ("fwdbwd_s", "fwd+bwd time (s)"),
              ("fwd_mem_bytes", "forward peak extra (MiB)"), ("fwdbwd_mem_bytes", "fwd+bwd peak extra (MiB)")]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.8))
    styles = {"naive": "tab:red", "sdpa": "tab:blue", "flash": "tab:green"}
    series = sorted({(r["cfg"], r["causal"], r["dtype"], r["kernel"]) for r in rows})
    for ax, (key, title) in zip(axes, panels):
        for cfg, causal, dtype, kernel in series:
            pts = [(r["T"], r[key]) for r in rows if (r["cfg"], r["causal"], r["dtype"], r["kernel"]) == (cfg, causal, dtype, kernel)
                   and r[key] is not None and r[key] > 0]
            if not pts:
                continue
            xs, ys = zip(*sorted(pts))
            ys = [y / 2**20 for y in ys] if "mem" in key else list(ys)
            ls = "-" if cfg == "mha" else "--"
            marker = "o" if not causal else "^"
            alpha = 1.0 if dtype == "fp32" else 0.5
            ax.plot(xs, ys, ls, marker=marker, color=styles[kernel], alpha=alpha, markersize=4,
                    label=f"{kernel} {cfg} {'causal' if causal else 'full'} {dtype}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=6, ncol=2)
    fig.suptitle("attention kernels: B=1, H=8, D=64 (GQA: 2 kv heads), CPU")
    fig.tight_layout()
    save_figure(fig, path)


# ---------------------------------------------------------------- main
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = parser("attnlab bench attention", __doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, nargs="+", default=None, help=f"sequence lengths (default {DEFAULT_SEQS})")
    p.add_argument("--quick", action="store_true", help=f"small lengths {QUICK_SEQS} (added to --seq if both are given)")
    p.add_argument("--kernels", nargs="+", choices=KERNEL_NAMES, default=list(KERNEL_NAMES))
    add_precision(p, DTYPES, default=list(DTYPES), flag="--dtypes", nargs="+", help="precisions of q, k, v")
    p.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["mha", "gqa"])
    p.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    p.add_argument("--no-backward", action="store_true", help="forward only")
    p.add_argument("--no-memory", action="store_true", help="skip the memory probes (timing only)")
    p.add_argument("--naive-max-gb", type=float, default=12.0, help="skip naive when its estimate exceeds this")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of repeats per timing (after warm-up)")
    p.add_argument("--max-repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("bench_results/attention"))
    p.add_argument("--probe", type=str, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    seqs = list(args.seq or [])
    if args.quick:
        seqs = sorted(set(seqs) | set(QUICK_SEQS))
    args.seqs = seqs or list(DEFAULT_SEQS)
    if any(t < 1 for t in args.seqs) or args.threads < 1:
        p.error("sequence lengths and --threads must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.probe is not None:
        print(json.dumps(probe(json.loads(args.probe))))
        return 0
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    modes = ["fwd"] if args.no_backward else ["fwd", "fwdbwd"]
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    cases = [(cfg, T, c, dt) for cfg in args.configs for T in args.seqs for c in causals for dt in args.dtypes]
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(cases), desc="attention bench", unit="case")
    for cfg, T, causal, dt in cases:
        case_rows: dict[str, dict[str, Any]] = {}
        runs: dict[str, list[str]] = {}
        for kern in args.kernels:
            row: dict[str, Any] = dict(cfg=cfg, H=CONFIGS[cfg][0], K=CONFIGS[cfg][1], B=1, D=64, T=T, causal=causal,
                                       dtype=dt, kernel=kern, fwd_s=None, fwdbwd_s=None, fwd_mem_bytes=None,
                                       fwdbwd_mem_bytes=None, note="", times={})
            run_modes = list(modes)
            if kern == "naive":
                too_big = [m for m in run_modes if naive_bytes(cfg, T, m) > args.naive_max_gb * 2**30]
                if too_big:
                    gb = naive_bytes(cfg, T, too_big[0]) / 2**30
                    row["note"] = f"naive skipped ({', '.join(too_big)}): ~{gb:.0f} GB > --naive-max-gb"
                    run_modes = [m for m in run_modes if m not in too_big]
            if run_modes:
                runs[kern] = run_modes
            case_rows[kern] = row
        bar.set_postfix_str(f"{cfg} T={T} {'causal' if causal else 'full'} {dt} timing")
        times = time_case(runs, cfg, T, causal, torch_dtype(dt), min_time=args.min_time, max_repeats=args.max_repeats)
        for (kern, mode), ts in times.items():
            case_rows[kern]["fwd_s" if mode == "fwd" else "fwdbwd_s"] = statistics.median(ts)
            case_rows[kern]["times"][mode] = ts
        gc.collect()
        if runs and not args.no_memory:
            bar.set_postfix_str(f"{cfg} T={T} {'causal' if causal else 'full'} {dt} memory")
            mem = measure_memory(dict(runs=runs, cfg=cfg, T=T, causal=causal, dtype=dt, threads=args.threads))
            for kern, by_mode in (mem or {}).items():
                case_rows[kern]["fwd_mem_bytes"] = by_mode.get("fwd")
                case_rows[kern]["fwdbwd_mem_bytes"] = by_mode.get("fwdbwd")
        rows.extend(case_rows.values())
        bar.update(1)
    bar.close()

    header = (f"attention kernels, B=1, H=8, D=64 (gqa: K=2); torch {torch.__version__}, {args.threads} threads, "
              f"{platform.processor() or platform.machine()}; time = median wall time after warm-up; "
              f"memory = peak extra above the inputs, {MEMORY_METHOD}")
    print(header)
    print(plain_table(rows))
    print()
    print(markdown(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(torch=torch.__version__, threads=args.threads, memory_method=MEMORY_METHOD, argv=argv)
    atomic_write_text(args.out / "attention.json", json.dumps(dict(meta=meta, rows=rows), indent=1))
    plot(rows, args.out / "attention.png")
    print(f"\nwrote {args.out / 'attention.json'} and {args.out / 'attention.png'}")
    return 0


if __name__ == "__main__":  # as `attnlab bench attention` (the memory probes run this way): one error line
    raise SystemExit(run_command(main, sys.argv[1:]))
