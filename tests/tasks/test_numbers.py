import pytest

from attnlab.tasks.numbers import char_tokenizer, example, make_task, number_to_words

SMALL = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                                    "fourteen fifteen sixteen seventeen eighteen nineteen".split())}
TENS = {w: 10 * i for i, w in enumerate("_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()) if w != "_"}


def parse(words: str) -> int:
    """An independent words -> number reader (for checking number_to_words)."""
    total, current = 0, 0
    for w in words.replace("-", " ").split():
        if w == "and":
            continue
        if w in SMALL:
            current += SMALL[w]
        elif w in TENS:
            current += TENS[w]
        elif w == "hundred":
            current *= 100
        elif w in ("thousand", "million"):
            total += current * (1000 if w == "thousand" else 10**6)
            current = 0
        else:
            raise ValueError(w)
    return total + current


@pytest.mark.parametrize("n", [0, 7, 13, 20, 21, 100, 101, 110, 999, 1000, 1001, 1100, 20020, 999999, 1000000,
                               1000001, 123456789, 900000009])
def test_number_words_read_back(n):
    assert parse(number_to_words(n)) == n


def test_task_is_deterministic_and_splits_by_target():
    a, b = make_task("numbers", 3000), make_task("numbers", 3000)
    assert a == b
    targets = {split: {t for _, t in getattr(a, split)} for split in ("train", "validation", "test")}
    assert not targets["train"] & targets["test"] and not targets["train"] & targets["validation"]
    assert 0.02 < len(a.test) / 3000 < 0.08
    lengths = {len(s) for s, _ in a.train}
    assert min(lengths) <= 5 and max(lengths) >= 60  # varying lengths


def test_dates_and_tokenizer_round_trip():
    tok = char_tokenizer()
    for key in range(50):
        for task in ("numbers", "digits", "dates"):
            src, tgt = example(task, key)
            for text in (src, tgt):
                ids = tok.encode(text)
                assert min(ids) >= 3 and tok.decode(ids) == text
    assert example("dates", 3)[1].count("-") == 2
    with pytest.raises(ValueError, match="unknown task"):
        make_task("poetry")
