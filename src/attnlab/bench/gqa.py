"""``attnlab bench gqa``: MHA -> GQA -> MQA conversion of trained models, cost and benefit side by side.

Conversion mean-pools each group of K/V heads (``attnlab.models.kv_heads.to_kv_heads``; Ainslie et al. 2023, "GQA:
Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints"), then the converted model
is uptrained for a stated number of steps with the ordinary ``Trainer``. For every source model and every
target number of KV heads K, one row gives:

- KV-cache bytes per token, measured on a real ``model.new_cache`` allocation;
- greedy decode tokens/s with the cache already holding C positions (C = 2k, 8k, ...): the cache is filled
  with random K/V through its own ``begin/update/commit`` protocol, since the cost of a decode step
  depends on how many positions it attends to, not on their values. The variants of one source are timed
  alternately so that load from other processes hits them alike; the best of ``--repeats`` counts;
- validation perplexity before conversion, right after it, and after N uptraining steps.

The source row (K unchanged) is uptrained for the same N steps on the same batches as a *control*: a model
trained further on this corpus can improve for reasons unrelated to conversion (domain adaptation,
an undertrained source), and only the gap to the control is what conversion really costs.

Sources: ``default`` (the shipped target, 6 query / 2 KV heads), ``smollm2`` (SmolLM2-135M from its GGUF,
9 / 3) and ``mha`` (an MHA model with 8 / 8 heads trained here first with the same Trainer).
Shape legend: B batch, T window length, K kv heads, C context positions, D head dim.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from attnlab.bench.clock import Stopwatch
from attnlab.bench.common import machine, markdown_table, write_json
from attnlab.commands.args import parser
from attnlab.figures import save_figure

SOURCES = ("default", "smollm2", "mha")


@dataclass
class Budget:
    """How much work one source gets (uptraining steps are per converted model)."""

    steps: int  # uptraining steps
    batch: int
    lr: float
    eval_windows: int
    contexts: list[int]
    pretrain_tokens: float | None = None  # for "uptraining = x% of pretraining"


@dataclass
class Settings:
    seq_len: int = 128  # uptraining window
    eval_len: int = 256  # evaluation window
    max_files: int | None = None  # corpus files (None = the whole standard library)
    new_tokens: int = 16  # decoded tokens per timing
    repeats: int = 3
    mha_steps: int = 400  # pretraining of the MHA source
    mha_batch: int = 16
    mha_dir: str | None = None  # reuse (or keep) the MHA source here
    budgets: dict[str, Budget] = field(default_factory=dict)


def full_settings() -> Settings:
    return Settings(budgets={
        # the shipped target saw 717 x 16 x 256 = 2.9M tokens: 100 x 8 x 128 = 102k tokens is 3.5% of that
        "default": Budget(steps=100, batch=8, lr=3e-4, eval_windows=48, contexts=[2048, 8192],
                          pretrain_tokens=717 * 16 * 256),
        # SmolLM2-135M saw ~2T tokens: 30 x 4 x 128 = 15k tokens is a token gesture; it is what a CPU affords
        "smollm2": Budget(steps=30, batch=4, lr=5e-5, eval_windows=16, contexts=[2048, 8192], pretrain_tokens=2e12),
        # the MHA source below sees 400 x 16 x 128 = 819k tokens: 40 x 8 x 128 = 41k tokens is 5% (the paper's share)
        "mha": Budget(steps=40, batch=8, lr=1e-3, eval_windows=48, contexts=[2048, 8192],
                      pretrain_tokens=400 * 16 * 128),
    })


def quick_settings() -> Settings:
    small = dict(steps=2, batch=2, lr=3e-4, eval_windows=2, contexts=[64])
    return Settings(seq_len=32, eval_len=32, max_files=40, new_tokens=2, repeats=1, mha_steps=10, mha_batch=4,
                    budgets={name: Budget(**small) for name in SOURCES})


# ---------------------------------------------------------------------------------------------- data

def lm_task(tokenizer, seq_len: int, eval_len: int, max_files: int | None):
    """Train windows of ``seq_len`` and validation windows of ``eval_len`` from the default corpus."""
    from attnlab.training.corpus import load_corpus
    from attnlab.training.data import TokenWindows, build_shards
    from attnlab.training.losses import LMTask

    shards = build_shards(load_corpus(max_files=max_files), tokenizer)
    task = LMTask(TokenWindows(shards["train"], seq_len, name="train"),
                  TokenWindows(shards["validation"], seq_len, name="validation"))
    return task, TokenWindows(shards["validation"], eval_len, name="validation").fixed


@torch.no_grad()
def val_loss(model: nn.Module, windows: list[torch.Tensor]) -> float:
    """Mean next-token cross-entropy (nats/token) over fixed validation windows."""
    from attnlab.training.losses import LMTask

    was_training = model.training
    model.eval()
    total = n = 0
    for batch in windows:  # (1, T + 1) each
        loss, k = LMTask.loss(model, batch)
        total, n = total + float(loss) * k, n + k
    model.train(was_training)
    return total / max(n, 1)


def train_steps(model: nn.Module, task, steps: int, batch: int, lr: float, *, warmup: int,
                seed: int = 0) -> list[tuple[int, float]]:
    """``steps`` optimizer steps of the ordinary Trainer (AdamW, warmup + cosine, clipping); the data order
    depends on ``seed`` only, so every variant of one source sees the same batches. Returns the loss curve."""
    from attnlab.training.trainer import TrainConfig, Trainer

    with tempfile.TemporaryDirectory() as out:  # nothing is saved: the model is trained in place
        cfg = TrainConfig(steps=steps, batch_size=batch, lr=lr, warmup=warmup, seed=seed, eval_every=10**9)
        trainer = Trainer(model, task, cfg, out, progress=False, verbose=False)
        model.train()
        curve = [(trainer.step + 1, trainer.train_step()) for _ in range(steps)]
    model.eval()
    return curve


# ---------------------------------------------------------------------------------------------- sources

def load_source(name: str, settings: Settings) -> tuple[nn.Module, object, dict]:
    """(model, its tokenizer, notes) for one source."""
    from attnlab.hub import from_pretrained, load_tokenizer

    if name == "default":
        return from_pretrained("default", dtype=torch.float32).eval(), load_tokenizer("default"), {}
    if name == "smollm2":
        from attnlab.hub import find_shipped_gguf

        path = find_shipped_gguf("smollm2")  # raises with the install hint if the package is absent
        return from_pretrained(path, dtype=torch.float32).eval(), load_tokenizer(path), {"file": path.name}
    if name == "mha":
        return mha_source(settings)
    raise ValueError(f"unknown source {name!r}; choose from {', '.join(SOURCES)}")


def mha_source(settings: Settings) -> tuple[nn.Module, object, dict]:
    """An MHA decoder (8 query = 8 KV heads) trained here, with the shipped target's tokenizer and data."""
    from attnlab.checkpoint import WEIGHTS_NAME
    from attnlab.config import ModelConfig
    from attnlab.hub import from_pretrained, load_tokenizer
    from attnlab.models import build_model

    tok = load_tokenizer("default")
    keep = Path(settings.mha_dir) if settings.mha_dir else None
    if keep is not None and (keep / WEIGHTS_NAME).is_file():
        return from_pretrained(keep, dtype=torch.float32).eval(), tok, {"trained": f"loaded from {keep}"}
    budget = settings.budgets["mha"]
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=128, n_layers=4, n_heads=8, n_kv_heads=8, d_ff=384,
                      max_seq_len=max(budget.contexts) + settings.new_tokens + 1, attention_kernel="sdpa")
    task, _ = lm_task(tok, settings.seq_len, settings.eval_len, settings.max_files)
    torch.manual_seed(0)
    model = build_model(cfg)
    seconds, _ = Stopwatch.call(lambda: train_steps(model, task, settings.mha_steps, settings.mha_batch, 3e-3,
                                                    warmup=max(1, settings.mha_steps // 20), seed=1))
    notes = {"trained": f"{settings.mha_steps} x {settings.mha_batch} x {settings.seq_len} tokens in {seconds:.0f} s"}
    if keep is not None:
        model.save_pretrained(keep)
    return model, tok, notes


# ---------------------------------------------------------------------------------------------- speed

def long_context_view(model: nn.Module, positions: int) -> nn.Module:
    """``model`` itself, or a copy with the same weights whose position limit admits ``positions``.

    Only for timing: a RoPE model beyond the context it was trained on computes garbage at the same speed.
    """
    from attnlab.models import build_model

    cfg = model.config
    if positions <= cfg.max_seq_len:
        return model
    if cfg.position != "rope":
        raise ValueError(f"cannot time {positions} positions: the model has {cfg.position} positions up to "
                         f"{cfg.max_seq_len}")
    copy = build_model(cfg.replace(max_seq_len=positions)).to(model.dtype)
    copy.load_state_dict(model.state_dict())
    return copy.eval()


def filled_cache(model: nn.Module, context: int, new_tokens: int, seed: int = 0):
    """A batch-1 cache of capacity ``context + new_tokens`` already holding ``context`` random positions."""
    cfg = model.config
    cache = model.new_cache(1, context + new_tokens)
    g = torch.Generator().manual_seed(seed)
    cache.begin(context, None)
    for layer in range(cfg.n_layers):
        k = torch.randn(1, cfg.n_kv_heads, context, cfg.head_dim, generator=g)  # (B, K, C, D)
        cache.update(layer, k.to(model.dtype), torch.randn_like(k).to(model.dtype))
    cache.commit(context, None)
    return cache


@torch.inference_mode()
def decode_speeds(models: dict[int, nn.Module], context: int, new_tokens: int, repeats: int) -> dict[int, float]:
    """Greedy decode tokens/s after ``context`` cached positions, for each variant; best of ``repeats``,
    variants interleaved within each round."""
    views = {k: long_context_view(m, context + new_tokens) for k, m in models.items()}
    caches = {k: filled_cache(v, context, new_tokens) for k, v in views.items()}
    best = dict.fromkeys(views, float("inf"))
    for _ in range(repeats + 1):  # the first round warms up
        for k, view in views.items():
            cache = caches[k]
            cache.crop(context)
            tok = torch.zeros(1, 1, dtype=torch.long)
            with Stopwatch() as clock:
                for _ in range(new_tokens):
                    tok = view(tok, cache=cache)[:, -1:].argmax(-1)  # (1, 1)
            best[k] = min(best[k], clock.seconds)
    return {k: new_tokens / s for k, s in best.items()}


def kv_bytes_per_token(model: nn.Module) -> int:
    """Measured: bytes of a real 1-position cache of this model (its dtype)."""
    return model.new_cache(1, 1).nbytes()


# ---------------------------------------------------------------------------------------------- the run

def targets_for(n_kv_heads: int) -> list[int]:
    """Every K that conversion can reach (divisors of the current number of KV heads), largest first."""
    return [k for k in range(n_kv_heads, 0, -1) if n_kv_heads % k == 0]


def run_source(name: str, settings: Settings, log=print) -> tuple[list[dict], dict]:
    from attnlab.models.kv_heads import to_kv_heads

    budget = settings.budgets[name]
    source, tok, notes = load_source(name, settings)
    cfg = source.config
    task, eval_windows = lm_task(tok, settings.seq_len, settings.eval_len, settings.max_files)
    windows = eval_windows(budget.eval_windows)
    ks = targets_for(cfg.n_kv_heads)
    log(f"[{name}] {source.num_parameters():,} parameters, {cfg.n_heads} query / {cfg.n_kv_heads} KV heads; "
        f"targets {ks}; {notes}")
    before = val_loss(source, windows)
    models = {cfg.n_kv_heads: source}
    for k in ks[1:]:
        models[k] = to_kv_heads(source, k)
    speeds = {}
    for c in budget.contexts:
        seconds, speeds[c] = Stopwatch.call(lambda c=c: decode_speeds(models, c, settings.new_tokens, settings.repeats))
        log(f"[{name}] decode at {c} positions: " + ", ".join(f"K={k} {v:.1f} tok/s" for k, v in speeds[c].items())
            + f" ({seconds:.0f} s)")
    rows, curves = [], {}
    # converted variants first, the control (the source itself, trained in place) last
    for k in ks[1:] + ks[:1]:
        model = models[k]
        converted = before if k == cfg.n_kv_heads else val_loss(model, windows)
        secs, curve = Stopwatch.call(lambda model=model: train_steps(model, task, budget.steps, budget.batch, budget.lr,
                                                                     warmup=max(1, budget.steps // 10)))
        after = val_loss(model, windows)
        curves[f"{name} K={k}"] = curve
        kind = "MHA" if k == cfg.n_heads else ("MQA" if k == 1 else "GQA")
        row = {"model": name, "heads": f"{cfg.n_heads}/{k}", "kind": kind + (" (source)" if k == cfg.n_kv_heads else ""),
               "kv_bytes_per_token": kv_bytes_per_token(model),
               "ppl_before": math.exp(before), "ppl_converted": math.exp(converted), "ppl_uptrained": math.exp(after),
               "uptrain": f"{budget.steps}x{budget.batch}x{settings.seq_len}, lr {budget.lr:g}",
               "uptrain_s": secs,
               "loss_before": before, "loss_converted": converted, "loss_uptrained": after, "n_kv_heads": k}
        if budget.pretrain_tokens:
            row["uptrain_share"] = budget.steps * budget.batch * settings.seq_len / budget.pretrain_tokens
        for c in budget.contexts:
            row[f"tok_s@{c}"] = speeds[c][k]
        rows.append(row)
        log(f"[{name}] K={k}: ppl {math.exp(before):.2f} -> converted {math.exp(converted):.2f} -> "
            f"{budget.steps} steps {math.exp(after):.2f} ({secs:.0f} s)")
        if k != cfg.n_kv_heads:
            del models[k]  # free the memory before the next variant trains
    rows.sort(key=lambda r: -r["n_kv_heads"])
    return rows, curves


def columns(rows: list[dict]) -> list[str]:
    contexts = sorted({int(c.split("@")[1]) for r in rows for c in r if c.startswith("tok_s@")})
    return (["model", "heads", "kind", "kv_bytes_per_token"] + [f"tok_s@{c}" for c in contexts]
            + ["ppl_before", "ppl_converted", "ppl_uptrained", "uptrain"])


def plot(rows: list[dict], curves: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_q, ax_s) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{r['model']}\n{r['heads']}" for r in rows]
    x = range(len(rows))
    conv = [100 * (r["ppl_converted"] / r["ppl_before"] - 1) for r in rows]
    upt = [100 * (r["ppl_uptrained"] / r["ppl_before"] - 1) for r in rows]
    ax_q.bar([i - 0.2 for i in x], conv, 0.4, label="right after conversion")
    ax_q.bar([i + 0.2 for i in x], upt, 0.4, label="after uptraining (source row: control)")
    ax_q.set_yscale("symlog", linthresh=10)
    ax_q.axhline(0, color="grey", lw=0.8)
    ax_q.set_xticks(list(x), labels, fontsize=7)
    ax_q.set_ylabel("validation perplexity vs source (%)")
    ax_q.set_title("quality: cost of mean-pooling, gain of uptraining", fontsize=9)
    ax_q.legend(fontsize=7)
    ax_q.grid(alpha=0.3, axis="y")
    contexts = sorted({int(c.split("@")[1]) for r in rows for c in r if c.startswith("tok_s@")})
    width = 0.8 / max(1, len(contexts))
    source = {r["model"]: r for r in rows if r["kind"].endswith("(source)")}
    for j, c in enumerate(contexts):  # speed-up over the same model before conversion
        vals = [r.get(f"tok_s@{c}", 0.0) / source[r["model"]].get(f"tok_s@{c}", float("nan")) for r in rows]
        ax_s.bar([i - 0.4 + width * (j + 0.5) for i in x], vals, width, label=f"{c} cached positions")
    ax_s.axhline(1.0, color="grey", lw=0.8)
    ax_s.set_xticks(list(x), labels, fontsize=7)
    ax_s.set_ylabel("decode tokens/s vs source (batch 1, greedy)")
    ax_s.set_title("speed: KV bytes/token shrink by the head ratio", fontsize=9)
    ax_s.legend(fontsize=7)
    ax_s.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def main(argv: list[str]) -> int:
    p = parser("attnlab bench gqa", "MHA -> GQA -> MQA conversion: KV bytes, decode speed, perplexity before, "
                                    "after conversion and after uptraining.")
    p.add_argument("--models", nargs="+", default=list(SOURCES), choices=SOURCES, help="sources to convert")
    p.add_argument("--quick", action="store_true", help="a smoke run: 40 corpus files, 2 uptraining steps, short "
                                                        "windows, 64 cached positions")
    p.add_argument("--steps", type=int, default=None, help="uptraining steps for every source (default: per source)")
    p.add_argument("--lr", type=float, default=None, help="uptraining peak learning rate (default: per source)")
    p.add_argument("--batch", type=int, default=None, help="uptraining batch size (default: per source)")
    p.add_argument("--contexts", type=int, nargs="+", default=None, help="cached positions for the decode timing")
    p.add_argument("--smollm2-contexts", type=int, nargs="+", default=None, help="override for SmolLM2 only")
    p.add_argument("--max-files", type=int, default=None, help="corpus files to use (default: all, or 40 with --quick)")
    p.add_argument("--mha-steps", type=int, default=None, help="pretraining steps of the MHA source")
    p.add_argument("--mha-dir", default=None, help="keep the trained MHA source here and reuse it on later runs")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="write the PNG here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = quick_settings() if args.quick else full_settings()
    for key in ("max_files", "mha_steps", "mha_dir", "repeats"):
        if getattr(args, key) is not None:
            setattr(settings, key, getattr(args, key))
    for name, budget in settings.budgets.items():
        for key in ("steps", "lr", "batch"):
            if getattr(args, key) is not None:
                setattr(budget, key, getattr(args, key))
        if args.contexts:
            budget.contexts = list(args.contexts)
        if name == "smollm2" and args.smollm2_contexts:
            budget.contexts = list(args.smollm2_contexts)
    rows, curves = [], {}
    clock = Stopwatch()
    for name in args.models:
        r, c = run_source(name, settings)
        rows += r
        curves.update(c)
        write_json(args.json, {"partial": True, "rows": rows})  # a late failure keeps the finished sources
    info = machine()
    print(f"machine: {info}")
    print(markdown_table(rows, columns(rows)))
    print(f"total {clock.seconds:.0f} s")
    if args.plot:
        plot(rows, curves, args.plot)
    write_json(args.json, {"machine": info, "command": "attnlab bench gqa " + " ".join(argv), "rows": rows,
                           "curves": curves, "seconds": clock.seconds})
    return 0
