"""Tour section: fast CPU decoding — what fused projections, bf16 and int8 weights buy and cost."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from attnlab.bench.clock import Stopwatch
from attnlab.tour.common import pick, plt, save
from attnlab.tour.report import Section
from attnlab.tour.verdict import check, combine, compare, exact


def fast_decode(out: Path, mode: str, seed: int) -> Section:
    from attnlab import generate
    from attnlab.bench.precision import evaluate, test_windows
    from attnlab.hub import from_pretrained
    from attnlab.inference.fast import prepare_for_decode, weight_bytes

    s = Section("fast", "Fast CPU decoding: fewer weight bytes per token",
                "Decoding one token reads every weight once, so its speed follows the bytes read: fusing "
                "projections, bf16 and int8 weights make it faster at a small, measurable quality cost.",
                "attnlab.prepare_for_decode(model, precision='fp32' | 'bf16' | 'int8'); attnlab generate --dtype")
    base = from_pretrained("default").eval()
    prompt = torch.randint(0, base.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(seed))
    n, repeats = pick(mode, tiny=(8, 2), quick=(48, 3), full=(128, 5))
    windows = test_windows("default", *pick(mode, tiny=(64, 2, 30), quick=(128, 8, 300), full=(256, 32, None)))
    variants = [("reference fp32", base)] + [(f"prepared {p}", prepare_for_decode(copy.deepcopy(base), precision=p))
                                             for p in ("fp32", "bf16", "int8")]
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    for _name, model in variants:
        generate(model, prompt, 4)  # warm-up
    for _ in range(repeats):  # the variants take turns, so machine load hits them alike
        for name, model in variants:
            with Stopwatch() as clock:
                generate(model, prompt, n)
            times[name].append(clock.seconds)
    ref_tokens, ref_top, rows = None, None, []
    for name, model in variants:
        tokens = generate(model, prompt, n)
        nats, agree, top = evaluate(model, windows, ref_top, name)
        ref_tokens = tokens if ref_tokens is None else ref_tokens
        ref_top = top if ref_top is None else ref_top
        rows.append({"variant": name, "weight_MB": weight_bytes(model) / 1e6, "tok_per_s": n / min(times[name]),
                     "same_greedy_tokens": bool(torch.equal(tokens, ref_tokens)), "test_nats": nats,
                     "argmax_agree": agree})
    for r in rows:
        r["speedup"] = r["tok_per_s"] / rows[0]["tok_per_s"]
    fig, ax = plt().subplots(figsize=(5.5, 3.2))
    ax.bar([r["variant"].replace("prepared ", "") for r in rows], [r["tok_per_s"] for r in rows])
    ax.set_ylabel("greedy decode tokens/s")
    ax.set_title("default target, batch 1")
    s.figure, s.rows = save(fig, out, "fast_decode.png"), rows
    s.measured = (f"greedy decoding of {n} tokens ({repeats} rounds, variants interleaved) and test-split "
                  f"cross-entropy on {len(windows)} windows of held-out files")
    fp32, int8 = rows[1], rows[3]
    dq = (int8["test_nats"] - rows[0]["test_nats"]) / rows[0]["test_nats"]
    speedups = [a / b for a, b in zip(times["reference fp32"], times["prepared int8"])]  # per round
    s.judge(combine(
        exact(fp32["same_greedy_tokens"] and fp32["argmax_agree"] >= 0.999,
              what="fused fp32 gives the reference's greedy tokens and >= 99.9% of its argmaxes",
              detail=f"fused fp32 same tokens {fp32['same_greedy_tokens']}, argmax agreement {fp32['argmax_agree']:.4f}"),
        compare(speedups, [1.0], claim="greater", threshold=0.05, names=("int8 speed-up", "1x"),
                over="interleaved rounds"),
        check(abs(dq), below=0.02, refuted_at=0.05, what="int8 relative test-loss change |Δ|")))
    s.because += (f"; bf16 {rows[2]['speedup']:.2f}x; int8 {int8['weight_MB']:.1f} MB of weights instead of "
                  f"{rows[0]['weight_MB']:.1f}")
    return s
