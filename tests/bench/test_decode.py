"""``attnlab bench decode`` on a tiny random Llama: every precision gets a row, the default call (no flags)
comes first, the fp32 tokens are checked against Hugging Face (a disagreement suppresses every speed-up),
and a low precision that damages the model is flagged by its perplexity change."""

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
    # the call a user writes without flags is the first attnlab row, and gives the reference tokens
    default = next(r for r in rows if r["impl"].startswith("attnlab"))
    assert default["impl"] == decode.DEFAULT_IMPL and default["precision"] == "fp32"
    assert default["same_tokens"] is True and isinstance(default["vs_hf"], float)
    # quality beside speed: every row has a perplexity and its change from fp32 (0 for fp32 itself)
    assert all(r["ppl"] > 1 and (r["quality"] == "ok" or r["quality"].startswith("FLAG")) for r in rows)
    assert abs(ours["ppl_change"]) < 1e-5 and abs(default["ppl_change"]) < 1e-5


def test_a_low_precision_that_damages_the_model_is_flagged(monkeypatch, tmp_path, capsys):
    """A precision that produces garbage (int8 with its weights scrambled) gets the quality flag, in the JSON,
    the table and the plot's data; fp32 rows do not."""
    import attnlab.inference.fast as fast

    real = fast.prepare_for_decode

    def broken(model, *, precision="fp32", **kw):
        if precision == "int8":
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() == 2:
                        p.copy_(p[torch.randperm(p.shape[0])])
        return real(model, precision=precision, **kw)

    monkeypatch.setattr(fast, "prepare_for_decode", broken)
    out = tmp_path / "d.json"
    decode.main(["--models", "tiny", "--precisions", "fp32,int8", "--new-tokens", "3", "--repeats", "1",
                 "--json", str(out)])
    rows = {(r["impl"].split()[0], r["precision"]): r for r in json.loads(out.read_text())["rows"]
            if r["impl"] != decode.DEFAULT_IMPL}
    assert rows[("attnlab", "int8")]["quality"].startswith("FLAG: perplexity")
    assert abs(rows[("attnlab", "int8")]["ppl_change"]) > decode.PPL_LIMIT
    assert rows[("attnlab", "fp32")]["quality"] == "ok" and rows[("transformers", "fp32")]["quality"] == "ok"
    assert "perplexity more than 1% off fp32's" in capsys.readouterr().out


def test_held_out_text_and_perplexity():
    ids = decode.held_out_ids(512, 64)
    assert ids.shape == (1, 64) and int(ids.max()) < 512
    V = 7
    uniform = decode.perplexity(lambda x: torch.zeros(1, x.shape[1], V), torch.randint(0, V, (1, 20)))
    assert abs(uniform - V) < 1e-4  # a uniform model's perplexity is the vocabulary size


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
