"""``attnlab bench decode`` on a tiny random Llama: every precision gets a row, the fp32 tokens are checked
against Hugging Face, and a disagreement suppresses every speed-up."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from attnlab.bench import decode  # noqa: E402


def test_tiny_bench_rows_and_plot(tmp_path):
    out, png = tmp_path / "d.json", tmp_path / "d.png"
    code = decode.main(["--models", "tiny", "--new-tokens", "4", "--repeats", "1", "--json", str(out),
                        "--plot", str(png)])
    assert code == 0 and png.stat().st_size > 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["impl"].split()[0], r["precision"]) for r in rows} == {
        ("transformers", "fp32"), ("transformers", "bf16"), ("attnlab", "fp32"), ("attnlab", "bf16"),
        ("attnlab", "int8")}
    ours = next(r for r in rows if r["impl"] == "attnlab" and r["precision"] == "fp32")
    assert ours["same_tokens"] is True and isinstance(ours["vs_hf"], float)
    assert all(r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 for r in rows)


def test_no_speedup_is_reported_when_tokens_differ(monkeypatch, tmp_path):
    import attnlab

    real = attnlab.generate

    def off_by_one(model, ids, n, **kw):  # a broken fast path: shifts every generated token
        out = real(model, ids, n, **kw).clone()
        out[:, ids.shape[1]:] = (out[:, ids.shape[1]:] + 1) % model.config.vocab_size
        return out

    monkeypatch.setattr(attnlab, "generate", off_by_one)
    out = tmp_path / "d.json"
    assert decode.main(["--models", "tiny", "--new-tokens", "3", "--repeats", "1", "--json", str(out)]) == 1
    rows = json.loads(out.read_text())["rows"]
    assert all(r["vs_hf"] == "outputs differ: not reported" for r in rows if r["impl"].startswith("attnlab"))


def test_exported_default_target_matches_hf(tmp_path):
    import transformers

    import attnlab

    model = attnlab.from_pretrained("default")
    decode.hf_llama_from_attnlab(model, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-4, atol=1e-4)
