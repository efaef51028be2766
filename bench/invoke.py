"""Invoke-loop costs, each as a ratio to a baseline measured in the same run, with the
ratio of its floor prototype (bench/_floors.py: the least work the path must do, built from
qtee's own encoders and structs) to the same baseline beside it.

1. Null invoke (client -> TA -> back) vs the bare wire work of its message: encode and
   decode the inbound request, then write and decode its response (what the driver and
   QTEE must do to the bytes at the very least; no checks, no objects, no ioctl).
   Floor: the same plus the OBJECT_INVOKE block packed and read on both sides.
2. Callback round trip through the worker threads vs a bare two-thread queue ping-pong.
   Floor: the wire messages of the invoke and the callback, the four ioctl structs
   (buf_data, OBJECT_INVOKE, SUPPL_RECV, SUPPL_SEND) and two bare-lock handoffs.
3. Null invoke with 100,000 live objects vs with 10: two devices, their runs paired.
   Floor: the floor null invoke with a 100,000-entry id table vs a 10-entry one.
4. Bytes per live object (tracemalloc), for QTEE objects held by a context.
"""

from __future__ import annotations

import queue
import sys
import threading
import tracemalloc
from pathlib import Path

# bench/supplicant.py shares its name with the supplicant package: bench/ goes last.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
import supplicant  # noqa: F401 - the package is cached before bench/ can shadow it

sys.path.append(str(_HERE))

import _floors
from _timing import QUICK, paired_ops_per_sec, pin_to_one_cpu, report, rotated_ops_per_sec

import qtee
from qtee import OUT_OBJECT, CallbackObject, op, wire


class NullTA(qtee.TrustedApp):
    @op(0)
    def null(self) -> None:
        return None

    @op(1, io=1)
    def call(self, cb: qtee.NsObject) -> None:
        res = cb.invoke(0)
        if res.result:
            raise qtee.QteeError(res.result)


class Nop(CallbackObject):
    @op(0)
    def nop(self) -> None:
        return None


class PingPong:
    """A bare two-thread ``queue.Queue`` ping-pong; :meth:`one` is one round trip."""

    def __init__(self) -> None:
        self.a: queue.Queue[int] = queue.Queue()
        self.b: queue.Queue[int] = queue.Queue()
        self.thread = threading.Thread(target=self._echo, daemon=True)

    def _echo(self) -> None:
        while (x := self.a.get()) >= 0:
            self.b.put(x)

    def __enter__(self) -> PingPong:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.a.put(-1)
        self.thread.join(10)

    def one(self) -> None:
        self.a.put(1)
        self.b.get()


LIVE = 1_000 if QUICK else 100_000
FEW = 10


def _load(client: qtee.Client) -> list[qtee.ObjRef]:
    env = client.client_env()
    loader = client.open_service(env, 3)
    (ctrl,) = loader.invoke(0, qtee.ta_image("bench.null"), OUT_OBJECT)
    (app,) = ctrl.invoke(2, OUT_OBJECT)
    return [app, ctrl, loader, env]


def _hold(client: qtee.Client, env: qtee.ObjRef, n: int) -> list[qtee.ObjRef]:
    """``n`` more live QTEE objects held by the client's context."""
    return [client.open_service(env, 2033) for _ in range(n)]


def main() -> None:
    print(pin_to_one_cpu())
    qtee.register_ta("bench.null", NullTA)
    device = qtee.Device(qtee.SecureWorld(qtee.QteeRoot()))
    with qtee.Client(device, workers=1) as client:
        refs = _load(client)
        app, env = refs[0], refs[-1]

        def bare_message() -> None:
            buf = wire.encode_invoke(5, 0)
            msg = wire.decode_invoke(buf)
            wire.write_invoke_response(buf, msg, (), ())
            wire.decode_invoke_response(buf)

        bare, floor, null = rotated_ops_per_sec(
            bare_message, _floors.null_invoke(), lambda: app.invoke(0)
        )
        report("bare wire request+response (null message)", bare)
        report("floor: null invoke, blocks + wire", floor, bare)
        report("null invoke client -> TA -> client", null, bare, 2.0, floor=bare / floor)

        nop = Nop()
        with PingPong() as pp, _floors.CallbackFloor() as cb_floor:
            base_pp, floor_cb, cb = rotated_ops_per_sec(
                pp.one, cb_floor.one, lambda: app.invoke(1, nop), repeats=5
            )
        report("bare queue.Queue two-thread ping-pong", base_pp)
        report("floor: invoke + callback, 4 structs, bare locks", floor_cb, base_pp)
        report("invoke + callback through the worker", cb, base_pp, 6.0, floor=base_pp / floor_cb)

        few = _hold(client, env, FEW - len(refs))
        other = qtee.Device(qtee.SecureWorld(qtee.QteeRoot()))
        with qtee.Client(other, workers=1) as crowded:
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            crowd = _load(crowded)
            many = _hold(crowded, crowd[-1], LIVE - len(crowd))
            after = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
            crowd_app = crowd[0]
            rate_few, rate_many = paired_ops_per_sec(
                lambda: app.invoke(0), lambda: crowd_app.invoke(0)
            )
            floor_few, floor_many = paired_ops_per_sec(
                _floors.null_invoke_with_table(FEW), _floors.null_invoke_with_table(LIVE)
            )
            report(f"null invoke, {FEW} live objects", rate_few)
            report(
                f"null invoke, {LIVE:,} live objects (paired)",
                rate_many,
                rate_few,
                1.1,
                floor=floor_few / floor_many,
            )
            per = (after - before) / LIVE
            print(
                f"{'bytes per live object (client+driver+QTEE)':<48} {per:>12,.0f} B"
                "   (target <= 300)"
            )
            for r in [*many, *crowd]:
                r.release()
        for r in [*few, *refs]:
            r.release()
    qtee.secure.unregister_ta("bench.null")


if __name__ == "__main__":
    main()
