"""``kill -9`` at chosen moments of a training run's saves: the run always loads, restarts or resumes, and
ends bit-identical to an uninterrupted run.

The moments are chosen with the ``ATTNLAB_TEST_PAUSE`` hook of ``attnlab.atomic.pause_point``: the
process stops right after a temporary copy is complete and before its rename, says so on stdout, and the
test kills it there — no random sleeps.
"""

from __future__ import annotations

import json
import signal
import time

import torch

import attnlab


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def leftovers(out):
    return [p for p in [*out.iterdir(), *(out / "checkpoints").iterdir()] if ".tmp-" in p.name]


def test_kill_while_the_output_directory_is_refreshed_keeps_it_loadable_and_resumable(
        tmp_path, train_args, spawn, kill_at, run_cli, weights_of, straight_weights):
    out = tmp_path / "run"
    # checkpoints at steps 2 and 4; killed while step 4's tokenizer.json is being replaced in OUT
    proc = spawn(train_args(out, 6), ATTNLAB_TEST_PAUSE="write:*/run/tokenizer.json", ATTNLAB_TEST_PAUSE_SKIP="1")
    assert kill_at(proc).endswith("/run/tokenizer.json")
    assert leftovers(out), "the kill was meant to land between a temporary file and its rename"
    # OUT is still a whole model directory (step 2's files), with a tokenizer that loads
    tok = attnlab.load_tokenizer(out)
    model = attnlab.from_pretrained(out)
    ids = tok.encode("def f(x):")
    assert len(ids) > 0 and attnlab.generate(model, torch.tensor([ids]), 3).shape[1] == len(ids) + 3
    # the old failure: OUT's tokenizer.json emptied by a kill. Resume must not depend on it.
    (out / "tokenizer.json").write_text("")
    proc = run_cli(train_args(out, 6, "--resume"))
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert not leftovers(out)
    assert_same_weights(weights_of(out), straight_weights)
    assert attnlab.load_tokenizer(out).encode("def f(x):") == ids  # the next save rewrote it whole


def test_kill_during_the_first_checkpoint_leaves_a_run_that_restarts_or_resumes(
        tmp_path, train_args, spawn, kill_at, run_cli, weights_of, straight_weights):
    for i, resume in enumerate((False, True)):
        out = tmp_path / f"run{i}"
        proc = spawn(train_args(out, 6), ATTNLAB_TEST_PAUSE="dir:*/checkpoints/step-0000002")
        kill_at(proc)
        assert leftovers(out) and not list((out / "checkpoints").glob("step-*"))
        proc = run_cli(train_args(out, 6, *(["--resume"] if resume else [])))
        assert proc.returncode == 0, proc.stderr.decode()[-2000:]
        assert not leftovers(out)
        assert_same_weights(weights_of(out), straight_weights)
        steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert steps == sorted(steps)  # the killed run's records were dropped, not repeated


def test_sigint_saves_then_exits_130_with_valid_json(tmp_path, train_args, spawn):
    out = tmp_path / "run"
    proc = spawn(train_args(out, 100000, "--eval-every", "100000", "--save-every", "100000", "--set", "log_every=1"))
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").is_file():  # training has started
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(120) == 130
    ckpt = sorted((out / "checkpoints").glob("step-*"))
    assert len(ckpt) == 1 and attnlab.from_pretrained(ckpt[0]) is not None

    def no_constants(name):
        raise ValueError(f"{name} is not JSON")

    record = json.loads((out / "training.json").read_text(), parse_constant=no_constants)
    assert record["best_val_loss"] is None and record["steps"] == int(ckpt[0].name.split("-")[1])
