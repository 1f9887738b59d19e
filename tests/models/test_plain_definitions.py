"""Model definitions are plain (issue 26, move 5): every linear layer of a freshly built model is exactly
``nn.Linear``, attention and FFN carry no decode-only attribute, and only ``prepare_for_decode`` swaps in
decode modules."""

from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.attention.mha import MultiHeadAttention
from attnlab.inference.fused import FusedSelfAttention, FusedSwiGLU
from attnlab.layers.ffn import FFN
from attnlab.layers.kernel_linear import KernelLinear

CONFIGS = {
    "decoder": dict(family="decoder"),
    "infini": dict(family="decoder", attention_mechanism="infini", segment_len=8),
    "encoder": dict(family="encoder"),
    "seq2seq": dict(family="seq2seq"),
    "rwkv4": dict(family="rwkv", rwkv_version=4),
    "rwkv7": dict(family="rwkv", rwkv_version=7),
}


def build(name: str) -> torch.nn.Module:
    kw = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32, **CONFIGS[name])
    if kw["family"] == "rwkv":
        kw.pop("n_heads")
    return attnlab.build_model(attnlab.ModelConfig(**kw))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_linear_of_a_built_model_is_a_plain_nn_linear(name):
    model = build(name)
    kinds = {type(m) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert kinds == {torch.nn.Linear}, kinds
    for m in model.modules():
        if isinstance(m, MultiHeadAttention | FFN):
            assert not {"qkv_proj", "gate_up"} & (set(vars(m)) | set(m._modules)), type(m)


def test_prepare_for_decode_is_what_swaps_in_decode_modules():
    model = attnlab.prepare_for_decode(build("decoder"))
    attn, ffn = model.blocks[0].attn, model.blocks[0].ffn
    assert isinstance(attn, FusedSelfAttention) and isinstance(ffn, FusedSwiGLU)
    assert {type(m) for m in model.modules() if isinstance(m, torch.nn.Linear)} == {KernelLinear}
