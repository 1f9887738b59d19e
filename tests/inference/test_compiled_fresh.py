"""Compiled decoding in ``make test``: one fresh interpreter per precision (fp32, bf16, int8) compiles and runs
plain greedy decoding and speculative decoding with a draft, on the shipped ``default`` / ``default-draft``
models, through the calls a user writes (``prepare_for_decode(..., compile="static")``, then
``attnlab.generate``). It checks that every graph really compiled — no StaticDecoder failure, no "decoding
stays eager" warning, no dynamo graph break, every decode step after the prompt served by a graph — and that the
tokens are the eager ones.

Why fresh interpreters: the bug this guards against (decoding silently stayed eager in fp32) came from
process-wide state initialised lazily — attnlab's CPU kernel, loaded on its first use, whose CPU check broke
the dynamo trace when that first use was inside the first traced decode step. In the test process, or after
any other decode, that state already exists and the bug cannot show. Each precision reaches the kernel
through its own layer (fp32 ``Linear``, bf16 ``PackedLinear``, int8 ``Int8Linear``), so each gets its own
process (``compiled_case.py``), and so does each path: plain greedy decoding, and speculative decoding with a
draft (whose graphs — the draft's steps, its catch-up feed, the target's 5-token verification — are then
traced first in their process too). The prompt is longer than the kernel's row limit, so the eager prefill
does not load the kernel either.

What is asserted on the tokens (32 new ones):
- fp32: plain and speculative compiled decoding give exactly the tokens of eager greedy decoding of the
  unprepared model (speculative greedy decoding is exact, and the static graphs are width-invariant).
- bf16 and int8: each compiled token is the greedy choice of the same model prepared at that precision
  without compiling, or within ``NEAR_TIE`` (0.05 standard deviations of that step's logits) of its best
  logit, decoding along the compiled tokens (``compiled_case.regret``). Not an equality: the static graph's
  attention accumulates over all cache slots in float32 and rounds otherwise than the eager kernel, so a
  near-tie can flip — here bf16 plain decoding of ``default-draft`` parts from eager bf16 at step 28, where
  the two best eager logits are one bf16 step (0.031) apart: regret 0.016. Speculative decoding gave the eager
  bf16/int8 tokens exactly, and int8 plain too. A real fault (a wrong mask, slot or weight) picks tokens
  standard deviations away from eager's choice.

Cost, as CPU time of the processes (before the paths were split into processes of their own; splitting adds
each process's imports and the draft's one-token graph) (measured on a loaded 2-core machine; a quiet one takes about as
long in wall time): ~40 s per precision when inductor's cache (``TORCHINDUCTOR_CACHE_DIR``, /tmp by default)
holds the graphs, ~90 s the first time on a machine, when inductor compiles the three graphs cold.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CASE = Path(__file__).with_name("compiled_case.py")
PRECISIONS = ["fp32", "bf16", "int8"]
NEAR_TIE = 0.05  # bf16/int8: how far (in std of the step's logits) a compiled token may be from eager's best


def _run_case(precision: str, path: str) -> dict:
    done = subprocess.run([sys.executable, "-W", "ignore::DeprecationWarning", str(CASE), precision, path],
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(params=PRECISIONS)
def plain(request) -> dict:
    return _run_case(request.param, "plain")


@pytest.fixture(params=PRECISIONS)
def speculative(request) -> dict:
    return _run_case(request.param, "speculative")


def _assert_compiled(run: dict, case: dict) -> None:
    assert case["fresh"], "attnlab's CPU kernel was already loaded before prepare_for_decode"
    assert all(why is None for why in run["failed"].values()), run["failed"]
    assert run["fallback_warnings"] == []
    assert case["graph_breaks"] == 0
    assert all(n == 1 for n in run["eager_calls"].values()), run["eager_calls"]  # the prompt only


def _assert_eager_tokens(run: dict, precision: str) -> None:
    if precision == "fp32":
        assert run["compiled"] == run["eager"]
        assert run["regret"] == 0.0
    else:
        assert run["regret"] <= NEAR_TIE, (run["regret"], run["compiled"], run["eager_same_precision"])


def test_plain_greedy_compiles_in_a_fresh_process(plain):
    case = plain
    run = case["plain"]
    _assert_compiled(run, case)
    assert run["graphs"] == {"default-draft": [[1, 1, 256]]}  # (batch, tokens per call, cache slots)
    assert run["static_calls"] == {"default-draft": 31}  # every step after the prompt ran the graph
    _assert_eager_tokens(run, case["precision"])


def test_speculative_with_a_draft_compiles_in_a_fresh_process(speculative):
    case = speculative
    run = case["speculative"]
    _assert_compiled(run, case)
    assert [1, 5, 256] in run["graphs"]["default"]  # γ + 1 = 5 (shorter last rounds may add a narrower one)
    assert run["static_calls"]["default"] > 0 and run["static_calls"]["default-draft"] > 0
    _assert_eager_tokens(run, case["precision"])
