import pytest
import torch

from attnlab import ModelConfig, build_model


@pytest.mark.parametrize("n_heads", [4, 8, 12])
def test_kv_bytes_ratio_equals_heads_ratio_exactly(n_heads):
    sizes = {}
    for kv in [d for d in range(1, n_heads + 1) if n_heads % d == 0]:
        cfg = ModelConfig(vocab_size=50, d_model=16 * n_heads, n_heads=n_heads, n_kv_heads=kv, n_layers=3)
        model = build_model(cfg)
        cache = model.new_cache(2, 33)
        model(torch.randint(0, 50, (2, 7)), cache=cache)  # using it allocates nothing more
        sizes[kv] = cache.nbytes()
        assert sizes[kv] == 2 * 3 * 2 * kv * cfg.head_dim * 33 * 4  # K and V, layers, batch, heads, dims, fp32
    mha = sizes[n_heads]
    for kv, size in sizes.items():
        assert mha * kv == size * n_heads  # MHA:GQA:MQA = n_heads / n_kv_heads, exactly


def test_crop_rolls_back_and_reuses_slots():
    cfg = ModelConfig(vocab_size=50, d_model=32, n_heads=4, n_kv_heads=2, max_seq_len=64, attention_kernel="naive")
    model = build_model(cfg).double().eval()
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        cache = model.new_cache(2, 20)
        model(ids[:, :8], cache=cache)
        model(torch.randint(0, 50, (2, 3)), cache=cache)  # tokens that get rejected
        cache.crop(8)
        assert cache.length == 8
        out = model(ids[:, 8:], cache=cache)
        torch.testing.assert_close(out, model(ids)[:, 8:], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="cannot crop"):
        cache.crop(13)


def test_cache_overflow_and_batch_mismatch_are_clear():
    cfg = ModelConfig(vocab_size=50, d_model=32, n_heads=4, max_seq_len=64)
    model = build_model(cfg)
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="do not fit"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="batch"):
        model(torch.zeros(2, 2, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        model.new_cache(1, 65)


def test_padding_mask_allocated_only_when_needed():
    cfg = ModelConfig(vocab_size=50, d_model=32, n_heads=4, max_seq_len=64)
    model = build_model(cfg)
    cache = model.new_cache(2, 10)
    model(torch.zeros(2, 3, dtype=torch.long), cache=cache, attention_mask=torch.ones(2, 3))
    assert cache.key_mask is None
    plain = cache.nbytes()
    cache2 = model.new_cache(2, 10)
    model(torch.zeros(2, 3, dtype=torch.long), cache=cache2, attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]))
    assert cache2.nbytes() == plain + 2 * 10  # one bool per slot
