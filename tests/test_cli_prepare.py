"""The commands prepare their model for decoding by default, and ``--no-prepare`` runs it as loaded (same
greedy output on an fp32 model); ``--compile`` stays opt-in."""

from __future__ import annotations

import pytest
import torch

from attnlab import ModelConfig, build_model
from attnlab.cli import main
from attnlab.inference import fast


@pytest.fixture()
def model_dir(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, d_model=256, n_layers=2, n_heads=4, d_ff=512, max_seq_len=64)
    build_model(cfg).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


@pytest.fixture()
def swaps(monkeypatch) -> list[int]:
    """How many times a command swapped in kernel linears (prepare_for_decode or the lazy preparation)."""
    calls: list[int] = []
    real = fast.kernel_linears

    def counted(model):
        calls.append(real(model))
        return calls[-1]

    monkeypatch.setattr(fast, "kernel_linears", counted)
    return calls


@pytest.mark.parametrize("extra", [[], ["--draft", "{m}", "--gamma", "2"]])
def test_generate_prepares_by_default_and_no_prepare_runs_the_model_as_loaded(model_dir, capsys, swaps, extra):
    argv = ["generate", "--model", str(model_dir), "--prompt-ids", "5,6,7", "--max-new-tokens", "10"]
    argv += [a.replace("{m}", str(model_dir)) for a in extra]
    assert main(argv) == 0
    prepared = capsys.readouterr().out
    assert swaps and sum(swaps) >= 5  # per layer o_proj and down (the fused ones are kernel linears), the head
    swaps.clear()
    for flag in ("--no-prepare", "--reference"):
        assert main(argv + [flag]) == 0
        assert capsys.readouterr().out == prepared
    assert swaps == []  # neither the command nor generate()'s lazy preparation touched the model


def test_compile_is_opt_in_and_no_prepare_refuses_it(model_dir, capsys):
    from attnlab.commands.args import COMPILE_HELP

    assert "Off by default" in COMPILE_HELP
    assert main(["chat", "--model", str(model_dir), "--no-prepare", "--compile"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "drop --dtype/--compile or --no-prepare" in err and "Traceback" not in err
