"""The ``qtee`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qtee`` console script."""
    parser = argparse.ArgumentParser(prog="qtee", description=__doc__)
    sub = parser.add_subparsers(dest="verb", required=True)
    sub.add_parser("version", help="print the qtee version")
    sub.add_parser("demo", help="the end-to-end scenario, one trace line per crossing")
    from supplicant._cli import add_arguments

    add_arguments(
        sub.add_parser(
            "supplicant",
            help="run the listener daemon (time, file storage, TA autoload)",
            description="Run the supplicant: listeners registered with QTEE, served by workers.",
        )
    )
    args = parser.parse_args(argv)
    if args.verb == "supplicant":
        from supplicant._cli import run as run_supplicant

        return run_supplicant(args)
    if args.verb == "demo":
        from qtee._demo import run

        return run()
    if args.verb == "version":
        from qtee import __version__

        print(__version__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
