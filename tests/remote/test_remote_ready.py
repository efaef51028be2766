"""What a waiter outside Python needs from a connection (issue 14 item 3, over a socket).

libqcomtee cancels its supplicant thread while it waits in SUPPL_RECV, so the C bridge
never lets a thread block in Python: it waits in C and takes work with the model's
non-blocking RECV.  Over a device server that is ``RemoteContext.recv_nowait`` (EAGAIN at
once when nothing is queued) and ``RemoteContext.on_ready`` (called from the reader
thread when the server says a request was queued on the fd, and when the connection is
lost or closed; a ``watch`` asks the server for those ``ready`` frames, and a connection
that never asks gets none).  ``RemoteDevice(path, memory=ProcessMemory())`` lets C
pointers (raw process memory) be the client's addresses.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct
import threading
import time
import uuid
from pathlib import Path

import pytest

import qtee
from objects import DriverError, UsageError
from qtee import OUT_OBJECT, Device, DeviceServer, Out, ProcessMemory, uapi
from qtee._remote.frames import (
    Answer,
    FrameDecoder,
    Hello,
    Ioctl,
    IoctlReply,
    Ready,
    Region,
    Watch,
    Welcome,
    encode,
)
from qtee.addrspace import CheckedMemory
from qtee.client import _Credentials
from qtee.secure import QteeRoot, SecureWorld
from tests import _optee_tas as tas
from tests._helpers import META_OUT, OBJ_IN, UB_IN, UB_OUT, USER, buf_arg, eventually, recv_block
from tests._tas import Echoer, Through

RELEASE = 0xFFFF


THROUGH = pytest.mark.qtee_ta("ready.through", Through)  # op 0 calls back, op 1 adds


def _queue_release(ctx: object, mem: CheckedMemory, uid: int = 42) -> None:
    """Hand the root a callback object it does not keep: QTEE releases it, and a release
    notification is queued on this fd (root op 3 is not served)."""
    block = bytearray(
        uapi.pack_arg(
            uapi.ObjectInvokeArg(uapi.TEE_OBJREF_NULL, 3, 0, 1), [uapi.Param(OBJ_IN, uid, USER)]
        )
    )
    ctx.ioctl(uapi.TEE_IOC_OBJECT_INVOKE, buf_arg(mem, block))  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- recv_nowait
def test_recv_nowait_over_the_socket_is_the_models(qtee_server: DeviceServer) -> None:
    """EAGAIN at once with nothing queued and nothing written; a queued request is
    received with the same bytes as in process."""
    local = Device(SecureWorld(QteeRoot()), memory=CheckedMemory())
    assert isinstance(local.memory, CheckedMemory)
    remote = qtee.connect(qtee_server.path)
    assert isinstance(remote.memory, CheckedMemory)
    got = []
    for dev, mem in ((local, local.memory), (remote, remote.memory)):
        ctx = dev.open()
        block = recv_block(mem.map(bytearray(64)), 64, 2)
        before = bytes(block)
        start = time.monotonic()
        with pytest.raises(DriverError) as exc:
            ctx.recv_nowait(buf_arg(mem, block))
        assert exc.value.errno == errno.EAGAIN and bytes(block) == before
        assert time.monotonic() - start < 1
        _queue_release(ctx, mem)
        assert ctx.recv_nowait(buf_arg(mem, block)) == 0
        got.append(bytes(block))
        ctx.close()
    assert got[0] == got[1]
    head = uapi.SuppRecvArg.unpack(got[1])
    assert (head.func, head.num_params) == (RELEASE, 1)
    assert eventually(lambda: qtee_server.device.leaks() == {})


def test_recv_nowait_on_a_lost_connection_is_ebadf(qtee_server: DeviceServer) -> None:
    device = qtee.connect(qtee_server.path)
    ctx = device.open()
    qtee_server.stop()
    assert eventually(lambda: ctx.lost)
    with pytest.raises(DriverError) as exc:
        ctx.recv_nowait(bytearray(16))
    assert exc.value.errno == errno.EBADF


# ----------------------------------------------------------------------------- on_ready
def test_on_ready_fires_when_a_request_is_queued_and_at_the_end(qtee_server: DeviceServer) -> None:
    device = qtee.connect(qtee_server.path)
    ctx = device.open()
    calls: list[float] = []
    ready = threading.Event()

    def hook() -> None:
        calls.append(time.monotonic())
        ready.set()

    ctx.on_ready = hook
    assert ctx.on_ready is hook
    assert not ready.wait(0.2)  # nothing queued: no call
    _queue_release(ctx, device.memory)  # type: ignore[arg-type]
    assert ready.wait(5)
    ready.clear()
    block = recv_block(device.memory.pin(bytearray(64)), 64, 2)
    assert ctx.recv_nowait(buf_arg(device.memory, block)) == 0  # type: ignore[arg-type]
    n = len(calls)
    qtee_server.stop()  # the connection is lost: one more call, and the fd is gone
    assert ready.wait(5) and len(calls) == n + 1 and ctx.lost
    with pytest.raises(DriverError):
        ctx.recv_nowait(buf_arg(device.memory, block))  # type: ignore[arg-type]
    later: list[int] = []
    ctx.on_ready = lambda: later.append(1)  # set after the loss: called at once
    assert later == [1]
    ctx.close()


def test_on_ready_fires_at_close_and_none_stops_it(qtee_server: DeviceServer) -> None:
    device = qtee.connect(qtee_server.path)
    ctx = device.open()
    calls: list[int] = []
    ctx.on_ready = lambda: calls.append(1)
    ctx.close()
    assert calls == [1]
    other = device.open()
    other.on_ready = lambda: calls.append(2)
    other.on_ready = None
    _queue_release(other, device.memory)  # type: ignore[arg-type]
    time.sleep(0.2)
    other.close()
    assert calls == [1]
    with pytest.raises(UsageError):
        other.on_ready = 5  # type: ignore[assignment]


def test_a_request_queued_before_the_watch_is_told(qtee_server: DeviceServer) -> None:
    device = qtee.connect(qtee_server.path)
    ctx = device.open()
    _queue_release(ctx, device.memory)  # type: ignore[arg-type]
    ready = threading.Event()
    ctx.on_ready = ready.set
    assert ready.wait(5)
    ctx.close()


def _frames(sock: socket.socket, dec: FrameDecoder, seconds: float) -> list[object]:
    out: list[object] = []
    sock.settimeout(0.05)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            data = sock.recv(1 << 16)
        except TimeoutError:
            continue
        if not data:
            break
        dec.feed(data)
        out.extend(dec)
    return out


def test_no_ready_frames_unless_watched(qtee_server: DeviceServer) -> None:
    """A connection that never sends ``watch`` gets no ``ready`` frame when a request is
    queued on its fd; after a ``watch`` (answered ``watching``) it does."""
    mem = CheckedMemory()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(qtee_server.path)
    dec = FrameDecoder(expect_increasing_seq=False)
    try:
        sock.sendall(encode(Hello(client="raw")))
        (welcome,) = _frames(sock, dec, 0.3)
        assert isinstance(welcome, Welcome)
        block = bytearray(
            uapi.pack_arg(
                uapi.ObjectInvokeArg(uapi.TEE_OBJREF_NULL, 3, 0, 1), [uapi.Param(OBJ_IN, 7, USER)]
            )
        )
        addr = mem.map(block)
        region = Region(addr=addr, data=bytes(block), writable=True)
        arg = uapi.BufData(addr, len(block)).pack()
        sock.sendall(
            encode(Ioctl(seq=1, cmd=uapi.TEE_IOC_OBJECT_INVOKE, arg=arg, regions=(region,)))
        )
        got = _frames(sock, dec, 0.5)
        assert [type(m) for m in got] == [IoctlReply]  # the release is queued: no ready
        sock.sendall(encode(Watch(seq=2)))
        got = _frames(sock, dec, 0.5)
        assert got == [Answer(seq=2, data={"watching": True}), Ready()]
    finally:
        sock.close()
    assert eventually(lambda: qtee_server.connections == 0)


# ----------------------------------------------------------------------------- workers
def _raw_worker(
    ctx: qtee.RemoteContext,
    mem: CheckedMemory,
    client: qtee.Client,
    woken: threading.Event,
    stop: threading.Event,
    served: list[int],
) -> None:
    """Wait for the event the hook sets, take a request with recv_nowait, dispatch it to
    the exported object (buffers in and out only) and answer with SUPPL_SEND; a release
    notification is not answered."""
    scratch = bytearray(4096)
    base = mem.map(scratch)
    block = bytearray(8 + 32 * 4)
    arg = buf_arg(mem, block)
    while not stop.is_set():
        block[:] = recv_block(base, len(scratch), 4)
        try:
            ctx.recv_nowait(arg)
        except DriverError as exc:
            if exc.errno != errno.EAGAIN:
                return
            woken.clear()
            try:  # a request queued between the EAGAIN and the clear: no wake-up lost
                ctx.recv_nowait(arg)
            except DriverError as again:
                if again.errno != errno.EAGAIN:
                    return
                woken.wait(0.5)
                continue
        head = uapi.SuppRecvArg.unpack(block)
        params = uapi.unpack_params(block, uapi.SuppRecvArg.SIZE, head.num_params)
        uid, req = params[0].a, params[0].b
        if head.func == RELEASE:
            client.exports.unexport(uid)
            continue
        obj = client.exports.get(uid)
        assert obj is not None
        ib = tuple(bytes(scratch[p.a - base : p.a - base + p.b]) for p in params if p.attr == UB_IN)
        ob = tuple(p.b for p in params if p.attr == UB_OUT)
        res = obj.dispatch(head.func, ib, ob, (), 0)
        outs = iter(res.ob)
        reply = [uapi.Param(META_OUT, req)]
        keep: list[bytearray] = []
        for p in params[1:]:
            if p.attr == UB_OUT and not res.result:
                keep.append(bytearray(next(outs)) or bytearray(1))
                reply.append(uapi.Param(UB_OUT, mem.map(keep[-1]), len(keep[-1])))
            else:
                reply.append(p)
        if res.result:
            reply = reply[:1]
        send = bytearray(
            uapi.pack_arg(uapi.SuppSendArg(res.result & 0xFFFF_FFFF, len(reply)), reply)
        )
        ctx.ioctl(uapi.TEE_IOC_SUPPL_SEND, buf_arg(mem, send))
        if isinstance(obj, Echoer):
            served.append(len(ib[0]))


@THROUGH
def test_four_raw_workers_serve_callbacks(qtee_server: DeviceServer) -> None:
    """Four workers, each looping "wait for the event on_ready sets, recv_nowait, SEND",
    serve 8 concurrent callers x 25 callbacks: every answer right, no thread ever
    blocked in SUPPL_RECV, nothing left in the server."""
    device = qtee.connect(qtee_server.path)
    client = qtee.Client(device, workers=0)  # the raw workers serve the credentials too
    ctx = client.ctx
    assert isinstance(ctx, qtee.RemoteContext) and isinstance(device.memory, CheckedMemory)
    woken = threading.Event()
    ctx.on_ready = woken.set
    stop = threading.Event()
    served: list[int] = []
    workers = [
        threading.Thread(target=_raw_worker, args=(ctx, device.memory, client, woken, stop, served))
        for _ in range(4)
    ]
    for t in workers:
        t.start()
    root = qtee.ObjRef(client, uapi.TEE_OBJREF_NULL)
    cred = _Credentials(qtee.Credentials.default().encode())
    (env,) = root.invoke(2, cred, OUT_OBJECT)  # client_env, its credentials served raw
    loader = client.open_service(env, 3)
    (ctrl,) = loader.invoke(0, qtee.ta_image("ready.through"), OUT_OBJECT)
    (app,) = ctrl.invoke(2, OUT_OBJECT)
    errors: list[BaseException] = []

    def caller(k: int) -> None:
        cb = Echoer(b"echo")
        try:
            for i in range(25):
                data = f"{k}:{i}".encode() * (1 + i % 3)
                (got,) = app.invoke(0, data, cb, Out(len(data) + 64))
                assert got == b"echo" + data[::-1], got
        except BaseException as exc:
            errors.append(exc)

    callers = [threading.Thread(target=caller, args=(k,)) for k in range(8)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(60)
    assert not errors, errors[0]
    # A worker counts its answer after SUPPL_SEND returns, which may be after the caller
    # it answered has already seen the reply.
    assert eventually(lambda: len(served) == 200), len(served)
    for ref in (app, ctrl, loader, env):
        ref.release()
    assert eventually(lambda: client.exported() == 0)  # release notifications, taken too
    stop.set()
    woken.set()
    for t in workers:
        t.join(5)
    client.close()
    assert eventually(lambda: qtee_server.device.leaks() == {})


# ----------------------------------------------------------------------------- ProcessMemory
@THROUGH
def test_process_memory_with_ctypes_buffers(qtee_server: DeviceServer) -> None:
    """``RemoteDevice(path, memory=ProcessMemory())``: the argument block and the buffers
    are plain ctypes buffers named by their real addresses, nothing pinned."""
    device = qtee.connect(qtee_server.path, memory=ProcessMemory())
    assert isinstance(device.memory, ProcessMemory)
    client = qtee.Client(device, workers=1)
    try:
        env = client.client_env()
        loader = client.open_service(env, 3)
        (ctrl,) = loader.invoke(0, qtee.ta_image("ready.through"), OUT_OBJECT)
        (app,) = ctrl.invoke(2, OUT_OBJECT)
        inp = ctypes.create_string_buffer(struct.pack("<II", 40, 2), 8)
        out = ctypes.create_string_buffer(4)
        block = ctypes.create_string_buffer(
            uapi.pack_arg(
                uapi.ObjectInvokeArg(app.id, 1, 0, 2),
                [
                    uapi.Param(UB_IN, ctypes.addressof(inp), 8),
                    uapi.Param(UB_OUT, ctypes.addressof(out), 4),
                ],
            ),
            24 + 64,
        )
        arg = ctypes.create_string_buffer(uapi.BufData(ctypes.addressof(block), 88).pack(), 16)
        client.ctx.ioctl(uapi.TEE_IOC_OBJECT_INVOKE, memoryview(arg).cast("B"))
        head = uapi.ObjectInvokeArg.unpack(block.raw)
        assert head.ret == 0 and struct.unpack("<I", out.raw)[0] == 42
        assert uapi.Param.unpack(block.raw, 24 + 32).b == 4
        with pytest.raises(DriverError) as exc:  # an unmapped pointer faults in the server
            bad = uapi.BufData(0x10, 88).pack()
            client.ctx.ioctl(uapi.TEE_IOC_OBJECT_INVOKE, bytearray(bad))
        assert exc.value.errno == errno.EFAULT
        for ref in (app, ctrl, loader, env):
            ref.release()
    finally:
        client.close()
    assert eventually(lambda: qtee_server.device.leaks() == {})


def test_process_memory_registered_windows(tmp_path: Path) -> None:
    """OP-TEE over ProcessMemory: a ctypes buffer registered with SHM_REGISTER; the
    memref windows an INVOKE names cross, and what the TA wrote comes back in place."""
    tas.install()
    try:
        with DeviceServer(tmp_path / "o", tee="optee") as srv:
            device = qtee.connect(srv.path, memory=ProcessMemory())
            ctx = device.open()
            buf = ctypes.create_string_buffer(b"abcdefgh", 8)
            reg = bytearray(uapi.ShmRegisterData(ctypes.addressof(buf), 8).pack())
            ctx.ioctl(uapi.TEE_IOC_SHM_REGISTER, reg)
            shm_id = uapi.ShmRegisterData.unpack(reg).id
            open_ = ctypes.create_string_buffer(
                struct.pack("<16s16s6I", tas.SAMPLE_UUID.bytes, bytes(16), 0, 0, 0, 0, 0, 4)
                + bytes(128),
                56 + 128,
            )
            ctx.ioctl(
                uapi.TEE_IOC_OPEN_SESSION,
                bytearray(uapi.BufData(ctypes.addressof(open_), 184).pack()),
            )
            session, ret = struct.unpack_from("<2I", open_.raw, 40)
            assert ret == 0
            inv = ctypes.create_string_buffer(
                struct.pack("<6I", tas.BUMP, session, 0, 0, 0, 4)
                + struct.pack("<4Q", 7, 2, 3, shm_id)
                + bytes(96),
                24 + 128,
            )
            ctx.ioctl(
                uapi.TEE_IOC_INVOKE, bytearray(uapi.BufData(ctypes.addressof(inv), 152).pack())
            )
            assert struct.unpack_from("<I", inv.raw, 12)[0] == 0
            assert buf.raw == b"abdeffgh"  # bytes 2..4 bumped by the TA, the rest as it was
            ctx.shm_free(shm_id)
            ctx.close()
            assert eventually(lambda: srv.device.leaks() == {})
    finally:
        tas.uninstall()


def test_on_ready_on_the_optee_supplicant_fd(tmp_path: Path) -> None:
    """tee-supplicant's fd over the socket: a TA that needs LOAD_TA queues an RPC, the
    hook fires, recv_nowait takes it; the fd's end fires it again."""
    tas.install()
    try:
        with DeviceServer(tmp_path / "o", tee="optee") as srv:
            device = qtee.connect(srv.path)
            supp = device.open_supplicant()
            ready = threading.Event()
            supp.on_ready = ready.set
            assert not ready.wait(0.2)
            opened: list[object] = []

            def opener() -> None:
                from qtee.gp import TeecContext, TeecError

                try:
                    with TeecContext(qtee.connect(srv.path)) as ctx:
                        ctx.open_session(uuid.UUID(int=99))
                except TeecError as exc:
                    opened.append(exc.code)

            t = threading.Thread(target=opener)
            t.start()
            assert ready.wait(5)
            block = bytearray(
                struct.pack("<2I", 0, 3) + struct.pack("<4Q", 0x100, 0, 0, 0) + bytes(64)
            )
            arg = bytearray(uapi.BufData(device.memory.pin(block), len(block)).pack())  # type: ignore[attr-defined]
            assert supp.recv_nowait(arg) == 0
            func, num = struct.unpack_from("<2I", block)
            assert (func, num) == (0, 3)  # LOAD_TA: META, value, memref
            ready.clear()
            supp.close()  # received, never answered: the open fails COMMUNICATION
            assert ready.is_set()
            t.join(10)
            assert opened == [0xFFFF000E]
    finally:
        tas.uninstall()
