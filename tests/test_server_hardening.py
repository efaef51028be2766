"""The device server and its client under hostile peers (issue 13, point 7).

* 7: ``query`` frames (info, trace) are refused unless the server was started with
  ``introspect=True`` (``qtee serve --introspect``); the CLI says so in one line.

Fake servers are threads on a Unix socket in a ``mkdtemp`` directory (socket paths are
limited to 108 bytes).
"""

from __future__ import annotations

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
