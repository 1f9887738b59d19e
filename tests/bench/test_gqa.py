"""attnlab bench gqa: the quick mode runs end to end and its figures hang together."""

import json
import math

import torch

from attnlab import ModelConfig, build_model
from attnlab.bench.gqa import decode_speeds, filled_cache, long_context_view, targets_for
from attnlab.cli import main


def test_quick_run_on_a_small_mha_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path / "cache"))
    out, png = tmp_path / "gqa.json", tmp_path / "gqa.png"
    assert main(["bench", "gqa", "--quick", "--models", "mha", "--json", str(out), "--plot", str(png)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["n_kv_heads"] for r in rows] == [8, 4, 2, 1]
    source = rows[0]
    assert source["kind"] == "MHA (source)" and source["ppl_converted"] == source["ppl_before"]
    for r in rows:  # the measured cache shrinks exactly by the head ratio
        assert r["kv_bytes_per_token"] * 8 == source["kv_bytes_per_token"] * r["n_kv_heads"]
        assert all(math.isfinite(r[k]) for k in ("ppl_before", "ppl_converted", "ppl_uptrained"))
        assert r["tok_s@64"] > 0
    assert png.stat().st_size > 0
    assert "| mha | 8/1 | MQA |" in capsys.readouterr().out


def test_timing_helpers():
    assert targets_for(8) == [8, 4, 2, 1] and targets_for(3) == [3, 1]
    cfg = ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
    model = build_model(cfg).eval()
    wide = long_context_view(model, 40)  # same weights, a position limit that admits 40 positions
    assert wide.config.max_seq_len == 40 and long_context_view(model, 16) is model
    ids = torch.randint(0, 40, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(wide(ids), model(ids))
    cache = filled_cache(wide, 30, 5)
    assert cache.length == 30 and cache.max_len == 35
    speeds = decode_speeds({2: model}, 30, 3, repeats=1)
    assert set(speeds) == {2} and speeds[2] > 0
