"""Hugging Face parity: random tiny HF models saved locally, loaded through our converter."""

import json

import pytest
import torch

import attnlab

transformers = pytest.importorskip("transformers")


def randomise(model):
    """Random values for every parameter (biases and norm gains included), so each one is checked."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if ("norm" in name or "ln_" in name) else 0.08))
            if "norm" in name or "ln_" in name:
                p.add_(1.0 if name.endswith("weight") else 0.0)
    return model.eval()


def make_llama():
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
                                   rope_theta=5000.0)
    return transformers.LlamaForCausalLM(cfg)


def make_qwen2():
    cfg = transformers.Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True)
    return transformers.Qwen2ForCausalLM(cfg)


def make_gpt2():
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


MAKERS = {"llama": make_llama, "qwen2": make_qwen2, "gpt2": make_gpt2}


@pytest.fixture(scope="module", params=sorted(MAKERS))
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    hf = randomise(MAKERS[request.param]())
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, attnlab.from_pretrained(path), path


def test_logits_match_hf(pair):
    hf, ours, _ = pair
    ids = torch.randint(0, 96, (2, 24))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # left padding in the batch
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what HF's generate passes for left padding
        ref = hf(ids, attention_mask=mask, position_ids=positions).logits
        out = ours(ids, attention_mask=mask)
    torch.testing.assert_close(out[0, 6:], ref[0, 6:], rtol=1e-5, atol=1e-5)  # padded positions are don't-care
    torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=1e-5)


def test_greedy_generation_matches_hf(pair):
    hf, ours, _ = pair
    ids = torch.randint(0, 96, (2, 10))
    expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                           do_sample=False, pad_token_id=0)
    assert torch.equal(attnlab.generate(ours, ids, 32), expected)


def test_round_trip_through_attnlab_format(pair, tmp_path):
    _, ours, _ = pair
    ours.save_pretrained(tmp_path / "m")
    again = attnlab.from_pretrained(tmp_path / "m")
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        assert torch.equal(again(ids), ours(ids))


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon", "architectures": ["FalconForCausalLM"]}))
    with pytest.raises(ValueError, match="unsupported architecture model_type='falcon'"):
        attnlab.from_pretrained(tmp_path)


def _saved_llama(tmp_path):
    torch.manual_seed(0)
    hf = make_llama()
    hf.save_pretrained(tmp_path)
    return hf


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    _saved_llama(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensor\(s\) \['blocks.1.ffn.up.weight'\]"):
        attnlab.from_pretrained(tmp_path)


def test_shape_mismatch_is_named(tmp_path):
    _saved_llama(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"tensor 'blocks.0.ffn.up.weight' has shape \(112, 64\), the config expects \(128, 64\)"):
        attnlab.from_pretrained(tmp_path)


def test_pickle_checkpoint_is_refused_with_advice(tmp_path):
    _saved_llama(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match="never unpickles.*safe_serialization=True"):
        attnlab.from_pretrained(tmp_path)


def test_garbled_weights(tmp_path):
    _saved_llama(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        attnlab.from_pretrained(tmp_path)


def test_rope_scaling_refused(tmp_path):
    _saved_llama(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    cfg.pop("rope_parameters", None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="RoPE scaling type 'yarn'"):
        attnlab.from_pretrained(tmp_path)
