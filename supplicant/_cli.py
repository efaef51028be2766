"""``qtee supplicant``: run the listener daemon against a device.

For now the device is in-process (a fresh secure world); the out-of-process issue
connects it to a device server.  ``--check`` loads a small TA that calls every
registered listener once, so a run shows the listeners answering end to end.
"""

from __future__ import annotations

import argparse
import os
import signal
import struct
import sys
import threading
from typing import Any

from objects import QteeBaseError, op


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``supplicant`` verb's options."""
    parser.add_argument(
        "--storage", metavar="DIR", help="serve the file-storage listener (0xA) from DIR"
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
        "--check", action="store_true", help="call every listener once from a TA, then stop"
    )


def run(args: argparse.Namespace) -> int:
    """Start the supplicant, serve, stop; 0 on success, 1 on failure (one line on stderr)."""
    import qtee
    from supplicant._listener import Supplicant

    if args.workers < 1:
        print("qtee supplicant: --workers must be >= 1", file=sys.stderr)
        return 2
    for d in [args.storage, *args.ta_dir]:
        if d is not None and not os.path.isdir(d):
            print(f"qtee supplicant: {d}: not a directory", file=sys.stderr)
            return 2
    device = qtee.Device(qtee.SecureWorld(qtee.QteeRoot()))
    try:
        sup = Supplicant(
            device,
            storage=args.storage,
            ta_dirs=args.ta_dir,
            time_service=not args.no_time,
            workers=args.workers,
        )
    except (QteeBaseError, OSError) as exc:
        print(f"qtee supplicant: cannot start: {exc}", file=sys.stderr)
        return 1
    ids = ", ".join(f"{i:#x}" for i in device.world.listeners.ids()) or "none"
    print(f"listeners registered: {ids}; TA autoload: {'on' if args.ta_dir else 'off'}")
    try:
        if args.check:
            _check(device)
        else:
            stop = threading.Event()
            previous = {
                sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)
            }
            try:
                stop.wait(args.duration)
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
    except QteeBaseError as exc:
        print(f"qtee supplicant: {exc}", file=sys.stderr)
        return 1
    finally:
        served = {f"{i:#x}": lst.served for i, lst in sup.listeners.items()}
        sup.stop()
    print(f"requests served: {served}")
    leaks = device.leaks()
    print("tables: empty" if not leaks else f"tables: {leaks}")
    return 0 if not leaks else 1


def _check(device: Any) -> None:
    """A TA that calls each registered listener once; prints what came back."""
    import qtee
    from supplicant import _fs_msg, _time_msg

    class ListenerCheck(qtee.TrustedApp):
        @op(0, ib=(4,), ob=(None,))
        def call(self, raw: bytes) -> bytes:
            (lid,) = struct.unpack("<I", raw)
            if lid == 0xB:
                req = _time_msg.encode_request(_time_msg.GetUtcSecRequest())
            else:
                req = _fs_msg.encode_request(_fs_msg.GetErrnoRequest())
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
                        print(f"  time (0xB): {_time_msg.decode_response(out)}")
                    else:
                        print(f"  storage (0xA): {_fs_msg.decode_response(out)}")
            finally:
                app.release()
                ctrl.release()
    finally:
        qtee.secure.unregister_ta(name)
