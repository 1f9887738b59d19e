"""Tour section: RWKV — attention rewritten as a recurrence: constant state, flat per-token cost."""

from __future__ import annotations

from pathlib import Path

from attnlab.tour.common import pick, plt, save
from attnlab.tour.report import Section
from attnlab.tour.verdict import Verdict, check, combine, exact


def time_growth_verdict(t_rwkv: float, t_tf: float, lo: int, hi: int) -> Verdict:
    """RWKV's per-token time must grow less than the Transformer's; judged only when the Transformer's grew
    measurably (x1.15 or more), since on a busy machine both can move by that much either way."""
    v = check(t_rwkv / t_tf, below=1 / 1.15, refuted_at=1.0,
              what=f"RWKV's per-token time growth ({lo} -> {hi} tokens) / the Transformer's")
    if t_tf < 1.15:
        return Verdict("inconclusive", v.rule + ", judged only if the Transformer's grows x1.15 or more",
                       v.detail + f"; the Transformer's per-token time grew only x{t_tf:.2f}")
    return v


def rwkv(out: Path, mode: str, seed: int) -> Section:
    from attnlab.bench.rwkv import draw, run

    s = Section("rwkv", "RWKV: attention as a recurrence",
                "Rewriting attention as a decaying weighted sum (the WKV recurrence) gives linear-time "
                "training and a constant-size state: the cost of a new token does not grow with the context, "
                "while a Transformer's KV cache and per-token time do.",
                "ModelConfig.family = 'rwkv' (rwkv_version=4); the state is the family's cache")
    contexts = pick(mode, tiny=[64, 512], quick=[256, 1024, 4096], full=[1024, 4096, 16384, 32768])
    rows = run(contexts, new_tokens=pick(mode, tiny=2, quick=8, full=16), repeats=pick(mode, tiny=1, quick=1, full=2),
               log=lambda *_: None)
    fig, (a, b) = plt().subplots(1, 2, figsize=(8, 3))
    draw(rows, a, b)
    fig.tight_layout()
    s.figure, s.rows = save(fig, out, "rwkv.png"), rows
    r = {(x["model"], x["context"]): x for x in rows}
    lo, hi = contexts[0], contexts[-1]
    state_flat = r["rwkv", lo]["cache_bytes"] == r["rwkv", hi]["cache_bytes"]
    kv_grows = r["transformer", hi]["cache_bytes"] == r["transformer", lo]["cache_bytes"] * hi // lo
    t_rwkv = r["rwkv", hi]["ms_per_token"] / r["rwkv", lo]["ms_per_token"]
    t_tf = r["transformer", hi]["ms_per_token"] / r["transformer", lo]["ms_per_token"]
    s.measured = (f"greedy decode ms/token after {lo}..{hi} tokens of context, RWKV-4 vs the default target's "
                  f"shape (similar parameter count), models interleaved; allocated cache/state bytes")
    s.judge(combine(
        exact(state_flat and kv_grows, what=f"RWKV state bytes equal at {lo} and {hi} tokens and the KV cache "
              f"{hi // lo}x larger", detail=f"RWKV state {r['rwkv', hi]['cache_bytes']:,} B at both; KV cache "
              f"{r['transformer', lo]['cache_bytes'] / 2**20:.1f} -> {r['transformer', hi]['cache_bytes'] / 2**20:.1f} MiB"),
        time_growth_verdict(t_rwkv, t_tf, lo, hi)))
    s.because += f" (RWKV x{t_rwkv:.2f}, Transformer x{t_tf:.2f})"
    return s
