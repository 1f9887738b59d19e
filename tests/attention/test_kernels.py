"""The kernel registry (attention/kernels.py): a plain dict holding every kernel a config can name."""

from __future__ import annotations

import pytest
import torch

from attnlab.attention import flash, kernels, naive, ring, sdpa, slots
from attnlab.config import ATTENTION_KERNELS, ModelConfig


def test_registry_holds_exactly_the_kernels_a_config_can_name_and_the_static_slot_kernel():
    """Every name ModelConfig accepts builds (no kernel registered by import side effect is missing); the
    one other kernel is the static-shape decode step's, which a cache names (never a config)."""
    assert sorted(kernels.KERNELS) == sorted([*ATTENTION_KERNELS, "static_slots"])
    assert kernels.KERNELS == {"naive": naive.naive_attention, "sdpa": sdpa.sdpa_attention,
                               "flash": flash.flash_kernel, "ring": ring.ring_kernel,
                               "static_slots": slots.static_slots_attention}
    for name in ATTENTION_KERNELS:
        assert kernels.get_kernel(name) is kernels.KERNELS[name]
    with pytest.raises(ValueError, match="attention_kernel"):
        ModelConfig(attention_kernel="static_slots")


def test_register_kernel_inserts_into_the_dict(monkeypatch):
    monkeypatch.setattr(kernels, "KERNELS", dict(kernels.KERNELS))  # leave the real registry untouched

    @kernels.register_kernel("double")
    def double(q, k, v, *, causal=False, mask=None, scale=None):
        return naive.naive_attention(q, k, v, causal=causal, mask=mask, scale=scale)

    q = torch.randn(1, 2, 3, 4)
    assert kernels.get_kernel("double") is double
    torch.testing.assert_close(kernels.get_kernel("double")(q, q, q)[0], naive.naive_attention(q, q, q)[0])


def test_unknown_kernel_names_the_choices():
    with pytest.raises(ValueError, match=r"'nope' is not available; choose one of: \['flash', 'naive', 'ring', 'sdpa', 'static_slots'\]"):
        kernels.get_kernel("nope")
