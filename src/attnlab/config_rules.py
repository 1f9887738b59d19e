"""Which ``ModelConfig`` fields each family and mechanism reads — and the refusal of the others.

``ModelConfig`` is flat: every field exists for every model. A field that the chosen family (or attention
mechanism, or kernel) never reads would be silently ignored — ``family="rwkv"`` with ``norm="batch"`` or
``attention_kernel="ring"`` builds an RWKV that has neither — so such a field set to anything but its
default is refused, naming the field, its value and who reads it. ``check_fields_in_use`` is called by
``ModelConfig.validate``.
"""

from __future__ import annotations

from typing import Any

TRANSFORMER = "the Transformer families (decoder, encoder, seq2seq), not RWKV (its own time and channel mixing)"
# fields only the Transformer families read (RWKV keeps them at their defaults)
TRANSFORMER_FIELDS = ("ffn", "norm_position", "residual", "attn_qkv_bias", "attn_out_bias", "ffn_bias",
                      "attention_kernel", "attention_mechanism", "dropout", "embed_norm", "embed_scale")
# field -> (who reads it, a test on the config's values); the field must keep its default when the test fails
READERS: dict[str, tuple[str, Any]] = {
    **{name: (TRANSFORMER, lambda c: c["family"] != "rwkv") for name in TRANSFORMER_FIELDS},
    # RWKV's LayerNorms always have a bias; RMSNorm and the batch norms have none to switch off
    "norm_bias": ("norm='layer' in the Transformer families", lambda c: c["family"] != "rwkv" and c["norm"] == "layer"),
    # an encoder without its masked-LM head has no LM head at all
    "lm_head_bias": ("the LM head of the Transformer families (an encoder's only with mlm_head=True)",
                     lambda c: c["family"] != "rwkv" and (c["family"] != "encoder" or c["mlm_head"])),
    "tie_embeddings": ("an LM head (an encoder's only with mlm_head=True)",
                       lambda c: c["family"] != "encoder" or c["mlm_head"]),
    "rope_theta": ("position='rope'", lambda c: c["family"] != "rwkv" and c["position"] == "rope"),
    "ring_layout": ("attention_kernel='ring'", lambda c: c["attention_kernel"] == "ring"),
    "segment_len": ("attention_mechanism='infini'", lambda c: c["attention_mechanism"] == "infini"),
    "memory_update": ("attention_mechanism='infini'", lambda c: c["attention_mechanism"] == "infini"),
    "infini_bptt_segments": ("attention_mechanism='infini'", lambda c: c["attention_mechanism"] == "infini"),
    "rwkv_version": ("family='rwkv'", lambda c: c["family"] == "rwkv"),
    "n_encoder_layers": ("family='seq2seq'", lambda c: c["family"] == "seq2seq"),
    "share_embeddings": ("family='seq2seq'", lambda c: c["family"] == "seq2seq"),
    "decoder_start_token_id": ("family='seq2seq'", lambda c: c["family"] == "seq2seq"),
    "type_vocab_size": ("family='encoder'", lambda c: c["family"] == "encoder"),
    "mlm_head": ("family='encoder'", lambda c: c["family"] == "encoder"),
    "pooler": ("family='encoder'", lambda c: c["family"] == "encoder"),
}
# RWKV normalises with LayerNorm and has no positions: these values describe it truthfully, besides the defaults
RWKV_TRUE_VALUES = {"norm": ("layer",), "position": ("none",)}
# attention kernels Infini-attention's local (in-segment) attention can run on
INFINI_KERNELS = ("naive", "sdpa", "flash")


def check_fields_in_use(values: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Raise ``ValueError`` for the first field set away from its default that nothing in the config reads,
    or for a combination of mechanism and kernel that does not exist."""
    for name, (who, reads) in READERS.items():
        if values[name] != defaults[name] and not reads(values):
            raise ValueError(f"{name}={values[name]!r} would be ignored: it is read by {who} only, and this "
                             f"config has family={values['family']!r}, attention_mechanism={values['attention_mechanism']!r},"
                             f" attention_kernel={values['attention_kernel']!r}, position={values['position']!r}; "
                             f"leave {name} at its default ({defaults[name]!r})")
    if values["family"] == "rwkv":
        for name, truthful in RWKV_TRUE_VALUES.items():
            if values[name] not in (defaults[name], *truthful):
                raise ValueError(f"{name}={values[name]!r} would be ignored: family='rwkv' always uses "
                                 f"{name}={truthful[0]!r} (set that, or leave {name} at its default)")
        derived = values["d_model"] // values["n_heads"]  # what head_dim is when not given
        if values["rwkv_version"] == 4 and (values["n_heads"] not in (defaults["n_heads"], 1)
                                            or values["head_dim"] not in (defaults["head_dim"], derived)):
            name = "head_dim" if values["head_dim"] not in (defaults["head_dim"], derived) else "n_heads"
            raise ValueError(f"{name}={values[name]!r} would be ignored: RWKV-4 mixes every channel on its own (no "
                             f"heads; RWKV-7 reads n_heads and head_dim); leave {name} at its default")
        if values["n_kv_heads"] != values["n_heads"]:
            raise ValueError(f"n_kv_heads={values['n_kv_heads']!r} would be ignored: RWKV has no key/value heads "
                             f"to share (leave n_kv_heads unset)")
    if values["attention_mechanism"] == "infini" and values["attention_kernel"] not in INFINI_KERNELS:
        raise ValueError(f"attention_kernel={values['attention_kernel']!r} cannot run Infini-attention's local "
                         f"attention (a segment is attended within one process); choose one of: "
                         f"{', '.join(map(repr, INFINI_KERNELS))}")
