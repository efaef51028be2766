"""``qtee run -- PROG ARGS...``: a C program against the model, through the preload bridge.

Exit status: PROG's own; 128+N when a signal N killed it; 127 when PROG is not found,
126 when it cannot be run; 2 for bad options; 1 when the bridge is not built (one line
on stderr each).  After PROG ends, one line on stderr per process that opened a device
says what the model still holds (a table with ``--trace``); for a process killed by a
signal, its tables as of the last snapshot; when no process opened a device, a line
says so (a static program is not reached by the preload library).
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

_EPILOG = """\
exit status: PROG's own; 128+N when signal N killed it; 127 PROG not found; 126 PROG
cannot be run; 2 bad options; 1 the bridge is not built (make bridge).
With --connect the device is the server's: --tee, --ta-module, --storage, --ta-dir,
--plugin and --trace are the server's business (qtee serve) and cannot be given here.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``qtee run``."""
    from qtee._cli.ta_modules import add_ta_module_option

    parser.epilog = _EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--tee", choices=("qtee", "optee"), default=None, help="the device (default: qtee)"
    )
    add_ta_module_option(parser, "in the program's model ")
    parser.add_argument(
        "--storage", metavar="DIR", help="serve trusted storage from DIR (the model's supplicant)"
    )
    parser.add_argument(
        "--ta-dir",
        metavar="DIR",
        help="TA images the model's supplicant loads (<uuid>.ta for OP-TEE, <UUID>.mbn for QTEE)",
    )
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="UUID=MODULE:FUNCTION",
        help="a tee-supplicant plugin (--tee optee): FUNCTION(cmd, sub_cmd, data) -> "
        "(result, out) of MODULE (a module name or a .py file) serves UUID; repeatable",
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
    from objects import UsageError
    from qtee._cli.ta_modules import find_ta_module
    from qtee.bridge import BridgeConfig, BridgeNotBuilt, environment

    argv = list(args.program)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print("qtee run: no program given (qtee run [OPTIONS] -- PROG ARGS...)", file=sys.stderr)
        return 2
    if args.connect is not None:
        given = [
            flag
            for flag, value in (
                ("--tee", args.tee),
                ("--ta-module", args.ta_module),
                ("--storage", args.storage),
                ("--ta-dir", args.ta_dir),
                ("--plugin", args.plugin),
                ("--trace", args.trace),
            )
            if value
        ]
        if given:
            print(
                f"qtee run: {', '.join(given)}: the device of --connect is the server's "
                "(give these to qtee serve)",
                file=sys.stderr,
            )
            return 2
    if args.plugin and args.tee != "optee":
        print(
            f"qtee run: --plugin {args.plugin[0]}: plugins are tee-supplicant's (give --tee optee)",
            file=sys.stderr,
        )
        return 2
    try:  # checked here, so that a mistake is one line, not a model that cannot start
        ta_modules = tuple(find_ta_module(text) for text in args.ta_module)
    except UsageError as exc:
        print(f"qtee run: --ta-module {exc}", file=sys.stderr)
        return 2
    try:  # as qtee supplicant checks them, in the same words
        storage, ta_dir, plugins = _supplicant_options(args)
    except UsageError as exc:
        print(f"qtee run: {exc}", file=sys.stderr)
        return 2
    prog = argv[0]
    found = prog if os.sep in prog else shutil.which(prog)
    if found is None or not os.path.exists(found):
        print(f"qtee run: {prog}: command not found", file=sys.stderr)
        return 127
    if os.path.isdir(found) or not os.access(found, os.X_OK):
        print(f"qtee run: {prog}: cannot run it (not an executable file)", file=sys.stderr)
        return 126
    tee = args.tee or "qtee"
    if args.trace and tee == "optee":
        print(
            "qtee run: --trace: the OP-TEE device records no crossings; only the tables "
            "are printed at the end",
            file=sys.stderr,
        )
    with tempfile.TemporaryDirectory(prefix="qtee-run-") as reports:
        config = BridgeConfig(
            tee=tee,
            ta_modules=ta_modules,
            connect=args.connect,
            trace=args.trace,
            report_dir=reports,
            storage=storage,
            ta_dir=ta_dir,
            plugins=plugins,
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
        _report(Path(reports), proc.pid, status, prog=prog, table=args.trace)
    return 128 - status if status < 0 else status


def _supplicant_options(
    args: argparse.Namespace,
) -> tuple[str | None, str | None, tuple[str, ...]]:
    """``--storage`` (made if missing), ``--ta-dir`` and ``--plugin`` (its module imported
    and its function found) checked by ``qtee supplicant``'s own checks before PROG
    starts; the paths absolute, so that a PROG that changes directory before its first
    open still finds them.  A :class:`UsageError` names the option, its value and why."""
    from supplicant._options import check_plugin, check_storage, check_ta_dir

    if args.storage is not None:
        check_storage(args.storage)
    if args.ta_dir is not None:
        check_ta_dir(args.ta_dir)
    plugins = tuple(check_plugin(text) for text in args.plugin)
    storage = None if args.storage is None else os.path.abspath(args.storage)
    ta_dir = None if args.ta_dir is None else os.path.abspath(args.ta_dir)
    return storage, ta_dir, plugins


@contextlib.contextmanager
def _signals_go_to_the_child(proc: subprocess.Popen[bytes]) -> Iterator[None]:
    """^C and ^\\ reach the program by themselves (the terminal signals the whole process
    group): this side ignores them and waits.  SIGTERM and SIGHUP sent to ``qtee run``
    alone are passed on to the program, which decides; its status is reported as usual."""

    def forward(sig: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)

    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
        signal.SIGQUIT: signal.signal(signal.SIGQUIT, signal.SIG_IGN),
        signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
        signal.SIGHUP: signal.signal(signal.SIGHUP, forward),
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _report(reports: Path, pid: int, status: int, *, prog: str, table: bool) -> None:
    """One line (or a table) per process that used the device."""
    found: list[dict[str, Any]] = []
    for path in sorted(reports.glob("*.json")):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    found.sort(key=lambda r: (r.get("pid") != pid, r.get("pid", 0)))
    killed = signal.Signals(-status).name if status < 0 else None
    if not any(r.get("tried") or r.get("error") for r in found):
        how = f" before it was killed by {killed}" if killed else ""
        print(
            f"qtee run: {prog} opened no TEE device{how} (a static program, or one that "
            "does not open /dev/teeN through libc, is not reached by the bridge)",
            file=sys.stderr,
        )
        return
    for r in found:
        if r.get("error") or not r.get("tried"):  # the bridge said why when it happened
            continue
        who = "" if r.get("pid") == pid else f" (process {r.get('pid')})"
        if not r.get("opened"):
            print(f"qtee run: no device could be opened{who} (see above)", file=sys.stderr)
            continue
        if r.get("server"):
            print(
                f"qtee run: the device was the server's at {r['server']} (its tables are "
                f"the server's: qtee serve prints them when it stops){who}",
                file=sys.stderr,
            )
            continue
        leaks: dict[str, int] = r.get("leaks") or {}
        when = ""
        if not r.get("final"):
            how = f"killed by {killed}" if r.get("pid") == pid and killed else "ended without exit"
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
