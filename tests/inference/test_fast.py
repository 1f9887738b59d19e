"""The fast decode path: fusion is exact, lower precisions stay within stated tolerances, and everything
that drives a model (generate, speculative decoding) works unchanged on a prepared one."""

import copy

import pytest
import torch
import torch.nn.functional as F

import attnlab
from attnlab.inference import aot
from attnlab.inference.fast import prepare_for_decode, weight_bytes
from attnlab.layers.quant import Int8Linear, PackedLinear, quantize_int8

SHAPES = [
    dict(n_heads=4, n_kv_heads=4, ffn="swiglu", attn_qkv_bias=False),  # MHA
    dict(n_heads=4, n_kv_heads=2, ffn="swiglu", attn_qkv_bias=True),  # GQA with biased q/k/v (Qwen2)
    dict(n_heads=4, n_kv_heads=1, ffn="gelu", attn_qkv_bias=False),  # MQA, two-matrix FFN (GPT-2 shape)
]


def _model(seed: int, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = attnlab.ModelConfig(family="decoder", vocab_size=300, d_model=64, n_layers=3, head_dim=16, d_ff=128,
                              max_seq_len=128, norm="rms", position="rope", init_std=0.2, **kw)
    return attnlab.build_model(cfg).eval()


@pytest.mark.parametrize("shape", SHAPES)
def test_fused_fp32_gives_the_reference_tokens_and_logits(shape):
    ref = _model(0, **shape)
    fast = prepare_for_decode(copy.deepcopy(ref), precision="fp32")
    assert not hasattr(fast.blocks[0].attn, "q_proj") and fast.blocks[0].attn.qkv_proj is not None
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(fast(ids), ref(ids), rtol=1e-5, atol=1e-5)
    assert torch.equal(attnlab.generate(fast, ids, 40), attnlab.generate(ref, ids, 40))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "q4_1"])
def test_a_prepared_model_is_in_eval_mode_throughout(precision):
    """Dropout must not act in a prepared model: every module, the swapped-in ones too, is in eval mode
    (the fused modules were created after ``eval()`` and stayed in training mode)."""
    fast = prepare_for_decode(_model(0, dropout=0.1, **SHAPES[0]).train(), precision=precision)
    assert [name for name, m in fast.named_modules() if m.training] == []


def test_fusion_keeps_weight_bytes_and_speculative_decoding_works():
    ref = _model(3, **SHAPES[1])
    fast = prepare_for_decode(copy.deepcopy(ref), precision="fp32")
    assert weight_bytes(fast) == weight_bytes(ref)
    draft = _model(4, **SHAPES[1])
    ids = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(2))
    want = attnlab.generate(ref, ids, 30)
    assert torch.equal(attnlab.generate(fast, ids, 30, draft=draft), want)
    assert torch.equal(attnlab.generate(fast, ids, 30, draft="prompt_lookup"), want)


def test_int8_quantisation_error_is_at_most_half_a_step():
    w = torch.randn(96, 80, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 3, 96)[:, None]
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (96,)
    assert int(q.abs().max()) == 127  # each row's largest weight uses the full range
    err = (q.float() * s[:, None] - w).abs()
    assert bool((err <= s[:, None] / 2 + 1e-6).all())


@pytest.mark.parametrize("bias", [False, True])
def test_low_precision_linears_match_their_dequantised_weights(bias):
    g = torch.Generator().manual_seed(5)
    w, b = torch.randn(192, 64, generator=g), torch.randn(192, generator=g)
    x = torch.randn(3, 5, 64, generator=g)
    packed = PackedLinear(w, b if bias else None)
    want = F.linear(x.bfloat16().double(), w.bfloat16().double(), b.bfloat16().double() if bias else None)
    torch.testing.assert_close(packed(x).double(), want, rtol=2e-2, atol=5e-2)
    int8 = Int8Linear(w, b if bias else None)
    want = F.linear(x.bfloat16().double(), int8.dequantized().double(), b.bfloat16().double() if bias else None)
    torch.testing.assert_close(int8(x).double(), want, rtol=2e-2, atol=5e-2)
    int8.fused_kernel = False  # the portable fallback computes the same product
    torch.testing.assert_close(int8(x).double(), want, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("cls", [PackedLinear, Int8Linear])
def test_low_precision_linears_give_a_row_the_same_bits_whatever_the_rows_beside_it(cls):
    """Speculative verification multiplies γ + 1 rows where plain decoding multiplies one: a row's output
    must not depend on how many rows share the call (oneDNN's one-row bf16 kernel rounds differently from
    its 2+-row kernel for SmolLM2's 1536 -> 576 down projection: 11 of 115,200 outputs, before the fix)."""
    g = torch.Generator().manual_seed(0)
    layer = cls(torch.randn(576, 1536, generator=g) * 0.03, None)
    x = torch.randn(208, 1536, generator=g)
    with torch.inference_mode():
        alone = torch.cat([layer(x[i:i + 1]) for i in range(200)])
        for width in (2, 3, 5, 8):
            assert torch.equal(torch.cat([layer(x[i:i + width])[:1] for i in range(200)]), alone), width


@pytest.fixture(scope="module")
def default_target():
    return attnlab.from_pretrained("default").eval()


@pytest.mark.parametrize("precision,tolerance", [("bf16", 0.02), ("int8", 0.04)])
def test_trained_model_low_precision_logits_and_tokens(default_target, precision, tolerance):
    """On trained weights, bf16 and int8 logits differ from fp32 by at most ``tolerance`` of their norm and
    pick the same next token almost everywhere on real code; bf16 keeps fp32's greedy continuation."""
    fast = prepare_for_decode(copy.deepcopy(default_target), precision=precision)
    assert weight_bytes(fast) < weight_bytes(default_target) * (0.55 if precision == "bf16" else 0.3)
    text = open(copy.__file__).read()[2000:6000]  # real Python source the model was not trained on verbatim
    ids = torch.tensor([attnlab.load_tokenizer("default").encode(text)[:256]])
    with torch.no_grad():
        ref, got = default_target(ids), fast(ids).float()
    assert float((got - ref).norm() / ref.norm()) < tolerance
    assert float((got.argmax(-1) == ref.argmax(-1)).float().mean()) > 0.95
    if precision == "bf16":
        prompt = ids[:, :12]
        assert torch.equal(attnlab.generate(fast, prompt, 24), attnlab.generate(default_target, prompt, 24))


def test_prepared_models_refuse_what_they_cannot_do(tmp_path):
    model = _model(0, **SHAPES[0])
    with pytest.raises(ValueError, match="precision='fp16' is not valid"):
        prepare_for_decode(copy.deepcopy(model), precision="fp16")
    fast = prepare_for_decode(model, precision="bf16")
    with pytest.raises(ValueError, match="already prepared"):
        prepare_for_decode(fast, precision="int8")
    with pytest.raises(ValueError, match="cannot be saved"):
        fast.save_pretrained(tmp_path / "m")


@pytest.mark.parametrize("compile", [True, "dynamic"])  # True = static-shape graphs for a decoder
def test_compile_falls_back_to_eager_when_the_compiler_fails(monkeypatch, tmp_path, compile):
    ref = _model(1, **SHAPES[1])
    fast = copy.deepcopy(ref)

    def broken(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(aot, "build", broken(None))  # no C++ compiler for AOTInductor either
    monkeypatch.setattr(aot, "cache_dir", lambda: tmp_path)  # and no package built before
    prepare_for_decode(fast, precision="fp32", compile=compile)
    ids = torch.randint(0, 300, (1, 5))
    with pytest.warns(UserWarning, match="decoding stays eager"):
        out = attnlab.generate(fast, ids, 12)
    assert torch.equal(out, attnlab.generate(ref, ids, 12))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_compiled_decode_gives_the_eager_tokens(precision):
    """fp32: the eager tokens. int8: compiled kernels round differently (on these random weights the
    near-flat logits then pick other tokens), so along fp32's tokens the compiled logits must be as close
    to fp32's as the eager int8 ones (tests/inference/test_static_decode.py has the full matrix)."""
    ref = prepare_for_decode(_model(2, **SHAPES[1]), precision=precision)
    fast = prepare_for_decode(_model(2, **SHAPES[1]), precision=precision, compile=True)
    ids = torch.randint(0, 300, (1, 7), generator=torch.Generator().manual_seed(3))
    if precision == "fp32":
        assert torch.equal(attnlab.generate(fast, ids, 20), attnlab.generate(ref, ids, 20))
        return
    exact = _model(2, **SHAPES[1])
    tokens = attnlab.generate(exact, ids, 20)

    def logits(model):
        with torch.inference_mode():
            cache = model.new_cache(1, tokens.shape[1])
            model(ids, cache=cache)
            return torch.cat([model(tokens[:, i:i + 1], cache=cache).float() for i in range(7, 27)], dim=1)

    want = logits(exact)
    err = {name: float((logits(m) - want).norm() / want.norm()) for name, m in (("eager", ref), ("compiled", fast))}
    assert fast.static_decoder.failed is None and err["compiled"] < 1.5 * err["eager"], err


def test_public_name():
    assert attnlab.prepare_for_decode is prepare_for_decode
