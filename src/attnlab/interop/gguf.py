"""GGUF checkpoints (llama.cpp's single-file format): weights and config (the tokenizer: ``gguf_tokenizer.py``).

The header is parsed by ``gguf_file.py`` and every tensor is decoded from its memory-mapped bytes by the
vectorised PyTorch code of ``ggml_dequant.py`` (F32, F16, BF16, Q4_0 ... Q8_0, Q4_K-Q6_K; rarer types
through the ``gguf`` package) into ordinary float tensors: attnlab then runs the model in float32 (or the
dtype asked for), so the output quality equals the quantised file's. The converted state dict is kept in
the prepared-weights cache (``weights_cache.py``) and memory-mapped by later loads, and so is the rebuilt
tokenizer: a second load neither parses nor decodes the file. ``raw_tensors`` hands out a tensor's bytes as
stored (ggml type, shape) for code that runs a quantised format as is.

What llama.cpp changes when it converts a Hugging Face checkpoint, and what is undone here:

- names: ``blk.{i}.attn_q.weight`` and friends, mapped to ours by ``LAYER_NAMES`` / ``TOP_NAMES``;
- the rows of the query and key projections of ``llama`` are permuted so that the two halves of each
  rotary pair sit next to each other (GPT-J's interleaved layout); our RoPE rotates halves (the HF
  layout), so ``unpermute_rotary_rows`` puts them back (``qwen2`` files are not permuted);
- the config lives in metadata keys (``llama.block_count``, ...); the tokenizer's ``tokenizer.ggml.*``
  arrays (vocabulary, merges, token types) are rebuilt by ``gguf_tokenizer.py``.

Shape legend: O output features (rows), I input features, H heads, D head dim.
"""

from __future__ import annotations

import functools
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from attnlab.config import ModelConfig
from attnlab.interop.ggml_dequant import DEQUANTIZERS, dequantize_blocks
from attnlab.interop.gguf_file import GGUFFile, RawTensor, ggml_type_info, parse_header

if TYPE_CHECKING:
    from attnlab.models.decoder import DecoderLM


# ----------------------------------------------------------------------------- architectures
@dataclass(frozen=True)
class Architecture:
    """How one GGUF ``general.architecture`` maps onto our decoder."""

    permuted_qk: bool  # llama.cpp interleaved the rotary pairs of the q/k rows (undo it)
    qkv_bias: bool  # q/k/v projections always carry biases


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(permuted_qk=True, qkv_bias=False),
    "qwen2": Architecture(permuted_qk=False, qkv_bias=True),
}

# GGUF tensor names -> ours. Per layer: ``blk.{i}.<key>.<weight|bias>`` -> ``blocks.{i}.<value>.<...>``.
LAYER_NAMES: dict[str, str] = {
    "attn_norm": "attn_norm",
    "ffn_norm": "ffn_norm",
    "attn_q": "attn.q_proj",
    "attn_k": "attn.k_proj",
    "attn_v": "attn.v_proj",
    "attn_output": "attn.o_proj",
    "ffn_gate": "ffn.gate",
    "ffn_up": "ffn.up",
    "ffn_down": "ffn.down",
}
TOP_NAMES: dict[str, str] = {"token_embd": "embed", "output_norm": "norm", "output": "lm_head"}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_TOP_RE = re.compile(r"^(\w+)\.(weight|bias)$")

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ----------------------------------------------------------------------------- reading
def open_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's header (metadata and tensor directory), turning any failure into one ValueError."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    try:
        return parse_header(path.resolve())
    except (ValueError, OSError, struct.error, OverflowError, UnicodeDecodeError, MemoryError) as exc:
        raise ValueError(
            f"{path} is not a readable GGUF file ({exc}); it may be truncated or corrupted "
            f"(size {path.stat().st_size} bytes) — download it again"
        ) from None


@functools.cache
def _can_dequantize(qtype: int) -> bool:
    """Whether this tensor type can be decoded: by attnlab's own code, or by the installed ``gguf`` package
    (tried on one zero block)."""
    if qtype in DEQUANTIZERS:
        return True
    try:
        import gguf

        kind = gguf.GGMLQuantizationType(qtype)
        _, type_size = gguf.GGML_QUANT_SIZES[kind]
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), kind)
    except Exception:
        return False
    return True


def supported_tensor_types() -> list[str]:
    """Names of the tensor types this installation can load (F32, F16, BF16, Q8_0, Q4_K, ...)."""
    names = {ggml_type_info(t)[0] for t in DEQUANTIZERS}
    try:
        import gguf

        names |= {kind.name for kind in gguf.GGMLQuantizationType if _can_dequantize(int(kind))}
    except ImportError:
        pass
    return sorted(names)


def raw_tensors(path: str | Path, names: list[str] | None = None) -> dict[str, RawTensor]:
    """Tensors as stored in the file, by GGUF name: a uint8 view of the memory-mapped bytes (rows x bytes per
    row), the ggml type and the PyTorch-order shape — for code that runs a quantised format as is."""
    return open_gguf(path).raw(names)


def dequantize(file: GGUFFile, raw: RawTensor) -> Tensor:
    """One stored tensor as float32, shaped like PyTorch's (O, I) (a fresh tensor, never a view of the file)."""
    kind = raw.ggml_type
    if not _can_dequantize(kind):
        raise ValueError(
            f"{file.path}: tensor {raw.name!r} is stored as {raw.type_name}, which attnlab cannot decode (nor the "
            f"installed gguf package); supported types: {', '.join(supported_tensor_types())}"
        )
    _, _, block_bytes = ggml_type_info(kind)
    try:
        if kind in DEQUANTIZERS:
            values = dequantize_blocks(raw.data, kind, block_bytes)
        else:  # a rarer type: the gguf package's NumPy code (slow, complete)
            import gguf

            decoded = gguf.quants.dequantize(raw.data.numpy(), gguf.GGMLQuantizationType(kind))
            values = torch.from_numpy(np.array(decoded, dtype=np.float32, copy=True))
    except Exception as exc:
        raise ValueError(f"{file.path}: cannot decode tensor {raw.name!r} ({raw.type_name}): {exc}") from None
    return values.reshape(raw.shape)


def unpermute_rotary_rows(weight: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's q/k row order: per head, rows (pair j, member t) -> (member t, pair j).

    llama.cpp stores row ``h*D + 2j + t`` what HF stores in row ``h*D + t*D/2 + j`` (t in {0, 1}), so
    that each rotary pair is adjacent. Works on weights (O, I) and biases (O,).
    """
    rows = weight.shape[0]
    head_dim = rows // n_heads
    rest = tuple(weight.shape[1:])
    w = weight.reshape(n_heads, head_dim // 2, 2, *rest)  # (H, D/2, 2, I)
    return w.transpose(1, 2).reshape(rows, *rest)  # (H, 2, D/2, I) -> (O, I)


# ----------------------------------------------------------------------------- config
def gguf_config(file: GGUFFile) -> ModelConfig:
    """Our decoder ModelConfig from a GGUF's metadata (``{arch}.block_count`` and friends)."""
    arch = file.meta("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{file.path}: GGUF architecture {arch!r} is not supported; attnlab loads GGUF architectures: "
            f"{', '.join(sorted(ARCHITECTURES))} (other models: use a Hugging Face safetensors directory)"
        )
    spec = ARCHITECTURES[arch]

    def number(key: str, default: Any = ...) -> Any:
        value = file.meta(f"{arch}.{key}", default)
        if isinstance(value, list):
            raise ValueError(f"{file.path}: {arch}.{key} varies per layer ({value[:4]}...); not supported")
        return value

    if "token_embd.weight" not in file.tensors:
        raise ValueError(f"{file.path}: no token_embd.weight tensor; not a language model GGUF")
    vocab_size = int(file.tensors["token_embd.weight"].shape[0])  # (V, C) in PyTorch order
    d_model = int(number("embedding_length"))
    n_heads = int(number("attention.head_count"))
    n_kv_heads = int(number("attention.head_count_kv", n_heads))
    head_dim = int(number("attention.key_length", d_model // n_heads))
    if int(number("attention.value_length", head_dim)) != head_dim:
        raise ValueError(f"{file.path}: key and value head sizes differ; not supported")
    rope_dim = int(number("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"{file.path}: partial rotary embeddings (rope.dimension_count={rope_dim} < head "
                         f"dim {head_dim}) are not supported")
    scaling = number("rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in file.tensors:
        raise ValueError(f"{file.path}: RoPE scaling ({scaling!r}) is not supported; only plain RoPE loads")
    if int(number("expert_count", 0)) > 0:
        raise ValueError(f"{file.path}: mixture-of-experts GGUFs ({arch}.expert_count > 0) are not supported")

    def token(key: str) -> int | None:
        value = file.meta(f"tokenizer.ggml.{key}", None)
        return int(value) if value is not None and 0 <= int(value) < vocab_size else None

    names = file.tensors
    return ModelConfig(
        family="decoder",
        vocab_size=vocab_size,
        d_model=d_model,
        n_layers=int(number("block_count")),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        d_ff=int(number("feed_forward_length")),
        ffn="swiglu",
        norm="rms",
        norm_eps=float(number("attention.layer_norm_rms_epsilon", 1e-5)),
        norm_position="pre",
        position="rope",
        rope_theta=float(number("rope.freq_base", 10000.0)),
        max_seq_len=int(number("context_length", 2048)),
        attn_qkv_bias=spec.qkv_bias or "blk.0.attn_q.bias" in names,
        attn_out_bias="blk.0.attn_output.bias" in names,
        ffn_bias="blk.0.ffn_up.bias" in names,
        tie_embeddings="output.weight" not in names,
        attention_kernel="sdpa",
        bos_token_id=token("bos_token_id"),
        eos_token_id=token("eos_token_id"),
        pad_token_id=token("padding_token_id"),
    )


def our_name(gguf_name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``blocks.3.attn.q_proj.weight``; None for a name we do not know."""
    if m := _LAYER_RE.match(gguf_name):
        layer, key, kind = m.groups()
        return f"blocks.{layer}.{LAYER_NAMES[key]}.{kind}" if key in LAYER_NAMES else None
    if m := _TOP_RE.match(gguf_name):
        key, kind = m.groups()
        return f"{TOP_NAMES[key]}.{kind}" if key in TOP_NAMES else None
    return None


def check_known_names(file: GGUFFile) -> None:
    """ValueError naming the tensors of ``file`` that our decoder has no place for."""
    unknown = sorted(n for n in file.tensors if our_name(n) is None)
    if unknown:
        raise ValueError(f"{file.path}: tensor(s) attnlab does not know how to load: {unknown[:8]} "
                         f"(the file's architecture has parts our decoder lacks)")


def gguf_state(file: GGUFFile, cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Tensor]:
    """Every tensor decoded, renamed to ours, q/k rows put back in HF order, cast to ``dtype``.

    The file is mapped once for the whole pass and unmapped when it ends (the state holds fresh tensors);
    at any moment one tensor's float32 values exist beside the state being built."""
    arch = ARCHITECTURES[file.meta("general.architecture")]
    check_known_names(file)
    raws = file.raw()
    for raw in raws.values():  # check every type before the slow part
        if not _can_dequantize(raw.ggml_type):
            dequantize(file, raw)  # raises the ValueError naming the type
    state: dict[str, Tensor] = {}
    for name in list(raws):
        ours = our_name(name)
        assert ours is not None
        values = dequantize(file, raws.pop(name))
        if arch.permuted_qk and ".attn.q_proj." in ours:
            values = unpermute_rotary_rows(values, cfg.n_heads)
        elif arch.permuted_qk and ".attn.k_proj." in ours:
            values = unpermute_rotary_rows(values, cfg.n_kv_heads)
        state[ours] = values.to(dtype).contiguous()
    return state


def load_gguf(path: str | Path, *, dtype: torch.dtype | None = None, cache: bool = True) -> DecoderLM:
    """Build our decoder from a GGUF file, weights decoded to ``dtype`` (default float32).

    The first load of a file (per dtype and attnlab version) converts it and keeps the result in the
    prepared-weights cache (``weights_cache.py``); later loads memory-map that cache. ``cache=False`` (or
    ``ATTNLAB_WEIGHTS_CACHE=0``) converts the file every time.
    """
    from attnlab import weights_cache
    from attnlab.checkpoint import load_state_checked, no_init
    from attnlab.memstats import release_freed_memory
    from attnlab.models import build_model

    dtype = torch.float32 if dtype is None else dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype} is not supported for GGUF weights; choose one of: {list(DTYPES)}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    dtype_name = str(dtype).removeprefix("torch.")

    def build() -> tuple[dict, dict[str, Tensor]]:
        file = open_gguf(path)
        cfg = gguf_config(file)
        source = f"{file.path} (GGUF {file.meta('general.architecture')})"
        return {"config": cfg.to_dict(), "source": source}, gguf_state(file, cfg, dtype)

    if cache:
        info, state = weights_cache.cached_state(path, dtype_name, build,
                                                 what=f"decoding the tensors of {path.name} to {dtype_name}")
    else:
        info, state = build()
    cfg = ModelConfig.from_dict(info["config"])
    with no_init():
        model = build_model(cfg)
    load_state_checked(model, state, info["source"], assign=True)
    release_freed_memory()  # the temporaries of a conversion (a cold load)
    return model.eval()


__all__ = [
    "ARCHITECTURES", "gguf_config", "load_gguf", "open_gguf", "raw_tensors", "supported_tensor_types",
    "unpermute_rotary_rows",
]
