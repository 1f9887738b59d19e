"""Chat templates and chat sessions (the ``attnlab chat`` command is in commands/chat.py).

A chat model was fine-tuned on conversations laid out by its *chat template*, a Jinja2 program stored
with the tokenizer (``tokenizer.chat_template``; GGUF files carry it in their metadata). We render it
the way Hugging Face does — a sandboxed environment, ``trim_blocks``/``lstrip_blocks``, the variables
``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token`` and a ``raise_exception`` helper —
so the model sees exactly the layout it was trained on, then generate until the template's
end-of-turn token (``<|im_end|>`` for SmolLM2).

Every turn re-renders the whole conversation and prefills it into a fresh KV cache (simple and exact;
a 135M model prefills a few hundred tokens in well under a second on a CPU). When the conversation
no longer fits the context, the oldest turns are dropped (the system prompt stays).

    attnlab chat --model smollm2            # interactive; /reset, /stats, /exit
    echo "What is 2+2?" | attnlab chat      # stdin that is not a terminal: one reply per line, until EOF
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from attnlab.inference.streaming import TextStream

if TYPE_CHECKING:
    import torch

    from attnlab.models.base import AttnlabModel
    from attnlab.tokenizer import Tokenizer

Message = dict[str, str]
# end-of-turn markers of common templates: generation also stops at these when the template uses them
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


# ----------------------------------------------------------------------------- templates
@functools.lru_cache(maxsize=8)
def compile_template(source: str) -> Any:
    """A chat template compiled in Jinja2's immutable sandbox (templates are untrusted input)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ValueError(f"the model's chat template is not valid Jinja2 (line {exc.lineno}: {exc.message})") from None


def render_chat(template: str, messages: list[Message], *, add_generation_prompt: bool = True,
                bos_token: str | None = None, eos_token: str | None = None) -> str:
    """The conversation as the model expects to read it (a string; tokenize it without adding BOS)."""
    import jinja2

    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {message!r}")
    try:
        return compile_template(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                 bos_token=bos_token or "", eos_token=eos_token or "")
    except jinja2.exceptions.TemplateError as exc:
        raise ValueError(f"the chat template refused this conversation: {exc}") from None


def chat_template(tokenizer: Tokenizer) -> str:
    """The tokenizer's chat template (from GGUF metadata or the model directory: ``Tokenizer.from_dir``), or a
    clear error."""
    template = tokenizer.chat_template
    if not template:
        raise ValueError("this model has no chat template (it was not fine-tuned for chat); use "
                         "`attnlab generate --prompt ...` to continue text instead, or a chat model such as smollm2")
    return template


def stop_token_ids(tokenizer: Tokenizer, template: str) -> list[int]:
    """Token ids that end the assistant's turn: EOS plus the end-of-turn markers the template writes."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    for marker in END_OF_TURN:
        token_id = tokenizer.token_to_id(marker)
        if marker in template and token_id is not None and token_id not in ids:
            ids.append(int(token_id))
    if not ids:
        raise ValueError("cannot tell where the model's turn ends: the tokenizer has no EOS token and the chat "
                         f"template uses none of {', '.join(END_OF_TURN)}")
    return ids


class _EndOfTurn(Exception):
    """Raised from the stream callback to stop generation at a second end-of-turn token."""


# ----------------------------------------------------------------------------- history
def trim_history(messages: list[Message], fits: Callable[[list[Message]], bool]) -> list[Message]:
    """Drop the oldest turns (system messages stay) until ``fits(messages)``; the last message stays.

    A turn is a user message and the replies after it, so the conversation never starts mid-exchange.
    Returns the trimmed list; raises ValueError if even the system prompt and last message do not fit.
    """
    system = [m for m in messages if m["role"] == "system"]
    rest = [m for m in messages if m["role"] != "system"]
    while not fits(system + rest):
        if len(rest) <= 1:
            raise ValueError("the message is too long for the model's context, even with the conversation "
                             "history dropped; send a shorter message (or raise --context)")
        rest = rest[1:]
        while len(rest) > 1 and rest[0]["role"] != "user":  # drop the rest of that turn too
            rest = rest[1:]
    return system + rest


# ----------------------------------------------------------------------------- a conversation
@dataclass
class Stats:
    prompt_tokens: int = 0
    reply_tokens: int = 0
    seconds: float = 0.0
    total_tokens: int = 0
    turns: int = 0
    dropped_messages: int = 0

    def line(self, context: int) -> str:
        if self.turns == 0:
            return f"[no reply yet; context {context} tokens]"
        used = self.prompt_tokens + self.reply_tokens
        rate = self.reply_tokens / max(self.seconds, 1e-9)
        return (f"[last reply: {self.reply_tokens} tokens in {self.seconds:.2f} s = {rate:.1f} tok/s "
                f"(prompt {self.prompt_tokens} tokens); session: {self.total_tokens} tokens in {self.turns} "
                f"replies; context used {used}/{context} ({100 * used / context:.0f}%)"
                + (f"; {self.dropped_messages} old messages dropped to fit" if self.dropped_messages else "")
                + "]")


@dataclass
class ChatSession:
    """A conversation with one model: history, sampling settings, statistics."""

    model: AttnlabModel
    tokenizer: Tokenizer
    template: str
    system: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    context: int | None = None  # tokens (prompt + reply) a turn may use; default: the model's max_seq_len
    prepare: bool = True  # generate()'s lazy preparation of an unprepared model (False: run it as it is)
    messages: list[Message] = field(default_factory=list)
    stats: Stats = field(default_factory=Stats)

    def __post_init__(self) -> None:
        limit = int(self.model.config.max_seq_len)
        if self.context is None:
            self.context = limit
        if not isinstance(self.context, int) or not (0 < self.context <= limit):
            raise ValueError(f"context={self.context!r} must be between 1 and the model's max_seq_len={limit}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be an integer >= 1")
        from attnlab.inference.sampling_args import check_sampling_args

        check_sampling_args(self.temperature, self.top_k, self.top_p)
        self.stop_ids = stop_token_ids(self.tokenizer, self.template)
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def encode(self, messages: list[Message]) -> list[int]:
        text = render_chat(self.template, messages, add_generation_prompt=True,
                           bos_token=self.tokenizer.bos_token, eos_token=self.tokenizer.eos_token)
        return self.tokenizer.encode(text)

    def prompt(self, user_text: str) -> tuple[list[Message], list[int]]:
        """The conversation with ``user_text`` added, trimmed to leave room for a reply, and its ids."""
        assert self.context is not None
        encoded: dict[int, list[int]] = {}
        room = min(self.max_new_tokens, max(1, self.context // 2))  # a long reply never evicts everything

        def fits(messages: list[Message]) -> bool:
            encoded[len(messages)] = ids = self.encode(messages)
            return len(ids) + room <= self.context

        full = self.messages + [{"role": "user", "content": user_text}]
        kept = trim_history(full, fits)
        return kept, encoded[len(kept)]

    def reply(self, user_text: str, write: Callable[[str], None] | None = None) -> str:
        """Answer ``user_text``, streaming the text to ``write``; the exchange joins the history."""
        if not user_text.strip():
            raise ValueError("empty message")
        import torch

        from attnlab.inference.generate import generate

        messages, ids = self.prompt(user_text)
        assert self.context is not None
        budget = min(self.max_new_tokens, self.context - len(ids))
        stream = TextStream(self.tokenizer)
        produced: list[int] = []
        stops = set(self.stop_ids)

        def on_token(token: torch.Tensor) -> None:
            tok = int(token[0])
            if tok in stops:
                raise _EndOfTurn
            produced.append(tok)
            if write is not None and (piece := stream.push(tok)):
                write(piece)

        seed = None if self.seed is None else self.seed + self.stats.turns
        start = time.perf_counter()
        try:
            generate(self.model, torch.tensor([ids]), budget, temperature=self.temperature, top_k=self.top_k,
                     top_p=self.top_p, seed=seed, eos_token_id=self.stop_ids[0], stream=on_token,
                     prepare=self.prepare)
        except _EndOfTurn:
            pass
        except KeyboardInterrupt:  # Ctrl-C stops this reply; the conversation goes on
            if write is not None:
                write(" [interrupted]")
        seconds = time.perf_counter() - start
        if write is not None and (rest := stream.flush()):
            write(rest)
        text = self.tokenizer.decode(produced)
        self.stats.dropped_messages += len(self.messages) + 1 - len(messages)
        self.messages = messages + [{"role": "assistant", "content": text}]
        self.stats.prompt_tokens, self.stats.reply_tokens, self.stats.seconds = len(ids), len(produced), seconds
        self.stats.total_tokens += len(produced)
        self.stats.turns += 1
        return text


def chat_once(model: AttnlabModel, tokenizer: Tokenizer, text: str, *, system: str | None = None, max_new_tokens: int = 256,
              temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
              seed: int | None = None, context: int | None = None,
              stream: Callable[[str], None] | None = None, prepare: bool = True) -> str:
    """One user message in, the model's reply out (greedy by default), rendered with its chat template."""
    session = ChatSession(model, tokenizer, chat_template(tokenizer), system=system, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, context=context,
                          prepare=prepare)
    return session.reply(text, stream)


__all__ = ["ChatSession", "chat_once", "chat_template", "compile_template", "render_chat", "stop_token_ids",
           "trim_history"]
