"""The fast decode path: ``prepare_for_decode``, the one place that swaps a model's modules for generation.

Model definitions are plain (``nn.Linear``, attention through the kernel registry); every decode-time
transform is applied here, from outside, and nowhere else.

``prepare_for_decode(model, precision=..., fuse=True, compile=False)`` rewrites a model *in place* for
inference; the forward contract (``model(tokens, cache=...) -> logits``) and every caller — ``generate``,
speculative decoding, the benchmarks — stay the same:

- **fusion** (``inference/fused.py``): each self-attention layer becomes a ``FusedSelfAttention`` whose Q, K
  and V projections are one (H + 2K)·D x C matrix, and a SwiGLU FFN a ``FusedSwiGLU`` with one 2F x C
  gate-up matrix. The rows are the same numbers, concatenated; a decode step reads each weight once in 2
  calls instead of 5.
- **precision**: ``"fp32"`` keeps float32 weights and swaps every ``nn.Linear`` for a ``KernelLinear``
  (``layers/kernel_linear.py``: attnlab's CPU kernel, or the weight-first few-row product where the kernel
  cannot be built); ``"bf16"`` converts the model to bfloat16 and packs every linear weight
  (``layers/quant.PackedLinear``); ``"int8"`` stores linear weights as int8 with one scale per output row (``layers/quant.Int8Linear``,
  weight-only: bfloat16 activations, norms, embeddings and KV cache; Q8_0 blocks with int8 activations
  were tried as int8: on SmolLM2 they answered tests/test_chat.py's question wrongly, although their logits
  were nearer fp32 on another prompt (6.3% vs 8.0% of the norm): undecided until perplexity is measured);
  ``"q8_0"``, ``"q4_0"``, ``"q4_1"``, ``"q4_k"`` keep linear weights in that GGUF block format, multiplied
  with integer dot products (``layers/qblocks.py``; the rest of the model stays float32), except the LM head,
  which is Q8_0 under every block precision, and a token table tied to it, which shares its blocks
  (``quantize_head_and_table``: llama.cpp's rule). ``"native"`` is
  for a GGUF loaded with ``from_pretrained(path, precision="native")`` (``interop/gguf_native.py``): its
  block weights stay exactly as the file stores them (fused by concatenating rows of blocks), float linears
  take the fp32 path; a natively loaded model accepts no other precision.
- **compile**: ``"static"`` (what ``True`` means for a decoder-only model) compiles each decode call of n
  tokens into a graph with static shapes — the whole preallocated cache attended under a mask by the
  registry's ``"static_slots"`` kernel, positions and slots passed as tensors — once per (batch, n, cache
  slots), reused every step (``inference/static.py``); prefill stays eager. Each graph is compiled once per
  machine by AOTInductor into a package in ``$ATTNLAB_CACHE/graphs`` that later processes load in
  milliseconds (``inference/aot.py``; ``"static-jit"`` or ``ATTNLAB_AOT=0``: ``torch.compile`` in every
  process instead). ``"dynamic"`` (what ``True``
  means for other families) is ``torch.compile(dynamic=True)`` over the whole forward. Either one is
  reached through ``model.forward``, which ``install`` routes to the decoder object it records on the model
  (``model.static_decoder`` / ``model.compiled_forward``: their ``failed`` and ``stats`` say what ran).
  Dynamo settings are changed only within the calls that need them. Both fall back to eager, with a
  warning, when no compiler works.

A model prepared this way cannot be trained or saved (fused, packed or quantised weights): prepare a copy.

**Lazy preparation** (``prepare_lazily``): what ``attnlab.generate`` / ``speculative_generate`` do to an
unprepared model on its first call (opt out: ``generate(..., prepare=False)`` or ``ATTNLAB_PREPARE=0``;
``--no-prepare`` on the command line). It is the non-destructive part of the fp32 path only: every
float32 ``nn.Linear`` becomes a ``KernelLinear`` that *shares its Parameters*, so the state dict, tied
weights, an optimiser's references, ``train()``/``eval()`` and ``requires_grad`` are untouched, the model
can still be trained (with gradients the layers compute ``F.linear``) and saved, and with no gradient a
few-row product takes the kernel. No fusion (it would drop the original projections), no precision change,
no compilation: the command-line tools, which own their models, call ``prepare_for_decode`` for those.

**Width invariance — the one policy.** A token's logits must not depend on how many tokens share its call:
speculative verification scores γ + 1 tokens in one call where plain decoding scores one, and greedy
speculative decoding must give plain decoding's tokens exactly, not part from them at a near-tie. Every
module ``prepare_for_decode`` puts in place obeys it, each one tested bit for bit (width 1 against every
width up to 16, at every position):

- fp32 linears: ``KernelLinear`` — attnlab's kernel computes each output element by one fixed sequence of
  FMAs whatever the rows or threads; the fallback feeds the BLAS 8 rows at a time padded to blocks of 4
  (tests/layers/test_kernel_linear.py, test_cpu_kernels.py);
- bf16 / int8 linears: the same kernel; oneDNN's fallback gets a single row twice, its one-row kernel
  rounding otherwise (``layers/quant.py``; tests/inference/test_fast.py);
- fused projections: a weight row's dot product does not depend on the matrix it sits in (kernel path);
- static-shape attention: query rows padded to blocks of 4 and slots in fixed blocks of 256
  (``attention/slots.py``);
- compiled graphs: bf16 roundings kept as in eager code (``static.inductor_options``), the fallback's
  product and oneDNN's as opaque ops, RoPE tables computed outside the graph.

Where it does not hold, by design: an *unprepared* model (``prepare=False``) is plain PyTorch, whose BLAS
picks its kernel by the number of rows; linear layers smaller than ``kernel_linear.SKINNY_MIN_WEIGHT``
elements (test-sized models) keep ``F.linear``; and the eager attention kernels (sdpa, naive, flash) over
``cache[:length]`` sum over as many keys as the call's last token sees. So the exact promise — greedy
speculative decoding equal to plain decoding bit for bit — is the static path's
(``compile="static"``); the eager prepared path is width-invariant in its linear layers, which carry nearly
all of a step's arithmetic. tests/inference/test_static_decode.py checks it end to end.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

from attnlab.attention.mha import MultiHeadAttention
from attnlab.inference.fused import FusedSelfAttention, FusedSwiGLU, fusable
from attnlab.layers import cpu_kernels
from attnlab.layers.ffn import FFN
from attnlab.layers.kernel_linear import KernelLinear
from attnlab.layers.qblocks import FORMATS, BlockEmbedding, BlockLinear, format_for, quantize_linear
from attnlab.layers.quant import Int8Linear, PackedLinear
from attnlab.memstats import release_freed_memory

if TYPE_CHECKING:
    from attnlab.models.base import AttnlabModel

PRECISIONS = ("fp32", "bf16", "int8", *FORMATS)  # what prepare_for_decode converts a float model to
NATIVE = "native"  # a GGUF loaded with from_pretrained(..., precision="native"): its formats kept as stored
COMPILE_MODES = (False, True, "static", "static-jit", "dynamic")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.bfloat16, **dict.fromkeys(FORMATS, torch.float32)}


def fuse_projections(model: nn.Module) -> int:
    """Replace each self-attention layer by a ``FusedSelfAttention`` and each SwiGLU FFN by a
    ``FusedSwiGLU``; returns how many modules were replaced."""
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MultiHeadAttention) and not child.cross and fusable(
                    [child.q_proj, child.k_proj, child.v_proj]):
                setattr(parent, name, FusedSelfAttention(child))
            elif isinstance(child, FFN) and child.kind == "swiglu" and fusable([child.gate, child.up]):
                setattr(parent, name, FusedSwiGLU(child))
            else:
                continue
            n += 1
    return n


def _replace_linears(model: nn.Module, make, *, only_plain: bool = False) -> int:
    """Replace every ``nn.Linear`` child (exactly ``nn.Linear`` with ``only_plain``) by ``make(child)``."""
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and (type(child) is nn.Linear or not only_plain):
                setattr(parent, name, make(child))
                n += 1
    return n


HEAD_FORMAT = "q8_0"  # the LM head (and a table tied to it) under every block precision, as llama.cpp does


def quantize_head_and_table(model: AttnlabModel, precision: str) -> None:
    """The block precisions' rule for the LM head, as llama.cpp's quantiser applies it: the head is kept at
    8 bits (Q8_0) whatever the layers' format — measured on SmolLM2, a 4-bit head alone cost +4.3% of
    perplexity against the file's Q8_0 one. A token table tied to the head becomes a ``BlockEmbedding`` over
    the same blocks (one table, as stored in a GGUF, instead of a float32 copy: 108 MiB -> 30 MiB)."""
    head, embed = model.output_embeddings(), model.input_embeddings()
    if type(head) is not nn.Linear or format_for(HEAD_FORMAT, head.in_features) is None:
        return
    tied = isinstance(embed, nn.Embedding) and embed.weight is head.weight
    model.lm_head = BlockLinear.from_float(head.weight, head.bias, HEAD_FORMAT)
    if tied:
        model.embed = BlockEmbedding(model.lm_head.blocks, HEAD_FORMAT, embed.embedding_dim)


def kernel_linears(model: nn.Module) -> int:
    """Swap every plain ``nn.Linear`` for a ``KernelLinear`` sharing its Parameters; returns how many."""
    return _replace_linears(model, KernelLinear.sharing, only_plain=True)


_lazy = {"enabled": True}


def no_lazy_preparation() -> contextlib.AbstractContextManager[None]:
    """Within this block ``prepare_lazily`` does nothing (a command's ``--no-prepare`` around calls that
    reach ``generate`` through other code)."""
    return cpu_kernels.switched_off(_lazy)


def prepare_lazily(model: nn.Module) -> bool:
    """The non-destructive fp32 preparation (see "Lazy preparation" above), once per model; returns whether
    it ran now. Skipped for a model already prepared, when ``ATTNLAB_PREPARE=0``, and within
    ``no_lazy_preparation()``."""
    if not _lazy["enabled"] or os.environ.get("ATTNLAB_PREPARE", "1") == "0":
        return False
    if model.prepared_for_decode:
        return False
    if model.lazily_prepared:
        return False
    kernel_linears(model)
    model.lazily_prepared = True
    return True


def prepare_for_decode(model: nn.Module, *, precision: str = "fp32", fuse: bool = True,
                       compile: bool | str = False) -> nn.Module:
    """Prepare ``model`` in place for fast generation (see the module docstring); returns it.

    ``compile``: False (eager), ``"static"`` (static-shape decode graphs, decoder-only models, compiled
    ahead of time and cached on disk for later processes), ``"static-jit"`` (the same graphs through
    ``torch.compile`` in each process), ``"dynamic"`` (``torch.compile(dynamic=True)`` over the forward), or True: static where it applies,
    dynamic otherwise.
    """
    if precision not in (*PRECISIONS, NATIVE):
        raise ValueError(f"precision={precision!r} is not valid; choose one of: {', '.join((*PRECISIONS, NATIVE))}")
    as_stored = model.stored_weights
    if as_stored and precision != NATIVE:
        raise ValueError(f"this model keeps its weights {as_stored} (from_pretrained(..., precision='native')): "
                         f"prepare it with precision='native', or load it without precision to convert it")
    if precision == NATIVE and not as_stored:
        raise ValueError("precision='native' keeps a GGUF's own weight formats: load the model with "
                         "from_pretrained(path_to_gguf, precision='native') first")
    if compile not in COMPILE_MODES or isinstance(compile, int) and not isinstance(compile, bool):
        raise ValueError(f"compile={compile!r} is not valid; choose False, True, 'static', 'static-jit' or 'dynamic'")
    from attnlab.inference import static

    if compile is True:
        compile = "static" if static.unsupported_reason(model) is None else "dynamic"
    if model.prepared_for_decode:
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
    if precision in ("fp32", NATIVE):  # native: block weights stay as loaded, float linears as fp32
        kernel_linears(model)
    else:
        model.to(DTYPES[precision])
        if precision == "bf16":
            _replace_linears(model, lambda lin: PackedLinear(lin.weight, lin.bias))
        elif precision in FORMATS:
            quantize_head_and_table(model, precision)
            _replace_linears(model, lambda lin: quantize_linear(lin, precision))
        else:
            _replace_linears(model, lambda lin: Int8Linear(lin.weight, lin.bias, torch.bfloat16))
    release_freed_memory()  # the conversion's freed temporaries (130-350 MiB for SmolLM2), see memstats.py
    model.eval()  # the modules swapped in above start in training mode
    model.prepared_for_decode = f"precision={precision}, fuse={fuse}, compile={compile}"
    if compile:
        # load (or build) attnlab's CPU kernel before anything is traced: first loaded while dynamo traced a
        # decode step, its CPU check (torch.backends.cpu.get_cpu_capability) broke the trace, and decoding
        # fell back to eager
        cpu_kernels.available()
    if compile in ("static", "static-jit"):  # static: AOT packages cached on disk (inference/aot.py)
        static.install(model, aot=None if compile == "static" else False)
    elif compile == "dynamic":
        CompiledForward.install(model)
    return model


class CompiledForward:
    """``torch.compile(dynamic=True)`` over a model's whole forward, falling back to eager (once, with a
    warning) on any failure. Installed as ``model.compiled_forward``, with ``model.forward`` routed to it;
    ``failed`` says why it runs eagerly (None while compiled)."""

    def __init__(self, model: nn.Module) -> None:
        self.eager_forward = model.forward
        self.failed: str | None = None
        try:
            self.compiled = torch.compile(self.eager_forward, dynamic=True)
        except Exception as exc:  # no compiler backend on this platform
            self._fail(f"torch.compile is not available here ({exc})")

    @classmethod
    def install(cls, model: nn.Module) -> CompiledForward:
        compiled = cls(model)
        model.compiled_forward = compiled
        model.forward = compiled.forward
        return compiled

    def _fail(self, why: str) -> None:
        self.failed = why
        warnings.warn(f"{why}; decoding stays eager", stacklevel=4)

    def forward(self, *args, **kwargs):
        if self.failed:
            return self.eager_forward(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as exc:  # e.g. no C++ compiler for inductor: report once, run eagerly
            self._fail(f"torch.compile failed ({type(exc).__name__}: {str(exc)[:200]})")
            return self.eager_forward(*args, **kwargs)


def weight_bytes(model: AttnlabModel) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer except the token embedding
    (a lookup reads one row) — the numerator of the roofline fraction."""
    total = 0
    seen: set[int] = set()
    embed, lm_head = model.input_embeddings(), model.output_embeddings()
    skip = {id(embed.weight)} if isinstance(embed, nn.Embedding) else set()
    if isinstance(embed, BlockEmbedding) and not (isinstance(lm_head, BlockLinear) and lm_head.blocks is embed.blocks):
        skip.add(id(embed.blocks))  # an untied table in blocks: one row read (a tied one is the head's read)
    for t in list(model.parameters()) + list(model.buffers()):
        if t is None or id(t) in seen or id(t) in skip:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    if isinstance(lm_head, nn.Linear) and id(lm_head.weight) in skip:  # tied: the head reads the table
        total += lm_head.weight.numel() * lm_head.weight.element_size()
    return total
