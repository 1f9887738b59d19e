"""attnlab bench infini: the quick mode runs end to end and its figures hang together."""

import json

import pytest
import torch

from attnlab.bench.infini import key_in_window
from attnlab.cli import main
from attnlab.tasks.passkey import KEY, make_example


def test_quick_run(tmp_path, capsys):
    out, plots = tmp_path / "infini.json", tmp_path / "img"
    assert main(["bench", "infini", "--quick", "--json", str(out), "--plot-dir", str(plots),
                 "--models-dir", str(tmp_path / "models")]) == 0
    result = json.loads(out.read_text())
    assert [t["model"] for t in result["training"]] == ["infini", "softmax"]
    assert [t["steps"] for t in result["training"]] == [6, 4]
    assert [r["multiple"] for r in result["passkey"]] == [1, 4]
    for r in result["passkey"]:
        assert 0 <= r["infini_acc"] <= 1 and 0 <= r["softmax_acc"] <= 1
    assert result["passkey"][0]["key_in_window"] == 1.0  # at 1x the window is the whole prompt
    memory = result["memory"]
    assert [r["tokens"] for r in memory] == [2048, 8192]
    assert len({r["state_bytes"] for r in memory}) == 1  # the state does not grow with the stream
    for r in memory:
        assert 50 < r["peak_rss_MiB"] < 4096 and r["tok_s"] > 0
        assert r["state_bytes"] < r["kv_cache_MiB"] * 2**20  # 2k tokens of KV already outweigh the state
    assert memory[1]["kv_cache_MiB"] == pytest.approx(4 * memory[0]["kv_cache_MiB"])
    assert (plots / "infini_passkey.png").stat().st_size > 0 and (plots / "infini_memory.png").stat().st_size > 0
    assert "| multiple | tokens | infini_acc |" in capsys.readouterr().out
    # a second run reuses the finished models instead of training again
    assert main(["bench", "infini", "--quick", "--models-dir", str(tmp_path / "models")]) == 0
    assert "resuming" in capsys.readouterr().err


def test_key_in_window_counts_the_examples_retrieval_accuracy_sees():
    gen = torch.Generator().manual_seed(3)
    examples = [make_example(400, gen) for _ in range(20)]
    expected = sum(395 - seq.index(KEY) <= 100 - 6 for seq, _ in examples) / 20
    assert key_in_window(400, 20, 3, 100) == expected
    assert key_in_window(400, 20, 3, 400) == 1.0 and key_in_window(400, 20, 3, 20) == 0.0
