"""``attnlab chat``: the interactive loop around ``attnlab.chat.ChatSession``.

    attnlab chat --model smollm2            # interactive; /reset, /stats, /exit
    echo "What is 2+2?" | attnlab chat      # stdin that is not a terminal: one reply per line, until EOF
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from attnlab.chat import ChatSession, chat_template
from attnlab.commands.args import DECODE, DECODE_HELP, add_compile, add_no_prepare, add_precision, parser

COMMANDS = "/reset (forget the conversation), /stats (speed and context), /exit (or Ctrl-D)"


def run(session: ChatSession, stdin: TextIO, stdout: TextIO, *, name: str = "assistant") -> int:
    """Read messages (and /commands) from ``stdin`` until /exit or EOF; stream replies to ``stdout``.

    A line that is not valid UTF-8 (see attnlab.textio) ends piped input with that error; a terminal
    user sees ``[error: ...]`` and types the next message.
    """
    interactive = stdin.isatty()

    def write(piece: str) -> None:
        stdout.write(piece)
        stdout.flush()

    from attnlab.textio import check_text

    number = 0  # lines read, for error messages
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        write(f"chatting with {name}; commands: {COMMANDS}\n")
    while True:
        try:
            if interactive and stdin is sys.stdin:
                line = input("you> ")
            else:
                if interactive:
                    write("you> ")
                line = stdin.readline()
                if not line:
                    break
        except EOFError:
            break
        except KeyboardInterrupt:
            write("\n")
            break
        number += 1
        try:
            line = check_text(line, f"stdin line {number}")
        except ValueError as exc:
            if not interactive:  # piped input in the wrong encoding: every line would be misread; stop
                raise
            write(f"[error: {exc}]\n")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command = text.split()[0].lower()
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                session.reset()
                write("[conversation cleared]\n")
            elif command == "/stats":
                assert session.context is not None
                write(session.stats.line(session.context) + "\n")
            else:
                write(f"[unknown command {command}; commands: {COMMANDS}]\n")
            continue
        if interactive:
            write(f"{name}> ")
        try:
            session.reply(line.rstrip("\n"), write)
        except ValueError as exc:  # e.g. a message longer than the context: say so and go on
            write(f"[error: {exc}]")
        write("\n")
    return 0


def main(argv: list[str]) -> int:
    p = parser("attnlab chat", "Chat with a model that has a chat template (e.g. smollm2). Commands: " + COMMANDS)
    p.add_argument("--model", default="smollm2", help="shipped name (smollm2), .gguf file or model directory")
    p.add_argument("--system", default=None, help="system prompt (default: the template's own, if any)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply, in tokens")
    p.add_argument("--temperature", type=float, default=0.2, help="0 = greedy; default 0.2")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--context", type=int, default=None,
                   help="tokens a turn may use (prompt + reply); default: the model's context")
    add_precision(p, DECODE, default="fp32", help=DECODE_HELP)
    add_no_prepare(p)
    add_compile(p)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (on a busy machine, 1 can be several times faster than 2)")
    args = p.parse_args(argv)
    # every check that needs no model comes first: loading one takes seconds (~20 s for smollm2)
    from attnlab.inference.sampling_args import check_sampling_args
    from attnlab.textio import check_text, lenient_stdin

    check_sampling_args(args.temperature, args.top_k, args.top_p, flags=True)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: give a reply length >= 1 token")
    if args.context is not None and args.context < 1:
        raise ValueError(f"--context {args.context}: give a number of tokens >= 1")
    if args.no_prepare and (args.compile or args.dtype != "fp32"):
        raise ValueError("--no-prepare runs the plain fp32 model as loaded; drop --dtype/--compile or --no-prepare")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads {args.threads}: give a number of threads >= 1")
    if args.system is not None:
        args.system = check_text(args.system, "--system")
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    from attnlab.hub import load_for_decode, load_tokenizer, resolve_path

    source = resolve_path(args.model)  # a shipped name, a directory or a .gguf file (clear error if none)
    # this process owns the model: fused projections and attnlab's kernels unless --no-prepare
    model = load_for_decode(source, args.dtype, compile=args.compile, prepare=not args.no_prepare)
    tokenizer = load_tokenizer(source)
    session = ChatSession(model, tokenizer, chat_template(tokenizer), system=args.system,
                          max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, context=args.context, prepare=not args.no_prepare)
    return run(session, lenient_stdin(), sys.stdout, name=Path(str(args.model)).stem)
