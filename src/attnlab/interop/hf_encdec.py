"""Hugging Face encoders and encoder-decoders: BERT, BART, Marian (config mapping + one name table each).

Name-table conventions (shared with hf.py): ``{i}`` is a decoder (or only) layer index, ``{e}`` an encoder
layer index; a prefix on our name transforms the tensor: ``OFF2:`` drops BART's two reserved position
rows, ``ROW:`` squeezes a (1, V) row into (V,), ``SKIP:`` ignores a tensor we recompute (Marian's
sinusoidal table).
"""

from __future__ import annotations

from attnlab.config import ModelConfig

ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
        "swish": "silu", "silu": "silu"}


def _act(hf: dict, key: str) -> str:
    act = hf.get(key, "gelu")
    if act not in ACTS:
        raise ValueError(f"{key}={act!r} is not supported; supported: {sorted(ACTS)}")
    return ACTS[act]


def _tok(hf: dict, key: str, vocab: int) -> int | None:
    value = hf.get(key)
    return int(value) if isinstance(value, int) and 0 <= value < vocab else None


# ----------------------------------------------------------------------------- BERT
BERT_NAMES: dict[str, str] = {
    "embeddings.word_embeddings.weight": "embed.weight",
    "embeddings.position_embeddings.weight": "pos_embed.weight",
    "embeddings.token_type_embeddings.weight": "type_embed.weight",
    "embeddings.LayerNorm.weight": "embed_norm.weight",
    "embeddings.LayerNorm.bias": "embed_norm.bias",
    "pooler.dense.weight": "pooler.weight",
    "pooler.dense.bias": "pooler.bias",
    "cls.predictions.transform.dense.weight": "mlm_dense.weight",
    "cls.predictions.transform.dense.bias": "mlm_dense.bias",
    "cls.predictions.transform.LayerNorm.weight": "mlm_norm.weight",
    "cls.predictions.transform.LayerNorm.bias": "mlm_norm.bias",
    "cls.predictions.decoder.weight": "lm_head.weight",
    "cls.predictions.bias": "lm_head.bias",
    "cls.predictions.decoder.bias": "lm_head.bias",
}
for _hf, _ours in {
    "attention.self.query": "attn.q_proj", "attention.self.key": "attn.k_proj", "attention.self.value": "attn.v_proj",
    "attention.output.dense": "attn.o_proj", "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "ffn.up", "output.dense": "ffn.down", "output.LayerNorm": "ffn_norm",
}.items():
    for _p in ("weight", "bias"):
        BERT_NAMES[f"encoder.layer.{{i}}.{_hf}.{_p}"] = f"blocks.{{i}}.{_ours}.{_p}"


def bert_config(hf: dict, model_type: str, keys: set[str]) -> ModelConfig:
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"position_embedding_type={hf['position_embedding_type']!r} is not supported (only absolute)")
    heads = hf["num_attention_heads"]
    mlm = "cls.predictions.transform.dense.weight" in keys
    return ModelConfig(
        family="encoder", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=heads, n_kv_heads=heads, d_ff=hf["intermediate_size"], ffn=_act(hf, "hidden_act"),
        norm="layer", norm_eps=float(hf.get("layer_norm_eps", 1e-12)), norm_position="post", position="learned",
        max_seq_len=hf.get("max_position_embeddings", 512), attn_qkv_bias=True, attn_out_bias=True, ffn_bias=True,
        type_vocab_size=hf.get("type_vocab_size", 2), embed_norm=True,
        pooler="pooler.dense.weight" in keys, mlm_head=mlm,  # without an MLM head, no LM head to bias or tie
        lm_head_bias=mlm, tie_embeddings=bool(hf.get("tie_word_embeddings", True)) or not mlm, attention_kernel="sdpa",
        pad_token_id=_tok(hf, "pad_token_id", hf["vocab_size"]),
    )


# ----------------------------------------------------------------------------- BART and Marian
def _seq2seq_names(embed_norm: bool, positions: str) -> dict[str, str]:
    names = {
        "model.shared.weight": "embed.weight",
        "model.encoder.embed_tokens.weight": "embed.weight",
        "model.decoder.embed_tokens.weight": "decoder_embed.weight",
        "lm_head.weight": "lm_head.weight",
        "final_logits_bias": "ROW:lm_head.bias",
    }
    for side, idx in (("encoder", "{e}"), ("decoder", "{i}")):
        names[f"model.{side}.embed_positions.weight"] = (
            f"OFF2:{side}.pos_embed.weight" if positions == "learned" else f"SKIP:{side}.pos_embed.weight")
        if embed_norm:
            for p in ("weight", "bias"):
                names[f"model.{side}.layernorm_embedding.{p}"] = f"{side}.embed_norm.{p}"
        parts = {"self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj",
                 "self_attn.v_proj": "attn.v_proj", "self_attn.out_proj": "attn.o_proj",
                 "self_attn_layer_norm": "attn_norm", "fc1": "ffn.up", "fc2": "ffn.down",
                 "final_layer_norm": "ffn_norm"}
        if side == "decoder":
            parts.update({"encoder_attn.q_proj": "cross_attn.q_proj", "encoder_attn.k_proj": "cross_attn.k_proj",
                          "encoder_attn.v_proj": "cross_attn.v_proj", "encoder_attn.out_proj": "cross_attn.o_proj",
                          "encoder_attn_layer_norm": "cross_norm"})
        for hf_part, ours in parts.items():
            for p in ("weight", "bias"):
                names[f"model.{side}.layers.{idx}.{hf_part}.{p}"] = f"{side}.blocks.{idx}.{ours}.{p}"
    return names


BART_NAMES = _seq2seq_names(embed_norm=True, positions="learned")
MARIAN_NAMES = _seq2seq_names(embed_norm=False, positions="sinusoidal")


def _same(hf: dict, a: str, b: str, what: str) -> int:
    if hf.get(a) != hf.get(b):
        raise ValueError(f"{a}={hf.get(a)} differs from {b}={hf.get(b)}: attnlab's encoder-decoder uses one {what} "
                         f"for both stacks")
    return hf[a]


def seq2seq_config(hf: dict, model_type: str, keys: set[str]) -> ModelConfig:
    heads = _same(hf, "encoder_attention_heads", "decoder_attention_heads", "head count")
    d_ff = _same(hf, "encoder_ffn_dim", "decoder_ffn_dim", "FFN width")
    vocab = hf["vocab_size"]
    if hf.get("decoder_vocab_size") not in (None, vocab):
        raise ValueError("Marian models with a separate decoder vocabulary are not supported")
    marian = model_type == "marian"
    shared = bool(hf.get("share_encoder_decoder_embeddings", True)) if marian else True
    return ModelConfig(
        family="seq2seq", vocab_size=vocab, d_model=hf["d_model"], n_layers=hf["decoder_layers"],
        n_encoder_layers=hf["encoder_layers"], n_heads=heads, n_kv_heads=heads, d_ff=d_ff,
        ffn=_act(hf, "activation_function"), norm="layer", norm_eps=1e-5, norm_position="post",
        position="sinusoidal" if marian else "learned", max_seq_len=hf.get("max_position_embeddings", 1024),
        attn_qkv_bias=True, attn_out_bias=True, ffn_bias=True, embed_norm=not marian,
        embed_scale=bool(hf.get("scale_embedding", marian)), share_embeddings=shared, lm_head_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)), attention_kernel="sdpa",
        pad_token_id=_tok(hf, "pad_token_id", vocab), bos_token_id=_tok(hf, "bos_token_id", vocab),
        eos_token_id=_tok(hf, "eos_token_id", vocab),
        decoder_start_token_id=_tok(hf, "decoder_start_token_id", vocab),
    )


FAMILIES = {
    "bert": (bert_config, BERT_NAMES),
    "bart": (seq2seq_config, BART_NAMES),
    "marian": (seq2seq_config, MARIAN_NAMES),
}
