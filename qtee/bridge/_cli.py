"""``qtee run -- PROG ARGS...``: a C program against the model, through the preload bridge.

Exit status: PROG's own; 128+N when a signal N killed it; 127 when PROG is not found,
126 when it cannot be run; 1 when the bridge is not built (one line on stderr each).
After PROG ends, one line on stderr says what the model still holds (a table with
``--trace``), for PROG and for each process it started that used the device; for a
process killed by a signal, its tables as of the last snapshot.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``qtee run``."""
    parser.add_argument("--tee", choices=("qtee", "optee"), default="qtee", help="the device")
    parser.add_argument(
        "--ta-module",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE in the program's model first (it registers its TAs; the "
        "current directory is searched first); repeatable",
    )
    parser.add_argument(
        "--storage", metavar="DIR", help="serve trusted storage from DIR (the model's supplicant)"
    )
    parser.add_argument(
        "--ta-dir",
        metavar="DIR",
        help="TA images the model's supplicant loads (<uuid>.ta for OP-TEE, <UUID>.mbn for QTEE)",
    )
    parser.add_argument(
        "--connect", metavar="PATH", help="use the device of a running server (qtee serve)"
    )
    parser.add_argument(
        "--trace", action="store_true", help="print each crossing, and the tables at the end"
    )
    parser.add_argument("program", nargs=argparse.REMAINDER, metavar="-- PROG ARGS...")


def run(args: argparse.Namespace) -> int:
    """Run PROG against the model; its exit status (see the module docstring)."""
    from qtee.bridge import BridgeConfig, BridgeNotBuilt, environment

    argv = list(args.program)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print("qtee run: no program given (qtee run [OPTIONS] -- PROG ARGS...)", file=sys.stderr)
        return 2
    prog = argv[0]
    found = prog if os.sep in prog else shutil.which(prog)
    if found is None or not os.path.exists(found):
        print(f"qtee run: {prog}: command not found", file=sys.stderr)
        return 127
    if os.path.isdir(found) or not os.access(found, os.X_OK):
        print(f"qtee run: {prog}: cannot run it (not an executable file)", file=sys.stderr)
        return 126
    with tempfile.TemporaryDirectory(prefix="qtee-run-") as reports:
        config = BridgeConfig(
            tee=args.tee,
            ta_modules=tuple(args.ta_module),
            storage=args.storage,
            ta_dir=args.ta_dir,
            connect=args.connect,
            trace=args.trace,
            report_dir=reports,
        )
        try:
            env = environment(config, search_first=os.getcwd())
        except BridgeNotBuilt as exc:
            print(f"qtee run: {exc}", file=sys.stderr)
            return 1
        try:
            proc = subprocess.Popen([found, *argv[1:]], env=env)
        except OSError as exc:
            print(f"qtee run: {prog}: {exc.strerror}", file=sys.stderr)
            return 126
        with _signals_go_to_the_child(proc):
            status = proc.wait()
        _report(Path(reports), proc.pid, status, table=args.trace)
    return 128 - status if status < 0 else status


@contextlib.contextmanager
def _signals_go_to_the_child(proc: subprocess.Popen[bytes]) -> Iterator[None]:
    """^C reaches the program by itself (the terminal signals the whole process group):
    this side ignores it and waits.  SIGTERM and SIGHUP sent to ``qtee run`` alone are
    passed on to the program, which decides; its status is then reported as usual."""

    def forward(sig: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)

    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
        signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
        signal.SIGHUP: signal.signal(signal.SIGHUP, forward),
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _report(reports: Path, pid: int, status: int, *, table: bool) -> None:
    """One line (or a table) per process that used the device."""
    found: list[dict[str, Any]] = []
    for path in sorted(reports.glob("*.json")):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    found.sort(key=lambda r: (r.get("pid") != pid, r.get("pid", 0)))
    for r in found:
        who = "" if r.get("pid") == pid else f" (process {r.get('pid')})"
        leaks: dict[str, int] = r.get("leaks") or {}
        if r.get("server"):
            print(
                f"qtee run: the device was the server's at {r['server']} "
                f"(its tables: qtee info --connect {r['server']}){who}",
                file=sys.stderr,
            )
            continue
        when = ""
        if not r.get("final"):
            killed = -status if r.get("pid") == pid and status < 0 else None
            how = f"killed by {signal.Signals(killed).name}" if killed else "ended without exit"
            when = f" at the last snapshot (the program was {how})"
        if not leaks:
            print(f"qtee run: tables empty{when}{who}", file=sys.stderr)
        elif table:
            print(f"qtee run: left in the model{when}{who}:", file=sys.stderr)
            width = max(len(k) for k in leaks)
            for name, count in leaks.items():
                print(f"    {name:<{width}} | {count}", file=sys.stderr)
        else:
            items = ", ".join(f"{k} {v}" for k, v in leaks.items())
            print(f"qtee run: left in the model{when}{who}: {items}", file=sys.stderr)
