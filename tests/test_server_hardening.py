"""The device server and its client under hostile peers (issue 13, points 7-8).

* 7: ``query`` frames (info, trace) are refused unless the server was started with
  ``introspect=True`` (``qtee serve --introspect``); the CLI says so in one line.
* 8: the client checks each reply against its request (arg length, written regions,
  param blocks, the shm fd of a SHM_ALLOC) before writing anything: a lying server fails
  that call with EPROTO, writes nothing and loses the connection.

Fake servers are threads on a Unix socket in a ``mkdtemp`` directory (socket paths are
limited to 108 bytes).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import qtee
from objects import DriverError
from qtee import DeviceServer, uapi
from qtee.__main__ import main
from qtee._frames import (
    FrameDecoder,
    Hello,
    Ioctl,
    IoctlReply,
    Region,
    ShmFd,
    Welcome,
    encode,
)

REPO = Path(__file__).resolve().parent.parent

_BUF = struct.Struct("<QQ")
_PARAM = struct.Struct("<4Q")
_INVOKE_HEAD = struct.Struct("<QIII4x")
_SUPP_HEAD = struct.Struct("<II")
_UB_IN = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_INPUT
_UB_OUT = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_OUTPUT
_META_IN = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_INOUT | uapi.TEE_IOCTL_PARAM_ATTR_META


# ---------------------------------------------------------------------------- fixtures
def _eventually(cond: Callable[[], object], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return bool(cond())


@pytest.fixture
def sockdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="qtee-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def server(qtee_server: DeviceServer) -> Iterator[DeviceServer]:
    yield qtee_server
    assert _eventually(lambda: qtee_server.connections == 0)


class FakeServer:
    """One connection: welcomes the client, then ``script(peer)`` runs in a thread."""

    def __init__(self, path: str, script: Callable[[FakeServer], None]) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(4)
        self.script = script
        self.conn: socket.socket | None = None
        self.decoder = FrameDecoder(expect_increasing_seq=False)
        self.got: list[object] = []
        self.eof = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.conn, _ = self.listener.accept()
            self.conn.settimeout(10)
            hello = self.recv()
            assert isinstance(hello, Hello)
            self.send(Welcome(impl_id=uapi.TEE_IMPL_ID_QTEE, gen_caps=0x10, server="fake"))
            self.script(self)
        except BaseException as exc:
            self.error = exc

    def recv(self) -> object | None:
        """The next frame from the client (None at the end of the stream)."""
        assert self.conn is not None
        while (msg := self.decoder.next_message()) is None:
            try:
                data = self.conn.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                self.eof.set()
                return None
            self.decoder.feed(data)
        self.got.append(msg)
        return msg

    def recv_ioctl(self) -> Ioctl:
        while True:
            msg = self.recv()
            assert msg is not None, "the client hung up"
            if isinstance(msg, Ioctl):
                return msg

    def send(self, msg: Any, fd: int | None = None) -> None:
        assert self.conn is not None
        data = encode(msg)
        if fd is None:
            self.conn.sendall(data)
        else:
            try:
                socket.send_fds(self.conn, [data], [fd])
            finally:
                os.close(fd)

    def drain(self) -> None:
        """Read (and ignore) until the client hangs up."""
        while self.recv() is not None:
            pass

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.listener.close()
        self.thread.join(5)


# ============================================================================ point 7
def test_queries_are_refused_unless_the_server_introspects(server: DeviceServer) -> None:
    """By default a connection may not read the device's description or its trace (other
    connections' labels and calls): both queries fail EACCES naming --introspect, the
    trace hook stays unset, and the connection goes on working."""
    assert server.introspect is False
    ctx = qtee.connect(server.path).open()
    try:
        with pytest.raises(DriverError) as exc:
            ctx.info()
        assert exc.value.code == errno.EACCES and "--introspect" in str(exc.value)
        with pytest.raises(DriverError) as exc:
            ctx.stream_trace(lambda m: None)
        assert exc.value.code == errno.EACCES and "--introspect" in str(exc.value)
        assert server.device.trace_records is None
        arg = bytearray(uapi.VersionData.SIZE)
        ctx.ioctl(uapi.TEE_IOC_VERSION, arg)  # still served
        assert uapi.VersionData.unpack(arg).impl_id == uapi.TEE_IMPL_ID_QTEE
    finally:
        ctx.close()


def test_an_introspecting_server_answers_and_acknowledges_the_trace(sockdir: str) -> None:
    with DeviceServer(os.path.join(sockdir, "s"), introspect=True) as srv:
        ctx = qtee.connect(srv.path).open()
        try:
            assert ctx.info()["impl_id"] == uapi.TEE_IMPL_ID_QTEE
            got: list[dict[str, Any]] = []
            ctx.stream_trace(got.append)  # returns once the server streams
            assert srv.device.trace_records is not None
            with pytest.raises(DriverError) as exc:  # one stream per connection
                ctx.stream_trace(got.append)
            assert exc.value.code == errno.EALREADY
        finally:
            ctx.close()
        assert _eventually(lambda: srv.connections == 0)
        assert srv.device.trace_records is None
        assert srv.device.leaks() == {}


@pytest.mark.parametrize("verb", ["info", "trace"])
def test_cli_against_a_server_without_introspect_is_one_line(
    server: DeviceServer, verb: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [verb, "--connect", server.path] + (["--duration", "5"] if verb == "trace" else [])
    assert main(argv) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == (
        f"qtee {verb}: the server at {server.path} does not allow introspection "
        "(start it with qtee serve --introspect)\n"
    )


def test_serve_introspect_flag(sockdir: str) -> None:
    """``qtee serve --introspect`` is the opt-in; without it ``qtee info`` is refused."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for flags, rc in (([], 1), (["--introspect"], 0)):
        path = os.path.join(sockdir, f"s{len(flags)}")
        proc = subprocess.Popen(
            [sys.executable, "-m", "qtee", "serve", "--socket", path, *flags],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().startswith("serving on")
            info = subprocess.run(
                [sys.executable, "-m", "qtee", "info", "--connect", path],
                check=False,
                capture_output=True,
                text=True,
                env=env,
                cwd=REPO,
                timeout=60,
            )
            assert info.returncode == rc, info.stderr
            if rc:
                assert "--introspect" in info.stderr and len(info.stderr.splitlines()) == 1
            else:
                assert "open fds:" in info.stdout
        finally:
            proc.terminate()
            out, _ = proc.communicate(timeout=30)
        assert "tables: empty" in out


# ============================================================================ point 8
class _Call:
    """An OBJECT_INVOKE argument in this process's memory: a read-only input buffer, an
    output buffer, and a victim buffer the call has no business writing."""

    def __init__(self, device: qtee.RemoteDevice) -> None:
        mem = device.memory
        self.mem = mem
        self.inp = b"input-bytes!"
        self.out = bytearray(b"o" * 16)
        self.victim = bytearray(b"v" * 64)
        self.in_addr = mem.pin(self.inp)
        self.out_addr = mem.pin(self.out)
        self.victim_addr = mem.pin(self.victim)
        params = [
            (_UB_IN, self.in_addr, len(self.inp), 0),
            (_UB_OUT, self.out_addr, len(self.out), 0),
        ]
        self.block = bytearray(
            _INVOKE_HEAD.pack(7, 0, 0, 2) + b"".join(_PARAM.pack(*p) for p in params)
        )
        self.block_addr = mem.pin(self.block)
        self.arg = bytearray(_BUF.pack(self.block_addr, len(self.block)))
        self.before = self.snapshot()

    def snapshot(self) -> tuple[bytes, ...]:
        return bytes(self.arg), bytes(self.block), bytes(self.out), bytes(self.victim)

    def block_with(self, *, size: int | None = None, addr: int | None = None) -> bytes:
        """The param block as a server writes it back, with the output param changed."""
        block = bytearray(self.block)
        attr, a, b, c = _PARAM.unpack_from(block, _INVOKE_HEAD.size + 32)
        _PARAM.pack_into(
            block,
            _INVOKE_HEAD.size + 32,
            attr,
            a if addr is None else addr,
            b if size is None else size,
            c,
        )
        return bytes(block)


def _w(addr: int, data: bytes) -> Region:
    return Region(addr=addr, data=data, writable=True)


#: (name, the lying reply for the request and the call) -- each writes outside what the
#: call asked for, or says what the request does not allow.
LIES: list[tuple[str, Callable[[Ioctl, _Call], IoctlReply]]] = [
    (
        "write-to-an-unsent-buffer",
        lambda req, c: IoctlReply(seq=req.seq, arg=req.arg, written=(_w(c.victim_addr, b"X" * 8),)),
    ),
    (
        "write-to-an-input-buffer",
        lambda req, c: IoctlReply(seq=req.seq, arg=req.arg, written=(_w(c.in_addr, b"X" * 4),)),
    ),
    (
        "write-past-the-output-buffer",
        lambda req, c: IoctlReply(seq=req.seq, arg=req.arg, written=(_w(c.out_addr, b"X" * 64),)),
    ),
    (
        "arg-of-another-length",
        lambda req, c: IoctlReply(seq=req.seq, arg=req.arg + b"\x00" * 8),
    ),
    (
        "arg-pointing-elsewhere",
        lambda req, c: IoctlReply(seq=req.seq, arg=_BUF.pack(c.victim_addr, 64)),
    ),
    (
        "output-size-over-its-capacity",
        lambda req, c: IoctlReply(
            seq=req.seq, arg=req.arg, written=(_w(c.block_addr, c.block_with(size=4096)),)
        ),
    ),
    (
        "output-buffer-moved",
        lambda req, c: IoctlReply(
            seq=req.seq, arg=req.arg, written=(_w(c.block_addr, c.block_with(addr=c.victim_addr)),)
        ),
    ),
]


@pytest.mark.parametrize("lie", [lie for _, lie in LIES], ids=[name for name, _ in LIES])
def test_a_lying_reply_fails_the_call_and_writes_nothing(
    sockdir: str, lie: Callable[[Ioctl, _Call], IoctlReply]
) -> None:
    path = os.path.join(sockdir, "fake")
    holder: list[_Call] = []

    def script(peer: FakeServer) -> None:
        req = peer.recv_ioctl()
        peer.send(lie(req, holder[0]))
        peer.drain()

    fake = FakeServer(path, script)
    try:
        device = qtee.connect(path)
        ctx = device.open()
        call = _Call(device)
        holder.append(call)
        with pytest.raises(DriverError) as exc:
            ctx.ioctl(uapi.TEE_IOC_OBJECT_INVOKE, call.arg)
        assert exc.value.code == errno.EPROTO, exc.value
        assert call.snapshot() == call.before  # nothing written
        assert fake.eof.wait(5)  # the connection is closed
        with pytest.raises(DriverError) as exc:
            ctx.ioctl(uapi.TEE_IOC_VERSION, bytearray(12))
        assert exc.value.code == errno.EBADF
        ctx.close()
    finally:
        fake.close()
    assert fake.error is None, fake.error


def test_an_honest_reply_is_written(sockdir: str) -> None:
    """The same fake, telling the truth: the output and the param block are written."""
    path = os.path.join(sockdir, "fake")
    holder: list[_Call] = []

    def script(peer: FakeServer) -> None:
        req = peer.recv_ioctl()
        c = holder[0]
        peer.send(
            IoctlReply(
                seq=req.seq,
                arg=req.arg,
                written=(
                    _w(c.block_addr, c.block_with(size=5)),
                    _w(c.out_addr, b"hello" + bytes(11)),
                ),
            )
        )
        peer.drain()

    fake = FakeServer(path, script)
    try:
        device = qtee.connect(path)
        ctx = device.open()
        call = _Call(device)
        holder.append(call)
        ctx.ioctl(uapi.TEE_IOC_OBJECT_INVOKE, call.arg)
        assert bytes(call.out[:5]) == b"hello" and bytes(call.victim) == b"v" * 64
        assert _PARAM.unpack_from(call.block, _INVOKE_HEAD.size + 32)[2] == 5
        ctx.close()
    finally:
        fake.close()
    assert fake.error is None, fake.error


def _memfd(size: int) -> int:
    fd = os.memfd_create("fake-shm")
    os.ftruncate(fd, size)
    return fd


def _shm_reply(req: Ioctl, shm_id: int, size: int) -> IoctlReply:
    return IoctlReply(seq=req.seq, arg=uapi.ShmAllocData(size, 0, shm_id).pack())


#: (name, script after the SHM_ALLOC request: what the fake sends)
SHM_LIES: list[tuple[str, Callable[[FakeServer, Ioctl], None]]] = [
    ("reply-without-an-fd", lambda p, req: p.send(_shm_reply(req, 1, 4096))),
    (
        "id-differs-from-the-fd-frame",
        lambda p, req: (
            p.send(ShmFd(seq=req.seq, id=1, size=4096), _memfd(4096)),
            p.send(_shm_reply(req, 2, 4096)),
        ),
    ),
    (
        "size-differs-from-the-request",
        lambda p, req: (
            p.send(ShmFd(seq=req.seq, id=1, size=8192), _memfd(8192)),
            p.send(_shm_reply(req, 1, 8192)),
        ),
    ),
    (
        "fd-for-a-failed-alloc",
        lambda p, req: (
            p.send(ShmFd(seq=req.seq, id=1, size=4096), _memfd(4096)),
            p.send(IoctlReply(seq=req.seq, errno=errno.ENOMEM)),
        ),
    ),
]


@pytest.mark.parametrize("lie", [s for _, s in SHM_LIES], ids=[n for n, _ in SHM_LIES])
def test_a_lying_shm_alloc_fails_with_eproto_and_maps_nothing(
    sockdir: str, lie: Callable[[FakeServer, Ioctl], None]
) -> None:
    path = os.path.join(sockdir, "fake")

    def script(peer: FakeServer) -> None:
        req = peer.recv_ioctl()
        with contextlib.suppress(OSError):  # the client may hang up at a lying shm frame
            lie(peer, req)
        peer.drain()

    fake = FakeServer(path, script)
    fds_before = len(os.listdir("/proc/self/fd"))
    try:
        ctx = qtee.connect(path).open()
        arg = bytearray(uapi.ShmAllocData(4096).pack())
        with pytest.raises(DriverError) as exc:
            ctx.ioctl(uapi.TEE_IOC_SHM_ALLOC, arg)
        assert exc.value.code == errno.EPROTO, exc.value
        assert arg == uapi.ShmAllocData(4096).pack()
        assert ctx._maps == {}
        assert fake.eof.wait(5)
        ctx.close()
    finally:
        fake.close()
    assert fake.error is None, fake.error
    assert _eventually(lambda: len(os.listdir("/proc/self/fd")) <= fds_before)


def test_a_shm_frame_for_another_call_fails_that_call(sockdir: str) -> None:
    """A shm fd frame naming a VERSION call (or no call at all) is a lie: EPROTO."""
    path = os.path.join(sockdir, "fake")

    def script(peer: FakeServer) -> None:
        req = peer.recv_ioctl()
        peer.send(ShmFd(seq=req.seq, id=1, size=64), _memfd(64))
        with contextlib.suppress(OSError):  # the client may have hung up at the shm frame
            peer.send(IoctlReply(seq=req.seq, arg=bytes(12)))
        peer.drain()

    fake = FakeServer(path, script)
    try:
        ctx = qtee.connect(path).open()
        with pytest.raises(DriverError) as exc:
            ctx.ioctl(uapi.TEE_IOC_VERSION, bytearray(12))
        assert exc.value.code == errno.EPROTO
        assert ctx._maps == {}
        ctx.close()
    finally:
        fake.close()
    assert fake.error is None, fake.error


def test_an_unsolicited_shm_frame_closes_the_connection(sockdir: str) -> None:
    path = os.path.join(sockdir, "fake")
    go = threading.Event()

    def script(peer: FakeServer) -> None:
        peer.recv_ioctl()  # a call in flight, never answered
        go.wait(5)
        peer.send(ShmFd(seq=999, id=3, size=64), _memfd(64))
        peer.drain()

    fake = FakeServer(path, script)
    try:
        ctx = qtee.connect(path).open()
        got: list[BaseException] = []

        def call() -> None:
            try:
                ctx.ioctl(uapi.TEE_IOC_VERSION, bytearray(12))
            except BaseException as exc:
                got.append(exc)

        t = threading.Thread(target=call)
        t.start()
        time.sleep(0.1)
        go.set()
        t.join(5)
        assert isinstance(got[0], DriverError) and got[0].code == errno.EBADF
        assert ctx._maps == {}
        ctx.close()
    finally:
        fake.close()
