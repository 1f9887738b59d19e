import pytest
import torch

import attnlab
from attnlab import ModelConfig, build_model
from attnlab.inference.sampling import filter_logits, logits_to_probs


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=48)
    return build_model(cfg).eval()


def reference_greedy(model, ids, n):
    """Greedy decoding by recomputing the whole sequence at every step (no cache)."""
    for _ in range(n):
        with torch.no_grad():
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


def test_greedy_with_cache_equals_recompute(model):
    ids = torch.randint(0, 40, (3, 9))
    assert torch.equal(attnlab.generate(model, ids, 20), reference_greedy(model, ids, 20))


def test_left_padded_batch_equals_each_row_alone(model):
    a, b = torch.randint(0, 40, (1, 5)), torch.randint(0, 40, (1, 9))
    batch = torch.cat([torch.cat([torch.full((1, 4), 7), a], 1), b])
    mask = torch.ones_like(batch)
    mask[0, :4] = 0
    out = attnlab.generate(model, batch, 12, attention_mask=mask)
    assert torch.equal(out[0, 4:], attnlab.generate(model, a, 12)[0])
    assert torch.equal(out[1], attnlab.generate(model, b, 12)[0])


def test_sampling_is_reproducible_with_seed_and_varies_without(model):
    ids = torch.randint(0, 40, (2, 4))
    one = attnlab.generate(model, ids, 16, temperature=1.0, seed=3)
    assert torch.equal(one, attnlab.generate(model, ids, 16, temperature=1.0, seed=3))
    assert not torch.equal(one, attnlab.generate(model, ids, 16, temperature=1.0, seed=4))


def test_eos_stops_rows_and_pads_them(model):
    ids = torch.randint(0, 40, (2, 4))
    greedy = attnlab.generate(model, ids, 10)
    eos = int(greedy[0, 6])  # the 3rd generated token of row 0
    out = attnlab.generate(model, ids, 10, eos_token_id=eos)
    first = (out[0, 4:] == eos).nonzero()[0].item()
    assert (out[0, 4 + first:] == eos).all()


def test_stream_sees_every_token(model):
    seen = []
    out = attnlab.generate(model, torch.tensor([[1, 2, 3]]), 7, stream=lambda t: seen.append(int(t[0])))
    assert seen == out[0, 3:].tolist()


def test_top_k_and_top_p_keep_the_right_sets():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.01)).tolist() == [[True, False, False, False]]
    probs = logits_to_probs(logits, temperature=1.0, top_k=3)
    torch.testing.assert_close(probs, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)


def test_sampling_distribution_matches_probs():
    logits = torch.log(torch.tensor([0.6, 0.25, 0.1, 0.05]))[None].repeat(20000, 1)
    gen = torch.Generator().manual_seed(0)
    from attnlab.inference.sampling import sample_next

    counts = torch.bincount(sample_next(logits, temperature=1.0, generator=gen), minlength=4).float() / 20000
    assert (counts - torch.tensor([0.6, 0.25, 0.1, 0.05])).abs().max() < 0.015


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=1.5), "top_p"),
    ],
)
def test_bad_sampling_arguments(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        attnlab.generate(model, [[1, 2]], 3, **kwargs)


def test_prompt_longer_than_context(model):
    with pytest.raises(ValueError, match="longer|context is 48"):
        attnlab.generate(model, torch.zeros(1, 49, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="at most 8 new tokens"):
        attnlab.generate(model, torch.zeros(1, 40, dtype=torch.long), 20)
