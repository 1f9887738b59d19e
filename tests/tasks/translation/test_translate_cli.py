"""The translation commands end to end on the made-up data: data (its errors), train, translate, bench."""

import json
import shutil

import pytest

from attnlab.cli import main

TINY = ["--set", "d_model=32", "--set", "n_heads=4", "--set", "n_kv_heads=2", "--set", "d_ff=64", "--set", "n_layers=1",
        "--set", "n_encoder_layers=1", "--set", "max_seq_len=32"]


@pytest.fixture(scope="module")
def trained(translation_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "m"
    argv = ["train", "--task", "translation", "--data", str(translation_data), "--out", str(out), *TINY, "--steps", "3",
            "--batch-size", "4", "--warmup", "1", "--eval-every", "3", "--save-every", "3", "--quiet"]
    assert main(argv) == 0
    return out


def test_train_writes_a_translation_model(trained, translation_data):
    task = json.loads((trained / "task.json").read_text())
    assert task["task"] == "translation" and task["data"] == str(translation_data.resolve())
    record = json.loads((trained / "training.json").read_text())
    assert record["test_pairs"] == 32 and "test_bleu_greedy" in record and "bleu" in record["last_eval"]


def test_translate_command(trained, capsys):
    assert main(["translate", "--model", str(trained), "the light of day", "", "Ωmega 😀", "--beam", "2"]) == 0
    lines = capsys.readouterr().out.split("\n")
    assert len(lines) == 4 and lines[1] == "" and lines[3] == ""  # three texts, the empty one stays empty
    assert main(["translate", "--model", str(trained), " ".join(["the king said"] * 30)]) == 0
    assert "warning: the input has" in capsys.readouterr().err
    assert main(["translate", "--model", str(trained), "x", "--beam", "0"]) == 2


def test_bench_translation(trained, tmp_path, capsys):
    run = tmp_path / "run"  # a training record with two evaluations, as `attnlab train` writes it
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 10, "train_loss": 5.0, "elapsed_s": 12.0}, {"step": 10, "split": "validation", "loss": 4.9, "bleu": 0.5},
        {"step": 20, "train_loss": 4.0, "elapsed_s": 25.0}, {"step": 20, "split": "validation", "loss": 4.1, "bleu": 2.0}]))
    assert main(["bench", "translation", "--model", str(trained), "--limit", "4", "--beam", "3,2", "--examples", "2",
                 "--out", str(tmp_path), "--curves", str(run)]) == 0
    assert (tmp_path / "learning_curve.png").stat().st_size > 1000
    result = json.loads((tmp_path / "translation.json").read_text())
    assert [r["decoding"] for r in result["rows"]] == ["greedy", "beam 2 (length penalty 1)",
                                                       "beam 3 (length penalty 1)"]
    assert (tmp_path / "cross_attention.png").stat().st_size > 1000
    assert "BLEU" in capsys.readouterr().out
    for bad in ("1", "two"):
        assert main(["bench", "translation", "--model", str(trained), "--beam", bad, "--out", str(tmp_path)]) == 2
        assert "--beam" in capsys.readouterr().err
    assert main(["bench", "translation", "--model", str(trained), "--limit", "2", "--out", str(tmp_path),
                 "--curves", str(tmp_path / "nowhere")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    assert main(["bench", "translation", "--model", str(trained), "--limit", "2", "--out", str(tmp_path),
                 "--curves", str(trained)]) == 2  # trained too briefly to have evaluated
    assert "no validation records" in capsys.readouterr().err


def test_data_command_without_apt_prints_the_manual_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert main(["data", "translation", "--out", str(tmp_path / "d"), "--cache", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "apt-get download sword-text-web sword-text-sparv" in err
    assert main(["data", "poems", "--out", str(tmp_path)]) == 2


def test_train_translation_needs_data(tmp_path, capsys):
    assert main(["train", "--task", "translation", "--out", str(tmp_path / "x")]) == 2
    assert "attnlab data translation" in capsys.readouterr().err
    assert main(["train", "--task", "translation", "--data", str(tmp_path), "--vocab-size", "500", "--out",
                 str(tmp_path / "y")]) == 2
    assert "--vocab-size N" in capsys.readouterr().err


def test_shipped_name_says_how_to_make_it(capsys):
    from attnlab.hub import SHIPPED, shipped_dir

    assert "translate-en-es" in SHIPPED
    try:
        shipped_dir("translate-en-es")
    except FileNotFoundError as exc:
        assert "attnlab data translation" in str(exc) and "--preset translate-en-es" in str(exc)
    else:
        assert main(["translate", "--model", "translate-en-es", "In the beginning."]) == 0
