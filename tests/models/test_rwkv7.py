"""RWKV-7: one time-mixing layer against a float64 step-by-step reference written from the paper's equations,
chunked == recurrent (whole model, mixed chunk sizes through the cache), the kernel at extreme decays,
gradients to every parameter, the constant-size state and its rollback, greedy and speculative generation,
bf16 and long sequences, the config, and the CLI (info, train)."""

import copy
import json
import math

import pytest
import torch

import attnlab
from attnlab.models.rwkv import RWKV7LM
from attnlab.models.rwkv.wkv7 import wkv7_chunked, wkv7_step


def make_model(seed: int = 0, **overrides) -> RWKV7LM:
    """A tiny RWKV-7 whose weights are spread out (keys, values, gates and low-rank MLPs well away from their
    small init), so that every part — the state above all — moves the logits."""
    fields = dict(family="rwkv", rwkv_version=7, vocab_size=80, d_model=32, n_layers=3, n_heads=4, d_ff=64,
                  norm="layer", position="none")
    fields.update(overrides)
    torch.manual_seed(seed)
    model = attnlab.build_model(attnlab.ModelConfig(**fields)).eval()
    C = model.config.d_model
    with torch.no_grad():
        model.embed.weight.normal_(0, 0.3)  # tied to the head: logits of order 1-10
        for block in model.blocks:
            att = block.attention
            for lin in (att.receptance, att.key, att.value, att.output):
                lin.weight.normal_(0, 1 / math.sqrt(C))
            for name, p in att.named_parameters():
                if name[0] in "wavg" and name[1] == "2":  # the up-projections of the low-rank MLPs
                    p.normal_(0, 0.5 / math.sqrt(p.shape[0]))
            att.k_k.normal_(1.0, 0.3)
            att.k_a.normal_(1.0, 0.3)
            att.r_k.normal_(0, 0.5)
            att.ln_x.weight.normal_(1.0, 0.2)
            att.ln_x.bias.normal_(0, 0.1)
            block.feed_forward.value.weight.normal_(0, 1 / math.sqrt(model.config.d_ff))
    return model


@pytest.fixture(scope="module")
def model():
    return make_model()


def ids_for(seed: int, B: int, T: int, vocab: int = 80) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the paper's equations, float64, one token at a time
def reference_time_mix(att, x: torch.Tensor, v_first: torch.Tensor | None):
    """RWKV-7 time mixing (arXiv 2503.14456, section 4) in float64 with row vectors as in the paper:

        x^□ = lerp(x_t, x_{t-1}, μ_□);  d = w0 + tanh(x^w W1) W2;  w = exp(-e^{-1/2} σ(d))
        a = σ(a0 + x^a A1 A2);  g = σ(x^g G1) G2;  v ← lerp(v, v_first, σ(v0 + x^v V1 V2)) (layers > 0)
        κ̂ = normalise(k ⊙ ξ) per head;  k̃ = k ⊙ lerp(1, a, α)
        wkv_t = wkv_{t-1} (diag(w_t) - κ̂_tᵀ (a_t ⊙ κ̂_t)) + v_tᵀ k̃_t;   y = wkv_t r_tᵀ (per head)
        out = W_o ((GroupNorm(y) + (r ⊙ ρ ⊙ k̃).sum per head · v) ⊙ g)

    x (B, T, C) -> outputs (B, T, C), this layer's values (B, T, C), the state (B, H, N, N)."""
    P = {n: p.detach().double() for n, p in att.named_parameters()}
    B, T, C = x.shape
    H = att.n_heads
    N = C // H
    eps = 1e-5 * N  # the GroupNorm's epsilon grows with the head size (64e-5 at N = 64, as in the reference)
    wkv = torch.zeros(B, H, N, N, dtype=torch.float64)
    prev = torch.zeros(B, C, dtype=torch.float64)
    outs, values = [], []
    for t in range(T):
        xt = x[:, t]
        xr, xw, xk, xv, xa, xg = (xt + (prev - xt) * P[f"x_{c}"].reshape(C) for c in "rwkvag")
        r = xr @ P["receptance.weight"].T
        k = xk @ P["key.weight"].T
        v = xv @ P["value.weight"].T
        w = torch.exp(-math.exp(-0.5) * torch.sigmoid(P["w0"].reshape(C) + torch.tanh(xw @ P["w1"]) @ P["w2"]))
        if v_first is not None:
            nu = torch.sigmoid(P["v0"].reshape(C) + xv @ P["v1"] @ P["v2"])
            v = v + (v_first[:, t] - v) * nu
        a = torch.sigmoid(P["a0"].reshape(C) + xa @ P["a1"] @ P["a2"])
        g = torch.sigmoid(xg @ P["g1"]) @ P["g2"]
        kappa = k * P["k_k"].reshape(C)
        k_tilde = k * (1 + (a - 1) * P["k_a"].reshape(C))
        y = torch.zeros(B, C, dtype=torch.float64)
        for b in range(B):
            for h in range(H):
                s = slice(h * N, (h + 1) * N)
                kh = kappa[b, s] / kappa[b, s].norm()
                transition = torch.diag(w[b, s]) - torch.outer(kh, a[b, s] * kh)
                wkv[b, h] = wkv[b, h] @ transition + torch.outer(v[b, s], k_tilde[b, s])
                yh = wkv[b, h] @ r[b, s]
                yh = (yh - yh.mean()) / torch.sqrt(yh.var(unbiased=False) + eps)
                yh = yh * P["ln_x.weight"][s] + P["ln_x.bias"][s]
                y[b, s] = yh + (r[b, s] * P["r_k"][h] * k_tilde[b, s]).sum() * v[b, s]
        outs.append((y * g) @ P["output.weight"].T)
        values.append(v)
        prev = xt
    return torch.stack(outs, 1), torch.stack(values, 1), wkv


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("mode", ["step", "chunked"])
def test_time_mixing_matches_the_float64_paper_reference(model, layer, mode):
    att = model.blocks[layer].attention
    B, T, C = 2, 12, model.config.d_model
    g = torch.Generator().manual_seed(10 + layer)
    x = torch.randn(B, T, C, generator=g)
    v_first = torch.randn(B, T, C, generator=g) if layer > 0 else None
    want, want_v, want_S = reference_time_mix(att, x.double(), None if v_first is None else v_first.double())
    state = {"att_x": torch.zeros(B, C), "S": torch.zeros(B, att.n_heads, att.head_size, att.head_size)}
    with torch.no_grad():
        if mode == "step":
            pieces = [att(x[:, t:t + 1], None if v_first is None else v_first[:, t:t + 1], state) for t in range(T)]
            got, got_v = torch.cat([p[0] for p in pieces], 1), torch.cat([p[1] for p in pieces], 1)
        else:
            got, got_v = att(x, v_first, state)
    assert float(want.abs().max()) > 0.1  # the outputs are not vanishingly small
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state["S"].double(), want_S, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state["att_x"], x[:, -1])
    if layer == 0:  # the first layer hands its values on for the value residual
        torch.testing.assert_close(got_v.double(), want_v, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- chunked == recurrent
@pytest.mark.parametrize("splits", [[1] * 24, [1, 3, 17, 40, 1, 3], [40, 17, 3, 1], [64]])
def test_chunks_and_steps_through_the_cache_equal_one_parallel_pass(model, splits):
    ids = ids_for(1, 2, sum(splits))
    with torch.no_grad():
        full = model(ids)
        state, pos, outs = model.new_cache(2), 0, []
        for n in splits:
            outs.append(model(ids[:, pos:pos + n], cache=state))
            pos += n
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-5, atol=1e-5)
    assert state.length == ids.shape[1]
    if len(splits) > 1:  # the carried state matters: without it the second piece comes out different
        with torch.no_grad():
            fresh = model(ids[:, splits[0]:splits[0] + splits[1]], cache=model.new_cache(2))
        assert float((fresh - full[:, splits[0]:splits[0] + splits[1]]).abs().max()) > 1e-2


@pytest.mark.parametrize("decay", ["fastest", "slowest", "mixed"])
def test_the_chunked_kernel_equals_the_step_at_extreme_decays(decay):
    g = torch.Generator().manual_seed(2)
    B, T, H, N = 2, 150, 2, 8
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    lo = -math.exp(-0.5)  # the strongest decay the model can produce
    logw = {"fastest": torch.full((B, T, H, N), lo), "slowest": torch.full((B, T, H, N), -1e-6),
            "mixed": lo * torch.rand(B, T, H, N, generator=g)}[decay]
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
    a = torch.rand(B, T, H, N, generator=g)
    S = torch.randn(B, H, N, N, generator=g)  # start from a non-empty state
    out, S_end = wkv7_chunked(r, logw, k, v, -kk, kk * a, S.clone())
    steps = []
    for t in range(T):
        o, S = wkv7_step(r[:, t], logw[:, t], k[:, t], v[:, t], -kk[:, t], kk[:, t] * a[:, t], S)
        steps.append(o)
    scale = float(out.abs().max())
    torch.testing.assert_close(out, torch.stack(steps, 1), rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(S_end, S, rtol=1e-5, atol=1e-5 * float(S.abs().max()))


# ---------------------------------------------------------------- training
def test_gradients_reach_every_parameter():
    model = make_model(n_layers=2).train()
    ids = ids_for(3, 2, 40)
    torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or float(p.grad.abs().sum()) == 0]
    assert not dead
    fresh = attnlab.build_model(model.config)  # the shipped init, too: no zero-initialised dead ends
    torch.nn.functional.cross_entropy(fresh(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
    assert not [n for n, p in fresh.named_parameters() if p.grad is None or float(p.grad.abs().sum()) == 0]


def test_layer_zero_has_no_value_residual_parameters(model):
    names = {n for n, _ in model.named_parameters()}
    assert {"blocks.1.attention.v0", "blocks.1.attention.v1", "blocks.1.attention.v2"} <= names
    assert not names & {"blocks.0.attention.v0", "blocks.0.attention.v1", "blocks.0.attention.v2"}


# ---------------------------------------------------------------- the state
def test_state_is_constant_size_and_rolls_back(model):
    cfg = model.config
    H, N = cfg.n_heads, cfg.head_dim
    state = model.new_cache(1)
    size = state.nbytes()
    assert size == cfg.n_layers * 4 * (2 * cfg.d_model + H * N * N)  # two shift vectors and S per layer, fp32
    ids = ids_for(4, 1, 120)
    with torch.no_grad():
        model(ids[:, :100], cache=state)  # a prompt, through the chunked form
        assert state.nbytes() == size
        after = [model(ids[:, 100 + i:101 + i], cache=state) for i in range(8)]
        assert state.nbytes() == size and state.length == 108
        state.crop(102)
        again = [model(ids[:, 102 + i:103 + i], cache=state) for i in range(6)]
    for x, y in zip(again, after[2:]):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="snapshots"):
        state.crop(50)  # inside the prompt, fed as one chunk


def test_info_reports_the_v7_state(tmp_path, capsys):
    from attnlab import cli

    cfg = make_model().config
    cfg.to_json(tmp_path / "v7.json")
    assert cli.main(["info", "--config", str(tmp_path / "v7.json")]) == 0
    out = capsys.readouterr().out
    assert "RWKV-7" in out and f"{make_model().new_cache(1).nbytes():,} bytes per sequence" in out


# ---------------------------------------------------------------- generation
def test_greedy_with_the_state_equals_greedy_by_recomputation(model):
    ids = ids_for(5, 1, 7)
    want = ids
    with torch.no_grad():
        for _ in range(25):
            want = torch.cat([want, model(want)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(attnlab.generate(model, ids, 25), want)


def test_speculative_decoding_with_rwkv7_is_exact(model):
    draft = make_model(seed=1, n_layers=1, d_model=16, n_heads=2, d_ff=32)
    ids = ids_for(6, 1, 6)
    want = attnlab.generate(model, ids, 30)
    for gamma in (1, 4):
        assert torch.equal(attnlab.generate(model, ids, 30, draft=draft, gamma=gamma), want)
    assert torch.equal(attnlab.generate(model, ids, 30, draft=model), want)
    torch.manual_seed(0)  # and as the draft of a Transformer
    target = attnlab.build_model(attnlab.ModelConfig(vocab_size=80, d_model=32, n_layers=2, n_heads=4, init_std=0.2))
    assert torch.equal(attnlab.generate(target, ids, 30, draft=draft, gamma=3), attnlab.generate(target, ids, 30))


# ---------------------------------------------------------------- precision and length
def test_bf16_stays_close_to_fp32(model):
    ids = ids_for(7, 2, 96)
    with torch.no_grad():
        ref = model(ids)
        low = copy.deepcopy(model).to(torch.bfloat16)(ids)
    assert low.dtype == torch.bfloat16
    assert float((low.float() - ref).norm() / ref.norm()) < 0.03
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # how `attnlab train --bf16` runs it
        auto = model(ids)
    assert float((auto.float() - ref).norm() / ref.norm()) < 0.03


def test_a_long_sequence_stays_finite_and_consistent():
    model = make_model(n_layers=2, d_model=16, n_heads=2, d_ff=32)
    with torch.no_grad():
        for block in model.blocks:  # the slowest decay the init gives: the state accumulates the most
            block.attention.w0.fill_(-8.0)
    ids = ids_for(8, 1, 2049)
    with torch.no_grad():
        full = model(ids)
        state = model.new_cache(1)
        model(ids[:, :2048], cache=state)
        last = model(ids[:, 2048:], cache=state)
        low = copy.deepcopy(model).to(torch.bfloat16)(ids[:, :2048])
    assert torch.isfinite(full).all() and torch.isfinite(low).all()
    assert all(torch.isfinite(x).all() for x in state.t.values())
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- config and CLI
def test_config_builds_v7_and_rejects_bad_versions_and_head_splits():
    cfg = attnlab.ModelConfig(family="rwkv", rwkv_version=7, vocab_size=64, d_model=32, n_layers=1,
                              norm="layer", position="none")  # the default 4 heads of 8
    assert isinstance(attnlab.build_model(cfg), RWKV7LM)
    assert type(attnlab.build_model(cfg.replace(rwkv_version=4))).__name__ == "RWKVLM"
    with pytest.raises(ValueError, match="rwkv_version=5 is not valid; choose one of: 4, 7"):
        cfg.replace(rwkv_version=5)
    with pytest.raises(ValueError, match="n_heads=2 x head_dim=8 must equal d_model=32"):
        attnlab.build_model(cfg.replace(n_heads=2, n_kv_heads=2, head_dim=8))
    with pytest.raises(ValueError, match="would be ignored: RWKV-4 mixes every channel"):  # v4 has no heads
        cfg.replace(n_heads=2, n_kv_heads=2, rwkv_version=4)


def test_attnlab_train_trains_an_rwkv7_model_from_a_config_file(tmp_path):
    from attnlab import cli

    settings = {"family": "rwkv", "rwkv_version": 7, "d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2,
                "d_ff": 64, "norm": "layer", "position": "none", "steps": 3, "batch_size": 4, "seq_len": 64,
                "vocab_size": 512, "eval_every": 3, "save_every": 3}
    (tmp_path / "rwkv7.json").write_text(json.dumps(settings))
    out = tmp_path / "run"
    assert cli.main(["train", "--config", str(tmp_path / "rwkv7.json"), "--max-files", "80", "--out", str(out),
                     "--quiet"]) == 0
    model = attnlab.from_pretrained(out)
    assert isinstance(model, RWKV7LM) and model.config.rwkv_version == 7
    assert attnlab.generate(model, torch.tensor([[1, 2, 3]]), 5).shape == (1, 8)
