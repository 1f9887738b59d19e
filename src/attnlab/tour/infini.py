"""Tour section: Infini-attention — bounded memory for unbounded input, and what it retrieves from far back."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from attnlab.tour.basics import _plt, _save
from attnlab.tour.report import Section


def _memory_rows(quick: bool, seed: int) -> list[dict]:
    from attnlab import ModelConfig, build_model

    torch.manual_seed(seed)
    base = dict(vocab_size=256, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=1 << 17)
    inf = build_model(ModelConfig(**base, attention_mechanism="infini", segment_len=256)).eval()
    std = build_model(ModelConfig(**base)).eval()
    rows = []
    with torch.no_grad():
        for n in ([1024, 4096, 16384] if quick else [1024, 4096, 16384, 65536]):
            state = inf.new_cache(1)
            start = time.perf_counter()
            for _ in range(0, n, 512):
                inf(torch.randint(0, 256, (1, 512)), cache=state)
            rows.append({"tokens": n, "infini_state_MiB": state.nbytes() / 2**20,
                         "kv_cache_MiB": std.new_cache(1, n).nbytes() / 2**20,
                         "infini_tok_per_s": n / (time.perf_counter() - start)})
    return rows


def _passkey_rows(quick: bool, seed: int) -> tuple[list[dict], object]:
    from attnlab.bench.infini import Settings, evaluate, train

    s = (Settings(train_len=64, segment_len=16, d_model=32, steps=30, baseline_steps=10, batch=8, warmup=3,
                  eval_examples=8, multiples=[1, 4], seed=seed) if quick else
         Settings(train_len=256, segment_len=32, d_model=64, n_layers=3, steps=3000, baseline_steps=1000, batch=16,
                  lr=3e-3, warmup=100, eval_examples=32, multiples=[1, 4, 16], seed=seed))
    with tempfile.TemporaryDirectory() as tmp:  # fresh runs: the same seed gives the same models
        models = {name: train(s, name, Path(tmp) / name, None)[0] for name in ("infini", "softmax")}
    return evaluate(models, s), s


def infini(out: Path, quick: bool, seed: int) -> Section:
    s = Section("infini", "Infini-attention: bounded memory for unbounded input",
                "Segment-local attention plus a compressive memory keeps the state constant however long the "
                "input, and can still recall what it saw segments ago; a standard KV cache grows linearly.",
                "ModelConfig.attention_mechanism = 'infini', segment_len, memory_update")
    memory = _memory_rows(quick, seed)
    passkey, settings = _passkey_rows(quick, seed)
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.loglog([r["tokens"] for r in memory], [r["infini_state_MiB"] for r in memory], "o-", label="Infini state")
    a.loglog([r["tokens"] for r in memory], [r["kv_cache_MiB"] for r in memory], "s-", label="KV cache")
    a.set_xlabel("tokens streamed")
    a.set_ylabel("MiB")
    a.legend()
    b.plot([r["multiple"] for r in passkey], [r["infini_acc"] for r in passkey], "o-", label="Infini (streamed)")
    b.plot([r["multiple"] for r in passkey], [r["softmax_acc"] for r in passkey], "s-", label="softmax, window")
    b.set_xscale("log", base=2)
    b.set_xlabel(f"input length / training length ({settings.train_len})")
    b.set_ylabel("passkey retrieval")
    b.set_ylim(-0.05, 1.05)
    b.legend()
    fig.tight_layout()
    s.figure = _save(fig, out, "infini.png")
    s.rows = memory + passkey
    flat = memory[0]["infini_state_MiB"] == memory[-1]["infini_state_MiB"]
    far = passkey[-1]
    recalls = far["infini_acc"] >= 0.9 and far["infini_acc"] > far["softmax_acc"] + 0.2
    s.measured = (f"allocated state bytes after streaming N tokens vs a softmax model's KV cache; passkey retrieval "
                  f"of a small Infini model and a same-size windowed softmax model, each trained here for "
                  f"{settings.steps} / {settings.baseline_steps} steps at {settings.train_len} tokens")
    s.verdict = "refuted" if not flat else ("confirmed" if recalls else "depends")
    s.because = (f"state {memory[0]['infini_state_MiB']:.2f} MiB at {memory[0]['tokens']} and "
                 f"{memory[-1]['infini_state_MiB']:.2f} MiB at {memory[-1]['tokens']} tokens (KV cache "
                 f"{memory[0]['kv_cache_MiB']:.1f} -> {memory[-1]['kv_cache_MiB']:.1f} MiB); passkey at "
                 f"{far['multiple']}x the training length: Infini {far['infini_acc']:.0%}, windowed softmax "
                 f"{far['softmax_acc']:.0%}" + ("" if recalls else " — recall far beyond the training length is not "
                                                 "shown at this training budget"))
    return s
