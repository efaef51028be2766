"""``python -m qtee`` and the ``qtee`` console script: the command line of
:mod:`qtee._cli.verbs`."""

import sys

from qtee._cli.verbs import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
