"""Passkey retrieval (Mohtashami & Jaggi 2023), the long-context test of the Infini-attention paper.

A passkey of ``n_digits`` digits is hidden at a random depth inside repetitive filler; at the end the
model is asked for it. Token-level and self-contained (no tokenizer needed)::

    <bos> filler ... <key> d1 .. dn <key> filler ... <query> d1 .. dn

The filler is a fixed cycle of "sentences" (like the paper's "The grass is green. The sky is blue."),
so it carries no information; only the passkey does. Training uses short sequences; evaluation asks at
1x, 4x, 16x, 64x that length.
"""

from __future__ import annotations

import torch
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


@torch.inference_mode()
def retrieval_accuracy(model, length: int, n: int, seed: int = 0, n_digits: int = 5) -> float:
    """Fraction of examples whose whole passkey the model reproduces greedily after <query>."""
    from attnlab.inference.generate import generate

    gen = torch.Generator().manual_seed(seed)
    hits = 0
    for _ in range(n):
        seq, key = make_example(length, gen, n_digits)
        prompt = torch.tensor([seq[:-n_digits]])
        out = generate(model, prompt, n_digits)
        hits += out[0, -n_digits:].tolist() == key
    return hits / n
