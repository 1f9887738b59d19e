"""``attnlab bench rwkv`` on short contexts: rows for both models, a constant RWKV state, a growing KV cache."""

from attnlab.bench import rwkv


def test_quick_rwkv_bench(tmp_path):
    png = tmp_path / "r.png"
    assert rwkv.main(["--contexts", "64", "256", "--new-tokens", "2", "--repeats", "1", "--plot", str(png)]) == 0
    assert png.stat().st_size > 0
    rows = rwkv.run([64, 256], new_tokens=2, repeats=1, log=lambda *_: None)
    by = {(r["model"], r["context"]): r for r in rows}
    assert by["rwkv", 64]["cache_bytes"] == by["rwkv", 256]["cache_bytes"]
    assert by["transformer", 256]["cache_bytes"] == 4 * by["transformer", 64]["cache_bytes"]
    assert abs(by["rwkv", 64]["params_M"] - by["transformer", 64]["params_M"]) < 0.1 * by["transformer", 64]["params_M"]
