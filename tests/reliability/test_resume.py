"""``--resume`` takes every setting from the checkpoint; a flag that contradicts it, or a hand-damaged
checkpoint, is one ``error:`` line naming the setting or the file and key."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from attnlab.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_corpus):
    """A finished 4-step tiny run (checkpoints at steps 2 and 4) to resume from."""
    from attnlab.cli import main as cli

    root = tmp_path_factory.mktemp("resume")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTNLAB_CACHE", str(root / "cache"))
        args = ["train", "--preset", "tiny", "--quiet", "--vocab-size", "300", "--seq-len", "32", "--batch-size", "4",
                "--eval-every", "2", "--save-every", "2", "--data", str(tiny_corpus), "--steps", "4"]
        assert cli([*args, "--out", str(root / "run")]) == 0
    return root / "run"


@pytest.fixture
def copy(run, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def error_of(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("flag, value, saved", [
    ("--lr", "0.01", "0.003"), ("--batch-size", "2", "4"), ("--seq-len", "16", "32"), ("--warmup", "1", "5"),
    ("--vocab-size", "400", "300")])
def test_a_flag_that_contradicts_the_run_names_both_values(copy, capsys, flag, value, saved):
    line = error_of(capsys, ["train", "--out", str(copy), "--resume", "--steps", "6", flag, value])
    key = flag[2:].replace("-", "_")
    assert f"{key}={value}" in line.replace(" ", "") or f"{key}={float(value)!r}" in line
    assert saved in line


def test_another_data_folder_is_refused(copy, capsys, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.txt").write_text("text\n" * 50)
    line = error_of(capsys, ["train", "--out", str(copy), "--resume", "--data", str(other)])
    assert "--data" in line and str(other) in line


def test_the_short_form_continues_with_the_saved_settings(copy, tmp_path, tiny_corpus, monkeypatch):
    """`attnlab train --out DIR --resume --steps N` (no preset, no data) equals a run of N steps."""
    from safetensors.torch import load_file as read

    assert main(["train", "--out", str(copy), "--resume", "--steps", "6", "--quiet"]) == 0
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path / "cache2"))
    straight = tmp_path / "straight"
    assert main(["train", "--preset", "tiny", "--quiet", "--vocab-size", "300", "--seq-len", "32", "--batch-size",
                 "4", "--eval-every", "2", "--save-every", "2", "--data", str(tiny_corpus), "--steps", "6",
                 "--out", str(straight)]) == 0
    a = read(str(copy / "checkpoints" / "step-0000006" / "model.safetensors"))
    b = read(str(straight / "checkpoints" / "step-0000006" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def last(out):
    return sorted((out / "checkpoints").glob("step-*"))[-1]


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def edit_tensors(path, change):
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


@pytest.mark.parametrize("damage, needles", [
    (lambda c: edit_json(c / "trainer_state.json", lambda d: d.pop("step")), ["trainer_state.json", "step"]),
    (lambda c: edit_json(c / "trainer_state.json", lambda d: d.pop("optimizer")), ["trainer_state.json",
                                                                                    "optimizer"]),
    (lambda c: (c / "trainer_state.json").write_text("{not json"), ["trainer_state.json", "not valid JSON"]),
    (lambda c: edit_tensors(c / "rng.safetensors", lambda t: t.update({"torch.0": t["torch.0"][:100]})),
     ["rng.safetensors", "torch.0"]),
    (lambda c: edit_tensors(c / "optimizer.safetensors", lambda t: t.pop("state.0.exp_avg")),
     ["optimizer.safetensors", "state.0.exp_avg"]),
    (lambda c: edit_tensors(c / "optimizer.safetensors", lambda t: t.update({"state.1.exp_avg_sq": torch.zeros(3)})),
     ["optimizer.safetensors", "state.1.exp_avg_sq", "shape"]),
], ids=["missing-step", "missing-optimizer", "bad-json", "short-rng", "missing-moment", "wrong-shape-moment"])
def test_a_damaged_checkpoint_is_one_line_naming_the_file_and_key(copy, capsys, damage, needles):
    damage(last(copy))
    line = error_of(capsys, ["train", "--out", str(copy), "--resume", "--steps", "6", "--quiet"])
    for needle in needles:
        assert needle in line, (needle, line)


def test_zero_or_negative_sizes_are_refused_before_any_work(tmp_path, capsys, tiny_corpus):
    for flag in ("--seq-len", "--batch-size", "--steps"):
        line = error_of(capsys, ["train", "--preset", "tiny", "--data", str(tiny_corpus), "--out",
                                 str(tmp_path / "o"), flag, "0"])
        assert flag[2:].replace("-", "_") in line.replace("-", "_")
    assert not (tmp_path / "o").exists()


def test_a_run_saved_with_torch_dtype_names_resumes(copy):
    """Runs saved before TrainConfig took the short precision names hold ``save_dtype: "bfloat16"``: they resume
    (the same setting given again as ``--save-dtype bf16`` is no conflict) and keep saving bfloat16 weights."""
    def old_names(state):
        state["train_config"]["save_dtype"] = "bfloat16"
        state["run"]["train"]["save_dtype"] = "bfloat16"

    for ckpt in (copy / "checkpoints").glob("step-*"):
        edit_json(ckpt / "trainer_state.json", old_names)
    assert main(["train", "--out", str(copy), "--resume", "--steps", "6", "--save-dtype", "bf16", "--quiet"]) == 0
    assert {t.dtype for t in load_file(str(copy / "model.safetensors")).values()} == {torch.bfloat16}
    state = json.loads((last(copy) / "trainer_state.json").read_text())
    assert last(copy).name == "step-0000006" and state["run"]["train"]["save_dtype"] == "bf16"


def test_a_torn_last_metrics_line_does_not_stop_a_resume(copy, capsys):
    """A crash can tear only the last record of the append-only metrics.jsonl: the resume drops it and goes on;
    a damaged line in the middle is one error line naming the file."""
    from attnlab.training.trainer import read_metrics

    log = copy / "metrics.jsonl"
    whole = log.read_text()
    log.write_text(whole + '{"step": 5, "train_lo')
    assert read_metrics(copy) == [json.loads(line) for line in whole.splitlines()]
    assert main(["train", "--out", str(copy), "--resume", "--steps", "6", "--quiet"]) == 0
    steps = [r["step"] for r in read_metrics(copy) if r.get("split") == "validation"]
    assert steps == [2, 4, 6] and "train_lo" not in log.read_text()
    log.write_text('{"step": 1}\n{"ste\n{"step": 2}\n')
    assert "metrics.jsonl: line 2 is not a JSON record" in error_of(capsys, ["train", "--out", str(copy), "--resume",
                                                                             "--steps", "8", "--quiet"])
