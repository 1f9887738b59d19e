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
        # memory above the warmed-up process: a chunk's activations, well under the process's own size
        assert 0 <= r["chunk_peak_MiB"] <= r["peak_extra_MiB"] < r["peak_rss_MiB"] / 4
        assert -1 < r["retained_MiB"] < 2
        assert r["state_bytes"] < r["kv_cache_MiB"] * 2**20  # 2k tokens of KV already outweigh the state
    assert memory[1]["kv_cache_MiB"] == pytest.approx(4 * memory[0]["kv_cache_MiB"])
    assert (plots / "infini_passkey.png").stat().st_size > 0 and (plots / "infini_memory.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "| multiple | tokens | infini_acc |" in printed and "memory above the warmed-up process" in printed
    # a second run reuses the finished models instead of training again
    assert main(["bench", "infini", "--quick", "--models-dir", str(tmp_path / "models")]) == 0
    assert "resuming" in capsys.readouterr().err


def test_key_in_window_counts_the_examples_retrieval_accuracy_sees():
    gen = torch.Generator().manual_seed(3)
    examples = [make_example(400, gen) for _ in range(20)]
    expected = sum(395 - seq.index(KEY) <= 100 - 6 for seq, _ in examples) / 20
    assert key_in_window(400, 20, 3, 100) == expected
    assert key_in_window(400, 20, 3, 400) == 1.0 and key_in_window(400, 20, 3, 20) == 0.0


def test_key_share_of_the_first_layer_equals_a_float64_reference_from_the_weights():
    """Layer 0's memory keys and queries are functions of the token alone (RoPE only rotates the local
    attention), so the passkey block's share of the read can be recomputed from the weights."""
    from attnlab import build_model
    from attnlab.bench.infini import key_share, model_config, quick_settings

    torch.manual_seed(0)
    s = quick_settings()
    model = build_model(model_config(s, "infini")).eval()
    length, n, seed = 4 * s.train_len, 6, 11
    got = key_share(model, length, n, seed)
    assert len(got) == model.config.n_layers and all(0 < x <= 1 for x in got)

    block0, L = model.blocks[0], s.segment_len
    H, K, D = model.config.n_heads, model.config.n_kv_heads, model.config.head_dim
    gen, shares = torch.Generator().manual_seed(seed), []
    with torch.no_grad():
        for _ in range(n):
            seq, _ = make_example(length, gen)
            prompt = seq[:-5]
            start, written = seq.index(KEY), (len(prompt) // L) * L
            if start + 6 >= written:
                continue
            h = block0.attn_norm(model.embed(torch.tensor(prompt))).double()  # (T, d)
            sk = torch.nn.functional.elu(h[:written] @ block0.attn.k_proj.weight.double().T).view(-1, K, D) + 1
            sq = torch.nn.functional.elu(h[-1] @ block0.attn.q_proj.weight.double().T).view(H, D) + 1
            w = torch.einsum("hd,thd->ht", sq, sk[:, torch.arange(H) // (H // K)])  # (H, T): σ(q)·σ(k_t)
            shares.append(float((w[:, start:start + 7].sum(1) / w.sum(1)).max()))
    assert shares and got[0] == pytest.approx(sum(shares) / len(shares), rel=1e-5)


def _live_after_streaming(model, n_chunks: int, chunk: int = 64) -> tuple[int, int, int]:
    """(live tensors, their bytes, Python heap bytes allocated and still held) after streaming ``n_chunks``
    chunks through a fresh state, measured above the state after one warm-up chunk."""
    import gc
    import tracemalloc

    from attnlab.tasks.passkey import filler

    def tensors():
        live = [o for o in gc.get_objects() if issubclass(type(o), torch.Tensor)]
        return len(live), sum(t.untyped_storage().nbytes() for t in live)

    with torch.inference_mode():
        cache = model.new_cache(1)
        model(torch.tensor([filler(chunk)]), cache=cache)  # warm-up: the state's buffers exist from here on
        gc.collect()
        count0, bytes0 = tensors()
        tracemalloc.start()
        for i in range(1, n_chunks + 1):
            model(torch.tensor([filler(chunk, i * chunk)]), cache=cache)  # (1, C), logits dropped
        gc.collect()
        heap = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        count, nbytes = tensors()
    assert cache.length == (n_chunks + 1) * chunk
    return count - count0, nbytes - bytes0, heap


def test_streaming_keeps_nothing_per_segment():
    """What the stream holds above the warmed-up state is the same after 2 and after 24 chunks (6 vs 96
    segments): no tensor and no Python object is kept per chunk or segment. (The bench's RSS figures measure
    the same from outside; this is the cheap, exact version.)"""
    from attnlab import build_model
    from attnlab.bench.infini import model_config, quick_settings

    torch.manual_seed(0)
    model = build_model(model_config(quick_settings(), "infini")).eval()
    short, long = _live_after_streaming(model, 2), _live_after_streaming(model, 24)
    assert short[:2] == long[:2] == (0, 0)  # no extra live tensors, no extra tensor bytes
    assert long[2] - short[2] < 4096  # Python heap: a few interpreter caches at most, not per-chunk objects
