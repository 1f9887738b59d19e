"""Tour section: RWKV — attention rewritten as a recurrence: constant state, flat per-token cost."""

from __future__ import annotations

from pathlib import Path

from attnlab.tour.basics import _plt, _save
from attnlab.tour.report import Section


def rwkv(out: Path, quick: bool, seed: int) -> Section:
    from attnlab.bench.rwkv import draw, run

    s = Section("rwkv", "RWKV: attention as a recurrence",
                "Rewriting attention as a decaying weighted sum (the WKV recurrence) gives linear-time "
                "training and a constant-size state: the cost of a new token does not grow with the context, "
                "while a Transformer's KV cache and per-token time do.",
                "ModelConfig.family = 'rwkv' (rwkv_version=4); the state is the family's cache")
    contexts = [256, 1024, 4096] if quick else [1024, 4096, 16384, 32768]
    rows = run(contexts, new_tokens=8 if quick else 16, repeats=1 if quick else 2, log=lambda *_: None)
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3))
    draw(rows, a, b)
    fig.tight_layout()
    s.figure, s.rows = _save(fig, out, "rwkv.png"), rows
    r = {(x["model"], x["context"]): x for x in rows}
    lo, hi = contexts[0], contexts[-1]
    state_flat = r["rwkv", lo]["cache_bytes"] == r["rwkv", hi]["cache_bytes"]
    kv_grows = r["transformer", hi]["cache_bytes"] == r["transformer", lo]["cache_bytes"] * hi // lo
    t_rwkv = r["rwkv", hi]["ms_per_token"] / r["rwkv", lo]["ms_per_token"]
    t_tf = r["transformer", hi]["ms_per_token"] / r["transformer", lo]["ms_per_token"]
    s.measured = (f"greedy decode ms/token after {lo}..{hi} tokens of context, RWKV-4 vs the default target's "
                  f"shape (similar parameter count), models interleaved; allocated cache/state bytes")
    s.verdict = ("confirmed" if state_flat and kv_grows and t_rwkv < 1.15 < t_tf else
                 "depends" if state_flat and kv_grows else "refuted")
    s.because = (f"from {lo} to {hi} tokens: RWKV state {r['rwkv', hi]['cache_bytes']:,} B at both, per-token time "
                 f"x{t_rwkv:.2f}; Transformer KV cache {r['transformer', lo]['cache_bytes'] / 2**20:.1f} -> "
                 f"{r['transformer', hi]['cache_bytes'] / 2**20:.1f} MiB, per-token time x{t_tf:.2f}")
    return s
