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


def _shard_folder(root):
    """The one cache folder ``build_shards`` made under ``root``."""
    (folder,) = [p for p in root.iterdir() if p.is_dir()]
    return folder


def test_a_build_never_touches_another_writers_temporary_file(small_corpus, tmp_path):
    """The cache is shared (``$ATTNLAB_CACHE``): a second process building the same shards at the same time
    writes its own temporary files, so one writer's half-written shard is never replaced or renamed by the other."""
    corpus = load_corpus(small_corpus)
    tok = train_bpe(corpus.documents["train"], 300)
    first = build_shards(corpus, tok, tmp_path)
    folder = _shard_folder(tmp_path)
    (folder / "train.bin").unlink()  # the cache is incomplete again: the next call rebuilds it
    theirs = {split: folder / f".{split}.bin.tmp" for split in ("train", "validation", "test")}
    for split, path in theirs.items():  # what another process is writing at this moment
        path.write_bytes(b"another writer's half shard " + split.encode())
    again = build_shards(corpus, tok, tmp_path)
    for split, path in theirs.items():
        assert path.read_bytes() == b"another writer's half shard " + split.encode()
        assert np.array_equal(again[split], first[split])
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "manifest.json", "test.bin", "train.bin", "validation.bin"]
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == sorted(p.name for p in theirs.values())


def test_a_failed_manifest_write_keeps_the_cache_usable(small_corpus, tmp_path, monkeypatch):
    """The manifest is replaced atomically: a write that dies half-way leaves the previous manifest (JSON), and
    the next build runs instead of failing on a truncated file."""
    import json
    from pathlib import Path

    corpus = load_corpus(small_corpus)
    tok = train_bpe(corpus.documents["train"], 300)
    first = build_shards(corpus, tok, tmp_path)
    folder = _shard_folder(tmp_path)
    before = (folder / "manifest.json").read_text()
    (folder / "validation.bin").unlink()
    write_text = Path.write_text

    def dies_half_way(self, text, *args, **kwargs):
        write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError("no space left on device")

    monkeypatch.setattr(Path, "write_text", dies_half_way)
    with pytest.raises(OSError, match="no space"):
        build_shards(corpus, tok, tmp_path)
    monkeypatch.undo()
    assert (folder / "manifest.json").read_text() == before
    json.loads(before)
    again = build_shards(corpus, tok, tmp_path)
    for split in first:
        assert np.array_equal(again[split], first[split])
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary file left behind
