"""Every benchmark's precision and compile flags speak the one vocabulary of ``commands/args.py``: the long
names (float32, bfloat16) are accepted and arrive as the short ones; an unknown name is one ``error:`` line
and exit status 2, never argparse's usage text or a traceback."""

from __future__ import annotations

import argparse
import importlib

import pytest

from attnlab.cli import main


class _Parsed(Exception):
    """Raised in place of the benchmark's work once its flags are parsed."""


def parsed(monkeypatch, module_name: str, argv: list[str]):
    """The namespace ``module.main(argv)`` parses its flags into (nothing runs after the parse)."""
    module = importlib.import_module(module_name)
    made = {}
    parse = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        made["args"] = parse(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    with pytest.raises(_Parsed):
        module.main(argv)
    return made["args"]


@pytest.mark.parametrize("module, argv, attr, want", [
    ("attnlab.bench.decode", ["--precisions", "float32, bfloat16,int8"], "precisions", ("fp32", "bf16", "int8")),
    ("attnlab.bench.decode", ["--compile", "static-jit"], "compile", "static-jit"),
    ("attnlab.bench.decode", ["--compile"], "compile", True),
    ("attnlab.bench.decode", [], "compile", False),
    ("attnlab.bench.speculative", ["--precision", "bfloat16"], "precision", "bf16"),
    ("attnlab.bench.linear", ["--precisions", "float32", "q4_k"], "precisions", ["fp32", "q4_k"]),
    ("attnlab.bench.attention", ["--dtypes", "bfloat16", "float32"], "dtypes", ["bf16", "fp32"]),
    ("attnlab.bench.compiled_start", ["--precisions", "bfloat16", "--modes", "eager", "dynamic"], "precisions",
     ["bf16"]),
])
def test_long_names_are_accepted_as_the_short_ones(monkeypatch, module, argv, attr, want):
    assert getattr(parsed(monkeypatch, module, argv), attr) == want


@pytest.mark.parametrize("argv, needle", [
    (["decode", "--precisions", "fp32,float16"], "--precisions"),
    (["decode", "--compile", "jit"], "--compile"),
    (["speculative", "--precision", "q4_0"], "--precision"),
    (["linear", "--precisions", "fp16"], "--precisions"),
    (["attention", "--dtypes", "float16"], "--dtypes"),
    (["attention", "--seq", "0"], "sequence lengths"),
    (["compiled-start", "--precisions", "native"], "--precisions"),
    (["compiled-start", "--modes", "jit"], "--modes"),
])
def test_an_unknown_name_is_one_error_line(capsys, argv, needle):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and needle in err, err
