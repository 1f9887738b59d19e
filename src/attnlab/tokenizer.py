"""The one tokenizer type: a Hugging Face ``tokenizers`` model plus the facts attnlab needs about it.

``Tokenizer`` declares its special tokens (end, start, padding), its chat template and whether a start
token is prepended; it reads itself from a model directory (``from_dir``), writes itself back
(``save``: ``tokenizer.json`` + ``special_tokens.json``, each atomically) and trains byte-level BPE
(``train_bpe``, Sennrich et al. 2016 in GPT-2's byte-level form: every byte sequence is representable,
so there is no unknown token).

``special_tokens.json`` holds ``{"eos_token", "bos_token", "pad_token", "add_bos_token"}`` (+
``"chat_template"`` when there is one) as token strings; a Hugging Face directory's
``tokenizer_config.json`` is read when that file is absent. The chat template is the one in
``special_tokens.json``, else a Hugging Face directory's ``chat_template.jinja``, else the
``chat_template`` string of its ``tokenizer_config.json``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from attnlab.atomic import atomic_write_file, atomic_write_text
from attnlab.checkpoint import HF_TOKENIZER_CONFIG, SPECIALS_FILE, TOKENIZER_FILE, read_json
from attnlab.textio import check_text

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where recent Hugging Face versions keep the chat template
EOS = "<|endoftext|>"  # the end token of tokenizers attnlab trains for text


class Tokenizer:
    """Text <-> token ids, with declared special tokens (strings; their ids are looked up)."""

    def __init__(self, backend: Any, *, eos_token: str | None = None, bos_token: str | None = None,
                 pad_token: str | None = None, chat_template: str | None = None,
                 add_bos_token: bool = False) -> None:
        self.backend = backend  # a ``tokenizers.Tokenizer``
        self.eos_token, self.bos_token, self.pad_token = eos_token, bos_token, pad_token
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        for name in ("eos_token", "bos_token", "pad_token"):
            token = getattr(self, name)
            if token is not None and backend.token_to_id(token) is None:
                raise ValueError(f"the tokenizer declares {name}={token!r}, which is not in its vocabulary")

    # ---------------------------------------------------------------- ids of the special tokens
    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token) if self.eos_token is not None else None

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token) if self.bos_token is not None else None

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.pad_token) if self.pad_token is not None else None

    # ---------------------------------------------------------------- text <-> ids
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added: chat templates write their own)."""
        try:
            return self.backend.encode(text, add_special_tokens=False).ids
        except TypeError:  # not text, or text with lone surrogates: say which, as the CLI does
            check_text(text, "the text to encode")
            raise

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        try:
            return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]
        except TypeError:
            for i, text in enumerate(texts):
                check_text(text, f"text {i} of the batch")
            raise

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, index: int) -> str | None:
        return self.backend.id_to_token(index)

    def fingerprint(self) -> str:
        """A hash of the whole tokenizer (vocabulary, merges, pre-tokenizer): keys caches of encoded data."""
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()[:20]

    # ---------------------------------------------------------------- files
    def specials(self) -> dict:
        data: dict = {"eos_token": self.eos_token, "bos_token": self.bos_token, "pad_token": self.pad_token,
                      "add_bos_token": self.add_bos_token}
        if self.chat_template is not None:
            data["chat_template"] = self.chat_template
        return data

    def save(self, directory: str | Path) -> None:
        """``tokenizer.json`` and ``special_tokens.json`` into ``directory``, each written atomically."""
        directory = Path(directory)
        atomic_write_file(directory / TOKENIZER_FILE, lambda p: self.backend.save(str(p)))
        atomic_write_text(directory / SPECIALS_FILE, json.dumps(self.specials(), indent=1) + "\n")

    @classmethod
    def from_file(cls, file: str | Path, **specials: Any) -> Tokenizer:
        """A ``tokenizer.json`` with the special tokens given (none by default)."""
        from tokenizers import Tokenizer as Backend

        file = Path(file)
        if not file.is_file():
            raise FileNotFoundError(f"no {file}")
        try:
            backend = Backend.from_file(str(file))
        except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
            raise ValueError(f"{file} is not a valid {TOKENIZER_FILE}: {exc}") from None
        return cls(backend, **specials)

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer:
        """The tokenizer of a model directory: ``tokenizer.json``, its special tokens and chat template."""
        directory = Path(directory)
        file = directory / TOKENIZER_FILE
        if not file.is_file():
            raise FileNotFoundError(
                f"no {TOKENIZER_FILE} in {directory}; pass token ids instead (--prompt-ids) or add the tokenizer file")
        return cls.from_file(file, **_read_specials(directory))


def _read_specials(directory: Path) -> dict:
    """Special tokens from ``special_tokens.json`` (attnlab) or ``tokenizer_config.json`` (Hugging Face),
    and the chat template (see the module docstring for where it is looked for)."""
    ours, theirs = directory / SPECIALS_FILE, directory / HF_TOKENIZER_CONFIG
    if ours.is_file():
        data = read_json(ours, "the tokenizer's special tokens")
    elif theirs.is_file():
        data = read_json(theirs, "the tokenizer's settings")
        data.pop("chat_template", None)  # read below, after chat_template.jinja (the newer layout wins)
    else:
        data = {}
    out = {k: data.get(k) for k in ("eos_token", "bos_token", "pad_token", "chat_template")}
    out["add_bos_token"] = bool(data.get("add_bos_token", False))
    for key in ("eos_token", "bos_token", "pad_token", "chat_template"):  # HF may store a dict (AddedToken)
        if not isinstance(out[key], str):
            out[key] = None
    if out["chat_template"] is None:
        out["chat_template"] = _hf_chat_template(directory)
    return out


def _hf_chat_template(directory: Path) -> str | None:
    """A Hugging Face directory's chat template: ``chat_template.jinja``, else ``tokenizer_config.json``'s
    ``chat_template`` string (a list of named templates is not read: None)."""
    jinja_file, config_file = directory / CHAT_TEMPLATE_FILE, directory / HF_TOKENIZER_CONFIG
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{jinja_file} is not UTF-8 text ({exc}); the chat template is damaged") from None
    if config_file.is_file():
        value = read_json(config_file, "the tokenizer's settings").get("chat_template")
        return value if isinstance(value, str) else None
    return None


def train_bpe(texts: Iterable[str], vocab_size: int, *, specials: Sequence[str] = (EOS,),
              eos_token: str | None = EOS, bos_token: str | None = None, pad_token: str | None = None,
              min_frequency: int = 2) -> Tokenizer:
    """Byte-level BPE of ``vocab_size`` tokens: the 256 byte symbols, ``specials`` (ids 0..), then merges."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    smallest = 256 + len(specials)
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < smallest:
        raise ValueError(f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least {smallest} "
                         f"(256 bytes + {', '.join(specials)}); 4096-32768 are typical")
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend, eos_token=eos_token, bos_token=bos_token, pad_token=pad_token)
