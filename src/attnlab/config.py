"""ModelConfig: one flat, validated, JSON-serialisable description of a model.

Every strategy of the field guide is one field here (see docs/architecture.md): swapping MHA for GQA,
LayerNorm for RMSNorm, Pre-Norm for Post-Norm or one attention kernel for another is a config change.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from attnlab.atomic import atomic_write_text
from attnlab.config_rules import check_fields_in_use

FAMILIES = ("decoder", "encoder", "seq2seq", "rwkv")
FFNS = ("relu", "gelu", "gelu_tanh", "silu", "swiglu")
NORMS = ("layer", "rms", "batch", "batch_naive")
NORM_POSITIONS = ("pre", "post", "sandwich")
POSITIONS = ("learned", "sinusoidal", "rope", "none")
ATTENTION_KERNELS = ("naive", "sdpa", "flash", "ring")
ATTENTION_MECHANISMS = ("softmax", "infini")
MEMORY_UPDATES = ("linear", "delta")
RWKV_VERSIONS = (4, 7)


@dataclass(frozen=True)
class ModelConfig:
    """A model, described by strings and numbers only.

    ``n_kv_heads`` chooses the attention variant: ``n_heads`` is multi-head attention (MHA), ``1`` is
    multi-query attention (MQA), anything in between that divides ``n_heads`` is grouped-query attention
    (GQA). ``None`` for ``n_kv_heads``, ``head_dim`` or ``d_ff`` means "derive it" (MHA,
    ``d_model // n_heads``, and ``4 * d_model`` or ``8/3 * d_model`` rounded up to 64 for SwiGLU).
    """

    family: str = "decoder"
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None
    head_dim: int | None = None
    d_ff: int | None = None
    ffn: str = "swiglu"
    norm: str = "rms"
    norm_eps: float = 1e-5
    norm_position: str = "pre"  # "pre" | "post" | "sandwich" (norm before and after each sublayer)
    residual: bool = True  # False removes the skip connections (an experiment, not a model to use)
    position: str = "rope"
    rope_theta: float = 10000.0
    max_seq_len: int = 1024
    attn_qkv_bias: bool = False
    attn_out_bias: bool = False
    ffn_bias: bool = False
    norm_bias: bool = True  # LayerNorm only; RMSNorm has no bias
    tie_embeddings: bool = True
    # decoder: the LM head scores only this many tokens (0 = all), the ids kept in the buffer head_token_ids;
    # every other token gets logit -inf. A speculative draft's frequent-token head (models/decoder.py).
    head_vocab_size: int = 0
    dropout: float = 0.0
    attention_kernel: str = "sdpa"
    attention_mechanism: str = "softmax"
    ring_layout: str = "zigzag"  # ring kernel: how the sequence is sharded ("zigzag" | "contiguous")
    segment_len: int = 0  # infini: tokens per segment (local attention window)
    memory_update: str = "linear"  # infini: "linear" or "delta" memory writes
    infini_bptt_segments: int = 0  # infini: detach the memory every k segments in training (0 = never)
    rwkv_version: int = 4
    init_std: float = 0.02
    # encoder / encoder-decoder
    n_encoder_layers: int | None = None  # seq2seq: encoder depth (None = n_layers)
    type_vocab_size: int = 0  # encoder: token-type (segment) embeddings, 0 = none
    embed_norm: bool = False  # a norm right after the embeddings (BERT, BART)
    embed_scale: bool = False  # multiply token embeddings by sqrt(d_model) (Marian, Vaswani et al.)
    share_embeddings: bool = True  # seq2seq: one token table for encoder and decoder
    lm_head_bias: bool = False  # a bias on the output logits (BART/Marian final_logits_bias, BERT MLM)
    mlm_head: bool = True  # encoder: a masked-LM head (dense + act + norm + tied projection) on top
    pooler: bool = False  # encoder: a tanh-dense pooled output of the first token (BERT)
    decoder_start_token_id: int | None = None  # seq2seq: the first decoder token
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        # Derive the optional sizes so that the serialised config is always explicit.
        if self.n_kv_heads is None and isinstance(self.n_heads, int):
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.head_dim is None and isinstance(self.d_model, int) and isinstance(self.n_heads, int):
            if self.n_heads > 0:
                object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if self.d_ff is None and isinstance(self.d_model, int):
            if self.ffn == "swiglu":
                d_ff = int(8 * self.d_model / 3)
                d_ff = 64 * ((d_ff + 63) // 64)
            else:
                d_ff = 4 * self.d_model
            object.__setattr__(self, "d_ff", d_ff)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> ModelConfig:
        """Raise ``ValueError`` naming the field, the bad value and what is allowed."""
        self._check_types()
        _choice("family", self.family, FAMILIES)
        if self.family == "rwkv" and self.rwkv_version not in RWKV_VERSIONS:
            raise ValueError(f"rwkv_version={self.rwkv_version!r} is not valid; choose one of: 4, 7")
        _choice("ffn", self.ffn, FFNS)
        _choice("norm", self.norm, NORMS)
        _choice("norm_position", self.norm_position, NORM_POSITIONS)
        _choice("position", self.position, POSITIONS)
        _choice("attention_kernel", self.attention_kernel, ATTENTION_KERNELS)
        _choice("attention_mechanism", self.attention_mechanism, ATTENTION_MECHANISMS)
        _choice("memory_update", self.memory_update, MEMORY_UPDATES)
        _choice("ring_layout", self.ring_layout, ("zigzag", "contiguous"))
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                     "max_seq_len"):
            _positive_int(name, getattr(self, name))
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}: each KV head "
                f"serves a whole group of query heads. Choose n_kv_heads among the divisors of n_heads: "
                f"{_divisors(self.n_heads)} ({self.n_heads} = MHA, 1 = MQA, in between = GQA)"
            )
        if self.position == "rope" and self.head_dim % 2 != 0:
            raise ValueError(f"position='rope' needs an even head_dim, got head_dim={self.head_dim}")
        if not (0.0 <= float(self.dropout) < 1.0):
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if float(self.norm_eps) <= 0:
            raise ValueError(f"norm_eps={self.norm_eps} must be > 0")
        if float(self.rope_theta) <= 0:
            raise ValueError(f"rope_theta={self.rope_theta} must be > 0")
        if float(self.init_std) <= 0:
            raise ValueError(f"init_std={self.init_std} must be > 0")
        if self.attention_mechanism == "infini":
            if self.family != "decoder":
                raise ValueError("attention_mechanism='infini' is for decoders (family='decoder')")
            if not isinstance(self.segment_len, int) or self.segment_len <= 0:
                raise ValueError(f"attention_mechanism='infini' needs segment_len > 0, got {self.segment_len!r}")
            if self.position not in ("rope", "none"):
                raise ValueError(f"attention_mechanism='infini' streams unbounded input: position must be 'rope' "
                                 f"(applied within each segment) or 'none', not {self.position!r}")
            if not isinstance(self.infini_bptt_segments, int) or self.infini_bptt_segments < 0:
                raise ValueError(f"infini_bptt_segments={self.infini_bptt_segments!r} must be an integer >= 0")
        if self.n_encoder_layers is not None:
            _positive_int("n_encoder_layers", self.n_encoder_layers)
        if not isinstance(self.type_vocab_size, int) or self.type_vocab_size < 0:
            raise ValueError(f"type_vocab_size={self.type_vocab_size!r} must be an integer >= 0")
        if self.family in ("encoder", "seq2seq") and self.attention_mechanism != "softmax":
            raise ValueError(f"attention_mechanism={self.attention_mechanism!r} is only for decoders")
        if self.family == "encoder" and self.position == "none":
            raise ValueError("an encoder needs positions: bidirectional attention cannot infer order "
                             "(choose position='learned', 'sinusoidal' or 'rope')")
        if self.head_vocab_size:
            if not (isinstance(self.head_vocab_size, int) and 0 < self.head_vocab_size <= self.vocab_size):
                raise ValueError(f"head_vocab_size={self.head_vocab_size!r} must be an integer in [1, vocab_size="
                                 f"{self.vocab_size}] (or 0 for a head over the whole vocabulary)")
            if self.family != "decoder" or self.tie_embeddings:
                raise ValueError("head_vocab_size needs family='decoder' and tie_embeddings=False (the head keeps "
                                 "its own rows for the tokens it scores)")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and 0 <= value < self.vocab_size):
                raise ValueError(f"{name}={value!r} must be a token id in [0, vocab_size={self.vocab_size})")
        check_fields_in_use(self.to_dict(), _DEFAULTS)  # a field this family/mechanism never reads keeps its default
        return self

    def _check_types(self) -> None:
        """Every field against its annotation (see :func:`check_field_types`); ints stored as floats where
        the field is a float, so the serialised config is the same whatever the input wrote."""
        for name, value in check_field_types(self.to_dict()).items():
            if value is not getattr(self, name):
                object.__setattr__(self, name, value)

    # ------------------------------------------------------------------ helpers
    @property
    def encoder_layers(self) -> int:
        return self.n_layers if self.n_encoder_layers is None else self.n_encoder_layers

    @property
    def unbounded_context(self) -> bool:
        """Whether the attention mechanism streams input of any length through a constant-size state (Infini-
        attention's compressive memory): ``max_seq_len`` does not limit the input, and the decoder's cache is
        that state (``InfiniState``) instead of a ``KVCache``."""
        return self.attention_mechanism == "infini"

    @property
    def kv_groups(self) -> int:
        """Query heads per KV head (1 for MHA, n_heads for MQA)."""
        return self.n_heads // self.n_kv_heads

    def kv_cache_bytes_per_token(self, bytes_per_element: int = 4) -> int:
        """K and V of every layer for one token (what the KV cache stores per position)."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * bytes_per_element

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated)."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s): {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            atomic_write_text(path, text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        if not isinstance(data, dict):
            raise ValueError(f"a model config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if not k.startswith("_")}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown ModelConfig field(s) {unknown}; known fields are: {', '.join(sorted(known))}"
            )
        return cls(**data)

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> ModelConfig:
        """Load from a JSON file path or a JSON string."""
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            path = Path(text)
            if not path.exists():
                raise FileNotFoundError(f"config file not found: {path}")
            text = path.read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"config is not valid JSON: {exc}") from None
        return cls.from_dict(data)


_DEFAULTS = {f.name: f.default for f in fields(ModelConfig)}


def check_field_types(values: dict[str, Any], config_class: type | None = None) -> dict[str, Any]:
    """Check field values of a dataclass (ModelConfig by default) against its annotations; return them with
    ints made floats where the field is a float. Unknown keys are left to the caller (``from_dict`` names
    them); fields annotated with anything but bool/int/float/str (optionally ``| None``) are not checked.

    ``bool`` must be a real boolean (the string ``"false"`` is truthy: refused, not guessed), ``int`` an
    integer that is not a bool, ``float`` a finite int or float (NaN and infinity are refused), ``str`` a
    string; ``X | None`` also accepts None. Callers that collect fields before building a config (the
    ``--set key=value`` overrides of ``attnlab train``) can call this first, to fail before any work.
    Raises ``ValueError`` naming the field, the value and the expected type.
    """
    config_class = ModelConfig if config_class is None else config_class
    types = _field_types(config_class)
    what = config_class.__name__
    out = dict(values)
    for name, value in values.items():
        if name not in types:
            continue
        kind, optional = types[name]
        if value is None and optional:
            continue
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        else:
            ok = isinstance(value, kind)
        if not ok:
            if kind is float and isinstance(value, float):  # NaN or infinity
                raise ValueError(f"{what} field {name}={value!r} must be a finite number")
            expected = {bool: "a boolean (true or false)", int: "an integer", float: "a finite number",
                        str: "a string"}.get(kind, kind.__name__) + (" or null" if optional else "")
            hint = " (a quoted string is not a boolean: write true or false)" if kind is bool and isinstance(
                value, str) else ""
            raise ValueError(f"{what} field {name}={value!r} has the wrong type: expected {expected}{hint}")
        if kind is float and not isinstance(value, float):
            out[name] = float(value)
    return out


@functools.cache
def _field_types(config_class: type) -> dict[str, tuple[type, bool]]:
    """Field -> (its type: bool, int, float or str; whether None is allowed), from the annotations; fields of
    other types (lists, unions of several types, ...) are left out."""
    hints = typing.get_type_hints(config_class)
    out: dict[str, tuple[type, bool]] = {}
    for f in fields(config_class):
        hint = hints[f.name]
        args = typing.get_args(hint)
        kinds = [a for a in args if a is not type(None)] if args else [hint]
        if len(kinds) == 1 and kinds[0] in (bool, int, float, str) and (not args or type(None) in args):
            out[f.name] = (kinds[0], type(None) in args)
    return out


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not valid; choose one of: {', '.join(map(repr, allowed))}")


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
