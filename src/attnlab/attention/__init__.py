"""Attention: what is computed (``mha``) and how (``kernels``: naive, sdpa, flash, ...)."""

from attnlab.attention.kernels import KERNELS, get_kernel, naive_attention, register_kernel, sdpa_attention
from attnlab.attention.mha import MultiHeadAttention

__all__ = [
    "KERNELS",
    "MultiHeadAttention",
    "get_kernel",
    "naive_attention",
    "register_kernel",
    "sdpa_attention",
]
