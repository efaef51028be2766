"""Many client threads invoking a TA that calls back into client objects, served by a
worker pool on the same context (qtee-kernel.md §4.1 last line, §4.4 concurrency)."""

from __future__ import annotations

import os
import struct
import threading
import time

from objects import op
from qtee import Device
from qtee.addrspace import ProcessMemory
from qtee.client import OUT_OBJECT, CallbackObject, Client, Out
from qtee.secure import (
    NsObject,
    QteeRoot,
    SecureWorld,
    TrustedApp,
    register_ta,
    ta_image,
    unregister_ta,
)

THREADS = 8
CALLS = int(os.environ.get("QTEE_CONCURRENCY_CALLS", "1000"))


class Doubler(CallbackObject):
    @op(0, ib=(4,), ob=(4,))
    def double(self, x: bytes) -> bytes:
        return struct.pack("<I", 2 * struct.unpack("<I", x)[0])


class Relay(TrustedApp):
    @op(0, io=1, ib=(4,), ob=(4,))
    def relay(self, x: bytes, cb: NsObject) -> bytes:
        res = cb.invoke(0, [x], [4])
        assert res.result == 0
        return res.ob[0]


def test_8_threads_x_calls_with_callbacks_4_workers() -> None:
    register_ta("relay", Relay)
    dev = Device(SecureWorld(QteeRoot()), memory=ProcessMemory())
    client = Client(dev, workers=4)
    try:
        env = client.client_env()
        loader = client.open_service(env, 3)
        (ctrl,) = loader.invoke(0, ta_image("relay"), OUT_OBJECT)
        (app,) = ctrl.invoke(2, OUT_OBJECT)
        errors: list[BaseException] = []

        def worker(k: int) -> None:
            cb = Doubler()
            try:
                for i in range(CALLS):
                    n = k * 100_000 + i
                    (out,) = app.invoke(0, struct.pack("<I", n), cb, Out(4))
                    assert struct.unpack("<I", out)[0] == 2 * n
            except BaseException as exc:  # reported below
                errors.append(exc)

        t0 = time.monotonic()
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not any(t.is_alive() for t in threads), "deadlock"
        assert errors == []
        print(f"{THREADS * CALLS} invokes with callbacks in {time.monotonic() - t0:.1f}s")
        for ref in (app, ctrl, loader, env):
            ref.release()
        for _ in range(200):  # release notifications are served asynchronously
            if client.exported() == 0:
                break
            time.sleep(0.01)
        assert client.exported() == 0
    finally:
        client.close()
        unregister_ta("relay")
