"""Tour sections for the optimisations: speculative decoding, FlashAttention, ring attention."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from attnlab.tour.basics import _plt, _save
from attnlab.tour.report import Section


def speculative(out: Path, quick: bool, seed: int) -> Section:
    from attnlab import generate, speculative_generate
    from attnlab.bench.speculative import test_prompts
    from attnlab.hub import from_pretrained, load_tokenizer

    s = Section("speculative", "Speculative decoding",
                "A small draft proposes γ tokens and the big model verifies them in one pass: same output, "
                "fewer expensive steps.", "attnlab.generate(..., draft=MODEL | 'prompt_lookup', gamma=γ)")
    target, draft, tok = from_pretrained("default"), from_pretrained("default-draft"), load_tokenizer("default")
    prompts = test_prompts(tok, 2 if quick else 4, 64)
    n = 48 if quick else 128
    gammas = [1, 2, 4] if quick else [1, 2, 3, 4, 6, 8]
    plain_t, spec_t = 0.0, {g: 0.0 for g in gammas}
    stats = {g: [0, 0, 0] for g in gammas}
    identical = True
    for ids in prompts:
        x = torch.tensor([ids])
        generate(target, x, 4)
        start = time.perf_counter()
        ref = generate(target, x, n)
        plain_t += time.perf_counter() - start
        for g in gammas:
            start = time.perf_counter()
            got, st = speculative_generate(target, draft, x, n, gamma=g, return_stats=True)
            spec_t[g] += time.perf_counter() - start
            identical &= torch.equal(got, ref)
            stats[g][0] += st.accepted
            stats[g][1] += st.proposed
            stats[g][2] += st.target_calls
    rows = [{"gamma": g, "acceptance": stats[g][0] / max(1, stats[g][1]),
             "tokens_per_call": n * len(prompts) / max(1, stats[g][2]), "speedup": plain_t / spec_t[g]} for g in gammas]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(gammas, [r["speedup"] for r in rows], "o-")
    ax.axhline(1, color="grey", lw=0.8)
    ax.set_xlabel("γ")
    ax.set_ylabel("speed-up over plain greedy")
    s.figure, s.rows = _save(fig, out, "speculative.png"), rows
    best = max(rows, key=lambda r: r["speedup"])
    s.measured = f"greedy decoding of {n} tokens after {len(prompts)} test-split prompts, default target + draft"
    s.verdict = "refuted" if not identical else ("confirmed" if best["speedup"] > 1.0 else "depends")
    s.because = (f"outputs identical to plain greedy: {identical}; best speed-up {best['speedup']:.2f}x at γ={best['gamma']} "
                 f"(acceptance {best['acceptance']:.2f})")
    return s


def flash(out: Path, quick: bool, seed: int) -> Section:
    import json

    from attnlab.bench.attention import main as bench_attention

    s = Section("flash", "FlashAttention: tiled, online softmax, O(N) memory",
                "Computing attention tile by tile with a running max and sum never materialises the T x T "
                "scores: memory grows linearly with T, results are exact.",
                "ModelConfig.attention_kernel = 'flash' (or attnlab.attention.flash_attention)")
    seqs = ["256", "512", "1024"] if quick else ["512", "1024", "2048", "4096"]
    bench_attention(["--seq", *seqs, "--dtypes", "fp32", "--configs", "mha", "--causal", "yes", "--min-time", "0.2",
                     "--max-repeats", "2", "--out", str(out / "flash")])
    rows = json.loads((out / "flash" / "attention.json").read_text())["rows"]
    (out / "flash.png").write_bytes((out / "flash" / "attention.png").read_bytes())
    table = [{"T": r["T"], "kernel": r["kernel"], "fwdbwd_s": r["fwdbwd_s"],
              "fwdbwd_MiB": (r["fwdbwd_mem_bytes"] or 0) / 2**20} for r in rows]
    s.figure, s.rows = "flash.png", table
    T = max(r["T"] for r in rows)
    mem = {r["kernel"]: r["fwdbwd_mem_bytes"] for r in rows if r["T"] == T}
    ratio = mem["flash"] / mem["naive"] if mem.get("naive") and mem.get("flash") else float("nan")
    s.measured = "forward+backward time and peak extra memory (process RSS) for naive, PyTorch sdpa and flash"
    s.verdict = "confirmed" if ratio < 0.5 else "depends"
    s.because = f"at T={T} flash needs {ratio:.2f}x the memory of the naive kernel (same outputs, tested to 1e-5)"
    return s


def ring(out: Path, quick: bool, seed: int) -> Section:
    from attnlab.bench.ring import run_world

    s = Section("ring", "Ring attention across processes",
                "Sharding the sequence over P processes and passing K/V around a ring computes exact attention "
                "with per-process memory ~1/P.", "ModelConfig.attention_kernel = 'ring'; attnlab.attention.ring_attention")
    T = 8192 if quick else 16384
    rows = []
    for world in (1, 4):
        ranks = run_world(world, T, 8, 8, 64, "zigzag")
        rows.append({"P": world, "max_err": max(r["max_err"] for r in ranks),
                     "peak_MiB_per_rank": max(r["peak_extra"] for r in ranks) / 2**20,
                     "seconds": max(r["seconds"] for r in ranks)})
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.bar([f"P={r['P']}" for r in rows], [r["peak_MiB_per_rank"] for r in rows])
    ax.set_ylabel("peak extra MiB per process")
    s.figure, s.rows = _save(fig, out, "ring.png"), rows
    ratio = rows[1]["peak_MiB_per_rank"] / max(rows[0]["peak_MiB_per_rank"], 1e-9)
    s.measured = f"causal attention fwd+bwd over T={T} on 1 and 4 gloo processes (zigzag layout)"
    exact = rows[1]["max_err"] < 1e-5
    s.verdict = "confirmed" if exact and ratio <= 1.5 / 4 else ("depends" if exact else "refuted")
    s.because = (f"4 processes: max error {rows[1]['max_err']:.1e}; per-process memory {ratio:.2f}x of one process "
                 f"(ideal 0.25x)")
    if exact and ratio > 1.5 / 4:
        s.because += ("; at this length the buffers each rank keeps (K/V in flight, travelling dK/dV, gradient "
                      "blocks) weigh about as much as its share of the activations")
    return s
