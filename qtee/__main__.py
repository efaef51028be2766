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
    serve = sub.add_parser(
        "serve",
        help="serve a device on a Unix socket (one connection = one open fd)",
        description="Host the driver model and a secure world on a Unix socket.",
    )
    serve.add_argument("--socket", required=True, metavar="PATH", help="socket path to listen on")
    serve.add_argument(
        "--ta-module",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first (it registers its TAs); repeatable",
    )
    serve.add_argument(
        "--duration", type=float, default=None, metavar="SECONDS", help="stop after this long"
    )
    args = parser.parse_args(argv)
    if args.verb == "serve":
        return _serve(args)
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


def _serve(args: argparse.Namespace) -> int:
    import importlib
    import signal
    import threading

    from qtee._server import DeviceServer

    for name in args.ta_module:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            print(f"qtee serve: cannot import {name}: {exc}", file=sys.stderr)
            return 2
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with DeviceServer(args.socket) as server:
            print(f"serving on {args.socket}", flush=True)
            stop.wait(args.duration)
            leaks = server.device.leaks()
    except OSError as exc:
        print(f"qtee serve: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("tables: empty" if not leaks else f"tables: {leaks}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
