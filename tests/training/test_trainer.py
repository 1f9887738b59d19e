"""Trainer: bit-exact resume, crash-safe checkpoints, bad input, and the CLI."""

import json

import pytest
import torch

import attnlab
from attnlab.checkpoint import atomic_write_dir
from attnlab.cli import main

TINY = ["--preset", "tiny", "--quiet", "--vocab-size", "300", "--seq-len", "32", "--batch-size", "4"]


def weights(path):
    return attnlab.from_pretrained(path / "checkpoints" / sorted(p.name for p in (path / "checkpoints").iterdir())[-1]).state_dict()


def test_resume_is_bit_exact(small_corpus, tmp_path, monkeypatch):
    common = TINY + ["--data", str(small_corpus), "--steps", "12", "--save-every", "3", "--eval-every", "4",
                     "--set", "dropout=0.1"]
    assert main(["train", *common, "--out", str(tmp_path / "straight")]) == 0

    # the same run, stopped after 6 steps the way SIGINT stops it (the flag the handler sets), then resumed
    from attnlab.training import trainer as trainer_mod

    original = trainer_mod.Trainer.train_step

    def stop_at_six(self):
        loss = original(self)
        if self.step == 6:
            self.stop_requested = True
        return loss

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", stop_at_six)
    assert main(["train", *common, "--out", str(tmp_path / "split")]) == 130  # saved, then the signal's exit code
    monkeypatch.setattr(trainer_mod.Trainer, "train_step", original)
    assert json.loads((tmp_path / "split" / "training.json").read_text())["steps"] == 6
    assert main(["train", *common, "--out", str(tmp_path / "split"), "--resume"]) == 0

    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # the output directory itself is a loadable model with its tokenizer
    model = attnlab.from_pretrained(tmp_path / "split")
    tok = attnlab.load_tokenizer(tmp_path / "split")
    ids = tok.encode("def f(x):\n    return x")
    assert attnlab.generate(model, torch.tensor([ids]), 5).shape[1] == len(ids) + 5


def test_crash_mid_save_keeps_the_previous_checkpoint(small_corpus, tmp_path):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--data", str(small_corpus), "--steps", "4", "--out", str(out)]) == 0
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    before = (ckpt / "model.safetensors").read_bytes()

    def crash(tmp):
        (tmp / "model.safetensors").write_bytes(b"half a file")
        raise KeyboardInterrupt  # killed mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write_dir(ckpt, crash, overwrite=True)  # a checkpoint holds training files too
    assert (ckpt / "model.safetensors").read_bytes() == before
    attnlab.from_pretrained(ckpt)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--vocab-size", "100"], "--vocab-size 100 is too small"),
        (["--resume"], "nothing to resume"),
        (["--set", "n_heads=3"], "not a multiple"),
        (["--set", "colour=blue"], "unknown setting 'colour'"),
        (["--seq-len", "4096"], "exceeds the model's max_seq_len"),
    ],
)
def test_bad_input_is_one_clear_line(small_corpus, tmp_path, capsys, extra, message):
    assert main(["train", *TINY, "--data", str(small_corpus), "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_empty_and_unreadable_data(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("   \n")
    assert main(["train", *TINY, "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "corpus is empty" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00 not utf-8 \xc3")
    assert main(["train", *TINY, "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "not UTF-8 text" in capsys.readouterr().err
    assert main(["train", *TINY, "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_existing_run_is_never_overwritten_and_config_must_match(small_corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--data", str(small_corpus), "--steps", "3", "--out", str(out)]) == 0
    before = {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").iterdir()}
    assert main(["train", *TINY, "--data", str(small_corpus), "--steps", "3", "--out", str(out)]) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert main(["train", *TINY, "--data", str(small_corpus), "--steps", "6", "--out", str(out), "--resume",
                 "--set", "n_layers=3"]) == 2
    assert "different model config" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").iterdir()} == before


def test_jsonl_and_yaml_config(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"line {i} " * 40}) for i in range(200)))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  d_model: 32\n  n_heads: 2\n  n_layers: 1\ntrain:\n  steps: 3\n  lr: 0.001\n")
    assert main(["train", "--config", str(cfg), "--data", str(data), "--vocab-size", "280", "--seq-len", "16",
                 "--batch-size", "2", "--quiet", "--out", str(tmp_path / "o")]) == 0
    assert attnlab.from_pretrained(tmp_path / "o").config.d_model == 32
