"""Infini-attention: passkey retrieval at 1x-64x the training length vs a windowed softmax Transformer, and
the memory of streaming up to 1M tokens. Same as ``attnlab bench infini``.

    python benchmarks/infini.py --quick
    python benchmarks/infini.py --models-dir bench_results/infini_models --json bench_results/infini.json \
        --plot-dir docs/img
"""

import sys

from attnlab.bench.infini import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
