"""GGUF checkpoints (llama.cpp's single-file format): weights, config and tokenizer from one file.

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
- the config lives in metadata keys (``llama.block_count``, ...), and the tokenizer in
  ``tokenizer.ggml.*`` arrays (vocabulary, merges, token types), rebuilt with ``tokenizers``.

Shape legend: O output features (rows), I input features, H heads, D head dim.
"""

from __future__ import annotations

import functools
import json
import re
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from attnlab.config import ModelConfig
from attnlab.interop.ggml_dequant import DEQUANTIZERS, dequantize_blocks
from attnlab.interop.gguf_file import GGUFFile, RawTensor, ggml_type_info, parse_header
from attnlab.tokenizer import Tokenizer

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


# ----------------------------------------------------------------------------- tokenizer
# Split patterns of llama.cpp's pre-tokenizer names (``tokenizer.ggml.pre``) we know, as regexes for
# ``tokenizers``' Split; ``None`` = GPT-2's own split (ByteLevel's built-in regex).
_WORDS = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|NUM"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS: dict[str, str | None] = {
    "default": None,
    "gpt-2": None,
    "gpt2": None,
    "smollm": "digits",  # one digit per token, then GPT-2's split
    "llama-bpe": _WORDS.replace("NUM", r"\p{N}{1,3}"),
    "llama3": _WORDS.replace("NUM", r"\p{N}{1,3}"),
    "qwen2": _WORDS.replace("NUM", r"\p{N}"),
}
# llama.cpp token types (tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def build_bpe_tokenizer(tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int] | None = None,
                        *, pre: str | None = None, bos_id: int | None = None, eos_id: int | None = None,
                        chat_template: str | None = None, add_bos: bool = False) -> Tokenizer:
    """A byte-level BPE tokenizer (``tokenizer.ggml.model == "gpt2"``) from GGUF-style arrays.

    Control tokens (type 3, e.g. ``<|im_end|>``) become special tokens; user-defined ones (type 4) are
    matched whole but kept in decoded text. The returned tokenizer carries ``chat_template``,
    ``bos_token``, ``eos_token`` and ``add_bos_token`` declared.
    """
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    vocab = {token: index for index, token in enumerate(tokens)}
    pairs: list[tuple[str, str]] = []
    for merge in merges:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ValueError(f"malformed BPE merge {merge!r}: expected two tokens separated by one space")
        pairs.append((parts[0], parts[1]))
    backend = Backend(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    split = PRE_TOKENIZERS.get(pre or "default", ...)
    if split is ...:
        warnings.warn(f"unknown GGUF pre-tokenizer {pre!r}; splitting text like GPT-2 (token ids may differ "
                      f"from llama.cpp's for some inputs)", stacklevel=2)
        split = None
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == "digits":
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    types = list(token_types) if token_types is not None else [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{len(types)} token types for {len(tokens)} tokens: the vocabulary is garbled")
    control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)

    def spelled(index: int | None) -> str | None:
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    return Tokenizer(backend, eos_token=spelled(eos_id), bos_token=spelled(bos_id), chat_template=chat_template,
                     add_bos_token=add_bos)


def gguf_tokenizer(file: GGUFFile) -> Tokenizer:
    """The tokenizer described by a GGUF's ``tokenizer.*`` metadata."""
    kind = file.meta("tokenizer.ggml.model", None)
    if kind is None:
        raise ValueError(f"{file.path} has no tokenizer (no tokenizer.ggml.model); pass token ids instead")
    if kind != "gpt2":
        raise ValueError(f"{file.path}: GGUF tokenizer model {kind!r} is not supported; attnlab builds byte-level "
                         f"BPE ('gpt2') tokenizers only — pass token ids instead (--prompt-ids)")
    tokens = file.meta("tokenizer.ggml.tokens")
    merges = file.meta("tokenizer.ggml.merges", [])

    def token_id(key: str) -> int | None:
        value = file.meta(f"tokenizer.ggml.{key}", None)
        return None if value is None else int(value)

    return build_bpe_tokenizer(
        tokens, merges, file.meta("tokenizer.ggml.token_type", None),
        pre=file.meta("tokenizer.ggml.pre", None),
        bos_id=token_id("bos_token_id"), eos_id=token_id("eos_token_id"),
        chat_template=file.meta("tokenizer.chat_template", None),
        add_bos=bool(file.meta("tokenizer.ggml.add_bos_token", False)),
    )


def load_gguf_tokenizer(path: str | Path, *, cache: bool = True) -> Tokenizer:
    """The tokenizer stored in a GGUF file (text in and out with no other file).

    Rebuilding it parses the vocabulary and merges (49k each for SmolLM2): the result is kept as JSON in the
    prepared-weights cache beside the weights, and read back from there by later loads."""
    from tokenizers import Tokenizer as Backend

    from attnlab import weights_cache

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    if not cache:
        return gguf_tokenizer(open_gguf(path))

    def build() -> str:
        tok = gguf_tokenizer(open_gguf(path))
        return json.dumps({"backend": tok.backend.to_str(), "specials": tok.specials()})

    from attnlab.memstats import release_freed_memory

    data = json.loads(weights_cache.cached_text(path, "tokenizer", build))
    specials = {k: data["specials"].get(k) for k in ("eos_token", "bos_token", "pad_token", "chat_template")}
    tokenizer = Tokenizer(Backend.from_str(data["backend"]), add_bos_token=bool(data["specials"].get("add_bos_token")),
                          **specials)
    del data
    release_freed_memory()  # the parsed JSON (and on a cold load the vocabulary lists): ~30 MiB for SmolLM2
    return tokenizer


__all__ = [
    "ARCHITECTURES", "build_bpe_tokenizer", "gguf_config", "load_gguf",
    "load_gguf_tokenizer", "open_gguf", "raw_tensors", "supported_tensor_types", "unpermute_rotary_rows",
]
