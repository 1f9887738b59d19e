"""``from_pretrained(path, precision="native")``: a GGUF's block weights kept as the file stores them.

Tiny files of each block format (written by tests/interop/tiny_gguf.py with llama.cpp's q/k permutation) are
checked against the `gguf` package, an independent reader: every block linear's dequantised weight equals
what the package decodes from the file, in Hugging Face's row order, exactly; the tied head shares the
embedding's blocks; the model's bytes are the file's bytes; and its logits are those of the dequantised model
up to the error of quantising activations to int8 per block of 32 (stated bound below).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_gguf import Q, make_hf, write_gguf

import attnlab
from attnlab.inference.fast import prepare_for_decode
from attnlab.interop.gguf_native import NATIVE, stored_formats
from attnlab.layers import cpu_kernels, qblocks
from attnlab.layers.qblocks import BlockEmbedding, BlockLinear
from attnlab.memstats import tensor_bytes

gguf = pytest.importorskip("gguf")

# int8 activations per block of 32 (|error| <= d_x / 2 per element) against float activations, relative to
# the logits' norm: measured 1.6-2.5% on these models (Q4_K the most); see the breaks in the issue note
ACTIVATION_ERROR = 0.05
HF_LINEARS = {"self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj",
              "self_attn.v_proj": "attn.v_proj", "self_attn.o_proj": "attn.o_proj", "mlp.gate_proj": "ffn.gate",
              "mlp.up_proj": "ffn.up", "mlp.down_proj": "ffn.down"}


def q4_k_quantize(values: np.ndarray, qtype) -> np.ndarray:  # the gguf package has no Q4_K quantiser
    return qblocks.quantize(torch.from_numpy(values), "q4_k").numpy()


@pytest.fixture(scope="module")
def q4_k_file(tmp_path_factory, tok):
    torch.manual_seed(0)
    hf = make_hf("llama", tok.get_vocab_size(), hidden=256, ffn=512)
    path = tmp_path_factory.mktemp("q4_k") / "tiny.gguf"
    stored = write_gguf(path, hf, "llama", tok, Q.Q4_K, quantize=q4_k_quantize)
    ref = make_hf("llama", tok.get_vocab_size(), hidden=256, ffn=512)
    ref.load_state_dict({**hf.state_dict(), **stored})
    return ref.eval(), path


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


CASES = [("llama", Q.Q8_0), ("llama", Q.Q4_0), ("llama", Q.Q4_1), ("qwen2", Q.Q4_1), ("llama", Q.Q4_K)]


@pytest.fixture(params=CASES, ids=lambda c: f"{c[0]}-{c[1].name}")
def case(request, tiny, q4_k_file):
    arch, qtype = request.param
    ref, path = q4_k_file if qtype == Q.Q4_K else tiny(arch, qtype)[1:]
    return arch, qtype, ref, path


def test_block_weights_are_the_files_as_the_gguf_package_reads_them(case):
    arch, qtype, ref, path = case
    model = attnlab.from_pretrained(path, precision="native")
    assert model.stored_weights == NATIVE
    for i, layer in enumerate(ref.model.layers):
        for hf_name, ours in HF_LINEARS.items():
            module = model.get_submodule(f"blocks.{i}.{ours}")
            assert isinstance(module, BlockLinear) and module.fmt.ggml_type == qtype
            expected = layer.get_submodule(hf_name).weight  # dequantised by the gguf package, HF row order
            assert torch.equal(module.dequantized(), expected), f"layer {i} {ours}"
            bias = layer.get_submodule(hf_name).bias
            assert (module.bias is None) == (bias is None) and (bias is None or torch.equal(module.bias, bias))
    assert isinstance(model.embed, BlockEmbedding)
    ids = torch.tensor([[0, 5, 17, ref.config.vocab_size - 1, 5]])
    assert torch.equal(model.embed(ids), ref.model.embed_tokens(ids))
    assert isinstance(model.lm_head, BlockLinear)
    if arch == "qwen2":  # tied: one table, as stored
        assert model.lm_head.blocks.data_ptr() == model.embed.blocks.data_ptr()
    else:
        assert torch.equal(model.lm_head.dequantized(), ref.lm_head.weight)


def test_the_model_holds_the_files_bytes_once(case):
    _, qtype, _, path = case
    model = attnlab.from_pretrained(path, precision="native")
    reader = gguf.GGUFReader(str(path))
    blocks = [t for t in reader.tensors if t.tensor_type == qtype]
    floats = [t for t in reader.tensors if t.tensor_type != qtype]  # norms and biases, F32
    assert tensor_bytes(model) == {"uint8": {"bytes": sum(int(t.n_bytes) for t in blocks), "tensors": len(blocks)},
                                   "float32": {"bytes": sum(int(t.n_elements) * 4 for t in floats),
                                               "tensors": len(floats)}}
    assert stored_formats(model)[qblocks.block_format(int(qtype)).name] == 16
    assert attnlab.interop.gguf_native.parameter_count(model) == sum(int(t.n_elements) for t in reader.tensors)


def test_logits_are_the_dequantised_models_up_to_int8_activations(case):
    arch, qtype, ref, path = case
    model = attnlab.from_pretrained(path, precision="native")
    ids = torch.randint(0, ref.config.vocab_size, (2, 12))
    with torch.no_grad():
        expected = ref(ids).logits
        plain = model(ids)
        assert relative_error(plain, expected) < ACTIVATION_ERROR
        with cpu_kernels.kernels_disabled():
            portable = attnlab.from_pretrained(path, precision="native")
        assert not portable.lm_head.kernel
        # the portable path computes the same integer products: layer by layer to float rounding; through the
        # model a last-bit difference can flip one of the next layer's int8 activations (0.6% seen for Q4_K)
        x = torch.randn(3, ref.config.hidden_size)
        torch.testing.assert_close(portable.blocks[0].attn.q_proj(x), model.blocks[0].attn.q_proj(x),
                                   rtol=1e-5, atol=1e-5)
        assert relative_error(portable(ids), plain) < 0.02
        prepare_for_decode(model, precision="native")  # fused: Q/K/V and gate/up blocks concatenated
        assert isinstance(model.blocks[0].attn.qkv_proj, BlockLinear)
        torch.testing.assert_close(model(ids), plain, rtol=1e-5, atol=1e-5)
    out = attnlab.generate(model, ids[:1, :6], 8, eos_token_id=None)
    assert out.shape == (1, 14)


def test_mixed_formats_are_not_fused():
    from attnlab.inference.fused import fusable

    w = torch.randn(64, 64)
    a, b = BlockLinear.from_float(w, None, "q4_1"), BlockLinear.from_float(w, None, "q8_0")
    assert fusable([a, BlockLinear.from_float(w, None, "q4_1")]) and not fusable([a, b])
    assert not fusable([a, torch.nn.Linear(64, 64)])


def test_native_is_for_gguf_files_and_alone(tiny, tmp_path):
    _, _, path = tiny("llama", Q.Q4_1)
    native = attnlab.from_pretrained(path, precision="native")
    with pytest.raises(ValueError, match="precision='native'"):
        prepare_for_decode(native, precision="bf16")
    with pytest.raises(ValueError, match="cannot be saved"):
        native.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    plain = attnlab.from_pretrained(path)
    with pytest.raises(ValueError, match="load the model with"):
        prepare_for_decode(plain, precision="native")
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="is not a .gguf file"):
        attnlab.from_pretrained(tmp_path / "plain", precision="native")
    with pytest.raises(ValueError, match="precision='native'"):
        attnlab.from_pretrained(path, precision="q4_1")


def test_cli_native_on_a_non_gguf_model_is_one_line(tiny, tmp_path, capsys):
    from attnlab.cli import main

    _, _, path = tiny("llama", Q.Q4_1)
    attnlab.from_pretrained(path).save_pretrained(tmp_path / "m")
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt-ids", "1,2,3", "--dtype", "native",
                 "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a .gguf file" in err and "Traceback" not in err
    assert main(["generate", "--model", str(path), "--prompt-ids", "1,2,3", "--dtype", "native",
                 "--max-new-tokens", "2"]) == 0
