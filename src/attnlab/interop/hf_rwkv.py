"""Hugging Face ``RwkvForCausalLM`` (RWKV-4) directories -> attnlab's RWKV family: one name table, a plain copy
(attnlab's parameter names mirror HF's)."""

from __future__ import annotations

from attnlab.config import ModelConfig

_ATT = ("time_decay", "time_first", "time_mix_key", "time_mix_value", "time_mix_receptance", "key.weight",
        "value.weight", "receptance.weight", "output.weight")
_FFN = ("time_mix_key", "time_mix_receptance", "key.weight", "receptance.weight", "value.weight")

RWKV_NAMES: dict[str, str] = {
    "rwkv.embeddings.weight": "embed.weight",
    "rwkv.blocks.0.pre_ln.weight": "pre_ln.weight",
    "rwkv.blocks.0.pre_ln.bias": "pre_ln.bias",
    "rwkv.ln_out.weight": "ln_out.weight",
    "rwkv.ln_out.bias": "ln_out.bias",
    "head.weight": "lm_head.weight",
    **{f"rwkv.blocks.{{i}}.{ln}.{p}": f"blocks.{{i}}.{ln}.{p}" for ln in ("ln1", "ln2") for p in ("weight", "bias")},
    **{f"rwkv.blocks.{{i}}.attention.{n}": f"blocks.{{i}}.attention.{n}" for n in _ATT},
    **{f"rwkv.blocks.{{i}}.feed_forward.{n}": f"blocks.{{i}}.feed_forward.{n}" for n in _FFN},
}


def rwkv_config(hf: dict, model_type: str, keys: set[str]) -> ModelConfig:
    d = int(hf["hidden_size"])
    att = hf.get("attention_hidden_size") or d
    if int(att) != d:
        raise ValueError(f"attention_hidden_size={att} differs from hidden_size={d}: not supported by attnlab's RWKV")
    eps = float(hf.get("layer_norm_epsilon", 1e-5))
    if eps != 1e-5:  # HF's final LayerNorm always uses 1e-5: one eps for every norm keeps parity exact
        raise ValueError(f"layer_norm_epsilon={eps} is not supported (attnlab's RWKV uses 1e-5 throughout)")
    return ModelConfig(
        family="rwkv", rwkv_version=4, vocab_size=int(hf["vocab_size"]), d_model=d,
        n_layers=int(hf["num_hidden_layers"]), n_heads=1, d_ff=int(hf.get("intermediate_size") or 4 * d),
        norm="layer", norm_eps=eps, position="none", max_seq_len=int(hf.get("context_length", 1024)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
    )


FAMILIES = {"rwkv": (rwkv_config, RWKV_NAMES)}
