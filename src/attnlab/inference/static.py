"""Static-shape decoding: one compiled graph per (batch, tokens per call, cache slots), reused every step.

Eager decoding of a small model on a CPU is dominated by dispatch, not by weight reads: each of the ~70
operations per layer costs a few microseconds whatever its size. ``torch.compile`` fuses most of them away,
but the eager decode step attends to ``cache[:length]``, a shape that changes every step, so a compiled
graph either recompiles each step or is compiled with dynamic shapes (slow to compile, slow to run).

Here a decode call of ``n`` tokens has shapes that do not depend on the cache length:

- the new K/V are written into the preallocated (L, B, K, S, D) buffers at their slots with an in-graph
  ``index_copy_`` (the slots are a tensor input);
- attention reads all S slots under a mask (B, n, S): slot j is visible to new token i when
  j <= length + i (causal within the new tokens, nothing beyond them) and the cache's key mask marks j as a
  real token (left padding, speculative holes);
- positions (RoPE or learned, counting real tokens) come in as a tensor, computed by ``KVCache.begin``.

So the graph is compiled once per (B, n, S) and replayed (by default compiled ahead of time into a package cached
on disk that later processes load, ``inference/aot.py``; ``compile="static-jit"``: ``torch.compile`` in each process): plain decoding runs n = 1, speculative
verification n = γ + 1, the draft 1 or 2. A call with a width that has no graph yet runs the narrowest
compiled one of up to twice its width, with padding rows (written past the new tokens, where nothing sees
them; their logits dropped), so speculative decoding's shorter last rounds do not each compile a graph
(``StaticDecoder.width``). The cache's slots S are rounded up (``StaticDecoder.slots_for``: a power of two,
at least 256, with room for the padding rows), so generations of different lengths share graphs; the
extra slots are masked out and the cache still refuses tokens beyond the ``max_len`` it was asked for.
Prefill (an empty cache, or more than ``max_tokens`` tokens) stays on the eager path, as does anything
the static path does not cover.

The model's contract is unchanged: ``model(tokens, cache=cache, attention_mask=...) -> logits``, so
``generate``, speculative decoding, ``crop`` and holes work as before. The decoder's own modules run inside
the graph (norm placement, fused projections, bf16/int8 linears); attention runs the registry's
``"static_slots"`` kernel (attention/slots.py), which the step's cache (``StaticSlots``) names.

Shape legend: L layers, B batch, n new tokens, S cache slots, H heads, K kv heads, G = H / K, D head dim,
V vocab.
"""

from __future__ import annotations

import contextlib
import time
import types
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from attnlab.inference import aot as aot_module
from attnlab.inference.cache import Cache, KVCache
from attnlab.models.decoder import DecoderLM

MIN_SLOTS = 256  # cache slots are rounded up to a power of two at least this large (see slots_for)
MAX_TOKENS = 16  # calls with more new tokens than this (prompts) run eagerly


class StaticSlots:
    """The cache a static decode call's attention layers see: the whole (L, B, K, S, D) cache, the slots
    the ``n`` new tokens are written to, and (in the step's key mask) which slots each new token may see.

    It follows the cache protocol of attention/mha.py: ``update`` writes the new K/V at their slots and
    returns every slot, and ``attention_kernel`` names the registry's kernel for that layout
    (``"static_slots"``, attention/slots.py), which reads the per-query (B, n, S) mask."""

    attention_kernel = "static_slots"

    def __init__(self, k: list[Tensor], v: list[Tensor], slots: Tensor) -> None:
        self.k, self.v = k, v  # L x (B, K, S, D): per-layer views of the cache buffers
        self.slots = slots  # (n,) long

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """New k/v (B, K, n, D), positions applied, written in place at ``slots`` -> all (B, K, S, D)."""
        ck, cv = self.k[layer], self.v[layer]
        ck.index_copy_(2, self.slots, k.to(ck.dtype))
        cv.index_copy_(2, self.slots, v.to(cv.dtype))
        return ck, cv


def decode_step(model: DecoderLM, tokens: Tensor, positions: Tensor, slots: Tensor, key_mask: Tensor,
                rope: tuple[Tensor, Tensor] | None, k: list[Tensor], v: list[Tensor]) -> Tensor:
    """One decode call with static shapes: tokens/positions (B, n), slots (n,), key_mask (B, S) real
    slots, rope the (cos, sin) of the positions (or None), k/v the cache's per-layer (B, K, S, D)
    buffers (written in place) -> logits (B, n, V).

    The buffers come in as one tensor per layer (views of the (L, B, K, S, D) cache): written through a
    view of a single (L, ...) input, inductor copied the whole cache at every layer instead of writing
    the new slots in place. RoPE's cos/sin are computed once per call, outside the graph: inside,
    inductor fused them into the kernels that use them, with scalar ``cos`` in some and vector ``cos`` in
    others (they differ in the last bit), one more way for graphs of different widths to differ."""
    S = key_mask.shape[1]
    visible = torch.arange(S, device=key_mask.device)[None, None, :] <= slots[None, :, None]  # (1, n, S)
    allowed = visible & key_mask[:, None, :]  # (B, n, S): each new token's visible slots
    x = model.run_stack(model.embed(tokens), positions, key_mask=allowed, cache=StaticSlots(k, v, slots), rope=rope)
    return model.head(x)  # (B, n, V)


@dataclass
class CompileStats:
    graphs: dict[tuple, float] = field(default_factory=dict)  # (B, n, S, dtype, device) -> s of its 1st call
    static_calls: int = 0
    eager_calls: int = 0


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the static path cannot run ``model`` (None when it can)."""
    if not isinstance(model, DecoderLM):
        return "static-shape decoding covers decoder-only models"
    cfg = model.config
    if cfg.unbounded_context:  # its cache is a streaming state, not the KVCache the static graphs write
        return f"static-shape decoding does not cover attention_mechanism={cfg.attention_mechanism!r}"
    if cfg.attention_kernel == "ring":
        return "static-shape decoding does not cover the ring kernel (it shards the sequence over processes)"
    return None


def inductor_options(mode: str | None) -> dict:
    """Inductor settings for the decode graphs (``mode``'s, if given, plus one of ours).

    ``emulate_precision_casts``: by default inductor drops a bf16 rounding between two fused operations
    (the value stays float32 in a register) but keeps it where a value is written to memory, and which
    values are written depends on how a graph of that width happened to be fused. A token's logits then
    differ, in the last bits, between a 1-token and a 4-token graph, and bf16 speculative decoding parts
    from plain decoding at near-ties (measured on SmolLM2-135M: 0.25 in the logits). With every cast
    rounded as in eager mode, each graph computes what the eager code says, whatever its fusion."""
    options = {}
    if mode:
        from torch._inductor import list_mode_options

        options.update(list_mode_options(mode))
    options["emulate_precision_casts"] = True
    return options


class StaticDecoder:
    """Routes a prepared decoder's decode calls through compiled static-shape graphs (see the module
    docstring); prefill and anything uncovered goes to the eager forward. Installed by
    ``prepare_for_decode(..., compile="static")``; ``model.static_decoder.stats`` lists the graphs compiled
    and the seconds each first call took (compilation included).

    ``skip_guards``: once a graph exists for a call's (B, n, S, dtype, device), run it with
    ``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``: dynamo then checks only the guards that
    tell this model's graphs apart (its own code object: shapes), instead of every parameter of the model
    on every call. Safe here because a key is run this way only once its graph exists, inputs get row-major
    strides, and a prepared model's weights never change; a recompile dynamo still asks for (another grad
    mode) is raised before anything runs and is then compiled normally.

    ``compiler`` replaces ``torch.compile`` (tests run the step uncompiled or with another backend).

    ``aot`` (default: on for a CPU model, unless ``ATTNLAB_AOT=0`` or a ``compiler`` is given): each graph is
    an AOTInductor package cached on disk and shared by later processes (``inference/aot.py``; its load and
    build counts in ``aot.stats``), instead of a ``torch.compile`` graph traced again in every process. A
    graph that cannot be exported or built that way is compiled with ``torch.compile`` (one warning).
    """

    def __init__(self, model: DecoderLM, *, mode: str | None = None, max_tokens: int = MAX_TOKENS,
                 min_slots: int = MIN_SLOTS, skip_guards: bool = True, compiler=None, aot: bool | None = None,
                 aot_dir=None) -> None:
        self.model = model
        if aot is None:
            aot = compiler is None and aot_module.enabled() and model.device.type == "cpu"
        self.aot = aot_module.AotGraphs(decode_step, model, inductor_options(mode), aot_dir) if aot else None
        self.eager_forward = model.forward
        self.eager_new_cache = model.new_cache
        self.max_tokens, self.min_slots, self.skip_guards = max_tokens, min_slots, skip_guards
        self.stats = CompileStats()
        self.failed: str | None = None
        self._ones: dict[tuple, Tensor] = {}
        self._arange: dict[tuple, Tensor] = {}
        self._widths: dict[tuple, int] = {}
        self.compiled = None
        self._compiler, self._mode = compiler, mode
        self._jit_keys: set[tuple] = set()  # the keys torch.compile has a graph for
        if self.aot is None:  # with packages, torch.compile (and importing dynamo: ~3 s) only if they fail
            self._compile_step()

    def _compile_step(self) -> None:
        # a copy of decode_step's code object per model: dynamo keeps compiled graphs (and guards) per code
        # object, so each model's graphs are told apart by their shapes alone (see ``skip_guards``) and no
        # model's graphs count against another's recompile limit
        step = types.FunctionType(decode_step.__code__.replace(), decode_step.__globals__, "decode_step")
        try:
            compile_fn = torch.compile if self._compiler is None else self._compiler
            self.compiled = compile_fn(step, dynamic=False, fullgraph=True, options=inductor_options(self._mode))
        except Exception as exc:  # no compiler backend on this platform
            self._fail(f"torch.compile is not available here ({type(exc).__name__}: {str(exc)[:200]})")

    def _fail(self, why: str) -> None:
        self.failed = why
        warnings.warn(f"{why}; decoding stays eager", stacklevel=4)

    # ------------------------------------------------------------------ installed on the model
    def new_cache(self, batch: int, max_len: int | None = None, *, dtype: torch.dtype | None = None):
        """The model's cache, with its slots rounded up (see ``slots_for``)."""
        cache = self.eager_new_cache(batch, max_len, dtype=dtype)
        if not isinstance(cache, KVCache) or self.failed:
            return cache
        return KVCache(cache.k.shape[0], batch, cache.k.shape[2], cache.k.shape[4], cache.max_len,
                       dtype=cache.k.dtype, device=cache.k.device, slots=self.slots_for(cache.max_len))

    def slots_for(self, max_len: int) -> int:
        """Slots allocated for a cache of ``max_len`` positions: room for the padding rows of a call
        (``max_tokens`` more), rounded up to a power of two of at least ``min_slots``, and at most the
        model's context (plus that room) rounded up to a multiple of ``min_slots``. Few distinct S means few
        graphs; attention reads at most twice the slots in use."""
        need = max_len + self.max_tokens
        ceiling = -(-(self.model.config.max_seq_len + self.max_tokens) // self.min_slots) * self.min_slots
        return max(need, min(max(self.min_slots, 1 << (need - 1).bit_length()), ceiling))

    def covers(self, cache, T: int) -> bool:
        return (not self.failed and isinstance(cache, KVCache) and 0 < cache.length and T <= self.max_tokens
                and cache.length + T <= cache.slots and cache.length + T <= self.model.config.max_seq_len)

    def width(self, B: int, T: int, cache: KVCache) -> int:
        """Tokens per compiled call for T new ones: the narrowest graph already compiled for this (B, S)
        with T to 2T tokens (the extra rows are padding), else T itself (a new graph). A product with
        more rows costs more on this CPU (5 rows ~1.5x 4, 8 rows ~2x), so widths are not rounded up to
        fixed buckets; reusing a compiled one serves the rare odd widths (speculative decoding's shorter
        last rounds, an adaptive γ, a hybrid drafter's catch-up feeds) without compiling each."""
        key = (B, T, cache.slots, cache.k.dtype, str(cache.k.device))
        w = self._widths.get(key)
        if w is None:
            fits = [k[1] for k in self.stats.graphs
                    if (k[0],) + k[2:] == (B,) + key[2:] and T <= k[1] <= 2 * T]
            w = self._widths[key] = min(fits, default=T)
        return w if cache.length + w <= cache.slots else T

    def forward(self, input_ids: Tensor, cache: Cache | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None) -> Tensor:
        B, T = input_ids.shape
        if position_ids is not None or not self.covers(cache, T):
            self.stats.eager_calls += 1
            return self.eager_forward(input_ids, cache=cache, attention_mask=attention_mask, position_ids=position_ids)
        if cache.batch_size != B:
            raise ValueError(f"cache was made for batch {cache.batch_size}, input has batch {B}")
        positions, _ = cache.begin(T, attention_mask)  # (B, T); raises when the tokens do not fit
        n = self.width(B, T, cache)
        tokens = input_ids
        if n > T:  # padding rows: written past the new tokens (never visible to them), logits dropped
            tokens = torch.cat([input_ids, input_ids[:, -1:].expand(B, n - T)], dim=1)
            positions = torch.cat([positions, positions[:, -1:].expand(B, n - T)], dim=1)
        tokens, positions = _canonical(tokens), _canonical(positions)
        key_mask = cache.key_mask if cache.key_mask is not None else self._all_real(B, cache)
        slots = self._slot_range(n, cache.k.device) + cache.length
        key = (B, n, cache.slots, cache.k.dtype, str(cache.k.device))
        known = key in self.stats.graphs
        start = time.perf_counter()
        rope = None if self.model.rope is None else self.model.rope(positions, self.model.dtype)
        args = (self.model, tokens, positions, slots, key_mask, rope, *cache.layer_views())
        try:
            logits = None
            if self.aot is not None:
                logits = self._run_aot(key, args)
                if logits is None and self.compiled is None:
                    self._compile_step()
                    if self.compiled is None:  # no torch.compile either (reported): eager
                        self.stats.eager_calls += 1
                        return self.eager_forward(input_ids, cache=cache, attention_mask=attention_mask)
            # guards skipped only for a graph dynamo itself compiled (not one a package served until now)
            if logits is None and key in self._jit_keys and self.skip_guards:
                try:
                    with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                        logits = self.compiled(*args)
                except RuntimeError as exc:  # dynamo wants a graph our key does not tell apart (e.g. grad
                    if "skip_guard_eval_unsafe" not in str(exc):  # mode): raised before running; recompile
                        raise
            if logits is None:  # may compile: with room for this model's graphs, within this call only
                with recompile_room(len(self.stats.graphs) + 1):
                    logits = self.compiled(*args)
                self._jit_keys.add(key)
        except Exception as exc:  # e.g. no C++ compiler for inductor: report once, run eagerly
            self._fail(f"static-shape compilation failed ({type(exc).__name__}: {str(exc)[:300]})")
            self.stats.eager_calls += 1
            return self.eager_forward(input_ids, cache=cache, attention_mask=attention_mask)
        if not known:
            self.stats.graphs[key] = time.perf_counter() - start
            self._widths.clear()  # a new width may serve calls that compiled nothing so far
        self.stats.static_calls += 1
        cache.commit(T, attention_mask)
        return logits if n == T else logits[:, :T]  # (B, T, V)

    def _run_aot(self, key: tuple, args: tuple) -> Tensor | None:
        """The call through the AOT package of ``key`` (loaded or built on first use); None, after one
        warning that turns AOT off for this model, when it cannot be exported or built."""
        _, tokens, positions, slots, key_mask, rope, k, v = args
        inputs = [tokens, positions, slots, key_mask, *(rope or ()), *k, *v]
        try:
            graph = self.aot.get(key, inputs, rope is not None, len(k))
        except Exception as exc:  # e.g. an operation export does not cover: torch.compile per process
            warnings.warn(f"ahead-of-time compilation of the decode graph failed ({type(exc).__name__}: "
                          f"{str(exc)[:300]}); compiling it in this process with torch.compile", stacklevel=4)
            self.aot = None
            return None
        return graph(inputs)

    # ------------------------------------------------------------------ helpers
    def _all_real(self, B: int, cache: KVCache) -> Tensor:
        key = (B, cache.slots, cache.k.device)
        if key not in self._ones:
            self._ones[key] = torch.ones(B, cache.slots, dtype=torch.bool, device=cache.k.device)
        return self._ones[key]

    def _slot_range(self, n: int, device: torch.device) -> Tensor:
        key = (n, device)
        if key not in self._arange:
            self._arange[key] = torch.arange(n, device=device)
        return self._arange[key]


def _canonical(t: Tensor) -> Tensor:
    """``t`` with row-major strides: dynamo's guards compare strides, and a (B, 1) column cut from a wider
    tensor (``ids[:, -1:]``) has other strides than a fresh one — a different graph, not the compiled one."""
    stride, expect = t.stride(), 1
    for dim in range(t.dim() - 1, -1, -1):
        if stride[dim] != expect:
            return t.clone(memory_format=torch.contiguous_format)
        expect *= t.shape[dim]
    return t


def recompile_room(graphs: int) -> contextlib.AbstractContextManager:
    """Dynamo keeps at most ``recompile_limit`` (8) graphs per code object, and a model can need more (a few
    widths times a few cache sizes, times batch sizes). Within this block the limit leaves room for
    ``graphs``; dynamo's setting is restored after it (``torch._dynamo.config.patch``), so no other code in
    the process sees a changed limit. Only calls that may compile need it: a compiled graph's later calls
    check no limit."""
    if graphs < torch._dynamo.config.recompile_limit:
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(recompile_limit=2 * graphs)


def install(model: nn.Module, *, mode: str | None = None, skip_guards: bool = True, compiler=None,
            aot: bool | None = None, aot_dir=None) -> StaticDecoder | None:
    """Put a ``StaticDecoder`` in front of ``model.forward`` and ``model.new_cache`` (None, with a warning,
    when the model is not covered); ``aot`` and ``aot_dir`` (default ``$ATTNLAB_CACHE/graphs``) as there."""
    why = unsupported_reason(model)
    if why is not None:
        warnings.warn(f"{why}; decoding stays eager", stacklevel=3)
        return None
    static = StaticDecoder(model, mode=mode, skip_guards=skip_guards, compiler=compiler, aot=aot, aot_dir=aot_dir)
    model.static_decoder = static
    model.forward = static.forward
    model.new_cache = static.new_cache
    return static
