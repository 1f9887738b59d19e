"""The tokenizer of a GGUF file: its ``tokenizer.ggml.*`` arrays (vocabulary, merges, token types, the
pre-tokenizer's name) rebuilt as a byte-level BPE ``tokenizers`` backend inside attnlab's one ``Tokenizer``
type, with the special tokens and chat template the file declares. The rebuilt tokenizer is kept as JSON in
the prepared-weights cache, so a second load does not parse the 49k-entry arrays again.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

from attnlab.interop.gguf import open_gguf
from attnlab.interop.gguf_file import GGUFFile
from attnlab.tokenizer import Tokenizer

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

__all__ = ["PRE_TOKENIZERS", "build_bpe_tokenizer", "gguf_tokenizer", "load_gguf_tokenizer"]
