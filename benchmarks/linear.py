"""Same as ``attnlab bench linear``; see its --help and BENCHMARKS.md for the command lines used."""

import sys

from attnlab.bench.linear import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
