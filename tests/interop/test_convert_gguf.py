"""``attnlab convert`` from a GGUF file: the written model directory carries the file's tokenizer (it once
carried none: only a directory's tokenizer files were copied)."""

from __future__ import annotations

import torch
from tiny_gguf import SPECIALS, TEMPLATE, TEXT

import attnlab
from attnlab.cli import main


def test_converting_a_gguf_keeps_its_tokenizer(tiny, tmp_path, capsys):
    _, _, path = tiny("llama")
    out = tmp_path / "mqa"
    assert main(["convert", "--model", str(path), "--kv-heads", "1", "--out", str(out)]) == 0, capsys.readouterr().err
    source, written = attnlab.load_tokenizer(path), attnlab.load_tokenizer(out)
    for text in [*TEXT[:4], "".join(SPECIALS) + " mixed <|im_end|> text", "unseen: Ωmega ≠ 42 🙂"]:
        ids = source.encode(text)
        assert written.encode(text) == ids
        assert written.decode(ids, skip_special_tokens=False) == source.decode(ids, skip_special_tokens=False)
    assert (written.eos_token, written.bos_token, written.pad_token, written.add_bos_token) == (
        source.eos_token, source.bos_token, source.pad_token, source.add_bos_token)
    assert written.eos_token == "<|im_end|>" and written.chat_template == TEMPLATE
    model = attnlab.from_pretrained(out)
    assert model.config.n_kv_heads == 1
    ids = torch.tensor([written.encode("The quick brown fox")])
    assert attnlab.generate(model, ids, 2).shape == (1, ids.shape[1] + 2)
