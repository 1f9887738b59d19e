"""The CLI: user errors print one line and exit non-zero, never a traceback."""

import json
import re
import subprocess
import sys

import pytest
import torch

from attnlab import ModelConfig, build_model
from attnlab.cli import main


@pytest.fixture()
def model_dir(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    build_model(cfg).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_info_lists_siblings_with_measured_bytes(model_dir, capsys):
    assert main(["info", "--model", str(model_dir), "--memory", "1MiB"]) == 0
    out = capsys.readouterr().out
    # 2 layers x 2 (K,V) x kv_heads x head_dim 8 x 4 bytes
    rows = {int(m[0]): (m[1], int(m[2].replace(",", "")), int(m[3].replace(",", "")))
            for m in re.findall(r"^\s+(\d+)\s+(MHA|GQA|MQA)\s+([\d,]+)\s+\S+ \S+\s+([\d,]+)", out, re.M)}
    assert rows == {4: ("MHA", 512, 2048), 2: ("GQA", 256, 4096), 1: ("MQA", 128, 8192)}  # 1 MiB / bytes per token
    assert "<- this model" in next(line for line in out.splitlines() if "GQA" in line)


def test_info_from_config(tmp_path, capsys):
    path = tmp_path / "c.json"
    ModelConfig(d_model=64, n_heads=8, n_kv_heads=2, n_layers=3).to_json(path)
    assert main(["info", "--config", str(path)]) == 0
    assert "GQA" in capsys.readouterr().out


def test_generate_with_prompt_ids(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "--prompt-ids", "1,2,3", "--max-new-tokens", "5"]) == 0
    assert len(capsys.readouterr().out.split()) == 8


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--model", "{m}", "--prompt-ids", "1 2", "--max-new-tokens", "40"], "exceeds the model's context"),
        (["generate", "--model", "{m}", "--prompt", "hello"], "no tokenizer.json"),
        (["generate", "--model", "{m}", "--prompt-ids", "1,x"], "--prompt-ids must be integers"),
        (["generate", "--model", "/no/such/dir", "--prompt-ids", "1"], "no model at '/no/such/dir'"),
        (["info", "--model", "{m}", "--memory", "lots"], "--memory 'lots' is not a size"),
        (["info"], "one of the arguments --model --config is required"),
        (["bench", "nosuch"], "unknown benchmark 'nosuch'"),
        (["frobnicate"], "unknown command 'frobnicate'"),
    ],
)
def test_user_errors_are_one_line(model_dir, capsys, argv, message):
    argv = [a.replace("{m}", str(model_dir)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_garbled_checkpoint_from_the_console_script(model_dir):
    (model_dir / "config.json").write_text(json.dumps({"_attnlab_format": 1, "norm": "batchy"}))
    proc = subprocess.run([sys.executable, "-m", "attnlab", "info", "--model", str(model_dir)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "norm='batchy' is not valid" in proc.stderr and "Traceback" not in proc.stderr


def test_generate_speculative_with_stats(model_dir, capsys):
    plain_args = ["generate", "--model", str(model_dir), "--prompt-ids", "1,2,3,1,2", "--max-new-tokens", "12"]
    assert main(plain_args) == 0
    plain = capsys.readouterr().out
    assert main(plain_args + ["--draft", str(model_dir), "--gamma", "3", "--stats"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain and "acceptance 1.00" in captured.err
    assert main(plain_args + ["--prompt-lookup", "--adaptive", "--stats"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain and "tokens per target call" in captured.err
