"""Training and using an English -> Spanish encoder-decoder on the data of ``attnlab.tasks.translation.data``.

- ``TranslationTask``: the ``Seq2SeqTask`` of ``--task numbers`` (teacher forcing, label-smoothed loss)
  with length-bucketed batches (less padding) and a cheap validation BLEU at each evaluation.
- ``build_translation_run``: what ``attnlab train --task translation --data DIR`` trains.
- ``decode``: greedy or beam search for a batch of sources. ``num_beams=1`` is exactly greedy. With
  ``num_beams > 1`` and ``keep_greedy=True`` (the default, what ``translate`` uses) the greedy hypothesis
  competes with the beams' best under the same score (sum log p / length ** length_penalty): beam search
  alone can let the greedy path fall out of its beam, so the result never scores lower than greedy, by
  construction, not by a property of beam search. ``keep_greedy=False`` returns ``beam_search``'s own
  result (tested against an exhaustive and a reference search in tests/inference/test_beam_reference.py).
- ``translate``: text in, text out. Defined edge cases: an empty (or blank) input gives ""; an input longer
  than the model's source context is truncated to ``max_seq_len`` tokens with a ``UserWarning``; any
  character is accepted (the byte-level BPE spells an unseen one as its UTF-8 bytes).
- ``evaluate``: sacreBLEU BLEU and chrF on pairs; ``cross_attention``: the alignment map of one pair.

Shape legend: B batch, S source length, T target length, V vocab.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from attnlab.checkpoint import write_json
from attnlab.presets import TASK_MODELS
from attnlab.tasks.seq2seq_data import END, PAD, START, Seq2SeqTask, collate, cross_attention  # noqa: F401
from attnlab.tasks.translation.data import SOURCE, TARGET, load_split

# the model of `attnlab train --task translation` unless a preset or --set says otherwise
DEFAULT_MODEL = {**TASK_MODELS["translation"], "pad_token_id": PAD, "decoder_start_token_id": START,
                 "eos_token_id": END}


class TranslationTask(Seq2SeqTask):
    def __init__(self, train: list, validation: list, *, tokenizer, validation_text: list[tuple[str, str]],
                 label_smoothing: float = 0.1, eval_examples: int = 256, bleu_examples: int = 64) -> None:
        super().__init__(train, validation, label_smoothing=label_smoothing, eval_examples=eval_examples)
        self.tokenizer, self.validation_text, self.bleu_examples = tokenizer, validation_text, bleu_examples
        self.by_length = sorted(range(len(train)), key=lambda i: (len(train[i][0]) + len(train[i][1]), i))

    def train_batch(self, batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
        """A random batch among neighbours in length order (a window of 16 batches): little padding."""
        n = len(self.by_length)
        width = min(n, 16 * batch_size)
        lo = int(torch.randint(0, n - width + 1, (1,), generator=generator))
        picks = torch.randperm(width, generator=generator)[:batch_size].tolist()
        return collate([self.train_examples[self.by_length[lo + i]] for i in picks])

    def evaluate_extra(self, model) -> dict[str, float]:
        if not self.bleu_examples:
            return {}
        pairs = self.validation_text[: self.bleu_examples]
        return {"bleu": evaluate(model, self.tokenizer, pairs)["bleu"]}


def load_data_tokenizer(data_dir: str | Path):
    from attnlab.tokenizer import Tokenizer

    path = Path(data_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no {path}: make the dataset first with `attnlab data translation --out {data_dir}`")
    return Tokenizer.from_dir(data_dir)


def build_translation_run(data_dir: str | Path | None, model_fields: dict, *,
                          seed: int = 0) -> tuple[TranslationTask, dict, Callable[[Path], None], str]:
    """(task, model fields, extra_files writer, description) for ``attnlab train --task translation``.

    Training and validation pairs longer than the model's context on either side (``max_seq_len`` tokens,
    the target counting its end token) are dropped, not truncated: a cut verse teaches a wrong translation.
    """
    if data_dir is None:
        raise ValueError("--task translation needs --data DIR, made by `attnlab data translation --out DIR`")
    data_dir = Path(data_dir).resolve()
    tok = load_data_tokenizer(data_dir)
    manifest = json.loads((data_dir / "manifest.json").read_text()) if (data_dir / "manifest.json").is_file() else {}
    fields = {**DEFAULT_MODEL, **model_fields, "vocab_size": tok.vocab_size}
    limit = int(fields["max_seq_len"])

    def encoded(split: str) -> tuple[list, list[tuple[str, str]]]:
        rows = load_split(data_dir, split)
        src = tok.encode_batch([r[SOURCE] for r in rows])
        tgt = tok.encode_batch([r[TARGET] for r in rows])
        keep = [i for i in range(len(rows)) if len(src[i]) <= limit and len(tgt[i]) + 1 <= limit]
        return [(src[i], tgt[i]) for i in keep], [(rows[i][SOURCE], rows[i][TARGET]) for i in keep]

    train, _ = encoded("train")
    val, val_text = encoded("validation")
    if not train or not val:
        raise ValueError(f"{data_dir}: no training or validation pair fits max_seq_len={limit} tokens")

    def extra_files(directory: Path) -> None:
        tok.save(directory)
        write_json(directory / "task.json", {"task": "translation", "source": SOURCE, "target": TARGET,
                                             "data": str(data_dir), "pairs_sha256": manifest.get("pairs_sha256")})

    info = (f"task translation {SOURCE}->{TARGET}: {len(train)} train / {len(val)} validation pairs of at most "
            f"{limit} tokens, vocab {tok.vocab_size} ({data_dir})")
    return TranslationTask(train, val, tokenizer=tok, validation_text=val_text), fields, extra_files, info


def _hypotheses(out: Tensor) -> list[list[int]]:
    """Decoder rows (B, 1 + new), filled after EOS with EOS -> new tokens up to and including the first EOS."""
    rows = []
    for row in out[:, 1:].tolist():
        rows.append(row[: row.index(END) + 1] if END in row else row)
    return rows


@torch.no_grad()
def sequence_logprob(model, src: Tensor, src_mask: Tensor, hyps: list[list[int]]) -> list[float]:
    """Sum of log p(token) of each hypothesis (its EOS included) by one teacher-forced forward (B rows)."""
    T = max(1, max(len(h) for h in hyps))
    tgt_in = torch.full((len(hyps), T), PAD, dtype=torch.long)  # (B, T): <s> h[:-1], right-padded
    tgt_out = torch.full((len(hyps), T), PAD, dtype=torch.long)  # (B, T): h
    for i, h in enumerate(hyps):
        tgt_in[i, : len(h)] = torch.tensor(([START] + h)[: len(h)], dtype=torch.long)
        tgt_out[i, : len(h)] = torch.tensor(h, dtype=torch.long)
    real = torch.arange(T)[None] < torch.tensor([len(h) for h in hyps])[:, None]  # (B, T)
    logp = torch.log_softmax(model(tgt_in, encoder_input_ids=src, encoder_attention_mask=src_mask).double(), -1)
    return (logp.gather(-1, tgt_out[..., None])[..., 0] * real).sum(-1).tolist()  # (B,)


def score(logprob: float, length: int, length_penalty: float) -> float:
    return logprob / (max(length, 1) ** length_penalty)  # as attnlab.inference.beam


@torch.no_grad()
def decode(model, src: Tensor, src_mask: Tensor, *, num_beams: int = 1, length_penalty: float = 1.0,
           max_new_tokens: int | None = None, keep_greedy: bool = True) -> list[list[int]]:
    """Best hypothesis per source row: token ids (ending in EOS unless it ran out of length).

    ``keep_greedy`` (beams only): also decode greedily and keep, per row, whichever of the greedy and the
    beam hypothesis scores higher (ties go to the beam); ``False`` gives beam search's result alone."""
    from attnlab.inference.beam import beam_search
    from attnlab.inference.generate import generate

    was = model.training
    model.eval()
    try:
        if max_new_tokens is None:
            max_new_tokens = min(model.config.max_seq_len - 1, 2 * src.shape[1] + 10)
        if num_beams == 1:
            return _hypotheses(generate(model, src, max_new_tokens, attention_mask=src_mask, eos_token_id=END))
        beams = _hypotheses(beam_search(model, src, max_new_tokens, num_beams=num_beams, eos_token_id=END,
                                        length_penalty=length_penalty, attention_mask=src_mask))
        if not keep_greedy:
            return beams
        greedy = _hypotheses(generate(model, src, max_new_tokens, attention_mask=src_mask, eos_token_id=END))
        lp_g = sequence_logprob(model, src, src_mask, greedy)
        lp_b = sequence_logprob(model, src, src_mask, beams)
        return [b if score(sb, len(b), length_penalty) >= score(sg, len(g), length_penalty) else g
                for g, b, sg, sb in zip(greedy, beams, lp_g, lp_b)]
    finally:
        model.train(was)


def _sources(tokenizer, texts: list[str], limit: int) -> list[list[int]]:
    out = []
    for text in texts:
        ids = tokenizer.encode(text.strip()) if text.strip() else []
        if len(ids) > limit:
            warnings.warn(f"the input has {len(ids)} tokens, more than the model's source context of {limit}: "
                          f"only its first {limit} tokens are translated", UserWarning, stacklevel=3)
            ids = ids[:limit]
        out.append(ids)
    return out


def translate(model, tokenizer, texts: str | list[str], *, num_beams: int = 1, length_penalty: float = 1.0,
              max_new_tokens: int | None = None, batch_size: int = 32) -> str | list[str]:
    """Translate one text or a list with the model's ``attnlab.tokenizer.Tokenizer``."""
    single = isinstance(texts, str)
    texts = [texts] if single else list(texts)
    sources = _sources(tokenizer, texts, model.config.max_seq_len)
    results = [""] * len(texts)
    # batches of sources of one length: no padding, and a text's translation never depends on its batch mates
    # (the default output limit, 2 * length + 10, is the same for every row)
    by_length: dict[int, list[int]] = {}
    for i, s in enumerate(sources):
        if s:
            by_length.setdefault(len(s), []).append(i)
    for length in sorted(by_length):
        group = by_length[length]
        for k in range(0, len(group), batch_size):
            chunk = group[k:k + batch_size]
            src = torch.tensor([sources[i] for i in chunk], dtype=torch.long)  # (B, S)
            hyps = decode(model, src, torch.ones_like(src), num_beams=num_beams, length_penalty=length_penalty,
                          max_new_tokens=max_new_tokens)
            for i, h in zip(chunk, hyps):
                results[i] = tokenizer.decode([t for t in h if t != END]).strip()
    return results[0] if single else results


def evaluate(model, tokenizer, pairs: list[tuple[str, str]], *, num_beams: int = 1, length_penalty: float = 1.0,
             batch_size: int = 32) -> dict:
    """sacreBLEU corpus BLEU and chrF of the model's translations of ``pairs`` (source, reference)."""
    try:
        import sacrebleu
    except ImportError:
        raise ValueError("BLEU and chrF need the `sacrebleu` package: pip install sacrebleu "
                         "(`make install` brings it)") from None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # over-long sources are truncated, as documented
        hyps = translate(model, tokenizer, [s for s, _ in pairs], num_beams=num_beams,
                         length_penalty=length_penalty, batch_size=batch_size)
    refs = [[r for _, r in pairs]]
    return {"bleu": sacrebleu.corpus_bleu(hyps, refs).score, "chrf": sacrebleu.corpus_chrf(hyps, refs).score,
            "hypotheses": hyps}
