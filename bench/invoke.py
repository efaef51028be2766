"""Invoke-loop costs, each as a ratio to a baseline measured in the same run.

1. Null invoke (client -> TA -> back) vs the bare wire work of its message: encode and
   decode the inbound request, then write and decode its response (what the driver and
   QTEE must do to the bytes at the very least; no checks, no objects, no ioctl).
2. Callback round trip through the worker threads vs a bare two-thread queue ping-pong.
3. Null invoke with 100,000 live objects vs with 10.
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

from _timing import ops_per_sec, paired_ops_per_sec, pin_to_one_cpu, report

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


def ping_pong() -> float:
    a: queue.Queue[int] = queue.Queue()
    b: queue.Queue[int] = queue.Queue()

    def echo() -> None:
        while (x := a.get()) >= 0:
            b.put(x)

    t = threading.Thread(target=echo)
    t.start()

    def one() -> None:
        a.put(1)
        b.get()

    rate = ops_per_sec(one)
    a.put(-1)
    t.join()
    return rate


def main() -> None:
    print(pin_to_one_cpu())
    qtee.register_ta("bench.null", NullTA)
    device = qtee.Device(qtee.SecureWorld(qtee.QteeRoot()))
    with qtee.Client(device, workers=1) as client:
        env = client.client_env()
        loader = client.open_service(env, 3)
        (ctrl,) = loader.invoke(0, qtee.ta_image("bench.null"), OUT_OBJECT)
        (app,) = ctrl.invoke(2, OUT_OBJECT)

        def bare_message() -> None:
            buf = wire.encode_invoke(5, 0)
            msg = wire.decode_invoke(buf)
            wire.write_invoke_response(buf, msg, (), ())
            wire.decode_invoke_response(buf)

        bare, null = paired_ops_per_sec(bare_message, lambda: app.invoke(0))
        report("bare wire request+response (null message)", bare)
        report("null invoke client -> TA -> client", null, bare, target=3.0)

        nop = Nop()
        base_pp = ping_pong()
        cb = ops_per_sec(lambda: app.invoke(1, nop), min_time=0.5, repeats=3)
        report("bare queue.Queue two-thread ping-pong", base_pp)
        report("invoke + callback through the worker", cb, base_pp, target=1.5)

        few = ops_per_sec(lambda: app.invoke(0))
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        fv = client.open_service(env, 2033)
        refs = [client.open_service(env, 2033) for _ in range(100_000 - 10)]
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        many = ops_per_sec(lambda: app.invoke(0))
        report("null invoke, 10 live objects", few)
        report("null invoke, 100,000 live objects", many, few, target=1.2)
        per = (after - before) / (len(refs) + 1)
        print(
            f"{'bytes per live object (client+driver+QTEE)':<48} {per:>12,.0f} B   (target <= 300)"
        )
        for r in [*refs, fv, app, ctrl, loader, env]:
            r.release()
    qtee.secure.unregister_ta("bench.null")


if __name__ == "__main__":
    main()
