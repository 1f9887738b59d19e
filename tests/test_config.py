import json
import re

import pytest

from attnlab import ModelConfig


def test_json_round_trip_is_exact(tmp_path):
    cfg = ModelConfig(vocab_size=300, d_model=96, n_heads=6, n_kv_heads=2, ffn="gelu", norm="layer",
                      norm_position="post", position="rope", rope_theta=5e5, dropout=0.1)
    path = tmp_path / "c.json"
    cfg.to_json(path)
    assert ModelConfig.from_json(path) == cfg
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    assert all(isinstance(v, (str, int, float, bool, type(None))) for v in json.loads(cfg.to_json()).values())


def test_derived_sizes():
    cfg = ModelConfig(d_model=128, n_heads=4)
    assert (cfg.n_kv_heads, cfg.head_dim, cfg.kv_groups) == (4, 32, 1)
    assert cfg.d_ff % 64 == 0 and cfg.d_ff >= 8 * 128 // 3  # swiglu default
    assert ModelConfig(d_model=128, n_heads=4, ffn="relu").d_ff == 512


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"n_heads": 8, "n_kv_heads": 3}, "n_heads=8 is not a multiple of n_kv_heads=3"),
        ({"norm": "group"}, "norm='group' is not valid; choose one of: 'layer', 'rms'"),
        ({"norm_position": "middle"}, "norm_position='middle' is not valid"),
        ({"ffn": "tanh"}, "ffn='tanh' is not valid"),
        ({"position": "alibi"}, "position='alibi' is not valid"),
        ({"attention_kernel": "cuda"}, "attention_kernel='cuda' is not valid"),
        ({"family": "lstm"}, "family='lstm' is not valid"),
        ({"d_model": 0}, "d_model=0 must be a positive integer"),
        ({"dropout": 1.5}, "dropout=1.5 must be in [0, 1)"),
        ({"head_dim": 7, "position": "rope"}, "needs an even head_dim"),
        ({"eos_token_id": 999}, "eos_token_id=999 must be a token id"),
    ],
)
def test_invalid_configs_name_the_field_and_the_choices(changes, message):
    with pytest.raises(ValueError) as err:
        ModelConfig(**changes)
    assert message in str(err.value)


def test_divisors_are_suggested():
    with pytest.raises(ValueError, match=r"\[1, 2, 4, 8\]"):
        ModelConfig(n_heads=8, n_kv_heads=3)


def test_unknown_fields_rejected():
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        ModelConfig.from_dict({"d_model": 64, "n_head": 4})
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        ModelConfig().replace(heads=3)


def test_bad_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_json(bad)
    with pytest.raises(FileNotFoundError):
        ModelConfig.from_json(tmp_path / "missing.json")


@pytest.mark.parametrize("fields, needle", [
    (dict(family="rwkv", norm="batch"), "norm='batch'"),
    (dict(family="rwkv", norm_position="sandwich"), "norm_position='sandwich'"),
    (dict(family="rwkv", attention_kernel="ring"), "attention_kernel='ring'"),
    (dict(family="rwkv", ffn="gelu"), "ffn='gelu'"),
    (dict(family="rwkv", n_heads=4, n_kv_heads=1), "n_kv_heads=1"),
    (dict(family="rwkv", rwkv_version=4, n_heads=8), "n_heads=8"),
    (dict(family="rwkv", rwkv_version=4, head_dim=16), "head_dim=16"),
    (dict(family="rwkv", dropout=0.1), "dropout=0.1"),
    (dict(family="rwkv", position="learned"), "position='learned'"),
    (dict(attention_mechanism="infini", segment_len=8, attention_kernel="ring"), "attention_kernel='ring'"),
    (dict(ring_layout="contiguous"), "ring_layout='contiguous'"),
    (dict(segment_len=16), "segment_len=16"),
    (dict(memory_update="delta"), "memory_update='delta'"),
    (dict(rwkv_version=7), "rwkv_version=7"),
    (dict(position="learned", rope_theta=5e5), "rope_theta=500000.0"),
    (dict(family="encoder", n_encoder_layers=2), "n_encoder_layers=2"),
    (dict(family="decoder", decoder_start_token_id=1), "decoder_start_token_id=1"),
    (dict(family="seq2seq", type_vocab_size=2), "type_vocab_size=2"),
    (dict(family="decoder", pooler=True), "pooler=True"),
    (dict(family="decoder", share_embeddings=False), "share_embeddings=False"),
    (dict(family="rwkv", norm_bias=False), "norm_bias=False"),
    (dict(norm="rms", norm_bias=False), "norm_bias=False"),
    (dict(family="encoder", mlm_head=False, lm_head_bias=True), "lm_head_bias=True"),
    (dict(family="encoder", mlm_head=False, tie_embeddings=False), "tie_embeddings=False"),
])
def test_a_field_the_model_would_ignore_is_refused_by_name(fields, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        ModelConfig(**fields)


def test_the_fields_a_family_reads_are_accepted():
    ModelConfig(family="rwkv", norm="layer", position="none", n_heads=1)  # RWKV described truthfully
    ModelConfig(family="rwkv", rwkv_version=7, n_heads=2)
    ModelConfig(attention_mechanism="infini", segment_len=8, memory_update="delta", attention_kernel="flash")
    ModelConfig(attention_kernel="ring", ring_layout="contiguous")
    ModelConfig(family="seq2seq", n_encoder_layers=1, decoder_start_token_id=1, share_embeddings=False)
    ModelConfig(family="encoder", type_vocab_size=2, pooler=True, mlm_head=False)
    ModelConfig(norm="layer", norm_bias=False)
    ModelConfig(family="encoder", lm_head_bias=True, tie_embeddings=False)
