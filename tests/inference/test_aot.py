"""Static decode graphs compiled ahead of time and cached on disk (inference/aot.py): the tokens and logits of
the static path, a second process that loads the package and compiles nothing, a package serving another
model of the same shape with that model's own weights, a corrupt entry rebuilt, and keys that tell apart
what the compiled code depends on.

The model is small but wide enough (d_model 128, d_ff 512) that its FFN products go through attnlab's C++
operator (``attnlab_kernels::rows_matmul``, called from the package by AOTInductor's proxy executor) where the
kernel is built. One package is compiled for the module (~20 s on a busy 2-core machine) and one more by
the corrupt-entry test; everything else loads them.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

import attnlab
from attnlab.inference import aot, static
from attnlab.inference.fast import prepare_for_decode
from attnlab.layers import cpu_kernels

CONFIG = dict(family="decoder", vocab_size=300, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32,
              d_ff=512, max_seq_len=128, init_std=0.2, position="rope")
NEW = 8


def make(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return attnlab.build_model(attnlab.ModelConfig(**CONFIG)).eval()


def with_aot(ref: torch.nn.Module, directory) -> torch.nn.Module:
    model = prepare_for_decode(copy.deepcopy(ref))
    cpu_kernels.available()  # loaded before anything is traced, as prepare_for_decode(compile=...) does
    assert static.install(model, aot=True, aot_dir=directory) is not None
    return model


def uncompiled(ref: torch.nn.Module) -> torch.nn.Module:
    """The static path run eagerly: the same step, masks and cache writes, no compiler."""
    model = prepare_for_decode(copy.deepcopy(ref))
    assert static.install(model, compiler=lambda fn, **kw: fn) is not None
    return model


IDS = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(1))


@torch.inference_mode()
def logits_along(model, tokens: torch.Tensor) -> torch.Tensor:
    """The prompt's last logits, then each decode step's as ``tokens`` (1, N) are fed one by one -> (N+1, V)."""
    cache = model.new_cache(1, IDS.shape[1] + tokens.shape[1])
    out = [model(IDS, cache=cache)[0, -1]]
    out += [model(tokens[:, i:i + 1], cache=cache)[0, -1] for i in range(tokens.shape[1])]
    return torch.stack(out)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A package compiled into ``<root>/graphs`` by greedy decoding (batch 1, one token per call)."""
    root = tmp_path_factory.mktemp("attnlab_cache")
    ref = make(0)
    fast = with_aot(ref, root / "graphs")
    out = attnlab.generate(fast, IDS, NEW)
    return root, ref, fast, out[:, IDS.shape[1]:]


def test_the_package_gives_the_static_paths_tokens_and_logits(built):
    root, ref, fast, tokens = built
    assert fast.static_decoder.failed is None and fast.static_decoder.aot is not None
    assert (fast.static_decoder.aot.stats.built, fast.static_decoder.aot.stats.loaded) == (1, 0)
    assert fast.static_decoder.stats.static_calls == NEW - 1  # the prompt ran eagerly
    assert torch.equal(tokens, attnlab.generate(uncompiled(ref), IDS, NEW)[:, IDS.shape[1]:])
    torch.testing.assert_close(logits_along(fast, tokens), logits_along(uncompiled(ref), tokens), rtol=1e-5, atol=1e-5)
    assert [p.suffix for p in (root / "graphs").iterdir()] == [".pt2"]  # no temporary file left behind


SECOND = """
import json, sys, torch, attnlab
torch.set_num_threads({threads})  # the key holds the thread count (inductor writes it into its loops)
sys.path.insert(0, {tests!r})
from test_aot import make, IDS, NEW
from attnlab.inference import aot, static
from attnlab.inference.fast import prepare_for_decode
fast = prepare_for_decode(make(0), compile="static")
out = attnlab.generate(fast, IDS, NEW)[0, IDS.shape[1]:].tolist()
s = fast.static_decoder
parts = aot.key_parts(aot.model_signature(fast), (1, 1, 256, torch.float32, "cpu"), static.inductor_options(None))
print(json.dumps(dict(tokens=out, failed=s.failed, loaded=s.aot.stats.loaded, built=s.aot.stats.built,
                      rejected=s.aot.stats.rejected, static_calls=s.stats.static_calls, parts=parts)))
"""


def test_a_second_process_loads_the_package_and_compiles_nothing(built):
    root, _, fast, tokens = built
    env = {**os.environ, "ATTNLAB_CACHE": str(root), "ATTNLAB_AOT": "1"}
    kernels = cpu_kernels.cache_dir()  # the kernel already built for this machine, not built again
    if kernels.is_dir() and not (root / "kernels").exists():
        (root / "kernels").symlink_to(kernels)
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", SECOND.format(tests=os.path.dirname(__file__), threads=torch.get_num_threads())],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    run = json.loads(done.stdout.strip().splitlines()[-1])
    ours = aot.key_parts(aot.model_signature(fast), (1, 1, 256, torch.float32, "cpu"), static.inductor_options(None))
    differ = [(a, b) for a, b in zip(ours, run.pop("parts")) if a != b]
    assert run["failed"] is None and (run["loaded"], run["built"], run["rejected"]) == (1, 0, 0), (run, differ)
    assert run["static_calls"] == NEW - 1 and run["tokens"] == tokens[0].tolist()
    assert "compiling" not in done.stderr


def test_a_package_serves_another_model_of_the_same_shape_with_its_own_weights(built):
    """The package holds no weights: a model with other weights loads it and computes with its own."""
    root, ref, fast, tokens = built
    other_ref = make(1)
    other = with_aot(other_ref, root / "graphs")
    got = logits_along(other, tokens)
    assert (other.static_decoder.aot.stats.loaded, other.static_decoder.aot.stats.built) == (1, 0)
    torch.testing.assert_close(got, logits_along(uncompiled(other_ref), tokens), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, logits_along(fast, tokens), atol=1e-2)  # and not the first model's


def _flip_a_byte_in_the_library(path) -> None:
    with zipfile.ZipFile(path) as archive:
        entry = max(archive.infolist(), key=lambda e: e.compress_size)  # the compiled library
    with open(path, "r+b") as f:
        f.seek(entry.header_offset + 30 + len(entry.filename.encode()) + entry.compress_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_damaged_archive_is_refused_by_load(built, tmp_path):
    root, ref, fast, _ = built
    (package,) = (root / "graphs").iterdir()
    flipped, truncated = tmp_path / "flipped.pt2", tmp_path / "truncated.pt2"
    flipped.write_bytes(package.read_bytes())
    _flip_a_byte_in_the_library(flipped)
    truncated.write_bytes(package.read_bytes()[: package.stat().st_size // 2])
    for path in (flipped, truncated):
        with pytest.raises(Exception):  # noqa: B017 (zipfile.BadZipFile or ValueError, never a loaded graph)
            aot.load(path, fast)
    aot.load(package, fast)  # the intact one loads


def test_a_corrupt_cache_entry_is_rebuilt_not_trusted(built, tmp_path, capsys):
    root, ref, _, tokens = built
    (package,) = (root / "graphs").iterdir()
    (tmp_path / package.name).write_bytes(package.read_bytes())
    _flip_a_byte_in_the_library(tmp_path / package.name)
    fast = with_aot(ref, tmp_path)
    assert torch.equal(attnlab.generate(fast, IDS, NEW)[:, IDS.shape[1]:], tokens)
    stats = fast.static_decoder.aot.stats
    assert (stats.rejected, stats.built, stats.loaded) == (1, 1, 0)
    err = capsys.readouterr().err
    assert "unusable" in err and err.count("attnlab: compiling a decode graph") == 1
    with zipfile.ZipFile(tmp_path / package.name) as archive:
        assert archive.testzip() is None  # the rebuilt entry is whole


def test_keys_tell_apart_what_the_compiled_code_depends_on():
    fp32 = prepare_for_decode(make(0))
    other_weights = prepare_for_decode(make(1))
    bf16 = prepare_for_decode(make(0), precision="bf16")
    deeper = prepare_for_decode(attnlab.build_model(attnlab.ModelConfig(**{**CONFIG, "n_layers": 3})))
    shape, options = (1, 1, 256, torch.float32, "cpu"), static.inductor_options(None)

    def key(model, shape=shape, options=options):
        return aot.graph_key(aot.model_signature(model), shape, options)

    assert key(fp32) == key(other_weights)  # weights are not in the package
    assert len({key(fp32), key(bf16), key(deeper), key(fp32, (1, 2, 256, torch.float32, "cpu")),
                key(fp32, (1, 1, 512, torch.float32, "cpu")), key(fp32, options={})}) == 6
    threads, before = torch.get_num_threads(), key(fp32)
    try:
        torch.set_num_threads(threads + 1)  # inductor writes the thread count into its loops
        assert key(fp32) != before
    finally:
        torch.set_num_threads(threads)
    if cpu_kernels.available():
        with cpu_kernels.kernels_disabled():  # the layers take PyTorch's products instead of attnlab's kernel
            assert key(fp32) != before


def test_the_compile_modes_choose_the_packages_or_torch_compile(monkeypatch):
    """``compile="static"``: packages unless ``ATTNLAB_AOT=0``; ``"static-jit"``: torch.compile in the process.
    (Nothing compiles here: graphs are built on the first decode call.)"""
    monkeypatch.setenv("ATTNLAB_AOT", "1")
    assert prepare_for_decode(make(0), compile="static").static_decoder.aot is not None
    assert prepare_for_decode(make(0), compile=True).static_decoder.aot is not None
    assert prepare_for_decode(make(0), compile="static-jit").static_decoder.aot is None
    monkeypatch.setenv("ATTNLAB_AOT", "0")
    assert prepare_for_decode(make(0), compile="static").static_decoder.aot is None


@pytest.mark.slow
def test_two_processes_filling_the_cache_at_once_leave_one_whole_package(tmp_path):
    """Both compile (neither finds a package), each writes its own temporary file and renames it: the cache
    ends with one intact package that a third process loads, and every process decodes the same tokens."""
    env = {**os.environ, "ATTNLAB_CACHE": str(tmp_path), "ATTNLAB_AOT": "1"}
    if cpu_kernels.cache_dir().is_dir():
        (tmp_path / "kernels").symlink_to(cpu_kernels.cache_dir())
    command = [sys.executable, "-W", "ignore", "-c", SECOND.format(tests=os.path.dirname(__file__), threads=torch.get_num_threads())]
    both = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for _ in range(2)]
    runs = []
    for proc in both:
        out, err = proc.communicate(timeout=1200)
        assert proc.returncode == 0, err[-2000:]
        runs.append(json.loads(out.strip().splitlines()[-1]))
    third = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    runs.append(json.loads(third.stdout.strip().splitlines()[-1]))
    assert [r["built"] + r["loaded"] for r in runs] == [1, 1, 1] and runs[2]["loaded"] == 1, runs
    assert runs[0]["tokens"] == runs[1]["tokens"] == runs[2]["tokens"]
    files = list((tmp_path / "graphs").iterdir())
    assert [p.suffix for p in files] == [".pt2"]
    with zipfile.ZipFile(files[0]) as archive:
        assert archive.testzip() is None


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_the_package_computes_what_torch_compile_computes(precision, tmp_path):
    """The same inductor options, the same graph: the package's logits equal the ``torch.compile`` static
    graph's bit for bit along the same tokens, at every precision (bf16/int8 weights are non-persistent
    buffers, handed over like parameters)."""
    ref = make(2)
    packaged = prepare_for_decode(copy.deepcopy(ref), precision=precision)
    cpu_kernels.available()
    static.install(packaged, aot=True, aot_dir=tmp_path)
    jit = prepare_for_decode(copy.deepcopy(ref), precision=precision, compile="static-jit")
    tokens = attnlab.generate(ref, IDS, NEW)[:, IDS.shape[1]:]
    got = logits_along(packaged, tokens)
    assert packaged.static_decoder.aot is not None and packaged.static_decoder.aot.stats.built == 1
    assert torch.equal(got, logits_along(jit, tokens))
