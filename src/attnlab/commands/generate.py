"""``attnlab generate``: stream a continuation of a prompt (text through the model's tokenizer, or ids)."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

from attnlab.commands.args import DECODE, DECODE_HELP, add_compile, add_no_prepare, add_precision, parser

if TYPE_CHECKING:
    import torch


def parse_ids(text: str) -> list[int]:
    """``'1,2 3'`` -> ``[1, 2, 3]``; ``ValueError`` naming --prompt-ids otherwise."""
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--prompt-ids must be integers separated by commas or spaces, got {text!r}") from None
    if not ids:
        raise ValueError("--prompt-ids is empty")
    return ids


def check_flags(args) -> None:
    """Every check that needs no model, so that a mistake costs no model load (and no echoed prompt)."""
    from attnlab.inference.sampling_args import check_sampling_args
    from attnlab.textio import check_text

    if args.no_prepare and (args.dtype != "fp32" or args.compile):
        raise ValueError("--no-prepare runs the plain fp32 model; drop --dtype/--compile or --no-prepare")
    check_sampling_args(args.temperature, args.top_k, args.top_p, args.repetition_penalty, flags=True)
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: give a number of tokens >= 0")
    if args.gamma < 1:
        raise ValueError(f"--gamma {args.gamma}: give a number of drafted tokens >= 1")
    if args.prompt is not None:
        args.prompt = check_text(args.prompt, "--prompt")
    elif args.chat is not None:
        args.chat = check_text(args.chat, "--chat")
    else:
        args.prompt_ids = parse_ids(args.prompt_ids)
    if args.chat is not None and (args.draft or args.prompt_lookup or args.repetition_penalty not in (None, 1.0)):
        raise ValueError("--chat runs plain decoding; drop --draft/--prompt-lookup/--repetition-penalty")


def _chat_turn(model, args) -> int:
    """``--chat``: one user message in, the streamed reply out (the template's stop tokens end it)."""
    from attnlab.chat import chat_once
    from attnlab.hub import load_tokenizer
    from attnlab.inference.streaming import print_stream

    start = time.perf_counter()
    text = chat_once(model, load_tokenizer(args.model), args.chat, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                     stream=print_stream, prepare=not args.no_prepare)
    seconds = time.perf_counter() - start
    sys.stdout.write("\n")
    if args.stats:
        print(f"[{len(text)} characters in {seconds:.2f} s]", file=sys.stderr)
    return 0


def main(argv: list[str]) -> int:
    p = parser("attnlab generate", "Generate a continuation of a prompt.")
    p.add_argument("--model", required=True, help="model directory, .gguf file or shipped name (default, ...)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs a tokenizer.json in the model directory)")
    src.add_argument("--prompt-ids", help="prompt token ids, e.g. '1,2,3' (for a model without a tokenizer)")
    src.add_argument("--chat", help="one chat turn: this user message, rendered with the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-eos", action="store_true", help="do not stop at the end-of-text token")
    p.add_argument("--draft", help="speculative decoding with this draft model (same tokenizer)")
    p.add_argument("--prompt-lookup", action="store_true",
                   help="speculative decoding by prompt lookup; with --draft, a hybrid: lookup where the text "
                        "matches, the draft model elsewhere")
    p.add_argument("--gamma", type=int, default=4, help="drafted tokens per step (max, with --adaptive)")
    p.add_argument("--adaptive", action="store_true", help="tune gamma from the running acceptance rate")
    p.add_argument("--stats", action="store_true", help="print speed (and speculative statistics) at the end")
    add_precision(p, DECODE, default="fp32", help=DECODE_HELP)
    add_compile(p)
    add_no_prepare(p)
    p.add_argument("--reference", dest="no_prepare", action="store_true", help="the same as --no-prepare")
    args = p.parse_args(argv)
    check_flags(args)  # before torch and the model load

    import torch

    from attnlab.hub import load_for_decode, load_tokenizer
    from attnlab.inference.generate import generate
    from attnlab.inference.inputs import check_context
    from attnlab.inference.speculative import speculative_generate
    from attnlab.inference.streaming import TextStream

    def load(name: str):
        return load_for_decode(name, args.dtype, compile=args.compile, prepare=not args.no_prepare)

    model = load(args.model)
    if args.chat is not None:
        return _chat_turn(model, args)
    tokenizer = None
    if args.prompt is not None:
        tokenizer = load_tokenizer(args.model)
        ids = tokenizer.encode(args.prompt)
        if not ids:
            raise ValueError("the prompt encodes to no tokens; give a non-empty prompt")
        if max(ids) >= model.config.vocab_size:
            raise ValueError("the tokenizer produces ids outside the model's vocabulary: they do not belong together")
    else:
        ids = args.prompt_ids  # parsed by check_flags
        if max(ids) >= model.config.vocab_size or min(ids) < 0:
            raise ValueError(f"--prompt-ids must be in [0, {model.config.vocab_size}) for this model")
    if model.config.family == "decoder":  # the context check generate() makes, before the prompt is echoed
        check_context(model, len(ids), args.max_new_tokens)
    eos = None
    if not args.no_eos:
        eos = tokenizer.eos_token_id if tokenizer is not None and tokenizer.eos_token_id is not None else model.config.eos_token_id

    generated: list[int] = []
    text_stream = TextStream(tokenizer) if tokenizer is not None else None
    if tokenizer is not None:
        sys.stdout.write(args.prompt)
    else:
        sys.stdout.write(" ".join(map(str, ids)))
    sys.stdout.flush()

    def on_token(token: torch.Tensor) -> None:
        tok = int(token[0])
        if eos is not None and tok == eos:
            return
        generated.append(tok)
        sys.stdout.write(f" {tok}" if text_stream is None else text_stream.push(tok))  # whole characters only
        sys.stdout.flush()

    draft_net = load(args.draft) if args.draft else None
    draft = draft_net if draft_net is not None else ("prompt_lookup" if args.prompt_lookup else None)
    if draft_net is not None and args.prompt_lookup:
        from attnlab.inference.drafters import HybridDrafter

        draft = HybridDrafter(draft_net)
    start = time.perf_counter()
    if draft is None:
        stats = None
        generate(model, torch.tensor([ids]), args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                 top_p=args.top_p, seed=args.seed, eos_token_id=eos, stream=on_token,
                 repetition_penalty=args.repetition_penalty, prepare=not args.no_prepare)
    else:
        if args.repetition_penalty not in (None, 1.0):
            raise ValueError("--repetition-penalty cannot be combined with --draft/--prompt-lookup")
        _, stats = speculative_generate(model, draft, torch.tensor([ids]), args.max_new_tokens, gamma=args.gamma,
                                        adaptive=args.adaptive, temperature=args.temperature, top_k=args.top_k,
                                        top_p=args.top_p, seed=args.seed, eos_token_id=eos, stream=on_token,
                                        return_stats=True, prepare=not args.no_prepare, fallback=True)
    seconds = time.perf_counter() - start
    sys.stdout.write((text_stream.flush() if text_stream is not None else "") + "\n")
    if args.stats:
        print(f"[{len(generated)} tokens in {seconds:.2f} s: {len(generated) / max(seconds, 1e-9):.1f} tok/s]",
              file=sys.stderr)
        for name, m in (("model", model), ("draft", draft_net)):
            sd = None if m is None else m.static_decoder
            if sd is not None:
                print(f"[{name}: {len(sd.stats.graphs)} static decode graphs, first calls (compilation) "
                      f"{sum(sd.stats.graphs.values()):.1f} s; {sd.failed or 'compiled'}]", file=sys.stderr)
        if stats is not None:
            s = stats.as_dict()
            if stats.fell_back_after is not None:
                print(f"[speculative: fell back to plain steps after {stats.fell_back_after} rounds (the draft did "
                      f"not pay); {stats.plain_steps} plain steps]", file=sys.stderr)
            print(f"[speculative: acceptance {s['acceptance_rate']:.2f} (α {s['alpha']:.2f} per position), {s['tokens_per_call']:.2f} tokens per "
                  f"target call, mean gamma {s['mean_gamma']:.1f}, target {s['target_time']:.2f} s, "
                  f"draft {s['draft_time']:.2f} s]", file=sys.stderr)
    return 0
