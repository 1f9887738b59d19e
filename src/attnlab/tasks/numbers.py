"""A seq2seq task that needs no download: English number words <-> digits, and date formats.

``numbers``:  "three hundred forty-two thousand and seven" -> "342007"   (words to digits)
``digits``:   "342007" -> "three hundred forty-two thousand and seven"   (digits to words)
``dates``:    "5 march 2021" / "march 5, 2021" / "05/03/2021" -> "2021-03-05"

Every example is a pure function of an integer key, and the split of a key (train / validation / test)
is decided by a hash of the *target*, so no test target is ever seen in training. Source lengths vary
from 1 to ~60 characters. A character-level tokenizer (``tokenizers`` BPE with no merges) is shared by
source and target.
"""

from __future__ import annotations

import datetime
import hashlib
import random
from dataclasses import dataclass

from attnlab.tokenizer import Tokenizer

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
          "november", "december"]
SPECIALS = ["<pad>", "<s>", "</s>"]  # pad = 0, decoder start = 1, end = 2
CHARS = " ,-/0123456789abcdefghijklmnopqrstuvwxyz"
TASKS = ("numbers", "digits", "dates")


def _below_thousand(n: int) -> str:
    words = []
    if n >= 100:
        words.append(f"{ONES[n // 100]} hundred")
        n %= 100
        if n:
            words.append("and")
    if n >= 20:
        words.append(TENS[n // 10] + (f"-{ONES[n % 10]}" if n % 10 else ""))
    elif n or not words:
        words.append(ONES[n])
    return " ".join(words)


def number_to_words(n: int) -> str:
    """British-style English words for 0 <= n < 10**9 ("and" after hundreds)."""
    if not 0 <= n < 10**9:
        raise ValueError(f"number_to_words covers 0..999,999,999, got {n}")
    if n == 0:
        return "zero"
    parts = []
    for value, name in ((10**6, "million"), (1000, "thousand")):
        if n >= value:
            parts.append(f"{_below_thousand(n // value)} {name}")
            n %= value
    if n:
        parts.append(("and " if parts and n < 100 else "") + _below_thousand(n))
    return " ".join(parts)


def _number_for(key: int) -> int:
    rng = random.Random(key)
    digits = rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 9])  # lengths spread evenly, small numbers included
    return rng.randrange(0 if digits == 1 else 10 ** (digits - 1), 10**digits)


def _date_for(key: int) -> tuple[str, str]:
    rng = random.Random(key)
    day = datetime.date(1900, 1, 1) + datetime.timedelta(days=rng.randrange(0, 200 * 366))
    month = MONTHS[day.month - 1]
    style = rng.randrange(3)
    if style == 0:
        src = f"{day.day} {month} {day.year}"
    elif style == 1:
        src = f"{month} {day.day}, {day.year}"
    else:
        src = f"{day.day:02d}/{day.month:02d}/{day.year}"
    return src, day.isoformat()


def example(task: str, key: int) -> tuple[str, str]:
    """(source, target) for the integer ``key``."""
    if task == "numbers":
        n = _number_for(key)
        return number_to_words(n), str(n)
    if task == "digits":
        n = _number_for(key)
        return str(n), number_to_words(n)
    if task == "dates":
        return _date_for(key)
    raise ValueError(f"unknown task {task!r}; built-in tasks: {', '.join(TASKS)}")


def split_of(target: str) -> str:
    """Decided by the target text, so identical targets never straddle splits."""
    h = int.from_bytes(hashlib.sha256(target.encode()).digest()[:4], "little") % 100
    return "test" if h < 5 else ("validation" if h < 10 else "train")


@dataclass(frozen=True)
class TaskData:
    train: list[tuple[str, str]]
    validation: list[tuple[str, str]]
    test: list[tuple[str, str]]


def make_task(task: str, n_examples: int = 60000, seed: int = 0) -> TaskData:
    """Deterministic examples, deduplicated by target, split by target hash."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; built-in tasks: {', '.join(TASKS)}")
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "validation": [], "test": []}
    seen: set[str] = set()
    key = seed * 10**9
    while sum(len(v) for v in splits.values()) < n_examples:
        src, tgt = example(task, key)
        key += 1
        if tgt in seen:
            continue
        seen.add(tgt)
        splits[split_of(tgt)].append((src, tgt))
    return TaskData(**splits)


def char_tokenizer() -> Tokenizer:
    """Character-level tokenizer: ids 0..2 are <pad>, <s> (decoder start), </s>; then one id per char."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for c in CHARS:
        vocab[c] = len(vocab)
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models

    backend = Backend(models.BPE(vocab=vocab, merges=[], unk_token=None))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIALS)
    return Tokenizer(backend, pad_token=SPECIALS[0], bos_token=SPECIALS[1], eos_token=SPECIALS[2])
