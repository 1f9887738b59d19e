"""GGUF block-quantised weights run as stored: Q8_0, Q4_0, Q4_1 and Q4_K, with integer dot products.

A weight (F, C) is cut along each row into blocks of QK in-features (QK = 32; 256 for Q4_K); each block
holds its own scale (and offset), so one outlier spoils only its block. The bytes are exactly GGUF's, row
after row, kept in one uint8 tensor (F, C / QK * block_bytes) — a tensor read from a GGUF file is used as
it is, never dequantised and requantised:

======  =====  ===========  ===============================================================================
format  QK     bytes/block  layout (little-endian) and value of element i
======  =====  ===========  ===============================================================================
Q8_0    32     34 (8.5 b/w)  fp16 d, 32 int8 q;                     w_i = d * q_i
Q4_0    32     18 (4.5 b/w)  fp16 d, 16 bytes: q_i low nibble of byte i, q_{i+16} its high nibble;
                             w_i = d * (q_i - 8)
Q4_1    32     20 (5.0 b/w)  fp16 d, fp16 m, 16 bytes of nibbles as Q4_0;  w_i = d * q_i + m
Q4_K    256    144 (4.5 b/w) fp16 d, fp16 dmin, 12 bytes packing 8 six-bit scales sc_j and mins mn_j,
                             128 bytes: 4 chunks of 32, sub-block 2c in chunk c's low nibbles, 2c+1 in its
                             high ones;  w = d * sc_j * q - dmin * mn_j  in sub-block j (32 elements)
======  =====  ===========  ===============================================================================

Q4_K's 12 scale bytes s: for j < 4, sc_j = s[j] & 63 and mn_j = s[j+4] & 63; for j >= 4 the low 4 bits
come from s[j+4] (sc: low nibble, mn: high nibble) and the top 2 bits from s[j-4] >> 6 (sc) and s[j] >> 6 (mn).

The product (``layers/cpu_kernels.qmatmul``, ``csrc/qblocks.cpp``) quantises each row of activations per
block of 32 to int8 (d_x = max|x| / 127, q_x = round(x / d_x), ties to even), sums the 32 integer products
of a block in int32 and scales the sum once: y = Σ_blocks d_w d_x Σ q_w q_x (+ m d_x Σ q_x for the offset
formats). :func:`quantize_activations` is the same quantisation in PyTorch, bit for bit, and the portable
path (``BlockLinear`` without the kernels) computes the same product in float32 from the dequantised blocks.

Quantising a float weight: Q8_0, Q4_0 and Q4_1 follow ggml's reference rules (round half away from zero for
Q8_0; the signed largest value maps to -8 for Q4_0; min/max for Q4_1), so they give the bytes llama.cpp's
reference quantiser (and the ``gguf`` package) give. Q4_K uses plain per-sub-block min/max scales rounded
to 6 bits — not llama.cpp's iterative search — so a model quantised here to Q4_K is a little worse than
llama.cpp's file of the same model; a Q4_K GGUF tensor is of course read as is.

Shape legend: F out features (rows), C in features, N activation rows, QK block length.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.layers import cpu_kernels


@dataclass(frozen=True)
class BlockFormat:
    """One GGUF block format: its name, ggml type number, elements and bytes per block."""

    name: str
    ggml_type: int
    block: int
    block_bytes: int

    def row_bytes(self, in_features: int) -> int:
        self.check(in_features)
        return in_features // self.block * self.block_bytes

    def check(self, in_features: int) -> None:
        if in_features <= 0 or in_features % self.block:
            raise ValueError(f"{self.name.upper()} needs in-features that are a positive multiple of {self.block} "
                             f"(blocks of {self.block}, as GGUF stores them); got {in_features}. Use a format with "
                             f"smaller blocks, or keep this layer in float/int8")


Q8_0 = BlockFormat("q8_0", 8, 32, 34)
Q4_0 = BlockFormat("q4_0", 2, 32, 18)
Q4_1 = BlockFormat("q4_1", 3, 32, 20)
Q4_K = BlockFormat("q4_k", 12, 256, 144)
FORMATS: dict[str, BlockFormat] = {f.name: f for f in (Q8_0, Q4_0, Q4_1, Q4_K)}
BY_GGML_TYPE: dict[int, BlockFormat] = {f.ggml_type: f for f in FORMATS.values()}


def block_format(fmt: str | int | BlockFormat) -> BlockFormat:
    """A format from its name (``"q4_k"``), its ggml type number (12, or a ``gguf.GGMLQuantizationType``)."""
    if isinstance(fmt, BlockFormat):
        return fmt
    found = FORMATS.get(fmt.lower()) if isinstance(fmt, str) else BY_GGML_TYPE.get(int(fmt))
    if found is None:
        raise ValueError(f"block format {fmt!r} is not supported; choose one of: {', '.join(FORMATS)} "
                         f"(ggml types {', '.join(str(f.ggml_type) for f in FORMATS.values())})")
    return found


def format_for(name: str, in_features: int) -> BlockFormat | None:
    """The format a layer with ``in_features`` gets when a model is quantised to ``name``: the format itself
    when whole blocks fit, Q4_1 for ``"q4_k"`` when 256 does not divide the in-features but 32 does (Q4_K's
    blocks are 256 long; llama.cpp falls back likewise), None when not even blocks of 32 fit."""
    fmt = block_format(name)
    if in_features % fmt.block == 0:
        return fmt
    if fmt is Q4_K and in_features % Q4_1.block == 0:
        return Q4_1
    return None


def quantize_linear(linear: nn.Linear, name: str, act_dtype: torch.dtype = torch.float32) -> nn.Module:
    """``linear`` as a :class:`BlockLinear` of the format :func:`format_for` gives (``prepare_for_decode``'s
    int8 / q8_0 / q4_* precisions); a layer whose in-features hold no whole block of 32 becomes per-row int8
    (``layers/quant.Int8Linear`` with ``act_dtype`` activations) instead. A BlockLinear answers in its input's
    dtype."""
    fmt = format_for(name, linear.in_features)
    if fmt is None:
        from attnlab.layers.quant import Int8Linear

        return Int8Linear(linear.weight, linear.bias, act_dtype)
    return BlockLinear.from_float(linear.weight, linear.bias, fmt)


# ---- fp16 fields and nibbles ---------------------------------------------------------------------------------

def _f16_bytes(v: Tensor) -> Tensor:  # (...,) float -> (..., 2) uint8, little-endian fp16
    return v.to(torch.float16).contiguous().view(torch.uint8).reshape(*v.shape, 2)


def _f16(b: Tensor) -> Tensor:  # (..., 2) uint8 -> (...,) float32
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _pack_nibbles(q: Tensor) -> Tensor:  # (..., 32) uint8 in 0..15 -> (..., 16): q_i | q_{i+16} << 4
    return q[..., :16] | (q[..., 16:] << 4)


def _unpack_nibbles(b: Tensor) -> Tensor:  # (..., 16) uint8 -> (..., 32)
    return torch.cat([b & 0x0F, b >> 4], dim=-1)


def _round_half_away(v: Tensor) -> Tensor:
    """Round to nearest, ties away from zero (C's roundf), exactly: |v| - floor(|v|) is exact in float."""
    a = v.abs()
    whole = a.floor()
    return torch.sign(v) * (whole + (a - whole >= 0.5).to(v.dtype))


# ---- quantising float weights ------------------------------------------------------------------------------

def quantize(weight: Tensor, fmt: str | int | BlockFormat) -> Tensor:
    """Float weight (F, C) -> GGUF blocks uint8 (F, C / QK * block_bytes) of ``fmt`` (see the module doc)."""
    fmt = block_format(fmt)
    if weight.dim() != 2:
        raise ValueError(f"quantize expects a 2-d weight (out, in); got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    fmt.check(cols)
    w = weight.detach().to(device="cpu", dtype=torch.float32).reshape(rows, cols // 32, 32)  # (F, C/32, 32)
    if fmt is Q8_0:
        d = w.abs().amax(-1) / 127  # (F, C/32)
        inv = torch.where(d == 0, 0.0, 1.0 / d)
        q = _round_half_away(w * inv[..., None]).to(torch.int8).view(torch.uint8)
        out = torch.cat([_f16_bytes(d), q], dim=-1)
    elif fmt is Q4_0:
        idx = w.abs().argmax(-1, keepdim=True)
        d = w.gather(-1, idx).squeeze(-1) / -8  # the signed extreme maps to -8
        inv = torch.where(d == 0, 0.0, 1.0 / d)
        q = torch.trunc(w * inv[..., None] + 8.5).clamp(0, 15).to(torch.uint8)
        out = torch.cat([_f16_bytes(d), _pack_nibbles(q)], dim=-1)
    elif fmt is Q4_1:
        lo, hi = w.amin(-1), w.amax(-1)
        d = (hi - lo) / 15
        inv = torch.where(d == 0, 0.0, 1.0 / d)
        q = torch.trunc((w - lo[..., None]) * inv[..., None] + 0.5).clamp(0, 15).to(torch.uint8)
        out = torch.cat([_f16_bytes(d), _f16_bytes(lo), _pack_nibbles(q)], dim=-1)
    else:
        out = _quantize_q4_k(w.reshape(rows, cols // 256, 8, 32))
    return out.reshape(rows, -1).contiguous()


def _quantize_q4_k(w: Tensor) -> Tensor:
    """(F, C/256, 8, 32) float32 -> (F, C/256, 144) uint8: per sub-block min/max, 6-bit scales and mins."""
    lo = w.amin(-1).clamp(max=0)  # (F, S, 8); a non-negative sub-block keeps offset 0
    scale = (w.amax(-1) - lo) / 15
    d = scale.amax(-1) / 63  # (F, S)
    dmin = (-lo).amax(-1) / 63
    d16, dmin16 = d.to(torch.float16).float(), dmin.to(torch.float16).float()
    sc = torch.where(d16[..., None] == 0, 0.0, scale / d16[..., None]).round().clamp(0, 63)
    mn = torch.where(dmin16[..., None] == 0, 0.0, -lo / dmin16[..., None]).round().clamp(0, 63)
    step, offset = d16[..., None] * sc, dmin16[..., None] * mn  # the scale and offset as stored
    q = torch.where(step[..., None] == 0, 0.0, (w + offset[..., None]) / step[..., None])
    q = q.round().clamp(0, 15).to(torch.uint8)  # (F, S, 8, 32)
    sc, mn = sc.to(torch.uint8), mn.to(torch.uint8)
    scales = torch.cat([sc[..., :4] | ((sc[..., 4:] >> 4) << 6), mn[..., :4] | ((mn[..., 4:] >> 4) << 6),
                        (sc[..., 4:] & 0x0F) | ((mn[..., 4:] & 0x0F) << 4)], dim=-1)  # (F, S, 12)
    qs = (q[..., 0::2, :] | (q[..., 1::2, :] << 4)).flatten(-2)  # (F, S, 128)
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), scales, qs], dim=-1)


def _q4_k_scales(s: Tensor) -> tuple[Tensor, Tensor]:  # (..., 12) uint8 -> sc, mn (..., 8) float32
    sc = torch.cat([s[..., :4] & 63, (s[..., 8:] & 0x0F) | ((s[..., :4] >> 6) << 4)], dim=-1)
    mn = torch.cat([s[..., 4:8] & 63, (s[..., 8:] >> 4) | ((s[..., 4:8] >> 6) << 4)], dim=-1)
    return sc.float(), mn.float()


def dequantize(blocks: Tensor, fmt: str | int | BlockFormat) -> Tensor:
    """GGUF blocks uint8 (F, row_bytes) -> float32 weight (F, C): the reference every path is tested against."""
    fmt = block_format(fmt)
    rows = blocks.shape[0]
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] % fmt.block_bytes:
        raise ValueError(f"{fmt.name} blocks must be uint8 (rows, k * {fmt.block_bytes}); got "
                         f"{blocks.dtype} {tuple(blocks.shape)}")
    b = blocks.reshape(rows, -1, fmt.block_bytes)  # (F, C/QK, bytes)
    if fmt is Q8_0:
        w = _f16(b[..., :2])[..., None] * b[..., 2:].view(torch.int8).float()
    elif fmt is Q4_0:
        w = _f16(b[..., :2])[..., None] * (_unpack_nibbles(b[..., 2:]).float() - 8)
    elif fmt is Q4_1:
        w = _f16(b[..., :2])[..., None] * _unpack_nibbles(b[..., 4:]).float() + _f16(b[..., 2:4])[..., None]
    else:
        sc, mn = _q4_k_scales(b[..., 4:16])  # (F, S, 8)
        qs = b[..., 16:].reshape(rows, -1, 4, 1, 32)
        q = torch.cat([qs & 0x0F, qs >> 4], dim=-2).reshape(rows, -1, 8, 32).float()  # sub-blocks 2c, 2c+1
        w = (_f16(b[..., :2])[..., None] * sc)[..., None] * q - (_f16(b[..., 2:4])[..., None] * mn)[..., None]
    return w.reshape(rows, -1)


def from_gguf_bytes(data: Any, shape: tuple[int, int], ggml_type: int) -> Tensor:
    """A GGUF tensor's raw bytes (a numpy array or uint8 tensor, e.g. ``GGUFReader``'s ``tensor.data``) as
    blocks uint8 (F, row_bytes), sharing memory with ``data`` (no copy when it is contiguous).
    ``shape`` is PyTorch's (out, in) = (F, C): the reverse of ggml's ``ne`` order that ``tensor.shape`` gives."""
    fmt = block_format(ggml_type)
    rows, cols = (int(n) for n in shape)
    row_bytes = fmt.row_bytes(cols)
    if isinstance(data, np.ndarray):
        with warnings.catch_warnings():  # a read-only memory map: we never write to it
            warnings.simplefilter("ignore", UserWarning)
            data = torch.from_numpy(np.ascontiguousarray(data).view(np.uint8))
    if data.dtype != torch.uint8 or data.numel() != rows * row_bytes:
        raise ValueError(f"a {fmt.name.upper()} tensor of shape ({rows}, {cols}) holds {rows * row_bytes} bytes; "
                         f"got {data.numel()} elements of {data.dtype}")
    return data.reshape(rows, row_bytes)


def quantize_activations(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Rows (N, C) -> (q int8 (N, C), d float32 (N, C/32), sums of q int32 (N, C/32)), per block of 32:
    d = max|x| / 127, q = round(x * (1 / d)) with ties to even — bit for bit what the kernel does."""
    rows, cols = x.shape
    xb = x.float().reshape(rows, cols // 32, 32)
    d = xb.abs().amax(-1) / 127
    inv = torch.where(d == 0, 0.0, 1.0 / d)
    q = torch.round(xb * inv[..., None])
    return q.to(torch.int8).reshape(rows, cols), d, q.sum(-1).to(torch.int32)


def portable_matmul(x: Tensor, blocks: Tensor, fmt: BlockFormat, bias: Tensor | None) -> Tensor:
    """The kernel's product in PyTorch (float32 accumulation): activations quantised exactly as the kernel
    does, the weight dequantised for the call. (N, C) -> (N, F) float32."""
    q, d, _ = quantize_activations(x)
    xq = (q.float().reshape(q.shape[0], -1, 32) * d[..., None]).reshape(q.shape)
    return F.linear(xq, dequantize(blocks, fmt), None if bias is None else bias.float())


class BlockLinear(nn.Module):
    """A linear layer whose weight stays in a GGUF block format (inference only, not trainable).

    The forward runs ``cpu_kernels.qmatmul`` (integer dot products, any number of rows; width-invariant)
    where the kernels are available when the layer is made, else :func:`portable_matmul`.
    """

    def __init__(self, blocks: Tensor, fmt: str | int | BlockFormat, in_features: int,
                 bias: Tensor | None = None) -> None:
        super().__init__()
        self.fmt = block_format(fmt)
        self.in_features, self.out_features = in_features, blocks.shape[0]
        if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != self.fmt.row_bytes(in_features):
            raise ValueError(f"{self.fmt.name} blocks for {in_features} in-features must be uint8 "
                             f"(out, {self.fmt.row_bytes(in_features)}); got {blocks.dtype} {tuple(blocks.shape)}")
        self.register_buffer("blocks", blocks, persistent=False)  # (F, row_bytes) uint8
        self.register_buffer("bias", None if bias is None else bias.detach().float(), persistent=False)
        self.kernel = blocks.device.type == "cpu" and cpu_kernels.available()

    @classmethod
    def from_float(cls, weight: Tensor, bias: Tensor | None, fmt: str | int | BlockFormat) -> BlockLinear:
        """Quantise a float weight (F, C) to ``fmt``."""
        return cls(quantize(weight, fmt), fmt, weight.shape[1], bias)

    @classmethod
    def from_gguf(cls, data: Any, shape: tuple[int, int], ggml_type: int, bias: Tensor | None = None) -> BlockLinear:
        """A GGUF tensor's bytes used as stored (see :func:`from_gguf_bytes`); ``shape`` is (out, in)."""
        return cls(from_gguf_bytes(data, shape, ggml_type), ggml_type, int(shape[1]), bias)

    def dequantized(self) -> Tensor:  # (F, C) float32
        return dequantize(self.blocks, self.fmt)

    def forward(self, x: Tensor) -> Tensor:  # (..., C) -> (..., F) in x's dtype
        if self.kernel:
            return cpu_kernels.qmatmul(x, self.blocks, self.fmt.ggml_type, self.bias)
        rows = x.reshape(-1, self.in_features)
        y = portable_matmul(rows, self.blocks, self.fmt, self.bias)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt.name}, "
                f"bias={self.bias is not None}, kernel={self.kernel}")


class BlockEmbedding(nn.Module):
    """A token embedding whose table stays in a GGUF block format: a lookup dequantises only the rows it
    gathers (B, T) -> (B, T, C) float32. Its ``blocks`` can be shared with a tied :class:`BlockLinear` head,
    so the table is held once, as the file stores it."""

    def __init__(self, blocks: Tensor, fmt: str | int | BlockFormat, embedding_dim: int) -> None:
        super().__init__()
        self.fmt = block_format(fmt)
        self.num_embeddings, self.embedding_dim = blocks.shape[0], embedding_dim
        if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != self.fmt.row_bytes(embedding_dim):
            raise ValueError(f"{self.fmt.name} blocks for a {embedding_dim}-wide embedding must be uint8 "
                             f"(vocab, {self.fmt.row_bytes(embedding_dim)}); got {blocks.dtype} {tuple(blocks.shape)}")
        self.register_buffer("blocks", blocks, persistent=False)  # (V, row_bytes) uint8

    def forward(self, ids: Tensor) -> Tensor:  # (...) int -> (..., C) float32
        rows = dequantize(self.blocks.index_select(0, ids.reshape(-1)), self.fmt)  # (n, C)
        return rows.view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.fmt.name}"
