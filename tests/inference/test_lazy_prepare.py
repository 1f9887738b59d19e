"""The fast path by default: ``attnlab.generate`` prepares an unprepared model lazily without breaking it
(still trainable, same state dict, savable, same fp32 greedy tokens), the opt-outs leave it alone, and
speculative decoding through the default call falls back to plain steps when the draft does not pay."""

from __future__ import annotations

import copy

import pytest
import torch

import attnlab
from attnlab.inference import speculative
from attnlab.inference.fast import prepare_lazily
from attnlab.layers.kernel_linear import SKINNY_MIN_WEIGHT, KernelLinear


def make(seed: int = 0, **kw) -> torch.nn.Module:
    """Linear layers of at least SKINNY_MIN_WEIGHT elements, so that decoding really takes the few-row path."""
    torch.manual_seed(seed)
    cfg = attnlab.ModelConfig(family="decoder", vocab_size=512, d_model=256, n_layers=2, n_heads=4, n_kv_heads=4,
                              d_ff=512, max_seq_len=128, init_std=0.1, attn_qkv_bias=True, **kw)
    return attnlab.build_model(cfg)


def linears(model) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


IDS = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(1))


def test_lazy_preparation_keeps_the_model_trainable_and_savable(tmp_path):
    model = make().train()
    plain = copy.deepcopy(model)
    before = {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}
    attnlab.generate(model, IDS, 4)
    assert model.lazily_prepared and set(linears(model).values()) == {KernelLinear}
    assert all(m.weight.numel() >= SKINNY_MIN_WEIGHT for m in model.modules() if isinstance(m, KernelLinear))
    after = model.state_dict()
    assert list(after) == list(before)  # same keys, same order
    for k, v in after.items():  # the very same tensors (Parameters shared, not copied), unchanged
        assert v.data_ptr() == before[k][0] and torch.equal(v, before[k][1]), k
    assert model.lm_head.weight is model.embed.weight  # the tie survives
    assert model.training and all(p.requires_grad for p in model.parameters())
    # a training step computes what the unprepared model computes, bit for bit
    for m in (model, plain):
        torch.manual_seed(0)
        m(IDS).logsumexp(-1).mean().backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad), name
    saved = model.save_pretrained(tmp_path / "m")
    again = attnlab.from_pretrained(saved)
    for k, v in again.state_dict().items():
        assert torch.equal(v, before[k][1]), k


def test_lazily_prepared_fp32_gives_the_unprepared_models_greedy_tokens():
    model = make(2).eval()
    with torch.no_grad():  # biases are initialised to zero: give them values a product could drop
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(m.out_features))
    plain = copy.deepcopy(model)
    want = attnlab.generate(plain, IDS, 40, prepare=False)
    assert set(linears(plain).values()) == {torch.nn.Linear}  # prepare=False left it alone
    got = attnlab.generate(model, IDS, 40)
    assert set(linears(model).values()) == {KernelLinear}
    assert torch.equal(got, want)
    with torch.inference_mode():  # each decode step's logits agree with PyTorch's to float rounding
        cache, ref_cache = model.new_cache(2, 47), plain.new_cache(2, 47)
        model(IDS, cache=cache), plain(IDS, cache=ref_cache)
        for i in range(7, 12):
            step = got[:, i:i + 1]
            torch.testing.assert_close(model(step, cache=cache), plain(step, cache=ref_cache), rtol=1e-5, atol=1e-5)


def test_the_opt_outs_leave_the_model_alone(monkeypatch):
    model = make(3)
    attnlab.generate(model, IDS, 2, prepare=False)
    attnlab.speculative_generate(model, "prompt_lookup", IDS, 2, prepare=False)
    assert set(linears(model).values()) == {torch.nn.Linear} and model.lazily_prepared is False
    monkeypatch.setenv("ATTNLAB_PREPARE", "0")
    attnlab.generate(model, IDS, 2)
    assert set(linears(model).values()) == {torch.nn.Linear}
    monkeypatch.delenv("ATTNLAB_PREPARE")
    draft = make(4)
    attnlab.generate(model, IDS, 2, draft=draft)  # the default call prepares target and draft
    assert set(linears(model).values()) == set(linears(draft).values()) == {KernelLinear}
    assert not prepare_lazily(model)  # once per model


def test_a_prepared_model_is_not_prepared_again():
    model = attnlab.prepare_for_decode(make(5))
    assert not prepare_lazily(model) and model.lazily_prepared is False


# ------------------------------------------------------------------ speculative decoding's fallback
def test_the_rule_prices_a_round_against_plain_steps():
    """(1 - α^(γ+1)) / ((1 - α)(1 + cγ)) >= 1 for some allowed γ."""
    one = range(1, 2)
    assert not speculation_pays(0.0, 1e-6, range(1, 9))  # nothing accepted: any draft cost loses
    assert speculation_pays(0.5, 0.49, one) and not speculation_pays(0.5, 0.51, one)  # 1.5 / (1 + c)
    assert speculation_pays(0.9, 0.05, range(4, 5))
    assert not speculation_pays(0.6, 0.4, range(4, 5)) and speculation_pays(0.6, 0.4, range(1, 5))  # γ = 1 pays


speculation_pays = speculative.speculation_pays


class NeverAgrees:
    """Proposes the last vocabulary token, which a target whose head scores only the first tokens
    (``head_vocab_size``) never chooses: α = 0 exactly."""

    def __init__(self, vocab_size: int) -> None:
        self.token = vocab_size - 1

    def start(self, prompt, attention_mask, capacity) -> None:
        self.batch = prompt.shape[0]

    def propose(self, gamma, sampling, generator, rows):
        return torch.full((self.batch, gamma), self.token, dtype=torch.long), None

    def commit(self, accepted, new_tokens) -> None:
        pass


class KnowsTheAnswer:
    """Proposes the target's own greedy continuation (known in advance) at no cost: α = 1, c ≈ 0."""

    def __init__(self, continuation: torch.Tensor) -> None:
        self.cont = continuation  # (B, N)

    def start(self, prompt, attention_mask, capacity) -> None:
        self.pos = torch.ones(prompt.shape[0], dtype=torch.long)  # the prompt's call committed the first

    def propose(self, gamma, sampling, generator, rows):
        padded = torch.cat([self.cont, self.cont.new_zeros(self.cont.shape[0], gamma)], dim=1)
        return torch.stack([padded[b, p:p + gamma] for b, p in enumerate(self.pos.tolist())]), None

    def commit(self, accepted, new_tokens) -> None:
        self.pos += accepted + 1


def test_a_draft_that_never_agrees_ends_in_plain_steps_with_the_targets_greedy_tokens():
    target = make(6, head_vocab_size=500, tie_embeddings=False).eval()
    want = attnlab.generate(target, IDS, 30)
    out, stats = attnlab.speculative_generate(target, NeverAgrees(512), IDS, 30, gamma=4, fallback=True,
                                              return_stats=True)
    assert torch.equal(out, want)
    assert stats.accepted == 0 and stats.fell_back_after == speculative.PROBE_ROUNDS
    assert stats.plain_steps == 30 - 1 - speculative.PROBE_ROUNDS  # the prompt's call made the first token
    assert attnlab.generate(target, IDS, 30, draft=NeverAgrees(512)).equal(want)  # the default call falls back
    _, kept_on = attnlab.speculative_generate(target, NeverAgrees(512), IDS, 30, gamma=4, return_stats=True)
    assert kept_on.fell_back_after is None and kept_on.plain_steps == 0  # fallback is opt-in there


def test_a_draft_that_pays_is_kept():
    target = make(7).eval()
    want = attnlab.generate(target, IDS, 30)
    out, stats = attnlab.speculative_generate(target, KnowsTheAnswer(want[:, IDS.shape[1]:]), IDS, 30, gamma=4,
                                              fallback=True, return_stats=True)
    assert torch.equal(out, want)
    assert stats.fell_back_after is None and stats.plain_steps == 0 and stats.alpha == 1.0
    assert len(stats.gammas) > speculative.PROBE_ROUNDS  # long enough for the rule to have been applied


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_after_the_fallback_rows_of_a_batch_still_end_at_eos(temperature):
    """Plain steps keep the round's bookkeeping: EOS ends a row, the others go on; same greedy tokens."""
    target = make(8, head_vocab_size=500, tie_embeddings=False).eval()
    eos = int(attnlab.generate(target, IDS, 12)[0, IDS.shape[1] + 8])  # row 0 emits it at step 9 (greedy)
    out, stats = attnlab.speculative_generate(target, NeverAgrees(512), IDS, 20, gamma=3, fallback=True,
                                              eos_token_id=eos, temperature=temperature, seed=0, return_stats=True)
    assert stats.fell_back_after == speculative.PROBE_ROUNDS and stats.plain_steps > 0
    if temperature == 0.0:
        assert torch.equal(out, attnlab.generate(target, IDS, 20, eos_token_id=eos))
    assert bool((out[:, IDS.shape[1]:] < 500).all())  # sampled from the target (its head's tokens) only
