"""The tour's report: one ``Section`` per claim, written as Markdown + PNGs and as one self-contained HTML
file (images embedded as base64), plus a summary table for the terminal."""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

VERDICTS = ("confirmed", "refuted", "depends", "not available")


@dataclass
class Section:
    key: str
    title: str
    claim: str
    knob: str
    measured: str = ""
    rows: list[dict] = field(default_factory=list)
    figure: str | None = None  # file name of a PNG inside the output directory
    verdict: str = "not available"
    because: str = ""  # the numbers behind the verdict, in one sentence
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r} must be one of {VERDICTS}")


def _table_md(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def write_markdown(sections: list[Section], out: Path, header: dict) -> Path:
    lines = ["# attnlab tour", "", "The field guide's claims, measured on this machine in this run.", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()] + ["", "| section | verdict | because |", "|---|---|---|"]
    lines += [f"| {s.title} | {s.verdict} | {s.because} |" for s in sections]
    for s in sections:
        lines += ["", f"## {s.title}", "", f"**Claim.** {s.claim}", "", f"**Knob.** {s.knob}", ""]
        if s.measured:
            lines += [f"**Measured.** {s.measured}", ""]
        if s.rows:
            lines += [_table_md(s.rows), ""]
        if s.figure:
            lines += [f"![{s.title}]({s.figure})", ""]
        lines += [f"**Verdict: {s.verdict}.** {s.because}", f"*({s.seconds:.1f} s)*"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_html(sections: list[Section], out: Path, header: dict) -> Path:
    def img(name: str) -> str:
        data = base64.b64encode((out / name).read_bytes()).decode()
        return f'<img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'

    def table(rows: list[dict]) -> str:
        if not rows:
            return ""
        cols = list(rows[0])
        def cell(v: object) -> str:
            return html.escape(f"{v:.4g}" if isinstance(v, float) else str(v))

        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows)
        return f"<table><tr>{head}</tr>{body}</table>"

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>attnlab tour</title><style>",
        "body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.4}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .5em}"
        "img{max-width:100%}.confirmed{color:#070}.refuted{color:#a00}.depends{color:#a60}"
        ".not-available{color:#777}",
        "</style></head><body><h1>attnlab tour</h1>",
        "<ul>" + "".join(f"<li>{html.escape(str(k))}: {html.escape(str(v))}</li>" for k, v in header.items()) + "</ul>",
        table([{"section": s.title, "verdict": s.verdict, "because": s.because} for s in sections]),
    ]
    for s in sections:
        cls = s.verdict.replace(" ", "-")
        parts += [f"<h2 id='{s.key}'>{html.escape(s.title)}</h2>",
                  f"<p><b>Claim.</b> {html.escape(s.claim)}</p><p><b>Knob.</b> {html.escape(s.knob)}</p>"]
        if s.measured:
            parts.append(f"<p><b>Measured.</b> {html.escape(s.measured)}</p>")
        parts.append(table(s.rows))
        if s.figure:
            parts.append(img(s.figure))
        parts.append(f"<p class='{cls}'><b>Verdict: {html.escape(s.verdict)}.</b> {html.escape(s.because)}</p>")
    parts.append("</body></html>")
    path = out / "report.html"
    path.write_text("\n".join(parts))
    return path


def write_json(sections: list[Section], out: Path, header: dict) -> Path:
    path = out / "report.json"
    path.write_text(json.dumps({"header": header, "sections": [s.__dict__ for s in sections]}, indent=2, default=str))
    return path
