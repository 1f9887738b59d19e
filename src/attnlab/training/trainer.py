"""The trainer: AdamW with weight-decay groups, linear warmup + cosine decay, gradient clipping and
accumulation, optional bf16 autocast, periodic evaluation, progress bar, metrics JSONL and a loss plot,
atomic checkpoints with bit-exact resume, DDP and context parallelism under torchrun.

It knows nothing about the model: a *task* (``training/losses.py``) hands it batches and a loss.

Layout of ``out``: ``config.json`` + ``model.safetensors`` (+ tokenizer files) — always a loadable model
directory, refreshed at every save — ``checkpoints/step-NNNNNNN/`` (full training state, the last
``keep_last`` kept), ``best/`` (the best validation loss so far), ``metrics.jsonl``, ``loss.png``.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from attnlab.atomic import TMP_MARK, atomic_write_text
from attnlab.checkpoint import (
    WEIGHTS_NAME,
    atomic_write_dir,
    clean_leftovers,
    load_state_checked,
    read_config,
    read_weights,
    save_model,
    write_model_files,
)
from attnlab.commands.args import ALIASES, TORCH_NAMES, torch_dtype
from attnlab.config import check_field_types
from attnlab.figures import save_figure
from attnlab.training.distributed import DistContext
from attnlab.training.losses import Task
from attnlab.training.state import (
    RNG_FILE,
    STATE_FILE,
    check_optimizer_state,
    is_complete,
    load_training_state,
    save_training_state,
)

SAVE_DTYPES = tuple(TORCH_NAMES)  # what TrainConfig.save_dtype may name: fp32, bf16, fp16


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0
    bf16: bool = False
    eval_every: int = 200
    eval_windows: int = 32
    log_every: int = 10
    save_every: int = 500
    keep_last: int = 2
    seed: int = 0
    max_time: float | None = None  # seconds; stop cleanly (with a checkpoint) when exceeded
    save_dtype: str = "fp32"  # precision of the weights in out/ and best/: fp32, bf16 or fp16 (commands.args)

    def validate(self) -> TrainConfig:
        check_field_types(asdict(self), TrainConfig)  # types first: --set or a config file may hold any JSON
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "log_every", "save_every", "keep_last"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup < 0 or self.clip < 0:
            raise ValueError("need lr > 0, 0 <= min_lr_ratio <= 1, warmup >= 0 and clip >= 0")
        self.save_dtype = ALIASES.get(self.save_dtype, self.save_dtype)  # runs saved before the short names
        if self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"save_dtype={self.save_dtype!r}: choose {', '.join(SAVE_DTYPES)} (or float32, bfloat16, "
                             f"float16)")
        return self


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on biases, norm gains, embeddings or per-head scalars."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_matrix = p.dim() >= 2 and "embed" not in name
        (decay if is_matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def read_metrics(out: str | Path) -> list[dict]:
    """The records of a run directory's ``metrics.jsonl`` (training rows, evaluations), in order; [] if none."""
    path = Path(out) / "metrics.jsonl"
    if not path.is_file():
        return []
    return metric_records(path.read_text(), path)


def metric_records(text: str, path: Path) -> list[dict]:
    """The JSON records of a ``metrics.jsonl`` text. The file is an append-only log (one short ``write`` per
    record), so the one damage a crash can leave is a torn last line: it is dropped. Any other bad line is
    an error naming the file."""
    lines = [line for line in text.splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not a JSON record; the run's metrics log is damaged") from None
    return records


class Trainer:
    def __init__(self, model: nn.Module, task: Task, cfg: TrainConfig, out: str | Path, *,
                 extra_files: Callable[[Path], None] | None = None, dist_ctx: DistContext | None = None,
                 progress: bool = True, verbose: bool = True, run: dict | None = None) -> None:
        self.cfg = cfg.validate()
        self.model, self.task, self.out = model, task, Path(out)
        self.extra_files = extra_files
        self.run = dict(run or {})  # the command's settings beyond TrainConfig (data, task, ...), kept for --resume
        self.dist = dist_ctx or DistContext.single()
        self.progress = progress and self.dist.is_main
        self.verbose = verbose
        self.net = self.dist.wrap(model)
        self.opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                     fused=False, foreach=False)
        self.step = 0
        self.best = float("inf")
        self.generator = torch.Generator().manual_seed(cfg.seed * 1000 + self.dist.data_rank)
        self.stop_requested = False
        self.history: list[dict] = []
        self.tokens_seen = 0  # since this process started (a rate, not part of the checkpoint)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_dirs(self) -> list[Path]:
        """The complete checkpoints of ``out``, oldest first (a killed save leaves none half-written)."""
        return complete_checkpoints(self.out)

    def _rng_state(self) -> dict[str, torch.Tensor]:
        mine = {"torch": torch.get_rng_state(), "data": self.generator.get_state()}
        return {f"{k}.{r}": v for k, v in mine.items() for r, v in enumerate(self.dist.gather_tensor(v))}

    def save(self) -> None:
        """A new ``checkpoints/step-N`` (written aside, renamed into place), then ``out``'s model files."""
        rng = self._rng_state()  # collective: every rank takes part
        if not self.dist.is_main:
            return
        dtype = torch_dtype(self.cfg.save_dtype)
        state = {"step": self.step, "best": self.best if math.isfinite(self.best) else None,
                 "train_config": asdict(self.cfg), "world": self.dist.world, "run": self.run}

        def extra(tmp: Path) -> None:
            save_training_state(tmp, optimizer=self.opt, rng=rng, state=state)
            if self.extra_files:
                self.extra_files(tmp)

        ckpt = self.out / "checkpoints" / f"step-{self.step:07d}"
        save_model(self.model, ckpt, extra_files=extra, overwrite=True)  # full precision, atomic
        for old in self.checkpoint_dirs()[:-self.cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        self._refresh_model_dir(dtype)

    def _refresh_model_dir(self, dtype: torch.dtype) -> None:
        """Keep ``out`` itself a loadable model directory (each file replaced atomically)."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.extra_files:  # tokenizer first: once config.json is there, the directory is complete
            self.extra_files(self.out)
        write_model_files(self.model, self.out, dtype=dtype)

    def resume(self) -> None:
        dirs = self.checkpoint_dirs()
        if not dirs:
            raise ValueError(f"--resume: nothing to resume in {self.out} (no complete checkpoints/step-*); "
                             f"start without --resume")
        latest = dirs[-1]
        saved_cfg = read_config(latest)
        if saved_cfg != self.model.config:
            diff = {k: (v, getattr(self.model.config, k)) for k, v in saved_cfg.to_dict().items()
                    if getattr(self.model.config, k) != v}
            raise ValueError(f"--resume: the checkpoint in {latest} was trained with a different model config "
                             f"(saved vs requested: {diff}); use the same config or another --out")
        opt_state, rng, state = load_training_state(latest)
        if state.get("world", 1) != self.dist.world:
            raise ValueError(f"--resume: the checkpoint was written by {state.get('world', 1)} processes, this run "
                             f"has {self.dist.world}; resume with the same number of processes")
        load_state_checked(self.model, read_weights(latest / WEIGHTS_NAME), str(latest))
        check_optimizer_state(opt_state, self.opt, latest)
        self.opt.load_state_dict(opt_state)
        rng_file = latest / RNG_FILE
        for key, target in ((f"torch.{self.dist.rank}", torch.get_rng_state()),
                            (f"data.{self.dist.rank}", self.generator.get_state())):
            if key not in rng or rng[key].shape != target.shape or rng[key].dtype != target.dtype:
                raise ValueError(f"{rng_file}: tensor {key!r} is missing or not an RNG state of shape "
                                 f"{tuple(target.shape)}; the checkpoint is damaged")
        torch.set_rng_state(rng[f"torch.{self.dist.rank}"])
        self.generator.set_state(rng[f"data.{self.dist.rank}"])
        try:
            self.step = int(state["step"])
            self.best = float("inf") if state["best"] is None else float(state["best"])
        except (TypeError, ValueError):
            raise ValueError(f"{latest / STATE_FILE}: keys 'step'/'best' must be numbers; the "
                             f"checkpoint is damaged") from None
        if self.dist.is_main:
            self._forget_metrics_after(self.step)

    def _forget_metrics_after(self, step: int) -> None:
        """Drop metrics of steps the resumed run will redo (they were logged after the checkpoint)."""
        path = self.out / "metrics.jsonl"
        if path.is_file():
            kept = [r for r in metric_records(path.read_text(), path) if r.get("step", 0) <= step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    def _start_fresh(self) -> None:
        """A run with no complete checkpoint starts over (a run killed before its first save saved nothing)."""
        if self.dist.is_main:
            self._forget_metrics_after(0)

    # ------------------------------------------------------------------ loop
    def _autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.cfg.bf16 else torch.autocast("cpu", enabled=False)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        total, count = 0.0, 0
        for batch in self.task.eval_batches(self.cfg.eval_windows):
            with self._autocast():
                loss, n = self.task.loss(self.model, batch, context_parallel=self.dist.cp)
            total += self.dist.cp_sum(loss.detach().float()).item() * (n * (self.dist.cp.size if self.dist.cp else 1))
            count += n * (self.dist.cp.size if self.dist.cp else 1)
        metrics = self.task.metrics(total / max(count, 1))
        metrics.update(self.task.evaluate_extra(self.model))  # e.g. exact-match accuracy of a seq2seq task
        self.model.train()
        return metrics

    def train_step(self) -> float:
        cfg = self.cfg
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, cfg)
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(cfg.grad_accum):
            batch = self.task.train_batch(cfg.batch_size, self.generator)
            with self._autocast():
                loss, n_tokens = self.task.loss(self.net, batch, context_parallel=self.dist.cp)
            (loss / cfg.grad_accum).backward()
            # target tokens this step, over the context group and the data-parallel replicas (for tokens/s)
            self.tokens_seen += n_tokens * (self.dist.cp.size if self.dist.cp else 1) * self.dist.data_world
            total += loss.detach().float().item() / cfg.grad_accum
        self.dist.reduce_context_parallel_grads(self.model)
        if cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip)
        self.opt.step()
        self.step += 1
        return self.dist.mean_over_data(self.dist.cp_sum(torch.tensor(total)).item())

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def fit(self, *, resume: bool = False, on_step: Callable[[Trainer], None] | None = None) -> dict:
        """Train until ``steps`` (or ``max_time``, or SIGINT/SIGTERM: a checkpoint is saved first)."""
        from tqdm import tqdm

        if self.dist.is_main:
            clean_leftovers(self.out)
            clean_leftovers(self.out / "checkpoints")
        if resume and self.checkpoint_dirs():
            self.resume()
        elif self.checkpoint_dirs():
            raise ValueError(f"{self.out} already holds a training run; pass --resume to continue it or choose "
                             f"another --out (nothing was overwritten)")
        else:
            self._start_fresh()
        handlers = self._install_signal_handlers()
        t0 = time.perf_counter()
        tokens_start = self.tokens_seen
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc="train", unit="step", disable=not self.progress,
                   dynamic_ncols=True)
        self.model.train()
        try:
            while self.step < self.cfg.steps:
                loss = self.train_step()
                elapsed = time.perf_counter() - t0
                tok_s = (self.tokens_seen - tokens_start) / max(elapsed, 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}")
                if self.step % self.cfg.log_every == 0:
                    self._log({"step": self.step, "lr": lr_at(self.step - 1, self.cfg), "train_loss": loss,
                               "tokens_per_s": tok_s, "elapsed_s": elapsed})
                last = self.step == self.cfg.steps
                if self.step % self.cfg.eval_every == 0 or last:
                    metrics = self.evaluate()
                    self._log({"step": self.step, "split": "validation", **metrics})
                    if self.dist.is_main and self.verbose:
                        bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
                                  file=sys.stderr)
                    if metrics["loss"] < self.best:
                        self.best = metrics["loss"]
                        if self.dist.is_main:
                            atomic_write_dir(self.out / "best", self._write_best, overwrite=True)
                if on_step is not None:
                    on_step(self)
                over_time = self.cfg.max_time is not None and elapsed > self.cfg.max_time
                stop = self.dist.any_flag(self.stop_requested or over_time)
                if self.step % self.cfg.save_every == 0 or last or stop:
                    self.save()
                if stop:
                    if self.dist.is_main:
                        bar.write(f"stopping at step {self.step} ({'time budget' if over_time else 'signal'}); "
                                  f"continue with --resume", file=sys.stderr)
                    break
        finally:
            bar.close()
            self._restore_signal_handlers(handlers)
        if self.dist.is_main:
            self.plot()
        return {"step": self.step, "best_val_loss": self.best if math.isfinite(self.best) else None,
                "seconds": time.perf_counter() - t0, "interrupted": self.stop_requested}

    def _write_best(self, tmp: Path) -> None:
        write_model_files(self.model, tmp, dtype=torch_dtype(self.cfg.save_dtype))
        if self.extra_files:
            self.extra_files(tmp)

    # ------------------------------------------------------------------ signals, plot
    def _install_signal_handlers(self):
        if threading_main() is False:
            return None

        def request_stop(signum, frame):
            self.stop_requested = True

        return {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}

    @staticmethod
    def _restore_signal_handlers(handlers) -> None:
        for s, h in (handlers or {}).items():
            signal.signal(s, h)

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = read_metrics(self.out)
        train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
        val = [(r["step"], r["loss"]) for r in records if r.get("split") == "validation"]
        if not train and not val:
            return
        fig, ax = plt.subplots(figsize=(6, 3.5))
        if train:
            ax.plot(*zip(*train), label="train", lw=1)
        if val:
            ax.plot(*zip(*val), "o-", label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        save_figure(fig, self.out / "loss.png")


def complete_checkpoints(out: str | Path) -> list[Path]:
    """``out/checkpoints/step-*`` folders that hold a whole training checkpoint, oldest first."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(d for d in root.glob("step-*") if d.is_dir() and TMP_MARK not in d.name and is_complete(d))


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
