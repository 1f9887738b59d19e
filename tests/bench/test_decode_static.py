"""The benchmarks run the static-shape decode path as rows of their own (``bench decode --compile``,
``bench speculative --static``). torch.compile is replaced by the identity here, so the static path runs
uncompiled: this checks the wiring and the exactness judgement, not the speed."""

import json

import pytest
import torch


def _identity_compile(fn, **kwargs):
    return fn


def test_bench_decode_static_row(monkeypatch, tmp_path):
    pytest.importorskip("transformers")
    from attnlab.bench import decode

    monkeypatch.setattr(torch, "compile", _identity_compile)
    out = tmp_path / "d.json"
    code = decode.main(["--models", "tiny", "--precisions", "fp32", "--compile", "--new-tokens", "4",
                        "--repeats", "1", "--json", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["impl"].split()[0], r["precision"]) for r in rows] == [
        ("attnlab", "fp32"), ("transformers", "fp32"), ("attnlab", "fp32"), ("attnlab", "fp32")]
    assert rows[0]["impl"] == decode.DEFAULT_IMPL and rows[0]["same_tokens"] is True
    static = next(r for r in rows if r["impl"] == "attnlab static")
    assert static["same_tokens"] is True and isinstance(static["vs_hf"], float) and static["compile_s"] >= 0


def test_bench_decode_rejects_unknown_precisions():
    pytest.importorskip("transformers")
    from attnlab.bench import decode

    with pytest.raises(ValueError, match="choose from fp32, bf16, int8"):
        decode.main(["--models", "tiny", "--precisions", "fp16"])


def test_bench_speculative_static(monkeypatch, tmp_path):
    from attnlab.bench import speculative

    monkeypatch.setattr(torch, "compile", _identity_compile)
    out = tmp_path / "s.json"
    assert speculative.main(["--prompts", "1", "--prompt-len", "16", "--new-tokens", "8", "--gammas", "2",
                             "--repeats", "1", "--static", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["precision"] == "fp32"
    assert data["static"]["target"]["graphs"] >= 1 and data["static"]["draft"]["failed"] is None
    assert all(r.get("identical", True) for r in data["rows"])


def test_speculative_ceiling_is_tokens_per_call_over_round_cost():
    from attnlab.bench.speculative import ceiling

    # α = 0.5, γ = 2: 1 + 0.5 + 0.25 = 1.75 tokens per target call; a round = 2 x 1 ms + 6 ms = 8 ms, plain 4 ms
    assert ceiling(0.5, 2, {1: 4e-3, 3: 6e-3}, 1e-3) == pytest.approx(1.75 * 4 / 8)
    # a free draft and a verify call as cheap as one token: the speed-up is the tokens per call
    assert ceiling(0.9, 4, {1: 1.0, 5: 1.0}, 0.0) == pytest.approx((1 - 0.9**5) / 0.1)


def test_bench_speculative_costs(tmp_path):
    from attnlab.bench import speculative

    out = tmp_path / "s.json"
    assert speculative.main(["--prompts", "1", "--prompt-len", "16", "--new-tokens", "8", "--gammas", "2",
                             "--repeats", "1", "--costs", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["call_costs_s"]["target"]) == {"1", "3"} and set(data["call_costs_s"]["draft"]) == {"1"}
    assert all(c > 0 for c in data["call_costs_s"]["target"].values())
    assert all(f["ceiling_speedup"] > 0 for f in data["formula"])


def test_bench_speculative_reports_the_decode_phase(tmp_path):
    from attnlab.bench import speculative

    out, png = tmp_path / "s.json", tmp_path / "s.png"
    assert speculative.main(["--prompts", "1", "--prompt-len", "16", "--new-tokens", "8", "--gammas", "2",
                             "--repeats", "1", "--json", str(out), "--plot", str(png)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert png.stat().st_size > 0
    for r in rows:
        assert r["decode_tok_per_s"] > 0
        if r["method"] != "plain" and r["identical"]:
            assert isinstance(r["decode_speedup"], float) and r["decode_speedup"] > 0
    plain = next(r for r in rows if r["method"] == "plain")
    # the decode phase leaves the prefill out: 7 tokens in less time than 8 tokens and the prompt took
    assert "decode_speedup" not in plain and plain["decode_tok_per_s"] * 8 / 7 > plain["tok_per_s"]
