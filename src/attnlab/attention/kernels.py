"""Attention kernels: *how* attention is computed, kept apart from *what* it computes (mha.py).

Every kernel has one signature::

    kernel(q, k, v, *, causal: bool, mask: BoolTensor | None, scale: float | None) -> (out, lse)

Shapes: q (B, H, Tq, D); k, v (B, K, Tk, D) with H a multiple of K (GQA/MQA: no copy of K/V is made);
mask (B, Tk) is a *key padding* mask, True where a key may be attended; out (B, H, Tq, D);
lse (B, H, Tq) float32, the log-sum-exp of each row's scaled scores (-inf for a row with no key), or
None for a kernel that cannot expose it (sdpa).

Causal masking with Tq < Tk is bottom-right aligned: query i sits at absolute position Tk - Tq + i,
which is what a decode step over a KV cache needs. A row with no key to attend to gives zeros, not NaN.
(masks.py holds the shape checks and masks the kernels share.)

One kernel extends the signature: ``"static_slots"`` (slots.py), the static-shape decode step's kernel,
takes k/v as every slot of a preallocated cache and a (B, Tq, Tk) *per-query* mask that already holds
causality; it is chosen by the cache that needs it (``cache.attention_kernel``, attention/mha.py), never by
``ModelConfig.attention_kernel``.

The registry is the plain dict ``KERNELS`` below, name -> kernel function, filled from the modules that
define the kernels; ``ModelConfig.attention_kernel`` names one of its keys. The imports point one way:
this module imports the kernels, no kernel module imports this one. To add a kernel from outside the
package, insert it into the dict, directly or with the ``register_kernel(name)`` decorator.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from attnlab.attention.flash import flash_kernel
from attnlab.attention.naive import naive_attention
from attnlab.attention.ring import ring_kernel
from attnlab.attention.sdpa import sdpa_attention
from attnlab.attention.slots import static_slots_attention

__all__ = ["KERNELS", "Kernel", "get_kernel", "naive_attention", "register_kernel", "sdpa_attention"]

Kernel = Callable[..., tuple[Tensor, Tensor | None]]

KERNELS: dict[str, Kernel] = {
    "naive": naive_attention,  # naive.py: the readable reference, materialises the scores
    "sdpa": sdpa_attention,  # sdpa.py: PyTorch's fused scaled_dot_product_attention (no lse)
    "flash": flash_kernel,  # flash.py: tiled online softmax (tiles.py), O(T) memory, exact backward
    "ring": ring_kernel,  # ring.py: the sequence sharded over torch.distributed ranks
    "static_slots": static_slots_attention,  # slots.py: decode queries over every slot of a static cache
}


def register_kernel(name: str) -> Callable[[Kernel], Kernel]:
    """Decorator inserting ``fn`` into ``KERNELS`` under ``name`` (replacing any kernel of that name)."""
    def wrap(fn: Kernel) -> Kernel:
        KERNELS[name] = fn
        return fn

    return wrap


def get_kernel(name: str) -> Kernel:
    """The kernel called ``name``; ValueError listing the available names if there is none."""
    if name not in KERNELS:
        raise ValueError(f"attention kernel {name!r} is not available; choose one of: {sorted(KERNELS)}")
    return KERNELS[name]
