"""Tiny GGUF files written with the `gguf` package from random Hugging Face models, permuted and quantised as
llama.cpp's converter does (shared by the GGUF tests)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

Q = gguf.GGMLQuantizationType
TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
            "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT = ["The quick brown fox jumps over the lazy dog. " * 3, "def add(a, b):\n    return a + b\n",
        "Grüße aus Köln, naïve café — 東京 😀", "numbers 12345 and 3.14 and 1,000"] * 20


# ----------------------------------------------------------------------------- writing tiny GGUFs
def train_tokenizer() -> Tokenizer:
    """A small byte-level BPE (specials first, as in SmolLM2) — the reference the GGUF copy must match."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    return tok


def vocab_and_merges(tok: Tokenizer) -> tuple[list[str], list[str]]:
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows: per head, halves (t, j) -> interleaved pairs (j, t)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in HF_TO_GGUF:
        return HF_TO_GGUF[hf_name]
    _, _, layer, *rest = hf_name.split(".")
    module, kind = ".".join(rest[:-1]), rest[-1]
    return f"blk.{layer}.{HF_TO_GGUF[module]}.{kind}"


def encode(values: np.ndarray, qtype, quantize=None) -> tuple[np.ndarray, np.ndarray]:
    """(stored array for the writer, what a reader (the gguf package) dequantises it to). ``quantize``
    replaces the gguf package's quantiser (which has no Q4_K)."""
    if qtype == Q.F32 or values.ndim == 1:  # llama.cpp keeps norms (1-D) in F32
        return values, values
    stored = (quantize or gguf.quants.quantize)(values, qtype)
    return stored, gguf.quants.dequantize(stored, qtype).reshape(values.shape)


def write_gguf(path: Path, hf, arch: str, tok: Tokenizer, qtype=Q.F32, *, skip: tuple[str, ...] = (),
               quantize=None) -> dict:
    """Write ``hf`` as llama.cpp would; return the HF state dict as the file stores it (after quantisation)."""
    cfg = hf.config
    tokens, merges = vocab_and_merges(tok)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_chat_template(TEMPLATE)
    stored_state = {}
    for name, tensor in hf.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings or name in skip:
            continue
        values = tensor.detach().numpy().astype(np.float32)
        permute = arch == "llama" and (".q_proj." in name or ".k_proj." in name)
        heads = cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads
        stored, seen = encode(llamacpp_permute(values, heads) if permute else values, qtype, quantize)
        if permute:  # the inverse permutation brings the dequantised rows back in HF order
            seen = seen.reshape(heads, -1, 2, *seen.shape[1:]).swapaxes(1, 2).reshape(seen.shape)
        stored_state[name] = torch.from_numpy(np.ascontiguousarray(seen, dtype=np.float32))
        raw = None if stored is values else qtype
        w.add_tensor(gguf_name(name), stored, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored_state


def randomise(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" in name else 0.08) + (1.0 if "norm" in name else 0.0))
    return model.eval()


def make_hf(arch: str, vocab: int, hidden: int = 64, ffn: int = 96):
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
                  rope_theta=5000.0)
    if arch == "llama":
        return randomise(transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, tie_word_embeddings=False)))
    return randomise(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=True)))
