"""Callback round trips through the supplicant worker pool, against a queue ping-pong.

One client thread invokes a TA op that calls back once into a client object served by
the pool (``Client(workers=N)``), with 1 and with 4 workers; the baseline is a bare
two-thread ``queue.Queue`` ping-pong, and the floor prototype ``_floors.CallbackFloor``
(bench/README.md), both measured in the same run, their runs taken in turns.  Also 4 client threads
at once with 4 workers, to show the pool serving in parallel what one worker serialises.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

# This file shares its name with the supplicant package: bench/ goes after the packages.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
import supplicant  # noqa: F401 - the package is cached before bench/ can shadow it

sys.path.append(str(_HERE))

import _floors
from _timing import pin_to_one_cpu, report, rotated_ops_per_sec
from invoke import Nop, NullTA, PingPong

import qtee
from qtee import OUT_OBJECT, op


def _parallel_rate(app: qtee.ObjRef, nop: Nop, threads: int, seconds: float = 1.0) -> float:
    count = [0] * threads
    stop = time.monotonic() + seconds

    def loop(k: int) -> None:
        while time.monotonic() < stop:
            app.invoke(1, nop)
            count[k] += 1

    ts = [threading.Thread(target=loop, args=(k,)) for k in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(count) / (time.perf_counter() - t0)


class Sleeper(Nop):
    """A handler that blocks for 1 ms (a listener doing I/O): the GIL is free meanwhile."""

    @op(0)
    def nop(self) -> None:
        time.sleep(0.001)


def main() -> None:
    print(pin_to_one_cpu())
    qtee.register_ta("bench.supplicant", NullTA)
    rates: dict[int, float] = {}
    par: dict[int, float] = {}
    blocking: dict[int, float] = {}
    for workers in (1, 4):
        device = qtee.Device(qtee.SecureWorld(qtee.QteeRoot()))
        with qtee.Client(device, workers=workers) as client:
            env = client.client_env()
            loader = client.open_service(env, 3)
            (ctrl,) = loader.invoke(0, qtee.ta_image("bench.supplicant"), OUT_OBJECT)
            (app,) = ctrl.invoke(2, OUT_OBJECT)
            nop = Nop()

            def one(app: qtee.ObjRef = app, nop: Nop = nop) -> None:
                app.invoke(1, nop)

            with PingPong() as pp, _floors.CallbackFloor() as cb_floor:
                base, floor, rates[workers] = rotated_ops_per_sec(
                    pp.one, cb_floor.one, one, min_time=0.5, repeats=3
                )
            report("bare queue.Queue two-thread ping-pong", base)
            report(
                f"callback round trip, {workers} worker(s)",
                rates[workers],
                base,
                6.0,
                floor=base / floor,
            )
            par[workers] = _parallel_rate(app, nop, 4)
            report(f"  same, 4 client threads at once, {workers} worker(s)", par[workers])
            blocking[workers] = _parallel_rate(app, Sleeper(), 4)
            report(f"  4 client threads, 1 ms handler, {workers} worker(s)", blocking[workers])
            for r in (app, ctrl, loader, env):
                r.release()
    cases = (("1 client", rates), ("4 clients", par), ("4 clients, 1 ms handler", blocking))
    for what, got in cases:
        ratio = got[1] / got[4]
        verdict = "ok" if ratio <= 1.0 else "MISSED"
        name = f"4 workers vs 1, {what} (time ratio)"
        print(f"{name:<48} {ratio:>12.2f}x    (target <= 1.0x, not slower: {verdict})")
    qtee.secure.unregister_ta("bench.supplicant")


if __name__ == "__main__":
    main()
