"""``python -m lipbound``: the command line (same as the ``lipbound`` script)."""

import sys

from lipbound.cli import main

if __name__ == "__main__":
    sys.exit(main())
