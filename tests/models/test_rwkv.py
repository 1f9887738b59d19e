"""RWKV-4: Hugging Face parity (logits, greedy, state passing), chunked == recurrent, a float64 reference of
the WKV definition on long sequences, gradients to every parameter, and the cache protocol."""

import pytest
import torch

import attnlab
from attnlab.models.rwkv.wkv4 import wkv_chunked, wkv_step

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.RwkvConfig(vocab_size=120, hidden_size=48, num_hidden_layers=3, intermediate_size=96,
                                  context_length=256)
    hf = transformers.RwkvForCausalLM(cfg).eval()
    with torch.no_grad():  # HF's init leaves some time parameters flat: spread them so the test sees them
        for block in hf.rwkv.blocks:
            block.attention.time_decay.normal_(0, 1)
            block.attention.time_first.normal_(0, 1)
    d = tmp_path_factory.mktemp("hf_rwkv")
    hf.save_pretrained(d)
    return hf, attnlab.from_pretrained(d)


def test_logits_match_hf(pair):
    hf, ours = pair
    ids = torch.randint(0, 120, (2, 75), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_greedy_generation_matches_hf(pair):
    hf, ours = pair
    ids = torch.randint(0, 120, (1, 12), generator=torch.Generator().manual_seed(2))
    want = hf.generate(ids, max_new_tokens=30, min_new_tokens=30, do_sample=False)
    assert torch.equal(attnlab.generate(ours, ids, 30), want)


def test_hf_state_passing_matches_our_state(pair):
    hf, ours = pair
    ids = torch.randint(0, 120, (2, 50), generator=torch.Generator().manual_seed(3))
    state = ours.new_cache(2)
    with torch.no_grad():
        first = hf(ids[:, :30], use_cache=True)
        second = hf(ids[:, 30:], state=first.state, use_cache=True)
        torch.testing.assert_close(ours(ids[:, :30], cache=state), first.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(ids[:, 30:], cache=state), second.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("splits", [[1] * 20, [7, 1, 1, 11], [20], [3, 17]])
def test_chunks_and_steps_equal_one_parallel_pass(pair, splits):
    _, ours = pair
    ids = torch.randint(0, 120, (2, sum(splits) + 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = ours(ids)
        state, pos = ours.new_cache(2), 40
        outs = [ours(ids[:, :40], cache=state)]
        for n in splits:
            outs.append(ours(ids[:, pos:pos + n], cache=state))
            pos += n
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-5, atol=1e-5)


def _wkv_reference(w, u, k, v):
    """The WKV definition in float64, with no log-space tricks (fine for the magnitudes used here)."""
    B, T, C = k.shape
    out = torch.zeros(B, T, C, dtype=torch.float64)
    for t in range(T):
        i = torch.arange(t)
        weights = torch.exp(-(t - 1 - i)[:, None] * torch.exp(w) + k[:, :t])  # (B, t, C)
        bonus = torch.exp(u + k[:, t])
        out[:, t] = ((weights * v[:, :t]).sum(1) + bonus * v[:, t]) / (weights.sum(1) + bonus)
    return out


def test_wkv_matches_the_float64_definition_and_survives_long_sequences():
    g = torch.Generator().manual_seed(5)
    B, T, C = 2, 300, 8
    decay = torch.randn(C, generator=g, dtype=torch.float64)
    u = torch.randn(C, generator=g, dtype=torch.float64)
    k = torch.randn(B, T, C, generator=g, dtype=torch.float64) * 3
    v = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    want = _wkv_reference(decay, u, k, v)
    got, _ = wkv_chunked(-torch.exp(decay.float()), u.float(), k.float(), v.float(), None)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    # keys of magnitude 60 over 4,096 steps: e^k overflows float32 directly, the log-space sums do not
    k_big = torch.randn(1, 4096, C, generator=g) * 60
    v_big = torch.randn(1, 4096, C, generator=g)
    out, st = wkv_chunked(-torch.exp(decay.float()), u.float(), k_big, v_big, None)
    assert torch.isfinite(out).all() and all(torch.isfinite(x).all() for x in st.values())
    state = {"num": torch.zeros(1, C), "den": torch.zeros(1, C), "p": torch.full((1, C), -1e38)}
    for t in range(4096):
        y, state = wkv_step(-torch.exp(decay.float()), u.float(), k_big[:, t], v_big[:, t], state)
    torch.testing.assert_close(y, out[:, -1], rtol=1e-4, atol=1e-4)


def test_bf16_model_stays_close_to_fp32(pair):
    _, ours = pair
    ids = torch.randint(0, 120, (1, 64), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = ours(ids)
        low = __import__("copy").deepcopy(ours).to(torch.bfloat16)(ids).float()
    assert float((low - ref).norm() / ref.norm()) < 0.05


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = attnlab.build_model(attnlab.ModelConfig(family="rwkv", vocab_size=64, d_model=32, n_layers=2,
                                                    n_heads=1, d_ff=64, norm="layer", position="none"))
    ids = torch.randint(0, 64, (2, 40))
    torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or float(p.grad.abs().sum()) == 0]
    assert not dead


def test_state_is_constant_size_and_rolls_back(pair):
    _, ours = pair
    ids = torch.randint(0, 120, (1, 60), generator=torch.Generator().manual_seed(7))
    state = ours.new_cache(1)
    with torch.no_grad():
        ours(ids[:, :40], cache=state)
        size = state.nbytes()
        after = [ours(ids[:, 40 + i:41 + i], cache=state) for i in range(6)]
        assert state.nbytes() == size and state.length == 46
        state.crop(42)
        again = ours(ids[:, 42:43], cache=state)
    torch.testing.assert_close(again, after[2])
    with pytest.raises(ValueError, match="snapshots"):
        state.crop(10)  # inside the prompt, fed as one chunk


def test_rwkv_draft_for_a_transformer_target_is_exact():
    torch.manual_seed(0)
    target = attnlab.build_model(attnlab.ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, init_std=0.2))
    draft = attnlab.build_model(attnlab.ModelConfig(family="rwkv", vocab_size=64, d_model=16, n_layers=1, n_heads=1,
                                                    norm="layer", position="none"))
    ids = torch.randint(0, 64, (1, 8))
    want = attnlab.generate(target, ids, 40)
    for gamma in (1, 3, 5):
        assert torch.equal(attnlab.generate(target, ids, 40, draft=draft, gamma=gamma), want)
    assert torch.equal(attnlab.generate(draft, ids, 20, draft=draft), attnlab.generate(draft, ids, 20))


def test_the_rwkv4_class_refuses_another_version():
    from attnlab.models.rwkv import RWKVLM

    cfg = attnlab.ModelConfig(family="rwkv", rwkv_version=7, vocab_size=64, d_model=32, n_layers=1, n_heads=1,
                              norm="layer", position="none")
    with pytest.raises(ValueError, match="RWKVLM is RWKV-4.*rwkv_version=7.*build_model"):
        RWKVLM(cfg)


def test_info_reports_a_constant_state(pair, tmp_path, capsys):
    from attnlab import cli

    _, ours = pair
    ours.save_pretrained(tmp_path / "m")
    assert cli.main(["info", "--model", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert f"{ours.new_cache(1).nbytes():,} bytes per sequence" in out and "KV bytes/token" not in out


def test_attnlab_train_trains_an_rwkv_model(tmp_path):
    from attnlab import cli

    out = tmp_path / "rwkv"
    assert cli.main(["train", "--preset", "tiny", "--set", "family=rwkv", "--set", "norm=layer", "--set",
                     "position=none", "--set", "n_heads=1", "--set", "n_kv_heads=1", "--steps", "3",
                     "--max-files", "80", "--out", str(out), "--quiet"]) == 0
    model = attnlab.from_pretrained(out)
    assert model.config.family == "rwkv"
    assert attnlab.generate(model, torch.tensor([[1, 2, 3]]), 5).shape == (1, 8)
