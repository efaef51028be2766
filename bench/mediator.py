"""A guest's invoke through the VMM-side mediator against the host's invoke of the same message.

One process, pinned to one CPU: a :class:`~qtee.secure.SecureMonitor`, a host ``Device``
on it, and a ``Vmm`` with one QTEE guest running its own driver model over its own RAM.
The same TA is loaded in the host's partition and in the guest's, each through its own
``Client``, and the same call is timed on both sides in the same run, their runs taken
in turns (best of 7 each):

1. null invoke (op 0, no arguments): the baseline is the host's rate; target <= 2x;
2. the same message with an 8-byte input buffer and a 4-byte output buffer; target <= 2x;
3. an invoke with one callback into a client object (each side's worker pool serves it);
4. an invoke with one 64 KiB input buffer (the shadow copy's cost grows with the message).

The guest's extra work is the trap into the VMM, the translation and pinning of its two
buffer pages, the shadow copy of the inbound message, and writing back only the fields
the protocol returns.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

# bench/supplicant.py shares its name with the supplicant package: bench/ goes last.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
import supplicant  # noqa: F401 - the package is cached before bench/ can shadow it

sys.path.append(str(_HERE))

from _timing import paired_ops_per_sec, pin_to_one_cpu, report

import qtee
from qtee import OUT_OBJECT, CallbackObject, NsObject, ObjRef, Out, QteeError, op
from qtee.secure._monitor import SecureMonitor
from qtee.vm import Vmm

TA = "bench.mediator"
BIG = bytes(64 << 10)


class Bench(qtee.TrustedApp):
    @op(0)
    def null(self) -> None:
        return None

    @op(1, ib=(8,), ob=(4,))
    def add(self, pair: bytes) -> bytes:
        a, b = struct.unpack("<II", pair)
        return struct.pack("<I", (a + b) & 0xFFFF_FFFF)

    @op(2, io=1)
    def call_back(self, cb: NsObject) -> None:
        res = cb.invoke(0)
        if res.result:
            raise QteeError(res.result)

    @op(3, ib=(None,))
    def take(self, data: bytes) -> None:
        return None


class Nop(CallbackObject):
    @op(0)
    def nop(self) -> None:
        return None


def _load(client: qtee.Client) -> list[ObjRef]:
    env = client.client_env()
    loader = client.open_service(env, 3)
    (ctrl,) = loader.invoke(0, qtee.ta_image(TA), OUT_OBJECT)
    (app,) = ctrl.invoke(2, OUT_OBJECT)
    return [app, ctrl, loader, env]


def main() -> None:
    print(pin_to_one_cpu())
    qtee.register_ta(TA, Bench)
    monitor = SecureMonitor()
    host_device = qtee.Device(monitor.host)
    with Vmm(monitor) as vmm:
        guest = vmm.create_vm("bench", tee="qtee")
        host = qtee.Client(host_device, workers=1)
        inside = qtee.Client(guest.device, workers=1)
        refs = {"host": _load(host), "guest": _load(inside)}
        nop = Nop()
        cases = [
            ("null invoke", lambda app: app.invoke(0), 2.0),
            ("invoke, IB 8 B + OB 4 B", lambda app: app.invoke(1, bytes(8), Out(4)), 2.0),
            ("invoke + 1 callback", lambda app: app.invoke(2, nop), None),
            ("invoke, one 64 KiB IB", lambda app: app.invoke(3, BIG), None),
        ]
        for name, call, target in cases:
            host_app, guest_app = refs["host"][0], refs["guest"][0]
            on_host, in_guest = paired_ops_per_sec(
                lambda app=host_app, call=call: call(app),
                lambda app=guest_app, call=call: call(app),
            )
            report(f"{name}, host", on_host)
            report(f"{name}, guest (mediator)", in_guest, on_host, target)
        for side in refs.values():
            for ref in side:
                ref.release()
        inside.close()
        host.close()
        row = next(r for r in vmm.rows() if r.name == "bench")
        print(f"guest: {row.calls_ok} calls through the mediator, peak {row.pinned_peak} pins")
    left = {**monitor.leaks(), **host_device.leaks()}
    print("tables: empty" if not left else f"tables: {left}")


if __name__ == "__main__":
    main()
