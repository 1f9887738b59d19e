"""attention_probabilities reproduces a layer's own output: probabilities @ V through o_proj == the layer's
forward, for causal GQA self-attention with RoPE (plain and fused-QKV) and for cross-attention."""

from __future__ import annotations

import torch

from attnlab.attention.probabilities import attention_probabilities
from attnlab.config import ModelConfig
from attnlab.inference.fused import FusedSelfAttention
from attnlab.models import build_model


def _check(layer, model, run) -> int:
    seen = []

    def hook(mod, args, kwargs, output):
        memory = kwargs.get("memory")
        p = attention_probabilities(mod, args[0], memory=memory, rope=kwargs.get("rope"),
                                    key_mask=kwargs.get("key_mask"))  # (B, H, T, S)
        _, v = mod.project_kv(args[0] if memory is None else memory)  # (B, K, S, D)
        v = v.repeat_interleave(mod.n_heads // mod.n_kv_heads, dim=1)
        out = (p @ v).transpose(1, 2).flatten(2)  # (B, T, H*D)
        o_proj = mod.attn.o_proj if isinstance(mod, FusedSelfAttention) else mod.o_proj
        torch.testing.assert_close(o_proj(out), output, rtol=1e-5, atol=1e-5)
        seen.append(p.shape)

    handle = layer.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return len(seen)


def test_self_attention_probabilities_give_the_layer_output():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16, position="rope")
    model = build_model(cfg).eval()
    ids = torch.randint(0, 50, (2, 9))
    assert _check(model.blocks[1].attn, model, lambda: model(ids)) == 1
    model.blocks[1].attn = FusedSelfAttention(model.blocks[1].attn)  # no q_proj any more
    assert _check(model.blocks[1].attn, model, lambda: model(ids)) == 1


def test_cross_attention_probabilities_give_the_layer_output():
    torch.manual_seed(0)
    cfg = ModelConfig(family="seq2seq", vocab_size=40, d_model=32, n_layers=2, n_heads=4,
                      max_seq_len=16, position="sinusoidal")
    model = build_model(cfg).eval()
    src, tgt = torch.randint(0, 40, (2, 7)), torch.randint(0, 40, (2, 5))
    assert _check(model.decoder.blocks[-1].cross_attn, model, lambda: model(tgt, encoder_input_ids=src)) == 1
