"""Connecting, disconnecting, and a struct the kernel cannot write (issue 15, "Errors that
say what went wrong").

* ``qtee.connect(bad_path)`` fails at once with one :class:`qtee.ConnectError` naming the
  path and why: nothing there, not a socket, nothing listening, no permission.
* A server that shuts down says so: its clients' calls, in flight and later, fail EBADF
  (the model's errno for a lost fd) saying the server at PATH shut down; a server that
  dies says it closed the connection; no call hangs and no bare EPIPE comes out.
* A read-only ``ioctl`` argument is EFAULT where the kernel writes the struct back
  (``copy_to_user``: VERSION, SHM_ALLOC) and works where it only reads it (a buf_data,
  CANCEL, CLOSE_SESSION), in ``Context``, ``OpteeContext`` and ``RemoteContext``
  (qtee-kernel.md §1.5, §5).
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import qtee
from objects import ENOTSUPP, op
from qtee import OUT_OBJECT, Client, ConnectError, DriverError, uapi
from qtee.secure import QteeRoot, SecureWorld, TrustedApp, ta_image
from tests._paths import REPO


@pytest.fixture
def sockdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="qtee-")  # short: a socket path has 108 bytes
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _stale(path: str) -> str:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()
    return path


# --------------------------------------------------------------------------- connect


@pytest.mark.parametrize(
    ("make", "code", "why"),
    [
        (lambda d: os.path.join(d, "none.sock"), errno.ENOENT, "no such socket"),
        (lambda d: os.path.join(d, "no", "dir.sock"), errno.ENOENT, "no such socket"),
        (lambda d: d, errno.ENOTSOCK, "it is a directory, not a socket"),
        (
            lambda d: (Path(d, "f").write_text("x"), os.path.join(d, "f"))[1],
            errno.ENOTSOCK,
            "it is a file, not a socket",
        ),
        (lambda d: _stale(os.path.join(d, "stale")), errno.ECONNREFUSED, "nothing listens on it"),
        (lambda d: "x" * 109, errno.ENAMETOOLONG, "a socket path takes at most 108"),
        (lambda d: "", errno.ENOENT, "the path is empty"),
    ],
    ids=["missing", "missing-dir", "directory", "file", "stale", "too-long", "empty"],
)
def test_connect_to_a_bad_path_fails_at_once(
    sockdir: str, make: Callable[[str], str], code: int, why: str
) -> None:
    """One ConnectError (a DriverError with the errno) naming the path and why, from
    ``connect`` itself, before any context is opened."""
    path = make(sockdir)
    t0 = time.monotonic()
    with pytest.raises(ConnectError) as exc:
        qtee.connect(path)
    assert time.monotonic() - t0 < 1.0
    assert isinstance(exc.value, DriverError) and exc.value.code == code
    assert exc.value.path == path
    assert str(exc.value).startswith(f"[{errno.errorcode[code]}] cannot connect to {path}: ")
    assert why in str(exc.value) and why in exc.value.why
    assert "\n" not in str(exc.value)
    back = pickle.loads(pickle.dumps(exc.value))
    assert (type(back), back.code, back.path, back.why) == (
        ConnectError,
        code,
        path,
        exc.value.why,
    )


def _as_nobody(fn: Callable[[], None]) -> str:
    """Run ``fn`` in a forked child that dropped root (uid/gid 65534): what it raised."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        out = "no error"
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            fn()
        except ConnectError as exc:
            out = f"{exc.code} {exc}"
        except BaseException as exc:
            out = f"unexpected {exc!r}"
        finally:
            os.write(w, out.encode())
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        got = f.read().decode()
    os.waitpid(pid, 0)
    return got


def test_connect_without_permission_says_so(sockdir: str) -> None:
    """A socket this process may not write to (connect needs write permission)."""
    os.chmod(sockdir, 0o755)
    with qtee.DeviceServer(os.path.join(sockdir, "s")) as server:
        os.chmod(server.path, 0o700)
        if os.geteuid() == 0:
            got = _as_nobody(lambda: qtee.connect(server.path) and None)
        else:
            os.chmod(server.path, 0)
            try:
                qtee.connect(server.path)
                got = "no error"
            except ConnectError as exc:
                got = f"{exc.code} {exc}"
        assert got == f"{errno.EACCES} [EACCES] cannot connect to {server.path}: permission denied"
        assert server.connections == 0


def test_connect_to_a_server_opens_nothing(sockdir: str) -> None:
    """Trying the path is a connection closed unused: no fd is opened on the server, and
    the first connection that says hello is still ``conn-1``."""
    with qtee.DeviceServer(os.path.join(sockdir, "s"), introspect=True) as server:
        device = qtee.connect(server.path)
        assert isinstance(device, qtee.RemoteDevice) and server.connections == 0
        ctx = device.open()
        try:
            assert server.connections == 1
            (served,) = list(server.device.contexts)
            assert served.label == f"conn-1 (qtee pid {os.getpid()})"
        finally:
            ctx.close()


def test_connect_options_are_checked_before_the_path() -> None:
    with pytest.raises(qtee.UsageError, match="call_timeout"):
        qtee.connect("/nonexistent", call_timeout=0)
    assert qtee.RemoteDevice("/nonexistent").path == "/nonexistent"  # lazy: no connection


# --------------------------------------------------------------------------- shutdown


class Slow(TrustedApp):
    """Holds a call for a while (so the server stops under it)."""

    @op(0)
    def nap(self) -> None:
        time.sleep(0.5)

    @op(1)
    def quick(self) -> None:
        return None


@pytest.mark.qtee_ta("slow", Slow)
def test_a_server_that_shuts_down_says_so(sockdir: str) -> None:
    """The call in flight and the next one fail EBADF, saying the server at PATH shut
    down; neither hangs."""
    server = qtee.DeviceServer(os.path.join(sockdir, "s")).start()
    client = Client(qtee.connect(server.path), workers=1)
    env = client.client_env()
    loader = client.open_service(env, 3)
    (ctrl,) = loader.invoke(0, ta_image("slow"), OUT_OBJECT)
    (app,) = ctrl.invoke(2, OUT_OBJECT)
    got: list[BaseException] = []

    def call() -> None:
        try:
            app.invoke(0)
        except BaseException as exc:
            got.append(exc)

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.1)  # the call is in the TA
    t0 = time.monotonic()
    server.stop()
    t.join(5)
    assert not t.is_alive() and time.monotonic() - t0 < 3
    said = f"connection lost: the server at {server.path} said bye: shutting down"
    (pending,) = got
    assert isinstance(pending, DriverError) and pending.code == errno.EBADF
    assert pending.detail == said
    with pytest.raises(DriverError) as exc:
        app.invoke(1)
    assert exc.value.code == errno.EBADF and exc.value.detail == said
    for obj in (app, ctrl, loader, env):
        obj.release()  # nothing left to drop: the fd is gone
    client.close()


def test_a_supplicant_on_a_server_that_shut_down_stops_quietly(sockdir: str) -> None:
    """``with Supplicant(qtee.connect(path))`` around a server that stops: leaving the
    block does not raise a second error for the unregistrations the fd close already did
    (the server's tables are empty)."""
    from supplicant import Supplicant

    server = qtee.DeviceServer(os.path.join(sockdir, "s")).start()
    supp = Supplicant(qtee.connect(server.path), workers=1)
    supp.add_listener(0x100, lambda req: req)
    server.stop()
    assert server.device.leaks() == {}
    supp.stop()  # raised EBADF "... said bye" before
    assert supp.listeners == {}
    supp.stop()  # idempotent


@pytest.mark.parametrize("wait", [False, True], ids=["at-once", "later"])
def test_a_server_that_dies_says_it_closed_the_connection(sockdir: str, wait: bool) -> None:
    """``qtee serve`` killed with SIGKILL: the next call fails EBADF saying the server at
    PATH closed the connection (a send racing the end reports that too, not EPIPE)."""
    path = os.path.join(sockdir, "s")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "qtee", "serve", "--socket", path],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        end = time.monotonic() + 20
        while not os.path.exists(path) and time.monotonic() < end:
            time.sleep(0.05)
        ctx = qtee.connect(path).open()
        arg = bytearray(12)
        ctx.ioctl(uapi.TEE_IOC_VERSION, arg)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        if wait:
            time.sleep(0.3)
        with pytest.raises(DriverError) as exc:
            ctx.ioctl(uapi.TEE_IOC_VERSION, arg)
        assert exc.value.code == errno.EBADF
        assert exc.value.detail == f"connection lost: the server at {path} closed the connection"
        ctx.close()
    finally:
        proc.kill()
        proc.wait(10)


# --------------------------------------------------------------------------- EFAULT


def _contexts(kind: str, sockdir: str) -> Iterator[object]:
    if kind == "qtee":
        dev = qtee.Device(SecureWorld(QteeRoot()))
        ctx = dev.open()
        yield ctx
        ctx.close()
        assert dev.leaks() == {}
    elif kind == "optee":
        odev = qtee.OpteeDevice(SecureWorld(QteeRoot()))
        octx = odev.open()
        yield octx
        octx.close()
        assert odev.leaks() == {}
    else:
        with qtee.DeviceServer(os.path.join(sockdir, "s")) as server:
            rctx = qtee.connect(server.path).open()
            yield rctx
            rctx.close()


KINDS = ["qtee", "optee", "remote"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cmd", ["TEE_IOC_VERSION", "TEE_IOC_SHM_ALLOC"])
def test_a_read_only_struct_the_kernel_writes_back_is_efault(
    sockdir: str, kind: str, cmd: str
) -> None:
    """``copy_to_user`` into read-only memory: EFAULT, and nothing was made."""
    for ctx in _contexts(kind, sockdir):
        arg = uapi.ShmAllocData(4096).pack()
        with pytest.raises(DriverError) as exc:
            ctx.ioctl(getattr(uapi, cmd), arg)  # type: ignore[attr-defined]
        assert exc.value.code == errno.EFAULT
        assert exc.value.detail == "ioctl argument is read-only (bytes): this ioctl writes it back"
        with pytest.raises(DriverError) as exc:
            ctx.ioctl(getattr(uapi, cmd), memoryview(arg))  # type: ignore[attr-defined]
        assert exc.value.code == errno.EFAULT and "read-only view" in exc.value.detail


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arg", ["abc", 5, None, [0] * 16], ids=["str", "int", "None", "list"])
def test_something_that_is_no_buffer_is_efault(sockdir: str, kind: str, arg: object) -> None:
    """A pointer to nothing the process owns: EFAULT naming what it was, never TypeError."""
    for ctx in _contexts(kind, sockdir):
        for cmd in (uapi.TEE_IOC_VERSION, uapi.TEE_IOC_SHM_ALLOC):
            with pytest.raises(DriverError) as exc:
                ctx.ioctl(cmd, arg)  # type: ignore[attr-defined]
            assert exc.value.code == errno.EFAULT
            assert exc.value.detail == f"ioctl argument must be a buffer, not {type(arg).__name__}"


@pytest.mark.parametrize("kind", ["qtee", "remote"])
def test_a_read_only_buf_data_is_enough(sockdir: str, kind: str) -> None:
    """OBJECT_INVOKE only reads its buf_data: ``bytes`` works, as a read-only view does."""
    for ctx in _contexts(kind, sockdir):
        mem = ctx.device.memory  # type: ignore[attr-defined]
        params = [uapi.Param(uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_OUTPUT)]
        block = bytearray(
            uapi.pack_arg(uapi.ObjectInvokeArg(uapi.TEE_OBJREF_NULL, 7, 0, 1), params)
        )
        addr = mem.pin(block)
        try:
            ctx.ioctl(uapi.TEE_IOC_OBJECT_INVOKE, uapi.BufData(addr, len(block)).pack())  # type: ignore[attr-defined]
        finally:
            mem.unpin(addr)
        head, _ = uapi.unpack_arg(uapi.ObjectInvokeArg, block)
        assert head.ret == 2  # the root has no op 7: QTEE answered, the struct was read


def test_cancel_and_close_session_only_read_their_struct() -> None:
    """OP-TEE's CANCEL and CLOSE_SESSION read their struct: a read-only one reaches the
    driver's own check (the session is not this fd's: EINVAL), not EFAULT."""
    for ctx in _contexts("optee", ""):
        for cmd, arg in (
            (uapi.TEE_IOC_CANCEL, uapi.CancelArg(0, 5).pack()),
            (uapi.TEE_IOC_CLOSE_SESSION, uapi.CloseSessionArg(5).pack()),
        ):
            with pytest.raises(DriverError) as exc:
                ctx.ioctl(cmd, arg)  # type: ignore[attr-defined]
            assert exc.value.code == errno.EINVAL


def test_qcomtee_shm_register_fails_before_writing_back() -> None:
    """qcomtee has no shm_register: ENOTSUPP comes before the TEE core would write the
    struct back, so a read-only struct gets ENOTSUPP too (qtee-kernel.md §1.3)."""
    for ctx in _contexts("qtee", ""):
        arg = uapi.ShmRegisterData(0x1000, 16, 0, 0).pack()
        with pytest.raises(DriverError) as exc:
            ctx.ioctl(uapi.TEE_IOC_SHM_REGISTER, arg)  # type: ignore[attr-defined]
        assert exc.value.code == ENOTSUPP
