"""MHA -> GQA -> MQA conversion: KV bytes, decode speed, perplexity before / after / uptrained.
Same as ``attnlab bench gqa``.

    python benchmarks/gqa.py --quick --models mha
    python benchmarks/gqa.py --mha-dir bench_results/gqa_mha --json bench_results/gqa.json --plot docs/img/gqa.png
"""

import sys

from attnlab.bench.gqa import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
