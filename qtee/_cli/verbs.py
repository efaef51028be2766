"""The qtee command line: the demo, a device server, the supplicant, traces, guests, TA
signing."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qtee._cli import trace as _trace_mod
    from qtee._remote.remote import RemoteContext

#: How often a wait looks at the clock and for a signal.
_POLL = 0.1
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qtee`` console script.

    A reader that goes away (``qtee trace | head``) ends the command quietly, with
    status 1 as Python's own tools do on a closed pipe (EPIPE)."""
    try:
        try:
            status = _main(argv)
        finally:  # after --help's SystemExit too: a closed pipe shows here, not at exit
            sys.stdout.flush()
    except BrokenPipeError:
        _stdout_to_devnull()
        return 1
    return status


def _stdout_to_devnull() -> None:
    """Point fd 1 at /dev/null: what is still buffered for the closed pipe is dropped at
    exit instead of failing again ("Exception ignored ... BrokenPipeError")."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # replaced (a test's capture) or closed
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _main(argv: Sequence[str] | None) -> int:
    from qtee import __version__

    parser = argparse.ArgumentParser(prog="qtee", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="verb", required=True)
    sub.add_parser("version", help="print the qtee version")
    sub.add_parser("demo", help="the end-to-end scenario, one trace line per crossing")
    from supplicant._cli import add_arguments

    supplicant_parser = sub.add_parser(
        "supplicant",
        help="run the listener daemon (time, file storage, TA autoload)",
        description="Run the supplicant: listeners registered with QTEE, served by workers, "
        "on an in-process device or, with --connect PATH, on the device of a running server "
        "(qtee serve).  At the end it prints the requests each listener served (--tee "
        "optee: the RPCs tee-supplicant answered, by kind) and, in process, the driver's "
        "tables (a server's tables are the server's: see qtee info --connect).",
    )
    add_arguments(supplicant_parser)
    from qtee.vm._cli import add_arguments as add_vm_arguments

    add_vm_arguments(
        sub.add_parser(
            "vm",
            help="guests with their own TEE through a userspace mediator; per-VM tables",
            description="Start guests with chosen TEE settings behind a VMM-side mediator, "
            "run the invoke-loop scenario in the host and each QTEE guest at once, "
            "optionally destroy one mid-call, and print per-VM tables.",
        )
    )
    from qtee.bridge._cli import add_arguments as add_run_arguments

    add_run_arguments(
        sub.add_parser(
            "run",
            help="run a C program against the model (LD_PRELOAD bridge): qtee run -- PROG ARGS",
            description="Run an unmodified C program whose opens of /dev/tee0 and "
            "/dev/teepriv0 reach the model in its own process; exit with its status and "
            "say what the model still holds.",
        )
    )
    from qtee._cli.ta import add_arguments as add_ta_arguments

    ta_parser = sub.add_parser("ta", help="TA images: qtee ta sign")
    add_ta_arguments(ta_parser)
    from qtee._cli.idl import add_arguments as add_idl_arguments

    idl_parser = sub.add_parser("idl", help="Mink IDL files: qtee idl gen")
    add_idl_arguments(idl_parser)
    serve = sub.add_parser(
        "serve",
        help="serve a device on a Unix socket (one connection = one open fd)",
        description="Host the driver model and a secure world on a Unix socket.",
    )
    serve.add_argument(
        "--socket",
        required=True,
        metavar="PATH",
        help="socket path to listen on (a socket left there by a server that is gone is "
        "replaced; a live server's socket or any other file is an error, exit 2)",
    )
    serve.add_argument(
        "--tee",
        choices=("qtee", "optee"),
        default="qtee",
        help="the device served: QTEE (default) or OP-TEE, whose privileged node "
        "(tee-supplicant's) a connection may open too",
    )
    from qtee._cli.ta_modules import add_ta_module_option

    add_ta_module_option(serve)
    serve.add_argument(
        "--duration", type=_seconds, default=None, metavar="SECONDS", help="stop after this long"
    )
    serve.add_argument(
        "--introspect",
        action="store_true",
        help="answer qtee info/trace --connect (they show every connection's labels and "
        "calls); refused without it",
    )
    info = sub.add_parser(
        "info",
        help="version, impl id, caps, loaded TAs and live objects per open fd of a device",
        description="Describe a device: version, impl id, caps, loaded TAs, live objects "
        "and what each open fd holds.  The device is a fresh in-process one, or with "
        "--connect PATH the device of a running server (qtee serve).",
    )
    source = info.add_mutually_exclusive_group()
    source.add_argument(
        "--demo",
        action="store_true",
        help="in process: first load a sample TA and open a service (released again at the end)",
    )
    source.add_argument(
        "--connect",
        metavar="PATH",
        help="describe the device of the server at PATH (its own connection is one of the "
        "open fds)",
    )
    trace = sub.add_parser(
        "trace",
        help="record, show or replay a trace of crossings as a table",
        description="Show crossings as a table: those of the demo scenario on an in-process "
        "device (--demo), those of a running server as they happen (--connect PATH, one row "
        "per crossing as it arrives), or a trace saved earlier (--replay FILE).  --record "
        "FILE saves the trace (msgpack) instead of printing it.",
    )
    where = trace.add_mutually_exclusive_group()
    where.add_argument("--record", metavar="FILE", help="save the trace of the run to FILE")
    where.add_argument("--replay", metavar="FILE", help="print the trace saved in FILE")
    trace.add_argument(
        "--demo",
        action="store_true",
        help="run the demo scenario in process (what --record traces without --connect); "
        "without --record its table is printed",
    )
    trace.add_argument(
        "--connect",
        metavar="PATH",
        help="trace the server at PATH live, until --duration is over, SIGINT or SIGTERM",
    )
    trace.add_argument(
        "--duration",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="with --connect: stop after this long",
    )
    args, extra = parser.parse_known_args(argv)
    if extra:  # the verb's own usage and name, not the top level's
        _verb_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    if args.verb == "ta" and args.ta_verb is None:
        ta_parser.error("give a verb: sign (sign a model TA image; qtee ta sign --help)")
    if args.verb == "run":
        from qtee.bridge._cli import run as run_program

        return run_program(args)
    if args.verb == "ta":
        from qtee._cli.ta import run as run_ta

        return run_ta(args)
    if args.verb == "idl":
        if args.idl_verb is None:
            idl_parser.error("give a verb: gen (write a typed module; qtee idl gen --help)")
        from qtee._cli.idl import run as run_idl

        return run_idl(args)
    if args.verb == "serve":
        return _serve(args)
    if args.verb == "info":
        return _info(args)
    if args.verb == "trace":
        if args.replay is not None and args.demo:
            trace.error("--replay cannot be combined with --demo")
        if args.connect is not None and (args.replay is not None or args.demo):
            trace.error(
                f"--connect cannot be combined with {'--demo' if args.demo else '--replay'}"
            )
        if args.duration is not None and args.connect is None:
            trace.error("--duration needs --connect")
        if args.record is None and args.replay is None and not args.demo and not args.connect:
            trace.error("one of --record FILE, --replay FILE, --demo or --connect PATH is required")
        if args.connect is not None:
            return _trace_live(args)
        return _trace(args)
    if args.verb == "supplicant":
        from supplicant._cli import check_arguments
        from supplicant._cli import run as run_supplicant

        check_arguments(supplicant_parser, args)
        return run_supplicant(args)
    if args.verb == "vm":
        from qtee.vm._cli import run as run_vm

        return run_vm(args)
    if args.verb == "demo":
        from qtee._cli.demo import run

        return run()
    if args.verb == "version":
        print(__version__)
    return 0


def _verb_parser(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> argparse.ArgumentParser:
    """The parser of the innermost verb ``args`` chose (``qtee ta sign``'s for ``ta sign``)."""
    while True:
        verbs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        chosen = getattr(args, verbs[0].dest, None) if verbs else None
        if chosen is None:
            return parser
        parser = verbs[0].choices[chosen]


def _seconds(text: str) -> float:
    """An argparse type: a duration of zero seconds or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"a duration is 0 or more seconds, not {text}")
    return value


def _serve(args: argparse.Namespace) -> int:
    from objects import UsageError
    from qtee._remote.server import DeviceServer
    from qtee.secure._registry import PROCESS_TAS

    for text in args.ta_module:
        before = PROCESS_TAS.describe()
        status = _import_ta_module("serve", text)
        if status:
            return status
        if PROCESS_TAS.describe() == before:
            print(
                f"qtee serve: warning: --ta-module {text} registered no TA (a TA module calls "
                "register_ta, register_gp_ta or register_ta_file when imported)",
                file=sys.stderr,
            )
    end = None if args.duration is None else time.monotonic() + args.duration
    server = DeviceServer(args.socket, tee=args.tee, introspect=args.introspect)
    with _stop_on_signals() as stop:
        try:
            server.start()
        except UsageError as exc:  # the path holds a live server's socket, a file; too long
            print(f"qtee serve: {_one_line(exc)}", file=sys.stderr)
            return 2
        except OSError as exc:  # its directory is missing, not writable...
            why = _one_line(exc.strerror or exc)
            print(f"qtee serve: cannot listen on {args.socket}: {why}", file=sys.stderr)
            return 2
        try:
            print(f"serving on {args.socket}", flush=True)
            served = PROCESS_TAS.describe()
            print(f"TAs: {', '.join(served) if served else 'none registered'}", flush=True)
            _sleep_until(end, stop)
        finally:
            server.stop()
    leaks = server.device.leaks()  # once every connection is closed (its fd with it)
    if leaks:  # a call still running in the model when the server stopped holds these
        print("tables: " + ", ".join(f"{name} {n}" for name, n in leaks.items()))
    else:
        print("tables: empty")
    return 0


def _import_ta_module(verb: str, text: str) -> int:
    """Import the TA module ``text`` (a name or a ``.py`` file): 0, or the exit status
    after one stderr line (2: no such module or file) or, when the module's own code
    fails, the traceback from its first frame on (1; no importlib or qtee frames)."""
    from objects import UsageError
    from qtee._cli.ta_modules import find_ta_module, import_ta_module

    try:
        import_ta_module(find_ta_module(text))
    except UsageError as exc:
        print(f"qtee {verb}: --ta-module {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # the module's code (or a parent package's) failed
        import traceback

        tb = exc.__traceback__
        while tb is not None and _machinery(tb.tb_frame.f_code.co_filename):
            tb = tb.tb_next
        print(f"qtee {verb}: --ta-module {text}: importing it failed:", file=sys.stderr)
        traceback.print_exception(type(exc), exc, tb, file=sys.stderr)
        return 1
    return 0


def _machinery(filename: str) -> bool:
    """A frame of the import system or of this package, not of a TA module."""
    import importlib

    if filename.startswith("<frozen importlib"):
        return True
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.dirname(os.path.abspath(filename)) in (here, os.path.dirname(importlib.__file__))


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[list[int]]:
    """The signals (SIGINT, SIGTERM) received while in the block, as a list that the
    handler appends to.  A handler runs between two bytecodes of the main thread, which
    may then hold any lock (an Event's too), so it takes none; waits poll the list.
    Handlers can only be set from the main thread: elsewhere (a test running the CLI in
    a thread) the list stays empty."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return
    previous = {s: signal.signal(s, lambda sig, _: got.append(sig)) for s in _STOP_SIGNALS}
    try:
        yield got
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _sleep_until(end: float | None, stop: list[int]) -> None:
    """Sleep until the monotonic time ``end`` (None: for ever) or a signal in ``stop``."""
    while not stop:
        left = _POLL if end is None else min(_POLL, end - time.monotonic())
        if left <= 0:
            return
        time.sleep(left)


def _open_remote(verb: str, path: str) -> RemoteContext | None:
    """One connection to the server at ``path``; None (and one line on stderr) if none."""
    import qtee
    from objects import QteeBaseError

    try:
        return qtee.connect(path).open()
    except (OSError, QteeBaseError) as exc:
        detail = getattr(exc, "detail", "") or str(exc)
        if not detail.startswith("cannot connect"):
            detail = f"cannot connect to {path}: {detail}"
        print(f"qtee {verb}: {_one_line(detail)}", file=sys.stderr)
        return None


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _no_introspection(verb: str, path: str, exc: OSError) -> bool:
    """Say so in one stderr line if ``exc`` is the server's refusal to be looked at."""
    if exc.errno != errno.EACCES:
        return False
    print(
        f"qtee {verb}: the server at {path} does not allow introspection "
        "(start it with qtee serve --introspect)",
        file=sys.stderr,
    )
    return True


def _trace(args: argparse.Namespace) -> int:
    import contextlib
    import io

    from qtee._cli import trace as _trace

    if args.replay is not None:
        try:
            records = _trace.load(args.replay)
        except OSError as exc:
            why = exc.strerror or exc
            print(f"qtee trace: cannot read {args.replay}: {_one_line(why)}", file=sys.stderr)
            return 1
        except _trace.TraceFileError as exc:
            print(f"qtee trace: {args.replay}: not a qtee trace: {_one_line(exc)}", file=sys.stderr)
            return 1
        print(_trace.format_table(records))
        return 0
    import qtee
    from qtee._cli.demo import run

    recorder = _trace.Trace()
    device = qtee.Device(qtee.SecureWorld(qtee.QteeRoot()))
    device.trace_records = recorder
    with contextlib.redirect_stdout(io.StringIO()):  # the demo's own lines
        status = run(device)
    if status:
        print("qtee trace: the demo scenario failed (run `qtee demo` to see)", file=sys.stderr)
        return 1
    if args.record is None:
        print(_trace.format_table(recorder.records))
        return 0
    return _save_trace(recorder, args.record)


def _save_trace(trace: _trace_mod.Trace, path: str) -> int:
    """Save ``trace`` to ``path`` and say so; 1 (and one stderr line) when it cannot."""
    try:
        trace.save(path)
    except OSError as exc:
        why = exc.strerror or exc
        print(f"qtee trace: cannot write {path}: {_one_line(why)}", file=sys.stderr)
        return 1
    print(f"recorded {len(trace.records)} crossings to {path}")
    return 0


def _trace_live(args: argparse.Namespace) -> int:
    """``trace --connect``: the server's crossings as they happen, printed or recorded."""
    import queue
    from typing import Any

    from qtee._cli import trace as _trace

    path = args.connect
    ctx = _open_remote("trace", path)
    if ctx is None:
        return 1
    live = args.record is None
    # queue.Queue, not SimpleQueue: CPython 3.11's SimpleQueue.get(timeout=...) blocks for
    # ever when a signal handler runs past the deadline.
    maps: queue.Queue[dict[str, Any]] = queue.Queue()
    records: list[_trace.TraceRecord] = []
    failure: str | None = None
    end = None if args.duration is None else time.monotonic() + args.duration
    try:
        ctx.stream_trace(maps.put)  # from now on, every crossing of the server
    except OSError as exc:  # DriverError: refused, or the connection dropped
        ctx.close()
        if not _no_introspection("trace", path, exc):
            print(f"qtee trace: {path}: {_one_line(exc)}", file=sys.stderr)
        return 1
    try:
        with _stop_on_signals() as stop:
            if live:
                print(_trace.format_header(), flush=True)
            while not stop:
                left = _POLL if end is None else min(_POLL, end - time.monotonic())
                if left <= 0:
                    break
                try:
                    m = maps.get(timeout=left)
                except queue.Empty:
                    continue
                if not m:  # the end of the stream: the connection is gone
                    failure = f"lost the connection to the server at {path}"
                    break
                if m.keys() == {"dropped"}:  # the server's queue for this reader overflowed
                    print(
                        f"qtee trace: the server dropped {m['dropped']} crossings "
                        "(this reader fell behind)",
                        file=sys.stderr,
                        flush=True,
                    )
                    continue
                try:
                    record = _trace.record_from_map(m, len(records))
                except _trace.TraceFileError as exc:
                    failure = f"the server at {path} sent a malformed {_one_line(exc)}"
                    break
                records.append(record)
                if live:
                    print(_trace.format_row(record, records[0].time), flush=True)
    finally:
        ctx.close()
    if live:
        print(_trace.format_count(len(records)))
    else:
        saved = _trace.Trace()
        for record in records:
            saved(record)
        if _save_trace(saved, args.record):
            return 1
    if failure is not None:
        print(f"qtee trace: {failure}", file=sys.stderr)
        return 1
    return 0


def _info(args: argparse.Namespace) -> int:
    from qtee._cli.info import describe, format_info

    if args.connect is not None:
        ctx = _open_remote("info", args.connect)
        if ctx is None:
            return 1
        try:
            text = format_info(ctx.info())
        except OSError as exc:  # DriverError: refused, the connection dropped, or no answer
            if not _no_introspection("info", args.connect, exc):
                print(f"qtee info: {args.connect}: {_one_line(exc)}", file=sys.stderr)
            return 1
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            what = f"{type(exc).__name__} {_one_line(exc)}"
            print(
                f"qtee info: the server at {args.connect} sent a malformed description ({what})",
                file=sys.stderr,
            )
            return 1
        finally:
            ctx.close()
        print(text)
        return 0
    import qtee
    from qtee import OUT_OBJECT

    device = qtee.Device(qtee.SecureWorld(qtee.QteeRoot()))
    refs: list[qtee.ObjRef] = []
    client = qtee.Client(device, workers=1) if args.demo else None
    try:
        if client is not None:
            from qtee._cli.demo import SampleTA

            assert isinstance(client.ctx, qtee.Context)
            client.ctx.label = "demo client"
            qtee.register_ta("sample.add", SampleTA)
            env = client.client_env()
            refs.append(env)
            refs.append(client.open_service(env, 2033))  # FeatureVersions
            loader = client.open_service(env, 3)  # IAppLoader
            refs.append(loader)
            (ctrl,) = loader.invoke(0, qtee.ta_image("sample.add"), OUT_OBJECT)
            refs.append(ctrl)
            (app,) = ctrl.invoke(2, OUT_OBJECT)
            refs.append(app)
        text = format_info(describe(device))
    except (OSError, qtee.QteeBaseError, qtee.UsageError) as exc:
        print(f"qtee info: {_one_line(exc)}", file=sys.stderr)
        return 1
    finally:
        for ref in reversed(refs):
            ref.release()
        if client is not None:
            client.close()
    print(text)
    if args.demo:
        left = device.leaks()
        if left:
            print(f"qtee info: tables not empty after release: {left}", file=sys.stderr)
            return 1
        print("released: tables empty")
    return 0
