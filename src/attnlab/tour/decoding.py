"""Tour section: fast CPU decoding — what fused projections, bf16 and int8 weights buy and cost."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from attnlab.tour.basics import _plt, _save
from attnlab.tour.report import Section


def fast_decode(out: Path, quick: bool, seed: int) -> Section:
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
    n, repeats = (48, 2) if quick else (128, 3)
    windows = test_windows("default", 128 if quick else 256, 8 if quick else 32, 300 if quick else None)
    variants = [("reference fp32", base)] + [(f"prepared {p}", prepare_for_decode(copy.deepcopy(base), precision=p))
                                             for p in ("fp32", "bf16", "int8")]
    ref_tokens, ref_top, rows = None, None, []
    best = {name: float("inf") for name, _ in variants}
    for _name, model in variants:
        generate(model, prompt, 4)  # warm-up
    for _ in range(repeats):  # the variants take turns, so machine load hits them alike
        for name, model in variants:
            start = time.perf_counter()
            generate(model, prompt, n)
            best[name] = min(best[name], time.perf_counter() - start)
    for name, model in variants:
        tokens = generate(model, prompt, n)
        nats, agree, top = evaluate(model, windows, ref_top, name)
        ref_tokens = tokens if ref_tokens is None else ref_tokens
        ref_top = top if ref_top is None else ref_top
        rows.append({"variant": name, "weight_MB": weight_bytes(model) / 1e6, "tok_per_s": n / best[name],
                     "same_greedy_tokens": bool(torch.equal(tokens, ref_tokens)), "test_nats": nats,
                     "argmax_agree": agree})
    for r in rows:
        r["speedup"] = r["tok_per_s"] / rows[0]["tok_per_s"]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.bar([r["variant"].replace("prepared ", "") for r in rows], [r["tok_per_s"] for r in rows])
    ax.set_ylabel("greedy decode tokens/s")
    ax.set_title("default target, batch 1")
    s.figure, s.rows = _save(fig, out, "fast_decode.png"), rows
    s.measured = (f"greedy decoding of {n} tokens (best of {repeats}, variants interleaved) and test-split "
                  f"cross-entropy on {len(windows)} windows of held-out files")
    fp32, int8 = rows[1], rows[3]
    dq = int8["test_nats"] - rows[0]["test_nats"]
    exact = fp32["same_greedy_tokens"] and fp32["argmax_agree"] >= 0.999  # fusion changes only float rounding
    s.verdict = ("refuted" if not exact else
                 "confirmed" if int8["speedup"] > 1.0 and abs(dq) < 0.02 * rows[0]["test_nats"] else "depends")
    s.because = (f"fused fp32 is exact ({fp32['speedup']:.2f}x); bf16 {rows[2]['speedup']:.2f}x; int8 "
                 f"{int8['speedup']:.2f}x with {int8['weight_MB']:.1f} MB of weights instead of "
                 f"{rows[0]['weight_MB']:.1f}, test loss {dq:+.4f} nats/token")
    return s
