"""Static-shape decoding (inference/static.py): the same tokens and, in fp32, the same logits (1e-5) as the
eager path at every step, for every decoder shape; speculative decoding stays exact; crop, holes, left
padding and capacity errors behave as in the eager cache; no compiler -> eager with a warning.

Most tests run the static step *uncompiled* (``compiler=no_compile``: the same masks, slots, padding rows
and cache writes, no compile time); a few compile it with inductor (tiny models, a few graphs), and the
full inductor matrix is marked slow. Compilation in a fresh process, per precision, plain and speculative,
on the shipped models: test_compiled_fresh.py.
"""

import copy
import warnings

import pytest
import torch

import attnlab
from attnlab.attention.kernels import get_kernel
from attnlab.inference import aot, static
from attnlab.inference.fast import prepare_for_decode

SHAPES = {
    "mha-rope-tied": dict(n_heads=4, n_kv_heads=4, position="rope", tie_embeddings=True),
    "gqa-rope-untied": dict(n_heads=4, n_kv_heads=2, position="rope", tie_embeddings=False, attn_qkv_bias=True),
    "mqa-learned-tied": dict(n_heads=4, n_kv_heads=1, position="learned", tie_embeddings=True, ffn="gelu",
                             norm="layer"),
    "gqa-learned-post": dict(n_heads=4, n_kv_heads=2, position="learned", tie_embeddings=False,
                             norm_position="post", norm="layer", attention_kernel="naive"),
}


def no_compile(fn, **kwargs):
    """A 'compiler' that returns the function itself: the static path, run eagerly."""
    return fn


def aot_eager(fn, **kwargs):
    """Dynamo + functionalization (the in-place cache writes of the graph), without inductor's C++ step."""
    return torch.compile(fn, backend="aot_eager", dynamic=False, fullgraph=True)


def make(seed: int = 0, layers: int = 2, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = attnlab.ModelConfig(family="decoder", vocab_size=300, d_model=64, n_layers=layers, head_dim=16,
                              d_ff=128, max_seq_len=128, init_std=0.2, **kw)
    return attnlab.build_model(cfg).eval()


def prepared(ref, compiler=no_compile, precision: str = "fp32"):
    model = prepare_for_decode(copy.deepcopy(ref), precision=precision)
    assert static.install(model, compiler=compiler) is not None
    return model


def batch(B: int, T: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T) ids and, for B > 1, a left-padding mask (row b has b*2 padding tokens)."""
    ids = torch.randint(0, 300, (B, T), generator=torch.Generator().manual_seed(seed))
    if B == 1:
        return ids, None
    mask = torch.ones_like(ids)
    for b in range(B):
        mask[b, :2 * b] = 0
    return ids, mask


@torch.inference_mode()
def step_logits(model, ids, mask, steps: int) -> torch.Tensor:
    """Greedy decode by hand: the logits of the prompt's last token, then of each fed token -> (B, steps, V)."""
    cache = model.new_cache(ids.shape[0], ids.shape[1] + steps)
    logits = model(ids, cache=cache, attention_mask=mask)[:, -1]
    out = [logits]
    for _ in range(steps - 1):
        logits = model(logits.argmax(-1)[:, None], cache=cache)[:, -1]
        out.append(logits)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("B", [1, 3])
def test_static_step_gives_the_eager_logits_and_tokens(shape, B):
    ref = make(0, **SHAPES[shape])
    eager = prepare_for_decode(copy.deepcopy(ref))
    fast = prepared(ref)
    ids, mask = batch(B, 9)
    torch.testing.assert_close(step_logits(fast, ids, mask, 24), step_logits(eager, ids, mask, 24),
                               rtol=1e-5, atol=1e-5)
    assert fast.static_decoder.stats.static_calls == 23  # every step after the prompt took the static path
    want = attnlab.generate(ref, ids, 24, attention_mask=mask)
    assert torch.equal(attnlab.generate(fast, ids, 24, attention_mask=mask), want)


def test_functionalized_graph_writes_the_cache_in_place():
    """Through dynamo + AOT (the cache buffers are graph inputs mutated by index_copy_), batch with padding."""
    ref = make(0, **SHAPES["gqa-rope-untied"])
    eager = prepare_for_decode(copy.deepcopy(ref))
    fast = prepared(ref, compiler=aot_eager)
    ids, mask = batch(3, 7)
    torch.testing.assert_close(step_logits(fast, ids, mask, 12), step_logits(eager, ids, mask, 12),
                               rtol=1e-5, atol=1e-5)


def test_a_graph_for_another_grad_mode_is_compiled_not_a_failure():
    """Skipping guards (``skip_guards``) must not turn a needed recompile (no_grad instead of inference
    mode, a cache made outside inference mode) into a fallback to eager."""
    ref = make(0, **SHAPES["gqa-rope-untied"])
    eager = prepare_for_decode(copy.deepcopy(ref))
    fast = prepared(ref, compiler=aot_eager)
    ids, mask = batch(3, 7)
    step_logits(fast, ids, mask, 4)  # compiled under inference mode
    with torch.no_grad():
        cache, want_cache = fast.new_cache(3, 20), eager.new_cache(3, 20)
        fast(ids, cache=cache, attention_mask=mask)
        eager(ids, cache=want_cache, attention_mask=mask)
        tok = torch.tensor([[5], [6], [7]])
        torch.testing.assert_close(fast(tok, cache=cache), eager(tok, cache=want_cache), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast(tok, cache=cache), eager(tok, cache=want_cache), rtol=1e-5, atol=1e-5)
    assert fast.static_decoder.failed is None and fast.static_decoder.stats.static_calls == 5


@pytest.mark.parametrize("gamma", [1, 3, 6])
@pytest.mark.parametrize("B", [1, 3])
def test_speculative_with_static_target_and_draft_is_plain_greedy(gamma, B):
    """γ + 1 = 2, 4, 7 tokens per verification, fewer in the last rounds (they reuse a wider graph with
    padding rows); the draft feeds 1 or 2; rows of a batch accept different counts (holes) and finish at
    different times."""
    ref = make(0, **SHAPES["gqa-rope-untied"])
    close = copy.deepcopy(ref)
    with torch.no_grad():
        for p in close.parameters():
            p.add_(torch.randn_like(p) * 0.03)
    target, draft = prepared(ref), prepared(close)
    ids, mask = batch(B, 8, seed=gamma)
    want = attnlab.generate(ref, ids, 30, attention_mask=mask)
    out, stats = attnlab.speculative_generate(target, draft, ids, 30, gamma=gamma, attention_mask=mask,
                                              return_stats=True)
    assert torch.equal(out, want)
    assert 0 < stats.acceptance_rate < 1  # some rollback (crop) happened in both caches
    assert target.static_decoder.stats.static_calls > 0 and draft.static_decoder.stats.static_calls > 0
    widths = sorted(key[1] for key in target.static_decoder.stats.graphs)
    assert widths[-1] == gamma + 1 and len(widths) <= 2  # shorter last rounds mostly reuse it, padded


@torch.inference_mode()
def test_crop_and_redecode_match_the_eager_cache():
    ref = make(0, **SHAPES["mha-rope-tied"])
    eager = prepare_for_decode(copy.deepcopy(ref))
    fast = prepared(ref)
    ids, _ = batch(1, 6)
    more = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(7))
    outs = []
    for model in (eager, fast):
        cache = model.new_cache(1, 40)
        model(ids, cache=cache)
        model(more, cache=cache)  # 5 tokens (the static path compiles its 5-wide graph) ...
        cache.crop(6)  # ... all rolled back (speculative rejection)
        first = model(more[:, :3], cache=cache)  # 3 tokens: through the 5-wide graph, 2 padding rows
        cache.crop(7)
        again = torch.cat([model(more[:, 3 + i:4 + i], cache=cache) for i in range(2)], dim=1)
        outs.append((first, again, cache.length))
    assert {key[1] for key in fast.static_decoder.stats.graphs} == {5, 1}
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-5, atol=1e-5)
    assert outs[0][2] == outs[1][2] == 9


def test_beam_search_reorders_the_static_cache():
    """Beam search selects cache rows (``reorder`` replaces the buffers): the per-layer views follow."""
    from attnlab.inference.beam import beam_search

    ref = make(0, **SHAPES["gqa-rope-untied"])
    fast = prepared(ref)
    ids, mask = batch(3, 6)
    want = beam_search(ref, ids, 10, num_beams=3, attention_mask=mask, return_scores=True)
    got = beam_search(fast, ids, 10, num_beams=3, attention_mask=mask, return_scores=True)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    assert fast.static_decoder.stats.static_calls == 9


@torch.inference_mode()
def test_capacity_errors_are_the_eager_ones():
    fast = prepared(make(0, **SHAPES["gqa-rope-untied"]))
    cache = fast.new_cache(1, 10)
    assert cache.max_len == 10 and cache.slots >= 10 + static.MAX_TOKENS  # room for padding rows
    fast(torch.randint(0, 300, (1, 8)), cache=cache)
    fast(torch.tensor([[1]]), cache=cache)
    fast(torch.tensor([[2]]), cache=cache)
    with pytest.raises(ValueError, match="holds 10 positions and already has 10"):
        fast(torch.tensor([[3]]), cache=cache)
    with pytest.raises(ValueError, match="exceeds the model's context of 128 tokens"):
        attnlab.generate(fast, torch.randint(0, 300, (1, 100)), 40)
    with pytest.raises(ValueError, match="cache was made for batch 1"):
        fast(torch.tensor([[1], [2]]), cache=cache)


def test_generations_of_different_lengths_share_graphs():
    fast = prepared(make(0, **SHAPES["gqa-rope-untied"]))
    ids, _ = batch(1, 5)
    for n in (3, 10, 40):
        attnlab.generate(fast, ids, n)
    assert list(fast.static_decoder.stats.graphs) == [(1, 1, 256, torch.float32, "cpu")]
    sd = fast.static_decoder
    assert sd.slots_for(10) == sd.slots_for(128) == 256  # the context (128) + 16 padding rows, rounded up
    assert fast.static_decoder.stats.eager_calls == 3  # the prompts


def _broken_compile(fn, **kw):
    def run(*a, **k):
        raise RuntimeError("no C++ compiler")
    return run


def _missing_compile(fn, **kw):
    raise RuntimeError("no backend")


@pytest.mark.parametrize("failure", ["at the first call", "at torch.compile"])
def test_no_compiler_falls_back_to_eager_with_a_warning(monkeypatch, tmp_path, failure):
    ref = make(1, **SHAPES["gqa-rope-untied"])
    monkeypatch.setattr(torch, "compile", _broken_compile if failure == "at the first call" else _missing_compile)
    monkeypatch.setattr(aot, "build", _broken_compile(None))  # no C++ compiler for AOTInductor either
    monkeypatch.setattr(aot, "cache_dir", lambda: tmp_path)  # and no package built before
    ids, mask = batch(3, 6)
    with pytest.warns(UserWarning, match="decoding stays eager"):
        fast = prepare_for_decode(copy.deepcopy(ref), compile="static")
        out = attnlab.generate(fast, ids, 12, attention_mask=mask)
    assert fast.static_decoder.failed
    assert torch.equal(out, attnlab.generate(ref, ids, 12, attention_mask=mask))
    with warnings.catch_warnings():  # reported once
        warnings.simplefilter("error")
        attnlab.generate(fast, ids, 4, attention_mask=mask)


def test_compile_knob():
    ref = make(0, **SHAPES["gqa-rope-untied"])
    with pytest.raises(ValueError, match="compile='yes' is not valid"):
        prepare_for_decode(copy.deepcopy(ref), compile="yes")
    with pytest.raises(ValueError, match="compile=1 is not valid"):
        prepare_for_decode(copy.deepcopy(ref), compile=1)
    m = prepare_for_decode(copy.deepcopy(ref), compile=True)  # True = static for a decoder (compiles lazily)
    assert "compile=static" in m.prepared_for_decode and m.static_decoder is not None
    infini = make(0, n_heads=4, attention_mechanism="infini", segment_len=8)
    assert static.unsupported_reason(infini) is not None
    with pytest.warns(UserWarning, match="does not cover attention_mechanism='infini'"):
        prepare_for_decode(infini, compile="static")


@torch.inference_mode()
def forced_logits(model, ids, mask, tokens: torch.Tensor) -> torch.Tensor:
    """The logits of each decode step when ``tokens`` (B, N) are fed one by one after the prompt -> (B, N, V)."""
    cache = model.new_cache(ids.shape[0], ids.shape[1] + tokens.shape[1])
    model(ids, cache=cache, attention_mask=mask)
    return torch.cat([model(tokens[:, i:i + 1], cache=cache).float() for i in range(tokens.shape[1])], dim=1)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_low_precision_static_logits(precision):
    """bf16/int8 through the static path (uncompiled here): along the same tokens, its logits are as close to
    fp32's as the eager path's at the same precision (rounding differs: attention accumulates in fp32 over
    all slots), and the eager path's tokens where the logits are decisive."""
    ref = make(2, **SHAPES["gqa-rope-untied"])
    eager = prepare_for_decode(copy.deepcopy(ref), precision=precision)
    fast = prepared(ref, precision=precision)
    assert fast.new_cache(3, 20).k.dtype == torch.bfloat16
    ids, mask = batch(3, 7)
    tokens = attnlab.generate(ref, ids, 16, attention_mask=mask)[:, 7:]
    want = forced_logits(ref, ids, mask, tokens)
    err = {name: float((forced_logits(m, ids, mask, tokens) - want).norm() / want.norm())
           for name, m in (("eager", eager), ("static", fast))}
    assert err["static"] < max(1.5 * err["eager"], 0.01), err
    assert err["eager"] < 0.05, err
    got, base = forced_logits(fast, ids, mask, tokens), forced_logits(eager, ids, mask, tokens)
    top2 = base.topk(2, dim=-1).values
    decisive = (top2[..., 0] - top2[..., 1]) > 0.1 * base.std()
    assert bool(decisive.any())
    assert torch.equal(got.argmax(-1)[decisive], base.argmax(-1)[decisive])


def slot_attend(ck: list, cv: list, slots, allowed, q, k, v) -> torch.Tensor:
    """What attention does inside a static decode step: the step's cache writes the new K/V at their slots
    (``StaticSlots.update``) and names the registry kernel that reads every slot under ``allowed``."""
    cache = static.StaticSlots(ck, cv, slots)
    keys, values = cache.update(0, k, v)
    out, _ = get_kernel(cache.attention_kernel)(q, keys, values, causal=True, mask=allowed, scale=None)
    return out


@torch.inference_mode()
def width_logits(model, ids, tokens, widths):
    """Logits of ``tokens`` (B, n) fed after ``ids`` in calls of the given widths -> (B, n, V)."""
    cache = model.new_cache(ids.shape[0], ids.shape[1] + tokens.shape[1])
    model(ids, cache=cache)
    out, at = [], 0
    for w in widths:
        out.append(model(tokens[:, at:at + w], cache=cache))
        at += w
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_attention_gives_a_query_the_same_bits_whatever_the_queries_beside_it(dtype):
    """The static step's attention for 5 new tokens fed in one call, one by one, or 2 + 3: bit-identical
    (a matmul over 3 vs 15 grouped query rows picks another BLAS blocking and differs in the last bits)."""
    g = torch.Generator().manual_seed(0)
    B, H, K, S, D, n, length = 2, 9, 3, 256, 64, 5, 100
    ck, cv = (torch.randn(B, K, S, D, generator=g).to(dtype) for _ in range(2))
    q = torch.randn(B, H, n, D, generator=g).to(dtype)
    k, v = (torch.randn(B, K, n, D, generator=g).to(dtype) for _ in range(2))

    def run(widths: list[int]) -> torch.Tensor:
        cache_k, cache_v, out, at = ck.clone(), cv.clone(), [], 0
        for w in widths:
            slots = torch.arange(length + at, length + at + w)
            allowed = (torch.arange(S)[None, None, :] <= slots[None, :, None]).expand(B, w, S)
            out.append(slot_attend([cache_k], [cache_v], slots, allowed,
                                   q[:, :, at:at + w], k[:, :, at:at + w], v[:, :, at:at + w]))
            at += w
        return torch.cat(out, dim=2)

    one_by_one = run([1] * n)
    assert torch.equal(run([n]), one_by_one)
    assert torch.equal(run([2, 3]), one_by_one)
    want = run([n]).double()  # and it is attention: a float64 softmax over the visible slots
    keys, values = ck.double().clone(), cv.double().clone()
    keys[:, :, length:length + n], values[:, :, length:length + n] = k.double(), v.double()
    qd = q.double().view(B, K, H // K, n, D)
    scores = torch.einsum("bkgnd,bksd->bkgns", qd, keys) / D ** 0.5
    visible = torch.arange(S)[None, :] <= (length + torch.arange(n))[:, None]  # (n, S)
    ref = torch.einsum("bkgns,bksd->bkgnd", scores.masked_fill(~visible, float("-inf")).softmax(-1), values)
    torch.testing.assert_close(want, ref.reshape(B, H, n, D), rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_attention_gives_the_same_bits_whatever_the_number_of_slots(dtype, n, compiled):
    """Plain decoding and speculative decoding of one prompt can get caches of 256 and 512 slots (speculation
    asks for γ + 1 more positions, which can cross a power of two). The slots beyond the visible ones are
    masked, but MKL's product of one fp32 query over 256 slots and over 512 differed in the last bits, and
    SmolLM2's bf16 speculation parted from plain decoding at a near-tie. Attention works on fixed blocks of
    slots (attention/slots.SLOT_BLOCK) added in order, so the extra, all-masked blocks add exact zeros."""
    g = torch.Generator().manual_seed(1)
    B, H, K, D, length = 1, 9, 3, 64, 189
    q = torch.randn(B, H, n, D, generator=g).to(dtype)
    k, v = (torch.randn(B, K, n, D, generator=g).to(dtype) for _ in range(2))
    big_k, big_v = (torch.randn(B, K, 1024, D, generator=g).to(dtype) for _ in range(2))

    def attend(ck, cv, slots, allowed, q, k, v):
        return slot_attend([ck], [cv], slots, allowed, q, k, v)

    def run(S: int) -> torch.Tensor:
        ck, cv = big_k[:, :, :S].clone(), big_v[:, :, :S].clone()  # the same visible keys, other junk after
        slots = torch.arange(length, length + n)
        allowed = (torch.arange(S)[None, None, :] <= slots[None, :, None]).expand(B, n, S)
        fn = attend
        if compiled:  # as the decode graphs are: one graph per S, inductor's own kernels
            torch._dynamo.reset()
            fn = torch.compile(attend, dynamic=False, fullgraph=True, options=static.inductor_options(None))
        return fn(ck, cv, slots, allowed, q, k, v)

    want = run(256)
    for S in (512, 1024):
        assert torch.equal(run(S), want), S


@pytest.mark.parametrize("compiler,precision", [
    ("none", "fp32"), ("none", "bf16"), ("none", "int8"), ("inductor", "bf16"),
    pytest.param("inductor", "fp32", marks=pytest.mark.slow), pytest.param("inductor", "int8", marks=pytest.mark.slow)])
def test_a_tokens_logits_do_not_depend_on_how_many_the_call_carries(compiler, precision):
    """Speculative verification scores γ + 1 tokens in one call; plain decoding one at a time. Their logits
    must be bit-identical, or greedy speculation can part from plain decoding at a near-tie. This
    shape (SmolLM2's attention and FFN widths, 4 layers, a 128-token prompt) caught the causes found (see
    docs/fast_decode.md, "Width invariance"): the attention's matmuls, oneDNN's one-row kernel, inductor
    dropping bf16 roundings inside fusions that differ from one width's graph to another's (0.06 in these
    logits before the fix), and, in fp32, inductor vectorising the few-row product's fused transpose per
    width."""
    torch.manual_seed(3)
    ref = attnlab.build_model(attnlab.ModelConfig(vocab_size=300, d_model=576, n_layers=4, n_heads=9, n_kv_heads=3,
                                                  d_ff=1536, max_seq_len=512, rope_theta=1e5, init_std=0.2)).eval()
    model = (prepared(ref, precision=precision) if compiler == "none"
             else prepare_for_decode(copy.deepcopy(ref), precision=precision, compile="static"))
    ids = torch.randint(0, 300, (1, 128), generator=torch.Generator().manual_seed(5))
    tokens = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(6))
    one_by_one = width_logits(model, ids, tokens, [1] * 5)
    assert torch.equal(width_logits(model, ids, tokens, [5]), one_by_one)
    assert torch.equal(width_logits(model, ids, tokens, [2, 3]), one_by_one)  # 3 runs in the 5-wide graph


# ------------------------------------------------------------------------------------------ inductor
@pytest.fixture(scope="module")
def compiled_gqa():
    ref = make(0, **SHAPES["gqa-rope-untied"])
    return ref, prepare_for_decode(copy.deepcopy(ref), compile="static")


def test_inductor_graph_gives_the_eager_logits_with_left_padding(compiled_gqa):
    """One inductor graph (batch 3, one token per call) on a tiny model: a few seconds with a warm cache."""
    ref, fast = compiled_gqa
    eager = prepare_for_decode(copy.deepcopy(ref))
    ids, mask = batch(3, 9)
    torch.testing.assert_close(step_logits(fast, ids, mask, 16), step_logits(eager, ids, mask, 16),
                               rtol=1e-5, atol=1e-5)
    assert fast.static_decoder.failed is None and len(fast.static_decoder.stats.graphs) == 1


@pytest.mark.slow
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("B", [1, 3])
def test_inductor_matrix(shape, B):
    ref = make(0, **SHAPES[shape])
    eager = prepare_for_decode(copy.deepcopy(ref))
    fast = prepare_for_decode(copy.deepcopy(ref), compile="static")
    ids, mask = batch(B, 9)
    torch.testing.assert_close(step_logits(fast, ids, mask, 12), step_logits(eager, ids, mask, 12),
                               rtol=1e-5, atol=1e-5)
    assert fast.static_decoder.failed is None


@pytest.mark.slow
@pytest.mark.parametrize("B", [1, 3])
def test_inductor_speculative_is_plain_greedy(compiled_gqa, B):
    ref, target = compiled_gqa
    close = copy.deepcopy(ref)
    with torch.no_grad():
        for p in close.parameters():
            p.add_(torch.randn_like(p) * 0.03)
    draft = prepare_for_decode(close, compile="static")  # same architecture: shares the target's graphs
    ids, mask = batch(B, 8, seed=4)
    want = attnlab.generate(ref, ids, 24, attention_mask=mask)
    assert torch.equal(attnlab.speculative_generate(target, draft, ids, 24, gamma=3, attention_mask=mask), want)
    assert target.static_decoder.failed is None and draft.static_decoder.failed is None


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_inductor_low_precision_compiles(precision):
    """bf16 (oneDNN packed weights through the attnlab::packed_linear op) and int8 (_weight_int8pack_mm)
    compile without falling back; along the same tokens, the logits are as close to fp32's as eager's."""
    ref = make(2, **SHAPES["gqa-rope-untied"])
    eager = prepare_for_decode(copy.deepcopy(ref), precision=precision)
    fast = prepare_for_decode(copy.deepcopy(ref), precision=precision, compile="static")
    ids, _ = batch(1, 7)
    tokens = attnlab.generate(ref, ids, 12)[:, 7:]
    want = forced_logits(ref, ids, None, tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        got = forced_logits(fast, ids, None, tokens)
    assert fast.static_decoder.failed is None and fast.static_decoder.stats.static_calls == 12
    err = float((got - want).norm() / want.norm())
    assert err < max(1.5 * float((forced_logits(eager, ids, None, tokens) - want).norm() / want.norm()), 0.01)


def test_the_static_step_attends_through_the_kernel_registry(monkeypatch):
    """Every softmax of a static decode step is the registry's ``static_slots`` kernel, named by the step's
    cache (no attention outside the registry)."""
    from attnlab.attention import kernels

    calls = []
    registry = dict(kernels.KERNELS)

    def counted(q, k, v, **kw):
        calls.append(tuple(kw["mask"].shape))
        return registry["static_slots"](q, k, v, **kw)

    monkeypatch.setattr(kernels, "KERNELS", {**registry, "static_slots": counted})
    ref = make(0, **SHAPES["gqa-rope-untied"])
    fast = prepared(ref)
    ids, mask = batch(3, 7)
    torch.testing.assert_close(step_logits(fast, ids, mask, 4), step_logits(prepare_for_decode(copy.deepcopy(ref)),
                                                                             ids, mask, 4), rtol=1e-5, atol=1e-5)
    assert fast.static_decoder.stats.static_calls == 3
    assert calls == [(3, 1, 256)] * (3 * 2)  # 3 static steps x 2 layers, each with its (B, n, S) mask


def test_dynamo_settings_change_only_within_the_calls_that_compile():
    """A model needing more graphs than dynamo's recompile limit compiles them (no fallback to eager), and the
    limit outside those calls is what it was: nothing process-wide is raised. (The limit is lowered with
    dynamo's own ``config.patch``: pytest's monkeypatch deletes a config entry on undo.)"""
    with torch._dynamo.config.patch(recompile_limit=1):
        torch._dynamo.reset()
        _two_graphs_over_a_limit_of_one()


def _two_graphs_over_a_limit_of_one() -> None:
    ref = make(0, **SHAPES["gqa-rope-untied"])
    fast = prepared(ref, compiler=aot_eager)
    eager = prepare_for_decode(copy.deepcopy(ref))
    ids, _ = batch(1, 6)
    more = torch.randint(0, 300, (1, 3), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        outs = []
        for model in (fast, eager):
            cache = model.new_cache(1, 20)
            model(ids, cache=cache)
            outs.append(torch.cat([model(more[:, :1], cache=cache), model(more[:, 1:], cache=cache)], dim=1))
    assert fast.static_decoder.failed is None, fast.static_decoder.failed
    assert sorted(key[1] for key in fast.static_decoder.stats.graphs) == [1, 2]  # two graphs > the limit of 1
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    assert torch._dynamo.config.recompile_limit == 1
    with static.recompile_room(5):
        assert torch._dynamo.config.recompile_limit >= 5
    assert torch._dynamo.config.recompile_limit == 1
