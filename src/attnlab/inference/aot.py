"""Static decode graphs compiled ahead of time and reused across processes (AOTInductor packages on disk).

``torch.compile`` keeps its graphs in the process: every new process traces each static decode graph again
with dynamo (0.5-17 s per graph even when inductor's on-disk cache holds the kernels, ~75 s cold for the
30-layer SmolLM2), which is what a first compiled token cost. Here the static step of ``inference/static.py``
(``decode_step``) is exported once with ``torch.export`` and compiled by AOTInductor into a ``.pt2`` package —
a shared library plus its call signature — in ``$ATTNLAB_CACHE/graphs``; later processes load it (``dlopen``,
milliseconds) and call it from C++, with no dynamo, no guards and no Python between the kernels.

What a package holds and what it does not:

- **no weights.** The package is compiled with ``aot_inductor.package_constants_in_so=False``: its weights are
  handed over at load time from the model's own tensors (``load_constants(..., user_managed=True)``: the
  library keeps their pointers, nothing is copied), so memory stays the model's, and the package depends on
  the model's *structure*, not its values. Its key (``graph_key``) hashes that structure — the config, every
  module's type and plain attributes (which kernel a layer calls, its block format), every parameter's and
  buffer's name, shape, strides and dtype — with the call's shapes (batch, tokens per call, cache slots,
  dtype), the inductor options, the PyTorch, Python and attnlab versions, the sources of attnlab's model code,
  the CPU's flags and kernel variant, and the thread count (inductor writes it into the OpenMP loops). Two
  models of one architecture and precision share their packages; a model whose export lifts any other
  tensor as a constant is refused (its values would be baked in and not keyed).
- **inputs**: token ids and positions (B, n), slots (n,), the key mask (B, S), RoPE's cos/sin when the model
  has RoPE, and the cache's per-layer K and V buffers, written in place at the slots (an input mutation that
  the package performs on the caller's tensors).
- attnlab's C++ operators (``attnlab_kernels::rows_matmul``, ``qmatmul``) are called from the package through
  the dispatcher (AOTInductor's proxy executor), so the library that defines them must be loaded first
  (``cpu_kernels.available()``, which ``prepare_for_decode`` calls before anything is compiled).

**Writing and trusting the cache.** A package is compiled into a temporary file in the same directory and
renamed into place, so two processes filling the cache at once each write a whole package and the last
rename wins. Before loading, the zip archive's CRCs are checked (``zipfile.testzip``); an entry that fails
that check, fails to load, or wants constants the model does not have is reported on stderr, deleted and
rebuilt. A cold compile prints one line on stderr saying what it does.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from attnlab import version
from attnlab.atomic import atomic_write_file
from attnlab.cachedir import cache_dir as attnlab_cache_dir
from attnlab.layers import cpu_kernels

FORMAT = "attnlab-aot-1"  # bump when the layout of a package or its inputs changes
_PACKAGE = Path(__file__).resolve().parent.parent  # attnlab/
_SOURCES = ("models", "layers", "attention", "inference", "config.py")  # the code a decode graph is traced from
_source_hash: list[str] = []
# attributes that are not what a graph computes: how the model was prepared (its precision shows in the
# module types and dtypes), and ``training``: every package is exported in eval mode (``build``), while the
# flags of a prepared model's modules vary (fused modules are made after prepare_for_decode's eval(), and
# generate() sets them all)
_NOT_TRACED = {"prepared_for_decode", "lazily_prepared", "training"}


def cache_dir() -> Path:
    return attnlab_cache_dir("graphs")


def enabled() -> bool:
    """AOT packages are used unless ``ATTNLAB_AOT=0`` (then each process compiles with ``torch.compile``)."""
    return os.environ.get("ATTNLAB_AOT", "1") != "0"


def sources_hash() -> str:
    """sha256 of attnlab's model, layer, attention and inference sources (once per process)."""
    if not _source_hash:
        h = hashlib.sha256()
        for part in _SOURCES:
            root = _PACKAGE / part
            for path in sorted(root.rglob("*.py")) if root.is_dir() else [root]:
                h.update(str(path.relative_to(_PACKAGE)).encode())
                h.update(path.read_bytes())
        _source_hash.append(h.hexdigest())
    return _source_hash[0]


def _plain(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str)) or (
        isinstance(value, tuple) and all(_plain(v) for v in value))


def model_signature(model: nn.Module) -> str:
    """The structure a decode graph is compiled from, as text: the config, each module's type and plain
    attributes, each parameter's and buffer's name, shape, strides and dtype (not their values)."""
    lines = [repr(getattr(model, "config", None))]
    for name, module in model.named_modules(remove_duplicate=False):
        attrs = sorted((k, repr(v)) for k, v in vars(module).items()
                       if not k.startswith("_") and k not in _NOT_TRACED and _plain(v))
        lines.append(f"{name} {type(module).__module__}.{type(module).__qualname__} {attrs}")
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        lines.append(f"{name} {tuple(t.shape)} {t.stride()} {t.dtype} {t.device}")
    return "\n".join(lines)


def key_parts(signature: str, shape: tuple, options: dict) -> list[str]:
    """What a graph's key hashes: ``signature`` (``model_signature``), ``shape`` (B, n, S, dtype, device), the
    inductor ``options`` and everything of this machine and installation the compiled code depends on."""
    flags = sorted(cpu_kernels.cpu_flags())
    return [FORMAT, torch.__version__, sys.version, version.current(), sources_hash(), signature, repr(shape),
            repr(sorted(options.items())), " ".join(flags), torch.backends.cpu.get_cpu_capability(),
            f"kernels {cpu_kernels.isa()}", f"threads {torch.get_num_threads()}"]


def graph_key(signature: str, shape: tuple, options: dict) -> str:
    """The cache key of one graph (a hash of ``key_parts``)."""
    return hashlib.sha256("\n".join(key_parts(signature, shape, options)).encode()).hexdigest()[:32]


class _Step(nn.Module):
    """The static step (``static.decode_step``, passed in: static.py imports this module) as a module for
    ``torch.export``: its parameters are the model's (prefixed ``model.``), its inputs tensors only (RoPE's
    cos/sin present when the model has RoPE)."""

    def __init__(self, step: Callable, model: nn.Module, layers: int, rope: bool) -> None:
        super().__init__()
        self.step, self.model, self.layers, self.rope = step, model, layers, rope

    def forward(self, tokens: Tensor, positions: Tensor, slots: Tensor, key_mask: Tensor, *rest: Tensor) -> Tensor:
        rope = (rest[0], rest[1]) if self.rope else None
        kv = rest[2:] if self.rope else rest
        L = self.layers
        return self.step(self.model, tokens, positions, slots, key_mask, rope, list(kv[:L]), list(kv[L:]))


@dataclass
class AotStats:
    loaded: int = 0  # packages loaded from the disk cache
    built: int = 0  # packages compiled (cold cache, or a rejected entry rebuilt)
    rejected: int = 0  # cache entries found corrupt or unusable (then rebuilt)


class AotGraph:
    """One loaded package: ``__call__(inputs)`` runs it on a flat list of tensors -> logits (B, n, V)."""

    def __init__(self, loader) -> None:
        self.loader = loader  # torch._C._aoti.AOTIModelPackageLoader
        self.run = loader.boxed_run  # the C++ entry point (AOTICompiledModel.__call__ adds a pytree per call)

    def __call__(self, inputs: list[Tensor]) -> Tensor:
        return self.run(inputs)[0]


def _constants(model: nn.Module) -> dict[str, Tensor]:
    named = dict(model.named_parameters(prefix="model", remove_duplicate=False))
    named.update(model.named_buffers(prefix="model", remove_duplicate=False))
    return named


def load(path: Path, model: nn.Module) -> AotGraph:
    """Load the package at ``path`` with ``model``'s tensors as its weights; raises ValueError when the
    archive is corrupt or wants a constant the model does not have."""
    with zipfile.ZipFile(path) as archive:  # zipfile.BadZipFile when truncated
        bad = archive.testzip()
    if bad is not None:
        raise ValueError(f"{bad} fails its CRC check")
    # the loader itself, not torch._inductor.aoti_load_package: that one first compares the CPU with the
    # package's (picking inductor's vector ISA: a compile and a probe process, 0.7 s to 25 s), which the
    # key already did (the CPU's flags are part of it)
    loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
    named = _constants(model)
    wanted = loader.get_constant_fqns()
    missing = [name for name in wanted if name not in named]
    if missing:
        raise ValueError(f"the package wants constants the model lacks: {missing[:3]}")
    # (constants, use_inactive, check_full_update, user_managed: keep the model's tensors, no copy, h2d copy)
    loader.load_constants({name: named[name] for name in wanted}, False, True, True, False)
    return AotGraph(loader)


def build(path: Path, step: Callable, model: nn.Module, inputs: list[Tensor], rope: bool, layers: int,
          options: dict, describe: str) -> None:
    """Export ``step`` (``static.decode_step``) on ``inputs`` (copies are traced, the caller's tensors are untouched), compile
    it with AOTInductor into a temporary file beside ``path`` and rename it into place."""
    from torch._inductor import aoti_compile_and_package

    print(f"attnlab: compiling a decode graph ({describe}) ahead of time, once per model shape and machine "
          f"(1-2 min; cached in {path.parent})", file=sys.stderr, flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()  # decoding's graph (dropout off), whatever the modules' flags (see _NOT_TRACED)
        with torch.inference_mode(False), torch.no_grad():
            example = tuple(t.clone() for t in inputs)  # inference-mode tensors cannot be traced outside it
            exported = torch.export.export(_Step(step, model, layers, rope).eval(), example, strict=False)
    finally:
        for m, mode in modes.items():
            m.training = mode
    named = _constants(model)  # non-persistent buffers (bf16/int8 weights) are listed as constants too
    lifted = [name for name in exported.constants if name not in named]
    if lifted:  # a tensor the graph would bake in without it being part of the key
        raise ValueError(f"the decode step lifts tensors that are not parameters or buffers: {lifted[:3]}")
    configs = {**options, "aot_inductor.package_constants_in_so": False}
    # AOTInductor wants a package path ending in .pt2
    atomic_write_file(path, lambda tmp: aoti_compile_and_package(exported, package_path=str(tmp),
                                                                 inductor_configs=configs), suffix=".pt2")


class AotGraphs:
    """The packages of one model (one ``StaticDecoder``, whose ``step`` it exports): ``get(shape, inputs)``
    returns the loaded graph for a call's shape, loaded from the disk cache or built first (module docstring)."""

    def __init__(self, step: Callable, model: nn.Module, options: dict, directory: str | Path | None = None) -> None:
        self.step, self.model, self.options = step, model, options
        self.directory = None if directory is None else Path(directory)
        self.graphs: dict[tuple, AotGraph] = {}
        self.stats = AotStats()
        self._signature: str | None = None

    def path(self, shape: tuple) -> Path:
        if self._signature is None:
            self._signature = model_signature(self.model)
        directory = self.directory if self.directory is not None else cache_dir()
        return directory / f"{graph_key(self._signature, shape, self.options)}.pt2"

    def get(self, shape: tuple, inputs: list[Tensor], rope: bool, layers: int) -> AotGraph:
        graph = self.graphs.get(shape)
        if graph is not None:
            return graph
        path = self.path(shape)
        if path.exists():
            try:
                graph = load(path, self.model)
                self.stats.loaded += 1
            except Exception as exc:  # truncated, bit-flipped, or not this model's: rebuild it
                self.stats.rejected += 1
                print(f"attnlab: the cached decode graph {path.name} is unusable ({type(exc).__name__}: "
                      f"{str(exc)[:200]}); rebuilding it", file=sys.stderr, flush=True)
                path.unlink(missing_ok=True)
        if graph is None:
            B, n, S, dtype = shape[:4]
            start = time.perf_counter()
            build(path, self.step, self.model, inputs, rope, layers, self.options,
                  f"batch {B}, {n} token{'s' * (n > 1)} per call, {S} cache slots, {str(dtype).replace('torch.', '')}")
            graph = load(path, self.model)
            self.stats.built += 1
            print(f"attnlab: decode graph compiled in {time.perf_counter() - start:.0f} s", file=sys.stderr,
                  flush=True)
        self.graphs[shape] = graph
        return graph
