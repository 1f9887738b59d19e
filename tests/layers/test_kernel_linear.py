"""The decode-time linear (KernelLinear): the same function as F.linear, whichever path it takes."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from attnlab.layers import cpu_kernels
from attnlab.layers import kernel_linear as L


@pytest.fixture
def weight():
    g = torch.Generator().manual_seed(0)
    return torch.randn(640, 384, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 16, 17, 40])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "fallback"])
def test_matches_a_float64_reference(weight, rows, with_bias, kernel):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(1, rows, 384, generator=g, dtype=torch.float64)
    b = torch.randn(640, generator=g, dtype=torch.float64) if with_bias else None
    want = F.linear(x, weight, b)
    with contextlib.nullcontext() if kernel else cpu_kernels.kernels_disabled():
        got = L.rows_linear(x.float(), weight.float(), None if b is None else b.float())
    assert got.shape == want.shape and got.dtype == torch.float32
    assert got.is_contiguous()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "fallback"])
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(kernel):
    """Bit for bit, for every call width the fast path takes (SmolLM2's projection shapes), through
    attnlab's CPU kernel and through the weight-first fallback."""
    with contextlib.nullcontext() if kernel else cpu_kernels.kernels_disabled():
        _check_width_invariance()


def _check_width_invariance():
    g = torch.Generator().manual_seed(0)
    for c_in, c_out in ((576, 960), (1536, 576)):
        w = torch.randn(c_out, c_in, generator=g) * 0.03
        x = torch.randn(L.SKINNY_MAX_ROWS, c_in, generator=g)
        alone = torch.cat([L.rows_linear(x[i:i + 1], w) for i in range(len(x))])
        for width in range(2, L.SKINNY_MAX_ROWS + 1):
            for start in (0, L.SKINNY_MAX_ROWS - width):
                assert torch.equal(L.rows_linear(x[start:start + width], w), alone[start:start + width]), (c_in, width)


def test_the_fast_path_is_taken_only_where_it_applies(weight):
    w = weight.float()
    assert L.skinny_applies(torch.zeros(1, 1, 384), w)
    assert L.skinny_applies(torch.zeros(4, 4, 384), w)  # 16 rows
    assert not L.skinny_applies(torch.zeros(1, 17, 384), w)
    assert not L.skinny_applies(torch.zeros(1, 384, dtype=torch.bfloat16), w.bfloat16())
    assert not L.skinny_applies(torch.zeros(1, 8), torch.zeros(8, 8))  # small weight: overhead dominates
    with L.plain_linear():
        assert not L.skinny_applies(torch.zeros(1, 1, 384), w)
    assert L.skinny_applies(torch.zeros(1, 1, 384), w)


def test_transposed_input_layouts_and_leading_dims(weight):
    w = weight.float()
    x = torch.randn(384, 6).t()  # a (6, 384) view with transposed strides
    torch.testing.assert_close(L.rows_linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)
    x3 = torch.randn(2, 3, 384)
    assert L.rows_linear(x3, w).shape == (2, 3, 640)
    torch.testing.assert_close(L.rows_linear(x3, w), F.linear(x3, w), rtol=1e-5, atol=1e-4)


def test_with_gradients_it_is_nn_linear_bit_for_bit(weight):
    """Training through a KernelLinear computes what nn.Linear computes (F.linear and its backward)."""
    plain = torch.nn.Linear(384, 640)
    with torch.no_grad():
        plain.weight.copy_(weight.float())
    layer = L.KernelLinear.sharing(plain)
    x = torch.randn(1, 3, 384, requires_grad=True)  # few rows: the no-grad fast path would apply
    y = layer(x)
    assert torch.equal(y, F.linear(x, plain.weight, plain.bias))
    y.square().sum().backward()
    gx, gw = x.grad.clone(), plain.weight.grad.clone()
    x.grad = plain.weight.grad = None
    plain(x).square().sum().backward()
    assert torch.equal(gx, x.grad) and torch.equal(gw, plain.weight.grad)


def test_sharing_keeps_the_parameters_and_the_state_dict():
    plain = torch.nn.Linear(4, 3)
    layer = L.KernelLinear.sharing(plain)
    assert isinstance(layer, torch.nn.Linear)
    assert layer.weight is plain.weight and layer.bias is plain.bias  # not copies
    assert list(layer.state_dict()) == list(plain.state_dict())
    no_bias = L.KernelLinear.sharing(torch.nn.Linear(4, 3, bias=False))
    assert no_bias.bias is None and list(no_bias.state_dict()) == ["weight"]
