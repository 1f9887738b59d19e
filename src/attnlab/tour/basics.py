"""Tour sections for the basics: attention maps, residuals, normalisation, MHA/GQA/MQA.

Each function takes (out_dir, mode, seed) and returns a ``Section`` whose verdict is computed from the
numbers it measured in this run, against the threshold ``tour.verdict`` states. Training experiments repeat
over ``common.seeds(mode, seed)`` (3 seeds in quick and full mode, 2 in tiny mode) and a difference counts
only when it is larger than the spread between those seeds.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from attnlab.bench.clock import Stopwatch
from attnlab.tour.common import pick, plt, save, seeds
from attnlab.tour.report import Section
from attnlab.tour.verdict import combine, compare, exact


@torch.no_grad()
def _head_maps(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's causal attention probabilities for batch row 0, recomputed from the layer's inputs
    with the model's own projections and RoPE: a list of (H, T, T)."""
    from attnlab.attention.probabilities import attention_probabilities

    captured = []

    def hook(mod, args, kwargs, output):
        captured.append(attention_probabilities(mod, args[0], rope=kwargs["rope"], key_mask=kwargs.get("key_mask"))[0])

    handles = [b.attn.register_forward_hook(hook, with_kwargs=True) for b in model.blocks]
    try:
        model(ids)
    finally:
        for h in handles:
            h.remove()
    return captured


def _previous_token_mass(maps: list[torch.Tensor]) -> list[dict]:
    rows = []
    for layer, att in enumerate(maps):
        T = att.shape[-1]
        prev = torch.arange(1, T)
        for head in range(att.shape[0]):
            entropy = float(-(att[head].clamp_min(1e-9).log() * att[head]).sum(-1).mean())
            rows.append({"layer": layer, "head": head, "previous_token_mass": float(att[head, prev, prev - 1].mean()),
                         "entropy": entropy})
    return rows


def _head_range(rows: list[dict]) -> float:
    masses = [r["previous_token_mass"] for r in rows]
    return max(masses) - min(masses)


def attention_maps(out: Path, mode: str, seed: int) -> Section:
    """Q/K/V: what a trained head attends to on a real snippet (the shipped default model), against the same
    architecture with random weights."""
    from attnlab import build_model
    from attnlab.hub import from_pretrained, load_tokenizer

    s = Section("attention", "Multi-head attention with separate Q, K, V",
                "Each head projects tokens to queries, keys and values; different heads learn different "
                "patterns (e.g. attend to the previous token, or to the matching bracket).",
                "ModelConfig.n_heads; separate q_proj / k_proj / v_proj in attention/mha.py")
    model, tok = from_pretrained("default").eval(), load_tokenizer("default")
    text = "def area(width, height):\n    return width * height\n\nprint(area(3, 4))\n"
    ids = torch.tensor([tok.encode(text)])
    captured = _head_maps(model, ids)
    rows = _previous_token_mass(captured)
    control = []  # the same architecture untrained: how much heads differ before learning anything
    for sd in seeds(mode, seed, tiny=2, quick=3, full=5):
        torch.manual_seed(sd)
        control.append(_head_range(_previous_token_mass(_head_maps(build_model(model.config).eval(), ids))))
    best = max(rows, key=lambda r: r["previous_token_mass"])
    flat = min(rows, key=lambda r: r["previous_token_mass"])
    T = ids.shape[1]
    fig, axes = plt().subplots(1, 2, figsize=(9, 4))
    labels = [tok.decode([i]).replace("\n", "\\n") for i in ids[0].tolist()]
    for ax, r in zip(axes, (best, flat)):
        ax.imshow(captured[r["layer"]][r["head"]].numpy(), cmap="viridis")
        ax.set_title(f"layer {r['layer']} head {r['head']} (prev-token mass {r['previous_token_mass']:.2f})", fontsize=8)
        ax.set_xticks(range(T), labels, rotation=90, fontsize=5)
        ax.set_yticks(range(T), labels, fontsize=5)
    s.figure = save(fig, out, "attention_maps.png")
    s.rows = sorted(rows, key=lambda r: -r["previous_token_mass"])[:6]
    s.rows += [{"layer": "random init", "head": f"seed {i}", "previous_token_mass": f"range {c:.3f}"}
               for i, c in enumerate(control)]
    s.measured = (f"attention weights of all {len(rows)} heads of the default model on a {T}-token snippet; the "
                  f"range (max − min over heads) of the weight on the previous token, against the same range in "
                  f"{len(control)} randomly initialised copies")
    s.judge(compare([_head_range(rows)], control, claim="greater", threshold=0.1, names=("trained", "random init"),
                    what="range of previous-token mass over heads", over="trained model / random seeds"))
    s.because += (f"; the most previous-token head puts {best['previous_token_mass']:.2f} of its weight on the "
                  f"previous token, the least {flat['previous_token_mass']:.2f}")
    return s


@functools.lru_cache(maxsize=2)
def _corpus_task(mode: str):
    """The variable-length LM task on the built-in corpus (shared by the training sections of one run)."""
    from attnlab.bench.norms import build_task

    return build_task(*pick(mode, tiny=(32, 8), quick=(64, 40), full=(64, 150)))


def _small(mode: str, vocab: int, **changes):
    """The small decoder the training sections start from (smaller still in tiny mode)."""
    from attnlab.config import ModelConfig

    d, ff = pick(mode, tiny=(32, 64), quick=(64, 192), full=(64, 192))
    return ModelConfig(vocab_size=vocab, d_model=d, n_layers=2, n_heads=4, d_ff=ff, max_seq_len=64).replace(**changes)


def _train_val(cfg, mode: str, steps: int, seed: int, warmup: int | None = None) -> tuple[float, list]:
    """Validation loss and train-loss curve of ``cfg`` after ``steps`` steps (diverged runs count as +inf)."""
    from attnlab.bench.norms import train_run

    task, _ = _corpus_task(mode)
    warmup = steps // 10 if warmup is None else warmup
    _, val, curve, diverged = train_run(cfg, task, steps, 3e-3, warmup, pick(mode, tiny=4, quick=16, full=16), seed)
    return (float("inf") if diverged else val), curve


def residuals(out: Path, mode: str, seed: int) -> Section:
    """Remove the residual connections and train again, over several seeds."""
    from attnlab.bench.norms import grad_norms_at_init

    s = Section("residual", "FFN and residual connections",
                "Residual connections give gradients a direct path through a deep stack; without them deep "
                "models barely train.", "ModelConfig.residual (True/False); ModelConfig.ffn")
    task, vocab = _corpus_task(mode)
    depth, steps = pick(mode, tiny=(3, 4), quick=(6, 40), full=(8, 200))
    rows, curves, losses = [], {}, {True: [], False: []}
    for sd in seeds(mode, seed):
        for residual in (True, False):
            cfg = _small(mode, vocab, n_layers=depth, residual=residual)
            norms = grad_norms_at_init(cfg, task, sd)
            val, curve = _train_val(cfg, mode, steps, sd)
            losses[residual].append(val)
            if sd == seed:
                curves[f"residual={residual}"] = curve
            rows.append({"residual": residual, "seed": sd, "layers": depth, "steps": steps, "val_loss": val,
                         "grad_norm_first_block": norms[0], "grad_norm_last_block": norms[-1]})
    fig, ax = plt().subplots(figsize=(6, 3.5))
    for name, pts in curves.items():
        ax.plot(*zip(*pts), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(f"train loss (seed {seed})")
    ax.legend()
    s.figure, s.rows = save(fig, out, "residuals.png"), rows
    s.measured = (f"{depth}-layer decoders trained {steps} steps on the corpus with and without skip connections, "
                  f"{len(losses[True])} seeds each")
    s.judge(compare(losses[False], losses[True], claim="greater", threshold=0.05, names=("without", "with residuals"),
                    what="validation loss"))
    return s


def batchnorm(out: Path, mode: str, seed: int) -> Section:
    """BatchNorm vs LayerNorm on variable-length batches: batch dependence and quality, over seeds."""
    from attnlab.bench.norms import experiment_batchnorm, plot

    s = Section("batchnorm", "BatchNorm vs LayerNorm on variable-length batches",
                "BatchNorm's statistics depend on the batch (its size, the other sequences, the padding), so "
                "text models use LayerNorm, which normalises each token alone and loses nothing by it.",
                "ModelConfig.norm = 'layer' | 'batch' (padding masked) | 'batch_naive' (padding counted)")
    task, vocab = _corpus_task(mode)
    base = _small(mode, vocab)
    steps = pick(mode, tiny=4, quick=40, full=300)
    rows, gaps, losses = [], {"layer": [], "batch": []}, {"layer": [], "batch": []}
    for sd in seeds(mode, seed):
        run, curves = experiment_batchnorm(task, base, steps, sd)
        if sd == seed:
            plot(curves, str(out / "batchnorm.png"), f"LayerNorm vs BatchNorm (seed {seed})")
        for r in run:
            r["seed"] = sd
            if r["norm"] in gaps:
                gaps[r["norm"]].append(max(abs(v) for k, v in r.items() if k.startswith("gap")))
                losses[r["norm"]].append(float("inf") if r["diverged"] else r["val_loss_eval_mode"])
        rows += run
    s.figure, s.rows = "batchnorm.png", rows
    s.measured = ("validation loss (eval mode), and |loss with batch statistics − loss with running statistics| "
                  f"per batch shape, {len(losses['layer'])} seeds each")
    s.judge(combine(
        compare(gaps["batch"], gaps["layer"], claim="greater", threshold=0.01, names=("masked BatchNorm", "LayerNorm"),
                what="largest batch-vs-running-statistics loss gap"),
        compare(losses["layer"], losses["batch"], claim="within", threshold=0.02, names=("LayerNorm", "masked BatchNorm"),
                what="validation loss")))
    return s


def placement(out: Path, mode: str, seed: int) -> Section:
    from attnlab.bench.norms import experiment_placement, plot

    s = Section("placement", "Pre-Norm vs Post-Norm (vs sandwich)",
                "Pre-Norm keeps an identity path and trains deep stacks stably without warmup; Post-Norm needs "
                "warmup and its early layers get small gradients.",
                "ModelConfig.norm_position = 'pre' | 'post' | 'sandwich'")
    task, vocab = _corpus_task(mode)
    base = _small(mode, vocab, norm="layer")
    depths = pick(mode, tiny=[3], quick=[2, 6], full=[2, 6, 12])
    steps = pick(mode, tiny=4, quick=30, full=300)
    rows, curves = experiment_placement(task, base, steps, depths, seed)
    plot(curves, str(out / "placement.png"), f"Pre vs Post vs sandwich (seed {seed})")
    deep = max(depths)

    def first(place: str) -> float:
        r = next(r for r in rows if r["placement"] == place and r["depth"] == deep and r["warmup"] == 0)
        return float("inf") if r["diverged"] else r["val_loss"]

    losses = {"pre": [first("pre")], "post": [first("post")]}
    for sd in seeds(mode, seed)[1:]:  # the deep, no-warmup pair again with the other seeds
        for place in losses:
            losses[place].append(_train_val(base.replace(norm_position=place, n_layers=deep), mode, steps, sd, 0)[0])
    for place, vals in losses.items():
        rows += [{"placement": place, "depth": deep, "warmup": 0, "val_loss": v, "seed": seed + i}
                 for i, v in enumerate(vals) if i]
    s.figure, s.rows = "placement.png", rows
    s.measured = (f"loss after {steps} steps, divergence and per-block gradient norms at initialisation (seed {seed}); "
                  f"depth {deep} without warmup repeated over {len(losses['pre'])} seeds")
    s.judge(compare(losses["pre"], losses["post"], claim="less", threshold=0.02, names=("Pre-Norm", "Post-Norm"),
                    what=f"validation loss at depth {deep} without warmup"))
    return s


def kv_cache(out: Path, mode: str, seed: int) -> Section:
    """MHA vs GQA vs MQA: cache bytes from real allocations, decode time, and the loss of each variant
    trained the same short way over several seeds."""
    from attnlab import ModelConfig, build_model

    s = Section("gqa", "MHA vs GQA vs MQA: the KV cache and the quality",
                "Sharing K/V heads between groups of query heads shrinks the KV cache by n_heads / n_kv_heads "
                "(and lengthens the context that fits), at little cost in quality.",
                "ModelConfig.n_kv_heads (n_heads = MHA, 1 = MQA); attnlab convert --kv-heads")
    ctx, width = pick(mode, tiny=(128, 128), quick=(1024, 512), full=(4096, 512))
    rows = []
    for kv in (8, 4, 2, 1):
        torch.manual_seed(seed)
        model = build_model(ModelConfig(vocab_size=1024, d_model=width, n_layers=4, n_heads=8, n_kv_heads=kv,
                                        max_seq_len=ctx + 64)).eval()
        cache = model.new_cache(1, ctx + 32)
        with torch.no_grad():
            model(torch.randint(0, 1024, (1, ctx)), cache=cache)
            tok = torch.tensor([[1]])
            with Stopwatch() as clock:
                for _ in range(16):
                    model(tok, cache=cache)
            ms = clock.seconds / 16 * 1000
        rows.append({"n_kv_heads": kv, "kind": "MHA" if kv == 8 else ("MQA" if kv == 1 else "GQA"),
                     "cache_MiB": cache.nbytes() / 2**20, f"decode_ms_at_{ctx}": ms})
    # quality: 4 query heads with 4 (MHA), 2 (GQA) and 1 (MQA) K/V heads, trained alike on the corpus
    _, vocab = _corpus_task(mode)
    steps = pick(mode, tiny=4, quick=40, full=300)
    losses: dict[int, list[float]] = {4: [], 2: [], 1: []}
    for sd in seeds(mode, seed):
        for kv in losses:
            losses[kv].append(_train_val(_small(mode, vocab, n_kv_heads=kv), mode, steps, sd)[0])
    names = {4: "MHA", 2: "GQA", 1: "MQA"}
    rows += [{"n_kv_heads": kv, "kind": f"{names[kv]} (4 query heads, trained)", "seed": seed + i, "val_loss": v}
             for kv, vals in losses.items() for i, v in enumerate(vals)]
    fig, (a, b) = plt().subplots(1, 2, figsize=(9, 3.2))
    a.bar([r["kind"] + f"\nK={r['n_kv_heads']}" for r in rows[:4]], [r["cache_MiB"] for r in rows[:4]])
    a.set_ylabel(f"KV cache MiB ({ctx + 32} positions)")
    for kv, vals in losses.items():
        b.plot([kv] * len(vals), vals, "o", label=names[kv])
    b.set_xlabel("K/V heads (of 4 query heads)")
    b.set_ylabel(f"validation loss after {steps} steps")
    b.set_xticks([1, 2, 4])
    s.figure, s.rows = save(fig, out, "kv_cache.png"), rows
    exact_ratio = all(r["cache_MiB"] * 8 == rows[0]["cache_MiB"] * r["n_kv_heads"] for r in rows[:4])
    s.measured = (f"bytes of the allocated cache and decode time per token (one thread) with {ctx} cached tokens (4 layers, d "
                  f"{width}); validation loss of small 2-layer models with 4, 2 and 1 K/V heads trained {steps} steps "
                  f"on the corpus over {len(losses[4])} seeds")
    s.judge(combine(
        exact(exact_ratio, what="cache bytes proportional to n_kv_heads",
              detail=f"cache {rows[0]['cache_MiB']:.2f} MiB (MHA) -> {rows[3]['cache_MiB']:.3f} MiB (MQA)"),
        compare(losses[2], losses[4], claim="within", threshold=0.05, names=("GQA (2 K/V heads)", "MHA"),
                what="validation loss"),
        compare(losses[1], losses[4], claim="within", threshold=0.05, names=("MQA", "MHA"), what="validation loss")))
    return s
