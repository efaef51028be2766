"""``qtee idl gen FILE.idl -o DIR [-I PATH]... [--by-size]``: write the typed Python module
of a Mink IDL file (:func:`objects.idl.gen.generate`).

An IDL problem prints one line, ``qtee idl: FILE:LINE:COL: message``, and exits 2; so
does an output directory that cannot be written.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``qtee idl`` verbs (``gen``)."""
    verbs = parser.add_subparsers(dest="idl_verb", metavar="VERB")  # none: a usage error
    gen = verbs.add_parser(
        "gen",
        help="write the typed Python module of an IDL file",
        description="Read FILE.idl as the Mink IDL compiler does and write FILE.py into "
        "DIR: per interface a stub, a skeleton, its errors and constants.",
    )
    gen.add_argument("file", metavar="FILE.idl", help="the IDL file")
    gen.add_argument("-o", "--out", required=True, metavar="DIR", help="the output directory")
    gen.add_argument(
        "-I",
        dest="include",
        action="append",
        default=[],
        metavar="PATH",
        help="a directory to look for included files in (repeatable)",
    )
    gen.add_argument(
        "--by-size",
        action="store_true",
        help="order bundled arguments by size, the compiler's legacy order",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``qtee idl gen``: 0 with the module's path printed, 2 for an IDL problem."""
    from objects import UsageError
    from objects.idl.gen import generate

    try:
        target = generate(args.file, args.out, args.include, by_size=args.by_size)
    except UsageError as exc:
        print(f"qtee idl: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"qtee idl: {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(target)
    return 0
