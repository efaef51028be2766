"""Registrations belong to their registrant (issue 13 points 5 and 6; DESIGN.md "Ownership").

Two clients of one device: a victim that registers a listener (IRegisterListenerCBO,
UID 87) or the TA-autoload callback (IRegisterTABufCBO, UID 88), and an attacker that
tries to unregister it (NULL) or put its own callback object in its place.  QTEE
answers a register for an id in use with ERROR_ID_IN_USE (quic-teec.md §5.3
IRegisterListenerCBO errors) and keeps a registration until its owner's objects are
released; IRegisterTABufCBO publishes no error codes, so the model answers its own
ERROR_ALREADY_REGISTERED.  The owner keeps its rights: its NULL unregisters (§5.4
deinit), and it may replace its own TA-autoload callback.  A registration ends when the
service object it was made through is released, or its context closes.  Every test
leaves ``leaks() == {}`` (asserted here where no fixture still holds objects, and by the
qtee plugin's leak check after teardown).
"""

from __future__ import annotations

import errno
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from objects import QteeError, op
from qtee import Device, Result
from qtee.client import OUT_OBJECT, Client, MemoryObject, ObjRef, Out
from qtee.secure import (
    REGISTER_LISTENER_UID,
    REGISTER_TA_BUF_UID,
    SecureWorld,
    TrustedApp,
    register_ta,
    ta_image,
    unregister_ta,
)
from qtee.secure._listeners import ERROR_ALREADY_REGISTERED, ERROR_ID_IN_USE
from supplicant import ListenerObject, Supplicant, TaBufferObject, TimeService, format_uuid
from supplicant import time_msg as tm
from tests._tas import Adder
from tests.supp.test_listeners import (
    AUTOLOADED,
    CLOCK,
    PROBE,
    UTC_ANSWER,
    ProbeTA,
    TaClient,
    time_call,
)

EVIL = "owners.evil"
APP_LOADER_UID = 3
ERROR_EMBEDDED_IMAGE_NOT_FOUND = 17
UUID_RAW = bytes.fromhex("DAC902FD6C30C748A49CBBD827AE86EE")
TIME = 0xB


class EvilTA(TrustedApp):
    """What the attacker would like a victim to load in place of :class:`tests._tas.Adder`."""

    @op(0, ib=(8,), ob=(4,))
    def add(self, pair: bytes) -> bytes:
        return struct.pack("<I", 666)


@pytest.fixture
def dev(qtee_device: Device) -> Iterator[Device]:
    register_ta(PROBE, ProbeTA)
    register_ta(AUTOLOADED, Adder)
    register_ta(EVIL, EvilTA)
    try:
        yield qtee_device
    finally:
        unregister_ta(EVIL)
        unregister_ta(AUTOLOADED)
        unregister_ta(PROBE)


@pytest.fixture
def ta(dev: Device) -> Iterator[TaClient]:
    t = TaClient(dev)
    yield t
    t.close()


class Registrant:
    """One client of the device with its own service object for ``uid`` (87 or 88)."""

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

    def register_ta_buffer(self, cbo: object) -> None:
        assert self.svc is not None
        self.svc.invoke(0, cbo)

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


@pytest.mark.qtee_close_releases  # the owner's close ends what it never released
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


# --------------------------------------------------------------------------- TA autoload


def _load_embedded(c: Client, env: ObjRef) -> ObjRef:
    with c.open_service(env, APP_LOADER_UID) as loader:
        (ctrl,) = loader.invoke(2, UUID_RAW, OUT_OBJECT)
    assert isinstance(ctrl, ObjRef)
    return ctrl


def _ta_buffer(dev: Device) -> object:
    """The TA-autoload callback QTEE holds now (None: no registration)."""
    return dev.world.listeners.ta_buffer


def _load_and_add(dev: Device) -> bytes:
    """Load the TA of UUID_RAW through loadEmbedded, call add(40, 2), unload it."""
    with Client(dev, workers=1) as c, c.client_env() as env:
        ctrl = _load_embedded(c, env)
        try:
            (app,) = ctrl.invoke(2, OUT_OBJECT)
            with app:
                (total,) = app.invoke(0, struct.pack("<II", 40, 2), Out(4))
            ctrl.invoke(1)  # unload
        finally:
            ctrl.release()
    return bytes(total)


def test_another_client_cannot_replace_or_remove_the_ta_autoload(
    dev: Device, tmp_path: Path
) -> None:
    """Issue 13 point 6; quic-teec.md §5.3 IRequestTABuffer / §5.4 TA autoload: while the
    victim's supplicant has TA autoload registered, another client's register (its own
    IRequestTABuffer) and its NULL are refused with the model's ERROR_ALREADY_REGISTERED,
    the registration is untouched, and loadEmbedded loads the victim's image."""
    (tmp_path / f"{format_uuid(UUID_RAW)}.mbn").write_bytes(ta_image(AUTOLOADED))
    attacker = Registrant(dev, REGISTER_TA_BUF_UID)
    evil = TaBufferObject(attacker.client, lambda uuid: ta_image(EVIL))
    try:
        with Supplicant(dev, ta_dirs=[tmp_path], time_service=False):
            registered = _ta_buffer(dev)
            assert registered is not None
            with pytest.raises(QteeError) as exc:
                attacker.register_ta_buffer(evil)
            assert exc.value.result == ERROR_ALREADY_REGISTERED == 10
            with pytest.raises(QteeError) as exc:
                attacker.register_ta_buffer(None)
            assert exc.value.result == ERROR_ALREADY_REGISTERED
            assert _ta_buffer(dev) is registered
            assert _load_and_add(dev) == struct.pack("<I", 42)
        assert _ta_buffer(dev) is None  # the owner's NULL on deinit

        # Nobody's registration now: the former attacker may register (and unregister).
        attacker.register_ta_buffer(evil)
        assert _load_and_add(dev) == struct.pack("<I", 666)
        attacker.register_ta_buffer(None)
        assert _ta_buffer(dev) is None
    finally:
        evil.close()
        attacker.close()
    assert dev.leaks() == {}


def test_the_owner_may_replace_its_own_ta_autoload(dev: Device) -> None:
    """Issue 13 point 6: replacing one's own registration stays allowed (the new
    callback answers from then on), and so does one's NULL (§5.4 deinit)."""
    owner = Registrant(dev, REGISTER_TA_BUF_UID)
    first = TaBufferObject(owner.client, lambda uuid: ta_image(EVIL))
    second = TaBufferObject(owner.client, lambda uuid: ta_image(AUTOLOADED))
    try:
        owner.register_ta_buffer(first)
        assert _load_and_add(dev) == struct.pack("<I", 666)
        owner.register_ta_buffer(second)
        assert _load_and_add(dev) == struct.pack("<I", 42)
        owner.register_ta_buffer(None)
        assert _ta_buffer(dev) is None
        owner.register_ta_buffer(None)  # NULL with nothing registered: not an error
    finally:
        first.close()
        second.close()
        owner.close()
    assert dev.leaks() == {}


@pytest.mark.parametrize(
    "how", ["release", pytest.param("close", marks=pytest.mark.qtee_close_releases)]
)
def test_the_ta_autoload_registration_ends_with_its_owner(dev: Device, how: str) -> None:
    """Issue 13 point 6, same end-of-life rule as listeners: releasing the
    IRegisterTABufCBO object it was made through, or closing the owner's fd, ends the
    registration (loadEmbedded then finds no image), and another client may register."""
    owner = Registrant(dev, REGISTER_TA_BUF_UID)
    other = Registrant(dev, REGISTER_TA_BUF_UID)
    mine = TaBufferObject(owner.client, lambda uuid: ta_image(AUTOLOADED))
    theirs = TaBufferObject(other.client, lambda uuid: ta_image(EVIL))
    try:
        owner.register_ta_buffer(mine)
        if how == "release":
            owner.release_service()
        else:
            owner.close_fd()
        assert _ta_buffer(dev) is None
        with pytest.raises(QteeError) as exc:
            _load_and_add(dev)
        assert exc.value.result == ERROR_EMBEDDED_IMAGE_NOT_FOUND

        other.register_ta_buffer(theirs)
        assert _load_and_add(dev) == struct.pack("<I", 666)
    finally:
        mine.close()
        theirs.close()
        other.close()
        owner.close()
    assert _ta_buffer(dev) is None
    assert dev.leaks() == {}
