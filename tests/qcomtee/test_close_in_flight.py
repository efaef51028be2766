"""Closing a context with a callback in flight (qtee-kernel.md §4.2, §4.5)."""

from __future__ import annotations

import threading
import time

import pytest

from objects import QteeError, op
from qtee import Device, Result
from qtee.addrspace import ProcessMemory
from qtee.client import CallbackObject, Client, Out
from qtee.secure import NsObject, QteeRoot, SecureObject, SecureWorld

RENDEZVOUS_UID = 0x5151


class Rendezvous(SecureObject):
    """A service shared by every client: one client parks an object, another calls it."""

    def __init__(self) -> None:
        self.parked: NsObject | None = None

    @op(0, io=1)
    def park(self, cb: NsObject) -> None:
        self.parked = cb.retain()

    @op(1, ob=(None,))
    def call_parked(self) -> bytes:
        assert self.parked is not None
        res = self.parked.invoke(0, [], [8])
        if res.result:
            raise QteeError(res.result)
        return res.ob[0]

    @op(2)
    def drop(self) -> None:
        if self.parked is not None:
            self.parked.release()
            self.parked = None


class Blocker(CallbackObject):
    def __init__(self) -> None:
        self.entered = threading.Event()
        self.leave = threading.Event()

    @op(0, ob=(None,))
    def wait(self) -> bytes:
        self.entered.set()
        self.leave.wait(10)
        return b"late"


def test_close_with_callback_in_flight_gives_defunct_within_1s() -> None:
    shared = Rendezvous()
    dev = Device(
        SecureWorld(QteeRoot({RENDEZVOUS_UID: lambda env: shared})), memory=ProcessMemory()
    )
    a, b = Client(dev, workers=1), Client(dev, workers=1)
    try:
        env_a, env_b = a.client_env(), b.client_env()
        svc_a, svc_b = a.open_service(env_a, RENDEZVOUS_UID), b.open_service(env_b, RENDEZVOUS_UID)
        blocker = Blocker()
        svc_b.invoke(0, blocker)
        outcome: list[BaseException | bytes] = []

        def call() -> None:
            try:
                outcome.append(svc_a.invoke(1, Out(8))[0])
            except BaseException as exc:
                outcome.append(exc)

        t = threading.Thread(target=call)
        t.start()
        assert blocker.entered.wait(5)
        t0 = time.monotonic()
        b.ctx.close()  # the supplicant's fd goes away mid-dispatch
        t.join(1.0)
        assert not t.is_alive() and time.monotonic() - t0 < 1.0
        (err,) = outcome
        assert isinstance(err, QteeError) and err.result == Result.ERROR_DEFUNCT
        blocker.leave.set()
        # The worker's late SEND fails (the request is gone); later calls are DEFUNCT too.
        with pytest.raises(QteeError) as exc:
            svc_a.invoke(1, Out(8))
        assert exc.value.result == Result.ERROR_DEFUNCT
        svc_a.invoke(2)
        for ref in (svc_a, env_a):
            ref.release()
    finally:
        a.close()
        b.close()
