"""Registrations belong to their registrant (issue 13 point 5; DESIGN.md "Ownership").

Two clients of one device: a victim that registers a listener (IRegisterListenerCBO,
UID 87), and an attacker that tries to unregister it (NULL) or put its own callback
object in its place.  QTEE answers a register for an id in use with ERROR_ID_IN_USE
(quic-teec.md §5.3 IRegisterListenerCBO errors) and keeps a registration until its
owner's objects are released.  The owner keeps its rights: its NULL unregisters (§5.4
deinit).  A registration ends when the service object it was made through is
released, or its context closes.  Every test
leaves ``leaks() == {}`` (asserted here where no fixture still holds objects, and by the
qtee plugin's leak check after teardown).
"""

from __future__ import annotations

import errno
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from objects import QteeError, Result
from qtee._driver import Device
from qtee.client import Client, MemoryObject, ObjRef
from qtee.secure import QteeRoot, SecureWorld, register_ta, unregister_ta
from qtee.secure._listeners import (
    ERROR_ID_IN_USE,
    REGISTER_LISTENER_UID,
)
from supplicant import _time_msg as tm
from supplicant._listener import ListenerObject, Supplicant
from supplicant._time import TimeService
from tests.test_listeners import (
    CLOCK,
    PROBE,
    UTC_ANSWER,
    ProbeTA,
    TaClient,
    time_call,
)

TIME = 0xB


@pytest.fixture
def dev() -> Iterator[Device]:
    register_ta(PROBE, ProbeTA)
    try:
        yield Device(SecureWorld(QteeRoot()))
    finally:
        unregister_ta(PROBE)


@pytest.fixture
def ta(dev: Device) -> Iterator[TaClient]:
    t = TaClient(dev)
    yield t
    t.close()


class Registrant:
    """One client of the device with its own service object for ``uid``."""

    def __init__(self, dev: Device, uid: int, workers: int = 2) -> None:
        self.client = Client(dev, workers=workers)
        self.env = self.client.client_env()
        self.svc: ObjRef | None = self.client.open_service(self.env, uid)
        self.mems: list[MemoryObject] = []
        self.stolen: list[bytes] = []
        self.closed = False

    def listener(
        self, listener_id: int = TIME, handler: Callable[[bytes], bytes] | None = None
    ) -> tuple[ListenerObject, MemoryObject]:
        """A listener (the attacker's records what it is asked) and its 4 KiB buffer."""
        mem = self.client.memory(4096)
        self.mems.append(mem)
        return ListenerObject(listener_id, mem, handler or self._steal), mem

    def _steal(self, buf: bytes) -> bytes:
        self.stolen.append(buf[:4])
        return TimeService(clock=lambda: 0.0).handle(buf)

    def register(self, listener_id: int, cbo: object, mem: object) -> None:
        assert self.svc is not None
        self.svc.invoke(0, struct.pack("<I", listener_id), cbo, mem)

    def release_service(self) -> None:
        if self.svc is not None:
            self.svc.release()
            self.svc = None

    def close_fd(self) -> None:
        """Close the context as a dying process does: no NULL register, no release."""
        self.client.close()
        self.closed = True

    def close(self) -> None:
        if not self.closed:
            self.release_service()
            for mem in self.mems:
                mem.release()
            self.env.release()
            self.close_fd()


def _utc(world: SecureWorld) -> tm.TimeResponse:
    return time_call(world, tm.GetUtcSecRequest())


def _result_of(ta: TaClient) -> int:
    """What a TA's GET_UTC_SEC request ends with: 0, or the QTEE result it raised."""

    def script(world: SecureWorld) -> int:
        try:
            _utc(world)
        except QteeError as exc:
            return exc.result
        return 0

    return int(ta.run(script))


# --------------------------------------------------------------------------- listeners


def test_another_client_cannot_unregister_or_replace_a_listener(dev: Device, ta: TaClient) -> None:
    """Issue 13 point 5; quic-teec.md §5.3 IRegisterListenerCBO errors (12 ID_IN_USE):
    another client's NULL register and its own register for the victim's id are both
    ID_IN_USE, the registration is untouched and the victim keeps getting the TA's
    requests; the owner's NULL (Supplicant.stop, §5.4 deinit) still unregisters."""
    attacker = Registrant(dev, REGISTER_LISTENER_UID)
    try:
        with Supplicant(dev, time_service=False) as victim:
            served = victim.add_listener(TIME, TimeService(clock=lambda: CLOCK).handle)
            with pytest.raises(QteeError) as exc:
                attacker.register(TIME, None, None)
            assert exc.value.result == ERROR_ID_IN_USE == 12
            assert dev.world.listeners.ids() == [TIME]

            lo, mem = attacker.listener()
            with pytest.raises(QteeError) as exc:
                attacker.register(TIME, lo, mem)
            assert exc.value.result == ERROR_ID_IN_USE
            assert dev.world.listeners.ids() == [TIME]

            assert ta.run(_utc) == UTC_ANSWER
            assert served.served == 1
            assert attacker.stolen == [] and lo.served == 0
        assert dev.world.listeners.ids() == []  # the owner's NULL unregistered it

        # Free again: the former attacker may now register the id for itself.
        attacker.register(TIME, lo, mem)
        assert ta.run(_utc) == tm.TimeSpecResponse(cmd_id=0x302, tv_sec=0, tv_nsec=0, ret=0)
        assert attacker.stolen == [struct.pack("<I", 0x302)]
        attacker.register(TIME, None, None)
        assert dev.world.listeners.ids() == []
    finally:
        attacker.close()


def test_the_owner_cannot_register_its_id_twice(dev: Device) -> None:
    """quic-teec.md §5.3 IRegisterListenerCBO errors: a register for an id in use is
    ID_IN_USE whoever asks, its owner included (issue 13 point 5: "as now")."""
    owner = Registrant(dev, REGISTER_LISTENER_UID)
    try:
        lo, mem = owner.listener()
        owner.register(TIME, lo, mem)
        lo2, mem2 = owner.listener()
        with pytest.raises(QteeError) as exc:
            owner.register(TIME, lo2, mem2)
        assert exc.value.result == ERROR_ID_IN_USE
        assert dev.world.listeners.ids() == [TIME]
    finally:
        owner.close()
    assert dev.world.listeners.ids() == []
    assert dev.leaks() == {}


def test_a_listener_registration_ends_when_its_service_object_is_released(
    dev: Device, ta: TaClient
) -> None:
    """Issue 13 point 5: a registration ends when its owner's objects are released --
    here the IRegisterListenerCBO object it was made through, while the owner's context
    and callback object live on; then another client may register the id."""
    owner = Registrant(dev, REGISTER_LISTENER_UID)
    other = Registrant(dev, REGISTER_LISTENER_UID)
    try:
        lo, mem = owner.listener(handler=TimeService(clock=lambda: CLOCK).handle)
        owner.register(TIME, lo, mem)
        owner.release_service()
        assert dev.world.listeners.ids() == []
        assert _result_of(ta) == Result.ERROR_DEFUNCT  # no listener 0xB any more

        lo2, mem2 = other.listener()
        other.register(TIME, lo2, mem2)
        assert _result_of(ta) == 0
        assert lo.served == 0 and lo2.served == 1
    finally:
        other.close()
        owner.close()
    assert dev.world.listeners.ids() == []


def test_a_listener_registration_ends_when_its_context_closes(dev: Device, ta: TaClient) -> None:
    """Issue 13 point 5: closing the owner's fd releases its QTEE objects (the kernel's
    release of the file), so its registration ends; another client may then register."""
    owner = Registrant(dev, REGISTER_LISTENER_UID)
    other = Registrant(dev, REGISTER_LISTENER_UID)
    try:
        lo, mem = owner.listener()
        owner.register(TIME, lo, mem)
        owner.close_fd()
        assert dev.world.listeners.ids() == []

        lo2, mem2 = other.listener(handler=TimeService(clock=lambda: CLOCK).handle)
        other.register(TIME, lo2, mem2)
        assert ta.run(_utc) == UTC_ANSWER
    finally:
        other.close()
        owner.close()


def test_release_during_a_request_keeps_the_buffer_until_the_request_is_done(
    dev: Device, ta: TaClient
) -> None:
    """Issue 13 point 5 (end of a registration) with a TA request in flight: the
    registration leaves the table at once, but its shared buffer and callback object stay
    until the request has read its answer (§5.4: the answer is read back from the
    buffer), so the TA gets the right answer and nothing leaks."""
    entered, go = threading.Event(), threading.Event()
    service = TimeService(clock=lambda: CLOCK)

    def slow(buf: bytes) -> bytes:
        entered.set()
        assert go.wait(10)
        return service.handle(buf)

    owner = Registrant(dev, REGISTER_LISTENER_UID)
    answers: list[Any] = []
    t = threading.Thread(target=lambda: answers.append(ta.run(_utc)), daemon=True)
    try:
        lo, mem = owner.listener(handler=slow)
        owner.register(TIME, lo, mem)
        t.start()
        assert entered.wait(5)
        owner.release_service()
        assert dev.world.listeners.ids() == []
        go.set()
        t.join(10)
        assert not t.is_alive()
        assert answers == [UTC_ANSWER]
    finally:
        go.set()
        owner.close()


def test_a_listener_that_answers_defunct_is_dropped_and_its_owner_may_register_again(
    dev: Device, ta: TaClient
) -> None:
    """quic-teec.md §6 (-ENODEV reaches QTEE as DEFUNCT) and the _listeners.py rule:
    QTEE drops a listener that answers DEFUNCT even while its owner holds the service;
    the owner's later NULL is a no-op and the id is free for it again."""

    def gone(buf: bytes) -> bytes:
        raise QteeError(-errno.ENODEV, "the listener's service is gone")

    owner = Registrant(dev, REGISTER_LISTENER_UID)
    try:
        lo, mem = owner.listener(handler=gone)
        owner.register(TIME, lo, mem)
        assert _result_of(ta) == Result.ERROR_DEFUNCT
        assert dev.world.listeners.ids() == []
        owner.register(TIME, None, None)
        lo2, mem2 = owner.listener(handler=TimeService(clock=lambda: CLOCK).handle)
        owner.register(TIME, lo2, mem2)
        assert ta.run(_utc) == UTC_ANSWER
    finally:
        owner.close()
    assert dev.world.listeners.ids() == []
