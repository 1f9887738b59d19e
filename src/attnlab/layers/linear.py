"""A linear layer that stays fast when it sees only a few rows: the decode-time case on CPU.

Decoding multiplies one token (or the handful a speculative verifier scores) by every weight matrix,
so its speed is the speed of streaming the weights from memory. PyTorch's ``F.linear`` computes
``x @ W.T``; with a few rows on this CPU build that goes through a GEMV (one row) or a skinny GEMM whose
packing reads the weight at a fraction of the memory bandwidth. Computing the same product the other way
round, ``(W @ x.T).T`` with the weight as the row-major left operand, streams the weight once at close to
the bandwidth; a single row is duplicated to two columns so that it takes the GEMM path too (the GEMV
path is the slow one). The arithmetic is the same dot products; results agree with ``F.linear`` to float
rounding (tested). ``attnlab bench decode`` measures the gain against Hugging Face on the same weights.

The fast path applies to float32 CPU tensors with at most ``SKINNY_MAX_ROWS`` rows and a weight of at
least ``SKINNY_MIN_WEIGHT`` elements (below that, call overhead dominates and ``F.linear`` is quicker).
``plain_linear()`` switches it off, for comparisons and debugging. Where attnlab's own CPU kernel is
available (``layers/cpu_kernels.py``: x86 with AVX2 and a C++ compiler) it serves inference instead: it
reads the weight at the bandwidth on CPUs whose BLAS does not (an AMD EPYC with MKL, for one) and is
width-invariant by construction; what follows describes the fallback.

A row's result does not depend on how many rows share the call (speculative verification multiplies
γ + 1 rows where plain decoding multiplies one, and greedy speculation must not part from plain decoding
at a near-tie). The BLAS picks its kernel by the number of columns of ``x.T`` and sums in its own order
in each: on this machine's MKL, 1-3 columns take one kernel, 12 and more another, and 4-11 a kernel that
works through blocks of 4 columns, with leftover columns summed differently. So the rows are fed
``SKINNY_CHUNK`` (8) at a time, each chunk padded to 4 or 8 columns: every column goes through the same
4-column block (one row padded to 4 costs nothing measurable, the product being bound by reading the
weight; 5-8 rows padded to 8 cost ~2x one row).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.layers import cpu_kernels

SKINNY_MAX_ROWS = 16  # = cpu_kernels.MAX_ROWS: linear() checks the rows once for both paths
SKINNY_MIN_WEIGHT = 1 << 16
SKINNY_BLOCK = 4  # every product has 4 or 8 columns: one BLAS kernel, whatever the rows (see above)
SKINNY_CHUNK = 8

_state = {"enabled": True}


def plain_linear() -> contextlib.AbstractContextManager[None]:
    """Within this block every attnlab ``Linear`` calls ``F.linear`` (PyTorch's own path)."""
    return cpu_kernels.switched_off(_state)


def skinny_applies(x: Tensor, weight: Tensor) -> bool:
    if not _state["enabled"] or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if x.device.type != "cpu" or weight.numel() < SKINNY_MIN_WEIGHT or x.shape[-1] == 0:
        return False
    rows = x.numel() // x.shape[-1]
    return 0 < rows <= SKINNY_MAX_ROWS


def _skinny_rows(rows: Tensor, weight: Tensor) -> Tensor:
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
    return _skinny_rows(rows, weight)


@skinny_linear.register_fake
def _(rows: Tensor, weight: Tensor) -> Tensor:
    return rows.new_empty(rows.shape[0], weight.shape[0])


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``, computed by attnlab's CPU kernel (``layers/cpu_kernels.py``) or
    weight-first when ``x`` has only a few rows."""
    if not skinny_applies(x, weight):
        return F.linear(x, weight, bias)
    no_grad = not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad)
    if no_grad and cpu_kernels.available():  # streams W once; width-invariant; no backward (training: below)
        return cpu_kernels.rows_matmul(x, weight, None, bias)
    rows = x.reshape(-1, x.shape[-1]).contiguous()  # a transposed layout here would hit the slow path
    y = skinny_linear(rows, weight) if torch.compiler.is_compiling() and no_grad else _skinny_rows(rows, weight)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` with the same parameters and state dict, using :func:`linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
