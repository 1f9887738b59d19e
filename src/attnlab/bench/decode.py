"""``attnlab bench decode``: greedy decode tokens/s of attnlab vs Hugging Face ``generate``, same weights.

Both run on one random Llama-shaped checkpoint (SmolLM2-135M geometry by default: 30 layers, d 576,
9 heads / 3 KV heads, tied 49,152 vocabulary) written once to a temporary directory and loaded by each
library. The tokens must be identical: a speed-up is reported only when they are.
"""

from __future__ import annotations

import tempfile

import torch

from attnlab.bench.common import machine, markdown_table, timed_pair, write_json
from attnlab.cli import parser

SHAPES = {
    # name: LlamaConfig keyword arguments
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5),
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True),
}


def run(shape: str = "smollm2-135m", prompt_len: int = 32, new_tokens: int = 64, batch: int = 1,
        repeats: int = 3, seed: int = 0) -> list[dict]:
    try:
        import transformers
    except ImportError:
        raise ValueError("this benchmark compares against Hugging Face transformers: pip install transformers") from None
    import attnlab

    if shape not in SHAPES:
        raise ValueError(f"unknown --shape {shape!r}; choose one of {sorted(SHAPES)}")
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPES[shape])).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = attnlab.from_pretrained(tmp)
    ids = torch.randint(0, SHAPES[shape]["vocab_size"], (batch, prompt_len))

    def run_hf():
        with torch.inference_mode():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    def run_ours():
        return attnlab.generate(ours, ids, new_tokens)

    t_hf, out_hf, t_ours, out_ours = timed_pair(run_hf, run_ours, repeats=repeats)
    same = torch.equal(out_hf, out_ours)
    rows = [
        {"impl": "transformers " + transformers.__version__, "tok_per_s": batch * new_tokens / t_hf, "seconds": t_hf},
        {"impl": "attnlab (eager, fp32)", "tok_per_s": batch * new_tokens / t_ours, "seconds": t_ours},
    ]
    for r in rows:
        r.update(shape=shape, batch=batch, prompt=prompt_len, new=new_tokens, same_tokens=same)
    rows[1]["speedup_vs_hf"] = (t_hf / t_ours) if same else "outputs differ: not reported"
    return rows


def main(argv: list[str]) -> int:
    p = parser("attnlab bench decode", "Greedy decode speed: attnlab vs Hugging Face generate, same weights.")
    p.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="write rows and machine info to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.shape, args.prompt_len, args.new_tokens, args.batch, args.repeats)
    info = machine()
    print(f"machine: {info}")
    print(markdown_table(rows, ["impl", "shape", "batch", "prompt", "new", "tok_per_s", "seconds", "same_tokens",
                                "speedup_vs_hf"]))
    write_json(args.json, {"machine": info, "rows": rows})
    if not rows[0]["same_tokens"]:
        print("outputs differ between the two implementations: no speed-up is reported")
        return 1
    return 0
