"""Shared pieces of the reliability suite: a tiny training corpus and a way to run the CLI as a user does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY_TRAIN = ["--preset", "tiny", "--quiet", "--vocab-size", "300", "--seq-len", "32", "--batch-size", "4",
              "--eval-every", "2", "--save-every", "2"]


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """Twelve small text files: enough for a 300-token BPE and all three splits, trained in seconds."""
    root = tmp_path_factory.mktemp("tiny-corpus")
    for i in range(12):
        lines = [f"def f{i}_{j}(x):\n    return x * {j} + {i}  # line {j}\n" for j in range(40)]
        (root / f"mod{i}.py").write_text("".join(lines))
    return root


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTNLAB_TEST_")}
    env["ATTNLAB_CACHE"] = str(tmp_path / "cache")
    kernels = Path(os.environ.get("ATTNLAB_CACHE") or Path.home() / ".cache" / "attnlab") / "kernels"
    (tmp_path / "cache").mkdir(exist_ok=True)
    if kernels.is_dir() and not (tmp_path / "cache" / "kernels").exists():  # reuse the built CPU kernel
        (tmp_path / "cache" / "kernels").symlink_to(kernels)
    env.update(extra)
    return env


def _run_cli(args: list[str], tmp_path: Path, *, stdin: bytes | None = None, timeout: float = 120,
             **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "attnlab", *args], input=stdin, capture_output=True,
                          timeout=timeout, env=cli_env(tmp_path, **env), cwd=tmp_path)


@pytest.fixture
def run_cli(tmp_path):
    """``run_cli(args, stdin=None, timeout=120, **env)``: the ``attnlab`` command in a subprocess, as a user
    runs it (its cache in ``tmp_path``, the CPU kernel already built reused)."""
    return lambda args, **kw: _run_cli(args, tmp_path, **kw)


@pytest.fixture
def one_error_line():
    return _assert_one_error_line


def _assert_one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, exactly one ``error:`` line on stderr naming every needle, and no traceback."""
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 2, (proc.returncode, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-2000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def train_args(tiny_corpus):
    """``train_args(out, steps, *more)``: an ``attnlab train`` command line for a tiny run on the tiny corpus."""
    return lambda out, steps, *more: ["train", *TINY_TRAIN, "--data", str(tiny_corpus), "--steps", str(steps),
                                      "--out", str(out), *more]


@pytest.fixture
def spawn(tmp_path):
    """``spawn(args, **env)``: ``attnlab ARGS`` started in the background (stdout piped, stderr to a file)."""
    started: list[subprocess.Popen] = []

    def start(args: list[str], **env: str) -> subprocess.Popen:
        log = open(tmp_path / f"stderr-{len(started)}.txt", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([sys.executable, "-m", "attnlab", *args], stdout=subprocess.PIPE, stderr=log,
                                env=cli_env(tmp_path, **env), cwd=tmp_path)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def killed_at(proc: subprocess.Popen, timeout: float = 120) -> str:
    """Wait for the pause hook's line, then SIGKILL the process; return the line."""
    line = proc.stdout.readline().decode()
    assert line.startswith("paused at"), f"the run never reached the pause point (exit {proc.wait(timeout)})"
    proc.kill()
    proc.wait(timeout)
    return line.strip()


@pytest.fixture
def kill_at():
    return killed_at


@pytest.fixture(scope="session")
def straight_weights(tmp_path_factory, tiny_corpus):
    """The final weights of an uninterrupted 6-step tiny run (in this process): what every interrupted and
    resumed run must end with, bit for bit."""
    from attnlab.cli import main

    root = tmp_path_factory.mktemp("straight")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTNLAB_CACHE", str(root / "cache"))
        out = root / "run"
        assert main(["train", *TINY_TRAIN, "--data", str(tiny_corpus), "--steps", "6", "--out", str(out)]) == 0
    return last_weights(out)


def last_weights(out: Path) -> dict:
    import attnlab

    last = sorted((out / "checkpoints").glob("step-*"))[-1]
    return attnlab.from_pretrained(last).state_dict()


@pytest.fixture
def weights_of():
    return last_weights
