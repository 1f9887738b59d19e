"""Naive vs sdpa vs flash attention: time and peak memory against T. Same as ``attnlab bench attention``.

    python benchmarks/attention.py --quick
    python benchmarks/attention.py --seq 4096 8192 --dtypes fp32
"""

import sys

from attnlab.bench.attention import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
