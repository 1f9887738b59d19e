"""``attnlab bench infini``: passkey retrieval beyond the training length, and streaming memory.

Two decoders of the same size are trained with the ordinary ``Trainer`` on passkey examples
(``attnlab.tasks.passkey``) of ``train_len`` tokens: an Infini-attention model (Munkhdalai et al. 2024;
segments of ``segment_len`` tokens, a compressive memory between them) and a standard softmax-attention
model whose context is the training length. Then:

- retrieval accuracy at 1x, 4x, 16x, 64x the training length, on the same examples for both: the Infini
  model streams the whole prompt through its ``InfiniState`` (``generate``); the baseline sees only the last
  ``train_len`` tokens (its window). For the baseline the share of examples whose passkey lies inside that
  window is printed too: it is all a windowed model can hope to answer;
- memory of streaming inference: up to 1M tokens fed in chunks through the Infini model's state, each length
  in a fresh process so that the peak resident set (VmHWM) of one cannot hide in another's; the state's
  ``nbytes()`` and the KV cache a softmax model of the same shape would need are recorded alongside.

Shape legend: B batch, T tokens, N streamed tokens, C chunk.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from attnlab.atomic import atomic_write_text
from attnlab.bench.clock import Stopwatch
from attnlab.bench.common import (
    machine,
    markdown_table,
    peak_rss_bytes,
    reset_peak_rss,
    write_json,
)
from attnlab.commands.args import parser
from attnlab.figures import save_figure

MODELS = ("infini", "softmax")


@dataclass
class Settings:
    train_len: int = 512
    segment_len: int = 64
    memory_update: str = "delta"
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    steps: int = 12000  # Infini model (3,000 steps reached only ~20% retrieval at 1x)
    baseline_steps: int = 5000  # softmax model (1,500 steps left it at 40% retrieval inside its window)
    batch: int = 16
    lr: float = 2e-3
    warmup: int = 100
    eval_examples: int = 100
    multiples: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    stream_lengths: list[int] = field(default_factory=lambda: [8192, 32768, 131072, 524288, 1048576])
    chunk: int = 4096
    stream_repeats: int = 3  # fresh processes per streamed length (median)
    seed: int = 0


def full_settings() -> Settings:
    return Settings()


def quick_settings() -> Settings:
    return Settings(train_len=64, segment_len=16, d_model=32, steps=6, baseline_steps=4, batch=4, warmup=2,
                    eval_examples=4, multiples=[1, 4], stream_lengths=[2048, 8192], chunk=1024,
                    stream_repeats=1)


def model_config(s: Settings, mechanism: str):
    from attnlab import ModelConfig
    from attnlab.tasks.passkey import VOCAB_SIZE

    infini = dict(attention_mechanism="infini", segment_len=s.segment_len, memory_update=s.memory_update)
    return ModelConfig(vocab_size=VOCAB_SIZE, d_model=s.d_model, n_layers=s.n_layers, n_heads=s.n_heads,
                       n_kv_heads=s.n_heads, head_dim=s.d_model // s.n_heads, d_ff=4 * s.d_model, position="rope",
                       max_seq_len=s.train_len, attention_kernel="sdpa", tie_embeddings=False,
                       **(infini if mechanism == "infini" else {}))


def train(s: Settings, mechanism: str, out: Path, max_minutes: float | None) -> tuple[torch.nn.Module, dict]:
    """Train (or finish training, or reuse) the ``mechanism`` model in ``out`` with the ordinary Trainer."""
    from attnlab import build_model
    from attnlab.tasks.passkey import PasskeyTask
    from attnlab.training.trainer import TrainConfig, Trainer, read_metrics

    torch.manual_seed(s.seed)
    model = build_model(model_config(s, mechanism))
    L = s.train_len
    # a mixture of lengths: short examples teach reading the answer out, full-length ones carrying it far
    task = PasskeyTask(L, lengths=(L // 4, L // 2, L, L), eval_examples=32, seed=s.seed + 777)
    steps = s.steps if mechanism == "infini" else s.baseline_steps
    tcfg = TrainConfig(steps=steps, batch_size=s.batch, lr=s.lr, warmup=s.warmup, weight_decay=0.0,
                       eval_every=max(1, min(250, steps)), eval_windows=32, log_every=max(1, min(25, steps)),
                       save_every=max(1, min(250, steps)), seed=s.seed,
                       max_time=None if max_minutes is None else 60 * max_minutes)
    trainer = Trainer(model, task, tcfg, out, verbose=True)
    resumed = bool(trainer.checkpoint_dirs())
    print(f"{mechanism}: {sum(p.numel() for p in model.parameters()):,} parameters, {steps} steps of "
          f"{s.batch} examples" + (f" (resuming {out})" if resumed else ""), file=sys.stderr, flush=True)
    result = trainer.fit(resume=resumed)
    records = read_metrics(out) or trainer.history  # the whole run, also when an earlier invocation trained it
    evals = [r for r in records if r.get("split") == "validation"]
    seconds = max([r["elapsed_s"] for r in records if "elapsed_s" in r], default=result["seconds"])
    return model.eval(), {"model": mechanism, "steps": result["step"], "seconds": seconds,
                          "resumed": resumed, "parameters": sum(p.numel() for p in model.parameters()),
                          "final_val_loss": evals[-1]["loss"] if evals else None,
                          "final_val_retrieval": evals[-1].get("retrieval") if evals else None}


def key_in_window(length: int, n: int, seed: int, window: int, n_digits: int = 5) -> float:
    """Share of the evaluation examples (same seed as ``retrieval_accuracy``) whose passkey lies wholly within
    the last ``window`` tokens of the prompt."""
    from attnlab.tasks.passkey import KEY, make_example

    gen = torch.Generator().manual_seed(seed)
    inside = 0
    for _ in range(n):
        seq, _ = make_example(length, gen, n_digits)
        prompt_len = length - n_digits
        inside += prompt_len - seq.index(KEY) <= window - n_digits - 1  # the window's first token becomes <bos>
    return inside / n


@torch.inference_mode()
def key_share(model: torch.nn.Module, length: int, n: int, seed: int, n_digits: int = 5) -> list[float]:
    """Per layer, the passkey block's share of the normaliser of the memory read that predicts the first
    answer digit: Σ_{t in block} σ(q)·σ(k_t) / σ(q)·z, for the head that weights the block most, averaged over
    the examples whose block lies in memory (not in the last, still local segment). It is the weight the
    passkey's values get in that read-out; z counts every token written, so unless the query ignores every
    other key exactly, the share falls as the stream grows."""
    from unittest import mock

    import attnlab.attention.infini as infini
    from attnlab.tasks.passkey import KEY, make_example

    L, n_layers = model.config.segment_len, model.config.n_layers
    write, read = infini.memory_write, infini.memory_read
    gen = torch.Generator().manual_seed(seed)
    shares: list[list[float]] = []
    keys: list[torch.Tensor] = []  # σ(k) of each segment written, in call order (layer by layer)
    queries: list[torch.Tensor] = []  # σ(q) of each segment's last query, in call order

    def traced_write(M, z, k, v, rule):
        keys.append(infini.sigma(k))  # (1, K, L, D)
        return write(M, z, k, v, rule)

    def traced_read(q, M, z):
        queries.append(infini.sigma(q[..., -1:, :]))  # (1, K, G, 1, D)
        return read(q, M, z)

    for _ in range(n):
        seq, _ = make_example(length, gen, n_digits)
        prompt = seq[:-n_digits]
        T, start = len(prompt), seq.index(KEY)
        block = torch.arange(start, start + n_digits + 2)
        if int(block[-1]) >= (T // L) * L:
            continue  # the block is still in the local segment: memory is not involved
        keys.clear()
        queries.clear()
        with mock.patch.object(infini, "memory_write", traced_write), mock.patch.object(infini, "memory_read", traced_read):
            model(torch.tensor([prompt]))
        nw, nr = T // L, -(-T // L)  # complete segments written, segments read, per layer
        row = []
        for layer in range(n_layers):
            sk = torch.cat(keys[layer * nw:(layer + 1) * nw], dim=2)[:, :, None]  # (1, K, 1, nw*L, D)
            sq = queries[(layer + 1) * nr - 1]  # (1, K, G, 1, D)
            weights = (sq * sk).sum(-1)  # (1, K, G, nw*L): σ(q)·σ(k_t)
            row.append(float((weights[..., block].sum(-1) / weights.sum(-1)).max()))
        shares.append(row)
    return [sum(r[i] for r in shares) / len(shares) for i in range(n_layers)] if shares else [float("nan")] * n_layers


def evaluate(models: dict[str, torch.nn.Module], s: Settings) -> list[dict]:
    from attnlab.tasks.passkey import retrieval_accuracy

    rows = []
    for k in s.multiples:
        length = k * s.train_len
        seed = 1000 + k  # the same examples for both models
        batch = max(1, min(16, 2**18 // length))
        row = {"multiple": k, "tokens": length}
        for name, model in models.items():
            window = s.train_len if name == "softmax" else None
            with Stopwatch() as clock:
                row[f"{name}_acc"] = retrieval_accuracy(model, length, s.eval_examples, seed=seed, window=window,
                                                        batch_size=batch)
            row[f"{name}_s"] = clock.seconds
            print(f"{k}x ({length} tokens) {name}: {row[f'{name}_acc']:.0%}", file=sys.stderr, flush=True)
        row["key_in_window"] = key_in_window(length, s.eval_examples, seed, s.train_len)
        share = key_share(models["infini"], length, min(s.eval_examples, 20), seed)
        row["key_share"] = " / ".join(f"{x:.2g}" for x in share)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------- streaming memory

def rss_bytes() -> int:
    """This process's current resident set (VmRSS)."""
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def stream_worker(model_dir: str, n_tokens: int, chunk: int, out: str) -> None:
    """In a fresh process: stream ``n_tokens`` of passkey filler through the model's state in chunks, and
    record the memory *above the warmed-up process* (after one chunk has run: allocator arenas, lazy init
    and the libraries' own pages are then in place and are not the stream's):

    - ``chunk_peak``: per chunk, the peak resident set while it ran minus the warmed-up resident set (the
      chunk's activations, plus whatever earlier chunks left behind); the median over chunks is reported;
    - ``retained``: the resident set after the last chunk minus the warmed-up one (what the stream keeps);
    - ``peak_extra``: the largest chunk peak. It is a maximum over more chunks the longer the stream, and
      one chunk's transient peak varies by ~1-2 MiB with where glibc places its blocks, so it creeps up with
      the number of chunks (measured 16.6 MiB at 8k and 16.8-18.7 MiB at 256k tokens) while the median
      chunk peak and the retained memory stay flat: that creep is not memory the stream holds.
    """
    from attnlab.hub import load_model
    from attnlab.tasks.passkey import filler

    torch.set_num_threads(1)
    model = load_model(model_dir).eval()
    with torch.inference_mode():
        cache = model.new_cache(1)
        model(torch.tensor([filler(chunk)]), cache=cache)  # one warm-up chunk (allocator, lazy init)
        cache = model.new_cache(1)
        base = rss_bytes()
        peaks = []
        with Stopwatch() as clock:
            for s in range(0, n_tokens, chunk):
                reset_peak_rss()
                model(torch.tensor([filler(min(chunk, n_tokens - s), s)]), cache=cache)  # (1, C)
                peaks.append(peak_rss_bytes() - base)
        seconds = clock.seconds
        retained = rss_bytes() - base
    assert cache.length == n_tokens
    atomic_write_text(out, json.dumps({"peak_rss": base + max(peaks), "peak_extra": max(peaks),
                                       "chunk_peak": statistics.median(peaks), "retained": retained,
                                       "state_bytes": cache.nbytes(), "seconds": seconds}))


# glibc keeps freed heap blocks mapped (and fragments) at its own discretion, which moved one process's peak
# RSS by up to ~15 MiB from run to run (measured: 8k vs 1M tokens 260 vs 271 MiB by default, 253.0 vs 254.3
# MiB with these): with blocks over 64 KiB mmapped and the heap trimmed at once, RSS follows live memory
WORKER_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def stream_memory(model_dir: Path, lengths: list[int], chunk: int, repeats: int, kv_bytes_per_token: float,
                  log=print) -> list[dict]:
    """Per length, the median of ``repeats`` fresh processes (see ``stream_worker`` for the measures)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in lengths:
            runs = []
            for i in range(repeats):
                out = Path(tmp) / f"{n}-{i}.json"
                subprocess.run([sys.executable, "-m", "attnlab.bench.infini", "--worker", str(model_dir), str(n),
                                str(chunk), str(out)], check=True, env=WORKER_ENV)
                runs.append(json.loads(out.read_text()))
            r = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
            rows.append({"tokens": n, "chunk_peak_MiB": r["chunk_peak"] / 2**20, "retained_MiB": r["retained"] / 2**20,
                         "peak_extra_MiB": r["peak_extra"] / 2**20, "peak_rss_MiB": r["peak_rss"] / 2**20,
                         "state_bytes": r["state_bytes"], "kv_cache_MiB": n * kv_bytes_per_token / 2**20,
                         "tok_s": n / r["seconds"]})
            log(f"streamed {n:,} tokens: above the warmed-up process, median chunk peak "
                f"{rows[-1]['chunk_peak_MiB']:.2f} MiB, retained {rows[-1]['retained_MiB']:.2f} MiB")
    return rows


def growth_vs_kv(rows: list[dict]) -> float:
    """How much the memory above the warmed-up process (median chunk peak) grew from the shortest to the
    longest stream, as a fraction of what a softmax KV cache of the same shape grew by: ~0 for bounded
    memory, ~1 for memory that grows like a cache."""
    first, last = rows[0], rows[-1]
    return (last["chunk_peak_MiB"] - first["chunk_peak_MiB"]) / (last["kv_cache_MiB"] - first["kv_cache_MiB"])


# --------------------------------------------------------------------------------------- plots, main

def plot(passkey_rows: list[dict], memory_rows: list[dict], s: Settings, directory: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ks = [r["multiple"] for r in passkey_rows]
    ax.plot(ks, [100 * r["infini_acc"] for r in passkey_rows], "o-", label=f"Infini ({s.memory_update})")
    ax.plot(ks, [100 * r["softmax_acc"] for r in passkey_rows], "s-", label=f"softmax, window {s.train_len}")
    ax.plot(ks, [100 * r["key_in_window"] for r in passkey_rows], ":", color="gray", label="passkey inside the window")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [f"{k}x\n{k * s.train_len:,}" for k in ks])
    ax.set_ylim(-3, 103)
    ax.set_xlabel("input length (x training length, tokens)")
    ax.set_ylabel("passkey retrieval (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, directory / "infini_passkey.png", dpi=120)

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ns = [r["tokens"] for r in memory_rows]
    ax.loglog(ns, [r["peak_rss_MiB"] for r in memory_rows], "o-", label="Infini: process peak RSS")
    ax.loglog(ns, [r["state_bytes"] / 2**20 for r in memory_rows], "^-", label="Infini: state nbytes()")
    ax.loglog(ns, [r["kv_cache_MiB"] for r in memory_rows], "--", label="softmax KV cache, same shape")
    ax.set_xlabel("tokens streamed")
    ax.set_ylabel("MiB")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    save_figure(fig, directory / "infini_memory.png", dpi=120)


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--worker":
        stream_worker(argv[1], int(argv[2]), int(argv[3]), argv[4])
        return 0
    p = parser("attnlab bench infini", "Infini-attention: passkey retrieval beyond the training length, and "
               "the memory of streaming up to 1M tokens, against a same-size windowed softmax Transformer.")
    p.add_argument("--quick", action="store_true", help="tiny settings (seconds), for tests")
    p.add_argument("--steps", type=int, default=None, help="Infini training steps")
    p.add_argument("--baseline-steps", type=int, default=None, help="softmax baseline training steps")
    p.add_argument("--memory-update", choices=("linear", "delta"), default=None)
    p.add_argument("--eval-examples", type=int, default=None)
    p.add_argument("--max-minutes", type=float, default=None, help="stop each model's training after this long")
    p.add_argument("--models-dir", default=None,
                   help="keep the trained models here (DIR/infini, DIR/softmax) and reuse or resume them")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--plot-dir", default=None, help="write infini_passkey.png and infini_memory.png here")
    args = p.parse_args(argv)
    s = quick_settings() if args.quick else full_settings()
    for name in ("steps", "baseline_steps", "memory_update", "eval_examples"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    if s.steps < 1 or s.baseline_steps < 1 or s.eval_examples < 1 or args.threads < 1:
        raise ValueError("--steps, --baseline-steps, --eval-examples and --threads must be positive")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.models_dir) if args.models_dir else Path(tmp)
        models, training = {}, []
        for name in MODELS:
            models[name], info = train(s, name, root / name, args.max_minutes)
            training.append(info)
        passkey_rows = evaluate(models, s)
        kv = models["softmax"].new_cache(1)
        memory_rows = stream_memory(root / "infini", s.stream_lengths, s.chunk, s.stream_repeats,
                                    kv.nbytes() / kv.max_len, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"machine: {machine()}")
    print(f"passkey retrieval ({s.eval_examples} examples per length, 5 digits, exact match); trained on "
          f"{s.train_len} tokens; Infini segment_len={s.segment_len}, memory_update={s.memory_update}")
    print(markdown_table(training, ["model", "parameters", "steps", "seconds", "final_val_loss",
                                    "final_val_retrieval"]))
    print(markdown_table(passkey_rows, ["multiple", "tokens", "infini_acc", "softmax_acc", "key_in_window",
                                        "key_share", "infini_s", "softmax_s"]))
    print("key_share: the passkey block's weight in the memory read-out that predicts the first digit "
          "(per layer, best head; see key_share)")
    print(markdown_table(memory_rows, ["tokens", "chunk_peak_MiB", "retained_MiB", "peak_extra_MiB", "peak_rss_MiB",
                                       "state_bytes", "kv_cache_MiB", "tok_s"]))
    chunk_peaks = [r["chunk_peak_MiB"] for r in memory_rows]
    spread = max(chunk_peaks) - min(chunk_peaks)
    growth = growth_vs_kv(memory_rows)
    retained = ", ".join(f"{r['retained_MiB']:.2f}" for r in memory_rows)
    print(f"memory above the warmed-up process from {memory_rows[0]['tokens']:,} to {memory_rows[-1]['tokens']:,} "
          f"tokens: median chunk peak {min(chunk_peaks):.2f}-{max(chunk_peaks):.2f} MiB (spread {spread:.2f} MiB, "
          f"{growth:.2%} of the KV cache's growth), retained after the stream {retained} MiB; peak_extra is the "
          f"largest chunk's peak, a maximum that creeps up with the number of chunks (allocator page placement; "
          f"see stream_worker)")
    if args.plot_dir:
        plot(passkey_rows, memory_rows, s, Path(args.plot_dir))
    write_json(args.json, {"machine": machine(), "settings": asdict(s), "training": training,
                           "passkey": passkey_rows, "memory": memory_rows, "chunk_peak_spread_MiB": spread,
                           "growth_vs_kv": growth})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
