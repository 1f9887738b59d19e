"""Same as ``attnlab bench rwkv``: RWKV-4 vs a Transformer, per-token decode time and cache bytes vs context.

    python benchmarks/rwkv.py --json bench_results/rwkv.json --plot docs/img/rwkv_decode.png
"""

import sys

from attnlab.bench.rwkv import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
