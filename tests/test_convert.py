import pytest
import torch

import attnlab
from attnlab import ModelConfig, build_model
from attnlab.cli import main
from attnlab.commands.info import sibling_rows
from attnlab.inference.cache import KVCache
from attnlab.models.kv_heads import to_kv_heads


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


def test_info_cli_figures_match_what_new_cache_allocates(tmp_path, capsys):
    model = mha(position="rope")  # 8 query / 8 KV heads, context 64
    budget = 5000  # bytes: every K's longest context stays inside the model's 64 positions
    assert main(["info", "--model", str(_save(model, tmp_path)), "--memory", str(budget)]) == 0
    table = {}
    for line in capsys.readouterr().out.splitlines():
        parts = line.split()
        if parts and parts[0].isdigit() and parts[1] in ("MHA", "GQA", "MQA"):
            table[int(parts[0])] = (int(parts[2].replace(",", "")), int(parts[5].replace(",", "")))
    assert sorted(table) == [1, 2, 4, 8]
    for k, (per_token, longest) in table.items():
        conv = to_kv_heads(model, k)  # the model `attnlab convert --kv-heads k` would write
        assert conv.new_cache(1, 1).nbytes() == per_token
        assert conv.new_cache(1, longest).nbytes() <= budget < conv.new_cache(1, longest + 1).nbytes()


def test_uptraining_a_converted_model_keeps_its_tokenizer(tmp_path, monkeypatch):
    import sysconfig
    from pathlib import Path

    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path / "cache"))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    data = tmp_path / "data"
    data.mkdir()
    for f in sorted(stdlib.glob("*.py"))[:12]:
        (data / f.name).write_text(f.read_text(encoding="utf-8", errors="replace"))
    common = ["--quiet", "--data", str(data), "--seq-len", "32", "--batch-size", "4", "--steps", "2"]
    base, conv, up = tmp_path / "base", tmp_path / "conv", tmp_path / "up"
    assert main(["train", "--preset", "tiny", "--vocab-size", "300", *common, "--out", str(base)]) == 0
    assert main(["convert", "--model", str(base), "--kv-heads", "1", "--out", str(conv)]) == 0
    # a different --vocab-size must not train a new tokenizer: --init brings the model's own
    assert main(["train", "--init", str(conv), "--vocab-size", "280", *common, "--out", str(up)]) == 0
    assert (up / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text()
    model = attnlab.from_pretrained(up)
    assert model.config.n_kv_heads == 1 and model.config.vocab_size == 300
    tok = attnlab.load_tokenizer(up)
    ids = torch.tensor([tok.encode("def f(x):\n    return")])
    assert attnlab.generate(model, ids, 4).shape == (1, ids.shape[1] + 4)
