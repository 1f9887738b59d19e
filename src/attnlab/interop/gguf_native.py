"""A GGUF model with its weights kept as the file stores them (``from_pretrained(path, precision="native")``).

``load_gguf`` decodes every tensor to a float dtype; here each linear weight stored in a block format that
attnlab multiplies as is (Q8_0, Q4_0, Q4_1, Q4_K: ``layers/qblocks.py``) becomes a ``BlockLinear`` over the
file's own bytes, and a token embedding in such a format a ``BlockEmbedding`` (a tied head shares its
blocks: the table is held once). Nothing is dequantised and requantised, and no float copy of those weights
exists. The bytes are read from the file into memory of their own rather than memory-mapped:
``prepare_for_decode`` concatenates the Q/K/V and gate/up blocks into new tensors, and pages of a map once
read stay resident while the map lives, so mapping would hold most weights twice (measured: +82 MiB on
SmolLM2). The query and key projections of a ``llama`` file get their rows put back in Hugging Face's order
(a row permutation moves whole rows of blocks, so it applies to the packed bytes too). Norms, biases and any tensor stored in a
float or another quantised type (F32/F16/BF16, Q5_*, Q6_K ...) are decoded to float32, as ``load_gguf`` does.

The model runs with float32 activations; ``prepare_for_decode(model, precision="native")`` fuses its
projections (blocks of one format concatenated row-wise) and compiles it like any other precision. It
cannot be trained or saved (its block weights are not parameters); load it without ``precision`` for that.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor, nn

from attnlab.interop.gguf import (
    ARCHITECTURES,
    check_known_names,
    dequantize,
    gguf_config,
    open_gguf,
    our_name,
    unpermute_rotary_rows,
)
from attnlab.layers.qblocks import BY_GGML_TYPE, BlockEmbedding, BlockLinear, from_gguf_bytes

if TYPE_CHECKING:
    from attnlab.models.decoder import DecoderLM

NATIVE = "as stored in the GGUF file"  # the value of ``model.stored_weights`` for a model loaded here


def _set_tensor(model: nn.Module, name: str, value: Tensor) -> None:
    owner, attr = name.rsplit(".", 1)
    setattr(model.get_submodule(owner), attr, nn.Parameter(value, requires_grad=False))


def load_gguf_native(path: str | Path) -> DecoderLM:
    """Our decoder from ``path`` with block-format linears and embedding kept as stored (see module doc)."""
    from attnlab.checkpoint import no_init
    from attnlab.memstats import release_freed_memory
    from attnlab.models import build_model

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    file = open_gguf(path)
    cfg = gguf_config(file)
    check_known_names(file)
    permuted = ARCHITECTURES[file.meta("general.architecture")].permuted_qk
    with no_init():
        model = build_model(cfg)
    raws = file.raw(read=True)
    blocks: dict[str, tuple[Tensor, int]] = {}  # module name -> (blocks (F, row_bytes) uint8, ggml type)
    floats: dict[str, Tensor] = {}
    for name in list(raws):
        raw = raws.pop(name)
        ours = our_name(name)
        assert ours is not None
        module, kind = ours.rsplit(".", 1)
        heads = cfg.n_heads if ".attn.q_proj" in ours else cfg.n_kv_heads if ".attn.k_proj" in ours else None
        target = model.get_submodule(module)
        if kind == "weight" and raw.ggml_type in BY_GGML_TYPE and isinstance(target, (nn.Linear, nn.Embedding)):
            packed = from_gguf_bytes(raw.data, raw.shape, raw.ggml_type)  # (F, row_bytes)
            if permuted and heads is not None:
                packed = unpermute_rotary_rows(packed, heads).contiguous()
            blocks[module] = (packed, raw.ggml_type)
        else:
            values = dequantize(file, raw)
            if permuted and heads is not None:
                values = unpermute_rotary_rows(values, heads)
            floats[ours] = values.float().contiguous()
    del raws
    for module, (packed, kind) in blocks.items():
        old = model.get_submodule(module)
        if isinstance(old, nn.Embedding):
            new: nn.Module = BlockEmbedding(packed, kind, old.embedding_dim)
        else:
            new = BlockLinear(packed, kind, old.in_features, floats.pop(f"{module}.bias", None))
        owner, attr = module.rsplit(".", 1) if "." in module else ("", module)
        setattr(model.get_submodule(owner), attr, new)
    if cfg.tie_embeddings:
        if isinstance(model.embed, BlockEmbedding):
            model.lm_head = BlockLinear(model.embed.blocks, model.embed.fmt, cfg.d_model,
                                        floats.pop("lm_head.bias", None))
        else:
            floats.setdefault("lm_head.weight", floats["embed.weight"])
    for name, value in floats.items():
        _set_tensor(model, name, value)
    missing = [n for n, _ in model.named_parameters(remove_duplicate=False) if n not in floats]
    if missing:
        raise ValueError(f"{path}: no tensor in the file for {missing[:8]}")
    model.stored_weights = NATIVE
    release_freed_memory()
    return model.eval()


def stored_formats(model: nn.Module) -> dict[str, int]:
    """How many weight-holding modules keep each format: block formats by name, float linears and embeddings
    by dtype (``{"q4_1": 210, "q8_0": 2}`` for SmolLM2's file)."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, (BlockLinear, BlockEmbedding)):
            key = module.fmt.name
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            key = str(module.weight.dtype).removeprefix("torch.")
        else:
            continue
        counts[key] = counts.get(key, 0) + 1
    return counts


def parameter_count(model: nn.Module) -> int:
    """The model's weights in elements, block weights included (a tied table once)."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, (BlockLinear, BlockEmbedding)) and module.blocks.data_ptr() not in seen:
            seen.add(module.blocks.data_ptr())
            total += module.blocks.shape[0] * module.blocks.shape[1] // module.fmt.block_bytes * module.fmt.block
        if isinstance(module, BlockLinear) and module.bias is not None:
            total += module.bias.numel()
    return total + sum(p.numel() for p in model.parameters())


__all__ = ["NATIVE", "load_gguf_native", "parameter_count", "stored_formats"]
