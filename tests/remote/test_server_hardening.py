"""The device server and its client under hostile peers (issue 13, points 7-11).

* 7: ``query`` frames (info, trace) are refused unless the server was started with
  ``introspect=True`` (``qtee serve --introspect``); the CLI says so in one line.
* 8: the client checks each reply against its request (arg length, written regions,
  param blocks, the shm fd of a SHM_ALLOC) before writing anything: a lying server fails
  that call with EPROTO, writes nothing and loses the connection.
* 9: one connection cannot take unbounded server threads (blocked SUPPL_RECVs and request
  threads are capped, past the cap a call is answered EBUSY), and a failure to start a
  thread kills no loop.
* 10: accept failures (EMFILE) make the accept loop back off, not stop.
* 11: a call other than SUPPL_RECV has a deadline (``call_timeout``): a silent or wedged
  server fails it with ETIMEDOUT and the connection closes; the deadline stands still
  while the call waits on a callback, and restarts when the callback is answered.

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
from objects import DriverError, QteeError
from qtee import OUT_OBJECT, DeviceServer, NsObject, Out, op, uapi
from qtee.__main__ import main
from qtee._remote.frames import (
    Bye,
    FrameDecoder,
    Hello,
    Ioctl,
    IoctlReply,
    Region,
    ShmFd,
    Welcome,
    encode,
)
from tests._helpers import eventually
from tests._paths import REPO
from tests._tas import Sleeper

_BUF = struct.Struct("<QQ")
_PARAM = struct.Struct("<4Q")
_INVOKE_HEAD = struct.Struct("<QIII4x")
_SUPP_HEAD = struct.Struct("<II")
_UB_IN = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_INPUT
_UB_OUT = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_OUTPUT
_META_IN = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_INOUT | uapi.TEE_IOCTL_PARAM_ATTR_META


# ---------------------------------------------------------------------------- TAs
class Slow(qtee.TrustedApp):
    """op 0: calls ``cb`` op 1 (which sleeps), then sleeps ``after`` seconds itself;
    op 1: sleeps without any callback; op 2: adds."""

    @op(0, ib=(8,), io=1)
    def call_back_then_sleep(self, after: bytes, cb: NsObject) -> None:
        res = cb.invoke(1)
        if res.result:
            raise QteeError(res.result)
        time.sleep(struct.unpack("<d", after)[0])

    @op(1, ib=(8,))
    def sleep(self, seconds: bytes) -> None:
        time.sleep(struct.unpack("<d", seconds)[0])

    @op(2, ib=(8,), ob=(4,))
    def add(self, pair: bytes) -> bytes:
        a, b = struct.unpack("<II", pair)
        return struct.pack("<I", (a + b) & 0xFFFF_FFFF)


SLOW = pytest.mark.qtee_ta("hardening.slow", Slow)


def _load(client: qtee.Client, name: str = "hardening.slow") -> list[qtee.ObjRef]:
    """env, loader, controller, app (release in reverse)."""
    env = client.client_env()
    loader = client.open_service(env, 3)
    (ctrl,) = loader.invoke(0, qtee.ta_image(name), OUT_OBJECT)
    (app,) = ctrl.invoke(2, OUT_OBJECT)
    return [env, loader, ctrl, app]


def _release(refs: list[qtee.ObjRef]) -> None:
    for ref in reversed(refs):
        ref.release()


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture
def sockdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="qtee-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def server(qtee_server: DeviceServer) -> Iterator[DeviceServer]:
    yield qtee_server
    assert eventually(lambda: qtee_server.connections == 0)


def _first_talker(listener: socket.socket, decoder: FrameDecoder) -> socket.socket:
    """The first connection that sends something (its bytes fed to ``decoder``): the ones
    closed unused before it are ``qtee.connect`` trying the path."""
    while True:
        conn, _ = listener.accept()
        conn.settimeout(10)
        try:
            data = conn.recv(1 << 16)
        except OSError:
            data = b""
        if data:
            decoder.feed(data)
            return conn
        conn.close()


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
            self.conn = _first_talker(self.listener, self.decoder)
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
        assert eventually(lambda: srv.connections == 0)
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
    assert eventually(lambda: len(os.listdir("/proc/self/fd")) <= fds_before)


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


# ============================================================================ point 9
def _raw(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    s.sendall(encode(Hello(client="raw")))
    return s


def _recv_ioctl(seq: int, base: int = 0x10_0000) -> bytes:
    """A SUPPL_RECV frame with its block and scratch buffer as regions."""
    block_addr, scratch_addr, size = base, base + 0x1000, 256
    block = _SUPP_HEAD.pack(0, 2) + _PARAM.pack(_META_IN, scratch_addr, size, 0) + bytes(32)
    return encode(
        Ioctl(
            seq=seq,
            cmd=uapi.TEE_IOC_SUPPL_RECV,
            arg=_BUF.pack(block_addr, len(block)),
            regions=(
                Region(addr=block_addr, data=block, writable=True),
                Region(addr=scratch_addr, data=bytes(size), writable=True),
            ),
        )
    )


def _read_frames(s: socket.socket, dec: FrameDecoder, want: int, timeout: float) -> list[object]:
    got: list[object] = []
    s.settimeout(0.2)
    end = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < end:
        got.extend(dec)
        if len(got) >= want:
            break
        try:
            data = s.recv(1 << 16)
        except TimeoutError:
            continue
        if not data:
            break
        dec.feed(data)
    return got


def _conn_threads(server: DeviceServer) -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("conn-") and t.is_alive())


def test_a_recv_flood_parks_the_recv_limit_and_takes_one_thread(server: DeviceServer) -> None:
    """300 SUPPL_RECVs on one connection: RECV_LIMIT of them wait, parked for the
    connection's one receiver thread (no thread each), the rest are answered EBUSY at once;
    another client is served throughout; the hang-up frees every thread."""
    import qtee._remote.server

    limit = getattr(qtee._remote.server, "RECV_LIMIT", 64)  # (the name is new with the limit)
    before = _conn_threads(server)
    s = _raw(server.path)
    dec = FrameDecoder(expect_increasing_seq=False)
    try:
        n = 300
        s.sendall(b"".join(_recv_ioctl(seq) for seq in range(1, n + 1)))
        got = _read_frames(s, dec, 1 + n - limit, timeout=10)
        assert isinstance(got[0], Welcome)
        replies = [m for m in got[1:] if isinstance(m, IoctlReply)]
        assert len(replies) == n - limit
        assert {r.errno for r in replies} == {errno.EBUSY}
        assert _conn_threads(server) - before <= 3  # the reader, the receiver, one follower
        with qtee.Client(qtee.connect(server.path), workers=1) as client:
            client.client_env().release()
    finally:
        s.close()
    assert eventually(lambda: _conn_threads(server) <= before, timeout=10)


def test_the_thread_limit_answers_blocking_calls_ebusy_and_runs_quick_ones(
    sockdir: str,
) -> None:
    """A connection at its thread limit (here 2: the reader, and the receiver a parked
    SUPPL_RECV started): an OBJECT_INVOKE is EBUSY at once (it could block in a TA); a
    quick call (VERSION) is still served, by the reader itself."""
    with DeviceServer(os.path.join(sockdir, "s"), thread_limit=2) as srv:
        s = _raw(srv.path)
        dec = FrameDecoder(expect_increasing_seq=False)
        try:
            s.sendall(_recv_ioctl(2))
            invoke = Ioctl(seq=3, cmd=uapi.TEE_IOC_OBJECT_INVOKE, arg=_BUF.pack(0x1000, 24))
            s.sendall(encode(invoke))
            s.sendall(encode(Ioctl(seq=4, cmd=uapi.TEE_IOC_VERSION, arg=bytes(12))))
            got = _read_frames(s, dec, 3, timeout=5)
            assert isinstance(got[0], Welcome)
            busy, version = got[1], got[2]
            assert isinstance(busy, IoctlReply) and (busy.seq, busy.errno) == (3, errno.EBUSY)
            assert isinstance(version, IoctlReply) and (version.seq, version.errno) == (4, 0)
        finally:
            s.close()
        assert eventually(lambda: srv.connections == 0)


@pytest.fixture
def no_request_threads(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """``fail(prefix)``: from now on starting a thread whose name starts with ``prefix``
    raises RuntimeError, as at the system's thread limit (``fail("")`` stops it)."""
    real = threading.Thread.start
    failing: list[str] = []

    def start(self: threading.Thread) -> None:
        if failing and failing[0] and self.name.startswith(failing[0]):
            raise RuntimeError("can't start new thread")
        real(self)

    monkeypatch.setattr(threading.Thread, "start", start)

    def fail(prefix: str) -> None:
        failing[:] = [prefix]

    return fail


def test_a_failed_thread_start_kills_no_loop(
    server: DeviceServer, no_request_threads: Callable[[str], None]
) -> None:
    """The system refuses new threads.  A connection's reader that cannot hand the lead on
    answers a SUPPL_RECV EBUSY and runs VERSION itself (before, it died holding its lock
    and the connection hung); a new connection that gets no thread is closed and the accept
    loop goes on (before, it died); once threads start again, all is served."""
    s = _raw(server.path)
    dec = FrameDecoder(expect_increasing_seq=False)
    try:
        assert isinstance(_read_frames(s, dec, 1, timeout=5)[0], Welcome)
        no_request_threads("conn-")
        s.sendall(_recv_ioctl(1) + encode(Ioctl(seq=2, cmd=uapi.TEE_IOC_VERSION, arg=bytes(12))))
        busy, version = _read_frames(s, dec, 2, timeout=5)
        assert isinstance(busy, IoctlReply) and (busy.seq, busy.errno) == (1, errno.EBUSY)
        assert isinstance(version, IoctlReply) and (version.seq, version.errno) == (2, 0)
        with pytest.raises(DriverError) as exc:  # no thread for a new connection
            qtee.connect(server.path, handshake_timeout=3).open()
        assert exc.value.code == errno.EPROTO
        no_request_threads("")
        s.sendall(encode(Ioctl(seq=3, cmd=uapi.TEE_IOC_VERSION, arg=bytes(12))))
        (version,) = _read_frames(s, dec, 1, timeout=5)
        assert isinstance(version, IoctlReply) and (version.seq, version.errno) == (3, 0)
        with qtee.Client(qtee.connect(server.path), workers=1) as client:
            client.client_env().release()
    finally:
        s.close()


def test_the_trace_sender_survives_a_memory_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A MemoryError while sending one record drops that record (counted), not the stream."""
    from qtee._cli.trace import TraceRecord
    from qtee._remote.server import _TraceStream

    class Conn:
        name = "c"

        def __init__(self) -> None:
            self.sent: list[dict[str, Any]] = []
            self.fail = 1

        def send(self, msg: Any, fd: int | None = None) -> None:
            if msg.data.get("op") == 1 and self.fail:
                self.fail -= 1
                raise MemoryError
            self.sent.append(msg.data)

    conn = Conn()
    stream = _TraceStream(conn, seq=3)  # type: ignore[arg-type]
    records = [TraceRecord(float(n), "NS -> QTEE", n, n, 0, 0, 0, 0, "invoke") for n in range(3)]
    for r in records:
        stream(r)
    stream.stop()
    stream._thread.join(5)
    assert not stream._thread.is_alive()
    kept = [m for m in conn.sent if "op" in m]
    assert [m["op"] for m in kept] == [0, 2]
    assert stream.dropped == 1


# ============================================================================ point 10
def test_accept_backs_off_after_emfile_and_keeps_accepting(
    sockdir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three EMFILE from accept: the loop backs off and goes on accepting."""
    real = socket.socket.accept
    failures = [3]

    def accept(self: socket.socket) -> tuple[socket.socket, Any]:
        if failures[0]:
            failures[0] -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return real(self)

    monkeypatch.setattr(socket.socket, "accept", accept)
    with DeviceServer(os.path.join(sockdir, "s")) as srv:
        ctx = qtee.connect(srv.path, handshake_timeout=5).open()
        ctx.ioctl(uapi.TEE_IOC_VERSION, bytearray(12))
        ctx.close()
        assert failures == [0]
        assert srv._accept is not None and srv._accept.is_alive()


_RLIMIT_SERVER = """
import resource, sys, time
from qtee import DeviceServer
srv = DeviceServer(sys.argv[1]).start()
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[2]), int(sys.argv[2])))
print("ready", flush=True)
time.sleep(120)
"""


def test_accept_survives_a_real_fd_limit(sockdir: str) -> None:
    """A server process at RLIMIT_NOFILE: connections past its fds wait in the backlog
    while accept fails EMFILE; once they hang up, a new client is served."""
    path = os.path.join(sockdir, "s")
    limit = 40
    proc = subprocess.Popen(
        [sys.executable, "-c", _RLIMIT_SERVER, path, str(limit)],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        cwd=REPO,
    )
    held: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        for _ in range(limit + 10):  # more than the server has fds for
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            s.sendall(encode(Hello(client="hog")))
            held.append(s)
        time.sleep(0.5)  # the server has run out of fds and met EMFILE
        for s in held:
            s.close()
        held.clear()
        ctx = qtee.connect(path, handshake_timeout=10).open()
        ctx.ioctl(uapi.TEE_IOC_VERSION, bytearray(12))
        ctx.close()
    finally:
        for s in held:
            s.close()
        proc.kill()
        proc.wait(10)


# ============================================================================ point 11
def test_a_silent_server_fails_calls_with_etimedout(sockdir: str) -> None:
    """A server that welcomes and then never answers: the call fails ETIMEDOUT shortly
    after call_timeout, the connection closes, and another call in flight fails EBADF."""
    path = os.path.join(sockdir, "fake")
    fake = FakeServer(path, lambda peer: peer.drain())
    try:
        ctx = qtee.connect(path, call_timeout=0.5).open()
        other: list[BaseException] = []

        def second() -> None:
            time.sleep(0.2)
            try:
                ctx.ioctl(uapi.TEE_IOC_VERSION, bytearray(12))
            except BaseException as exc:
                other.append(exc)

        t = threading.Thread(target=second)
        t.start()
        t0 = time.monotonic()
        with pytest.raises(DriverError) as exc:
            ctx.ioctl(uapi.TEE_IOC_VERSION, bytearray(12))
        took = time.monotonic() - t0
        assert exc.value.code == errno.ETIMEDOUT
        assert 0.5 <= took < 2.0, took
        t.join(3)
        assert not t.is_alive()
        assert isinstance(other[0], DriverError) and other[0].code == errno.EBADF
        assert fake.eof.wait(3)
        with pytest.raises(DriverError) as exc:
            ctx.ioctl(uapi.TEE_IOC_VERSION, bytearray(12))
        assert exc.value.code == errno.EBADF
        ctx.close()
    finally:
        fake.close()


def test_recv_has_no_deadline(sockdir: str) -> None:
    """SUPPL_RECV waits for as long as it takes (the fake answers it after 3 deadlines)."""
    path = os.path.join(sockdir, "fake")

    def script(peer: FakeServer) -> None:
        req = peer.recv_ioctl()
        time.sleep(0.9)
        peer.send(IoctlReply(seq=req.seq, arg=req.arg))
        peer.drain()

    fake = FakeServer(path, script)
    try:
        device = qtee.connect(path, call_timeout=0.3)
        ctx = device.open()
        block = bytearray(_SUPP_HEAD.pack(0, 1) + _PARAM.pack(_META_IN, 0, 0, 0))
        addr = device.memory.pin(block)
        ctx.ioctl(uapi.TEE_IOC_SUPPL_RECV, bytearray(_BUF.pack(addr, len(block))))
        ctx.close()
    finally:
        fake.close()
    assert fake.error is None, fake.error


@SLOW
def test_a_callback_longer_than_the_deadline_succeeds(server: DeviceServer) -> None:
    """The deadline stands still while QTEE waits on the client's callback object."""
    with qtee.Client(qtee.connect(server.path, call_timeout=0.4), workers=1) as client:
        refs = _load(client)
        time.sleep(0.6)  # the workers' SUPPL_RECVs outlive the deadline
        t0 = time.monotonic()
        refs[3].invoke(0, struct.pack("<d", 0.0), Sleeper(1.5))
        assert time.monotonic() - t0 >= 1.5
        assert refs[3].invoke(2, struct.pack("<II", 2, 3), Out(4)) == [struct.pack("<I", 5)]
        _release(refs)


@SLOW
def test_the_deadline_restarts_when_the_callback_ends(server: DeviceServer) -> None:
    """A callback of 1 s, then the TA runs 1.5 s more: the call fails ETIMEDOUT one deadline
    (0.5 s) after the callback ended, not before it and not at the end of the TA."""
    client = qtee.Client(qtee.connect(server.path, call_timeout=0.5), workers=1)
    try:
        refs = _load(client)
        t0 = time.monotonic()
        with pytest.raises(DriverError) as exc:
            refs[3].invoke(0, struct.pack("<d", 1.5), Sleeper(1.0))
        took = time.monotonic() - t0
        assert exc.value.code == errno.ETIMEDOUT
        assert 1.4 <= took < 2.4, took
        with pytest.raises(DriverError) as exc:  # the connection is gone
            refs[3].invoke(2, struct.pack("<II", 2, 3), Out(4))
        assert exc.value.code == errno.EBADF
    finally:
        client.close()


@SLOW
def test_a_wedged_call_times_out_and_frees_the_connection(server: DeviceServer) -> None:
    """A TA that runs past the deadline without calling back: ETIMEDOUT, the connection
    closes, and the server cleans up after it (the plugin checks its tables)."""
    client = qtee.Client(qtee.connect(server.path, call_timeout=0.3), workers=1)
    try:
        refs = _load(client)
        t0 = time.monotonic()
        with pytest.raises(DriverError) as exc:
            refs[3].invoke(1, struct.pack("<d", 1.5))
        assert exc.value.code == errno.ETIMEDOUT
        assert time.monotonic() - t0 < 1.4
    finally:
        client.close()
    assert eventually(lambda: server.connections == 0, timeout=10)


def test_call_timeout_is_validated() -> None:
    for bad in (0, -1.0, float("nan"), float("inf"), "1", True):
        with pytest.raises(qtee.UsageError):  # before the path is tried
            qtee.connect("/nonexistent", call_timeout=bad)  # type: ignore[arg-type]
    assert qtee.RemoteDevice("/nonexistent", call_timeout=None).call_timeout is None
    assert qtee.RemoteDevice("/nonexistent").call_timeout == 30.0


def test_bye_is_still_a_lost_connection(sockdir: str) -> None:
    """A server that says bye mid-call fails the call EBADF (not ETIMEDOUT)."""
    path = os.path.join(sockdir, "fake")

    def script(peer: FakeServer) -> None:
        peer.recv_ioctl()
        peer.send(Bye(reason="going away"))

    fake = FakeServer(path, script)
    try:
        ctx = qtee.connect(path).open()
        with pytest.raises(DriverError) as exc:
            ctx.ioctl(uapi.TEE_IOC_VERSION, bytearray(12))
        assert exc.value.code == errno.EBADF and "going away" in str(exc.value)
        ctx.close()
    finally:
        fake.close()


@SLOW
def test_pool_workers_past_the_recv_limit_retry_instead_of_dying(sockdir: str) -> None:
    """A pool of 4 workers against a server that parks 2 RECVs per connection: two
    workers get EBUSY and retry (they used to log and exit); callbacks are served, and
    with the two parked workers busy, the retrying ones take over."""
    with DeviceServer(os.path.join(sockdir, "s"), recv_limit=2) as srv:
        with qtee.Client(qtee.connect(srv.path), workers=4) as client:
            refs = _load(client)
            pool = client.pool
            assert pool is not None
            time.sleep(0.3)  # two RECVs parked, two answered EBUSY and retrying
            assert pool.alive() == 4
            for _ in range(3):
                refs[3].invoke(0, struct.pack("<d", 0.0), Sleeper(0.05))
            assert pool.alive() == 4
            _release(refs)
        assert eventually(lambda: srv.connections == 0)


# ------------------------------------------------------ the socket path belongs to one server


def test_a_second_server_on_a_live_path_is_refused(sockdir: str) -> None:
    """``start`` used to unlink whatever was at the path: a second server stole a live
    server's socket (the first one unreachable), and the first one's stop then removed
    the second one's."""
    path = os.path.join(sockdir, "s")
    with DeviceServer(path) as first:
        with pytest.raises(qtee.UsageError, match="already listening"):
            DeviceServer(path).start()
        ctx = qtee.connect(path).open()  # the first server still answers at the path
        ctx.close()
        assert eventually(lambda: first.connections == 0)
    assert not os.path.exists(path)


def test_a_file_at_the_path_is_never_replaced(sockdir: str) -> None:
    path = os.path.join(sockdir, "precious.txt")
    Path(path).write_text("precious data")
    with pytest.raises(qtee.UsageError, match="not a socket"):
        DeviceServer(path).start()
    assert Path(path).read_text() == "precious data"
    assert main(["serve", "--socket", path, "--duration", "0"]) == 2  # a usage error
    assert Path(path).read_text() == "precious data"


def test_a_stale_socket_is_replaced(sockdir: str) -> None:
    path = os.path.join(sockdir, "s")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # its server is gone; the file stays
    with DeviceServer(path):
        qtee.connect(path).open().close()


def test_stop_removes_only_its_own_socket(sockdir: str) -> None:
    """A server whose socket was removed and taken by another leaves the other's alone."""
    path = os.path.join(sockdir, "s")
    first = DeviceServer(path).start()
    os.unlink(path)
    with DeviceServer(path):
        first.stop()
        assert os.path.exists(path)
        qtee.connect(path).open().close()


def test_serve_imports_a_ta_module_from_the_current_directory(tmp_path: Path) -> None:
    """``qtee serve --ta-module my_tas`` run where my_tas.py is, as the README shows."""
    (tmp_path / "my_tas.py").write_text("IMPORTED = True\n")
    sock = tempfile.mkdtemp(prefix="qtee-")
    try:
        run = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from qtee.__main__ import main; sys.exit(main(sys.argv[1:]))",
                "serve",
                "--socket",
                os.path.join(sock, "s"),
                "--ta-module",
                "my_tas",
                "--duration",
                "0",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "PYTHONSAFEPATH": "1"},  # as the console script: no cwd
        )
    finally:
        shutil.rmtree(sock, ignore_errors=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "tables: empty"


@pytest.mark.parametrize("verb", [["serve", "--socket", "x"], ["trace", "--connect", "x"]])
def test_a_negative_duration_is_a_usage_error(
    verb: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*verb, "--duration", "-1"])
    assert exc.value.code == 2
    assert "a duration is 0 or more seconds, not -1" in capsys.readouterr().err


@SLOW
def test_with_blocks_after_a_timeout_raise_only_the_timeout(server: DeviceServer) -> None:
    """The README's ``with`` pattern around a call that times out: the handles' releases
    on the lost connection have nothing left to drop (the fd's close released them), so
    the caller sees the ETIMEDOUT alone, not EBADF chained on top of it."""
    # (a deadline the set-up calls meet on a loaded machine; the TA sleeps well past it)
    client = qtee.Client(qtee.connect(server.path, call_timeout=0.6), workers=1)
    try:
        with (
            pytest.raises(DriverError) as exc,
            client.client_env() as env,
            client.open_service(env, 3) as loader,
        ):
            (ctrl,) = loader.invoke(0, qtee.ta_image("hardening.slow"), OUT_OBJECT)
            with ctrl, client.memory(64) as mem:
                (app,) = ctrl.invoke(2, OUT_OBJECT)
                with app:
                    app.invoke(1, struct.pack("<d", 1.8))  # sleeps past the deadline
        assert exc.value.errno == errno.ETIMEDOUT
        assert exc.value.__context__ is None  # nothing raised while leaving the blocks
        assert mem.id == -1
    finally:
        client.close()
