"""What the trainer optimises, per kind of data. The trainer knows nothing about models: a ``Task`` gives it
batches and a ``loss(model, batch) -> (mean loss, number of target tokens)``.

- ``LMTask``: next-token prediction on token windows (decoder, RWKV and Infini families).
- ``Seq2SeqTask`` (in attnlab.tasks.seq2seq_data): source -> target pairs with teacher forcing.

Shape legend: B batch, T window length, V vocab.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.training.data import TokenWindows


class Task(Protocol):
    """What ``Trainer`` needs of a task (every task in attnlab implements all five)."""

    def train_batch(self, batch_size: int, generator: torch.Generator) -> Any:
        """A training batch, drawn with ``generator`` (its state is checkpointed: resume redraws the same)."""

    def eval_batches(self, n: int) -> Sequence[Any]:
        """Fixed validation batches (the same at every evaluation)."""

    def loss(self, model: torch.nn.Module, batch: Any, *, context_parallel: Any = None) -> tuple[Tensor, int]:
        """(mean loss over the batch's target tokens, their number)."""

    def metrics(self, mean_loss: float) -> dict[str, float]:
        """What an evaluation reports from the mean validation loss (``"loss"`` included)."""

    def evaluate_extra(self, model: torch.nn.Module) -> dict[str, float]:
        """Metrics beyond the loss (exact match, BLEU, acceptance, ...); ``{}`` when there are none."""


class LMTask:
    """Causal language modelling: predict token t + 1 from tokens <= t."""

    families = ("decoder", "rwkv")

    def __init__(self, train: TokenWindows, validation: TokenWindows, *, bytes_per_token: float | None = None) -> None:
        self.train, self.validation = train, validation
        self.bytes_per_token = bytes_per_token  # for bits per byte

    def train_batch(self, batch_size: int, generator: torch.Generator) -> Tensor:
        return self.train.sample(batch_size, generator)  # (B, T + 1)

    def eval_batches(self, n: int) -> list[Tensor]:
        return self.validation.fixed(n)

    @staticmethod
    def loss(model, batch: Tensor, *, context_parallel=None) -> tuple[Tensor, int]:
        x, y = batch[:, :-1], batch[:, 1:]  # (B, T), (B, T)
        if context_parallel is not None:  # this rank's shard of the sequence, at its global positions
            x, y, positions = context_parallel.shard_batch(x, y)
            logits = model(x, position_ids=positions)
            total = y.numel() * context_parallel.size  # the mean is over the whole sequence
            return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum") / total, y.numel()
        logits = model(x)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()), y.numel()

    def metrics(self, mean_loss: float) -> dict[str, float]:
        out = {"loss": mean_loss, "ppl": math.exp(min(mean_loss, 50.0))}
        if self.bytes_per_token:
            out["bpb"] = mean_loss / math.log(2) / self.bytes_per_token
        return out

    def evaluate_extra(self, model) -> dict[str, float]:
        return {}
