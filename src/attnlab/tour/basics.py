"""Tour sections for the basics: attention maps, residuals, normalisation, KV-cache sizes, cached decoding.

Each function takes (out_dir, quick, seed) and returns a ``Section`` whose verdict is computed from the
numbers it measured in this run.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from attnlab.tour.report import Section


def _save(fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return name


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def attention_maps(out: Path, quick: bool, seed: int) -> Section:
    """Q/K/V: what a trained head attends to on a real snippet (the shipped default model)."""
    from attnlab.hub import from_pretrained, load_tokenizer
    from attnlab.layers.position import apply_rope

    s = Section("attention", "Multi-head attention with separate Q, K, V",
                "Each head projects tokens to queries, keys and values; different heads learn different "
                "patterns (e.g. attend to the previous token, or to the matching bracket).",
                "ModelConfig.n_heads; separate q_proj / k_proj / v_proj in attention/mha.py")
    model, tok = from_pretrained("default"), load_tokenizer("default")
    text = "def area(width, height):\n    return width * height\n\nprint(area(3, 4))\n"
    ids = torch.tensor([tok.encode(text)])
    captured = []

    def hook(mod, args, kwargs, output):
        x = args[0]
        B, T, _ = x.shape
        q = mod.q_proj(x).view(B, T, mod.n_heads, mod.head_dim).transpose(1, 2)
        k = mod.k_proj(x).view(B, T, mod.n_kv_heads, mod.head_dim).transpose(1, 2)
        cos, sin = kwargs["rope"]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        G = mod.n_heads // mod.n_kv_heads
        scores = torch.einsum("bhtd,bhsd->bhts", q, k.repeat_interleave(G, 1)) / math.sqrt(mod.head_dim)
        scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        captured.append(torch.softmax(scores, -1)[0])

    handles = [b.attn.register_forward_hook(hook, with_kwargs=True) for b in model.blocks]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    T = ids.shape[1]
    prev = torch.arange(1, T)
    rows = []
    for layer, att in enumerate(captured):
        for head in range(att.shape[0]):
            prev_mass = float(att[head, prev, prev - 1].mean())
            entropy = float(-(att[head].clamp_min(1e-9).log() * att[head]).sum(-1).mean())
            rows.append({"layer": layer, "head": head, "previous_token_mass": prev_mass, "entropy": entropy})
    best = max(rows, key=lambda r: r["previous_token_mass"])
    flat = min(rows, key=lambda r: r["previous_token_mass"])
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    labels = [tok.decode([i]).replace("\n", "\\n") for i in ids[0].tolist()]
    for ax, r in zip(axes, (best, flat)):
        ax.imshow(captured[r["layer"]][r["head"]].numpy(), cmap="viridis")
        ax.set_title(f"layer {r['layer']} head {r['head']} (prev-token mass {r['previous_token_mass']:.2f})", fontsize=8)
        ax.set_xticks(range(T), labels, rotation=90, fontsize=5)
        ax.set_yticks(range(T), labels, fontsize=5)
    s.figure = _save(fig, out, "attention_maps.png")
    s.rows = sorted(rows, key=lambda r: -r["previous_token_mass"])[:6]
    spread = best["previous_token_mass"] - flat["previous_token_mass"]
    s.measured = f"attention weights of all {len(rows)} heads of the default model on a {T}-token snippet"
    s.verdict = "confirmed" if spread > 0.3 else "depends"
    s.because = (f"heads differ: the most previous-token head puts {best['previous_token_mass']:.2f} of its weight on "
                 f"the previous token, the least {flat['previous_token_mass']:.2f}")
    return s


def residuals(out: Path, quick: bool, seed: int) -> Section:
    """Remove the residual connections and train again."""
    from attnlab.bench.norms import _train, build_task, grad_norms_at_init
    from attnlab.config import ModelConfig

    s = Section("residual", "FFN and residual connections",
                "Residual connections give gradients a direct path through a deep stack; without them deep "
                "models barely train.", "ModelConfig.residual (True/False); ModelConfig.ffn")
    task, vocab = build_task(64, 40 if quick else 150)
    depth, steps = (6, 40) if quick else (8, 200)
    rows, curves = [], {}
    for residual in (True, False):
        cfg = ModelConfig(vocab_size=vocab, d_model=64, n_layers=depth, n_heads=4, d_ff=192, max_seq_len=64,
                          residual=residual)
        norms = grad_norms_at_init(cfg, task, seed)
        _, val, curve, diverged = _train(cfg, task, steps, 3e-3, steps // 10, 16, seed)
        curves[f"residual={residual}"] = curve
        rows.append({"residual": residual, "layers": depth, "steps": steps, "val_loss": val,
                     "grad_norm_first_block": norms[0], "grad_norm_last_block": norms[-1]})
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, pts in curves.items():
        ax.plot(*zip(*pts), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.legend()
    s.figure = _save(fig, out, "residuals.png")
    s.rows = rows
    with_r, without = rows
    s.measured = f"{depth}-layer decoders trained {steps} steps on the corpus, with and without skip connections"
    s.verdict = "confirmed" if without["val_loss"] > with_r["val_loss"] + 0.05 else "refuted"
    s.because = (f"validation loss {with_r['val_loss']:.3f} with residuals vs {without['val_loss']:.3f} without; "
                 f"first-block gradient norm {with_r['grad_norm_first_block']:.3g} vs {without['grad_norm_first_block']:.3g}")
    return s


def _norm_setup(quick: bool):
    """The corpus task and the small base model shared by the normalisation experiments."""
    from attnlab.bench.norms import build_task
    from attnlab.config import ModelConfig

    task, vocab = build_task(64, 40 if quick else 150)
    return task, ModelConfig(vocab_size=vocab, d_model=64, n_layers=2, n_heads=4, d_ff=192, max_seq_len=64)


def batchnorm(out: Path, quick: bool, seed: int) -> Section:
    """BatchNorm vs LayerNorm on variable-length batches."""
    from attnlab.bench.norms import experiment_batchnorm, plot

    s = Section("batchnorm", "BatchNorm vs LayerNorm on variable-length batches",
                "BatchNorm's statistics depend on the batch (its size, the other sequences, the padding), so "
                "text models use LayerNorm, which normalises each token alone.",
                "ModelConfig.norm = 'layer' | 'batch' (padding masked) | 'batch_naive' (padding counted)")
    task, base = _norm_setup(quick)
    rows, curves = experiment_batchnorm(task, base, 40 if quick else 300)
    plot(curves, str(out / "batchnorm.png"), "LayerNorm vs BatchNorm")
    s.figure, s.rows = "batchnorm.png", rows
    gaps = {r["norm"]: max(abs(v) for k, v in r.items() if k.startswith("gap")) for r in rows}
    s.measured = "validation loss, and |loss with batch statistics − loss with running statistics| per batch shape"
    s.verdict = "confirmed" if gaps["layer"] < 1e-6 < min(gaps["batch"], gaps["batch_naive"]) else "refuted"
    s.because = (f"largest train/eval-statistics gap: LayerNorm {gaps['layer']:.2g}, masked BatchNorm "
                 f"{gaps['batch']:.3f}, naive BatchNorm {gaps['batch_naive']:.3f}")
    return s


def placement(out: Path, quick: bool, seed: int) -> Section:
    from attnlab.bench.norms import experiment_placement, plot

    s = Section("placement", "Pre-Norm vs Post-Norm (vs sandwich)",
                "Pre-Norm keeps an identity path and trains deep stacks stably without warmup; Post-Norm needs "
                "warmup and its early layers get small gradients.",
                "ModelConfig.norm_position = 'pre' | 'post' | 'sandwich'")
    task, base = _norm_setup(quick)
    depths = [2, 6] if quick else [2, 6, 12]
    rows, curves = experiment_placement(task, base, 30 if quick else 300, depths)
    plot(curves, str(out / "placement.png"), "Pre vs Post vs sandwich")
    s.figure, s.rows = "placement.png", rows
    deep = max(depths)
    pre = next(r for r in rows if r["placement"] == "pre" and r["depth"] == deep and r["warmup"] == 0)
    post = next(r for r in rows if r["placement"] == "post" and r["depth"] == deep and r["warmup"] == 0)
    s.measured = "loss after training, divergence, and per-block gradient norms at initialisation"
    better = pre["val_loss"] < post["val_loss"]
    s.verdict = "confirmed" if better else "depends"
    s.because = (f"depth {deep}, no warmup: Pre-Norm {pre['val_loss']:.3f} vs Post-Norm {post['val_loss']:.3f}; "
                 f"first/last block gradient ratio {pre['first/last']:.2f} (pre) vs {post['first/last']:.2f} (post)")
    return s


def kv_cache(out: Path, quick: bool, seed: int) -> Section:
    """MHA vs GQA vs MQA: cache bytes from real allocations and decode speed at a long context."""
    from attnlab import ModelConfig, build_model

    s = Section("gqa", "MHA vs GQA vs MQA: the KV cache",
                "Sharing K/V heads between groups of query heads shrinks the KV cache by n_heads / n_kv_heads "
                "(and lengthens the context that fits), at little cost in quality.",
                "ModelConfig.n_kv_heads (n_heads = MHA, 1 = MQA); attnlab convert --kv-heads")
    ctx = 1024 if quick else 4096
    rows = []
    for kv in (8, 4, 2, 1):
        torch.manual_seed(seed)
        model = build_model(ModelConfig(vocab_size=1024, d_model=512, n_layers=4, n_heads=8, n_kv_heads=kv,
                                        max_seq_len=ctx + 64)).eval()
        cache = model.new_cache(1, ctx + 32)
        with torch.no_grad():
            model(torch.randint(0, 1024, (1, ctx)), cache=cache)
            tok = torch.tensor([[1]])
            start = time.perf_counter()
            for _ in range(16):
                model(tok, cache=cache)
            ms = (time.perf_counter() - start) / 16 * 1000
        rows.append({"n_kv_heads": kv, "kind": "MHA" if kv == 8 else ("MQA" if kv == 1 else "GQA"),
                     "cache_MiB": cache.nbytes() / 2**20, f"decode_ms_at_{ctx}": ms})
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar([r["kind"] + f"\nK={r['n_kv_heads']}" for r in rows], [r["cache_MiB"] for r in rows])
    ax.set_ylabel(f"KV cache MiB ({ctx + 32} positions)")
    s.figure, s.rows = _save(fig, out, "kv_cache.png"), rows
    exact = all(r["cache_MiB"] * 8 == rows[0]["cache_MiB"] * r["n_kv_heads"] for r in rows)
    s.measured = f"bytes of the allocated cache and decode time per token with {ctx} cached tokens (4 layers, d 512)"
    s.verdict = "confirmed" if exact else "refuted"
    s.because = (f"cache {rows[0]['cache_MiB']:.1f} MiB (MHA) -> {rows[-1]['cache_MiB']:.2f} MiB (MQA), exactly 8x; "
                 f"decode {rows[0][f'decode_ms_at_{ctx}']:.1f} -> {rows[-1][f'decode_ms_at_{ctx}']:.1f} ms/token")
    return s
