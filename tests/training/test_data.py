import numpy as np
import pytest
import torch

from attnlab.tokenizer import EOS, train_bpe
from attnlab.training.corpus import load_corpus, split_of
from attnlab.training.data import TokenWindows, build_shards


def test_tokenizer_round_trips_any_text(small_corpus):
    corpus = load_corpus(small_corpus)
    tok = train_bpe(corpus.documents["train"], 400)
    for text in ["def f(x):\n\treturn x ** 2  # ok", "naïve café — 東京 🙂", "\x00\x01 bytes", ""]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.token_to_id(EOS) is not None


def test_split_is_by_file_and_deterministic(small_corpus):
    a, b = load_corpus(small_corpus), load_corpus(small_corpus)
    assert a.sources == b.sources
    for split, sources in a.sources.items():
        assert all(split_of(s) == split for s in sources if "#" not in s)


def test_stale_cache_is_rebuilt(small_corpus, tmp_path):
    corpus = load_corpus(small_corpus)
    tok = train_bpe(corpus.documents["train"], 300)
    first = build_shards(corpus, tok, tmp_path)
    again = build_shards(corpus, tok, tmp_path)
    assert np.array_equal(first["train"], again["train"])
    changed = small_corpus / sorted(p.name for p in small_corpus.iterdir())[0]
    original = changed.read_text()
    try:
        changed.write_text(original + "\nEXTRA = 1\n" * 50)
        rebuilt = build_shards(load_corpus(small_corpus), tok, tmp_path)
        assert rebuilt["train"].size + rebuilt["validation"].size + rebuilt["test"].size != \
            first["train"].size + first["validation"].size + first["test"].size
    finally:
        changed.write_text(original)
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2  # a new cache, the old one never reused


def test_windows_are_seeded_and_validation_is_fixed():
    tokens = np.arange(1000, dtype=np.uint16)
    w = TokenWindows(tokens, 16)
    a = w.sample(4, torch.Generator().manual_seed(1))
    assert torch.equal(a, w.sample(4, torch.Generator().manual_seed(1)))
    assert torch.equal(a[:, 1:], a[:, :-1] + 1)  # contiguous windows
    assert [t.tolist() for t in w.fixed(5)] == [t.tolist() for t in w.fixed(5)]
    with pytest.raises(ValueError, match="fewer than one window"):
        TokenWindows(tokens[:10], 16)
