"""``python -m attnlab ...`` (and ``torchrun -m attnlab train ...``) is the ``attnlab`` command."""

import sys

from attnlab.cli import main

sys.exit(main())
