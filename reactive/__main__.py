"""``python -m reactive``: the same as the ``reactive`` command."""

import sys

from reactive.cli import main

if __name__ == "__main__":
    sys.exit(main())
