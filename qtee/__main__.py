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
    info = sub.add_parser(
        "info",
        help="version, impl id, caps, loaded TAs and live objects of an in-process device",
        description="Describe an in-process device: version, impl id, caps, loaded TAs and "
        "live objects per context.",
    )
    info.add_argument(
        "--demo",
        action="store_true",
        help="first load a sample TA and open a service (released again at the end)",
    )
    trace = sub.add_parser(
        "trace",
        help="record, show or replay a trace of crossings as a table",
        description="Run the demo scenario on an in-process device and show its crossings "
        "as a table, or save them (msgpack) with --record, or show a saved trace with "
        "--replay.",
    )
    where = trace.add_mutually_exclusive_group()
    where.add_argument("--record", metavar="FILE", help="save the trace of the run to FILE")
    where.add_argument("--replay", metavar="FILE", help="print the trace saved in FILE")
    trace.add_argument(
        "--demo",
        action="store_true",
        help="run the demo scenario (the default, and for now the only one); without "
        "--record its table is printed",
    )
    args = parser.parse_args(argv)
    if args.verb == "serve":
        return _serve(args)
    if args.verb == "info":
        return _info(args)
    if args.verb == "trace":
        if args.replay is not None and args.demo:
            trace.error("--replay cannot be combined with --demo")
        if args.record is None and args.replay is None and not args.demo:
            trace.error("one of --record FILE, --replay FILE or --demo is required")
        return _trace(args)
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


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _trace(args: argparse.Namespace) -> int:
    import contextlib
    import io

    from qtee import _trace

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
    from qtee._demo import run

    recorder = _trace.Trace()
    device = qtee.Device(qtee.SecureWorld(qtee.QteeRoot()))
    device.trace_records = recorder
    with contextlib.redirect_stdout(io.StringIO()):  # the demo's own lines
        status = run(device)
    if status:
        print("qtee trace: the demo scenario failed (run `qtee demo` to see)", file=sys.stderr)
        return 1
    records = recorder.records
    if args.record is None:
        print(_trace.format_table(records))
        return 0
    try:
        recorder.save(args.record)
    except OSError as exc:
        why = exc.strerror or exc
        print(f"qtee trace: cannot write {args.record}: {_one_line(why)}", file=sys.stderr)
        return 1
    print(f"recorded {len(records)} crossings to {args.record}")
    return 0


_GEN_CAP_NAMES = (
    (1 << 0, "GP"),
    (1 << 1, "PRIVILEGED"),
    (1 << 2, "REG_MEM"),
    (1 << 3, "MEMREF_NULL"),
    (1 << 4, "OBJREF"),
)


def _info(args: argparse.Namespace) -> int:
    import qtee
    from qtee import OUT_OBJECT, uapi

    root = qtee.QteeRoot()
    device = qtee.Device(qtee.SecureWorld(root))
    ctx = device.open()
    try:
        arg = bytearray(uapi.VersionData.SIZE)
        ctx.ioctl(uapi.TEE_IOC_VERSION, arg)
        ver = uapi.VersionData.unpack(arg)
    finally:
        ctx.close()
    impl = {uapi.TEE_IMPL_ID_QTEE: "QTEE", uapi.TEE_IMPL_ID_OPTEE: "OP-TEE"}
    caps = [name for bit, name in _GEN_CAP_NAMES if ver.gen_caps & bit]
    print(f"version: {qtee.__version__}")
    print(f"impl id: {ver.impl_id} ({impl.get(ver.impl_id, 'unknown')})")
    print(f"impl caps: {ver.impl_caps:#x}")
    print(f"gen caps: {ver.gen_caps:#x} ({' | '.join(caps) or 'none'})")
    refs: list[qtee.ObjRef] = []
    client = qtee.Client(device, workers=1) if args.demo else None
    try:
        if client is not None:
            from qtee._demo import SampleTA

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
        loaded = sorted(root.loaded_apps)
        print(f"loaded TAs: {', '.join(loaded) if loaded else 'none'}")
        live = device.leaks()
        print("live objects:" + ("" if live else " none"))
        for name, count in live.items():
            print(f"  {name}: {count}")
    except (OSError, qtee.QteeBaseError, qtee.UsageError) as exc:
        print(f"qtee info: {_one_line(exc)}", file=sys.stderr)
        return 1
    finally:
        for ref in reversed(refs):
            ref.release()
        if client is not None:
            client.close()
    if args.demo:
        left = device.leaks()
        if left:
            print(f"qtee info: tables not empty after release: {left}", file=sys.stderr)
            return 1
        print("released: tables empty")
    return 0


if __name__ == "__main__":
    sys.exit(main())
