"""``attnlab bench ring``: ring attention on P processes of this machine (gloo), by default P = 1, 2, 4.

For one total sequence length it measures, side by side: exactness against single-process attention,
per-rank peak extra memory (the process's resident-set high-water mark, in a fresh process per rank, minus
the mark before attention), forward+backward time, and the causal work each rank does — computed vs
skipped K/V sub-blocks — for the contiguous and zigzag layouts. From the measured per-rank memory it
projects the context length that fits a stated memory budget per device for a stated model.

Each rank is a separate Python process (``python -m attnlab.bench.ring --worker ...``): on 2 cores the
P = 4 runs share cores, so their times measure the algorithm's overheads, not a speed-up.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from attnlab.atomic import atomic_write_text
from attnlab.bench.clock import Stopwatch
from attnlab.bench.common import machine, markdown_table, write_json
from attnlab.bench.common import peak_rss_bytes as _rss_bytes
from attnlab.bench.common import reset_peak_rss as _reset_peak
from attnlab.commands.args import parser
from attnlab.figures import save_figure


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _traced(fn, inputs: tuple, unit: int) -> str:
    """The live tensors at the forward and backward peaks of one more call (``--trace``), in local units."""
    from attnlab.bench.memtrace import LiveTensors

    for t in inputs:
        t.grad = None
    with LiveTensors() as tracker:
        tracker.exclude(*inputs)
        out_t = fn()
        tracker.phase = "bwd"
        out_t.sum().backward()
    return tracker.report(unit, "u")


def worker(rank: int, world: int, port: int, out: str, T: int, H: int, K: int, D: int, layout: str,
           trace: bool = False) -> None:
    import torch.distributed as dist

    from attnlab.attention.flash import flash_attention
    from attnlab.attention.ring import ring_attention, shard

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, T, D, generator=g)
    k = torch.randn(1, K, T, D, generator=g)
    v = torch.randn(1, K, T, D, generator=g)
    result: dict = {}
    if world == 1:
        ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
        del q, k, v
        flash_attention(ql, kl, vl, causal=True)[0].sum().backward()  # warm-up, as for the ring below
        ql.grad = kl.grad = vl.grad = None
        _reset_peak()
        base = _rss_bytes()
        with Stopwatch() as clock:
            out_t, _ = flash_attention(ql, kl, vl, causal=True)
            out_t.sum().backward()
        result = {"seconds": clock.seconds, "peak_extra": _rss_bytes() - base, "max_err": 0.0}
        if trace:
            result["trace"] = _traced(lambda: flash_attention(ql, kl, vl, causal=True)[0], (ql, kl, vl), ql.numel() * 4)
    else:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        ql, kl, vl = (shard(t, rank, world, layout=layout, dim=2).clone().requires_grad_() for t in (q, k, v))
        del q, k, v
        # warm-up: the first exchange sets up gloo's connections and buffers (a one-time cost, not
        # attention memory); the measured call below is the steady state of a training step
        ring_attention(ql, kl, vl, causal=True, layout=layout, timeout=600).sum().backward()
        ql.grad = kl.grad = vl.grad = None
        _reset_peak()
        base = _rss_bytes()
        with Stopwatch() as clock:
            out_t = ring_attention(ql, kl, vl, causal=True, layout=layout, timeout=600)
            out_t.sum().backward()
        seconds = clock.seconds
        peak = _rss_bytes() - base
        traced = None
        if trace:
            del out_t
            traced = _traced(lambda: ring_attention(ql, kl, vl, causal=True, layout=layout, timeout=600), (ql, kl, vl),
                             ql.numel() * 4)
        # exactness on a short slice of the problem: compare with single-process flash attention
        ref_T = 64 * world
        gq = torch.Generator().manual_seed(1)
        qs, ks, vs = (torch.randn(1, H if i == 0 else K, ref_T, D, generator=gq) for i in range(3))
        ref, _ = flash_attention(qs.double(), ks.double(), vs.double(), causal=True)
        got = ring_attention(*(shard(t, rank, world, layout=layout, dim=2) for t in (qs, ks, vs)), causal=True,
                             layout=layout, timeout=600)
        err = float((got.double() - shard(ref, rank, world, layout=layout, dim=2)).abs().max())
        result = {"seconds": seconds, "peak_extra": peak, "max_err": err}
        if traced is not None:
            result["trace"] = traced
        dist.destroy_process_group()
    atomic_write_text(f"{out}.{rank}.json", json.dumps(result))


def run_world(world: int, T: int, H: int, K: int, D: int, layout: str, trace: bool = False) -> list[dict]:
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "r")
        # glibc serves allocations of >= 64 KiB with their own mappings and returns them on free, so the
        # resident set follows the live tensors: memory freed by the warm-up call is not silently reused
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
        procs = [subprocess.Popen([sys.executable, "-m", "attnlab.bench.ring", "--worker", str(r), str(world),
                                   str(port), out, str(T), str(H), str(K), str(D), layout, str(int(trace))],
                                  env=env)
                 for r in range(world)]
        for p in procs:
            if p.wait() != 0:
                raise RuntimeError(f"a rank of the P={world} run failed (exit code {p.returncode})")
        return [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(world)]


def block_counts(world: int, layout: str) -> list[tuple[int, int]]:
    """(computed, skipped) causal sub-blocks per rank."""
    from attnlab.attention.ring import block_pairs, chunk_ids

    rows = []
    for r in range(world):
        total = sum(len(chunk_ids(r, world, layout)) * len(chunk_ids(s, world, layout)) for s in range(world))
        done = sum(len(block_pairs(r, s, world, layout, True, 2)) for s in range(world))
        rows.append((done, total - done))
    return rows


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--worker":
        a = argv[1:]
        worker(int(a[0]), int(a[1]), int(a[2]), a[3], int(a[4]), int(a[5]), int(a[6]), int(a[7]), a[8], a[9] == "1")
        return 0
    p = parser("attnlab bench ring", "Ring attention on P processes: exactness, per-rank memory, balance.")
    p.add_argument("--seq", type=int, default=16384, help="total sequence length")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--budget-gib", type=float, default=80.0, help="memory per device for the projection")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="write a PNG of per-rank memory vs P")
    p.add_argument("--trace", action="store_true",
                   help="after the measurement, trace one more call: the tensors live at the forward and backward "
                        "peaks of rank 0, in units u of one local (B, H, T/P, D) fp32 tensor")
    args = p.parse_args(argv)
    rows = []
    for world in args.worlds:
        for layout in (["contiguous", "zigzag"] if world > 1 else ["single"]):
            if world > 1 and args.seq % (2 * world):
                raise ValueError(f"--seq {args.seq} must be divisible by {2 * world}")
            print(f"P={world} {layout} ...", flush=True)
            ranks = run_world(world, args.seq, args.heads, args.kv_heads, args.head_dim,
                              "zigzag" if layout == "single" else layout, args.trace)
            if args.trace:
                print(ranks[0]["trace"], flush=True)
            counts = block_counts(world, layout) if world > 1 else [(1, 0)]
            work = [c for c, _ in counts]
            rows.append({"P": world, "layout": layout,
                         "max_err": max(r["max_err"] for r in ranks),
                         "peak_MiB_per_rank": max(r["peak_extra"] for r in ranks) / 2**20,
                         "seconds": max(r["seconds"] for r in ranks),
                         "blocks_computed": "/".join(map(str, work)),
                         "blocks_skipped": "/".join(str(s) for _, s in counts),
                         "imbalance": max(work) / min(work)})
    print(f"machine: {machine()}")
    print(f"total sequence {args.seq}, H={args.heads}, K={args.kv_heads}, D={args.head_dim}, causal, fp32")
    print(markdown_table(rows, ["P", "layout", "max_err", "peak_MiB_per_rank", "seconds", "blocks_computed",
                                "blocks_skipped", "imbalance"]))
    single = next(r for r in rows if r["P"] == 1)["peak_MiB_per_rank"] if 1 in args.worlds else None
    # projection: per-rank attention memory scales with the local length T / P (flash blocks are O(T/P))
    per_token = (min(r["peak_MiB_per_rank"] for r in rows if r["P"] == max(args.worlds)) * 2**20
                 / (args.seq / max(args.worlds)))
    budget = args.budget_gib * 2**30
    print(f"\nprojection (attention activations only, this layer shape): {per_token:,.0f} bytes per local token "
          f"-> with {args.budget_gib:g} GiB per device, one device holds ~{budget / per_token:,.0f} tokens; "
          + ", ".join(f"{n} devices ~{n * budget / per_token:,.0f}" for n in (8, 64, 512)))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for layout in ("contiguous", "zigzag"):
            pts = [(r["P"], r["peak_MiB_per_rank"]) for r in rows if r["layout"] in (layout, "single")]
            ax.plot(*zip(*pts), marker="o", label=layout)
        ax.set_xlabel("processes P")
        ax.set_ylabel("peak extra MiB per rank")
        ax.set_title(f"ring attention, T={args.seq}")
        ax.legend()
        fig.tight_layout()
        save_figure(fig, args.plot, dpi=120)
    write_json(args.json, {"machine": machine(), "rows": rows, "single_MiB": single})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
