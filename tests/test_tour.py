"""The tour: every section runs in tiny mode and yields its figure and a verdict held against a stated
threshold; a section that raises is reported as failed and fails the command; "not available" only for a
shipped model that is absent."""

import json

import pytest

import attnlab.tour as tour
from attnlab.cli import main
from attnlab.tour import basics
from attnlab.tour.report import Section
from attnlab.tour.verdict import OUTCOMES

KEYS = ["attention", "residual", "seq2seq", "batchnorm", "placement", "gqa", "speculative", "fast", "rwkv", "infini",
        "ring", "flash"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tour-tiny")
    code = main(["tour", "--tiny", "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    return code, out, report, {s["key"]: s for s in report["sections"]}


def test_every_section_runs_in_tiny_mode_with_a_figure_and_a_verdict(tiny):
    code, out, report, sections = tiny
    assert [s["key"] for s in report["sections"]] == KEYS
    for s in report["sections"]:
        # never "failed" (a crash) and never "not available" (every shipped model is in this checkout)
        assert s["verdict"] in OUTCOMES, (s["key"], s["verdict"], s["because"])
        assert s["figure"] and (out / s["figure"]).stat().st_size > 1000, s["key"]
        assert s["threshold"] and any(ch.isdigit() for ch in s["threshold"] + s["because"]), s["key"]
    assert code == 0
    assert report["header"]["mode"] == "tiny"
    html, md = (out / "report.html").read_text(), (out / "report.md").read_text()
    assert html.startswith("<!doctype html>") and html.count("data:image/png;base64,") == len(KEYS)
    assert md.count("**Threshold.**") == len(KEYS) and md.count("**Verdict: ") == len(KEYS)


def test_tiny_sections_measure_what_they_claim(tiny):
    _, _, _, sections = tiny
    values = {row["model"]: row["value"] for row in sections["seq2seq"]["rows"]}
    assert values["encoder (bidirectional)"] == 6 and values["decoder (causal)"] == 0
    assert values["encoder-decoder (the shipped `numbers` model)"] >= 0.9
    assert values["same, cross-attention removed"] < 0.1
    rwkv = sections["rwkv"]["rows"]
    assert len({r["cache_bytes"] for r in rwkv if r["model"] == "rwkv"}) == 1
    kv = [r["cache_bytes"] for r in rwkv if r["model"] == "transformer"]
    assert kv == sorted(kv) and kv[-1] == 8 * kv[0]
    fast = {r["variant"]: r for r in sections["fast"]["rows"]}
    assert fast["prepared fp32"]["same_greedy_tokens"]
    assert fast["prepared int8"]["weight_MB"] < 0.3 * fast["reference fp32"]["weight_MB"]
    gqa = [r for r in sections["gqa"]["rows"] if "cache_MiB" in r]
    assert [r["cache_MiB"] / gqa[0]["cache_MiB"] for r in gqa] == [1, 0.5, 0.25, 0.125]
    trained = [r for r in sections["gqa"]["rows"] if "val_loss" in r]
    assert sorted({r["n_kv_heads"] for r in trained}) == [1, 2, 4] and len(trained) == 3 * 2  # 2 seeds in tiny mode
    memory = [r for r in sections["infini"]["rows"] if "chunk_peak_MiB" in r]
    assert len({r["state_bytes"] for r in memory}) == 1 and memory[-1]["kv_cache_MiB"] == 8 * memory[0]["kv_cache_MiB"]


def _fake_gqa(out, mode, seed):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1])
    fig.savefig(out / "fake.png")
    plt.close(fig)
    return Section("gqa", "fake", "claim", "knob", figure="fake.png", verdict="confirmed", because="1 < 2",
                   threshold="1 < 2")


def test_a_raising_section_is_reported_failed_and_the_tour_exits_nonzero(tmp_path, monkeypatch, capsys):
    def boom(out, mode, seed):
        raise RuntimeError("the experiment broke")

    monkeypatch.setattr(basics, "residuals", boom)
    monkeypatch.setattr(basics, "kv_cache", _fake_gqa)
    assert tour.main(["--tiny", "--out", str(tmp_path), "--only", "residual", "gqa"]) == 1
    report = json.loads((tmp_path / "report.json").read_text())
    verdicts = {s["key"]: (s["verdict"], s["because"]) for s in report["sections"]}
    assert verdicts["residual"] == ("failed", "RuntimeError: the experiment broke")
    assert verdicts["gqa"][0] == "confirmed"  # the others' report is still written
    err = capsys.readouterr().err
    assert "Traceback" in err and "the experiment broke" in err and "1 section(s) failed: residual" in err
    assert "failed" in (tmp_path / "report.md").read_text() and "failed" in (tmp_path / "report.html").read_text()
    assert main(["tour", "--tiny", "--out", str(tmp_path / "cli"), "--only", "residual"]) == 1


def test_not_available_only_for_an_absent_shipped_model(tmp_path, monkeypatch):
    import attnlab.hub as hub

    real = hub.shipped_dir

    def without_default(name):
        if name == "default":
            raise FileNotFoundError(f"the shipped model {name!r} is not in this installation")
        return real(name)

    def missing_file_bug(out, mode, seed):
        raise FileNotFoundError("no such file: a bug, not a missing component")

    monkeypatch.setattr(hub, "shipped_dir", without_default)
    monkeypatch.setattr(basics, "residuals", missing_file_bug)
    assert tour.main(["--tiny", "--out", str(tmp_path), "--only", "attention", "residual"]) == 1
    report = json.loads((tmp_path / "report.json").read_text())
    verdicts = {s["key"]: (s["verdict"], s["because"]) for s in report["sections"]}
    assert verdicts["attention"][0] == "not available" and "'default'" in verdicts["attention"][1]
    assert verdicts["residual"][0] == "failed" and verdicts["residual"][1].startswith("FileNotFoundError")


def test_unknown_section_is_one_clear_error(tmp_path, capsys):
    assert main(["tour", "--tiny", "--out", str(tmp_path), "--only", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown tour section(s) nope" in err and "Traceback" not in err


@pytest.mark.slow
def test_quick_tour_renders_every_section(tmp_path):
    assert main(["tour", "--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    for section in report["sections"]:
        assert section["verdict"] in OUTCOMES, section
        assert section["figure"] and (tmp_path / section["figure"]).exists()


def test_report_escapes_text_and_lists_every_column(tmp_path):
    from attnlab.tour.report import write_html, write_markdown

    s = Section("x", "A <b>title</b>", "claim & more", "knob", rows=[{"a": 1.23456}, {"b": "<i>"}],
                verdict="inconclusive", because="1 < 2", threshold="t > 0")
    page = write_html([s], tmp_path, {"mode": "tiny"}).read_text()
    assert "A &lt;b&gt;title&lt;/b&gt;" in page and "claim &amp; more" in page and "&lt;i&gt;" in page
    assert "<b>title</b>" not in page and "<th>a</th><th>b</th>" in page and "1.235" in page
    md = write_markdown([s], tmp_path, {"mode": "tiny"}).read_text()
    assert "| a | b |" in md and "**Threshold.** t > 0" in md
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report.md"]  # no temporary left behind


def test_rwkv_time_verdict_needs_the_transformer_to_slow_down():
    from attnlab.tour.rwkv import time_growth_verdict

    assert time_growth_verdict(1.0, 3.0, 256, 4096).verdict == "confirmed"
    assert time_growth_verdict(3.0, 3.0, 256, 4096).verdict == "refuted"
    assert time_growth_verdict(0.3, 0.6, 256, 4096).verdict == "inconclusive"  # both sped up: load noise, not evidence
