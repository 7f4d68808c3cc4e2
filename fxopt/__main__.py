"""``python -m fxopt``: the same command line as ``fxopt``."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
