"""Infini-attention: the paper's equations in float64, streaming == one call, bounded state."""

import math

import pytest
import torch
import torch.nn.functional as F

import attnlab
from attnlab import ModelConfig, build_model


def cfg(**kw):
    base = dict(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                attention_mechanism="infini", segment_len=8, memory_update="linear", attention_kernel="naive")
    base.update(kw)
    return ModelConfig(**base)


def make(**kw):
    torch.manual_seed(0)
    model = build_model(cfg(**kw)).double().eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.gate.copy_(torch.randn(4))
    return model


def test_one_segment_with_local_gate_is_causal_attention():
    inf = make(segment_len=64)
    plain = build_model(cfg(attention_mechanism="softmax", segment_len=0)).double().eval()
    state = {k: v for k, v in inf.state_dict().items() if not k.endswith("attn.gate")}
    plain.load_state_dict(state)
    with torch.no_grad():
        for block in inf.blocks:
            block.attn.gate.fill_(-60.0)  # sigmoid(-60) ~ 1e-26: all local attention
    ids = torch.randint(0, 40, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(inf(ids), plain(ids), rtol=1e-10, atol=1e-10)


def reference_layer(attn, x, rule):
    """One Infini-attention layer from the paper's equations, float64, token by token."""
    H, K, D, L = attn.n_heads, attn.n_kv_heads, attn.head_dim, attn.seg_len
    T = x.shape[0]
    q = x @ attn.q_proj.weight.T
    k = x @ attn.k_proj.weight.T
    v = x @ attn.v_proj.weight.T
    s = lambda t: F.elu(t) + 1  # noqa: E731
    M = [torch.zeros(D, D, dtype=torch.float64) for _ in range(K)]
    z = [torch.zeros(D, dtype=torch.float64) for _ in range(K)]
    theta = attn.rope.theta if attn.rope is not None else None

    def rot(vec, pos):
        if theta is None:
            return vec
        out = vec.clone()
        for j in range(D // 2):
            a = pos * theta ** (-2 * j / D)
            out[j] = vec[j] * math.cos(a) - vec[j + D // 2] * math.sin(a)
            out[j + D // 2] = vec[j + D // 2] * math.cos(a) + vec[j] * math.sin(a)
        return out

    outs = torch.zeros(T, H * D, dtype=torch.float64)
    for seg in range(0, T, L):
        for t in range(seg, min(seg + L, T)):
            for h in range(H):
                kv = h // (H // K)
                qh = q[t, h * D:(h + 1) * D]
                keys = [rot(k[j, kv * D:(kv + 1) * D], j - seg) for j in range(seg, t + 1)]
                scores = torch.stack([rot(qh, t - seg) @ kk for kk in keys]) / math.sqrt(D)
                local = torch.softmax(scores, 0) @ v[seg:t + 1, kv * D:(kv + 1) * D]
                den = s(qh) @ z[kv]
                mem = (s(qh) @ M[kv]) / max(float(den), 1e-6)
                g = torch.sigmoid(attn.gate[h])
                outs[t, h * D:(h + 1) * D] = g * mem + (1 - g) * local
        if min(seg + L, T) - seg == L:  # a complete segment is written to memory
            for kv in range(K):
                ks, vs = s(k[seg:seg + L, kv * D:(kv + 1) * D]), v[seg:seg + L, kv * D:(kv + 1) * D]
                if rule == "delta":
                    vs = vs - (ks @ M[kv]) / torch.clamp(ks @ z[kv], min=1e-6)[:, None]
                M[kv] = M[kv] + ks.T @ vs
                z[kv] = z[kv] + ks.sum(0)
    return outs @ attn.o_proj.weight.T


@pytest.mark.parametrize("rule", ["linear", "delta"])
@pytest.mark.parametrize("position", ["rope", "none"])
def test_layer_matches_float64_reference_of_the_paper(rule, position):
    model = make(memory_update=rule, position=position)
    attn = model.blocks[0].attn
    x = torch.randn(1, 21, 32, dtype=torch.float64)  # 2 full segments and a partial one
    with torch.no_grad():
        torch.testing.assert_close(attn(x)[0], reference_layer(attn, x[0], rule), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_streaming_equals_one_call(rule):
    model = make(memory_update=rule)
    ids = torch.randint(0, 40, (2, 45))
    with torch.no_grad():
        full = model(ids)
        for chunks in ([1] * 45, [5, 3, 8, 13, 16], [45]):
            cache = model.new_cache(2)
            pieces, s = [], 0
            for c in chunks:
                pieces.append(model(ids[:, s:s + c], cache=cache))
                s += c
            torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-9, atol=1e-9)


def test_state_is_bounded_and_round_trips(tmp_path):
    model = make()
    ids = torch.randint(0, 40, (1, 300))
    with torch.no_grad():
        cache = model.new_cache(1)
        sizes = set()
        for s in range(0, 200, 25):
            model(ids[:, s:s + 25], cache=cache)
            sizes.add(cache.nbytes())
        assert len(sizes) == 1  # constant, whatever was streamed
        cache.save(tmp_path / "state.safetensors")
        expected = model(ids[:, 200:], cache=cache)
        resumed = model.new_cache(1)
        resumed.load(tmp_path / "state.safetensors")
        torch.testing.assert_close(model(ids[:, 200:], cache=resumed), expected, rtol=0, atol=0)


def test_a_save_that_dies_half_way_leaves_the_previous_state(tmp_path, monkeypatch):
    """``save`` writes a temporary file and renames it: a crash mid-write (here: the writer puts half the
    bytes down, then raises) leaves the previous state file whole and loadable, and no temporary file."""
    from attnlab.inference import infini_state

    model = make()
    ids = torch.randint(0, 40, (1, 60))
    path = tmp_path / "state.safetensors"
    with torch.no_grad():
        cache = model.new_cache(1)
        model(ids[:, :20], cache=cache)
        cache.save(path)
        saved = path.read_bytes()
        expected = model(ids[:, 20:40], cache=cache)  # the stream moves on; its next save fails half-way
        real = infini_state.save_file

        def dies_half_way(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as fh:
                fh.truncate(len(saved) // 2)
            raise OSError("no space left on device")

        monkeypatch.setattr(infini_state, "save_file", dies_half_way)
        with pytest.raises(OSError, match="no space"):
            cache.save(path)
        monkeypatch.undo()
        assert path.read_bytes() == saved
        assert [p.name for p in tmp_path.iterdir()] == ["state.safetensors"]
        resumed = model.new_cache(1)
        resumed.load(path)
        assert resumed.length == 20
        torch.testing.assert_close(model(ids[:, 20:40], cache=resumed), expected, rtol=0, atol=0)


def test_crop_within_and_across_a_segment():
    model = make()
    ids = torch.randint(0, 40, (1, 30))
    junk = torch.randint(0, 40, (1, 6))
    with torch.no_grad():
        full = model(ids)
        for cut in (19, 14):  # 19: same segment as the junk's start; 14: the junk crosses a boundary
            cache = model.new_cache(1)
            model(ids[:, :cut], cache=cache)
            model(junk, cache=cache)
            cache.crop(cut)
            torch.testing.assert_close(model(ids[:, cut:], cache=cache), full[:, cut:], rtol=1e-9, atol=1e-9)


def test_generate_streams_beyond_max_seq_len():
    model = make()
    out = attnlab.generate(model, torch.randint(0, 40, (1, 100)), 20)  # max_seq_len is 64
    assert out.shape == (1, 120)


def test_truncated_backprop_cuts_the_memory_path():
    for bptt, expect_zero in ((0, False), (1, True)):
        torch.manual_seed(0)
        model = build_model(cfg(n_layers=1, infini_bptt_segments=bptt)).train()
        emb = torch.randn(1, 24, 32, requires_grad=True)
        model.blocks[0](emb)[:, 16:].sum().backward()  # the third segment's output
        first = emb.grad[:, :8].abs().sum()
        assert (first == 0) == expect_zero


def test_invalid_infini_configs():
    with pytest.raises(ValueError, match="segment_len > 0"):
        cfg(segment_len=0)
    with pytest.raises(ValueError, match="position must be 'rope'"):
        cfg(position="learned")
    model = make()
    with pytest.raises(ValueError, match="padding"):
        model(torch.zeros(2, 4, dtype=torch.long), cache=model.new_cache(2), attention_mask=torch.tensor([[0, 1, 1, 1]] * 2))
