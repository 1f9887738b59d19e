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
``plain_linear()`` switches it off, for comparisons and debugging.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SKINNY_MAX_ROWS = 16
SKINNY_MIN_WEIGHT = 1 << 16

_state = {"enabled": True}


@contextlib.contextmanager
def plain_linear() -> Iterator[None]:
    """Within this block every attnlab ``Linear`` calls ``F.linear`` (PyTorch's own path)."""
    previous = _state["enabled"]
    _state["enabled"] = False
    try:
        yield
    finally:
        _state["enabled"] = previous


def skinny_applies(x: Tensor, weight: Tensor) -> bool:
    if not _state["enabled"] or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if x.device.type != "cpu" or weight.numel() < SKINNY_MIN_WEIGHT or x.shape[-1] == 0:
        return False
    rows = x.numel() // x.shape[-1]
    return 0 < rows <= SKINNY_MAX_ROWS


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``, computed weight-first when ``x`` has only a few rows."""
    if not skinny_applies(x, weight):
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1]).contiguous()  # a transposed layout here would hit the slow path
    if rows.shape[0] == 1:
        y = torch.mm(weight, torch.cat([rows, rows]).t())[:, :1]
    else:
        y = torch.mm(weight, rows.t())
    y = y.t().contiguous()  # callers (and the next skinny product) want row-major output
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` with the same parameters and state dict, using :func:`linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
