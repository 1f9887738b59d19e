"""Every named model shape in one place: the training recipes of ``attnlab train --preset NAME`` and the
default model of each built-in seq2seq task.

A preset is ``{"model": ModelConfig fields, "train": training settings}``; ``vocab_size`` comes from the
tokenizer and the special-token ids from the task, so neither is here.
"""

from __future__ import annotations

# model fields and training settings of the named presets (vocab_size comes from the tokenizer)
PRESETS: dict[str, dict] = {
    "default": {"model": dict(d_model=384, n_layers=6, n_heads=6, n_kv_heads=2, d_ff=1024, max_seq_len=1024),
                "train": dict(steps=4000, batch_size=16, lr=1e-3, warmup=200, seq_len=256, vocab_size=8192,
                              save_dtype="bf16", eval_every=250, save_every=250)},
    "default-draft": {"model": dict(d_model=128, n_layers=2, n_heads=4, n_kv_heads=1, d_ff=384, max_seq_len=1024),
                      "train": dict(steps=3000, batch_size=16, lr=2e-3, warmup=100, seq_len=256, vocab_size=8192,
                                    save_dtype="bf16", eval_every=250, save_every=250)},
    # a draft for SmolLM2-135M: reads its 49,152-token vocabulary, scores the 8,192 tokens SmolLM2 ranks first
    # most often, 4 thin layers, distilled from stored teacher labels (``attnlab data teacher --teacher smollm2``,
    # then ``--tokenizer smollm2 --teacher-data DIR``)
    "smollm2-draft": {"model": dict(d_model=192, n_layers=4, n_heads=3, n_kv_heads=1, d_ff=512, max_seq_len=8192,
                                    rope_theta=100000.0, tie_embeddings=False, head_vocab_size=8192),
                      "train": dict(steps=3000, batch_size=16, lr=2e-3, warmup=100, seq_len=256,
                                    save_dtype="bf16", eval_every=100, save_every=100, eval_windows=64)},
    # English -> Spanish (``--task translation --data DIR``): 3+3 pre-norm layers, GQA 8/2, GELU, 6.7M parameters
    # (GELU + LayerNorm + learned positions: 13% less CPU per step than SwiGLU + RMSNorm + RoPE, measured)
    "translate-en-es": {"model": dict(d_model=256, n_layers=3, n_encoder_layers=3, n_heads=8, n_kv_heads=2, d_ff=1024,
                                      ffn="gelu", norm="layer", norm_position="pre", position="learned",
                                      max_seq_len=128, dropout=0.1),
                        "train": dict(steps=3000, batch_size=48, lr=1.5e-3, warmup=200, save_dtype="bf16",
                                      eval_every=250, save_every=250, weight_decay=0.01, beta2=0.98)},
    "tiny": {"model": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=256),
             "train": dict(steps=50, batch_size=8, lr=3e-3, warmup=5, seq_len=64, vocab_size=512, eval_every=25,
                           save_every=25, eval_windows=8)},
}

# the model of `attnlab train --task NAME` when no --preset is given (the task adds its special-token ids)
TASK_MODELS: dict[str, dict] = {
    "numbers": dict(family="seq2seq", d_model=128, n_layers=3, n_encoder_layers=3, n_heads=4, n_kv_heads=2, d_ff=384,
                    ffn="gelu", norm="layer", norm_position="pre", position="learned", max_seq_len=128,
                    tie_embeddings=True),
    # the translate-en-es shape without its dropout (the preset's long run regularises; a plain task run does not)
    "translation": dict(family="seq2seq", tie_embeddings=True,
                        **{k: v for k, v in PRESETS["translate-en-es"]["model"].items() if k != "dropout"}),
}
