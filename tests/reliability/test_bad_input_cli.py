"""Bad input on the command line: one ``error:`` line on stderr, exit status 2, never a traceback.

Each case runs ``python -m attnlab ...`` in a fresh process (argv bytes that are not UTF-8 reach the
program exactly as a shell would pass them). Validation happens before any model loads, so the cases that
name a model use a path that does not exist or the tiny shipped ``default-draft``: a case that loaded a
model first would fail with "no model at ..." instead of the message asserted here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from attnlab.hub import shipped_dir

BAD = b"ab\xffcd"  # byte 0xff at offset 2 is never valid UTF-8
NO_MODEL = "no-such-model-dir"  # a flag error must be reported before the model is looked up


def run_cli(args: list, cwd: Path, stdin: bytes = b"") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    argv = [sys.executable, "-m", "attnlab", *[a if isinstance(a, bytes) else str(a).encode() for a in args]]
    return subprocess.run(argv, input=stdin, capture_output=True, cwd=cwd, env=env, timeout=120)


def assert_one_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    stderr = result.stderr.decode("utf-8", "replace")
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, (result.returncode, stderr)
    assert len(errors) == 1, stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def write_json(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def hf_dir(root: Path, config) -> Path:  # (tests/reliability/test_bad_input_api.py has the other HF cases)
    """A Hugging Face-style directory: config.json as given and a one-tensor model.safetensors."""
    import torch
    from safetensors.torch import save_file

    root.mkdir()
    write_json(root / "config.json", config)
    save_file({"model.embed_tokens.weight": torch.zeros(8, 4)}, str(root / "model.safetensors"))
    return root


LLAMA = {"model_type": "llama", "vocab_size": 8, "hidden_size": 4, "num_hidden_layers": 1,
         "num_attention_heads": 2, "intermediate_size": 8}

# (case id, argv, stdin, substrings of the one error line); "{tmp}" marks a file the case makes in tmp_path
CASES = [
    ("prompt-utf8", ["generate", "--model", "default-draft", "--prompt", BAD], b"",
     ["--prompt", "not valid UTF-8", "byte offset 2"]),
    ("chat-flag-utf8", ["generate", "--model", "default-draft", "--chat", BAD], b"",
     ["--chat", "not valid UTF-8", "byte offset 2"]),
    ("translate-arg-utf8", ["translate", "--model", NO_MODEL, "ok", BAD], b"",
     ["TEXT argument 2", "not valid UTF-8", "byte offset 2"]),
    ("translate-stdin-utf8", ["translate", "--model", NO_MODEL, "-"], b"fine\n" + BAD + b"\n",
     ["stdin line 2", "not valid UTF-8", "byte offset 2"]),
    ("generate-temperature-nan", ["generate", "--model", NO_MODEL, "--prompt", "hi", "--temperature", "nan"], b"",
     ["--temperature nan", "finite"]),
    ("generate-temperature-inf", ["generate", "--model", NO_MODEL, "--prompt", "hi", "--temperature", "inf"], b"",
     ["--temperature inf", "finite"]),
    ("generate-penalty-nan", ["generate", "--model", NO_MODEL, "--prompt", "hi", "--repetition-penalty", "nan"],
     b"", ["--repetition-penalty nan"]),
    ("chat-temperature", ["chat", "--model", NO_MODEL, "--temperature", "-1"], b"hello\n", ["--temperature -1"]),
    ("chat-top-p", ["chat", "--model", NO_MODEL, "--top-p", "0"], b"hello\n", ["--top-p 0"]),
    ("chat-top-k", ["chat", "--model", NO_MODEL, "--top-k", "0"], b"hello\n", ["--top-k 0"]),
    ("config-null", ["info", "--config", "{tmp}"], {"norm_eps": None}, ["norm_eps=None", "finite number"]),
    ("config-list", ["info", "--config", "{tmp}"], {"dropout": [0.1]}, ["dropout=[0.1]", "finite number"]),
    ("config-string-bool", ["info", "--config", "{tmp}"], {"tie_embeddings": "false"},
     ["tie_embeddings='false'", "boolean"]),
    ("config-nan", ["info", "--config", "{tmp}"], '{"norm_eps": NaN}', ["norm_eps=nan", "finite"]),
    ("config-inf", ["info", "--config", "{tmp}"], '{"rope_theta": Infinity}', ["rope_theta=inf", "finite"]),
    ("config-string-number", ["info", "--config", "{tmp}"], {"norm_eps": "abc"}, ["norm_eps='abc'"]),
    ("hf-missing-key", ["generate", "--model", "{hf}", "--prompt-ids", "1"],
     {k: v for k, v in LLAMA.items() if k != "intermediate_size"}, ["config.json", "'intermediate_size'", "missing"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line(case, tmp_path: Path) -> None:
    name, args, extra, needles = case
    stdin = extra if isinstance(extra, bytes) else b""
    if "{tmp}" in args:
        args = [str(write_json(tmp_path / "config.json", extra)) if a == "{tmp}" else a for a in args]
    if "{hf}" in args:
        args = [str(hf_dir(tmp_path / "hf", extra)) if a == "{hf}" else a for a in args]
    assert_one_error(run_cli(args, tmp_path, stdin), *needles)


def test_chat_stdin_not_utf8(tmp_path: Path) -> None:
    """Piped chat input in the wrong encoding stops with the line and offset (not a reply per line)."""
    model = tmp_path / "chatty"
    shutil.copytree(shipped_dir("default-draft"), model)
    (model / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}\n{% endfor %}")
    result = run_cli(["chat", "--model", model, "--max-new-tokens", "2"], tmp_path, stdin=b"hi\n" + BAD + b"\n")
    assert_one_error(result, "stdin line 2", "byte offset 2")


def test_generate_checks_the_prompt_before_echoing_it(tmp_path: Path) -> None:
    result = run_cli(["generate", "--model", "default-draft", "--prompt", "hello " * 1500], tmp_path)
    assert_one_error(result, "the prompt has", "context")
    assert result.stdout == b""  # nothing echoed before the error


def test_convert_out_is_cwd(tmp_path: Path) -> None:
    keep = write_json(tmp_path / "notes.txt", "mine")
    result = run_cli(["convert", "--model", "default-draft", "--kv-heads", "1", "--out", "."], tmp_path)
    assert_one_error(result, "--out .", "current directory")
    assert keep.read_text() == "mine"


def test_convert_out_is_the_source(tmp_path: Path) -> None:
    model = tmp_path / "m"
    shutil.copytree(shipped_dir("default-draft"), model)
    before = (model / "model.safetensors").read_bytes()
    result = run_cli(["convert", "--model", model, "--kv-heads", "1", "--out", model], tmp_path)
    assert_one_error(result, "is the source model")
    assert (model / "model.safetensors").read_bytes() == before
