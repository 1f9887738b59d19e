"""Saving a model never touches files attnlab did not write (issue: `save_pretrained` and `convert --out`
deleted whatever the directory held)."""

from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab import ModelConfig, build_model
from attnlab.checkpoint import atomic_write_dir, save_model


def tiny_model():
    return build_model(ModelConfig(vocab_size=40, d_model=16, n_layers=1, n_heads=2, d_ff=32))


def victim(tmp_path):
    d = tmp_path / "victim"
    (d / "sub").mkdir(parents=True)
    (d / "notes.txt").write_text("x\n")
    (d / "sub" / "deep.txt").write_text("y\n")
    return d


def untouched(d) -> bool:
    return (d / "notes.txt").read_text() == "x\n" and (d / "sub" / "deep.txt").read_text() == "y\n" and \
        sorted(p.name for p in d.iterdir()) == ["notes.txt", "sub"]


def test_save_pretrained_refuses_a_directory_with_foreign_files_and_names_them(tmp_path):
    d = victim(tmp_path)
    with pytest.raises(ValueError, match=r"notes\.txt, sub.*nothing was changed"):
        tiny_model().save_pretrained(d)
    assert untouched(d)
    with pytest.raises(ValueError, match="notes.txt"):  # overwrite replaces attnlab's files, never foreign ones
        tiny_model().save_pretrained(d, overwrite=True)
    assert untouched(d)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_a_path_that_is_a_file_is_refused_and_kept(tmp_path):
    f = tmp_path / "model"
    f.write_text("mine\n")
    with pytest.raises(ValueError, match="is a file"):
        tiny_model().save_pretrained(f)
    assert f.read_text() == "mine\n" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_missing_empty_and_earlier_model_directories_are_written(tmp_path):
    first, second = tiny_model(), tiny_model()
    first.save_pretrained(tmp_path / "new" / "deeper")  # missing (parents too)
    (tmp_path / "empty").mkdir()
    first.save_pretrained(tmp_path / "empty")
    first.save_pretrained(tmp_path / "m")
    second.save_pretrained(tmp_path / "m")  # an earlier attnlab model is replaced, atomically
    loaded = attnlab.from_pretrained(tmp_path / "m")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), second.state_dict().values()))
    assert attnlab.from_pretrained(tmp_path / "empty").config == first.config


def test_a_hugging_face_config_is_foreign(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="not written by attnlab"):
        tiny_model().save_pretrained(d)
    assert (d / "config.json").read_text() == '{"model_type": "llama"}'


def test_a_training_run_is_replaced_only_with_overwrite(tmp_path):
    d = tmp_path / "run"
    tiny_model().save_pretrained(d)
    (d / "checkpoints").mkdir()
    (d / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match=r"checkpoints.*--overwrite"):
        tiny_model().save_pretrained(d)
    assert (d / "metrics.jsonl").is_file()
    tiny_model().save_pretrained(d, overwrite=True)
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]


def test_a_foreign_file_that_appears_while_writing_stops_the_swap(tmp_path):
    d = tmp_path / "m"
    tiny_model().save_pretrained(d)

    def write(tmp):
        (d / "notes.txt").write_text("arrived meanwhile\n")
        save_model(tiny_model(), tmp / "ignored")  # any content

    with pytest.raises(ValueError, match="notes.txt"):
        atomic_write_dir(d, write)
    assert (d / "notes.txt").read_text() == "arrived meanwhile\n" and (d / "config.json").is_file()


def test_convert_refuses_a_foreign_directory_and_a_file(tmp_path, run_cli, one_error_line):
    d = victim(tmp_path)
    proc = run_cli(["convert", "--model", "default-draft", "--kv-heads", "1", "--out", str(d)])
    one_error_line(proc, "notes.txt", "nothing was changed")
    assert untouched(d)
    f = tmp_path / "file"
    f.write_text("mine\n")
    proc = run_cli(["convert", "--model", "default-draft", "--kv-heads", "1", "--out", str(f)])
    one_error_line(proc, "is a file")
    assert f.read_text() == "mine\n" and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_train_refuses_a_file_or_foreign_directory_before_training(tmp_path, tiny_corpus, run_cli, one_error_line):
    f = tmp_path / "out"
    f.write_text("mine\n")
    proc = run_cli(["train", "--preset", "tiny", "--data", str(tiny_corpus), "--out", str(f)], timeout=60)
    one_error_line(proc, "is a file")
    assert b"model:" not in proc.stderr  # refused before the model was built, let alone trained
    d = victim(tmp_path)
    proc = run_cli(["train", "--preset", "tiny", "--data", str(tiny_corpus), "--out", str(d)], timeout=60)
    one_error_line(proc, "notes.txt")
    assert untouched(d)
