"""Load local Hugging Face checkpoints (safetensors only) into attnlab models.

One table per family maps HF tensor names to ours; ``{i}`` stands for the layer index. GPT-2's fused,
transposed ``Conv1D`` tensors are split/transposed by the family's ``fuse`` rules. Nothing is unpickled:
a directory holding only ``pytorch_model.bin`` gets an error saying how to convert it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from attnlab.checkpoint import load_state_checked, read_weights
from attnlab.config import ModelConfig
from attnlab.interop import hf_encdec, hf_rwkv

# ----------------------------------------------------------------------------- name tables
LLAMA_NAMES: dict[str, str] = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
    "model.layers.{i}.input_layernorm.weight": "blocks.{i}.attn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blocks.{i}.ffn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blocks.{i}.attn.q_proj.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blocks.{i}.attn.k_proj.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blocks.{i}.attn.v_proj.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blocks.{i}.attn.o_proj.weight",
    "model.layers.{i}.self_attn.q_proj.bias": "blocks.{i}.attn.q_proj.bias",
    "model.layers.{i}.self_attn.k_proj.bias": "blocks.{i}.attn.k_proj.bias",
    "model.layers.{i}.self_attn.v_proj.bias": "blocks.{i}.attn.v_proj.bias",
    "model.layers.{i}.self_attn.o_proj.bias": "blocks.{i}.attn.o_proj.bias",
    "model.layers.{i}.mlp.gate_proj.weight": "blocks.{i}.ffn.gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blocks.{i}.ffn.up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blocks.{i}.ffn.down.weight",
    "model.layers.{i}.mlp.gate_proj.bias": "blocks.{i}.ffn.gate.bias",
    "model.layers.{i}.mlp.up_proj.bias": "blocks.{i}.ffn.up.bias",
    "model.layers.{i}.mlp.down_proj.bias": "blocks.{i}.ffn.down.bias",
}

# GPT-2 stores Linear weights transposed (Conv1D: (in, out)); "T" marks a transpose.
GPT2_NAMES: dict[str, str] = {
    "transformer.wte.weight": "embed.weight",
    "transformer.wpe.weight": "pos_embed.weight",
    "transformer.ln_f.weight": "norm.weight",
    "transformer.ln_f.bias": "norm.bias",
    "lm_head.weight": "lm_head.weight",
    "transformer.h.{i}.ln_1.weight": "blocks.{i}.attn_norm.weight",
    "transformer.h.{i}.ln_1.bias": "blocks.{i}.attn_norm.bias",
    "transformer.h.{i}.ln_2.weight": "blocks.{i}.ffn_norm.weight",
    "transformer.h.{i}.ln_2.bias": "blocks.{i}.ffn_norm.bias",
    "transformer.h.{i}.attn.c_attn.weight": "T:blocks.{i}.attn.{q,k,v}_proj.weight",
    "transformer.h.{i}.attn.c_attn.bias": "blocks.{i}.attn.{q,k,v}_proj.bias",
    "transformer.h.{i}.attn.c_proj.weight": "T:blocks.{i}.attn.o_proj.weight",
    "transformer.h.{i}.attn.c_proj.bias": "blocks.{i}.attn.o_proj.bias",
    "transformer.h.{i}.mlp.c_fc.weight": "T:blocks.{i}.ffn.up.weight",
    "transformer.h.{i}.mlp.c_fc.bias": "blocks.{i}.ffn.up.bias",
    "transformer.h.{i}.mlp.c_proj.weight": "T:blocks.{i}.ffn.down.weight",
    "transformer.h.{i}.mlp.c_proj.bias": "blocks.{i}.ffn.down.bias",
}

# HF tensors that carry no weights (buffers some versions save).
IGNORED = re.compile(r"(\.attn\.(masked_)?bias$|rotary_emb\.inv_freq$|position_ids$)")


# ----------------------------------------------------------------------------- configs
def _rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind not in (None, "default"):
        raise ValueError(f"RoPE scaling type {kind!r} is not supported; only plain RoPE checkpoints load")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _llama_config(hf: dict, model_type: str, keys: set[str]) -> ModelConfig:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act={act!r} is not supported for {model_type} (expected 'silu')")
    heads = hf["num_attention_heads"]
    attn_bias = bool(hf.get("attention_bias", False))
    max_len = int(hf.get("max_position_embeddings", 2048))
    window = hf.get("sliding_window") if hf.get("use_sliding_window", model_type == "mistral") else None
    if window:  # exact only within the window: cap the context there rather than compute something else
        max_len = min(max_len, int(window))
    return ModelConfig(
        family="decoder",
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        d_ff=hf["intermediate_size"],
        ffn="swiglu",
        norm="rms",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        norm_position="pre",
        position="rope",
        rope_theta=_rope_theta(hf),
        max_seq_len=max_len,
        attn_qkv_bias=attn_bias or model_type == "qwen2",
        attn_out_bias=attn_bias,
        ffn_bias=bool(hf.get("mlp_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_kernel="sdpa",
        bos_token_id=_token(hf, "bos_token_id"),
        eos_token_id=_token(hf, "eos_token_id"),
        pad_token_id=_token(hf, "pad_token_id"),
    )


def _gpt2_config(hf: dict, model_type: str, keys: set[str]) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    acts = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
    if act not in acts:
        raise ValueError(f"activation_function={act!r} is not supported for gpt2; supported: {sorted(acts)}")
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise ValueError("GPT-2 checkpoints with non-standard attention scaling are not supported")
    d = hf["n_embd"]
    return ModelConfig(
        family="decoder",
        vocab_size=hf["vocab_size"],
        d_model=d,
        n_layers=hf["n_layer"],
        n_heads=hf["n_head"],
        n_kv_heads=hf["n_head"],
        d_ff=hf.get("n_inner") or 4 * d,
        ffn=acts[act],
        norm="layer",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        norm_position="pre",
        position="learned",
        max_seq_len=hf.get("n_positions", 1024),
        attn_qkv_bias=True,
        attn_out_bias=True,
        ffn_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        attention_kernel="sdpa",
        bos_token_id=_token(hf, "bos_token_id"),
        eos_token_id=_token(hf, "eos_token_id"),
    )


def _token(hf: dict, key: str) -> int | None:
    value = hf.get(key)
    if isinstance(value, list):
        value = value[0] if value else None
    if value is None or not (0 <= int(value) < hf["vocab_size"]):
        return None
    return int(value)


FAMILIES: dict[str, tuple[Callable[[dict, str, set[str]], ModelConfig], dict[str, str]]] = {
    "llama": (_llama_config, LLAMA_NAMES),
    "qwen2": (_llama_config, LLAMA_NAMES),
    "mistral": (_llama_config, LLAMA_NAMES),
    "gpt2": (_gpt2_config, GPT2_NAMES),
    **hf_encdec.FAMILIES,
    **hf_rwkv.FAMILIES,
}


def supported() -> list[str]:
    return sorted(FAMILIES)


# ----------------------------------------------------------------------------- loading
def read_hf_config(directory: Path) -> dict:
    path = directory / "config.json"
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path} must hold a JSON object (a Hugging Face model config), not a {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        arch = hf.get("architectures")
        raise ValueError(
            f"{directory}: unsupported architecture model_type={model_type!r} (architectures={arch}); "
            f"attnlab loads: {', '.join(supported())}"
        )
    _check_hf_types(hf, path)
    return hf


# sizes every family reads (when present and not null): integers >= 1; flags: JSON booleans; numbers: finite > 0
HF_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "intermediate_size", "max_position_embeddings", "n_embd", "n_layer", "n_head", "n_inner",
            "n_positions", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
            "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "attention_hidden_size", "context_length")
HF_FLAGS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window", "scale_embedding")
HF_NUMBERS = ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps", "rope_theta")


def _check_hf_types(hf: dict, path: Path) -> None:
    """One line naming the file and the key for a size, flag or epsilon of the wrong type or range."""
    for key in HF_SIZES:
        value = hf.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{path}: {key}={value!r} must be an integer >= 1")
    for key in HF_FLAGS:
        value = hf.get(key)
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{path}: {key}={value!r} must be true or false (a JSON boolean)")
    for key in HF_NUMBERS:  # present means a number (null included: the loaders would read it as one)
        value = hf.get(key)
        if key in hf and (not isinstance(value, (int, float)) or isinstance(value, bool)
                          or not math.isfinite(value) or value <= 0):
            raise ValueError(f"{path}: {key}={value!r} must be a finite number > 0")


def hf_model_config(make_config: Callable[[dict, str, set[str]], ModelConfig], hf: dict, model_type: str,
                    keys: set[str], path: Path) -> ModelConfig:
    """``make_config(hf, model_type, keys)``, its errors naming the config file (and a missing key)."""
    try:
        return make_config(hf, model_type, keys)
    except KeyError as exc:
        raise ValueError(f"{path}: model_type={model_type!r} needs the key {exc.args[0]!r}, which is missing") from None
    except (ValueError, TypeError, ZeroDivisionError) as exc:
        raise ValueError(f"{path}: {exc}") from None


def read_hf_weights(directory: Path) -> dict[str, Tensor]:
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.is_file():
        return read_weights(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, Tensor] = {}
        for shard in shards:
            state.update(read_weights(directory / shard))
        return state
    if (directory / "pytorch_model.bin").is_file():
        raise ValueError(
            f"{directory} has only pytorch_model.bin; attnlab never unpickles weights. Convert it once with "
            f"transformers: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
        )
    raise FileNotFoundError(f"{directory}: no model.safetensors (or sharded index) found")


def expand_pattern(hf_pattern: str, ours_pattern: str, cfg: ModelConfig) -> list[tuple[str, str]]:
    """Instantiate a table row for every layer: ``{i}`` decoder (or only) layers, ``{e}`` encoder layers."""
    for key, count in (("{i}", cfg.n_layers), ("{e}", cfg.encoder_layers)):
        if key in hf_pattern:
            return [(hf_pattern.replace(key, str(n)), ours_pattern.replace(key, str(n))) for n in range(count)]
    return [(hf_pattern, ours_pattern)]


def normalise_names(hf_state: dict[str, Tensor], names: dict[str, str]) -> dict[str, Tensor]:
    """Undo the prefixes that differ between a bare model and its LM-head wrapper."""
    if names is GPT2_NAMES and not any(k.startswith("transformer.") for k in hf_state):
        # GPT2Model (no LM head) saves names without the "transformer." prefix.
        return {("transformer." + k if not k.startswith("lm_head") else k): v for k, v in hf_state.items()}
    if any(k.startswith("bert.") for k in hf_state):  # BertForMaskedLM wraps BertModel as "bert."
        return {(k[len("bert."):] if k.startswith("bert.") else k): v for k, v in hf_state.items()}
    return hf_state


def convert_state(hf_state: dict[str, Tensor], cfg: ModelConfig, names: dict[str, str]) -> dict[str, Tensor]:
    """Rename (and split / transpose / trim where the table says so) HF tensors into attnlab names."""
    hf_state = normalise_names(hf_state, names)
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for hf_pattern, ours_pattern in names.items():
        for hf_name, ours in expand_pattern(hf_pattern, ours_pattern, cfg):
            if hf_name not in hf_state:
                continue
            used.add(hf_name)
            tensor = hf_state[hf_name]
            if ours.startswith("SKIP:"):  # recomputed by attnlab (e.g. a fixed sinusoidal table)
                continue
            if ours.startswith("T:"):
                tensor, ours = tensor.t(), ours[2:]
            elif ours.startswith("OFF2:"):  # BART reserves two position rows before position 0
                tensor, ours = tensor[2:], ours[5:]
            elif ours.startswith("ROW:"):
                tensor, ours = tensor.reshape(-1), ours[4:]
            if ours.startswith("decoder_embed.") and cfg.share_embeddings:
                continue  # the decoder's copy of a shared table
            if "{q,k,v}" in ours:  # a fused QKV tensor: split along the output dimension
                sizes = [cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim]
                if tensor.shape[0] != sum(sizes):
                    raise ValueError(f"tensor {hf_name!r} has shape {tuple(tensor.shape)}; expected {sum(sizes)} rows")
                for part, piece in zip("qkv", torch.split(tensor, sizes, dim=0)):
                    out[ours.replace("{q,k,v}", part)] = piece.contiguous()
            else:
                out[ours] = tensor.contiguous()
    leftover = sorted(k for k in hf_state if k not in used and not IGNORED.search(k))
    if leftover:
        raise ValueError(f"unexpected tensor(s) in the checkpoint, not in the name table: {leftover[:8]}")
    return out


def load_hf(directory: str | Path, *, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Build the attnlab model equivalent to a local HF directory and copy its weights in."""
    from attnlab.models import build_model

    directory = Path(directory)
    hf = read_hf_config(directory)
    model_type = hf["model_type"]
    make_config, names = FAMILIES[model_type]
    hf_state = read_hf_weights(directory)
    cfg = hf_model_config(make_config, hf, model_type, set(normalise_names(hf_state, names)), directory / "config.json")
    state = convert_state(hf_state, cfg, names)
    model = build_model(cfg).to(torch.float32 if dtype is None else dtype)
    load_state_checked(model, state, f"{directory} (Hugging Face {hf['model_type']})")
    return model.eval()
