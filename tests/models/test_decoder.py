"""The decoder LM: cached decode == full forward over the whole switch matrix, and an independent
float64 reference written from the formulas (not from our modules)."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from attnlab import ModelConfig, build_model

NORMS, PLACES, FFNS, POSITIONS, KV = ("layer", "rms", "batch"), ("pre", "post", "sandwich"), \
    ("relu", "gelu", "gelu_tanh", "silu", "swiglu"), ("learned", "sinusoidal", "rope", "none"), (4, 2, 1)
MATRIX = list(itertools.product(NORMS, PLACES, FFNS, POSITIONS, KV))


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=40, attention_kernel="naive")
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("norm, place, ffn, position, kv", MATRIX)
def test_cached_decode_equals_full_forward_and_backward_runs(norm, place, ffn, position, kv):
    cfg = tiny(norm=norm, norm_position=place, ffn=ffn, position=position, n_kv_heads=kv)
    model = build_model(cfg).double().eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 13))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 20)
        parts = [model(ids[:, :5], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(5, 9)]
        parts.append(model(ids[:, 9:], cache=cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-10)
    assert cache.length == 13

    model.train()
    loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["blocks.0.attn.q_proj.weight"].abs().sum() > 0


@pytest.mark.parametrize("kernel", ["naive", "sdpa"])
def test_kernels_agree_on_whole_model(kernel):
    cfg = tiny(n_kv_heads=2)
    ref = build_model(cfg).eval()
    other = build_model(cfg.replace(attention_kernel=kernel)).eval()
    other.load_state_dict(ref.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (3, 17))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    torch.testing.assert_close(other(ids, attention_mask=mask), ref(ids, attention_mask=mask), rtol=1e-5, atol=1e-5)


def test_left_padding_matches_unpadded_rows():
    cfg = tiny(n_kv_heads=2, attention_kernel="sdpa")
    model = build_model(cfg).eval()
    short = torch.randint(0, cfg.vocab_size, (1, 6))
    long = torch.randint(0, cfg.vocab_size, (1, 10))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :4] = 0
    with torch.no_grad():
        out = model(batch, attention_mask=mask)
        torch.testing.assert_close(out[0, 4:], model(short)[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1], model(long)[0], rtol=1e-5, atol=1e-5)
        # and through the cache, one token at a time after the padded prefill
        cache = model.new_cache(2, 14)
        model(batch, cache=cache, attention_mask=mask)
        nxt = torch.randint(0, cfg.vocab_size, (2, 1))
        step = model(nxt, cache=cache)[:, -1]
        torch.testing.assert_close(step[0], model(torch.cat([short, nxt[:1]], 1))[0, -1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(step[1], model(torch.cat([long, nxt[1:]], 1))[0, -1], rtol=1e-5, atol=1e-5)


def test_prompt_longer_than_context_is_a_clear_error():
    model = build_model(tiny())
    with pytest.raises(ValueError, match="longer than the model's context"):
        model(torch.zeros(1, 41, dtype=torch.long))


# ----------------------------------------------------------------------------- float64 reference
def ref_norm(x, w, b, kind, eps, running=None):
    if kind == "batch":  # evaluation mode: the running statistics
        mean, var = running
        return (x - mean) / torch.sqrt(var + eps) * w + b
    if kind == "layer":
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * w + b
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def ref_forward(sd, cfg, ids):
    """The decoder written straight from the formulas, in float64, with explicit loops over heads."""
    sd = {k: v.double() for k, v in sd.items()}
    T = ids.shape[1]
    H, K, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    x = sd["embed.weight"][ids[0]]  # (T, C)
    pos = torch.arange(T, dtype=torch.float64)
    if cfg.position == "learned":
        x = x + sd["pos_embed.weight"][:T]
    elif cfg.position == "sinusoidal":
        half = cfg.d_model // 2
        freq = torch.tensor([math.exp(-math.log(10000.0) * i / half) for i in range(half)], dtype=torch.float64)
        x = x + torch.cat([torch.sin(pos[:, None] * freq), torch.cos(pos[:, None] * freq)], -1)

    def rope(v):  # (T, D): rotate pairs (j, j + D/2) by angle pos * theta^(-2j/D)
        out = v.clone()
        for j in range(D // 2):
            ang = pos * cfg.rope_theta ** (-2 * j / D)
            a, b = v[:, j], v[:, j + D // 2]
            out[:, j] = a * torch.cos(ang) - b * torch.sin(ang)
            out[:, j + D // 2] = b * torch.cos(ang) + a * torch.sin(ang)
        return out

    def lin(name, v):
        y = v @ sd[name + ".weight"].T
        return y + sd[name + ".bias"] if name + ".bias" in sd else y

    def norm(name, v):
        running = (sd.get(name + ".running_mean"), sd.get(name + ".running_var"))
        return ref_norm(v, sd[name + ".weight"], sd.get(name + ".bias", 0.0), cfg.norm, cfg.norm_eps, running)

    act = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"), "silu": F.silu}
    for i in range(cfg.n_layers):
        p = f"blocks.{i}."

        def attn(v, p=p):
            q, k, vv = lin(p + "attn.q_proj", v), lin(p + "attn.k_proj", v), lin(p + "attn.v_proj", v)
            heads = []
            for h in range(H):
                kv = h // (H // K)
                qh, kh, vh = q[:, h * D:(h + 1) * D], k[:, kv * D:(kv + 1) * D], vv[:, kv * D:(kv + 1) * D]
                if cfg.position == "rope":
                    qh, kh = rope(qh), rope(kh)
                s = qh @ kh.T / math.sqrt(D)
                s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
                heads.append(torch.softmax(s, -1) @ vh)
            return lin(p + "attn.o_proj", torch.cat(heads, -1))

        def ffn(v, p=p):
            if cfg.ffn == "swiglu":
                return lin(p + "ffn.down", F.silu(lin(p + "ffn.gate", v)) * lin(p + "ffn.up", v))
            return lin(p + "ffn.down", act[cfg.ffn](lin(p + "ffn.up", v)))

        if cfg.norm_position == "pre":
            x = x + attn(norm(p + "attn_norm", x))
            x = x + ffn(norm(p + "ffn_norm", x))
        elif cfg.norm_position == "sandwich":
            x = x + norm(p + "attn_post_norm", attn(norm(p + "attn_norm", x)))
            x = x + norm(p + "ffn_post_norm", ffn(norm(p + "ffn_norm", x)))
        else:
            x = norm(p + "attn_norm", x + attn(x))
            x = norm(p + "ffn_norm", x + ffn(x))
    if cfg.norm_position != "post":
        x = norm("norm", x)
    return x @ sd["embed.weight"].T if cfg.tie_embeddings else x @ sd["lm_head.weight"].T


@pytest.mark.parametrize("norm, place, ffn, position", list(itertools.product(NORMS, PLACES, FFNS, POSITIONS)))
def test_matches_float64_reference(norm, place, ffn, position):
    cfg = tiny(norm=norm, norm_position=place, ffn=ffn, position=position, n_kv_heads=2,
               attn_qkv_bias=True, attn_out_bias=True, ffn_bias=True, tie_embeddings=place != "post")
    model = build_model(cfg).double().eval()
    with torch.no_grad():  # random norm gains, biases and running statistics so that every value matters
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn_like(b) * 0.3)
            elif name.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)
    ids = torch.randint(0, cfg.vocab_size, (1, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], ref_forward(model.state_dict(), cfg, ids), rtol=1e-10, atol=1e-10)


def test_pre_and_post_norm_differ_on_same_weights():
    pre = build_model(tiny(norm_position="pre", tie_embeddings=False)).double().eval()
    post = build_model(tiny(norm_position="post", tie_embeddings=False)).double().eval()
    state = {k: v for k, v in pre.state_dict().items() if not k.startswith("norm.")}
    post.load_state_dict(state)
    ids = torch.randint(0, 61, (1, 9))
    with torch.no_grad():
        assert (pre(ids) - post(ids)).abs().max() > 1e-3


def test_no_residual_switch_changes_the_model():
    cfg = tiny()
    a, b = build_model(cfg).eval(), build_model(cfg.replace(residual=False)).eval()
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 61, (1, 9))
    with torch.no_grad():
        assert (a(ids) - b(ids)).abs().max() > 1e-4
