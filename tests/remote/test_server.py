"""The device server: bad frames close only the offending connection; a client that drops
is an fd close for the driver (pending callbacks DEFUNCT, tables back).  The scenario
suite runs in process and against a server in tests/remote/test_scenarios.py.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

import qtee
from objects import DriverError, QteeError
from qtee import OUT_OBJECT, CallbackObject, DeviceServer, NsObject, Out, op
from qtee._remote.frames import MAX_FRAME, Bye, FrameDecoder, Hello, Ioctl, encode
from tests._tas import Caller, Keeper


class Scenario(qtee.TrustedApp):
    """Adds; calls back with a buffer; passes an object back and forth."""

    @op(0, ib=(8,), ob=(4,))
    def add(self, pair: bytes) -> bytes:
        a, b = struct.unpack("<II", pair)
        return struct.pack("<I", a + b)

    @op(1, io=1, ob=(None,))
    def echo_through(self, cb: NsObject) -> bytes:
        res = cb.invoke(0, ib=[b"ping"], ob=[16])
        if res.result:
            raise QteeError(res.result)
        return res.ob[0]

    @op(2, io=1, oo=1)
    def give_back(self, cb: NsObject) -> NsObject:
        return cb  # the output carries the reference QTEE got with the input

    @op(3, io=1)
    def slow_callback(self, cb: NsObject) -> None:
        res = cb.invoke(1)
        if res.result:
            raise QteeError(res.result)


class Echo(CallbackObject):
    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    @op(0, ib=(None,), ob=(None,))
    def echo(self, data: bytes) -> bytes:
        return data + b"-pong"

    @op(1)
    def block(self) -> None:
        self.entered.set()
        self.release.wait(5)


@pytest.fixture(autouse=True)
def _ta() -> Iterator[None]:
    qtee.register_ta("server.scenario", Scenario)
    yield
    qtee.secure.unregister_ta("server.scenario")


@pytest.fixture
def server(qtee_server: DeviceServer) -> Iterator[DeviceServer]:
    yield qtee_server
    assert _eventually(lambda: qtee_server.connections == 0)


def _eventually(cond: object, timeout: float = 3.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def _app(client: qtee.Client) -> tuple[qtee.ObjRef, ...]:
    env = client.client_env()
    loader = client.open_service(env, 3)
    (ctrl,) = loader.invoke(0, qtee.ta_image("server.scenario"), OUT_OBJECT)
    (app,) = ctrl.invoke(2, OUT_OBJECT)
    return app, ctrl, loader, env


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x00\x00\x00",  # zero length
        struct.pack(">I", MAX_FRAME + 1),  # oversized, refused from the header
        struct.pack(">I", 3) + b"\xc1\xc1\xc1",  # not msgpack
        encode(Ioctl(seq=1, cmd=0, arg=b"")),  # an ioctl before hello
    ],
    ids=["zero", "oversized", "garbage", "no-hello"],
)
def test_bad_frames_close_only_that_connection(server: DeviceServer, garbage: bytes) -> None:
    """A malformed, oversized or out-of-order frame closes the offending connection with a
    reason; the server stays up and another client is not disturbed."""
    good = qtee.Client(qtee.connect(server.path), workers=1)
    try:
        bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bad.connect(server.path)
        bad.sendall(garbage)
        bad.settimeout(3)
        dec = FrameDecoder(expect_increasing_seq=False)
        data = b""
        while chunk := bad.recv(4096):
            data += chunk
        bad.close()
        dec.feed(data)
        assert isinstance(dec.next_message(), Bye)  # then end of stream
        refs = _app(good)
        assert refs[0].invoke(0, struct.pack("<II", 1, 2), Out(4)) == [struct.pack("<I", 3)]
        for ref in refs:
            ref.release()
    finally:
        good.close()


def test_out_of_order_seq_closes_the_connection(server: DeviceServer) -> None:
    """Sequence numbers of a connection's requests must increase."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(server.path)
    s.settimeout(3)
    s.sendall(encode(Hello(client="test")))
    version = bytearray(12)
    s.sendall(encode(Ioctl(seq=5, cmd=qtee.uapi.TEE_IOC_VERSION, arg=bytes(version))))
    s.sendall(encode(Ioctl(seq=4, cmd=qtee.uapi.TEE_IOC_VERSION, arg=bytes(version))))
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    s.close()
    dec = FrameDecoder(expect_increasing_seq=False)
    dec.feed(data)
    kinds = [type(m).__name__ for m in dec]
    assert kinds[0] == "Welcome" and kinds[-1] == "Bye"


def _load(client: qtee.Client, name: str) -> tuple[qtee.ObjRef, ...]:
    env = client.client_env()
    loader = client.open_service(env, 3)
    (ctrl,) = loader.invoke(0, qtee.ta_image(name), OUT_OBJECT)
    (app,) = ctrl.invoke(2, OUT_OBJECT)
    return app, ctrl, loader, env


def test_dropped_supplicant_connection_is_defunct_for_the_ta(server: DeviceServer) -> None:
    """A connection that drops is an fd close (qtee-kernel.md §4.5): a TA blocked in a
    callback to that client's object gets DEFUNCT (-90) within 2 s; tables return empty."""
    qtee.register_ta("server.keeper", Keeper)
    qtee.register_ta("server.caller", Caller)
    try:
        host = qtee.Client(qtee.connect(server.path), workers=1)
        caller = qtee.Client(qtee.connect(server.path), workers=1)
        echo = Echo()
        host_refs = _load(host, "server.keeper")
        host_refs[0].invoke(0, echo)
        refs = _load(caller, "server.caller")
        got: list[BaseException | None] = []

        def call() -> None:
            try:
                refs[0].invoke(0)
                got.append(None)
            except BaseException as exc:
                got.append(exc)

        t = threading.Thread(target=call)
        t.start()
        assert echo.entered.wait(3)
        t0 = time.monotonic()
        assert isinstance(host.ctx, qtee.RemoteContext)
        host.ctx.sock.shutdown(socket.SHUT_RDWR)  # the supplicant process dies
        t.join(3)
        echo.release.set()
        assert not t.is_alive() and time.monotonic() - t0 < 2
        assert isinstance(got[0], QteeError) and got[0].result == qtee.Result.ERROR_DEFUNCT
        refs[0].invoke(1)  # QTEE drops what it kept
        for ref in refs:
            ref.release()
        caller.close()
        host.close()
    finally:
        qtee.secure.unregister_ta("server.keeper")
        qtee.secure.unregister_ta("server.caller")


@pytest.mark.parametrize(
    ("answer", "code"),
    [(None, errno.ETIMEDOUT), (b"\x00\x00\x00\x03\xc1\xc1\xc1", errno.EPROTO), (b"", errno.EPROTO)],
    ids=["silent", "garbage", "hangs-up"],
)
def test_a_peer_that_does_not_welcome_fails_open_cleanly(answer: bytes | None, code: int) -> None:
    """No welcome within the handshake timeout, garbage, or a hang-up: open() fails with one
    DriverError naming it, and the socket is closed (no ResourceWarning under -W error)."""
    tmp = tempfile.mkdtemp(prefix="qtee-")  # short: a socket path has 108 bytes
    path = os.path.join(tmp, "peer.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def peer() -> None:
        while not (conn := listener.accept()[0]).recv(4096):
            conn.close()  # qtee.connect trying the path: closed unused
        if answer is not None:
            conn.sendall(answer)
            conn.close()
        else:
            time.sleep(1.0)
            conn.close()

    t = threading.Thread(target=peer)
    t.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(DriverError) as exc:
            qtee.connect(path, handshake_timeout=0.3).open()
        assert exc.value.code == code
        assert time.monotonic() - t0 < 0.9
    finally:
        t.join(3)
        listener.close()
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_trace_reader_that_falls_behind_is_told_how_many_crossings_it_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server never blocks the driver for a trace reader: past the queue limit records
    are dropped, and once the queue drains the reader gets ``{"dropped": n}``."""
    from qtee._cli.trace import TraceRecord
    from qtee._remote.server import _TraceStream

    class SlowConn:
        name = "slow"

        def __init__(self) -> None:
            self.sent: list[dict[str, object]] = []
            self.entered = threading.Event()
            self.go = threading.Event()

        def send(self, msg: object, fd: int | None = None) -> None:
            self.entered.set()
            assert self.go.wait(5)
            self.sent.append(msg.data)  # type: ignore[attr-defined]

    monkeypatch.setattr(_TraceStream, "LIMIT", 3)
    conn = SlowConn()
    stream = _TraceStream(conn, seq=7)  # type: ignore[arg-type]
    records = [TraceRecord(float(n), "NS -> QTEE", n, 0, 0, 0, 0, 0, "invoke") for n in range(10)]
    stream(records[0])
    assert conn.entered.wait(5)  # the sender holds record 0: the next three queue up
    for r in records[1:]:
        stream(r)
    assert stream.dropped == 6
    conn.go.set()
    stream.stop()
    stream._thread.join(5)
    assert conn.sent == [r.to_map() for r in records[:4]] + [{"dropped": 6}]
