"""Bad input through the Python API: a ``ValueError`` that names the problem, never an IndexError from deep
inside torch and never a silently wrong result."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from attnlab import ModelConfig, build_model, from_pretrained, generate

V = 32  # vocabulary of the tiny models


@pytest.fixture(scope="module")
def decoder():
    return build_model(ModelConfig(vocab_size=V, d_model=32, n_layers=1, n_heads=2, max_seq_len=64)).eval()


@pytest.fixture(scope="module")
def seq2seq():
    return build_model(ModelConfig(family="seq2seq", vocab_size=V, d_model=32, n_layers=1, n_heads=2, max_seq_len=64,
                                   decoder_start_token_id=1)).eval()


# ----------------------------------------------------------------------------- token ids
@pytest.mark.parametrize("bad", [V, V + 100, -1])
def test_generate_names_an_id_outside_the_vocabulary(decoder, bad: int) -> None:
    with pytest.raises(ValueError, match=rf"token id {bad}\b.*\[0, {V}\)"):
        generate(decoder, [[3, bad, 4]], 2)


def test_forward_names_an_id_outside_the_vocabulary(decoder, seq2seq) -> None:
    with pytest.raises(ValueError, match=rf"token id {V}\b.*vocab_size={V}"):
        decoder(torch.tensor([[1, V]]))
    with pytest.raises(ValueError, match=rf"source ids holds token id {V + 1}\b"):
        seq2seq.encode(torch.tensor([[1, V + 1]]))


def test_float_ids_are_refused(decoder) -> None:
    with pytest.raises(ValueError, match="integer token ids"):
        generate(decoder, torch.tensor([[1.0, 2.0]]), 2)


# ----------------------------------------------------------------------------- padding side
def test_right_padded_batch_is_refused(decoder) -> None:
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])  # row 1 right-padded: its last position is padding
    with pytest.raises(ValueError, match="row 1 has padding after real tokens.*pad on the left"):
        generate(decoder, ids, 3, attention_mask=mask)


def test_left_padded_batch_matches_each_row_alone(decoder) -> None:
    """The supported layout still works: a left-padded row generates what it generates unpadded."""
    ids = torch.tensor([[5, 6, 7, 8], [0, 0, 5, 6]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    out = generate(decoder, ids, 3, attention_mask=mask)
    alone = generate(decoder, [[5, 6]], 3)
    assert out[1, -3:].tolist() == alone[0, -3:].tolist()


def test_seq2seq_left_padded_source_is_refused(seq2seq) -> None:
    ids = torch.tensor([[5, 6, 7], [0, 5, 6]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])  # an encoder numbers positions from column 0: right-pad
    with pytest.raises(ValueError, match="row 1 has padding before real tokens.*right-pad"):
        generate(seq2seq, ids, 2, attention_mask=mask)


def test_mask_values_and_empty_rows(decoder) -> None:
    with pytest.raises(ValueError, match="only 0 .* and 1"):
        generate(decoder, [[5, 6]], 2, attention_mask=torch.tensor([[2, 1]]))
    with pytest.raises(ValueError, match="row 0 has no real token"):
        generate(decoder, [[5, 6]], 2, attention_mask=torch.tensor([[0, 0]]))


# ----------------------------------------------------------------------------- sampling settings
@pytest.mark.parametrize("settings, needle", [
    (dict(temperature=math.nan), "temperature=nan"),
    (dict(temperature=math.inf), "temperature=inf"),
    (dict(temperature=-0.5), "temperature=-0.5"),
    (dict(temperature=1.0, top_p=math.nan), "top_p=nan"),
    (dict(temperature=1.0, top_k=True), "top_k=True"),
    (dict(repetition_penalty=math.inf), "repetition_penalty=inf"),
])
def test_sampling_settings_are_checked(decoder, settings: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        generate(decoder, [[5, 6]], 2, **settings)


# ----------------------------------------------------------------------------- ModelConfig field types
@pytest.mark.parametrize("field, value, needle", [
    ("norm_eps", None, r"norm_eps=None has the wrong type: expected a finite number"),
    ("dropout", [0.1], r"dropout=\[0.1\] has the wrong type"),
    ("tie_embeddings", "false", r"tie_embeddings='false' has the wrong type: expected a boolean"),
    ("residual", 0, r"residual=0 has the wrong type: expected a boolean"),
    ("norm_eps", math.nan, r"norm_eps=nan must be a finite number"),
    ("rope_theta", math.inf, r"rope_theta=inf must be a finite number"),
    ("norm_eps", "abc", r"norm_eps='abc' has the wrong type"),  # a --set value JSON could not parse
    ("n_heads", True, r"n_heads=True has the wrong type: expected an integer"),
    ("n_kv_heads", 2.0, r"n_kv_heads=2.0 has the wrong type: expected an integer or null"),
    ("family", 1, r"family=1 has the wrong type: expected a string"),
])
def test_config_field_types(field: str, value, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        ModelConfig(**{field: value})
    if not (isinstance(value, float) and not math.isfinite(value)):
        with pytest.raises(ValueError, match=needle):  # the same through JSON
            ModelConfig.from_json(json.dumps({field: value}))


def test_config_accepts_ints_for_floats_and_stores_floats() -> None:
    cfg = ModelConfig(norm_eps=1, rope_theta=500000)
    assert isinstance(cfg.norm_eps, float) and isinstance(cfg.rope_theta, float)
    assert ModelConfig.from_json(cfg.to_json()) == cfg


# ----------------------------------------------------------------------------- Hugging Face config.json
LLAMA = {"model_type": "llama", "vocab_size": 8, "hidden_size": 4, "num_hidden_layers": 1,
         "num_attention_heads": 2, "intermediate_size": 8}


def _hf_dir(tmp_path: Path, config) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({"model.embed_tokens.weight": torch.zeros(8, 4)}, str(tmp_path / "model.safetensors"))
    return tmp_path


@pytest.mark.parametrize("config, needle", [
    ([LLAMA], r"config.json must hold a JSON object"),
    ({k: v for k, v in LLAMA.items() if k != "hidden_size"}, r"config.json: model_type='llama' needs the key 'hidden_size'"),
    (dict(LLAMA, num_attention_heads=0), r"config.json: num_attention_heads=0 must be an integer >= 1"),
    (dict(LLAMA, tie_word_embeddings="false"), r"config.json: tie_word_embeddings='false' must be true or false"),
    (dict(LLAMA, rms_norm_eps=None), r"config.json: .*norm_eps=None"),
    ({"model_type": "rwkv", "vocab_size": 8}, r"config.json: model_type=.rwkv. needs the key .hidden_size."),
])
def test_hf_config_problems(tmp_path: Path, config, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        from_pretrained(_hf_dir(tmp_path, config))


# ----------------------------------------------------------------------------- text
def test_check_text_names_the_offset() -> None:
    from attnlab.textio import check_text

    assert check_text("héllo", "--prompt") == "héllo"
    with pytest.raises(ValueError, match=r"--prompt is not valid UTF-8: byte 0xe9 at byte offset 1"):
        check_text(b"h\xe9llo".decode("utf-8", "surrogateescape"), "--prompt")
    with pytest.raises(ValueError, match=r"lone surrogate U\+D800 at character 2"):
        check_text("ab\ud800", "message")


def test_field_type_check_serves_other_config_dataclasses() -> None:
    """The same annotation-driven check, for a caller that collects settings before building a config
    (``attnlab train --set lr=abc`` today reaches TrainConfig as the string 'abc')."""
    from attnlab.config import check_field_types
    from attnlab.training.trainer import TrainConfig

    with pytest.raises(ValueError, match=r"TrainConfig field lr='abc' has the wrong type: expected a finite number"):
        check_field_types({"lr": "abc"}, TrainConfig)
    assert check_field_types({"lr": 1, "bf16": True, "max_time": None}, TrainConfig) == {
        "lr": 1.0, "bf16": True, "max_time": None}


def test_the_tokenizer_names_text_that_is_not_unicode():
    from attnlab import load_tokenizer

    tok = load_tokenizer("default-draft")
    with pytest.raises(ValueError, match=r"lone surrogate U\+D800"):
        tok.encode("abc\ud800")
    with pytest.raises(ValueError, match=r"text 1 of the batch.*byte 0xff"):
        tok.encode_batch(["fine", "bad \udcff byte"])
    with pytest.raises(ValueError, match="must be text"):
        tok.encode(b"bytes")
