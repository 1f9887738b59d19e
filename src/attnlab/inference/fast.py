"""The fast decode path: one transform that prepares a trained model for generation on a CPU.

``prepare_for_decode(model, precision=..., fuse=True, compile=False)`` rewrites a model *in place* for
inference; the forward contract (``model(tokens, cache=...) -> logits``) and every caller — ``generate``,
speculative decoding, the benchmarks — stay the same:

- **fusion**: each self-attention's Q, K and V projections become one (H + 2K)·D x C matrix, and a SwiGLU
  FFN's gate and up projections one 2F x C matrix. The rows are the same numbers, concatenated, so the
  outputs are unchanged (up to float rounding of the wider product); a decode step reads each weight once
  in 2 calls instead of 5.
- **precision**: ``"fp32"`` keeps float32 weights and the weight-first few-row product of
  ``layers/linear.py``; ``"bf16"`` converts the model to bfloat16 and packs every linear weight for oneDNN;
  ``"int8"`` stores linear weights as Q8_0 blocks (int8, one scale per 32 weights; per output row where
  the in-features hold no whole block) with bfloat16 activations, norms, embeddings and KV cache;
  ``"q8_0"``, ``"q4_0"``, ``"q4_1"``, ``"q4_k"`` keep linear weights in that GGUF block format, multiplied
  with integer dot products (``layers/qblocks.py``; the rest of the model stays float32).
- **compile**: ``"static"`` (what ``True`` means for a decoder-only model) compiles each decode call of n
  tokens into a graph with static shapes — the whole preallocated cache attended under a mask, positions
  and slots passed as tensors — once per (batch, n, cache slots), reused every step
  (``inference/static.py``); prefill stays eager. ``"dynamic"`` (what ``True`` means for other families)
  is ``torch.compile(dynamic=True)`` over the whole forward: the cache length changes every step, so it
  compiles for minutes and decoded slower than eager here. Both fall back to eager, with a warning, when
  no compiler works.

The KV cache is already preallocated and written in place (``inference/cache.py``) and ``generate`` runs
under ``torch.inference_mode``. A prepared model cannot be trained or saved (its weights are packed or
quantised): prepare a copy, keep the original for that.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from attnlab.layers import cpu_kernels
from attnlab.layers.linear import Linear
from attnlab.layers.qblocks import FORMATS, quantize_linear
from attnlab.layers.quant import PackedLinear
from attnlab.memstats import release_freed_memory

PRECISIONS = ("fp32", "bf16", "int8", *FORMATS)
COMPILE_MODES = (False, True, "static", "dynamic")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.bfloat16, **dict.fromkeys(FORMATS, torch.float32)}


def _concat_linear(parts: list[nn.Linear]) -> Linear:
    """One Linear whose output rows are the rows of ``parts`` in order (biases likewise)."""
    weight = torch.cat([p.weight.detach() for p in parts], dim=0)
    has_bias = any(p.bias is not None for p in parts)
    # built on the meta device and given the concatenation itself: no initialisation, no second copy
    fused = Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta", dtype=weight.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([p.bias.detach() if p.bias is not None else
                                             torch.zeros(p.out_features, dtype=weight.dtype, device=weight.device)
                                             for p in parts]), requires_grad=False)
    return fused


def fuse_projections(model: nn.Module) -> int:
    """Fuse self-attention Q/K/V and SwiGLU gate/up projections; returns how many modules were fused."""
    from attnlab.attention.mha import MultiHeadAttention
    from attnlab.layers.ffn import FFN

    n = 0
    for module in model.modules():
        if isinstance(module, MultiHeadAttention) and not module.cross and module.qkv_proj is None:
            module.qkv_proj = _concat_linear([module.q_proj, module.k_proj, module.v_proj])
            del module.q_proj, module.k_proj, module.v_proj
            n += 1
        elif isinstance(module, FFN) and module.gate is not None and module.gate_up is None:
            module.gate_up = _concat_linear([module.gate, module.up])
            del module.gate, module.up
            n += 1
    return n


def _replace_linears(model: nn.Module, make) -> int:
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, make(child))
                n += 1
    return n


def prepare_for_decode(model: nn.Module, *, precision: str = "fp32", fuse: bool = True,
                       compile: bool | str = False) -> nn.Module:
    """Prepare ``model`` in place for fast generation (see the module docstring); returns it.

    ``compile``: False (eager), ``"static"`` (static-shape decode graphs, decoder-only models),
    ``"dynamic"`` (``torch.compile(dynamic=True)`` over the forward), or True: static where it applies,
    dynamic otherwise.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not valid; choose one of: {', '.join(PRECISIONS)}")
    if compile not in COMPILE_MODES or isinstance(compile, int) and not isinstance(compile, bool):
        raise ValueError(f"compile={compile!r} is not valid; choose False, True, 'static' or 'dynamic'")
    from attnlab.inference import static

    if compile is True:
        compile = "static" if static.unsupported_reason(model) is None else "dynamic"
    if getattr(model, "prepared_for_decode", None):
        raise ValueError(f"this model is already prepared for decoding ({model.prepared_for_decode}); "
                         f"prepare a fresh copy to change precision")
    if model.device.type != "cpu" and precision != "fp32":
        raise ValueError(f"precision={precision!r} uses CPU kernels; the model is on {model.device}. "
                         f"Use precision='fp32' there, or move the model to the CPU first")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if fuse:
        fuse_projections(model)
    if precision != "fp32":
        model.to(DTYPES[precision])
        if precision == "bf16":
            _replace_linears(model, lambda lin: PackedLinear(lin.weight, lin.bias))
        elif precision in FORMATS:
            _replace_linears(model, lambda lin: quantize_linear(lin, precision))
        else:
            _replace_linears(model, lambda lin: quantize_linear(lin, "q8_0", torch.bfloat16))
    release_freed_memory()  # the conversion's freed temporaries (130-350 MiB for SmolLM2), see memstats.py
    model.prepared_for_decode = f"precision={precision}, fuse={fuse}, compile={compile}"
    if compile:
        # load (or build) attnlab's CPU kernel before anything is traced: first loaded while dynamo traced a
        # decode step, its CPU check (torch.backends.cpu.get_cpu_capability) broke the trace, and decoding
        # fell back to eager
        cpu_kernels.available()
    if compile == "static":
        static.install(model)
    elif compile == "dynamic":
        _compile_forward(model)
    return model


def _compile_forward(model: nn.Module) -> None:
    """Replace ``model.forward`` by its ``torch.compile`` version, falling back to eager on any failure."""
    eager = model.forward
    try:
        compiled = torch.compile(eager, dynamic=True)
    except Exception as exc:  # no compiler backend on this platform
        warnings.warn(f"torch.compile is not available here ({exc}); decoding stays eager", stacklevel=3)
        return

    def forward(*args, **kwargs):
        if model.__dict__.get("_compile_failed"):
            return eager(*args, **kwargs)
        try:
            return compiled(*args, **kwargs)
        except Exception as exc:  # e.g. no C++ compiler for inductor: report once, run eagerly
            model.__dict__["_compile_failed"] = True
            warnings.warn(f"torch.compile failed ({type(exc).__name__}: {str(exc)[:200]}); decoding stays eager",
                          stacklevel=2)
            return eager(*args, **kwargs)

    model.forward = forward


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer except the token embedding
    (a lookup reads one row) — the numerator of the roofline fraction."""
    total = 0
    seen: set[int] = set()
    embed = getattr(model, "embed", None)
    skip = {id(embed.weight)} if isinstance(embed, nn.Embedding) else set()
    for t in list(model.parameters()) + list(model.buffers()):
        if t is None or id(t) in seen or id(t) in skip:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    lm_head = getattr(model, "lm_head", None)
    if isinstance(lm_head, nn.Linear) and id(lm_head.weight) in skip:  # tied: the head reads the table
        total += lm_head.weight.numel() * lm_head.weight.element_size()
    return total
