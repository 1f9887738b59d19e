"""Same as ``attnlab bench precision``; see its --help and BENCHMARKS.md for the command lines used."""

import sys

from attnlab.bench.precision import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
