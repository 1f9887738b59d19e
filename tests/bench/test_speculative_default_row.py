"""``attnlab bench speculative`` shows the call a user writes without flags first: ``attnlab.generate(target,
ids, n, draft=draft)`` on models straight from ``from_pretrained``, with its tokens checked against plain
greedy decoding of the same models."""

import json

from attnlab.bench import speculative

ARGS = ["--prompts", "1", "--prompt-len", "16", "--new-tokens", "8", "--gammas", "2", "--repeats", "1"]


def rows_of(tmp_path, extra=()):
    out = tmp_path / "s.json"
    assert speculative.main(ARGS + list(extra) + ["--json", str(out)]) == 0
    return json.loads(out.read_text())["rows"]


def test_the_default_call_is_the_first_row_and_exact(tmp_path):
    rows = rows_of(tmp_path)
    for prompts in ("test split", "input-grounded"):
        mine = [r for r in rows if r["prompts"] == prompts]
        assert mine[0]["method"] == speculative.DEFAULT_ROW and mine[1]["method"] == "plain"
        assert mine[0]["identical"] is True and isinstance(mine[0]["speedup"], float)
        assert mine[0]["tok_per_s"] > 0 and "acceptance" not in mine[0]  # generate() gives no statistics


def test_the_default_row_is_compared_with_the_reference(monkeypatch, tmp_path):
    """A default path that returns other tokens is reported as differing (and gets no speed-up), while the
    tuned rows, which call speculative_generate directly, stay identical."""
    import attnlab.inference.speculative as spec

    real = spec.speculative_generate

    def shifted_when_called_by_generate(target, draft, ids, n, **kw):
        out = real(target, draft, ids, n, **kw)
        if kw.get("return_stats"):
            return out
        out = out.clone()
        out[:, -1] = (out[:, -1] + 1) % target.config.vocab_size
        return out

    monkeypatch.setattr(spec, "speculative_generate", shifted_when_called_by_generate)
    rows = rows_of(tmp_path)
    default = [r for r in rows if r["method"] == speculative.DEFAULT_ROW]
    assert default and all(r["identical"] is False and r["speedup"] == "outputs differ" for r in default)
    assert all(r["identical"] for r in rows if r["method"].startswith("draft γ="))
