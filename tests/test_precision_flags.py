"""One precision and compile vocabulary across commands (issue 26, move 3): ``commands/args.py`` names them,
each flag takes the subset it can honour, long names (float32, bfloat16) are accepted as the short ones."""

from __future__ import annotations

import pytest
import torch

from attnlab import ModelConfig, build_model
from attnlab.cli import main


def test_decode_names_are_what_prepare_for_decode_takes():
    """``args.DECODE`` is written out (parsing a flag imports no torch): it must name exactly what
    ``prepare_for_decode`` accepts, so a precision added there is offered by generate and chat."""
    from attnlab.commands.args import DECODE, PRECISIONS
    from attnlab.inference.fast import NATIVE
    from attnlab.inference.fast import PRECISIONS as FAST

    assert sorted(DECODE) == sorted((*FAST, NATIVE)) and len(set(DECODE)) == len(DECODE)
    assert set(DECODE) <= set(PRECISIONS)


@pytest.fixture()
def teacher_dir(tmp_path):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    build_model(cfg).save_pretrained(tmp_path / "teacher")
    return tmp_path / "teacher"


class _Stop(ValueError):
    pass


@pytest.mark.parametrize("flags, precision, compile", [
    (["--precision", "bfloat16"], "bf16", False),
    (["--precision", "float32", "--compile"], "fp32", "static"),  # a bare --compile: static-shape graphs, as before
    (["--compile", "static-jit"], "bf16", "static-jit"),
])
def test_data_teacher_prepares_at_the_short_name(teacher_dir, tmp_path, monkeypatch, capsys, flags, precision,
                                                 compile):
    import attnlab.inference.fast as fast

    seen = {}

    def prepare(model, *, precision, compile):
        seen.update(precision=precision, compile=compile)
        raise _Stop("prepared")

    monkeypatch.setattr(fast, "prepare_for_decode", prepare)
    argv = ["data", "teacher", "--teacher", str(teacher_dir), "--out", str(tmp_path / "o"), "--prompt-lengths", "4",
            "--new-tokens", "2", *flags]
    assert main(argv) == 2 and "prepared" in capsys.readouterr().err
    assert seen == {"precision": precision, "compile": compile}


def test_train_flags_take_the_long_names():
    from attnlab.training.cli import build_parser, resolve_settings

    args = build_parser().parse_args(["--out", "o", "--distill-precision", "bfloat16", "--save-dtype", "float16"])
    assert args.distill_precision == "bf16"
    assert resolve_settings(args)[1]["save_dtype"] == "fp16"
    # a config file or --set may still write torch's name: TrainConfig keeps the short one
    args = build_parser().parse_args(["--out", "o", "--preset", "tiny", "--set", "save_dtype=bfloat16"])
    assert resolve_settings(args)[1]["save_dtype"] == "bf16"


@pytest.mark.parametrize("argv, needle", [
    (["data", "teacher", "--teacher", "t", "--out", "o", "--precision", "float16"], "--precision"),
    (["data", "teacher", "--teacher", "t", "--out", "o", "--compile", "jit"], "--compile"),
    (["train", "--out", "o", "--distill-precision", "int8"], "--distill-precision"),
    (["train", "--out", "o", "--save-dtype", "q4_0"], "--save-dtype"),
])
def test_an_unknown_name_is_one_error_line(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and needle in err, err


def test_train_config_keeps_short_names_and_reads_long_ones():
    from attnlab.training.trainer import TrainConfig

    assert TrainConfig().save_dtype == "fp32"
    assert TrainConfig(save_dtype="bfloat16").validate().save_dtype == "bf16"  # a run saved before the short names
    with pytest.raises(ValueError, match="save_dtype='int8'"):
        TrainConfig(save_dtype="int8").validate()
    from attnlab.commands.args import torch_dtype

    assert torch_dtype(TrainConfig(save_dtype="float16").validate().save_dtype) == torch.float16
