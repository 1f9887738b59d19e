"""``attnlab info --memory``: its figures are what the allocations measure.

A ~22M-parameter decoder with a tied embedding is saved as a model directory and measured by the CLI in a
fresh process (``--json``). The weight figures must equal the bytes of the tensors the file holds (read back
with safetensors, an independent reader; the tied table once), the KV cache the size its shape gives, and the
RSS growths must agree with them within the stated tolerance: 2% + 6 MiB for the weights (module objects,
allocator slack; a second copy of the 16 MiB embedding would fail it), 5% + 4 MiB for the cache. The baseline is
taken after a rehearsal load, so what a process pays once (kernel code pages, thread pool) is not counted as
weights: without it the excess was 17 MiB here and 37 MiB on a CI machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import attnlab
from attnlab import ModelConfig, build_model
from attnlab.memstats import release_freed_memory, rss_bytes, tensor_bytes

MIB = 1024 ** 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    cfg = ModelConfig(family="decoder", vocab_size=8192, d_model=512, n_layers=6, n_heads=8, n_kv_heads=2,
                      d_ff=1536, ffn="swiglu", norm="rms", position="rope", tie_embeddings=True, max_seq_len=1024)
    directory = tmp_path_factory.mktemp("memory") / "model"
    build_model(cfg).save_pretrained(directory)
    return directory


def file_elements(directory: Path) -> int:
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys())


def run_info(directory: Path, *extra: str) -> dict:
    env_path = str(Path(attnlab.__file__).parents[1])
    proc = subprocess.run([sys.executable, "-m", "attnlab", "info", "--model", str(directory), "--memory", "--json",
                           "--context", "1000", *extra], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": env_path})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("precision,size", [(None, 4), ("bf16", 2)])
def test_memory_report_matches_the_allocations(model_dir, precision, size):
    report = run_info(model_dir, *(["--precision", precision] if precision else []))
    elements = file_elements(model_dir)  # tied: the embedding is stored once
    assert report["weights"] == elements * size == sum(r["bytes"] for r in report["weights_by_dtype"].values())
    assert set(report["weights_by_dtype"]) == {"float32" if size == 4 else "bfloat16"}
    kv = 2 * 6 * 2 * 1000 * 64 * size  # K and V x layers x kv heads x context x head dim
    assert report["cache"] == kv
    assert abs(report["load_growth"] - report["weights"]) <= 0.02 * report["weights"] + 6 * MIB, report
    assert abs(report["cache_growth"] - report["cache"]) <= 0.05 * report["cache"] + 4 * MIB, report
    assert 0 <= report["workspace"] < 64 * MIB
    assert report["rss_end"] >= report["total"] - 8 * MIB


def test_tensor_bytes_counts_shared_blocks_once():
    """A tied head (one Parameter under two names) and a buffer viewing the embedding's memory (what a packed
    bf16 head does after prepare_for_decode) are counted once; a real copy is counted."""
    model = build_model(ModelConfig(family="decoder", vocab_size=64, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                                    tie_embeddings=True))
    expected = sum(t.nbytes for t in model.state_dict().values()) - model.lm_head.weight.nbytes
    n = len(model.state_dict()) - 1
    model.register_buffer("alias", model.embed.weight.detach(), persistent=False)
    assert tensor_bytes(model) == {"float32": {"bytes": expected, "tensors": n}}
    model.register_buffer("copy", model.embed.weight.detach().to(torch.bfloat16), persistent=False)
    assert tensor_bytes(model)["bfloat16"] == {"bytes": model.embed.weight.numel() * 2, "tensors": 1}


def test_release_freed_memory_returns_heap_pages():
    """Many mid-sized tensors (below glibc's mmap threshold once it has grown) freed: trimming gives them back."""
    keep = torch.ones(8 << 20, dtype=torch.uint8)  # raises the threshold: later blocks come from the heap
    del keep
    blocks = [torch.ones(1 << 20, dtype=torch.uint8) for _ in range(96)]
    before = rss_bytes()
    del blocks
    release_freed_memory()
    assert rss_bytes() < before - 48 * MIB


@pytest.mark.parametrize("argv, message", [
    (["info", "--config", "{c}", "--memory"], "give --model too"),
    (["info", "--model", "{m}", "--memory", "--context", "0"], "--context 0"),
    (["info", "--model", "{m}", "--memory", "--context", "5000"], "in 1..1024"),
    (["info", "--model", "{m}", "--precision", "bf16"], "go with --memory"),
    (["info", "--model", "{m}", "--memory", "--precision", "fp16"], "'fp16' is not one of fp32, bf16, int8"),
])
def test_memory_flags_errors_are_one_line(model_dir, capsys, argv, message):
    from attnlab.cli import main

    argv = [a.replace("{m}", str(model_dir)).replace("{c}", str(model_dir / "config.json")) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
