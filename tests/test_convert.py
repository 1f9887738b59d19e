import pytest
import torch

import attnlab
from attnlab import ModelConfig, build_model
from attnlab.cli import main
from attnlab.commands.info import sibling_rows
from attnlab.convert import to_kv_heads
from attnlab.inference.cache import KVCache


def mha(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, d_model=64, n_layers=2, n_heads=8, n_kv_heads=8, max_seq_len=64,
                      attn_qkv_bias=True, **kw)
    return build_model(cfg).eval()


@pytest.mark.parametrize("k", [4, 2, 1])
def test_identical_heads_within_groups_convert_exactly(k):
    model = mha()
    D, g = model.config.head_dim, 8 // k
    with torch.no_grad():  # make the heads of each future group identical
        for block in model.blocks:
            for proj in (block.attn.k_proj, block.attn.v_proj):
                w = proj.weight.view(k, g, D, -1)
                w.copy_(w[:, :1].expand_as(w))
                b = proj.bias.view(k, g, D)
                b.copy_(b[:, :1].expand_as(b))
    new = to_kv_heads(model, k)
    ids = torch.randint(0, 50, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(new(ids), model(ids), rtol=1e-5, atol=1e-5)
    assert new.config.n_kv_heads == k


def test_same_k_is_identity_and_pooling_is_the_mean():
    model = mha()
    same = to_kv_heads(model, 8)
    for (n, a), (_, b) in zip(model.state_dict().items(), same.state_dict().items()):
        assert torch.equal(a, b), n
    two = to_kv_heads(model, 2)
    w = model.blocks[0].attn.v_proj.weight.view(8, 8, 64)  # (heads, D, C)
    torch.testing.assert_close(two.blocks[0].attn.v_proj.weight.view(2, 8, 64), w.view(2, 4, 8, 64).mean(1))


def test_converted_model_caches_and_generates(tmp_path):
    model = mha(position="rope")
    assert main(["convert", "--model", str(_save(model, tmp_path)), "--kv-heads", "2", "--out", str(tmp_path / "g")]) == 0
    conv = attnlab.from_pretrained(tmp_path / "g")
    ids = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        full = conv(ids)
        cache = conv.new_cache(1, 12)
        steps = torch.cat([conv(ids[:, t:t + 1], cache=cache) for t in range(12)], 1)
    torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-5)
    assert cache.nbytes() * 4 == model.new_cache(1, 12).nbytes()
    assert attnlab.generate(conv, ids, 5).shape == (1, 17)


def _save(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_invalid_k_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"must divide the model's current 8 KV heads.*\[1, 2, 4, 8\]"):
        to_kv_heads(mha(), 3)
    assert main(["convert", "--model", str(_save(mha(), tmp_path)), "--kv-heads", "16", "--out", str(tmp_path / "x")]) == 2
    assert "must divide" in capsys.readouterr().err


def test_info_longest_context_matches_real_allocations():
    cfg = ModelConfig(vocab_size=50, d_model=64, n_layers=3, n_heads=8, n_kv_heads=4)
    budget = 10_000_000
    for row in sibling_rows(cfg, torch.float32, budget):
        n = row["max_context"]
        fits = KVCache(cfg.n_layers, 1, row["n_kv_heads"], cfg.head_dim, n)
        too_big = KVCache(cfg.n_layers, 1, row["n_kv_heads"], cfg.head_dim, n + 1)
        assert fits.nbytes() <= budget < too_big.nbytes()
