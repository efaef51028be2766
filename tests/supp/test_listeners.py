"""Listeners end to end: registration in QTEE, the busy/wait rule, the supplicant's time
and storage listeners, TA autoload (quic-teec.md §5.3 IRegisterListenerCBO/IListenerCBO/
IRequestTABuffer, §5.4 QTEE supplicant).

Secure code reaches a listener with ``world.listeners.get(id).request(bytes)`` inside a
direct invocation.  :class:`ProbeTA` runs a test-supplied function in exactly that
position (op 0), so the tests drive listeners the way a TA does, through the driver and
the supplicant's workers, and check every answer byte for byte after decoding.
"""

from __future__ import annotations

import errno
import itertools
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from objects import QteeError, op
from qtee import Device, Result
from qtee.client import OUT_OBJECT, Client, MemoryObject, Out
from qtee.secure import (
    REGISTER_LISTENER_UID,
    SecureWorld,
    TrustedApp,
    register_ta,
    ta_image,
    unregister_ta,
)
from qtee.secure._listeners import (
    ERROR_ID_IN_USE,
    ERROR_ID_RESERVED,
    ERROR_MAX_REGISTERED,
    MAX_BUSY_RETRIES,
    MAX_LISTENERS,
)
from qtee.wire import result_from_errno
from supplicant import (
    FS_LISTENER_ID,
    TIME_LISTENER_ID,
    ListenerObject,
    Supplicant,
    TimeService,
    format_uuid,
)
from supplicant import fs_msg as fsm
from supplicant import time_msg as tm
from tests._helpers import wait_until
from tests._tas import Adder

PROBE = "listeners.probe"
AUTOLOADED = "listeners.autoloaded"
ERROR_EMBEDDED_IMAGE_NOT_FOUND = 17
APP_LOADER_UID = 3
CLOCK = 1_700_000_000.25  # 2023-11-14 22:13:20.25 UTC, a Tuesday

# --------------------------------------------------------------------------- the probe TA


class _Job:
    """One function to run inside the TA, and what it produced."""

    def __init__(self, fn: Callable[[SecureWorld], Any]) -> None:
        self.fn = fn
        self.result: Any = None
        self.exc: BaseException | None = None


_JOBS: dict[bytes, _Job] = {}
_KEYS = itertools.count()


class ProbeTA(TrustedApp):
    """op 0 run(key): runs the job filed under ``key`` in this direct invocation."""

    @op(0, ib=(None,))
    def run(self, key: bytes) -> None:
        job = _JOBS[key]
        try:
            job.result = job.fn(self.world)
        except BaseException as exc:  # handed back to the test thread by TaClient.run
            job.exc = exc


class TaClient:
    """A client with :class:`ProbeTA` loaded; :meth:`run` runs code as that TA."""

    def __init__(self, dev: Device) -> None:
        self.client = Client(dev, workers=1)
        self.env = self.client.client_env()
        self.loader = self.client.open_service(self.env, APP_LOADER_UID)
        (self.ctrl,) = self.loader.invoke(0, ta_image(PROBE), OUT_OBJECT)
        (self.app,) = self.ctrl.invoke(2, OUT_OBJECT)

    def run(self, fn: Callable[[SecureWorld], Any]) -> Any:
        """``fn(world)`` run inside a direct invocation of the TA; its result or exception."""
        key = struct.pack("<Q", next(_KEYS))
        job = _JOBS[key] = _Job(fn)
        try:
            self.app.invoke(0, key)
        finally:
            del _JOBS[key]
        if job.exc is not None:
            raise job.exc
        return job.result

    def close(self) -> None:
        for ref in (self.app, self.ctrl, self.loader, self.env):
            ref.release()
        self.client.close()


@pytest.fixture
def dev(qtee_device: Device) -> Iterator[Device]:
    register_ta(PROBE, ProbeTA)
    register_ta(AUTOLOADED, Adder)
    try:
        yield qtee_device
    finally:
        unregister_ta(AUTOLOADED)
        unregister_ta(PROBE)


@pytest.fixture
def ta(dev: Device) -> Iterator[TaClient]:
    t = TaClient(dev)
    yield t
    t.close()


def time_call(world: SecureWorld, req: tm.TimeRequest) -> tm.TimeResponse:
    """One time-listener request as a TA makes it."""
    return tm.decode_response(world.listeners.get(TIME_LISTENER_ID).request(tm.encode_request(req)))


def fs_call(world: SecureWorld, req: fsm.FsRequest) -> fsm.FsResponse:
    """One FS-listener request as a TA makes it."""
    return fsm.decode_response(world.listeners.get(FS_LISTENER_ID).request(fsm.encode_request(req)))


# --------------------------------------------------------------------------- registration


def test_supplicant_registers_and_unregisters_listeners(dev: Device, tmp_path: Path) -> None:
    """§5.4 "Listener init()" steps 1-6 and deinit: time (0xB) always, FS (0xA) with a
    storage directory; stop() unregisters them and leaves nothing behind."""
    sup = Supplicant(dev)
    assert dev.world.listeners.ids() == [0xB]
    assert sorted(sup.listeners) == [0xB]
    assert dev.world.listeners.get(0xB).buffer_size == 20 * 1024  # §5.4 buffer table
    sup.stop()
    assert dev.world.listeners.ids() == []
    assert dev.leaks() == {}

    sup = Supplicant(dev, storage=tmp_path)
    assert dev.world.listeners.ids() == [0xA, 0xB]
    assert dev.world.listeners.get(0xA).buffer_size == 20 * 1024
    sup.stop()
    sup.stop()  # idempotent
    assert dev.world.listeners.ids() == []
    assert dev.world.listeners.ta_buffer is None
    assert dev.leaks() == {}

    sup = Supplicant(dev, time_service=False)
    assert dev.world.listeners.ids() == []
    sup.stop()
    assert dev.leaks() == {}


def test_unregistered_listener_is_defunct(ta: TaClient) -> None:
    """§5.4 listener ids: secure code asking for an id nobody registered gets DEFUNCT
    (qtee's answer, Listeners.get; the spec names no error for it)."""

    def probe(world: SecureWorld) -> int:
        try:
            world.listeners.get(0xB)
        except QteeError as exc:
            return exc.result
        return 0

    assert ta.run(probe) == Result.ERROR_DEFUNCT


class _RawRegistrar:
    """A client talking to IRegisterListenerCBO (UID 87) directly."""

    def __init__(self, dev: Device, workers: int = 2) -> None:
        self.client = Client(dev, workers=workers)
        self.env = self.client.client_env()
        self.svc = self.client.open_service(self.env, REGISTER_LISTENER_UID)

    def listener(self, listener_id: int, size: int = 4096) -> tuple[ListenerObject, Any]:
        mem = self.client.memory(size)
        return ListenerObject(listener_id, mem, TimeService(clock=lambda: CLOCK).handle), mem

    def register(self, listener_id: int, cbo: object, mem: object) -> None:
        self.svc.invoke(0, struct.pack("<I", listener_id), cbo, mem)

    def close(self) -> None:
        self.svc.release()
        self.env.release()
        self.client.close()


def test_register_errors_through_the_raw_service(dev: Device) -> None:
    """§5.3 IRegisterListenerCBO register(u32 id; OI cbo; OI memRegion): id 0 is
    ID_RESERVED (13), an id in use ID_IN_USE (12), past MAX_LISTENERS MAX_REGISTERED
    (10); registering NULL unregisters."""
    reg = _RawRegistrar(dev)
    mems = []
    try:
        lo, mem = reg.listener(0x42)
        mems.append(mem)
        # ListenerObject refuses id 0 itself; QTEE must refuse it too, whatever the object.
        with pytest.raises(QteeError) as exc:
            reg.register(0, lo, mem)
        assert exc.value.result == ERROR_ID_RESERVED == 13
        assert dev.world.listeners.ids() == []

        reg.register(0x42, lo, mem)
        assert dev.world.listeners.ids() == [0x42]
        lo2, mem2 = reg.listener(0x42)
        mems.append(mem2)
        with pytest.raises(QteeError) as exc:
            reg.register(0x42, lo2, mem2)
        assert exc.value.result == ERROR_ID_IN_USE == 12
        assert dev.world.listeners.ids() == [0x42]

        ids = [0x42] + [0x100 + i for i in range(MAX_LISTENERS - 1)]
        for lid in ids[1:]:
            lo_i, mem_i = reg.listener(lid)
            mems.append(mem_i)
            reg.register(lid, lo_i, mem_i)
        assert MAX_LISTENERS == 16
        assert dev.world.listeners.ids() == sorted(ids)
        lo17, mem17 = reg.listener(0x999)
        mems.append(mem17)
        with pytest.raises(QteeError) as exc:
            reg.register(0x999, lo17, mem17)
        assert exc.value.result == ERROR_MAX_REGISTERED == 10
        assert len(dev.world.listeners.ids()) == 16

        # NULL unregisters: the slot is free again and the freed id can be reused.
        reg.register(0x42, None, None)
        assert 0x42 not in dev.world.listeners.ids()
        reg.register(0x999, lo17, mem17)
        assert 0x999 in dev.world.listeners.ids()
        # NULL on an id nobody registered is not an error.
        reg.register(0x42, None, None)
        # NULL for id 0 is still ID_RESERVED.
        with pytest.raises(QteeError) as exc:
            reg.register(0, None, None)
        assert exc.value.result == ERROR_ID_RESERVED

        for lid in dev.world.listeners.ids():
            reg.register(lid, None, None)
        assert dev.world.listeners.ids() == []
    finally:
        for m in mems:
            m.release()
        reg.close()
    assert dev.leaks() == {}


# --------------------------------------------------------------------------- time listener


def test_time_listener_answers_a_ta(dev: Device, ta: TaClient) -> None:
    """§5.4 "Listener message format": time commands from 0x302; any other id ret = -1."""
    with Supplicant(dev, time_service=False) as sup:
        sup.add_listener(0xB, TimeService(clock=lambda: CLOCK).handle)

        def script(world: SecureWorld) -> list[tm.TimeResponse]:
            reqs: list[tm.TimeRequest] = [
                tm.GetUtcSecRequest(),
                tm.GetSystimeRequest(),
                tm.GetTimeMsRequest(),
                tm.GetHlosUtcRequest(),
                tm.EndRequest(),
                tm.UnsupportedRequest(cmd_id=0x301),
                tm.UnsupportedRequest(cmd_id=0x7FFFFFFF),
            ]
            return [time_call(world, r) for r in reqs]

        utc, systime, ms, hlos, end, start, unknown = ta.run(script)
        assert sup.listeners[0xB].served == 7

    assert utc == tm.TimeSpecResponse(
        cmd_id=0x302, tv_sec=1_700_000_000, tv_nsec=250_000_000, ret=0
    )
    assert systime == tm.SystimeResponse(
        time=tm.TzTime(
            tm_sec=20,
            tm_min=13,
            tm_hour=22,
            tm_mday=14,
            tm_mon=10,
            tm_year=123,
            tm_wday=2,
            tm_yday=317,
            tm_isdst=0,
        ),
        ret=0,
    )
    assert ms == tm.TimeMsResponse(ms=1_700_000_000_250)
    assert hlos == tm.TimeSpecResponse(
        cmd_id=0x305, tv_sec=1_700_000_000, tv_nsec=250_000_000, ret=0
    )
    assert end == tm.StatusResponse(cmd_id=0x306, ret=0)
    assert start == tm.StatusResponse(cmd_id=0x301, ret=-1)
    assert unknown == tm.StatusResponse(cmd_id=0x7FFFFFFF, ret=-1)


def test_time_listener_raw_bytes_in_the_shared_buffer(dev: Device, ta: TaClient) -> None:
    """§5.4: the response is written over the request in the shared buffer; the rest of
    the buffer is what QTEE put there (zeros)."""
    with Supplicant(dev, time_service=False) as sup:
        sup.add_listener(0xB, TimeService(clock=lambda: CLOCK).handle)
        raw = ta.run(lambda w: w.listeners.get(0xB).request(struct.pack("<I", 0x302)))
        bad = ta.run(lambda w: w.listeners.get(0xB).request(struct.pack("<I", 0x1234)))
    assert len(raw) == 20 * 1024
    assert raw[:16] == struct.pack("<IIIi", 0x302, 1_700_000_000, 250_000_000, 0)
    assert raw[16:] == bytes(len(raw) - 16)
    assert bad[:8] == struct.pack("<Ii", 0x1234, -1)


def test_default_supplicant_time_is_the_wall_clock(dev: Device, ta: TaClient) -> None:
    """§5.4: the default time listener answers from CLOCK_REALTIME."""
    with Supplicant(dev):
        before = int(time.time())
        rsp = ta.run(lambda w: time_call(w, tm.GetUtcSecRequest()))
        after = int(time.time())
    assert isinstance(rsp, tm.TimeSpecResponse)
    assert rsp.ret == 0
    assert before <= rsp.tv_sec <= after


# --------------------------------------------------------------------------- FS listener

O_CREAT = fsm.FsOpenFlag.O_CREAT
O_WRONLY = fsm.FsOpenFlag.O_WRONLY
O_RDONLY = fsm.FsOpenFlag.O_RDONLY
O_RDWR = fsm.FsOpenFlag.O_RDWR


def _status(cmd: int, ret: int) -> fsm.StatusResponse:
    return fsm.StatusResponse(cmd_id=cmd, ret=ret)


def test_fs_listener_file_life_cycle(dev: Device, ta: TaClient, tmp_path: Path) -> None:
    """§5.4 "Listener message format": FS commands from 0x201 (open, read, write, close,
    lseek, dir ops, rename, remove, get_errno) served on a real directory."""
    F = fsm.FsCmd
    payload = b"hello, secure world"
    seen: dict[str, Any] = {}

    def write_phase(world: SecureWorld) -> None:
        seen["mkdir"] = fs_call(world, fsm.MkdirRequest(path="dir", mode=0o700))
        seen["open_w"] = fs_call(world, fsm.OpenRequest(path="dir/f.bin", flags=O_CREAT | O_WRONLY))
        fd = seen["open_w"].ret
        seen["write"] = fs_call(world, fsm.WriteRequest(fd=fd, data=payload))
        seen["close_w"] = fs_call(world, fsm.CloseRequest(fd=fd))

    def read_phase(world: SecureWorld) -> None:
        seen["open_r"] = fs_call(world, fsm.OpenRequest(path="dir/f.bin", flags=O_RDONLY))
        fd = seen["open_r"].ret
        seen["read5"] = fs_call(world, fsm.ReadRequest(fd=fd, count=5))
        seen["seek"] = fs_call(world, fsm.LseekRequest(fd=fd, offset=7, whence=os.SEEK_SET))
        seen["read_rest"] = fs_call(world, fsm.ReadRequest(fd=fd, count=1000))
        seen["read_eof"] = fs_call(world, fsm.ReadRequest(fd=fd, count=10))
        seen["seek_end"] = fs_call(world, fsm.LseekRequest(fd=fd, offset=0, whence=os.SEEK_END))
        seen["close_r"] = fs_call(world, fsm.CloseRequest(fd=fd))
        seen["read_closed"] = fs_call(world, fsm.ReadRequest(fd=fd, count=1))
        seen["errno_badf"] = fs_call(world, fsm.GetErrnoRequest())

    def dir_phase(world: SecureWorld) -> None:
        seen["dir_open"] = fs_call(world, fsm.DirOpenRequest(path="dir"))
        pdir = seen["dir_open"].pdir
        names = []
        while True:
            rsp = fs_call(world, fsm.DirReadRequest(pdir=pdir))
            assert isinstance(rsp, fsm.DirReadResponse)
            assert rsp.ret == 0
            if rsp.entry is None:
                break
            names.append((rsp.entry.name, rsp.entry.type))
        seen["names"] = names
        seen["dir_close"] = fs_call(world, fsm.DirCloseRequest(pdir=pdir))
        seen["dir_read_closed"] = fs_call(world, fsm.DirReadRequest(pdir=pdir))
        seen["dir_open_missing"] = fs_call(world, fsm.DirOpenRequest(path="nodir"))

    def rename_remove_phase(world: SecureWorld) -> None:
        seen["rename"] = fs_call(world, fsm.RenameRequest(old="dir/f.bin", new="dir/g.bin"))

    def remove_phase(world: SecureWorld) -> None:
        seen["remove"] = fs_call(world, fsm.RemoveRequest(path="dir/g.bin"))
        seen["remove_again"] = fs_call(world, fsm.RemoveRequest(path="dir/g.bin"))
        seen["errno_noent"] = fs_call(world, fsm.GetErrnoRequest())
        seen["end"] = fs_call(world, fsm.EndRequest())
        seen["unsupported"] = fs_call(world, fsm.UnsupportedRequest(cmd_id=0x20E))  # FSTAT
        seen["unknown"] = fs_call(world, fsm.UnsupportedRequest(cmd_id=0x4242))

    with Supplicant(dev, storage=tmp_path, time_service=False):
        ta.run(write_phase)
        assert seen["mkdir"] == _status(F.FILE_MKDIR, 0)
        assert seen["open_w"] == _status(F.FILE_OPEN, 1)  # lowest free fd from 1
        assert seen["write"] == _status(F.FILE_WRITE, len(payload))
        assert seen["close_w"] == _status(F.FILE_CLOSE, 0)
        assert (tmp_path / "dir" / "f.bin").read_bytes() == payload

        ta.run(read_phase)
        assert seen["open_r"] == _status(F.FILE_OPEN, 1)
        assert seen["read5"] == fsm.ReadResponse(data=b"hello", ret=5)
        assert seen["seek"] == _status(F.FILE_LSEEK, 7)
        assert seen["read_rest"] == fsm.ReadResponse(data=payload[7:], ret=len(payload) - 7)
        assert seen["read_eof"] == fsm.ReadResponse(data=b"", ret=0)
        assert seen["seek_end"] == _status(F.FILE_LSEEK, len(payload))
        assert seen["close_r"] == _status(F.FILE_CLOSE, 0)
        assert seen["read_closed"] == fsm.ReadResponse(data=b"", ret=-1)
        assert seen["errno_badf"] == _status(F.FILE_GET_ERRNO, errno.EBADF)

        ta.run(dir_phase)
        assert seen["dir_open"] == fsm.DirOpenResponse(pdir=1, ret=0)
        assert seen["names"] == [(".", 4), ("..", 4), ("f.bin", 8)]
        assert seen["dir_close"] == _status(F.DIR_CLOSE, 0)
        assert seen["dir_read_closed"] == fsm.DirReadResponse(
            entry=None, ret=fsm.FsResult.INVALID_ARG
        )
        assert seen["dir_open_missing"] == fsm.DirOpenResponse(
            pdir=0, ret=fsm.FsResult.DIR_NOT_EXIST
        )

        ta.run(rename_remove_phase)
        assert seen["rename"] == _status(F.FILE_RENAME, 0)
        assert not (tmp_path / "dir" / "f.bin").exists()
        assert (tmp_path / "dir" / "g.bin").read_bytes() == payload

        ta.run(remove_phase)
        assert seen["remove"] == _status(F.FILE_REMOVE, 0)
        assert not (tmp_path / "dir" / "g.bin").exists()
        assert seen["remove_again"] == _status(F.FILE_REMOVE, -1)
        assert seen["errno_noent"] == _status(F.FILE_GET_ERRNO, errno.ENOENT)
        assert seen["end"] == _status(F.FILE_END, 0)
        assert seen["unsupported"] == _status(0x20E, -1)
        assert seen["unknown"] == _status(0x4242, -1)
    assert os.listdir(tmp_path / "dir") == []


@pytest.mark.parametrize(
    ("path", "flags"),
    [
        ("../x", O_CREAT | O_WRONLY),
        ("/etc/passwd", O_RDONLY),
        ("a/../../x", O_CREAT | O_RDWR),
    ],
)
def test_fs_listener_refuses_path_escapes(
    dev: Device, ta: TaClient, tmp_path: Path, path: str, flags: int
) -> None:
    """§5.4 FS listener, confined to its storage directory: an escape answers ret = -1
    and GET_ERRNO then answers EACCES."""
    root = tmp_path / "store"
    root.mkdir()

    def script(world: SecureWorld) -> tuple[fsm.FsResponse, fsm.FsResponse]:
        opened = fs_call(world, fsm.OpenRequest(path=path, flags=flags))
        return opened, fs_call(world, fsm.GetErrnoRequest())

    with Supplicant(dev, storage=root, time_service=False):
        opened, err = ta.run(script)
    assert opened == _status(fsm.FsCmd.FILE_OPEN, -1)
    assert err == _status(fsm.FsCmd.FILE_GET_ERRNO, errno.EACCES)
    assert sorted(os.listdir(tmp_path)) == ["store"]
    assert os.listdir(root) == []


# --------------------------------------------------------------------------- busy / wait


class CountingListener(ListenerObject):
    """ListenerObject that counts the BUSY answers it gives and the waits it serves.

    ``resume``, when given, holds every ``wait`` after the listener became free until it
    is set, so a test decides when the waiting TA thread may retry.
    """

    def __init__(self, *args: Any, resume: threading.Event | None = None) -> None:
        super().__init__(*args)
        self.busy_answers = 0
        self.waits = 0
        self.resume = resume
        self._count = threading.Lock()

    def request(self) -> tuple[bytes, bytes, None, None, None, None]:
        try:
            return super().request()
        except QteeError as exc:
            if exc.result == -errno.EBUSY:
                with self._count:
                    self.busy_answers += 1
            raise

    def wait(self) -> None:
        with self._count:
            self.waits += 1
        super().wait()
        if self.resume is not None:
            assert self.resume.wait(10)


class _BlockedFirst:
    """A time handler whose first request blocks until ``release`` is set."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.service = TimeService(clock=lambda: CLOCK)

    def __call__(self, buf: bytes) -> bytes:
        self.entered.set()
        assert self.release.wait(10)
        return self.service.handle(buf)


def _two_requests(
    dev: Device,
    ta: TaClient,
    make: Callable[[MemoryObject, _BlockedFirst], CountingListener],
    before_release: Callable[[CountingListener], None],
    after_first: Callable[[], None] = lambda: None,
) -> tuple[CountingListener, dict[str, Any]]:
    """TA thread "a" asks for GET_UTC_SEC and blocks in the handler; then TA thread "b"
    asks for GET_TIME_MS; ``before_release`` runs, the handler is released, ``after_first``
    runs once "a" has its answer.  Returns the listener and both answers."""
    handler = _BlockedFirst()
    reg = _RawRegistrar(dev, workers=4)
    mem = reg.client.memory(20 * 1024)
    listener = make(mem, handler)
    answers: dict[str, Any] = {}
    errors: list[BaseException] = []

    def call(name: str, req: tm.TimeRequest) -> None:
        try:
            answers[name] = ta.run(lambda w: time_call(w, req))
        except BaseException as exc:
            errors.append(exc)

    a = threading.Thread(target=call, args=("a", tm.GetUtcSecRequest()), daemon=True)
    b = threading.Thread(target=call, args=("b", tm.GetTimeMsRequest()), daemon=True)
    try:
        reg.register(0xB, listener, mem)
        a.start()
        assert handler.entered.wait(5)
        b.start()
        before_release(listener)
        handler.release.set()
        a.join(10)
        after_first()
        b.join(10)
        assert not a.is_alive() and not b.is_alive()
    finally:
        handler.release.set()
        after_first()
        reg.register(0xB, None, None)
        mem.release()
        reg.close()
    assert errors == []
    assert dev.world.listeners.ids() == []
    return listener, answers


UTC_ANSWER = tm.TimeSpecResponse(cmd_id=0x302, tv_sec=1_700_000_000, tv_nsec=250_000_000, ret=0)
MS_ANSWER = tm.TimeMsResponse(ms=1_700_000_000_250)


def test_two_ta_threads_take_turns_on_one_listener(dev: Device, ta: TaClient) -> None:
    """§5.4 CListenerCBO: a request while the listener is busy answers -EBUSY at once,
    which the kernel's ``qcomtee_msg_set_result`` turns into ERROR_BUSY (-99) for QTEE (§6).
    Two TA threads on one listener take turns on its shared buffer in QTEE: the second
    waits for the first instead of overwriting its request, so neither sees BUSY and
    each gets its own answer (the busy/wait round trip is the next test)."""
    resume = threading.Event()

    def before_release(listener: CountingListener) -> None:
        with pytest.raises(QteeError) as exc:
            listener.request()  # direct call while the first request is being served
        assert exc.value.result == -errno.EBUSY
        assert result_from_errno(exc.value.result) == Result.ERROR_BUSY == -99
        assert listener.busy_answers == 1 and listener.served == 0

    listener, answers = _two_requests(
        dev,
        ta,
        lambda mem, h: CountingListener(0xB, mem, h, resume=resume),
        before_release,
        resume.set,
    )
    assert (listener.busy_answers, listener.waits, listener.served) == (1, 0, 2)
    assert answers == {"a": UTC_ANSWER, "b": MS_ANSWER}


def test_listener_busy_on_the_ns_side_makes_a_ta_wait(dev: Device, ta: TaClient) -> None:
    """§5.4 busy/wait rule with the listener kept busy by its own side (a request served
    outside QTEE): the TA's request is answered BUSY, QTEE waits and retries, and gets
    its answer once the listener is free."""
    handler = _BlockedFirst()
    reg = _RawRegistrar(dev, workers=4)
    mem = reg.client.memory(20 * 1024)
    listener = CountingListener(0xB, mem, handler)
    answers: dict[str, Any] = {}
    errors: list[BaseException] = []

    def direct() -> None:
        try:
            listener.request()
        except BaseException as exc:
            errors.append(exc)

    def from_ta() -> None:
        try:
            answers["ta"] = ta.run(lambda w: time_call(w, tm.GetUtcSecRequest()))
        except BaseException as exc:
            errors.append(exc)

    d = threading.Thread(target=direct, daemon=True)
    t = threading.Thread(target=from_ta, daemon=True)
    try:
        reg.register(0xB, listener, mem)
        d.start()
        assert handler.entered.wait(5)
        t.start()
        assert wait_until(lambda: listener.waits == 1)
        assert listener.busy_answers == 1
        assert "ta" not in answers
        handler.release.set()
        d.join(10)
        t.join(10)
        assert not d.is_alive() and not t.is_alive()
    finally:
        handler.release.set()
        reg.register(0xB, None, None)
        mem.release()
        reg.close()
    assert errors == []
    assert answers == {"ta": UTC_ANSWER}
    assert (listener.busy_answers, listener.waits, listener.served) == (1, 1, 2)


class _HoldFirstAnswer(CountingListener):
    """Holds the first request's reply until a second request has been served (or 2 s)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.second_served = threading.Event()

    def request(self) -> tuple[bytes, bytes, None, None, None, None]:
        out = super().request()
        if self.served == 1:
            self.second_served.wait(2)
        else:
            self.second_served.set()
        return out


def test_each_ta_gets_its_own_answer_when_a_retry_overtakes_the_reply(
    dev: Device, ta: TaClient
) -> None:
    """§5.4: one shared buffer per listener; whatever the order in which the two replies
    travel back, each TA request must read its own answer.  Here "b"'s retry is served
    before "a"'s reply reaches QTEE (a legal interleaving of the two worker threads)."""
    _, answers = _two_requests(
        dev,
        ta,
        lambda mem, h: _HoldFirstAnswer(0xB, mem, h),
        lambda listener: wait_until(lambda: listener.waits == 1, timeout=1.0),
    )
    assert answers == {"a": UTC_ANSWER, "b": MS_ANSWER}


def test_wait_on_a_free_listener_returns_at_once(dev: Device) -> None:
    """§5.4 CListenerCBO wait: OK at once when the listener is free."""
    with Supplicant(dev) as sup:
        listener = sup.listeners[0xB]
        start = time.monotonic()
        listener.wait()
        assert time.monotonic() - start < 1.0


class AlwaysBusy(ListenerObject):
    """A listener that always answers -EBUSY and whose wait returns at once."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.tries = 0
        self.waits = 0

    def request(self) -> tuple[bytes, bytes, None, None, None, None]:
        self.tries += 1
        raise QteeError(-errno.EBUSY, "always busy")

    def wait(self) -> None:
        self.waits += 1


def test_listener_that_stays_busy_ends_in_error_busy(dev: Device, ta: TaClient) -> None:
    """§5.4 busy/wait rule end to end: -EBUSY reaches QTEE as ERROR_BUSY (otherwise QTEE
    would not wait and retry); QTEE gives up after MAX_BUSY_RETRIES rounds with BUSY."""
    reg = _RawRegistrar(dev)
    mem = reg.client.memory(4096)
    listener = AlwaysBusy(0x77, mem, TimeService().handle)
    try:
        reg.register(0x77, listener, mem)

        def script(world: SecureWorld) -> int:
            try:
                world.listeners.get(0x77).request(struct.pack("<I", 0x302))
            except QteeError as exc:
                return exc.result
            return 0

        assert ta.run(script) == Result.ERROR_BUSY
        assert listener.tries == MAX_BUSY_RETRIES == 50
        assert listener.waits == MAX_BUSY_RETRIES
        assert dev.world.listeners.ids() == [0x77]  # BUSY does not drop the listener
    finally:
        reg.register(0x77, None, None)
        mem.release()
        reg.close()


def test_failing_handler_is_an_error_for_the_ta(dev: Device, ta: TaClient) -> None:
    """§5.4 CListenerCBO request: a failing dispatch becomes Object_ERROR; the listener
    is free again afterwards and stays registered."""
    calls = []

    def handler(buf: bytes) -> bytes:
        calls.append(buf[:4])
        if len(calls) == 1:
            raise ValueError("dispatch failed")
        return TimeService(clock=lambda: CLOCK).handle(buf)

    def script(world: SecureWorld) -> int:
        try:
            time_call(world, tm.GetUtcSecRequest())
        except QteeError as exc:
            return exc.result
        return 0

    with Supplicant(dev, time_service=False) as sup:
        sup.add_listener(0xB, handler)
        assert ta.run(script) == Result.ERROR
        assert dev.world.listeners.ids() == [0xB]
        assert ta.run(lambda w: time_call(w, tm.GetUtcSecRequest())) == UTC_ANSWER
    assert len(calls) == 2


# --------------------------------------------------------------------------- defunct


@pytest.mark.qtee_close_releases  # the supplicant dies holding its registration
def test_listener_of_a_closed_context_is_defunct_and_dropped(dev: Device, ta: TaClient) -> None:
    """§5.4 / §6: the supplicant dies (its fd closes, nothing unregistered) while a TA's
    request is with its listener: the kernel's close completes the request DEFUNCT for
    the TA, and the registration ends with its owner's objects (issue 13 point 5); the
    next request finds no listener at all."""
    entered, go = threading.Event(), threading.Event()
    service = TimeService(clock=lambda: CLOCK)

    def slow(buf: bytes) -> bytes:
        entered.set()
        assert go.wait(10)
        return service.handle(buf)

    def script(world: SecureWorld) -> int:
        try:
            time_call(world, tm.GetUtcSecRequest())
        except QteeError as exc:
            return exc.result
        return 0

    reg = _RawRegistrar(dev)
    mem = reg.client.memory(20 * 1024)
    reg.register(0xB, ListenerObject(0xB, mem, slow), mem)
    mem.release()  # QTEE keeps its own reference to the region
    results: list[int] = []
    t = threading.Thread(target=lambda: results.append(ta.run(script)), daemon=True)
    closer = threading.Thread(target=reg.client.close, daemon=True)
    try:
        t.start()
        assert entered.wait(5)
        closer.start()  # joins the worker held in `slow` once `go` is set
        t.join(10)
        assert results == [Result.ERROR_DEFUNCT] and Result.ERROR_DEFUNCT == -90
        assert dev.world.listeners.ids() == []
    finally:
        go.set()
        t.join(10)
        closer.join(10)
    assert not t.is_alive() and not closer.is_alive()
    assert ta.run(script) == Result.ERROR_DEFUNCT


# --------------------------------------------------------------------------- TA autoload

UUID_RAW = bytes.fromhex("DAC902FD6C30C748A49CBBD827AE86EE")


def _load_embedded(c: Client, env: Any, name: bytes) -> Any:
    with c.open_service(env, APP_LOADER_UID) as loader:
        (ctrl,) = loader.invoke(2, name, OUT_OBJECT)
    return ctrl


def test_ta_autoload_by_uuid(dev: Device, tmp_path: Path) -> None:
    """§5.3 IAppLoader loadEmbedded + §5.4 TA autoload: QTEE asks the supplicant's
    IRequestTABuffer for ``<UUID>.mbn``; no such image, or no autoload registered at
    all, is EMBEDDED_IMAGE_NOT_FOUND (17)."""
    name = format_uuid(UUID_RAW)
    assert name == "FD02C9DA-306C-48C7-A49C-BBD827AE86EE"
    (tmp_path / f"{name}.mbn").write_bytes(ta_image(AUTOLOADED))
    c = Client(dev, workers=1)
    env = c.client_env()
    try:
        # No supplicant: no TA-autoload registration.
        with pytest.raises(QteeError) as exc:
            _load_embedded(c, env, UUID_RAW)
        assert exc.value.result == ERROR_EMBEDDED_IMAGE_NOT_FOUND

        with Supplicant(dev, ta_dirs=[tmp_path]):
            assert dev.world.listeners.ta_buffer is not None
            ctrl = _load_embedded(c, env, UUID_RAW)
            (app,) = ctrl.invoke(2, OUT_OBJECT)
            assert app.invoke(0, struct.pack("<II", 40, 2), Out(4)) == [struct.pack("<I", 42)]
            with pytest.raises(QteeError) as exc:
                _load_embedded(c, env, bytes(16))
            assert exc.value.result == ERROR_EMBEDDED_IMAGE_NOT_FOUND
            ctrl.invoke(1)  # unload
            app.release()
            ctrl.release()
            # Unloaded: the same UUID loads again.
            with _load_embedded(c, env, UUID_RAW) as ctrl2:
                ctrl2.invoke(1)
        assert dev.world.listeners.ta_buffer is None

        # A supplicant without TA dirs registers no autoload either.
        with Supplicant(dev):
            assert dev.world.listeners.ta_buffer is None
            with pytest.raises(QteeError) as exc:
                _load_embedded(c, env, UUID_RAW)
            assert exc.value.result == ERROR_EMBEDDED_IMAGE_NOT_FOUND
    finally:
        env.release()
        c.close()
    assert dev.leaks() == {}
