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
process (``compiled_case.py``). Within one, plain decoding runs first: its first step is the first trace of
the process. A fresh speculative run would start with the very same trace (the draft's one-token step, after
eager prefills), so speculation runs second, with the same prepared draft, and adds the graphs only it needs
(the draft's 2-token catch-up feed, the target's 5-token verification) — a third process per precision would
cost its imports and compilations again and reach no other first trace. The prompt is longer than the
kernel's row limit, so the eager prefill does not load the kernel either.

What is asserted on the tokens (32 new ones):
- fp32: plain and speculative compiled decoding give exactly the tokens of eager greedy decoding of the
  unprepared model (speculative greedy decoding is exact, and the static graphs are width-invariant).
- bf16 and int8: exactly the tokens of eager greedy decoding of the model prepared at that precision
  without compiling. That holds today on this prompt (and, here, even the fp32 tokens); it is stated as an
  equality because the decode graphs round as the eager code does (``static.inductor_options``) and the linear
  layers run attnlab's own kernel, the same in both. Near-ties could in principle part them on another
  machine; the case reports the closest eager margin (``margin``) to tell such a failure from a real one.

Cost (2 cores): ~30 s per precision when inductor's cache (``TORCHINDUCTOR_CACHE_DIR``, /tmp by default)
holds the graphs; about twice that the first time on a machine, when inductor compiles the three graphs cold.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CASE = Path(__file__).with_name("compiled_case.py")
PRECISIONS = ["fp32", "bf16", "int8"]


@pytest.fixture(scope="module", params=PRECISIONS)
def case(request) -> dict:
    done = subprocess.run([sys.executable, "-W", "ignore::DeprecationWarning", str(CASE), request.param],
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _assert_compiled(run: dict, case: dict) -> None:
    assert case["fresh"], "attnlab's CPU kernel was already loaded before prepare_for_decode"
    assert all(why is None for why in run["failed"].values()), run["failed"]
    assert run["fallback_warnings"] == []
    assert case["graph_breaks"] == 0
    assert all(n == 1 for n in run["eager_calls"].values()), run["eager_calls"]  # the prompt only


def test_plain_greedy_compiles_in_a_fresh_process(case):
    run = case["plain"]
    _assert_compiled(run, case)
    assert run["graphs"] == {"default-draft": [[1, 1, 256]]}  # (batch, tokens per call, cache slots)
    assert run["static_calls"] == {"default-draft": 31}  # every step after the prompt ran the graph
    want = run["eager"] if case["precision"] == "fp32" else run["eager_same_precision"]
    assert run["compiled"] == want, f"closest eager margin {run['margin']:.4f}"


def test_speculative_with_a_draft_compiles_in_a_fresh_process(case):
    run = case["speculative"]
    _assert_compiled(run, case)
    assert [1, 5, 256] in run["graphs"]["default"]  # γ + 1 = 5 (shorter last rounds may add a narrower one)
    assert run["static_calls"]["default"] > 0 and run["static_calls"]["default-draft"] > 0
    want = run["eager"] if case["precision"] == "fp32" else run["eager_same_precision"]
    assert run["compiled"] == want, f"closest eager margin {run['margin']:.4f}"
