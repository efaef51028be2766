"""``qtee supplicant``: run the listener daemon against a device.

The device is in-process (a fresh secure world), or with ``--connect PATH`` the device
of a server (``qtee serve``): the supplicant is then one client of it, and the tables
are the server's, so the closing ``tables:`` line is left out.  ``--check`` loads a
small TA that calls every registered listener once, so a run shows the listeners
answering end to end; the TA must live where QTEE is, so it needs the in-process device.
``--gpfs DIR`` adds QTEE's GPFS listener (0x7000) and ``--rpmb`` or ``--rpmb-file FILE``
its RPMB listener (0x2000) on an emulated eMMC partition, in memory or kept in FILE.

``--tee optee --connect PATH`` runs tee-supplicant instead (:class:`OpteeSupplicant`) on
the privileged node of a ``qtee serve --tee optee`` server: LOAD_TA from ``--ta-dir``, the
REE FS in ``--storage``, plugins (``--plugin``) and RPMB, with ``--rpmb-file FILE`` the
emulated partition kept in FILE (an acknowledged write survives kill -9), else in memory.
It prints ``tee-supplicant attached`` once serving, serves until ``--duration``, SIGINT or
SIGTERM, and prints ``requests served:`` with the RPCs it answered by kind.  Without
``--storage`` the REE FS is a temporary directory that goes with the process.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import struct
import sys
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from objects import DriverError, QteeBaseError, UsageError, op
from supplicant._options import check_storage, check_ta_dir, load_plugin, one_line

if TYPE_CHECKING:
    from supplicant._listener import Supplicant

#: How often a running supplicant looks whether its workers are still serving.
_POLL: float = 0.1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``supplicant`` verb's options."""
    parser.add_argument(
        "--storage",
        metavar="DIR",
        help="serve the file-storage listener (0xA) from DIR (made if missing).  With --tee "
        "optee: tee-supplicant's REE FS root (default: a temporary directory, removed with "
        "its files when the supplicant exits; it is also the TA directory without --ta-dir)",
    )
    parser.add_argument(
        "--gpfs",
        metavar="DIR",
        help="serve QTEE's GPFS listener (0x7000) from DIR: DIR/data and DIR/persist",
    )
    parser.add_argument(
        "--rpmb",
        action="store_true",
        help="serve QTEE's RPMB listener (0x2000) on an emulated eMMC RPMB partition kept "
        "in memory (--rpmb-file: kept in a file)",
    )
    parser.add_argument(
        "--rpmb-file",
        metavar="FILE",
        help="keep the emulated RPMB partition in FILE (made if missing); every acknowledged "
        "write is on disk first.  With --tee optee: tee-supplicant's RPMB (default: in "
        "memory); else it serves QTEE's RPMB listener (0x2000)",
    )
    parser.add_argument(
        "--ta-dir",
        metavar="DIR",
        action="append",
        default=[],
        help="serve TA autoload from DIR (<UUID>.mbn files); repeatable, searched in order",
    )
    parser.add_argument("--workers", type=int, default=4, help="worker threads (default 4)")
    parser.add_argument(
        "--no-time", action="store_true", help="do not serve the time listener (0xB)"
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop after this long (default: run until SIGINT or SIGTERM)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="call every listener once from a TA, then stop (in-process device only)",
    )
    parser.add_argument(
        "--connect",
        metavar="PATH",
        help="serve the device of the server at PATH (qtee serve) instead of an in-process "
        "one; the server owns the tables, so no tables line is printed",
    )
    optee = parser.add_argument_group("tee-supplicant (--tee optee)")
    optee.add_argument(
        "--tee",
        choices=("qtee", "optee"),
        default="qtee",
        help="qtee: the listener daemon (default); optee: tee-supplicant on the privileged "
        "node of the OP-TEE server given with --connect",
    )
    optee.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="UUID=MODULE:FUNCTION",
        help="(--tee optee) a tee-supplicant plugin; repeatable",
    )


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors of option combinations (``parser.error``: exit status 2)."""
    if args.tee == "optee":
        if args.connect is None:
            parser.error("--tee optee serves the privileged node of a server: give --connect")
        if args.check or args.no_time or args.gpfs is not None or args.rpmb:
            parser.error(
                "--check, --no-time, --gpfs and --rpmb are the QTEE listener daemon's options"
            )
    elif args.plugin:
        parser.error("--plugin is tee-supplicant's option: add --tee optee")
    if args.rpmb and args.rpmb_file is not None:
        parser.error("--rpmb keeps the partition in memory, --rpmb-file in a file: give one")
    if args.check and args.connect is not None:
        parser.error(
            "--check loads a TA in this process's secure world; it cannot be "
            "combined with --connect"
        )


def run(args: argparse.Namespace) -> int:
    """Start the supplicant, serve, stop; 0 on success, 1 on failure (one line on stderr)."""
    import qtee
    from supplicant._listener import Supplicant
    from supplicant._rpmb import EmulatedRpmb

    if args.workers < 1:
        print("qtee supplicant: --workers must be >= 1", file=sys.stderr)
        return 2
    if args.tee == "optee":
        return _run_optee(args)
    try:
        for opt, where in (("--storage", args.storage), ("--gpfs", args.gpfs)):
            if where is not None:
                check_storage(where, opt)
        for d in args.ta_dir:
            check_ta_dir(d)
    except UsageError as exc:
        print(f"qtee supplicant: {exc}", file=sys.stderr)
        return 2
    if args.rpmb_file is not None:  # made if missing; a file that is not a partition: exit 2
        try:
            EmulatedRpmb(args.rpmb_file).close()
        except (QteeBaseError, OSError) as exc:
            print(f"qtee supplicant: --rpmb-file {one_line(exc)}", file=sys.stderr)
            return 2
    remote = args.connect is not None
    try:
        device = (
            qtee.connect(args.connect) if remote else qtee.Device(qtee.SecureWorld(qtee.QteeRoot()))
        )
        if remote and _serves_optee(device):
            print(
                f"qtee supplicant: the server at {args.connect} serves an OP-TEE device: "
                "add --tee optee",
                file=sys.stderr,
            )
            return 2
        # a file's device is the supplicant's to close; an in-memory one holds no fd
        rpmb = EmulatedRpmb() if args.rpmb else args.rpmb_file
        sup = Supplicant(
            device,
            storage=args.storage,
            gpfs=args.gpfs,
            rpmb=rpmb,
            ta_dirs=args.ta_dir,
            time_service=not args.no_time,
            workers=args.workers,
        )
    except (QteeBaseError, OSError) as exc:
        why = exc.detail if remote and isinstance(exc, DriverError) and exc.detail else exc
        print(f"qtee supplicant: cannot start: {one_line(why)}", file=sys.stderr)
        return 1
    ids = ", ".join(f"{i:#x}" for i in sorted(sup.listeners)) or "none"
    failure: str | None = None
    try:
        autoload = "on" if args.ta_dir else "off"
        print(f"listeners registered: {ids}; TA autoload: {autoload}", flush=True)
        if args.check:
            _check(device)
        elif not _serve(sup, args.duration):
            failure = (
                f"lost the connection to the server at {args.connect}"
                if remote
                else "the supplicant's workers stopped"
            )
    except QteeBaseError as exc:
        failure = one_line(exc)
    except BaseException:  # a closed stdout, Ctrl-C in --check: unregister on the way out
        with contextlib.suppress(QteeBaseError, OSError):
            sup.stop()
        raise
    served = {f"{i:#x}": lst.served for i, lst in sup.listeners.items()}
    try:
        sup.stop()
    except (QteeBaseError, OSError) as exc:  # the server went away: cannot unregister
        failure = failure or f"cannot unregister the listeners: {one_line(exc)}"
    if failure is not None:
        print(f"qtee supplicant: {failure}", file=sys.stderr)
        return 1
    print(f"requests served: {served}")
    if remote:
        return 0
    assert isinstance(device, qtee.Device)
    leaks = device.leaks()
    print("tables: empty" if not leaks else f"tables: {leaks}")
    return 0 if not leaks else 1


def _serves_optee(device: object) -> bool:
    """Whether a connected device is OP-TEE (its welcome's impl id), found with one fd."""
    from qtee import RemoteDevice, uapi

    if not isinstance(device, RemoteDevice):
        return False
    probe = device.open()
    try:
        return probe.welcome.impl_id == uapi.TEE_IMPL_ID_OPTEE
    finally:
        probe.close()


def _run_optee(args: argparse.Namespace) -> int:
    """tee-supplicant on the privileged node of the OP-TEE server at ``args.connect``."""
    import tempfile

    import qtee
    from supplicant._optee import OpteeSupplicant
    from supplicant._rpmb import EmulatedRpmb

    if len(args.ta_dir) > 1:
        print("qtee supplicant: --tee optee takes one --ta-dir", file=sys.stderr)
        return 2
    try:
        if args.storage is not None:
            check_storage(args.storage)
        for d in args.ta_dir:
            check_ta_dir(d)
        plugins = dict(load_plugin(spec) for spec in args.plugin)
    except UsageError as exc:
        print(f"qtee supplicant: {exc}", file=sys.stderr)
        return 2
    try:
        rpmb = EmulatedRpmb(args.rpmb_file) if args.rpmb_file is not None else None
    except QteeBaseError as exc:
        print(f"qtee supplicant: --rpmb-file {one_line(exc)}", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        if rpmb is not None:
            stack.callback(rpmb.close)
        storage = args.storage or stack.enter_context(tempfile.TemporaryDirectory())
        ta_dir = args.ta_dir[0] if args.ta_dir else storage
        try:
            device = qtee.connect(args.connect)
            sup = OpteeSupplicant(
                device,  # type: ignore[arg-type]  # a served OP-TEE device
                ta_dir,
                storage,
                workers=args.workers,
                plugins=plugins,
                rpmb=rpmb,
            )
        except (QteeBaseError, OSError) as exc:
            why = exc.detail if isinstance(exc, DriverError) and exc.detail else exc
            print(f"qtee supplicant: cannot start: {one_line(why)}", file=sys.stderr)
            return 1
        print("tee-supplicant attached", flush=True)
        end = None if args.duration is None else time.monotonic() + args.duration
        with _stop_on_signals() as stop:
            while not stop and any(t.is_alive() for t in sup._threads):
                left = _POLL if end is None else min(_POLL, end - time.monotonic())
                if left <= 0:
                    break
                time.sleep(left)
        lost = not any(t.is_alive() for t in sup._threads)
        with contextlib.suppress(QteeBaseError, OSError):
            sup.stop()
    if lost:
        print(
            f"qtee supplicant: lost the connection to the server at {args.connect}", file=sys.stderr
        )
        return 1
    print(f"requests served: {sup.served}")
    return 0


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[list[int]]:
    """SIGINT and SIGTERM received while in the block, in a list the handler appends to (a
    handler runs between two bytecodes of the main thread, which may hold any lock then,
    so it takes none).  Handlers can only be set from the main thread: elsewhere, as when
    a test runs the CLI in a thread, the list stays empty."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return
    previous = {
        sig: signal.signal(sig, lambda s, _: got.append(s))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield got
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve(sup: Supplicant, duration: float | None) -> bool:
    """Serve until ``duration`` is over or a signal; False if the workers stopped first
    (a server that went away fails every SUPPL_RECV, and the workers end)."""
    pool = sup.client.pool
    end = None if duration is None else time.monotonic() + duration
    with _stop_on_signals() as stop:
        while not stop:
            left = _POLL if end is None else min(_POLL, end - time.monotonic())
            if left <= 0:
                break
            time.sleep(left)
            if pool is not None and pool.alive() == 0:
                return False
    return True


def _check(device: Any) -> None:
    """A TA that calls each registered listener once; prints what came back."""
    import qtee
    from supplicant import fs_msg, gpfs_msg, rpmb_msg, time_msg

    class ListenerCheck(qtee.TrustedApp):
        @op(0, ib=(4,), ob=(None,))
        def call(self, raw: bytes) -> bytes:
            (lid,) = struct.unpack("<I", raw)
            if lid == 0xB:
                req = time_msg.encode_request(time_msg.GetUtcSecRequest())
            elif lid == 0x7000:
                req = gpfs_msg.encode_request(gpfs_msg.VersionRequest())
            elif lid == 0x2000:
                req = rpmb_msg.encode_request(rpmb_msg.InitRequest())
            else:
                req = fs_msg.encode_request(fs_msg.GetErrnoRequest())
            return self.world.listeners.get(lid).request(req)[:64]

    name = f"qtee.check.{os.getpid()}"
    qtee.register_ta(name, ListenerCheck)
    try:
        client = qtee.Client(device, workers=1)
        with client, client.client_env() as env, client.open_service(env, 3) as loader:
            (ctrl,) = loader.invoke(0, qtee.ta_image(name), qtee.OUT_OBJECT)
            (app,) = ctrl.invoke(2, qtee.OUT_OBJECT)
            try:
                for lid in device.world.listeners.ids():
                    (out,) = app.invoke(0, struct.pack("<I", lid), qtee.Out(64))
                    if lid == 0xB:
                        print(f"  time (0xB): {time_msg.decode_response(out)}")
                    elif lid == 0x7000:
                        print(f"  gpfs (0x7000): {gpfs_msg.decode_response(out)}")
                    elif lid == 0x2000:
                        print(f"  rpmb (0x2000): {rpmb_msg.decode_response(out)}")
                    else:
                        print(f"  storage (0xA): {fs_msg.decode_response(out)}")
            finally:
                app.release()
                ctrl.release()
    finally:
        qtee.secure.unregister_ta(name)
