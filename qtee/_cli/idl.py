"""``qtee idl gen FILE.idl -o DIR [-I PATH]... [--by-size]``: write the typed Python module
of a Mink IDL file (:func:`objects.idl.gen.generate`).

An IDL problem prints one line, ``qtee idl: FILE:LINE:COL: message``, and exits 2; so
does an output directory that cannot be written, and a path that is not what it should
be (``qtee idl: nope.idl: no such file``, a folder given as the file, ``-o`` naming a
file).  ^C prints ``qtee idl: interrupted`` and exits 130.  What the compiler only warns about
prints ``qtee idl: warning: FILE:LINE:COL: message`` and the module is written.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

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
    """Run ``qtee idl gen``: 0 with the module's path printed, 2 for an IDL problem or a
    path that is not what it should be, 130 on ^C (one line, no traceback)."""
    try:
        return _gen(args)
    except KeyboardInterrupt:  # ^C while reading (a FIFO, a slow disk) or writing
        print("qtee idl: interrupted", file=sys.stderr)
        return 130


def _path_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the paths given, before reading: no fake FILE:1:1 position."""
    file = Path(args.file)
    if not file.exists():
        return f"{args.file}: no such file"
    if file.is_dir():
        return f"{args.file}: is a folder, not an .idl file"
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return f"-o must be a folder: {args.out} is a file"
    return None


def _gen(args: argparse.Namespace) -> int:
    from objects import UsageError
    from objects.idl import IdlWarning
    from objects.idl.gen import generate

    problem = _path_problem(args)
    if problem is not None:
        print(f"qtee idl: {problem}", file=sys.stderr)
        return 2
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", IdlWarning)
            target = generate(args.file, args.out, args.include, by_size=args.by_size)
        for w in caught:
            if issubclass(w.category, IdlWarning):
                print(f"qtee idl: warning: {w.message}", file=sys.stderr)
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    except UsageError as exc:
        print(f"qtee idl: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"qtee idl: {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(target)
    return 0
