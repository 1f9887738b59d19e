"""BatchNorm vs LayerNorm on variable-length (padded) batches: the field guide's claim as tests."""

import pytest
import torch

from attnlab import ModelConfig, build_model
from attnlab.layers.norm import LayerNorm, RMSNorm, SequenceBatchNorm


def padded(x, extra):
    """Append ``extra`` padding positions (garbage values) to a (B, T, C) batch; return it and its mask."""
    B, T, C = x.shape
    junk = torch.randn(B, extra, C) * 5 + 3
    mask = torch.cat([torch.ones(B, T, dtype=torch.bool), torch.zeros(B, extra, dtype=torch.bool)], 1)
    return torch.cat([x, junk], 1), mask


def test_masked_batchnorm_ignores_padding():
    torch.manual_seed(0)
    bn = SequenceBatchNorm(16, masked=True).train()
    x = torch.randn(3, 7, 16)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 5:] = False  # a shorter sequence in the batch
    ref = bn(x, mask)
    for extra in (1, 4, 20):
        xp, mp = padded(x, extra)
        mp[:, :7] = mask
        out = SequenceBatchNorm(16, masked=True).train()(xp, mp)
        torch.testing.assert_close(out[:, :7][mask], ref[mask], rtol=1e-5, atol=1e-5)


def test_naive_batchnorm_is_changed_by_padding():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 16)
    ref = SequenceBatchNorm(16, masked=False).train()(x, None)
    xp, mp = padded(x, 10)
    out = SequenceBatchNorm(16, masked=False).train()(xp, mp)
    assert (out[:, :7] - ref).abs().max() > 0.1  # the padding moved the statistics of real tokens


def test_layer_and_rms_norm_are_per_token():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    xp, mp = padded(x, 6)
    for norm in (LayerNorm(8), RMSNorm(8)):
        torch.testing.assert_close(norm(xp, mp)[:, :5], norm(x))


def test_running_statistics_are_masked_and_used_in_eval():
    torch.manual_seed(0)
    bn = SequenceBatchNorm(4, masked=True, momentum=1.0).train()
    x = torch.randn(2, 6, 4)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    bn(x, mask)
    real = x[mask]  # (N, C)
    torch.testing.assert_close(bn.running_mean, real.mean(0))
    torch.testing.assert_close(bn.running_var, real.var(0, unbiased=True))
    bn.eval()
    torch.testing.assert_close(bn(x), (x - real.mean(0)) / torch.sqrt(real.var(0) + 1e-5))


def test_encoder_with_masked_batchnorm_is_padding_invariant_end_to_end():
    torch.manual_seed(0)
    cfg = ModelConfig(family="encoder", vocab_size=30, d_model=32, n_layers=2, n_heads=4, norm="batch",
                      norm_position="post", position="learned", mlm_head=False, max_seq_len=32)
    model = build_model(cfg).train()
    ids = torch.randint(0, 30, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    ref = model(ids, attention_mask=mask)
    more = torch.cat([ids, torch.randint(0, 30, (2, 5))], 1)
    more_mask = torch.cat([mask, torch.zeros(2, 5, dtype=torch.long)], 1)
    out = model(more, attention_mask=more_mask)
    m = mask.bool()
    torch.testing.assert_close(out[:, :9][m], ref[m], rtol=1e-5, atol=1e-5)
    naive = build_model(cfg.replace(norm="batch_naive")).train()
    naive.load_state_dict(model.state_dict())
    assert (naive(more, attention_mask=more_mask)[:, :9][m] - naive(ids, attention_mask=mask)[m]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["encoder", "seq2seq"])
@pytest.mark.parametrize("norm", ["layer", "rms", "batch"])
@pytest.mark.parametrize("place", ["pre", "post", "sandwich"])
def test_forward_backward_every_norm_and_placement(family, norm, place):
    cfg = ModelConfig(family=family, vocab_size=30, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, norm=norm,
                      norm_position=place, position="learned", max_seq_len=32,
                      **({"decoder_start_token_id": 0} if family == "seq2seq" else {}))  # an encoder has no decoder
    model = build_model(cfg).train()
    ids = torch.randint(0, 30, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    if family == "encoder":
        out = model(ids, attention_mask=mask)
    else:
        out = model(ids[:, :5], encoder_input_ids=ids, encoder_attention_mask=mask)
    out.float().pow(2).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
