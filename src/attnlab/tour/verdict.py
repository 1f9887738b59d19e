"""The tour's one verdict rule: a claim is *confirmed* or *refuted* only by a margin larger than the noise
measured in the same run; anything in between is *inconclusive*.

Two kinds of evidence:

- ``compare(a, b, claim=...)``: two groups of samples (typically one value per seed). Let
  d = mean(a) − mean(b) and spread = the largest seed-to-seed range (max − min) of either group. The margin
  a difference must clear is m = max(spread, threshold). For ``claim="less"`` (a is lower than b):
  confirmed if d < −m, refuted if d > +m, inconclusive otherwise; ``"greater"`` mirrors it. For
  ``claim="within"`` (a is no worse than b by more than ``threshold``, lower is better; a non-inferiority
  test): confirmed if d + spread ≤ threshold, refuted if d − spread > threshold, inconclusive otherwise.
  With one sample per group the spread is unknown (0) and only ``threshold`` guards the verdict: the rule
  says so.
- ``check(value, below=..., refuted_at=...)``: one deterministic measurement (bytes, an error bound, a
  memory ratio) against two stated thresholds; ``exact(ok, ...)`` for an identity that must hold.

``combine`` joins the parts of a section: any refuted part refutes the claim, all confirmed confirm it,
anything else is inconclusive.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

OUTCOMES = ("confirmed", "refuted", "inconclusive")


@dataclass(frozen=True)
class Verdict:
    verdict: str  # one of OUTCOMES
    rule: str  # the threshold the numbers were held against, stated for the report
    detail: str  # the numbers behind the verdict

    def __post_init__(self) -> None:
        if self.verdict not in OUTCOMES:
            raise ValueError(f"verdict {self.verdict!r} must be one of {OUTCOMES}")


def spread(samples: Sequence[float]) -> float:
    """Seed-to-seed range (max − min) of the finite samples of one group (a diverged run, +inf, moves the
    mean, not the noise); 0 for fewer than two."""
    finite = [x for x in samples if math.isfinite(x)]
    return max(finite) - min(finite) if len(finite) > 1 else 0.0


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def compare(a: Sequence[float], b: Sequence[float], *, claim: str, threshold: float = 0.0,
            names: tuple[str, str] = ("a", "b"), what: str = "", over: str = "seeds") -> Verdict:
    """Test "mean(a) is less/greater than mean(b)" or "a is within ``threshold`` of b" against the spread."""
    if not a or not b:
        raise ValueError("compare needs at least one sample in each group")
    if claim not in ("less", "greater", "within"):
        raise ValueError(f"claim={claim!r} must be 'less', 'greater' or 'within'")
    if threshold < 0:
        raise ValueError("threshold must be >= 0")
    d = statistics.fmean(a) - statistics.fmean(b)
    sp = max(spread(a), spread(b))
    counts = f"{len(a)}/{len(b)}"
    seeds = (f"over {counts} {over}, spread (max − min) {_fmt(sp)}" if max(len(a), len(b)) > 1 else
             f"one sample each ({over}), so no spread is measured: only the fixed threshold guards it")
    A, B = names
    if claim == "within":
        rule = (f"{A}'s {what or 'value'} is no more than {_fmt(threshold)} above {B}'s: confirmed if the difference plus the "
                f"spread stays within it, refuted if the difference minus the spread exceeds it ({seeds})")
        verdict = "confirmed" if d + sp <= threshold else "refuted" if d - sp > threshold else "inconclusive"
    else:
        m = max(sp, threshold)
        word, other = ("lower", "higher") if claim == "less" else ("higher", "lower")
        rule = (f"{A}'s mean {what or 'value'} must be {word} than {B}'s by more than {_fmt(m)} = max(spread, "
                f"{_fmt(threshold)}); {other} by more than that refutes it ({seeds})")
        signed = -d if claim == "less" else d
        verdict = "confirmed" if signed > m else "refuted" if signed < -m else "inconclusive"
    detail = (f"{what + ' ' if what else ''}{A} {_fmt(statistics.fmean(a))} vs {B} {_fmt(statistics.fmean(b))} "
              f"(difference {d:+.4g}, spread {_fmt(sp)})")
    return Verdict(verdict, rule, detail)


def check(value: float, *, below: float, refuted_at: float, what: str) -> Verdict:
    """One measurement where lower supports the claim: confirmed if ``value < below``, refuted if
    ``value >= refuted_at``, inconclusive in between."""
    if not below <= refuted_at:
        raise ValueError("check needs below <= refuted_at")
    verdict = "confirmed" if value < below else "refuted" if value >= refuted_at else "inconclusive"
    return Verdict(verdict, f"{what} < {_fmt(below)} confirms, >= {_fmt(refuted_at)} refutes", f"{what} {_fmt(value)}")


def exact(ok: bool, *, what: str, detail: str = "") -> Verdict:
    """An identity the claim rests on: confirmed if it holds, refuted if not."""
    return Verdict("confirmed" if ok else "refuted", f"{what} must hold exactly", detail or f"{what}: {ok}")


def combine(*parts: Verdict) -> Verdict:
    """Any refuted part refutes; all confirmed confirm; otherwise inconclusive. Rules and details are joined."""
    if not parts:
        raise ValueError("combine needs at least one verdict")
    outcomes = {p.verdict for p in parts}
    verdict = "refuted" if "refuted" in outcomes else "confirmed" if outcomes == {"confirmed"} else "inconclusive"
    return Verdict(verdict, "; ".join(f"({i + 1}) {p.rule}" for i, p in enumerate(parts)),
                   "; ".join(f"({i + 1}) {p.verdict}: {p.detail}" for i, p in enumerate(parts)))
