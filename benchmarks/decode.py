"""Same as ``attnlab bench decode``; see its --help and BENCHMARKS.md for the command lines used."""

import sys

from attnlab.bench.decode import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
