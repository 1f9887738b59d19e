"""attnlab's CPU kernel for few-row products: exact against float64, width- and thread-invariant bit for bit,
and the layers that use it give what they gave without it."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from attnlab.layers import cpu_kernels as K
from attnlab.layers import kernel_linear as L
from attnlab.layers.quant import Int8Linear, PackedLinear, quantize_int8

EXPECTED = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") and shutil.which("c++") is not None
needs_kernel = pytest.mark.skipif(not K.available(), reason=f"kernel unavailable: {K.unavailable_reason()}")


def test_the_kernel_builds_where_it_should():
    """On an x86 AVX2 CPU with a C++ compiler the kernel must load: a broken build fails here, not silently."""
    if EXPECTED:
        assert K.available(), K.unavailable_reason()


def _weights(f, c, dtype, g):
    w = torch.randn(f, c, generator=g) * 0.05
    if dtype == "int8":
        q, s = quantize_int8(w)
        return q, s, q.double() * s.double()[:, None]
    w = w.to(dtype)
    return w, None, w.double()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "int8"])
@pytest.mark.parametrize("shape", [(960, 576), (37, 13), (5, 40), (3, 7)])  # C tails below 8 and 32, F < 4
def test_matches_a_float64_reference(dtype, shape):
    f, c = shape
    g = torch.Generator().manual_seed(f * c)
    w, s, ref_w = _weights(f, c, dtype, g)
    bias = torch.randn(f, generator=g)
    x = torch.randn(7, c, generator=g)
    got = K.rows_matmul(x, w, s, bias)
    want = x.double() @ ref_w.T + bias.double()
    assert got.dtype == torch.float32 and got.shape == (7, f)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * c ** 0.5)


@needs_kernel
def test_output_takes_the_input_dtype_and_leading_dims():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 48, generator=g).bfloat16()
    x = torch.randn(2, 3, 48, generator=g).bfloat16()
    y = K.rows_matmul(x, w)
    assert y.shape == (2, 3, 64) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), (x.double() @ w.double().T).float(), rtol=1e-2, atol=1e-2)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "int8"])
@pytest.mark.parametrize("shape", [(576, 1536), (37, 45)])  # 45 = a 32-step, an 8-step and a scalar tail
def test_a_rows_result_does_not_depend_on_the_call_width_or_threads(dtype, shape):
    """Bit for bit: every width 1..MAX_ROWS, every position in the call (so every place in a group of rows
    sharing a widened weight vector), one thread or two."""
    g = torch.Generator().manual_seed(2)
    w, s, _ = _weights(*shape, dtype, g)
    x = torch.randn(K.MAX_ROWS, shape[1], generator=g)
    alone = torch.cat([K.rows_matmul(x[i:i + 1], w, s) for i in range(K.MAX_ROWS)])
    for width in range(2, K.MAX_ROWS + 1):
        for start in range(0, K.MAX_ROWS - width + 1):
            assert torch.equal(K.rows_matmul(x[start:start + width], w, s), alone[start:start + width]), width
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(K.rows_matmul(x, w, s), alone)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_bad_arguments_name_the_problem():
    with pytest.raises(RuntimeError, match="x \\(N, C\\) and weight \\(F, C\\)"):
        K.rows_matmul(torch.zeros(2, 5), torch.zeros(3, 4))
    with pytest.raises(RuntimeError, match="float32, bfloat16 or int8"):
        K.rows_matmul(torch.zeros(2, 4), torch.zeros(3, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="needs its per-row scales"):
        K.rows_matmul(torch.zeros(2, 4), torch.zeros(3, 4, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="one entry per output row"):
        K.rows_matmul(torch.zeros(2, 4), torch.zeros(3, 4), None, torch.zeros(2))


@needs_kernel
def test_layers_use_it_for_few_rows_and_agree_with_pytorch():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(640, 384, generator=g) * 0.05
    b = torch.randn(640, generator=g)
    x = torch.randn(1, 3, 384, generator=g)
    with torch.no_grad():
        assert torch.equal(L.rows_linear(x, w, b), K.rows_matmul(x, w, None, b))
        torch.testing.assert_close(L.rows_linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-4)
        packed, int8 = PackedLinear(w, b), Int8Linear(w, b)
        assert packed.kernel and int8.kernel
        assert torch.equal(packed(x), K.rows_matmul(x.bfloat16(), w.bfloat16(), None, b.bfloat16()))
        assert torch.equal(int8(x), K.rows_matmul(x.bfloat16(), int8.qweight, int8.scales32, int8.bias))
        wide = torch.randn(40, 384, generator=g)  # a prompt: PyTorch's GEMM, in float32 without bf16 units
        torch.testing.assert_close(packed(wide).float(), F.linear(wide, w.bfloat16().float(), b.bfloat16().float()),
                                   rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(int8(wide).float(), F.linear(wide, int8.dequantized().float(), b), rtol=3e-2,
                                   atol=3e-2)
        with K.kernels_disabled():
            assert not K.available() and K.unavailable_reason() == "switched off by kernels_disabled()"
            torch.testing.assert_close(L.rows_linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-4)
    assert K.available()


@needs_kernel
def test_training_keeps_autograd():
    layer = L.KernelLinear.sharing(torch.nn.Linear(384, 640))
    x = torch.randn(2, 384, requires_grad=True)
    layer(x).sum().backward()  # the kernel has no backward: with grad enabled the layer must not use it
    assert x.grad is not None and layer.weight.grad is not None
