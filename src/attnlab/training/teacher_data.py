"""Teacher-labelled sequences for distilling a speculative draft (``attnlab data teacher``).

A draft is worth what it agrees with the target *on the text the target itself produces*: greedy
speculative decoding accepts a drafted token exactly when it is the target's argmax after the target's
own continuation so far. So the data here is on-policy (sequence-level distillation, Kim & Rush 2016; the
DistillSpec recipe of Zhou et al. 2024): prompts cut from the *training* split of a corpus, each continued
greedily by the teacher, and at every position of prompt + continuation the teacher's top-K next-token
log-probabilities (a sparse soft label, Hinton et al. 2015).

Every position's label comes from the same decode that produced the text: the prompt's positions from
the prefill call, each generated position from the step that fed it. No second forward pass is needed,
and the labels describe the exact text stored.

On disk, ``--out`` holds ``manifest.json`` (teacher, tokenizer hash, settings) and shards
``<split>-<index>.npz`` with ``ids`` (N, L + 1) int32, ``topk_ids`` (N, L, K) int32, ``topk_logp``
(N, L, K) float16, ``prompt`` (N,) the prompt's length and ``length`` (N,) — the number of valid label positions per row (a row that emits an
end-of-text token stops there). Position ``i``'s label is the teacher's distribution over token ``i + 1``.
Shards are written atomically and named by index, with prompts drawn from a generator seeded by
(seed, split, index): an interrupted run continues where it stopped and gives the same files.

Shape legend: N sequences, B batch, L label positions (prompt + new tokens), K top-K, V vocab.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from attnlab.atomic import atomic_write_file, atomic_write_text

MANIFEST = "manifest.json"
VERSION = 1


def _prompt_batch(docs: list[list[int]], batch: int, length: int, generator: torch.Generator) -> Tensor:
    """``batch`` windows of ``length`` tokens at random offsets of random documents long enough to hold one."""
    rows = []
    while len(rows) < batch:
        d = docs[int(torch.randint(0, len(docs), (1,), generator=generator))]
        start = int(torch.randint(0, len(d) - length + 1, (1,), generator=generator))
        rows.append(d[start:start + length])
    return torch.tensor(rows, dtype=torch.long)


@torch.inference_mode()
def label_batch(teacher, prompts: Tensor, new_tokens: int, k: int, stop_ids: set[int]) -> dict[str, np.ndarray]:
    """Greedy continuation of ``prompts`` (B, P) by ``teacher`` with its top-``k`` log-probabilities at every
    position; returns one shard's arrays for these B rows."""
    B, P = prompts.shape
    cache, prompt, mask = teacher.begin_generation(prompts, None, new_tokens)
    logits = teacher(prompt, cache=cache, attention_mask=mask).float()  # (B, P, V)
    ids, tops, logps = [prompts], [], []
    for step in range(new_tokens + 1):
        logp = torch.log_softmax(logits, dim=-1)
        top = logp.topk(k, dim=-1)
        tops.append(top.indices.to(torch.int32))
        logps.append(top.values.to(torch.float16))
        nxt = top.indices[:, -1, :1]  # (B, 1): the greedy token
        ids.append(nxt)
        if step == new_tokens:
            break
        logits = teacher(nxt, cache=cache).float()  # (B, 1, V)
    seq = torch.cat(ids, dim=1)  # (B, P + new + 1)
    L = seq.shape[1] - 1
    length = np.full(B, L, dtype=np.int32)
    for b in range(B):
        for i in range(P, L):  # the first generated end-of-text token: nothing after it is the teacher's text
            if int(seq[b, i]) in stop_ids:
                length[b] = i
                break
    return {"ids": seq.numpy().astype(np.int32), "topk_ids": torch.cat(tops, 1).numpy(),
            "topk_logp": torch.cat(logps, 1).numpy(), "length": length, "prompt": np.full(B, P, dtype=np.int32)}


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez would add ".npz" to a path
            np.savez(fh, **arrays)

    atomic_write_file(path, write)


def build_teacher_data(teacher, tokenizer, docs: dict[str, list[str]], out: str | Path, *, sequences: dict[str, int],
                       prompt_lengths: tuple[int, ...] = (64, 128), new_tokens: int = 128, batch: int = 8,
                       k: int = 8, seed: int = 0, teacher_name: str = "", progress: bool = True) -> dict:
    """Write ``sequences[split]`` teacher-labelled rows per split (rounded up to whole batches) into ``out``."""
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"version": VERSION, "teacher": teacher_name, "vocab_size": teacher.config.vocab_size,
                "tokenizer": tokenizer_fingerprint(tokenizer), "prompt_lengths": list(prompt_lengths),
                "new_tokens": new_tokens, "batch": batch, "k": k, "seed": seed}
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old.get("settings") != settings:
            diff = sorted(key for key in settings if old.get("settings", {}).get(key) != settings[key])
            raise ValueError(f"{out} holds teacher data made with other settings ({', '.join(diff)}); "
                             f"choose another --out or the same settings to continue it")
    stop_ids = {i for i in (tokenizer.eos_token_id, teacher.config.eos_token_id) if i is not None}
    longest = max(prompt_lengths)
    counts = {}
    for split, n in sequences.items():
        encoded = [ids for ids in (tokenizer.encode(d) for d in docs.get(split, [])) if len(ids) >= longest]
        if not encoded:
            raise ValueError(f"the {split} split has no document of {longest} tokens or more to cut prompts from")
        shards = -(-n // batch)
        bar = tqdm(range(shards), desc=f"teacher data ({split})", unit="batch", disable=not progress)
        for index in bar:
            path = out / f"{split}-{index:05d}.npz"
            if path.is_file():
                continue  # made by an earlier, interrupted run with the same settings
            g = torch.Generator().manual_seed(hash_seed(seed, split, index))
            length = prompt_lengths[int(torch.randint(0, len(prompt_lengths), (1,), generator=g))]
            _write_npz(path, label_batch(teacher, _prompt_batch(encoded, batch, length, g), new_tokens, k, stop_ids))
        counts[split] = shards * batch
    manifest = {"settings": settings, "sequences": counts}
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1) + "\n")
    return manifest


def hash_seed(seed: int, split: str, index: int) -> int:
    return (seed * 1_000_003 + sum(ord(c) * 31 ** i for i, c in enumerate(split)) * 7919 + index) % 2**62


def tokenizer_fingerprint(tokenizer) -> str:
    """The tokenizer's fingerprint, short (what a teacher-data folder records)."""
    return tokenizer.fingerprint()[:16]


class TeacherSequences:
    """The rows of one split of a teacher-data folder, sampled as batches of soft labels."""

    def __init__(self, folder: str | Path, split: str) -> None:
        folder = Path(folder)
        if not (folder / MANIFEST).is_file():
            raise FileNotFoundError(f"{folder}: no {MANIFEST}; make the data with `attnlab data teacher --out {folder}`")
        self.settings = json.loads((folder / MANIFEST).read_text())["settings"]
        paths = sorted(folder.glob(f"{split}-*.npz"))
        if not paths:
            raise ValueError(f"{folder} has no {split} shards; run `attnlab data teacher` with --{split} > 0")
        rows: dict[str, list] = {"ids": [], "topk_ids": [], "topk_logp": [], "length": [], "prompt": []}
        for p in paths:
            try:
                with np.load(p) as z:
                    for key in rows:
                        rows[key].extend(list(z[key]))
            except (OSError, ValueError, KeyError) as exc:
                raise ValueError(f"{p} is not a readable teacher-data shard ({exc}); delete it and re-run "
                                 f"`attnlab data teacher` to remake it") from None
        self.rows = rows
        self.n = len(rows["ids"])

    def gather(self, index: list[int]) -> dict[str, Tensor]:
        """Rows padded to the longest: ``x`` (B, L) inputs, ``topk_ids``/``topk_logp`` (B, L, K), ``mask`` (B, L)
        (valid label positions) and ``generated`` (B, L) (the valid ones whose input the teacher wrote)."""
        L = max(len(self.rows["topk_ids"][i]) for i in index)
        x = torch.zeros(len(index), L, dtype=torch.long)
        ids = torch.zeros(len(index), L, self.settings["k"], dtype=torch.long)
        logp = torch.full((len(index), L, self.settings["k"]), -1e4)
        mask = torch.zeros(len(index), L, dtype=torch.bool)
        generated = torch.zeros(len(index), L, dtype=torch.bool)
        for r, i in enumerate(index):
            n = len(self.rows["topk_ids"][i])
            x[r, :n] = torch.from_numpy(self.rows["ids"][i][:n].astype(np.int64))
            ids[r, :n] = torch.from_numpy(self.rows["topk_ids"][i].astype(np.int64))
            logp[r, :n] = torch.from_numpy(self.rows["topk_logp"][i].astype(np.float32))
            mask[r, :int(self.rows["length"][i])] = True
            generated[r, int(self.rows["prompt"][i]):int(self.rows["length"][i])] = True
        return {"x": x, "topk_ids": ids, "topk_logp": logp, "mask": mask, "generated": generated}

    def sample(self, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
        return self.gather(torch.randint(0, self.n, (batch,), generator=generator).tolist())

    def fixed(self, n: int, batch: int = 8) -> list[dict[str, Tensor]]:
        index = list(range(min(n, self.n)))
        return [self.gather(index[i:i + batch]) for i in range(0, len(index), batch)]


def frequent_tokens(data: TeacherSequences, n: int, *, always: tuple[int, ...] = ()) -> Tensor:
    """The ``n`` tokens a draft's head should score (sorted ids): those the teacher ranks first most often at
    valid positions, ties broken by how often they appear in its top-K at all, then by id; ``always``
    (e.g. the end token) are kept whatever their counts."""
    vocab = data.settings["vocab_size"]
    if not 0 < n <= vocab:
        raise ValueError(f"head_vocab_size={n} must be in [1, {vocab}]")
    first = np.zeros(vocab, dtype=np.int64)
    anywhere = np.zeros(vocab, dtype=np.int64)
    for top, length in zip(data.rows["topk_ids"], data.rows["length"], strict=True):
        valid = top[:int(length)]
        first += np.bincount(valid[:, 0], minlength=vocab)
        anywhere += np.bincount(valid.reshape(-1), minlength=vocab)
    score = first.astype(np.float64) * (anywhere.max() + 1) + anywhere
    score[list(always)] = np.inf
    order = np.lexsort((np.arange(vocab), -score))  # highest score first, then the lower id
    return torch.from_numpy(np.sort(order[:n])).long()
