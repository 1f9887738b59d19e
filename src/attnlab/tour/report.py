"""The tour's report: one ``Section`` per claim, written as Markdown + PNGs, as one self-contained HTML file
(jinja2 template, images embedded as base64) and as JSON.

Verdicts: ``confirmed`` / ``refuted`` / ``inconclusive`` come from ``tour.verdict`` (each section states its
threshold); ``failed`` means the experiment raised (the error is in ``because``); ``not available`` means a
documented optional component (a shipped model) is absent from this installation.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import jinja2

from attnlab.atomic import atomic_write_text
from attnlab.bench.common import markdown_table

VERDICTS = ("confirmed", "refuted", "inconclusive", "failed", "not available")


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
    because: str = ""  # the numbers behind the verdict
    threshold: str = ""  # the rule the numbers were held against (from tour.verdict)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r} must be one of {VERDICTS}")

    def judge(self, v) -> None:
        """Take the verdict, its numbers and its stated rule from a ``tour.verdict.Verdict``."""
        self.verdict, self.because, self.threshold = v.verdict, v.detail, v.rule


def columns(rows: list[dict]) -> list[str]:
    """Every key of ``rows``, in first-seen order (sections may mix rows of different kinds)."""
    return list(dict.fromkeys(k for r in rows for k in r))


def write_markdown(sections: list[Section], out: Path, header: dict) -> Path:
    lines = ["# attnlab tour", "", "The field guide's claims, measured on this machine in this run.", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()] + [""]
    lines += [markdown_table([{"section": s.title, "verdict": s.verdict, "because": s.because} for s in sections],
                             ["section", "verdict", "because"])]
    for s in sections:
        lines += ["", f"## {s.title}", "", f"**Claim.** {s.claim}", "", f"**Knob.** {s.knob}", ""]
        if s.measured:
            lines += [f"**Measured.** {s.measured}", ""]
        if s.rows:
            lines += [markdown_table(s.rows, columns(s.rows)), ""]
        if s.figure:
            lines += [f"![{s.title}]({s.figure})", ""]
        if s.threshold:
            lines += [f"**Threshold.** {s.threshold}", ""]
        lines += [f"**Verdict: {s.verdict}.** {s.because}", f"*({s.seconds:.1f} s)*"]
    return atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


PAGE = jinja2.Template("""<!doctype html><html><head><meta charset='utf-8'><title>attnlab tour</title><style>
body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.4}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .5em}
img{max-width:100%}.confirmed{color:#070}.refuted{color:#a00}.inconclusive{color:#a60}.failed{color:#a00}
.not-available{color:#777}
</style></head><body><h1>attnlab tour</h1>
<ul>{% for k, v in header.items() %}<li>{{ k }}: {{ v }}</li>{% endfor %}</ul>
<table><tr><th>section</th><th>verdict</th><th>because</th></tr>
{% for s in sections %}<tr><td><a href="#{{ s.key }}">{{ s.title }}</a></td><td class="{{ s.css }}">{{ s.verdict }}</td>\
<td>{{ s.because }}</td></tr>
{% endfor %}</table>
{% for s in sections %}<h2 id="{{ s.key }}">{{ s.title }}</h2>
<p><b>Claim.</b> {{ s.claim }}</p><p><b>Knob.</b> {{ s.knob }}</p>
{% if s.measured %}<p><b>Measured.</b> {{ s.measured }}</p>{% endif %}
{% if s.rows %}<table><tr>{% for c in s.columns %}<th>{{ c }}</th>{% endfor %}</tr>
{% for r in s.rows %}<tr>{% for c in s.columns %}<td>{{ cell(r.get(c, "")) }}</td>{% endfor %}</tr>
{% endfor %}</table>{% endif %}
{% if s.image %}<img alt="{{ s.figure }}" src="data:image/png;base64,{{ s.image }}">{% endif %}
{% if s.threshold %}<p><b>Threshold.</b> {{ s.threshold }}</p>{% endif %}
<p class="{{ s.css }}"><b>Verdict: {{ s.verdict }}.</b> {{ s.because }}</p><p><i>({{ "%.1f"|format(s.seconds) }} s)</i></p>
{% endfor %}</body></html>
""", autoescape=True)


def _cell(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_html(sections: list[Section], out: Path, header: dict) -> Path:
    views = []
    for s in sections:
        image = base64.b64encode((out / s.figure).read_bytes()).decode() if s.figure else None
        views.append({**asdict(s), "css": s.verdict.replace(" ", "-"), "columns": columns(s.rows), "image": image})
    return atomic_write_text(out / "report.html", PAGE.render(sections=views, header=header, cell=_cell))


def write_json(sections: list[Section], out: Path, header: dict) -> Path:
    payload = {"header": header, "sections": [asdict(s) for s in sections]}
    return atomic_write_text(out / "report.json", json.dumps(payload, indent=2, default=str))
