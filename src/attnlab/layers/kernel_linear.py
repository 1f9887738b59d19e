"""``KernelLinear``: an ``nn.Linear`` that stays fast when it sees only a few rows, the decode-time case on CPU.

Models are built from plain ``nn.Linear``; ``prepare_for_decode`` (``inference/fast.py``) swaps each fp32 one
for a ``KernelLinear`` that *shares its Parameters* (same state dict, same tied weights, same optimiser
state), so a model prepared this way can still be trained and saved.

Decoding multiplies one token (or the handful a speculative verifier scores) by every weight matrix, so its
speed is the speed of streaming the weights from memory. For float32 CPU tensors with at most
``SKINNY_MAX_ROWS`` rows and a weight of at least ``SKINNY_MIN_WEIGHT`` elements, and no gradient wanted:

1. attnlab's CPU kernel (``layers/cpu_kernels.py``: x86 with AVX2 and a C++ compiler), which reads the
   weight once at close to the bandwidth and is width-invariant by construction; else
2. the weight-first product: PyTorch's ``F.linear`` computes ``x @ W.T``, and with a few rows that goes
   through a GEMV (one row) or a skinny GEMM whose packing reads the weight at a fraction of the
   bandwidth. ``(W @ x.T).T``, with the weight as the row-major left operand, streams it once; the
   arithmetic is the same dot products and agrees with ``F.linear`` to float rounding (tested).

Everything else (more rows, small weights, other dtypes, training) is ``F.linear``. ``plain_linear()``
switches the fast paths off, for comparisons and debugging.

Width invariance of the fallback (the policy is stated once, in ``inference/fast.py``): the BLAS picks its
kernel by the number of columns of ``x.T`` and sums in its own order in each (on an Intel-tuned MKL, 1-3
columns take one kernel, 12 and more another, 4-11 one that works through blocks of 4 columns with
leftovers summed differently). So rows are fed ``SKINNY_CHUNK`` (8) at a time, each chunk padded to 4 or 8
columns: every column goes through the same 4-column block (one row padded to 4 costs nothing measurable,
the product being bound by reading the weight).

Shape legend: N rows (tokens), C in features, F out features.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.layers import cpu_kernels

SKINNY_MAX_ROWS = 16  # = cpu_kernels.MAX_ROWS: rows_linear() checks the rows once for both paths
SKINNY_MIN_WEIGHT = 1 << 16  # below this, call overhead dominates and F.linear is quicker
SKINNY_BLOCK = 4  # every fallback product has 4 or 8 columns: one BLAS kernel, whatever the rows
SKINNY_CHUNK = 8

_state = {"enabled": True}


def plain_linear() -> contextlib.AbstractContextManager[None]:
    """Within this block every ``KernelLinear`` calls ``F.linear`` (PyTorch's own path)."""
    return cpu_kernels.switched_off(_state)


def skinny_applies(x: Tensor, weight: Tensor) -> bool:
    """Whether ``x @ weight.T`` takes a few-row fast path (see the module docstring)."""
    if not _state["enabled"] or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if x.device.type != "cpu" or weight.numel() < SKINNY_MIN_WEIGHT or x.shape[-1] == 0:
        return False
    rows = x.numel() // x.shape[-1]
    return 0 < rows <= SKINNY_MAX_ROWS


def skinny_rows(rows: Tensor, weight: Tensor) -> Tensor:
    """(N, C) contiguous rows, N <= SKINNY_MAX_ROWS -> (N, F) row-major: ``W @ chunk.T`` for chunks of
    ``SKINNY_CHUNK`` rows, each padded to a multiple of ``SKINNY_BLOCK`` rows (see the module docstring).
    Each chunk is a contiguous (n, C) block passed transposed: MKL streams W fast with that layout (a
    contiguous (C, n) operand took a path 3x slower)."""
    parts = []
    for chunk in rows.split(SKINNY_CHUNK):
        n = chunk.shape[0]
        pad = -n % SKINNY_BLOCK  # (one row alone would also take the slow GEMV path)
        if pad:
            chunk = torch.cat([chunk, chunk[-1:].expand(pad, -1)])
        parts.append(torch.mm(weight, chunk.t())[:, :n])
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)).t().contiguous()


@torch.library.custom_op("attnlab::skinny_linear", mutates_args=())
def skinny_linear(rows: Tensor, weight: Tensor) -> Tensor:
    """The weight-first product as one opaque operator inside compiled inference graphs: inlined, inductor
    would fuse the transpose of ``W @ x.T`` into the next kernel, which then reads a strided buffer whose
    layout depends on the number of rows and is vectorised differently for each (a SiLU through scalar
    ``exp`` for one width, vector ``exp`` for another: a token's output would depend on the call's width)."""
    return skinny_rows(rows, weight)


@skinny_linear.register_fake
def _(rows: Tensor, weight: Tensor) -> Tensor:
    return rows.new_empty(rows.shape[0], weight.shape[0])


def rows_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` (..., C) -> (..., F), through attnlab's CPU kernel or weight-first
    when ``x`` has only a few rows and no gradient is wanted; ``F.linear`` itself otherwise."""
    if not skinny_applies(x, weight):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return F.linear(x, weight, bias)  # training: PyTorch's product and its backward
    if cpu_kernels.available():  # streams W once; width-invariant by construction
        return cpu_kernels.rows_matmul(x, weight, None, bias)
    rows = x.reshape(-1, x.shape[-1]).contiguous()  # a transposed layout here would hit the slow path
    y = skinny_linear(rows, weight) if torch.compiler.is_compiling() else skinny_rows(rows, weight)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.shape[0])


class KernelLinear(nn.Linear):
    """``nn.Linear`` computing with :func:`rows_linear`; made from an existing layer by :meth:`sharing`."""

    @classmethod
    def sharing(cls, linear: nn.Linear) -> KernelLinear:
        """A ``KernelLinear`` holding ``linear``'s own Parameters (not copies): the state dict, tied
        weights and an optimiser's references are those of ``linear``."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.train(linear.training)
        return layer

    def forward(self, x: Tensor) -> Tensor:  # (..., C) -> (..., F)
        return rows_linear(x, self.weight, self.bias)
