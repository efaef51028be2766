"""Connecting to a device server: the same ioctl interface, one socket per open fd.

``qtee.connect(path)`` returns a :class:`RemoteDevice`; ``open()`` makes a connection
(one fd on the server).  :meth:`RemoteContext.ioctl` behaves like the in-process
``Context.ioctl``: it sends the struct and the caller's memory the call may touch (the
argument block, UBUF buffers, the RECV scratch buffer, all found by parsing the struct the
way the kernel will), and copies back what the server's driver wrote.  The client's
memory is a :class:`CheckedMemory` by default (addresses are this process's synthetic
ones and mean nothing elsewhere), or the caller's choice (``RemoteDevice(path,
memory=ProcessMemory())``: C pointers, raw process memory).  A connection that drops
fails every call in flight with EBADF, the detail saying what happened (the server at
PATH said bye because it shut down, or closed the connection).

``connect`` checks the path at once: nothing there, something that is not a socket, a
socket nobody listens on, or one this process may not use is a :class:`ConnectError`
(a :class:`~objects.DriverError` with the errno, naming the path and why).

The server is not trusted with this process's memory.  Before anything is written back,
a reply is checked against its request: an ``arg`` as long as the request's (and
unchanged for the ioctls whose ``arg`` only points at a block), writes only inside the
writable regions sent, a param block whose params are the ones sent (an OBJECT_INVOKE's
output sizes within their buffers, a SUPPL_RECV's input buffers inside its scratch
buffer), and a SHM_ALLOC's shm fd frame naming the id and size of its reply.  A reply
that fails a check fails its call with EPROTO, writes nothing, and closes the connection.

Every call but SUPPL_RECV has a deadline, ``call_timeout`` (None: none).  When it passes
the client probes the server: a call waiting on a callback has its deadline stand still
(it restarts when the callback is answered), a call still running past it, or a server
that does not answer the probe within ``min(call_timeout, PROBE_WAIT)``, fails with
ETIMEDOUT, and the connection closes (the other calls in flight on it fail EBADF).

Shared memory is shared: the server sends the fd of each new shm's memory file, and
:meth:`RemoteContext.shm_view` is this process's mapping of the same pages
(:meth:`RemoteContext.take_shm_fd` hands the fd itself over, as the kernel's SHM_ALLOC
returns one).

The served device is a QTEE one or an OP-TEE one (``qtee serve --tee optee``, impl id 1 in
the welcome): what crosses with each ioctl and what a reply may change are the device's
(:mod:`qtee._remote.checks`, :mod:`qtee._remote.remote_optee`: an OP-TEE fd sends the windows of
its registered shms that a call's memrefs name).  :meth:`RemoteDevice.open_supplicant`
opens an OP-TEE device's privileged node (tee-supplicant's; EBUSY while one is open).

For a waiter outside Python (the C bridge), :meth:`RemoteContext.recv_nowait` is the
model's non-blocking SUPPL_RECV (EAGAIN when nothing is queued), and
:attr:`RemoteContext.on_ready` a hook called (by the thread reading the socket) whenever the
server says a request was queued on the fd, and once when the connection is lost or closed.

No thread reads the socket for nobody: a caller whose reply is due reads it itself unless
another thread does, and hands what it reads for the others to them (leader/follower); a
blocking SUPPL_RECV reads only while no other caller does; a thread is kept reading only
while a query or a ``watch`` needs one (:mod:`qtee._remote.remote_lead`).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import math
import mmap
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from objects import DriverError, UsageError
from qtee import _reason, uapi
from qtee._checks import WRITES_STRUCT, need_arg
from qtee._remote.checks import Dialect, QteeDialect
from qtee._remote.connect_errors import ConnectError, _check_path, _connect_error
from qtee._remote.frames import (
    MAX_FRAME,
    NODES,
    Close,
    Denied,
    FrameDecoder,
    FrameError,
    Hello,
    Probe,
    Welcome,
    encode,
    encode_call,
)
from qtee._remote.remote_lead import _POLL, RemoteLead, _Call, _Closed, _timeval
from qtee._remote.remote_optee import OpteeDialect
from qtee._remote.remote_queries import RemoteQueries
from qtee.addrspace import AddressSpace, CheckedMemory

__all__ = [
    "CALL_TIMEOUT",
    "PROBE_WAIT",
    "RemoteContext",
    "RemoteDevice",
    "connect",
]

_BUF_TYPES: Final = (bytes, bytearray, memoryview)  # (a tuple: a union is built per call)
_SUPPL_RECV: Final = uapi.TEE_IOC_SUPPL_RECV
#: u32 ioctls whose own struct the kernel only reads (not in WRITES_STRUCT): nothing to
#: check of ``cmd`` or ``arg`` before the call but that ``arg`` is a buffer.
_PLAIN: Final = frozenset(
    {uapi.TEE_IOC_OBJECT_INVOKE, uapi.TEE_IOC_SUPPL_RECV, uapi.TEE_IOC_SUPPL_SEND}
)
#: Calls whose reply may carry the secure side's note (a QTEE invocation, a GP call).
_NOTED: Final = frozenset(
    {uapi.TEE_IOC_OBJECT_INVOKE, uapi.TEE_IOC_OPEN_SESSION, uapi.TEE_IOC_INVOKE}
)
#: Seconds a call may go without a reply before it fails ETIMEDOUT (``connect``'s default).
CALL_TIMEOUT: Final = 30.0
#: Longest wait, in seconds, for the answer to a probe (at most ``call_timeout``).
PROBE_WAIT: Final = 1.0
_POLLIN: Final = select.POLLIN


def _seconds(value: object, what: str, *, none_ok: bool) -> float | None:
    if value is None and none_ok:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise UsageError(f"{what} must be a finite number of seconds > 0, not {value!r}")
    return float(value)


class RemoteDevice:
    """A device served at ``path``; each :meth:`open` is one connection."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_frame: int = MAX_FRAME,
        handshake_timeout: float = 10.0,
        call_timeout: float | None = CALL_TIMEOUT,
        memory: AddressSpace | None = None,
    ) -> None:
        if memory is not None and not isinstance(memory, AddressSpace):
            raise UsageError(f"memory must be an AddressSpace, not {type(memory).__name__}")
        self.path = os.fspath(path)
        if type(max_frame) is not int or not 1 <= max_frame <= 0xFFFF_FFFF:
            raise UsageError(f"max_frame must be an int in [1, 2**32 - 1], not {max_frame!r}")
        self.max_frame = max_frame
        #: Seconds to wait for the server's welcome on each new connection.
        self.handshake_timeout = _seconds(handshake_timeout, "handshake_timeout", none_ok=False)
        #: Seconds a call other than SUPPL_RECV may wait for its reply, not counting the
        #: time it waits on a callback (None: no deadline).
        self.call_timeout = _seconds(call_timeout, "call_timeout", none_ok=True)
        #: This process's memory as the caller's pointers name it: by default buffers
        #: pinned here at synthetic addresses (a :class:`CheckedMemory`).
        self.memory: AddressSpace = memory if memory is not None else CheckedMemory()

    def open(self) -> RemoteContext:
        """Connect: one open fd of the device node (``/dev/teeN``) on the server."""
        return RemoteContext(self)

    def open_supplicant(self) -> RemoteContext:
        """Connect to the privileged node (``/dev/teeprivN``: tee-supplicant's, of an
        OP-TEE device): EBUSY while a supplicant holds it, ENOENT on a QTEE device."""
        return RemoteContext(self, node="teepriv")


class RemoteContext(RemoteLead, RemoteQueries):
    """One connection = one fd on the server; ``ioctl`` shaped like ``Context.ioctl``.

    ``node``: ``"tee"`` (the device node) or ``"teepriv"`` (the privileged one); an open
    the server refuses fails with its errno (EBUSY, ENOENT)."""

    def __init__(self, device: RemoteDevice, node: str = "tee") -> None:
        if node not in NODES:
            raise UsageError(f"node must be one of {NODES}, not {node!r}")
        self.device = device
        self.node = node
        _check_path(device.path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(device.path)
        except OSError as exc:
            self.sock.close()
            raise _connect_error(device.path, exc) from None
        self._send = threading.Lock()
        self._seq = itertools.count(1)
        #: seq -> the call waiting for that reply; each is taken out of here exactly once,
        #: by whoever releases its lock (the leader, a loss, or the caller timing out).
        self._pending: dict[int, _Call] = {}
        self._lock = threading.Lock()
        self.closed = False
        self._lost: str | None = None
        self._decoder = FrameDecoder(max_frame=device.max_frame, expect_increasing_seq=False)
        self._fds: collections.deque[int] = collections.deque()
        self._maps: dict[int, mmap.mmap | bytearray] = {}
        self._shm_fds: dict[int, int] = {}  # shm id -> its memory file's fd, until taken
        self._streams: dict[int, Callable[[dict[str, Any]], None]] = {}
        self._on_ready: Callable[[], None] | None = None
        self._watching = False
        self._told_lost = False
        #: Someone reads the socket (the leader); once the stream has ended, for good.
        self._leading = False
        self._ended = False
        self._end = threading.Event()  # set once the end of the stream is handled
        self._reader: threading.Thread | None = None  # kept while queries or a watch need it
        #: The lazy call that reads when nobody does, and the others, waiting to take over.
        self._delegate: _Call | None = None
        self._lazies: collections.deque[_Call] = collections.deque()
        self._followers = 0  # callers with a deadline waiting (``waiting``)
        try:
            self.sock.settimeout(device.handshake_timeout)
            hello = Hello(client=f"qtee pid {os.getpid()}", node=node)
            self.sock.sendall(encode(hello))
            welcome = self._read_one()
            if isinstance(welcome, Denied):
                raise DriverError(welcome.errno, f"{device.path} ({node}): {welcome.reason}")
            if not isinstance(welcome, Welcome):
                raise DriverError(errno.EPROTO, f"server answered {type(welcome).__name__}")
            self.sock.settimeout(None)
            #: What a read waits at most (SO_RCVTIMEO; inf: for ever): ``call_timeout``,
            #: less while a reader's deadline is nearer.
            self._rcv_base = math.inf if device.call_timeout is None else device.call_timeout
            self._rcv_now = math.inf
            if device.call_timeout is not None:  # a send to a server that reads nothing
                self.sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(device.call_timeout)
                )
                self._set_rcv(device.call_timeout)
        except (DriverError, FrameError, OSError) as exc:
            self.sock.close()
            for fd in self._fds:
                os.close(fd)
            if isinstance(exc, _Closed):  # something listens there, and hangs up
                raise ConnectError(exc.code, device.path, exc.detail) from None
            if isinstance(exc, DriverError):
                raise
            code = errno.ETIMEDOUT if isinstance(exc, TimeoutError) else errno.EPROTO
            raise DriverError(code, f"no welcome from {device.path}: {exc}") from None
        self.welcome = welcome
        #: How this fd's ioctls cross (the served device's kind, from the welcome).
        self.dialect: Dialect = (
            OpteeDialect(welcome)
            if welcome.impl_id == uapi.TEE_IMPL_ID_OPTEE
            else QteeDialect(welcome)
        )
        self._poll = select.poll()
        self._poll.register(self.sock, _POLLIN)

    def _abandon(self, reason: str) -> None:
        """Give the connection up (a lying or silent server): calls in flight fail EBADF."""
        with self._lock:
            if self._lost is None:
                self._lost = reason
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # the reader sees the end and fails the rest
        self._drain(0)

    # ------------------------------------------------------------------ ioctl
    def recv_nowait(self, arg: bytearray | memoryview) -> int:
        """SUPPL_RECV that never blocks (the server runs the model's ``recv_nowait``):
        EAGAIN at once when no request is queued, else what the ioctl does, with the same
        reply checks.  On an fd without a RECV queue, what SUPPL_RECV gives (EINVAL)."""
        return self.ioctl(_SUPPL_RECV, arg, _nowait=True)

    def ioctl(self, cmd: int, arg: bytes | bytearray | memoryview, *, _nowait: bool = False) -> int:
        """Run ``cmd`` on the server; ``arg`` and the caller's buffers are updated in place
        once the reply has passed the checks (EPROTO and nothing written if not).
        (``_nowait``: :meth:`recv_nowait`'s, a keyword here so that every ioctl is one
        call, not two.)"""
        if self.closed:
            raise DriverError(errno.EBADF, "context is closed")
        # The common ioctl (a bytearray for a struct the kernel only reads) needs no more.
        if type(arg) is bytearray and type(cmd) is int and cmd in _PLAIN:
            data = bytes(arg)
        else:
            data = _checked_arg(cmd, arg)
        device = self.device
        limit = device.max_frame
        dialect = self.dialect
        regions = dialect.regions(cmd, data, device.memory, limit)
        # A blocking RECV has no deadline (the reply, or the loss).
        call = _Call(cmd, True) if cmd == _SUPPL_RECV and not _nowait else _Call(cmd)
        seq = self._request(encode_call, self._pending, call, cmd, data, regions, limit, _nowait)
        if call.lazy:
            self._wait_lazy(call)
        else:
            timeout = device.call_timeout
            if timeout is None:
                self._wait(call, None)  # the reply, or the connection lost
            elif not self._wait(call, timeout):
                self._overdue(seq, call, timeout)
        reply = call.reply
        if reply is None:
            self._drop_shm(call)
            if call.lie is not None:
                raise DriverError(errno.EPROTO, f"the server lied: {call.lie}")
            raise DriverError(errno.EBADF, f"connection lost: {self._lost}")
        shm = call.shm
        lie = call.lie
        if lie is None:
            lie = dialect.check(cmd, data, regions, reply, None if shm is None else shm[:2])
        if lie is not None:
            self._drop_shm(call)
            self._abandon(f"the server lied about call {seq}: {lie}")
            raise DriverError(errno.EPROTO, f"the server lied: {lie}")
        if reply.errno:
            raise DriverError(reply.errno)  # the errno alone: its text is the message
        if shm is not None:
            shm_id, _size, buf, fd = shm
            with self._lock:
                self._maps[shm_id] = buf
                self._shm_fds[shm_id] = fd
        if reply.arg != data:
            if isinstance(arg, bytes):  # a struct the kernel only reads came back changed
                self._abandon(f"the server lied about call {seq}: it changed a read-only struct")
                raise DriverError(errno.EPROTO, "the server lied: it changed a read-only struct")
            arg[:] = reply.arg
        mem = device.memory
        for region in reply.written:
            mem.write(region.addr, region.data)
        if cmd not in _PLAIN:  # (what a dialect tracks is none of these)
            dialect.done(cmd, reply.arg)
        if reply.why is not None and cmd in _NOTED:
            _reason.put(_reason.Reason(*reply.why))  # the server's note, on this thread
        return 0

    def _overdue(self, seq: int, call: _Call, timeout: float) -> None:
        """Call ``seq`` is past its deadline: probe the server until the reply comes (then
        return), or fail the call ETIMEDOUT and give the connection up.  While the server
        says the call waits on a callback the deadline stands still; once it is answered,
        the call has ``timeout`` from then."""
        while True:
            call.status = None
            try:
                self._request(lambda p: encode(Probe(seq=p, call=seq)))
            except DriverError:
                self._wait(call, None)  # lost: the end of the stream releases every call
                return
            end = time.monotonic() + min(timeout, PROBE_WAIT)
            while (status := call.probed()) is None:
                left = end - time.monotonic()
                if left <= 0:
                    break
                if self._wait(call, min(_POLL, left)):
                    return
            if status is None:
                wait, why = 0.0, f"no reply and no answer to a probe in {timeout:g} s"
            elif status.callback:
                wait, why = timeout, ""
            elif status.running:
                wait = timeout - status.quiet_ms / 1000
                why = f"the server ran it {status.quiet_ms} ms without a callback"
            else:  # the reply would have come before this status
                wait, why = 0.0, "the server has no such call in flight"
            if wait > 0 and self._wait(call, wait):
                return
            if wait > 0:
                continue
            with self._lock:
                mine = self._pending.pop(seq, None) is call
            if not mine:  # the reply (or the loss) won the race
                call.done.acquire()
                return
            reason = f"call {seq} timed out: {why}"
            self._abandon(reason)
            raise DriverError(errno.ETIMEDOUT, reason)

    # ------------------------------------------------------------------ lost, requests, close
    @property
    def lost(self) -> bool:
        """The connection is gone (the server closed it, or a call's check failed): every
        call fails EBADF, as on a closed fd.  (What the server said meanwhile is read.)"""
        if self._lost is None:
            self._drain(0)
        return self._lost is not None

    def close(self) -> None:
        """Close the fd: the server closes the context (pending callbacks DEFUNCT)."""
        if self.closed:
            return
        self.closed = True
        try:
            with self._send:
                self.sock.sendall(encode(Close(seq=next(self._seq))))
        except OSError:
            pass
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self._drain(5)
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(5)
        self.sock.close()
        self._unmap_all()


def _checked_arg(cmd: int, arg: bytes | bytearray | memoryview) -> bytes:
    """What of ``arg`` goes to the server, after the checks the driver makes before it
    reads ``arg``: EFAULT for no buffer (or a read-only struct the ioctl writes), EINVAL
    for a ``cmd`` that is no u32."""
    if type(cmd) is not int or not 0 <= cmd <= 0xFFFF_FFFF:  # (before any lookup by cmd)
        raise DriverError(errno.EINVAL, f"ioctl command {cmd!r} is not a u32")
    if not isinstance(arg, _BUF_TYPES):
        raise DriverError(
            errno.EFAULT, f"ioctl argument must be a buffer, not {type(arg).__name__}"
        )
    if cmd in WRITES_STRUCT:  # a read-only struct: EFAULT here, as in process
        need_arg(arg, 0)
    return _struct_bytes(cmd, arg)


def _struct_bytes(cmd: int, arg: bytes | bytearray | memoryview) -> bytes:
    """What of ``arg`` goes to the server.  A memoryview the driver could not use (released,
    not one-dimensional bytes) goes as no bytes at all: the server's driver then fails the
    call as the in-process one does with that view (EFAULT, or EINVAL for an ioctl it does
    not know)."""
    if isinstance(arg, bytes | bytearray):
        return bytes(arg)
    try:
        usable = arg.ndim == 1 and arg.itemsize == 1 and arg.c_contiguous
        if usable and arg.readonly and cmd in WRITES_STRUCT:
            usable = False
    except ValueError:  # released
        return b""
    return bytes(arg) if usable else b""


def connect(
    path: str | os.PathLike[str],
    *,
    max_frame: int = MAX_FRAME,
    handshake_timeout: float = 10.0,
    call_timeout: float | None = CALL_TIMEOUT,
    memory: AddressSpace | None = None,
) -> RemoteDevice:
    """A device served at ``path`` (see ``qtee serve``); use it like an in-process Device.
    ``call_timeout``: seconds a call other than SUPPL_RECV may wait for its reply, not
    counting the time it waits on a callback (None: no deadline).  ``memory``: what the
    caller's pointers name (default a fresh :class:`CheckedMemory`).

    The path is tried at once (a connection made and closed): a :class:`ConnectError`
    says why nothing can be reached there.  (:class:`RemoteDevice` itself connects only
    when a context is opened.)"""
    device = RemoteDevice(
        path,
        max_frame=max_frame,
        handshake_timeout=handshake_timeout,
        call_timeout=call_timeout,
        memory=memory,
    )
    _check_path(device.path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(device.handshake_timeout)
        probe.connect(device.path)
    except TimeoutError:
        pass  # a server with a full backlog: it is there, and busy
    except OSError as exc:
        raise _connect_error(device.path, exc) from None
    finally:
        probe.close()
    return device
