"""``attnlab bench norms``: the field guide's normalisation claims as experiments.

(a) LayerNorm vs masked BatchNorm vs naive BatchNorm (padding counted in the statistics) on variable-length
    batches of the default corpus: validation loss, and the gap between evaluating with batch statistics
    (train mode) and with running statistics (eval mode) as the batch size and the amount of padding change.
    LayerNorm normalises each token alone, so its outputs cannot depend on the batch at all.
(b) Pre-Norm vs Post-Norm vs sandwich at depth 2, 6 and 12, with and without learning-rate warmup: whether
    training diverged, the loss after N steps, and the gradient norm of each layer at initialisation.

Every run trains a small decoder with the ordinary trainer; loss curves go to a PNG.
Shape legend: B batch, T window length.
"""

from __future__ import annotations

import math
import tempfile

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.bench.common import machine, markdown_table, write_json
from attnlab.commands.args import parser
from attnlab.figures import save_figure


class VariableLengthTask:
    """LM windows cut to random lengths and right-padded: real tokens vary from row to row."""

    def __init__(self, lm_task, min_frac: float = 0.25) -> None:
        self.lm, self.min_frac = lm_task, min_frac
        self.train = lm_task.train

    def _pad(self, batch: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        B, T1 = batch.shape
        lengths = torch.randint(int(self.min_frac * (T1 - 1)), T1, (B,), generator=generator)
        mask = torch.arange(T1)[None, :] < lengths[:, None] + 1  # (B, T + 1)
        return batch.masked_fill(~mask, 0), mask

    def train_batch(self, batch_size: int, generator: torch.Generator):
        return self._pad(self.lm.train_batch(batch_size, generator), generator)

    def eval_batches(self, n: int):
        g = torch.Generator().manual_seed(123)
        windows = self.lm.eval_batches(n)
        return [self._pad(torch.cat(windows[i:i + 8]), g) for i in range(0, len(windows), 8)]

    @staticmethod
    def loss(model, batch, *, context_parallel=None) -> tuple[Tensor, int]:
        ids, mask = batch
        x, y, m = ids[:, :-1], ids[:, 1:], mask[:, 1:]
        logits = model(x, attention_mask=mask[:, :-1].long())
        return F.cross_entropy(logits[m].float(), y[m]), int(m.sum())

    def metrics(self, mean_loss: float) -> dict[str, float]:
        return {"loss": mean_loss}

    def evaluate_extra(self, model) -> dict[str, float]:
        return {}


def train_run(cfg, task, steps: int, lr: float, warmup: int, batch: int, seed: int = 0):
    """Train a fresh ``cfg`` model on ``task``: (model, final validation loss, [(step, train loss)], diverged),
    where diverged means a non-finite loss or a train loss above 20."""
    from attnlab.models import build_model
    from attnlab.training.trainer import TrainConfig, Trainer

    torch.manual_seed(seed)
    model = build_model(cfg)
    with tempfile.TemporaryDirectory() as out:
        tcfg = TrainConfig(steps=steps, batch_size=batch, lr=lr, warmup=warmup, eval_every=steps,
                           log_every=max(1, min(5, steps // 4)),
                           save_every=10**9, eval_windows=32, seed=seed)
        trainer = Trainer(model, task, tcfg, out, progress=False, verbose=False)
        diverged = False
        try:
            trainer.fit()
        except FloatingPointError:
            diverged = True
        curve = [(r["step"], r["train_loss"]) for r in trainer.history if "train_loss" in r]
        final = next((r["loss"] for r in reversed(trainer.history) if r.get("split") == "validation"), float("nan"))
    diverged = diverged or not math.isfinite(final) or any(not math.isfinite(v) or v > 20 for _, v in curve)
    return model, final, curve, diverged


@torch.no_grad()
def _loss(model, task, batches) -> float:
    total = n = 0
    for b in batches:
        loss, k = task.loss(model, b)
        total += float(loss) * k
        n += k
    return total / max(n, 1)


def grad_norms_at_init(cfg, task, seed: int = 0) -> list[float]:
    """Gradient norm of each block's parameters after one backward pass at initialisation."""
    from attnlab.models import build_model

    torch.manual_seed(seed)
    model = build_model(cfg)
    loss, _ = task.loss(model, task.train_batch(8, torch.Generator().manual_seed(seed)))
    loss.backward()
    return [math.sqrt(sum(float(p.grad.pow(2).sum()) for p in b.parameters() if p.grad is not None))
            for b in model.blocks]


def experiment_batchnorm(task, base, steps: int, seed: int = 0) -> tuple[list[dict], dict]:
    rows, curves = [], {}
    for norm in ("layer", "batch", "batch_naive"):
        cfg = base.replace(norm=norm, norm_position="pre")
        model, val, curve, diverged = train_run(cfg, task, steps, 3e-3, steps // 10, 16, seed)
        curves[f"norm={norm}"] = curve
        row = {"norm": norm, "val_loss_eval_mode": val, "diverged": diverged}
        g = torch.Generator().manual_seed(7)
        for bs, frac in ((16, 0.25), (2, 0.25), (16, 0.9)):
            sub = VariableLengthTask(task.lm, min_frac=frac)
            batches = [sub.train_batch(bs, g) for _ in range(max(1, 64 // bs))]
            model.eval()
            eval_loss = _loss(model, sub, batches)
            model.train()  # batch statistics, as during training (no update: no_grad, but running stats move)
            state = {k: v.clone() for k, v in model.state_dict().items()}
            train_loss = _loss(model, sub, batches)
            model.load_state_dict(state)
            model.eval()
            row[f"gap_b{bs}_len{int(frac * 100)}%+"] = train_loss - eval_loss
        rows.append(row)
    return rows, curves


def experiment_placement(task, base, steps: int, depths: list[int], seed: int = 0) -> tuple[list[dict], dict]:
    rows, curves = [], {}
    for place in ("pre", "post", "sandwich"):
        for depth in depths:
            cfg = base.replace(norm="layer", norm_position=place, n_layers=depth)
            norms = grad_norms_at_init(cfg, task, seed)
            for warmup in (0, steps // 5):
                _, val, curve, diverged = train_run(cfg, task, steps, 3e-3, warmup, 16, seed)
                curves[f"{place} L={depth} warmup={warmup}"] = curve
                rows.append({"placement": place, "depth": depth, "warmup": warmup, "diverged": diverged,
                             "val_loss": val, "grad_norm_first_block": norms[0], "grad_norm_last_block": norms[-1],
                             "first/last": norms[0] / max(norms[-1], 1e-12)})
    return rows, curves


def plot(curves: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, pts in curves.items():
        if pts:
            ax.plot(*zip(*pts), label=name, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title(title)
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def build_task(seq_len: int, max_files: int | None):
    from attnlab.tokenizer import train_bpe
    from attnlab.training.corpus import load_corpus
    from attnlab.training.data import TokenWindows, build_shards
    from attnlab.training.losses import LMTask

    corpus = load_corpus(max_files=max_files)
    tok = train_bpe(corpus.documents["train"], 1024)
    shards = build_shards(corpus, tok)
    lm = LMTask(TokenWindows(shards["train"], seq_len), TokenWindows(shards["validation"], seq_len))
    return VariableLengthTask(lm), tok.vocab_size


def main(argv: list[str]) -> int:
    from attnlab.config import ModelConfig

    p = parser("attnlab bench norms", "BatchNorm vs LayerNorm on padded batches; Pre vs Post vs sandwich norm.")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--depths", type=int, nargs="+", default=[2, 6, 12])
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--max-files", type=int, default=150, help="corpus files to use (speed)")
    p.add_argument("--quick", action="store_true", help="60 steps, depths 2 and 6")
    p.add_argument("--json", default=None)
    p.add_argument("--plot-prefix", default=None, help="write PREFIX_batchnorm.png and PREFIX_placement.png")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.depths = 60, [2, 6]
    task, vocab = build_task(args.seq_len, args.max_files)
    base = ModelConfig(vocab_size=vocab, d_model=64, n_layers=2, n_heads=4, d_ff=192, max_seq_len=args.seq_len,
                       attention_kernel="sdpa")
    bn_rows, bn_curves = experiment_batchnorm(task, base, args.steps)
    pl_rows, pl_curves = experiment_placement(task, base, args.steps, args.depths)
    print(f"machine: {machine()}")
    print(markdown_table(bn_rows, list(bn_rows[0])))
    print()
    print(markdown_table(pl_rows, list(pl_rows[0])))
    if args.plot_prefix:
        plot(bn_curves, f"{args.plot_prefix}_batchnorm.png", "LayerNorm vs BatchNorm, variable-length batches")
        plot(pl_curves, f"{args.plot_prefix}_placement.png", "Pre vs Post vs sandwich norm")
    write_json(args.json, {"machine": machine(), "batchnorm": bn_rows, "placement": pl_rows})
    return 0
