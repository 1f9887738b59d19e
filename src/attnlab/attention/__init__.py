"""Attention: what is computed (``mha``) and how (``kernels``: naive, sdpa, flash, ring), the tile engine
shared by flash and ring (``tiles``), the masks the kernels share (``masks``) and the log-sum-exp merge of
partial results (``merge``)."""

from attnlab.attention.flash import flash_attention
from attnlab.attention.kernels import KERNELS, get_kernel, register_kernel
from attnlab.attention.merge import merge_partials
from attnlab.attention.mha import MultiHeadAttention
from attnlab.attention.naive import naive_attention
from attnlab.attention.ring import ring_attention
from attnlab.attention.sdpa import sdpa_attention

__all__ = [
    "KERNELS",
    "MultiHeadAttention",
    "flash_attention",
    "get_kernel",
    "merge_partials",
    "naive_attention",
    "register_kernel",
    "ring_attention",
    "sdpa_attention",
]
