"""One compiled-decoding case, run in a fresh interpreter by tests/inference/test_compiled_fresh.py.

    python compiled_case.py PRECISION PATH        # PRECISION: fp32 | bf16 | int8, PATH: plain | speculative

Loads the shipped ``default`` model (and ``default-draft`` for ``speculative``), prepares them with
``prepare_for_decode(precision=PRECISION, compile="static")`` and decodes with the call a user writes,
``attnlab.generate(target, ids, N)`` or ``attnlab.generate(target, ids, N, draft=draft)``, before anything else
in this process has run a decode step, traced a graph or loaded attnlab's CPU kernel. Then it runs the eager
references and prints one JSON line (the last line of stdout) for the test to judge:

- ``fresh``: attnlab's CPU kernel was not loaded yet when the model was prepared (the state in which the
  kernel-loading bug showed);
- ``failed`` / ``fallback_warnings``: each StaticDecoder's failure reason (None when its graphs compiled) and
  every "decoding stays eager" warning;
- ``graphs`` / ``static_calls`` / ``eager_calls``: the compiled graphs (batch, width, slots) and how many calls
  ran them; ``graph_breaks``: dynamo's graph-break counter (the graphs are compiled with fullgraph=True, so
  any break is a failure);
- ``compiled``: the compiled tokens; ``eager``: plain greedy decoding of the unprepared fp32 model (the
  reference); ``eager_same_precision``: plain greedy decoding of the model prepared at PRECISION without
  compiling; ``margins``: for each new token of the compiled run, the gap between the best and second-best
  logit of the eager same-precision model along the compiled tokens (how close to a tie each choice was);
- ``seconds``: wall time of the compiled run (compilation included) and of the whole case.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
import warnings

PROMPT = ('def fibonacci(n: int) -> int:\n    """Return the n-th Fibonacci number."""\n    if n < 2:\n'
          '        return n\n')
NEW_TOKENS = 32


def main(precision: str, path: str) -> dict:
    start = time.perf_counter()
    import torch

    import attnlab
    from attnlab.inference.fast import prepare_for_decode
    from attnlab.layers import cpu_kernels

    ids = torch.tensor([attnlab.load_tokenizer("default").encode(PROMPT)])  # (1, T)
    # prefill runs eagerly; with more rows than the kernel serves it uses BLAS and does not load the kernel,
    # so the first use of the kernel in this process is inside the first compiled decode step (or in
    # prepare_for_decode, which loads it on purpose before anything is traced)
    assert ids.shape[1] > cpu_kernels.MAX_ROWS, ids.shape
    target = attnlab.from_pretrained(os.environ.get("CASE_TARGET", "default"))
    draft = attnlab.from_pretrained("default-draft") if path == "speculative" else None
    fresh = cpu_kernels._state["loaded"] is None
    fast = prepare_for_decode(copy.deepcopy(target), precision=precision, compile="static")
    fast_draft = None if draft is None else prepare_for_decode(copy.deepcopy(draft), precision=precision,
                                                               compile="static")
    compile_start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = attnlab.generate(fast, ids, NEW_TOKENS, draft=fast_draft)  # (1, T + NEW_TOKENS)
    compiled_seconds = time.perf_counter() - compile_start
    decoders = {"target": fast.static_decoder} | ({} if fast_draft is None else {"draft": fast_draft.static_decoder})

    eager = attnlab.generate(target, ids, NEW_TOKENS)
    same = prepare_for_decode(copy.deepcopy(target), precision=precision)
    eager_same = attnlab.generate(same, ids, NEW_TOKENS)
    with torch.inference_mode():  # the eager same-precision logits along the compiled tokens
        logits = same(compiled[:, :-1])[0, ids.shape[1] - 1:].float()  # (NEW_TOKENS, V)
    top2 = logits.topk(2, dim=-1).values
    return {
        "precision": precision, "path": path, "fresh": fresh,
        "failed": {name: d.failed for name, d in decoders.items()},
        "fallback_warnings": [str(w.message) for w in caught if "decoding stays eager" in str(w.message)],
        "graphs": {name: [list(key[:3]) for key in d.stats.graphs] for name, d in decoders.items()},
        "static_calls": {name: d.stats.static_calls for name, d in decoders.items()},
        "eager_calls": {name: d.stats.eager_calls for name, d in decoders.items()},
        "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values()),
        "prompt_len": ids.shape[1],
        "compiled": compiled[0].tolist(), "eager": eager[0].tolist(), "eager_same_precision": eager_same[0].tolist(),
        "margins": (top2[:, 0] - top2[:, 1]).tolist(),
        "seconds": {"compiled_run": compiled_seconds, "total": time.perf_counter() - start},
    }


if __name__ == "__main__":
    precision, path = sys.argv[1:3]
    if precision not in ("fp32", "bf16", "int8") or path not in ("plain", "speculative"):
        sys.exit(f"usage: python {sys.argv[0]} fp32|bf16|int8 plain|speculative")
    print(json.dumps(main(precision, path)))
