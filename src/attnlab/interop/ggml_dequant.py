"""ggml's tensor types decoded to float32 with vectorised PyTorch operations, straight from the stored bytes.

Each block type stores ``block`` values in ``size`` bytes: a float16 scale ``d`` (and for the ``_1`` and K
types a float16 minimum ``m`` or ``dmin``) and packed integer quants ``q``; a value is ``d * q`` (``_0``:
q centred by subtracting 8 or 16), ``d * q + m`` (``_1``) or, for the K types, ``d * sc * q - dmin * mn``
with 6-bit sub-block scales ``sc``/``mn`` (Q4_K, Q5_K) or int8 ones (Q6_K). The operations and their order
follow ggml's reference C code (and the ``gguf`` package, its NumPy port), so the float32 results are
bit-identical to both (tests/interop/test_gguf_fast.py checks every type on random blocks).

A whole tensor is decoded at once as a (blocks, bytes) uint8 matrix: no Python loop over rows or blocks.
Types not listed in ``DEQUANTIZERS`` fall back to the ``gguf`` package (slow but complete).

Shape legend: N blocks, B bytes per block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from attnlab.layers import qblocks

QK_K = 256  # values per K-quant super-block


def _as(data: Tensor, dtype: torch.dtype) -> Tensor:
    """uint8 bytes reinterpreted as ``dtype`` along the last dimension (copied first when unaligned)."""
    data = data.contiguous()
    if data.storage_offset() % dtype.itemsize:
        data = data.clone()
    return data.view(dtype)


def _f16(blocks: Tensor, start: int) -> Tensor:
    """The float16 at byte ``start`` of each block, as float32 (N, 1)."""
    return _as(blocks[:, start:start + 2], torch.float16).float()


def _nibbles(qs: Tensor, group: int) -> Tensor:
    """(N, k*group) packed bytes -> (N, k, 2, group): low nibbles of a group of bytes, then the high ones."""
    n = qs.shape[0]
    qs = qs.reshape(n, -1, 1, group)
    return torch.cat([qs & 0x0F, qs >> 4], dim=2)


def _high_bits(qh: Tensor, count: int) -> Tensor:
    """(N, 4) bytes of a little-endian u32 -> (N, count) its bits 0..count-1 as uint8 0/1."""
    word = _as(qh, torch.int32)  # (N, 1); bit 31 may be the sign: shifts below stay in range
    shifts = torch.arange(count, dtype=torch.int32)
    return ((word >> shifts) & 1).to(torch.uint8)


def _q5_0(b: Tensor) -> Tensor:
    d = _f16(b, 0)
    high = _high_bits(b[:, 2:6], 32)
    low = _nibbles(b[:, 6:], 16).reshape(b.shape[0], 32)
    q = (low | (high << 4)).to(torch.int8) - 16
    return d * q.float()


def _q5_1(b: Tensor) -> Tensor:
    d, m = _f16(b, 0), _f16(b, 2)
    high = _high_bits(b[:, 4:8], 32)
    low = _nibbles(b[:, 8:], 16).reshape(b.shape[0], 32)
    return d * (low | (high << 4)).float() + m


def _k_scales(scales: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit minimums per super-block, (N, 8) each."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _q5_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scales(b[:, 4:16])
    scale = (d * sc.float()).reshape(n, 8, 1)
    low = (dmin * mn.float()).reshape(n, 8, 1)
    qh = b[:, 16:48].reshape(n, 1, 32) >> torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)  # (N, 8, 32)
    ql = _nibbles(b[:, 48:], 32).reshape(n, 8, 32)
    q = (ql | ((qh & 1) << 4)).float()
    return (scale * q - low).reshape(n, QK_K)


def _q6_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    scales = _as(b[:, 192:208], torch.int8).float()  # (N, 16)
    d = _f16(b, 208)
    scale = (d * scales).reshape(n, 16, 1)
    low = _nibbles(ql, 64).reshape(n, 8, 32)  # (N, 2 halves, 2, 64) -> 8 groups of 32
    high = (qh.reshape(n, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)) & 3
    q = (low | (high.reshape(n, 8, 32) << 4)).to(torch.int8) - 32
    return (scale * q.reshape(n, 16, 16).float()).reshape(n, QK_K)


def _bf16(b: Tensor) -> Tensor:
    return _as(b, torch.bfloat16).float()


def _f16_values(b: Tensor) -> Tensor:
    return _as(b, torch.float16).float()


def _f32(b: Tensor) -> Tensor:
    return _as(b, torch.float32).clone()  # a copy: never a view of the file


def _stored_format(fmt: qblocks.BlockFormat) -> Callable[[Tensor], Tensor]:
    """The formats attnlab also multiplies as stored are decoded by their one owner, ``layers/qblocks.py``."""
    return lambda b: qblocks.dequantize(b, fmt)  # (N, B): N rows of one block each -> (N, block)


# ggml type id -> (N, B) uint8 blocks -> (N, values per block) float32
DEQUANTIZERS: dict[int, Callable[[Tensor], Tensor]] = {
    0: _f32, 1: _f16_values, 30: _bf16, 6: _q5_0, 7: _q5_1, 13: _q5_k, 14: _q6_k,
    **{f.ggml_type: _stored_format(f) for f in qblocks.FORMATS.values()},
}


def dequantize_blocks(data: Tensor, ggml_type: int, block_bytes: int) -> Tensor:
    """Stored bytes (any shape, uint8, a multiple of ``block_bytes``) -> float32 values (1-D, in order)."""
    blocks = data.reshape(-1, block_bytes)  # (N, B)
    return DEQUANTIZERS[ggml_type](blocks).reshape(-1)
