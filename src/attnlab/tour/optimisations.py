"""Tour sections for the optimisations: speculative decoding, FlashAttention, ring attention."""

from __future__ import annotations

from pathlib import Path

import torch

from attnlab.atomic import atomic_write_file
from attnlab.bench.clock import Stopwatch
from attnlab.tour.common import pick, plt, save
from attnlab.tour.report import Section
from attnlab.tour.verdict import check, combine, compare, exact


def speculative(out: Path, mode: str, seed: int) -> Section:
    from attnlab import generate, speculative_generate
    from attnlab.bench.speculative import test_prompts
    from attnlab.hub import from_pretrained, load_tokenizer

    s = Section("speculative", "Speculative decoding",
                "A small draft proposes γ tokens and the big model verifies them in one pass: same output, "
                "fewer expensive steps.", "attnlab.generate(..., draft=MODEL | 'prompt_lookup', gamma=γ)")
    target, draft, tok = from_pretrained("default"), from_pretrained("default-draft"), load_tokenizer("default")
    prompts = test_prompts(tok, *pick(mode, tiny=(1, 32), quick=(3, 64), full=(4, 64)))
    n = pick(mode, tiny=8, quick=48, full=128)
    gammas = pick(mode, tiny=[2, 4], quick=[1, 2, 4], full=[1, 2, 3, 4, 6, 8])
    plain_t, spec_t = [], {g: [] for g in gammas}  # per prompt
    stats = {g: [0, 0, 0] for g in gammas}
    identical = True
    for ids in prompts:
        x = torch.tensor([ids])
        generate(target, x, 4)
        with Stopwatch() as clock:
            ref = generate(target, x, n)
        plain_t.append(clock.seconds)
        for g in gammas:
            with Stopwatch() as clock:
                got, st = speculative_generate(target, draft, x, n, gamma=g, return_stats=True)
            spec_t[g].append(clock.seconds)
            identical &= torch.equal(got, ref)
            stats[g][0] += st.accepted
            stats[g][1] += st.proposed
            stats[g][2] += st.target_calls
    rows = [{"gamma": g, "acceptance": stats[g][0] / max(1, stats[g][1]),
             "tokens_per_call": n * len(prompts) / max(1, stats[g][2]), "speedup": sum(plain_t) / sum(spec_t[g])} for g in gammas]
    fig, ax = plt().subplots(figsize=(5, 3.2))
    ax.plot(gammas, [r["speedup"] for r in rows], "o-")
    ax.axhline(1, color="grey", lw=0.8)
    ax.set_xlabel("γ")
    ax.set_ylabel("speed-up over plain greedy")
    s.figure, s.rows = save(fig, out, "speculative.png"), rows
    best = max(rows, key=lambda r: r["speedup"])
    s.measured = (f"greedy decoding of {n} tokens after {len(prompts)} test-split prompts, default target + draft; "
                  f"γ = {gammas}")
    calls_per_token = 1 / best["tokens_per_call"]
    s.judge(combine(
        exact(identical, what="speculative output identical to plain greedy for every prompt and γ"),
        check(calls_per_token, below=0.9, refuted_at=1.0, what=f"target calls per token at γ={best['gamma']}"),
        compare([p / q for p, q in zip(plain_t, spec_t[best["gamma"]])], [1.0], claim="greater", threshold=0.05,
                names=(f"speed-up at γ={best['gamma']}", "1x"), over="prompts")))
    s.because += f"; acceptance {best['acceptance']:.2f}"
    return s


def flash(out: Path, mode: str, seed: int) -> Section:
    import json

    from attnlab.bench.attention import main as bench_attention

    s = Section("flash", "FlashAttention: tiled, online softmax, O(N) memory",
                "Computing attention tile by tile with a running max and sum never materialises the T x T "
                "scores: memory grows linearly with T, results are exact.",
                "ModelConfig.attention_kernel = 'flash' (or attnlab.attention.flash_attention)")
    seqs = pick(mode, tiny=["384"], quick=["256", "512", "1024"], full=["512", "1024", "2048", "4096"])
    bench_attention(["--seq", *seqs, "--dtypes", "fp32", "--configs", "mha", "--causal", "yes", "--min-time",
                     pick(mode, tiny="0.02", quick="0.2", full="0.2"), "--max-repeats", pick(mode, tiny="1", quick="2",
                                                                                           full="2"),
                     "--out", str(out / "flash")])
    rows = json.loads((out / "flash" / "attention.json").read_text())["rows"]
    figure = (out / "flash" / "attention.png").read_bytes()
    atomic_write_file(out / "flash.png", lambda tmp: tmp.write_bytes(figure))
    table = [{"T": r["T"], "kernel": r["kernel"], "fwdbwd_s": r["fwdbwd_s"],
              "fwdbwd_MiB": (r["fwdbwd_mem_bytes"] or 0) / 2**20} for r in rows]
    s.figure, s.rows = "flash.png", table
    T = max(r["T"] for r in rows)
    mem = {r["kernel"]: r["fwdbwd_mem_bytes"] for r in rows if r["T"] == T}
    ratio = mem["flash"] / mem["naive"] if mem.get("naive") and mem.get("flash") else float("nan")
    s.measured = "forward+backward time and peak extra memory (process RSS) for naive, PyTorch sdpa and flash"
    s.judge(check(ratio, below=0.5, refuted_at=1.0, what=f"flash / naive peak fwd+bwd memory at T={T}"))
    s.because += " (outputs equal the naive kernel's, tested to 1e-5 in tests/attention)"
    return s


def ring(out: Path, mode: str, seed: int) -> Section:
    from attnlab.bench.ring import run_world

    s = Section("ring", "Ring attention across processes",
                "Sharding the sequence over P processes and passing K/V around a ring computes exact attention "
                "with per-process memory ~1/P.", "ModelConfig.attention_kernel = 'ring'; attnlab.attention.ring_attention")
    T, P = pick(mode, tiny=(512, 2), quick=(8192, 4), full=(16384, 4))
    rows = []
    for world in (1, P):
        ranks = run_world(world, T, 8, 8, 64, "zigzag")
        rows.append({"P": world, "max_err": max(r["max_err"] for r in ranks),
                     "peak_MiB_per_rank": max(r["peak_extra"] for r in ranks) / 2**20,
                     "seconds": max(r["seconds"] for r in ranks)})
    fig, ax = plt().subplots(figsize=(4.5, 3))
    ax.bar([f"P={r['P']}" for r in rows], [r["peak_MiB_per_rank"] for r in rows])
    ax.set_ylabel("peak extra MiB per process")
    s.figure, s.rows = save(fig, out, "ring.png"), rows
    ratio = rows[1]["peak_MiB_per_rank"] / max(rows[0]["peak_MiB_per_rank"], 1e-9)
    s.measured = f"causal attention fwd+bwd over T={T} on 1 and {P} gloo processes (zigzag layout)"
    s.judge(combine(
        exact(rows[1]["max_err"] < 1e-5, what=f"{P}-process result within 1e-5 of the float64 reference",
              detail=f"max error {rows[1]['max_err']:.1e}"),
        check(ratio, below=1.5 / P, refuted_at=1.0,
              what=f"per-process peak memory with {P} processes / with one (ideal {1 / P:.2f})")))
    if ratio >= 1.5 / P:
        s.because += ("; at this length the buffers each rank keeps (K/V in flight, travelling dK/dV, gradient "
                      "blocks) weigh about as much as its share of the activations")
    return s
