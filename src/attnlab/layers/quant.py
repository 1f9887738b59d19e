"""Inference-only linear layers for fast decoding: bf16 weights in the CPU library's packed layout, and
int8 weight-only quantisation with per-output-channel scales.

Decoding one token reads every weight once, so its speed is bytes read per token over memory bandwidth.
bf16 halves the bytes of fp32; int8 halves them again. These modules hold the weight in the form the
fastest available CPU kernel wants and fall back to plain PyTorch when that kernel is missing. For a few
rows (decoding) the first choice is attnlab's own kernel (``layers/cpu_kernels.py``): it reads a bf16 or
int8 weight at its own size on any AVX2 CPU and is width-invariant by construction. Otherwise:

- ``PackedLinear`` (bf16): oneDNN's blocked weight layout (``torch.ops.mkldnn._linear_pointwise``), which
  reads a bf16 weight at close to bandwidth for a handful of rows; fallback ``F.linear`` (in float32 when
  the CPU has no bf16 units: PyTorch's bf16 GEMM is then a scalar loop).
- ``Int8Linear``: ``W ≈ diag(s) · Q`` with ``Q`` int8 and one scale per output row,
  ``s = max|W_row| / 127`` (symmetric, round to nearest). ``y = (x Qᵀ) · s`` is computed by
  ``torch._weight_int8pack_mm`` (bf16 activations) or, as a fallback, by dequantising on the fly.

Neither is trainable and neither appears in a saved checkpoint: a model prepared for decoding is for
inference (``attnlab.inference.fast.prepare_for_decode``).

Shape legend: N rows (tokens), C in features, F out features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.layers import cpu_kernels


def _mkldnn_linear_available() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


_NATIVE_BF16: list[bool] = []


def native_bf16() -> bool:
    """Whether this CPU has bf16 units oneDNN uses (AVX512-BF16/AMX). Without them PyTorch multiplies bf16
    matrices in a scalar loop (~1 GFLOP/s on an AVX2 EPYC core), so wide products are done in float32."""
    if not _NATIVE_BF16:
        try:
            _NATIVE_BF16.append(bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))
        except (AttributeError, RuntimeError):
            _NATIVE_BF16.append(False)
    return _NATIVE_BF16[0]


def wide_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear`` in ``x``'s dtype for many rows (a prompt): in float32 when the CPU has no bf16 units."""
    if x.dtype != torch.bfloat16 or x.device.type != "cpu" or native_bf16():
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: returns (Q int8 (F, C), scales float32 (F,)), W ≈ Q * s[:, None]."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # (F,)
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


@torch.library.custom_op("attnlab::packed_linear", mutates_args=())
def packed_linear(rows: Tensor, weight: Tensor, bias: Tensor | None, out_features: int) -> Tensor:
    """oneDNN's product with a pre-packed bf16 weight, (N, C) -> (N, F), as one opaque operator: inductor
    lowers ``mkldnn._linear_pointwise`` only for weights it packed itself (frozen constants), so a compiled
    decode step (inference/static.py) calls the kernel through this op instead."""
    return torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")


@packed_linear.register_fake
def _(rows: Tensor, weight: Tensor, bias: Tensor | None, out_features: int) -> Tensor:
    return rows.new_empty(rows.shape[0], out_features)


class PackedLinear(nn.Module):
    """A bf16 linear layer whose weight is pre-packed for the CPU's oneDNN kernel (inference only)."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        w = weight.detach().to(torch.bfloat16).contiguous()
        self.packed = False
        self.kernel = w.device.type == "cpu" and cpu_kernels.available()  # a plain bf16 weight for our kernel
        if w.device.type == "cpu" and not self.kernel and _mkldnn_linear_available():
            try:
                w = torch.ops.mkldnn._reorder_linear_weight(w, 1)
                self.packed = True
            except RuntimeError:
                pass
        self.register_buffer("weight", w, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16), persistent=False)

    def forward(self, x: Tensor) -> Tensor:  # (..., C) -> (..., F)
        x = x.to(torch.bfloat16)
        if self.kernel and x.numel() <= cpu_kernels.MAX_ROWS * self.in_features:
            return cpu_kernels.rows_matmul(x, self.weight, None, self.bias)
        if not self.packed:
            return wide_linear(x, self.weight, self.bias)
        rows = x.reshape(-1, self.in_features)
        single = rows.shape[0] == 1
        if single:  # oneDNN runs one row through another kernel than 2+ rows, which rounds differently
            rows = torch.cat([rows, rows])  # (seen with C = 1536): a token's output would depend on the call
        if torch.compiler.is_compiling():  # width, and speculative verification part from plain decoding
            y = packed_linear(rows, self.weight, self.bias, self.out_features)
        else:
            y = torch.ops.mkldnn._linear_pointwise(rows, self.weight, self.bias, "none", [], "")
        return (y[:1] if single else y).view(*x.shape[:-1], self.out_features)


# The int8 kernel is a matrix-vector kernel at heart: for a prompt (many rows) dequantising the weight
# once and running a bf16 GEMM is faster.
FUSED_MAX_ROWS = 16


class Int8Linear(nn.Module):
    """Weight-only int8 linear layer: int8 weight, per-output-channel scales, activations in ``act_dtype``."""

    def __init__(self, weight: Tensor, bias: Tensor | None, act_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.act_dtype = act_dtype
        q, scales = quantize_int8(weight)
        self.register_buffer("qweight", q, persistent=False)  # (F, C) int8
        self.register_buffer("scales", scales.to(act_dtype), persistent=False)  # (F,)
        self.register_buffer("scales32", scales, persistent=False)  # float32, for attnlab's kernel
        self.register_buffer("bias", None if bias is None else bias.detach().to(act_dtype), persistent=False)
        self.kernel = q.device.type == "cpu" and cpu_kernels.available()
        self.fused_kernel = (q.device.type == "cpu" and act_dtype == torch.bfloat16
                             and hasattr(torch, "_weight_int8pack_mm"))

    def dequantized(self) -> Tensor:
        return self.qweight.to(self.act_dtype) * self.scales[:, None]

    def forward(self, x: Tensor) -> Tensor:  # (..., C) -> (..., F)
        x = x.to(self.act_dtype)
        rows = x.reshape(-1, self.in_features).contiguous()
        if self.kernel and rows.shape[0] <= cpu_kernels.MAX_ROWS:
            return cpu_kernels.rows_matmul(x, self.qweight, self.scales32, self.bias)
        if self.fused_kernel and rows.shape[0] <= FUSED_MAX_ROWS:
            y = torch._weight_int8pack_mm(rows, self.qweight, self.scales)  # (N, F)
        else:
            y = wide_linear(rows, self.dequantized(), None)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)
