"""A callback that returns an object it lets go of: ``Transfer``.

quic-teec.md §2.3: a callback's output objects are marshalled into the SUPPL_SEND, and
libqcomtee calls the object's ``error()`` notification after the response was submitted
(``WITH_RESPONSE`` 0 when it was delivered, ``WITH_RESPONSE_ERR`` 1 when marshalling or the
SEND failed) -- the place a callback object drops what it handed out.  qtee-kernel.md
§2.3: a QTEE object returned by a supplicant gets a temporary kernel reference for the
call (QTEE keeps its own count), a callback object returned becomes a new CB object QTEE
owns, a memory object is a new wrapper holding the shm; §4.4: a SEND the kernel rejects is
EINVAL, QTEE gets UNAVAIL and the objects it carried are dropped without a release
notification.  The model's ``Transfer(obj)`` releases ``obj`` exactly once after the SEND
returns, whatever it did; callback ids taken for an answer that never reached QTEE are
given back at once.
"""

from __future__ import annotations

import errno
import struct
import threading
import time

import pytest

from objects import DriverError, UsageError, op
from qtee import (
    OUT_OBJECT,
    CallbackObject,
    Client,
    Device,
    MemoryObject,
    NsObject,
    ObjRef,
    Out,
    Result,
    Transfer,
    TrustedApp,
    uapi,
)
from qtee.pytest_plugin import AppLoaderHelper
from qtee.secure import FEATURE_VERSIONS_UID, FeatureVersions
from supplicant import WorkerPool
from tests._helpers import wait_until

TA = "transfer.taker"
SERVICE, MEMORY, TWO = 0, 1, 2
OUT4, OUT8 = Out(4), Out(8)
#: An id no fd holds: what the test's SEND tampering puts in a TEE output object.
BOGUS_ID = 0x7FFF_0000


class Taker(TrustedApp):
    """Asks the client's object for objects and reports what it got."""

    @op(0, io=1, ob=(8,))
    def take_service(self, cb: NsObject) -> bytes:
        """op SERVICE -> one object: the callback result and, for a FeatureVersions, the
        version it gives (the TA uses its own object, handed back by the client)."""
        res = cb.invoke(SERVICE, n_oo=1)
        if res.result:
            return struct.pack("<iI", res.result, 0)
        (obj,) = res.oo
        if isinstance(obj, FeatureVersions):
            return struct.pack("<iI", 0, struct.unpack("<I", obj.get(b"\x0a\0\0\0"))[0])
        return struct.pack("<iI", 0, 0xFFFF_FFFF)

    @op(1, io=1, ob=(None,))
    def take_memory(self, cb: NsObject) -> bytes:
        """op MEMORY -> a memory object: map it, return its first 5 bytes."""
        res = cb.invoke(MEMORY, n_oo=1)
        if res.result:
            return b""
        (mem,) = res.oo
        assert isinstance(mem, NsObject)
        try:
            m = self.world.map_region(mem)
            try:
                return bytes(m.view[:5])
            finally:
                m.unmap()
        finally:
            mem.release()

    @op(2, io=1, ob=(4,))
    def take_two(self, cb: NsObject) -> bytes:
        """op TWO -> two objects: the callback result (objects released at once)."""
        res = cb.invoke(TWO, n_oo=2)
        for o in res.oo:
            if isinstance(o, NsObject):
                o.release()
        return struct.pack("<i", res.result)


class Extra(CallbackObject):
    """A callback object returned next to another output."""


class Giver(CallbackObject):
    """Hands out a fresh service ObjRef, a fresh memory object, or both kinds at once."""

    def __init__(self, client: Client, env: ObjRef, *, transfer: bool = True) -> None:
        self.client = client
        self.env = env
        self.transfer = transfer
        self.given: list[ObjRef | MemoryObject] = []
        self.second: object = Extra()
        self.delay = 0.0

    def _service(self) -> ObjRef:
        (svc,) = self.env.invoke(0, struct.pack("<I", FEATURE_VERSIONS_UID), OUT_OBJECT)
        assert isinstance(svc, ObjRef)
        self.given.append(svc)
        return svc

    @op(SERVICE, oo=1)
    def service(self) -> ObjRef | Transfer:
        svc = self._service()
        time.sleep(self.delay)
        return Transfer(svc) if self.transfer else svc

    @op(MEMORY, oo=1)
    def memory(self) -> Transfer:
        mem = self.client.memory(16)
        mem.view[:5] = b"hello"
        self.given.append(mem)
        return Transfer(mem)

    @op(TWO, oo=2)
    def two(self) -> tuple[object, Transfer]:
        return self.second, Transfer(self._service())


class Recorder:
    """Wraps ``client.ctx.ioctl``: the order of SUPPL_SENDs (with their errno) and
    OBJECT_INVOKEs; ``tamper`` makes the next SEND carrying a TEE output object name an
    id the fd does not hold, so the kernel rejects it (QK §4.4)."""

    def __init__(self, client: Client) -> None:
        self.real = client.ctx.ioctl
        self.mem = client.device.memory
        self.lock = threading.Lock()
        self.events: list[tuple[str, int, int]] = []
        self.tamper = False
        client.ctx.ioctl = self  # type: ignore[method-assign]

    def __call__(self, cmd: int, arg: bytearray | memoryview) -> int:
        buf = uapi.BufData.unpack(arg)
        if cmd == uapi.TEE_IOC_OBJECT_INVOKE:
            head, _ = uapi.unpack_arg(uapi.ObjectInvokeArg, self.mem.read(buf.buf_ptr, buf.buf_len))
            with self.lock:
                self.events.append(("invoke", head.id, head.op))
        elif cmd == uapi.TEE_IOC_SUPPL_SEND:
            head, params = uapi.unpack_arg(
                uapi.SuppSendArg, self.mem.read(buf.buf_ptr, buf.buf_len)
            )
            tee = [i for i, p in enumerate(params) if p.attr == 12 and p.b == 1]
            if self.tamper and tee:
                self.tamper = False
                patched = [
                    uapi.Param(p.attr, BOGUS_ID, p.b, p.c) if i in tee else p
                    for i, p in enumerate(params)
                ]
                self.mem.write(buf.buf_ptr + uapi.SuppSendArg.SIZE, uapi.pack_params(patched))
            try:
                rc = self.real(cmd, arg)
            except DriverError as exc:
                with self.lock:
                    self.events.append(("send", head.ret, exc.code))
                raise
            with self.lock:
                self.events.append(("send", head.ret, 0))
            return rc
        return self.real(cmd, arg)

    def releases_of(self, ident: int) -> list[int]:
        """Indexes in :attr:`events` of the RELEASEs (op 0xFFFF) of ``ident``."""
        with self.lock:
            return [i for i, e in enumerate(self.events) if e == ("invoke", ident, 0xFFFF)]

    def sends(self) -> list[int]:
        with self.lock:
            return [i for i, e in enumerate(self.events) if e[0] == "send"]


def _baseline(device: Device) -> dict[str, int]:
    return device.leaks()


@pytest.mark.qtee_ta(TA, Taker)
def test_a_transferred_objref_is_released_once_after_the_send(
    qtee_device: Device, qtee_client: Client, qtee_env: ObjRef, qtee_app: AppLoaderHelper
) -> None:
    """QK §2.3: QTEE's own object comes back to it; the handler's ObjRef is released by one
    RELEASE (op 0xFFFF) on its id, after the SUPPL_SEND that carried it."""
    app = qtee_app(TA)
    before = _baseline(qtee_device)
    giver = Giver(qtee_client, qtee_env)
    rec = Recorder(qtee_client)
    assert app.invoke(0, giver, OUT8) == [struct.pack("<iI", 0, FeatureVersions.VERSION)]
    (svc,) = giver.given
    assert wait_until(lambda: svc.released and qtee_device.leaks() == before)
    (release,) = rec.releases_of(svc.id)
    (send,) = rec.sends()
    assert rec.events[send] == ("send", 0, 0) and send < release


@pytest.mark.qtee_ta(TA, Taker)
def test_a_plain_return_keeps_the_handlers_reference(
    qtee_device: Device, qtee_client: Client, qtee_env: ObjRef, qtee_app: AppLoaderHelper
) -> None:
    """Without Transfer the ObjRef stays the handler's: QTEE had only a temporary kernel
    reference (QK §2.3), the object stays in the world until the handler releases it."""
    app = qtee_app(TA)
    before = _baseline(qtee_device)
    giver = Giver(qtee_client, qtee_env, transfer=False)
    assert app.invoke(0, giver, OUT8) == [struct.pack("<iI", 0, FeatureVersions.VERSION)]
    (svc,) = giver.given
    time.sleep(0.05)
    assert not svc.released
    assert qtee_device.leaks()["secure objects"] == before["secure objects"] + 1
    svc.release()
    assert wait_until(lambda: qtee_device.leaks() == before)


@pytest.mark.qtee_ta(TA, Taker)
@pytest.mark.qtee_modes("in-process", "server", "guest")
def test_a_transferred_memory_object_is_donated(
    qtee_client: Client, qtee_env: ObjRef, qtee_app: AppLoaderHelper
) -> None:
    """quic-teec.md §1.7: to donate, the owner releases its copy once QTEE has its own;
    QTEE maps it (QK §2.4), and the shm goes with QTEE's last reference."""
    app = qtee_app(TA)
    giver = Giver(qtee_client, qtee_env)
    assert app.invoke(1, giver, OUT8) == [b"hello"]
    (mem,) = giver.given
    assert wait_until(lambda: mem.id == -1 and not qtee_client._shms)  # no handle left


@pytest.mark.qtee_ta(TA, Taker)
def test_a_rejected_send_still_releases_once_and_gives_ids_back(
    qtee_device: Device, qtee_client: Client, qtee_env: ObjRef, qtee_app: AppLoaderHelper
) -> None:
    """QK §4.4: the kernel rejects the SEND (EINVAL), QTEE gets UNAVAIL and the objects
    the SEND carried are dropped without a release notification.  The transferred ObjRef
    is released all the same (once), and the callback id of the other output goes back."""
    app = qtee_app(TA)
    before = _baseline(qtee_device)
    exported = qtee_client.exported()
    giver = Giver(qtee_client, qtee_env)
    rec = Recorder(qtee_client)
    rec.tamper = True
    assert app.invoke(2, giver, OUT4) == [struct.pack("<i", Result.ERROR_UNAVAIL)]
    (svc,) = giver.given
    (send,) = rec.sends()
    assert rec.events[send] == ("send", 0, errno.EINVAL)
    assert wait_until(lambda: svc.released and qtee_device.leaks() == before)
    assert len(rec.releases_of(svc.id)) == 1
    assert wait_until(lambda: qtee_client.exported() == exported)  # Extra's id was given back


class ForeignSecond(Giver):
    """op TWO -> (a callback object, another client's memory object), having taken a
    service it transfers: the second output cannot be sent from this client."""

    def __init__(self, client: Client, env: ObjRef, foreign: MemoryObject) -> None:
        super().__init__(client, env)
        self.foreign = foreign

    @op(TWO, oo=2)
    def two(self) -> tuple[object, object]:
        self.transfers = [Transfer(self._service())]
        return Extra(), self.foreign


@pytest.mark.qtee_ta(TA, Taker)
def test_outputs_that_cannot_be_marshalled_give_their_ids_back(
    qtee_device: Device, qtee_client: Client, qtee_env: ObjRef, qtee_app: AppLoaderHelper
) -> None:
    """quic-teec.md §2.3: marshalling out fails -> the answer is UNAVAIL with no objects
    (QTEE sees ERROR: the kernel maps -96 as any other negative, QK §3.6).  The callback id
    the first output took is given back at once."""
    app = qtee_app(TA)
    before = _baseline(qtee_device)
    exported = qtee_client.exported()
    rec = Recorder(qtee_client)
    with Client(qtee_device, workers=0) as other, other.memory(16) as foreign:
        bad = ForeignSecond(qtee_client, qtee_env, foreign)
        assert app.invoke(2, bad, OUT4) == [struct.pack("<i", Result.ERROR)]
    assert rec.events[rec.sends()[0]] == ("send", Result.ERROR_UNAVAIL & 0xFFFF_FFFF, 0)
    assert wait_until(lambda: qtee_client.exported() == exported)
    bad.transfers[0].release()
    assert wait_until(lambda: qtee_device.leaks() == before)


@pytest.mark.qtee_ta(TA, Taker)
def test_an_answer_after_the_deadline_releases_and_gives_back(qtee_device: Device) -> None:
    """The watchdog answered BUSY first (QTEE sees ERROR_BUSY, QK §3.6): the late answer
    is never sent, so the transfer is released and no id stays taken for it."""
    before = _baseline(qtee_device)
    slow = Client(qtee_device, workers=0)
    slow.pool = WorkerPool(slow, 1, deadline=0.2)
    try:
        env = slow.client_env()
        apps = AppLoaderHelper(slow, env)
        try:
            giver = Giver(slow, env)
            giver.delay = 0.5
            (rc, _) = struct.unpack("<iI", apps(TA).invoke(0, giver, OUT8)[0])
            assert rc == Result.ERROR_BUSY
            assert wait_until(lambda: len(giver.given) == 1 and giver.given[0].released)
        finally:
            apps.close()
            env.release()
        assert wait_until(lambda: slow.exported() == 0)
    finally:
        slow.close()
    assert wait_until(lambda: qtee_device.leaks() == before)


def test_transfer_takes_an_objref_or_a_memory_object(qtee_client: Client) -> None:
    """What Transfer refuses, with the reason: a callback object (QTEE's reference is its
    only one), the root (nothing to release), anything else; and as an invoke argument."""
    with pytest.raises(UsageError, match="CallbackObject is returned as it is"):
        Transfer(Extra())  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="root object cannot be transferred"):
        Transfer(qtee_client.root)
    with pytest.raises(UsageError, match="Transfer takes an ObjRef or a MemoryObject, not a"):
        Transfer(b"bytes")  # type: ignore[arg-type]
    with qtee_client.memory(8) as mem:
        with pytest.raises(UsageError, match="Transfer is for a callback's output objects"):
            qtee_client.root.invoke(2, Transfer(mem), OUT_OBJECT)
        t = Transfer(mem)
        t.release()
        t.release()  # once
        assert mem.id == -1
