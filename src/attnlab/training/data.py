"""Token data: a corpus tokenised once into packed shards on disk, then windows for training and eval.

Each split becomes one flat uint16 (vocab < 65,536) or uint32 array — documents joined with the
end-of-text token — stored as ``<split>.bin`` (a numpy memmap) with a JSON manifest recording the corpus
fingerprint (sources and contents) and the tokenizer hash. A cache whose manifest does not match is
rebuilt, never silently reused.

Training windows start at random offsets drawn from a seeded ``torch.Generator`` (its state is part of the
checkpoint, so a resumed run reads the same windows); validation windows are fixed, evenly spaced.
Shape legend: B batch, T window length.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from attnlab.atomic import atomic_write_file, atomic_write_text
from attnlab.cachedir import cache_dir
from attnlab.tokenizer import EOS, Tokenizer
from attnlab.training.corpus import SPLITS, Corpus

MANIFEST = "manifest.json"


def default_cache_dir() -> Path:
    return cache_dir("data")


def separator_id(tok: Tokenizer) -> int:
    """The id of ``<|endoftext|>``, which joins documents in the shards (whatever token ends a chat turn)."""
    i = tok.token_to_id(EOS)
    if i is None:
        raise ValueError(f"the tokenizer has no {EOS} token to separate documents; train it with attnlab (or add "
                         f"the token)")
    return i


def _encode_split(tok: Tokenizer, docs: list[str], dtype: np.dtype) -> np.ndarray:
    eos = separator_id(tok)
    parts = []
    for start in range(0, len(docs), 256):
        for ids in tok.encode_batch(docs[start:start + 256]):
            parts.append(np.asarray(ids, dtype=dtype))
            parts.append(np.asarray([eos], dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def build_shards(corpus: Corpus, tok: Tokenizer, cache_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    """Tokenise each split (or reuse a cache whose manifest matches) and return memmapped arrays."""
    key = {"corpus": corpus.fingerprint(), "tokenizer": tok.fingerprint(), "version": 1}
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / f"{key['corpus']}-{key['tokenizer']}"
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    manifest = folder / MANIFEST
    fresh = manifest.is_file() and json.loads(manifest.read_text()).get("key") == key and all(
        (folder / f"{s}.bin").is_file() for s in SPLITS)
    if not fresh:
        folder.mkdir(parents=True, exist_ok=True)
        sizes = {}
        for split in SPLITS:
            arr = _encode_split(tok, corpus.documents.get(split, []), dtype)
            # a unique temporary name: several processes may build the same shared cache at once
            atomic_write_file(folder / f"{split}.bin", arr.tofile)
            sizes[split] = int(arr.size)
        atomic_write_text(manifest, json.dumps({"key": key, "dtype": np.dtype(dtype).name, "tokens": sizes,
                                                "corpus": corpus.name}, indent=1))
    meta = json.loads(manifest.read_text())
    out = {}
    for split in SPLITS:
        n = meta["tokens"][split]
        out[split] = (np.memmap(folder / f"{split}.bin", dtype=meta["dtype"], mode="r", shape=(n,)) if n
                      else np.zeros(0, dtype=meta["dtype"]))
    return out


class TokenWindows:
    """Contiguous windows of T + 1 tokens (inputs and shifted targets) from one split."""

    def __init__(self, tokens: np.ndarray, seq_len: int, *, name: str = "train") -> None:
        if tokens.size < seq_len + 1:
            raise ValueError(f"the {name} split has {tokens.size} tokens, fewer than one window of {seq_len + 1}; "
                             f"use a shorter --seq-len or more data")
        self.tokens, self.seq_len = tokens, seq_len

    def _gather(self, starts: Tensor) -> Tensor:
        rows = [np.asarray(self.tokens[s:s + self.seq_len + 1], dtype=np.int64) for s in starts.tolist()]
        return torch.from_numpy(np.stack(rows))  # (B, T + 1)

    def sample(self, batch: int, generator: torch.Generator) -> Tensor:
        starts = torch.randint(0, self.tokens.size - self.seq_len, (batch,), generator=generator)
        return self._gather(starts)

    def fixed(self, n_windows: int) -> list[Tensor]:
        """Deterministic, evenly spaced windows covering the split (for evaluation), one per row."""
        last = self.tokens.size - self.seq_len - 1
        n = max(1, min(n_windows, last // self.seq_len + 1))
        starts = torch.linspace(0, last, n).long()
        return [self._gather(starts[i:i + 1]) for i in range(n)]


def unigram_cross_entropy(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int) -> float:
    """Nats per token of the best context-free model: token frequencies of the training split (add-one
    smoothed) scored on the evaluation split. A language model must beat this to have learnt context."""
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(eval_tokens, dtype=np.int64)].mean())
