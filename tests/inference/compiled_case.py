"""Compiled decoding at one precision, run in a fresh interpreter by tests/inference/test_compiled_fresh.py.

    python compiled_case.py fp32|bf16|int8

Prepares the shipped ``default`` model (target) and ``default-draft`` (draft) with
``prepare_for_decode(precision=..., compile="static")`` and decodes with the calls a user writes, before
anything else in this process has run a decode step, traced a graph or loaded attnlab's CPU kernel:

1. ``plain``: ``attnlab.generate(draft, ids, N)`` — the first graph traced in this process (draft, 1 token);
2. ``speculative``: ``attnlab.generate(target, ids, N, draft=draft)`` — the same prepared draft (its 1-token
   graph reused, a 2-token one for catch-up feeds) and the target's verification graph (γ + 1 = 5 tokens).

Then it runs the eager references and prints one JSON object (the last line of stdout) for the test to judge;
per path:

- ``failed`` / ``fallback_warnings``: each StaticDecoder's failure reason (None when its graphs compiled) and
  every "decoding stays eager" warning; ``graphs`` ((batch, width, slots) of each compiled graph),
  ``static_calls`` / ``eager_calls`` (calls that ran a graph / the eager forward);
- ``compiled``: the new tokens; ``eager``: plain greedy decoding of the unprepared fp32 model;
  ``eager_same_precision``: plain greedy decoding of the model prepared at this precision without compiling;
  ``regret``: how far from that eager model's own greedy choice the compiled tokens were, at worst
  (``regret()``: 0 when each is its greedy choice, small when a choice was a near-tie).

and, for the whole process: ``fresh`` (the kernel was not loaded when the models were prepared),
``graph_breaks`` (dynamo's counter: the graphs are compiled with fullgraph=True, so any break is a failure)
and ``seconds``.
"""

from __future__ import annotations

import copy
import json
import sys
import time
import warnings

PROMPT = ('def fibonacci(n: int) -> int:\n    """Return the n-th Fibonacci number."""\n    if n < 2:\n'
          '        return n\n')
NEW_TOKENS = 32


def regret(model, ids, tokens: list[int]) -> float:
    """Decoding ``tokens`` after ``ids`` step by step with ``model`` (eager): the largest gap, over the steps,
    between the best logit and the logit of the token chosen, in standard deviations of that step's logits.
    0 when every token is the model's own greedy choice; small when a choice was a near-tie."""
    import torch

    cache = model.new_cache(1, ids.shape[1] + len(tokens))
    worst = 0.0
    with torch.inference_mode():
        logits = model(ids, cache=cache)[0, -1].float()  # (V,)
        for i, token in enumerate(tokens):
            worst = max(worst, float((logits.max() - logits[token]) / logits.std()))
            if i + 1 < len(tokens):
                logits = model(torch.tensor([[token]]), cache=cache)[0, -1].float()
    return worst


RUNS = {"plain": ("default-draft", None), "speculative": ("default", "default-draft")}  # path: (target, draft)


def main(precision: str, path: str) -> dict:
    start = time.perf_counter()
    import torch

    import attnlab
    from attnlab.inference.fast import prepare_for_decode
    from attnlab.layers import cpu_kernels

    ids = torch.tensor([attnlab.load_tokenizer("default").encode(PROMPT)])  # (1, T)
    # prefill runs eagerly; with more rows than the kernel serves it uses BLAS and does not load the kernel,
    # so without prepare_for_decode's explicit load the first use of the kernel would be inside a trace
    assert ids.shape[1] > cpu_kernels.MAX_ROWS, ids.shape
    runs = {path: RUNS[path]}  # one path per process: its first decode step is the process's first trace
    models = {name: attnlab.from_pretrained(name) for name in RUNS[path] if name is not None}
    fresh = not cpu_kernels.load_attempted()
    fast = {name: prepare_for_decode(copy.deepcopy(m), precision=precision, compile="static")
            for name, m in models.items()}
    result: dict = {"precision": precision, "fresh": fresh, "prompt_len": ids.shape[1], "seconds": {}}
    for path, (target, draft) in runs.items():
        # the draft's decoder is shared by both paths: count its graphs and calls per path
        before = {name: (len(f.static_decoder.stats.graphs), f.static_decoder.stats.static_calls,
                         f.static_decoder.stats.eager_calls) for name, f in fast.items()}
        began = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = attnlab.generate(fast[target], ids, NEW_TOKENS, draft=None if draft is None else fast[draft])
        result["seconds"][path] = time.perf_counter() - began
        used = [target] + ([draft] if draft else [])
        stats = {name: fast[name].static_decoder.stats for name in used}
        result[path] = {
            "failed": {name: fast[name].static_decoder.failed for name in used},
            "fallback_warnings": [str(w.message) for w in caught if "decoding stays eager" in str(w.message)],
            "graphs": {name: [list(key[:3]) for key in list(s.graphs)[before[name][0]:]] for name, s in stats.items()},
            "static_calls": {name: s.static_calls - before[name][1] for name, s in stats.items()},
            "eager_calls": {name: s.eager_calls - before[name][2] for name, s in stats.items()},
            "compiled": out[0, ids.shape[1]:].tolist(),
        }
    result["graph_breaks"] = sum(torch._dynamo.utils.counters["graph_break"].values())
    for path, (target, _) in runs.items():  # the references, after every compiled call
        same = prepare_for_decode(copy.deepcopy(models[target]), precision=precision)
        run = result[path]
        run["eager"] = attnlab.generate(models[target], ids, NEW_TOKENS)[0, ids.shape[1]:].tolist()
        run["eager_same_precision"] = attnlab.generate(same, ids, NEW_TOKENS)[0, ids.shape[1]:].tolist()
        run["regret"] = regret(same, ids, run["compiled"])
    result["seconds"]["total"] = time.perf_counter() - start
    return result


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("fp32", "bf16", "int8") or sys.argv[2] not in RUNS:
        sys.exit(f"usage: python {sys.argv[0]} fp32|bf16|int8 plain|speculative")
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
