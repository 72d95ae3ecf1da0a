"""``python -m prefetch_compile``: the command line of :mod:`prefetch_compile.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
