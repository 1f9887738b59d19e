"""Passkey retrieval (Mohtashami & Jaggi 2023), the long-context test of the Infini-attention paper.

A passkey of ``n_digits`` digits is hidden at a random depth inside repetitive filler; at the end the
model is asked for it. Token-level and self-contained (no tokenizer needed)::

    <bos> filler ... <key> d1 .. dn <key> filler ... <query> d1 .. dn

The filler is a fixed cycle of "sentences" (like the paper's "The grass is green. The sky is blue."),
so it carries no information; only the passkey does. Training uses short sequences; evaluation asks at
1x, 4x, 16x, 64x that length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

PAD, BOS, KEY, QUERY = 0, 1, 2, 3
DIGIT0 = 4  # digits are tokens 4..13
FILLER0 = 14
N_FILLER = 18
VOCAB_SIZE = FILLER0 + N_FILLER
SENTENCES = [[14, 15, 16, 17, 31], [18, 15, 19, 20, 31], [21, 22, 23, 24, 25, 31], [26, 27, 28, 29, 30, 31]]


def filler(length: int, offset: int = 0) -> list[int]:
    cycle = [t for s in SENTENCES for t in s]
    return [cycle[(offset + i) % len(cycle)] for i in range(length)]


def make_example(length: int, generator: torch.Generator, n_digits: int = 5,
                 depth: float | None = None) -> tuple[list[int], list[int]]:
    """(sequence of ``length`` tokens ending with the answer, the answer's digit tokens)."""
    body = length - 1 - (n_digits + 2) - 1 - n_digits  # bos, key block, query, answer
    if body < 1:
        raise ValueError(f"length={length} is too short for a {n_digits}-digit passkey")
    digits = torch.randint(0, 10, (n_digits,), generator=generator).tolist()
    if depth is None:
        depth = float(torch.rand((), generator=generator))
    before = int(round(depth * body))
    key = [DIGIT0 + d for d in digits]
    seq = [BOS] + filler(before) + [KEY] + key + [KEY] + filler(body - before, before) + [QUERY] + key
    assert len(seq) == length
    return seq, key


def batch(n: int, length: int, generator: torch.Generator, n_digits: int = 5) -> tuple[Tensor, Tensor]:
    """(ids (n, length), loss mask (n, length - 1): 1 on the positions that predict answer digits)."""
    ids, mask = [], []
    for _ in range(n):
        seq, _ = make_example(length, generator, n_digits)
        ids.append(seq)
        m = [0] * (length - 1)
        for i in range(length - 1 - n_digits, length - 1):
            m[i] = 1
        mask.append(m)
    return torch.tensor(ids), torch.tensor(mask)


def window_prompt(prompt: Tensor, window: int) -> Tensor:
    """The last ``window`` tokens of prompts (B, T), the first of them replaced by <bos>: what a model with a
    ``window``-token context sees of a longer input (its training inputs always began with <bos>)."""
    if window < 2:
        raise ValueError(f"window={window} must be at least 2 tokens")
    if prompt.shape[1] <= window:
        return prompt
    cut = prompt[:, -window:].clone()
    cut[:, 0] = BOS
    return cut


@torch.inference_mode()
def retrieval_accuracy(model, length: int, n: int, seed: int = 0, n_digits: int = 5, *, window: int | None = None,
                       batch_size: int = 16) -> float:
    """Fraction of ``n`` examples of ``length`` tokens whose whole passkey the model reproduces greedily after
    <query>. ``window``: the model sees only the last ``window`` tokens of the prompt (a fixed-context baseline);
    otherwise the whole prompt goes through ``generate`` (an Infini model streams it through its state)."""
    from attnlab.inference.generate import generate

    if n < 1 or batch_size < 1:
        raise ValueError(f"need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    gen = torch.Generator().manual_seed(seed)
    hits = 0
    for start in range(0, n, batch_size):
        examples = [make_example(length, gen, n_digits) for _ in range(min(batch_size, n - start))]
        prompt = torch.tensor([seq[:-n_digits] for seq, _ in examples])  # (B, length - n_digits)
        if window is not None:
            prompt = window_prompt(prompt, window - n_digits)
        out = generate(model, prompt, n_digits)[:, -n_digits:]  # (B, n_digits)
        hits += int((out == torch.tensor([key for _, key in examples])).all(dim=1).sum())
    return hits / n


class PasskeyTask:
    """Passkey retrieval for the ordinary ``Trainer``: batches of examples, loss on the answer digits only.

    ``lengths``: each training batch draws its length from these (a mixture of short and full-length
    examples: the short ones teach reading the answer out, the long ones carrying it across segments).
    Validation uses fixed examples of ``length`` tokens; ``evaluate_extra`` adds retrieval accuracy.
    """

    def __init__(self, length: int, *, lengths: tuple[int, ...] | None = None, n_digits: int = 5,
                 eval_examples: int = 32, seed: int = 12345) -> None:
        self.length, self.n_digits = length, n_digits
        self.lengths = tuple(lengths) if lengths else (length,)
        for n in self.lengths + (length,):
            make_example(n, torch.Generator().manual_seed(0), n_digits)  # raises if too short
        self.eval_examples, self.seed = eval_examples, seed

    def train_batch(self, batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
        length = self.lengths[int(torch.randint(0, len(self.lengths), (), generator=generator))]
        ids, mask = batch(batch_size, length, generator, self.n_digits)
        return {"ids": ids, "mask": mask}

    def eval_batches(self, n: int) -> list[dict[str, Tensor]]:
        gen = torch.Generator().manual_seed(self.seed)
        out = []
        for start in range(0, n, 16):
            ids, mask = batch(min(16, n - start), self.length, gen, self.n_digits)
            out.append({"ids": ids, "mask": mask})
        return out

    @staticmethod
    def loss(model, batch: dict[str, Tensor], *, context_parallel=None) -> tuple[Tensor, int]:
        if context_parallel is not None:
            raise ValueError("the passkey task does not support context parallelism")
        ids, mask = batch["ids"], batch["mask"].bool()
        logits = model(ids[:, :-1])  # (B, T - 1, V)
        target = ids[:, 1:][mask]  # (B * n_digits,)
        return F.cross_entropy(logits[mask].float(), target), int(target.numel())

    def metrics(self, mean_loss: float) -> dict[str, float]:
        return {"loss": mean_loss, "ppl": math.exp(min(mean_loss, 50.0))}

    def evaluate_extra(self, model) -> dict[str, float]:
        return {"retrieval": retrieval_accuracy(model, self.length, self.eval_examples, seed=self.seed,
                                                n_digits=self.n_digits, window=None
                                                if model.config.unbounded_context else model.config.max_seq_len)}
