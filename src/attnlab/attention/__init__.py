"""Attention: what is computed (``mha``) and how (``kernels``: naive, sdpa, flash, ...)."""

from attnlab.attention.flash import flash_attention
from attnlab.attention.kernels import KERNELS, get_kernel, naive_attention, register_kernel, sdpa_attention
from attnlab.attention.merge import merge_partials
from attnlab.attention.mha import MultiHeadAttention

__all__ = [
    "KERNELS",
    "MultiHeadAttention",
    "flash_attention",
    "get_kernel",
    "merge_partials",
    "naive_attention",
    "register_kernel",
    "sdpa_attention",
]
