"""Byte-level BPE, trained with the Hugging Face ``tokenizers`` library (Sennrich et al. 2016; GPT-2's
byte-level variant): every byte sequence is representable, so there is no unknown token.

``<|endoftext|>`` separates documents and ends generations; it is saved as the EOS token in
``special_tokens.json`` next to ``tokenizer.json`` so ``attnlab.load_tokenizer(model_dir)`` knows it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
MIN_VOCAB = 256 + 1  # the 256 byte symbols and the end-of-text token


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> Tokenizer:
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
        raise ValueError(f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least {MIN_VOCAB} "
                         f"(256 bytes + {EOS}); 4096-32768 are typical")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok: Tokenizer, directory: str | Path, *, eos_token: str = EOS) -> None:
    """``tokenizer.json`` and ``special_tokens.json`` (``eos_token``: a reused tokenizer's own end token)."""
    directory = Path(directory)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "special_tokens.json").write_text(json.dumps({"eos_token": eos_token, "bos_token": None}) + "\n")


def tokenizer_hash(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()[:20]


def eos_id(tok: Tokenizer) -> int:
    i = tok.token_to_id(EOS)
    if i is None:
        raise ValueError(f"the tokenizer has no {EOS} token; train it with attnlab (or add the token)")
    return i
