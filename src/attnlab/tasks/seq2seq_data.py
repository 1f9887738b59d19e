"""Training an encoder-decoder on a built-in task (``attnlab train --task numbers``).

Batches are right-padded sources and targets; the decoder input is ``<s> target`` and the label
``target </s>`` (teacher forcing); the loss is label-smoothed cross-entropy over real target tokens.
Evaluation adds exact-match accuracy of greedy decoding on validation examples.

Shape legend: B batch, S source length, T target length, V vocab.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.checkpoint import write_json
from attnlab.presets import TASK_MODELS
from attnlab.tasks.numbers import TASKS, char_tokenizer, make_task

PAD, START, END = 0, 1, 2
DEFAULT_MODEL = {**TASK_MODELS["numbers"], "pad_token_id": PAD, "decoder_start_token_id": START, "eos_token_id": END}


def encode_pairs(tok, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    return [(tok.encode(s), tok.encode(t)) for s, t in pairs]


def collate(examples: list[tuple[list[int], list[int]]]) -> dict[str, Tensor]:
    S = max(len(s) for s, _ in examples)
    T = max(len(t) for _, t in examples) + 1
    B = len(examples)
    src = torch.full((B, S), PAD, dtype=torch.long)
    tgt_in = torch.full((B, T), PAD, dtype=torch.long)
    tgt_out = torch.full((B, T), PAD, dtype=torch.long)
    for i, (s, t) in enumerate(examples):
        src[i, :len(s)] = torch.tensor(s)
        tgt_in[i, :len(t) + 1] = torch.tensor([START] + t)
        tgt_out[i, :len(t) + 1] = torch.tensor(t + [END])
    return {"src": src, "src_mask": (src != PAD).long(), "tgt_in": tgt_in, "tgt_out": tgt_out,
            "tgt_mask": (tgt_out != PAD).long()}


class Seq2SeqTask:
    """Source -> target pairs with teacher forcing: a ``training.losses.Task`` (batches, loss, metrics, and exact
    match as the extra evaluation)."""

    def __init__(self, train: list, validation: list, *, label_smoothing: float = 0.1, eval_examples: int = 256) -> None:
        self.train_examples, self.validation = train, validation
        self.label_smoothing = label_smoothing
        self.eval_examples = eval_examples

    def train_batch(self, batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
        idx = torch.randint(0, len(self.train_examples), (batch_size,), generator=generator).tolist()
        return collate([self.train_examples[i] for i in idx])

    def eval_batches(self, n: int) -> list[dict[str, Tensor]]:
        ex = self.validation[: self.eval_examples]
        return [collate(ex[i:i + 64]) for i in range(0, len(ex), 64)]

    def loss(self, model, batch: dict[str, Tensor], *, context_parallel=None) -> tuple[Tensor, int]:
        logits = model(batch["tgt_in"], encoder_input_ids=batch["src"], encoder_attention_mask=batch["src_mask"])
        mask = batch["tgt_mask"].bool()
        smoothing = self.label_smoothing if model.training else 0.0
        loss = F.cross_entropy(logits[mask].float(), batch["tgt_out"][mask], label_smoothing=smoothing)
        return loss, int(mask.sum())

    def metrics(self, mean_loss: float) -> dict[str, float]:
        return {"loss": mean_loss, "ppl": math.exp(min(mean_loss, 50.0))}

    def evaluate_extra(self, model) -> dict[str, float]:
        return {"exact_match": exact_match(model, self.validation[: self.eval_examples])}


@torch.no_grad()
def exact_match(model, examples: list[tuple[list[int], list[int]]], *, num_beams: int = 1, batch: int = 128) -> float:
    """Fraction of examples whose decoded output equals the target exactly."""
    from attnlab.inference.beam import beam_search
    from attnlab.inference.generate import generate

    was = model.training
    model.eval()
    hits = 0
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        b = collate(chunk)
        longest = max(len(t) for _, t in chunk) + 2
        if num_beams == 1:
            out = generate(model, b["src"], longest, attention_mask=b["src_mask"], eos_token_id=END)
        else:
            out = beam_search(model, b["src"], longest, num_beams=num_beams, eos_token_id=END,
                              attention_mask=b["src_mask"], pad_token_id=PAD)
        for row, (_, t) in zip(out[:, 1:].tolist(), chunk):
            pred = row[: row.index(END)] if END in row else row
            hits += pred == t
    model.train(was)
    return hits / max(1, len(examples))


def build_task_run(task: str, model_fields: dict, *,
                   seed: int = 0) -> tuple[Seq2SeqTask, dict, Callable[[Path], None], str]:
    """(task, model fields, extra_files writer, description) for ``attnlab train --task``."""
    if task not in TASKS:
        raise ValueError(f"--task {task!r} is not a built-in task; choose one of: {', '.join(TASKS)}")
    data = make_task(task)
    tok = char_tokenizer()
    train, val, test = (encode_pairs(tok, p) for p in (data.train, data.validation, data.test))
    fields = {**DEFAULT_MODEL, **model_fields, "vocab_size": tok.vocab_size}
    longest = max(max(len(s), len(t) + 1) for s, t in train + val + test)
    fields["max_seq_len"] = max(fields.get("max_seq_len", 128), longest + 2)

    def extra_files(directory: Path) -> None:
        tok.save(directory)
        write_json(directory / "task.json", {"task": task})

    info = f"task {task}: {len(train)} train / {len(val)} validation / {len(test)} test pairs"
    return Seq2SeqTask(train, val), fields, extra_files, info


def test_split(task: str, tok=None) -> list[tuple[list[int], list[int]]]:
    tok = tok or char_tokenizer()
    return encode_pairs(tok, make_task(task).test)


def cross_attention(model, src_ids: list[int], tgt_ids: list[int]) -> Tensor:
    """Mean over heads of the last decoder layer's cross-attention probabilities, (T, S) for ``<s> tgt``."""
    from attnlab.attention.probabilities import attention_probabilities

    attn = model.decoder.blocks[-1].cross_attn
    got = {}

    def hook(mod, args, kwargs, output):
        got["p"] = attention_probabilities(mod, args[0], memory=kwargs["memory"])[0].mean(0)  # (T, S)

    handle = attn.register_forward_hook(hook, with_kwargs=True)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.tensor([[START] + tgt_ids]), encoder_input_ids=torch.tensor([src_ids]))
    finally:
        handle.remove()
        model.train(was)
    return got["p"]
