"""The invoke-loop scenario suite, run in process and against a device server.

Every test here runs three times through the plugin's ``qtee_modes`` marker: with
``qtee_device`` an in-process ``Device``, ``qtee.connect()``-ed to a fresh ``qtee_server``
(one connection per open fd), and a guest VM's own driver model whose SMCs the VMM-side
mediator forwards (``qtee_guest``).  The bodies never ask which: the client API,
the TAs and the assertions are the same, and the plugin's leak check proves every table
of the device (in this process or the server's) empty after each test.  Specs:
qtee-kernel.md §2.3-2.5, §4.1-4.5, §6; quic-teec.md §1.4, §5.3.
"""

from __future__ import annotations

import errno
import struct
import threading
import time
from collections.abc import Callable
from typing import ClassVar

import pytest

import qtee
from objects import DriverError, QteeError, op
from qtee import OUT_OBJECT, CallbackObject, Client, NsObject, ObjRef, Out, Result, TrustedApp

DEFUNCT = -90  # QCOMTEE_MSG_ERROR_DEFUNCT as the TA sees it (qtee-kernel.md §3.6)


class ScenarioTA(TrustedApp):
    """Adds, calls back, passes objects and memory around, keeps what it is given."""

    #: What the TA of each secure world keeps (class level: one client parks, another
    #: calls; keyed by world, so partitions running the suite side by side stay apart).
    kept: ClassVar[dict[int, NsObject]] = {}

    def _kept(self) -> NsObject:
        return ScenarioTA.kept[id(self.world)]

    def _keep(self, obj: NsObject) -> None:
        assert id(self.world) not in ScenarioTA.kept, "the TA already keeps an object"
        ScenarioTA.kept[id(self.world)] = obj.retain()

    @op(0, ib=(8,), ob=(4,))
    def add(self, pair: bytes) -> bytes:
        a, b = struct.unpack("<II", pair)
        return struct.pack("<I", a + b)

    @op(1, io=1, ob=(None,))
    def call_back(self, cb: NsObject) -> bytes:
        res = cb.invoke(0, [b"TA"], [32])
        if res.result:
            raise QteeError(res.result)
        return res.ob[0]

    @op(2, io=1)
    def call_fail(self, cb: NsObject) -> None:
        raise QteeError(cb.invoke(2).result)

    @op(3, io=1, ob=(4,))
    def object_round_trip(self, cb: NsObject) -> bytes:
        res = cb.invoke(1, io=[self], n_oo=1)
        if res.result:
            raise QteeError(res.result)
        return struct.pack("<I", 1 if res.oo[0] is self else 0)

    @op(4, io=1, oo=1)
    def give_back(self, cb: NsObject) -> NsObject:
        return cb

    @op(5, io=1)
    def keep(self, cb: NsObject) -> None:
        self._keep(cb)

    @op(6, ob=(None,))
    def use_kept(self) -> bytes:
        res = self._kept().invoke(0, [b"later"], [32])
        if res.result:
            raise QteeError(res.result)
        return res.ob[0]

    @op(7)
    def drop_kept(self) -> None:
        kept = ScenarioTA.kept.pop(id(self.world), None)
        if kept is not None:
            kept.release()

    @op(8, io=1)
    def keep_memory(self, mem: NsObject) -> None:
        self._keep(mem)

    @op(9, io=1, ob=(None,))
    def write_through_second_read_first(self, mem: NsObject) -> bytes:
        """The same memory shared twice: write through this share, read the kept one."""
        second = self.world.map_region(mem)
        first = self.world.map_region(self._kept())
        try:
            seen = bytes(first.view[:6])  # what the client wrote before the call
            second.view[:13] = b"written by TA"
            return seen + bytes(first.view[:13])
        finally:
            first.unmap()
            second.unmap()

    @op(10, ib=(4,), io=1, ob=(4,))
    def relay(self, x: bytes, cb: NsObject) -> bytes:
        res = cb.invoke(3, [x], [4])
        if res.result:
            raise QteeError(res.result)
        return res.ob[0]

    @op(11)
    def call_kept_blocking(self) -> None:
        raise QteeError(self._kept().invoke(4).result)


class Greeter(CallbackObject):
    def __init__(self) -> None:
        self.calls = 0
        self.entered = threading.Event()
        self.leave = threading.Event()

    @op(0, ib=(None,), ob=(None,))
    def greet(self, name: bytes) -> bytes:
        self.calls += 1
        return b"hello " + name

    @op(1, io=1, oo=1)
    def echo(self, obj: object) -> object:
        return obj

    @op(2)
    def fail(self) -> None:
        raise QteeError(11)  # a positive user error

    @op(3, ib=(4,), ob=(4,))
    def double(self, x: bytes) -> bytes:
        return struct.pack("<I", 2 * struct.unpack("<I", x)[0])

    @op(4)
    def block(self) -> None:
        self.entered.set()
        self.leave.wait(10)


pytestmark = [
    pytest.mark.qtee_modes("in-process", "server", "guest"),
    pytest.mark.qtee_ta("scenario", ScenarioTA),
    pytest.mark.qtee_ta("scenario.peer", ScenarioTA),  # a second TA of the same code
]


def _eventually(cond: Callable[[], bool], timeout: float = 3.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


@pytest.fixture(autouse=True)
def _nothing_kept() -> object:
    yield
    assert ScenarioTA.kept == {}, "a test left an object parked in the TA"


def test_register_and_open_services_by_uid(qtee_client: Client, qtee_env: ObjRef) -> None:
    """Root op 2 with a credentials object gives the client env; env op 0 opens services
    by UID; an unknown UID is IOpener's NOT_FOUND (qtee-kernel.md §2.5, §6)."""
    with qtee_client.open_service(qtee_env, 2033) as fv:
        (v,) = fv.invoke(0, struct.pack("<I", 10), Out(4))
        assert struct.unpack("<I", v)[0] == (2 << 22) | (1 << 12)
    with qtee_client.open_service(qtee_env, 143) as diag:
        (heap,) = diag.invoke(0, Out(24))
        assert struct.unpack("<6I", heap) == (1 << 20, 256 << 10, 768 << 10, 4096, 37, 128 << 10)
    with pytest.raises(QteeError) as exc:
        qtee_client.open_service(qtee_env, 12345)
    assert exc.value.result == 10


def test_load_from_buffer_add_and_loader_errors(qtee_client: Client, qtee_env: ObjRef) -> None:
    """loadFromBuffer, getAppObject, an IDL-checked op; IAppLoader codes for a second load,
    a garbled image and an unknown TA (quic-teec.md §5.3)."""
    with qtee_client.open_service(qtee_env, 3) as loader:
        (ctrl,) = loader.invoke(0, qtee.ta_image("scenario"), OUT_OBJECT)
        with ctrl, ctrl.invoke(2, OUT_OBJECT)[0] as app:
            assert app.invoke(0, struct.pack("<II", 40, 2), Out(4)) == [struct.pack("<I", 42)]
            with pytest.raises(QteeError) as exc:
                app.invoke(0, b"short", Out(4))
            assert exc.value.result == Result.ERROR_INVALID
            for image, code in (
                (qtee.ta_image("scenario"), 16),  # ALREADY_LOADED
                (b"garbage!", 10),  # INVALID_BUFFER
                (qtee.ta_image("no.such.ta"), 13),  # METADATA_INVALID
            ):
                with pytest.raises(QteeError) as exc:
                    loader.invoke(0, image, OUT_OBJECT)
                assert exc.value.result == code
            ctrl.invoke(1)  # unload


def test_load_from_region_owner_donates(qtee_client: Client, qtee_env: ObjRef) -> None:
    """loadFromRegion maps the memory object through MAP_REGION; the owner drops its copy
    right after the call and the TA is loaded all the same (qtee-kernel.md §2.4)."""
    image = qtee.ta_image("scenario", b"\x00" * 100)
    with qtee_client.open_service(qtee_env, 3) as loader:
        mem = qtee_client.memory(len(image))
        mem.view[:] = image
        (ctrl,) = loader.invoke(1, mem, OUT_OBJECT)
        mem.release()  # donate
        with ctrl, ctrl.invoke(2, OUT_OBJECT)[0] as app:
            assert app.invoke(0, struct.pack("<II", 1, 2), Out(4)) == [struct.pack("<I", 3)]
            ctrl.invoke(1)


def _app(client: Client, env: ObjRef, name: str = "scenario") -> tuple[ObjRef, ObjRef, ObjRef]:
    loader = client.open_service(env, 3)
    (ctrl,) = loader.invoke(0, qtee.ta_image(name), OUT_OBJECT)
    (app,) = ctrl.invoke(2, OUT_OBJECT)
    return app, ctrl, loader


def _release(*refs: ObjRef) -> None:
    for ref in refs:
        ref.release()


def test_callbacks_with_buffers_objects_and_user_errors(
    qtee_client: Client, qtee_env: ObjRef
) -> None:
    """A TA calls a client object with buffers in and out, passes an object through it
    and gets back the same one, returns its own positive error unchanged, and hands a
    client object back to its owner as the same Python object (qtee-kernel.md §4.2)."""
    base = qtee_client.exported()  # the credentials object the env keeps
    refs = _app(qtee_client, qtee_env)
    app = refs[0]
    g = Greeter()
    assert app.invoke(1, g, Out(32)) == [b"hello TA"]
    with pytest.raises(QteeError) as exc:
        app.invoke(2, g)
    assert exc.value.result == 11
    assert app.invoke(3, g, Out(4)) == [struct.pack("<I", 1)]
    assert app.invoke(4, g, OUT_OBJECT) == [g]
    _release(*refs)
    assert g.calls == 1
    assert _eventually(lambda: qtee_client.exported() == base)


def test_ta_keeps_a_callback_object_the_client_dropped(
    qtee_client: Client, qtee_env: ObjRef
) -> None:
    """A retained callback object outlives the client's handle; the release notification
    comes when QTEE drops it (qtee-kernel.md §2.3)."""
    base = qtee_client.exported()
    refs = _app(qtee_client, qtee_env)
    app = refs[0]
    app.invoke(5, Greeter())  # the client keeps no reference
    assert qtee_client.exported() == base + 1
    assert app.invoke(6, Out(32)) == [b"hello later"]
    app.invoke(7)
    assert _eventually(lambda: qtee_client.exported() == base)
    _release(*refs)


def test_memory_object_shared_twice_is_one_buffer(qtee_client: Client, qtee_env: ObjRef) -> None:
    """The same shm passed twice reaches QTEE as two memory objects over one buffer: the TA
    reads the client's bytes through one, writes through the other, and the client sees
    the write in its own view (qtee-kernel.md §2.4 MAP_REGION, §6)."""
    refs = _app(qtee_client, qtee_env)
    app = refs[0]
    with qtee_client.memory(64) as mem:
        mem.view[:6] = b"client"
        app.invoke(8, mem)
        (seen,) = app.invoke(9, mem, Out(32))
        assert seen == b"client" + b"written by TA"
        assert bytes(mem.view[:13]) == b"written by TA"
        app.invoke(7)  # the TA drops the first share
    _release(*refs)


def test_close_with_a_callback_in_flight_is_defunct_within_1s(
    qtee_device: qtee.Device | qtee.RemoteDevice,
) -> None:
    """One client parks an object in the TA; another's call is inside it when the first
    client's fd closes: that call ends with DEFUNCT (-90) within a second, and the TA's
    reference is all that is left to drop (qtee-kernel.md §4.5)."""
    host = Client(qtee_device, workers=1)
    caller = Client(qtee_device, workers=1)
    blocker = Greeter()
    try:
        host_refs = (*_app(host, env := host.client_env()), env)
        host_refs[0].invoke(5, blocker)
        refs = (*_app(caller, env := caller.client_env(), "scenario.peer"), env)
        outcome: list[BaseException | None] = []

        def call() -> None:
            try:
                refs[0].invoke(11)
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        t = threading.Thread(target=call)
        t.start()
        assert blocker.entered.wait(5)
        t0 = time.monotonic()
        host.ctx.close()  # the supplicant's fd goes away mid-dispatch: its objects go too
        t.join(1.0)
        assert not t.is_alive() and time.monotonic() - t0 < 1.0
        assert isinstance(outcome[0], QteeError) and outcome[0].result == DEFUNCT
        refs[0].invoke(7)  # QTEE drops the reference it kept
        _release(*refs)
    finally:
        blocker.leave.set()
        host.close()
        caller.close()


def test_concurrent_clients_with_callbacks(qtee_client: Client, qtee_env: ObjRef) -> None:
    """8 threads invoke a TA that calls back into their objects, served by the client's
    workers: every answer right, nothing left exported (qtee-kernel.md §4.4)."""
    base = qtee_client.exported()
    refs = _app(qtee_client, qtee_env)
    app = refs[0]
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        g = Greeter()
        try:
            for i in range(100):
                n = k * 100_000 + i
                (out,) = app.invoke(10, struct.pack("<I", n), g, Out(4))
                assert struct.unpack("<I", out)[0] == 2 * n
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "deadlock"
    assert errors == []
    _release(*refs)
    assert _eventually(lambda: qtee_client.exported() == base)


def test_errno_channel(qtee_client: Client, qtee_env: ObjRef) -> None:
    """Op 0xFFFE (RETAIN) from userspace is refused by the driver with EINVAL, on the errno
    channel, not as a result (qtee-kernel.md §4.1, §5)."""
    with pytest.raises(DriverError) as exc:
        qtee_env.invoke(0xFFFE)
    assert exc.value.code == errno.EINVAL
