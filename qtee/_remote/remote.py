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
while a query or a ``watch`` needs one.
"""

from __future__ import annotations

import array
import collections
import contextlib
import errno
import itertools
import logging
import math
import mmap
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any, Final

from objects import DriverError, UsageError
from qtee import _reason, uapi
from qtee._checks import WRITES_STRUCT, need_arg
from qtee._remote.checks import Dialect, QteeDialect, Sent
from qtee._remote.connect_errors import ConnectError, _check_path, _connect_error
from qtee._remote.frames import (
    MAX_FRAME,
    NODES,
    Answer,
    Bye,
    Close,
    Denied,
    FrameDecoder,
    FrameError,
    Hello,
    IoctlReply,
    Probe,
    Ready,
    ShmFd,
    Status,
    Welcome,
    encode,
    encode_call,
)
from qtee._remote.remote_optee import OpteeDialect
from qtee._remote.remote_queries import RemoteQueries
from qtee._remote.remote_shm import RemoteShms
from qtee.addrspace import AddressSpace, CheckedMemory

__all__ = [
    "CALL_TIMEOUT",
    "PROBE_WAIT",
    "RemoteContext",
    "RemoteDevice",
    "connect",
]

log = logging.getLogger("qtee.remote")

_BUF_TYPES: Final = (bytes, bytearray, memoryview)  # (a tuple: a union is built per call)
_SUPPL_RECV: Final = uapi.TEE_IOC_SUPPL_RECV
#: Calls whose reply may carry the secure side's note (a QTEE invocation, a GP call).
_NOTED: Final = frozenset(
    {uapi.TEE_IOC_OBJECT_INVOKE, uapi.TEE_IOC_OPEN_SESSION, uapi.TEE_IOC_INVOKE}
)
#: fds one read may bring (a shm frame carries one).
_MAX_FDS: Final = 16
_FD_SPACE: Final = socket.CMSG_LEN(_MAX_FDS * 4)  # as socket.recv_fds asks for them
_MSG_CTRUNC: Final = int(socket.MSG_CTRUNC)  # a plain int: ``&`` with the IntFlag is 3 calls
_SOL_SOCKET: Final = int(socket.SOL_SOCKET)
_SCM_RIGHTS: Final = int(socket.SCM_RIGHTS)
#: ``Sent(*fields)`` in C (a NamedTuple's own ``__new__`` is a Python function).
_sent: Final = partial(tuple.__new__, Sent)
#: Seconds a call may go without a reply before it fails ETIMEDOUT (``connect``'s default).
CALL_TIMEOUT: Final = 30.0
#: Longest wait, in seconds, for the answer to a probe (at most ``call_timeout``).
PROBE_WAIT: Final = 1.0
#: How often a thread waiting for a probe's answer looks for it.
_POLL: Final = 0.005
#: How long a failed send waits for the reader to see why the server went away.
_READER_GRACE: Final = 1.0
#: How often a thread whose wait has no deadline (a blocking SUPPL_RECV, the reader kept
#: for ``ready`` frames and query answers) looks whether anyone reads the socket.
_LAZY: Final = 0.002
_POLLIN: Final = select.POLLIN
#: How long the reader kept for queries (no ``watch``) reads before it looks whether a
#: query still waits.
_KEPT_READS: Final = 0.1
_TIMEVAL: Final = struct.Struct("@ll")


class _Closed(DriverError):
    """The server closed the connection (the end of the stream)."""


class _Bye(Exception):
    """The server said bye (the end of the stream, and why)."""


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


class _Call:
    """One ioctl in flight: ``done`` is held until its reply (or the loss) is in; the
    thread reading the socket files the reply, the shm a SHM_ALLOC's fd frame brought, a
    probe's status, or why the server's frames for it are lies.  ``waiting``: its thread
    waits on ``done`` and may be woken to read (``lead``); ``lazy``: its wait has no
    deadline (a blocking SUPPL_RECV; see :meth:`RemoteContext._wait_lazy`)."""

    __slots__ = ("cmd", "done", "lazy", "lead", "lie", "reply", "shm", "status", "waiting")

    def __init__(self, cmd: int, lazy: bool = False) -> None:
        self.cmd = cmd
        self.lazy = lazy
        self.waiting = False
        self.lead = False
        self.done = threading.Lock()
        self.done.acquire()
        self.reply: IoctlReply | None = None
        self.shm: tuple[int, int, mmap.mmap | bytearray, int] | None = None  # id, size, map, fd
        self.status: Status | None = None
        self.lie: str | None = None

    def probed(self) -> Status | None:
        """The answer to the last probe, once the reader has filed it."""
        return self.status


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


class RemoteContext(RemoteShms, RemoteQueries):
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

    # ------------------------------------------------------------------ socket
    def _set_rcv(self, seconds: float) -> None:
        """How long a read may wait (SO_RCVTIMEO, set by the thread that reads)."""
        self.sock.setsockopt(_SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))
        self._rcv_now = seconds

    def _read_one(self, end: float | None = None) -> object | None:
        """The next frame; None if none is in by ``end`` (a ``time.monotonic()``).  A read
        waits at most SO_RCVTIMEO (no poll before it: a call releases the GIL, and every
        release may hand it to another thread)."""
        data = b""
        while (msg := self._decoder.feed_next(data)) is None:
            if end is not None:
                left = end - time.monotonic()
                if left <= 0:
                    if not self._poll.poll(0):
                        return None
                elif left + _POLL < self._rcv_now:  # (within _POLL of it: late by as much)
                    self._set_rcv(max(left, 0.001))  # (0 would be no limit at all)
            try:
                # socket.recv_fds, inline (a Python function, run for every frame).
                data, ancdata, flags, _ = self.sock.recvmsg(1 << 16, _FD_SPACE)
            except BlockingIOError:  # SO_RCVTIMEO: nothing came in time
                data = b""
                if self._rcv_now < self._rcv_base:  # shortened for a deadline: back
                    self._set_rcv(self._rcv_base)
                continue
            for level, kind, cdata in ancdata:
                if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
                    self._fds.extend(fds)
            if flags & _MSG_CTRUNC:
                raise DriverError(errno.EPROTO, "the server sent more fds than one read takes")
            if not data:
                raise _Closed(errno.EPROTO, "server closed the connection")
        return msg

    def _file(self, msg: object) -> _Call | None:
        """File one frame from the server; the call a reply answered.  A bye raises
        :class:`_Bye` with what it said, a frame no client expects DriverError."""
        if isinstance(msg, IoctlReply):
            with self._lock:
                call = self._pending.pop(msg.seq, None)
                if call is not None:
                    call.reply = msg
                    woken, call.lead = call.lead, False  # woken to read: that wakes it
                    if call.waiting:
                        self._unwait(call)
            if call is None:
                raise DriverError(errno.EPROTO, f"a reply for no call ({msg.seq})")
            if not woken:
                call.done.release()
            return call
        if isinstance(msg, ShmFd):
            self._map_shm(msg)
        elif isinstance(msg, Status):
            with self._lock:
                waiter = self._pending.get(msg.call)
            if waiter is not None:
                waiter.status = msg
        elif isinstance(msg, Ready):
            if not self._watching:
                raise DriverError(errno.EPROTO, "a ready frame, unasked")
            self._ready()
        elif isinstance(msg, Answer):
            with self._lock:
                stream = self._streams.get(msg.seq)
            if stream is not None:
                stream(msg.data)
        elif isinstance(msg, Bye):
            raise _Bye(f"the server at {self.device.path} said bye: {msg.reason}")
        else:
            raise DriverError(errno.EPROTO, f"a {type(msg).__name__} from the server")
        return None

    def _lead(self, call: _Call, end: float | None) -> bool:
        """Read the socket (this thread leads) and file what comes until ``call`` is
        answered or the stream ends (True), or ``end`` passes (False); a lazy call stops
        after another call's reply too (False): that caller reads its next one itself."""
        reason = "connection closed"
        try:
            while True:
                msg = self._read_one(end)
                if msg is None:
                    return False
                answered = self._file(msg)
                if answered is call:
                    return True
                if call.lazy and (
                    answered is not None  # that caller reads its next reply itself
                    or (call.cmd == 0 and not (self._watching or self._streams))
                ):
                    return False
        except _Bye as exc:
            reason = str(exc)
        except _Closed:
            reason = f"the server at {self.device.path} closed the connection"
        except (DriverError, FrameError, OSError) as exc:
            reason = str(exc)
        self._end_stream(reason)
        return True

    def _end_stream(self, reason: str) -> None:
        """The stream ended (seen by the leader, which keeps the lead for good): every call
        in flight fails, the fds that came unclaimed are closed, ``on_ready`` is told."""
        with self._lock:
            self._ended = True
            for waiter in self._lazies:
                if waiter.cmd == 0 and waiter.waiting:  # the kept reader: no call of its own
                    waiter.waiting = False
                    waiter.done.release()
        with contextlib.suppress(OSError):  # the server sees the end too
            self.sock.shutdown(socket.SHUT_RDWR)
        self._fail_all(reason)
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        self._told_lost = True
        self._end.set()
        self._ready()  # the end: a waiter finds the fd gone

    def _promote(self) -> None:
        """Wake one waiting caller with a deadline to read (with ``_lock`` held)."""
        for waiter in self._pending.values():
            if waiter.waiting and not waiter.lazy:
                waiter.waiting = False
                self._followers -= 1
                waiter.lead = True
                waiter.done.release()
                return

    def _pass_lead(self) -> None:
        """Stop reading: a waiting caller with a deadline takes over (the lazy delegate
        looks for itself); once the stream has ended nobody reads again."""
        with self._lock:
            if not self._ended:
                self._leading = False
                if self._followers:
                    self._promote()

    def _wait(self, call: _Call, timeout: float | None) -> bool:
        """Wait for ``call``'s reply or the loss (True), at most ``timeout`` s (False).
        If nobody reads the socket this thread reads it, filing what comes for the others,
        until its own reply; else it waits to be handed its reply, or the reading."""
        if call.lazy:
            return self._wait_lazy(call)
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            if call.done.acquire(blocking=False):  # answered already
                return True
            with self._lock:
                lead = not self._leading
                if lead:
                    self._leading = True
                else:
                    call.waiting = True
                    self._followers += 1
            if lead:
                try:
                    answered = self._lead(call, end)
                finally:
                    self._pass_lead()
                if answered:
                    call.done.acquire()  # released by the reply or the loss
                    return True
                return False
            try:
                got = call.done.acquire(
                    timeout=-1.0 if end is None else max(0.0, end - time.monotonic())
                )
            except BaseException:  # interrupted (Ctrl-C): a wake-up to read goes on
                with self._lock:
                    self._unwait(call)
                    if call.lead:
                        call.lead = False
                        call.done.acquire(blocking=False)
                        self._promote()
                raise
            with self._lock:
                self._unwait(call)
                promoted, call.lead = call.lead, False
                if promoted and not got:  # woken to read as the wait ran out
                    got = call.done.acquire(blocking=False)
            if not promoted:
                return got

    def _unwait(self, call: _Call) -> None:
        """A call's thread stops waiting, or is answered (with ``_lock`` held)."""
        if call.waiting:
            call.waiting = False
            if not call.lazy:
                self._followers -= 1

    def _wait_lazy(self, call: _Call) -> bool:
        """:meth:`_wait` without a deadline (a blocking SUPPL_RECV, the kept reader): one
        such call at a time, the delegate, reads when nobody does and looks every
        :data:`_LAZY` s whether anyone does; the others wait until the delegate is
        answered and wakes one of them to take its place.  A lazy reader stops after
        another call's reply, so that caller reads its own next reply."""
        try:
            while True:
                if call.done.acquire(blocking=False):  # answered already
                    return True
                if call.cmd == 0 and (self._ended or not (self._watching or self._streams)):
                    return False  # the kept reader, no longer needed
                with self._lock:
                    if self._delegate is None:
                        self._delegate = call
                    delegate = self._delegate is call
                    lead = delegate and not self._leading
                    if lead:
                        self._leading = True
                    elif not delegate:
                        call.waiting = True
                        self._lazies.append(call)
                if lead:
                    # the kept reader of queries alone reads a while at a time: it looks
                    # whether it is still needed
                    end = None
                    if not call.cmd and not self._watching:
                        end = time.monotonic() + _KEPT_READS
                    try:
                        answered = self._lead(call, end)
                    finally:
                        self._pass_lead()
                    if answered:
                        call.done.acquire()
                        return True
                if delegate:
                    if call.done.acquire(timeout=_LAZY):
                        return True
                    continue
                got = call.done.acquire()  # a reply, the loss, or the delegate's place
                with self._lock:
                    self._unwait(call)
                    promoted, call.lead = call.lead, False
                if not promoted:
                    return got
        finally:
            with self._lock:
                self._unwait(call)
                if call in self._lazies:
                    self._lazies.remove(call)
                if call.lead:  # made the delegate as it stopped waiting (Ctrl-C)
                    call.lead = False
                    call.done.acquire(blocking=False)
                if self._delegate is call:  # another lazy call takes its place
                    self._delegate = None
                    while self._lazies:
                        waiter = self._lazies.popleft()
                        if waiter.waiting:
                            waiter.waiting = False
                            waiter.lead = True
                            self._delegate = waiter
                            waiter.done.release()
                            break

    def _drain(self, grace: float) -> None:
        """Read what the server said until the end of the stream, at most ``grace`` s (or
        wait as long for the reader that does)."""
        with self._lock:
            if self._ended:
                return
            lead = not self._leading
            if lead:
                self._leading = True
        if not lead:
            self._end.wait(grace)
            return
        try:
            self._lead(_Call(0), time.monotonic() + grace)
        finally:
            self._pass_lead()

    def _reading(self) -> None:
        """A query or a watch waits for frames nobody may call for: keep a reader."""
        with self._lock:
            if self._reader is not None or self._ended:
                return
            self._reader = threading.Thread(target=self._read_loop, name="qtee-remote", daemon=True)
            self._reader.start()

    def _read_loop(self) -> None:
        """The reader kept while queries are answered or ready frames watched for: a lazy
        waiter that is never answered (it reads when nobody else does)."""
        idle = _Call(0, lazy=True)
        while True:
            with self._lock:
                if self._ended or not (self._watching or self._streams):
                    self._reader = None
                    return
            self._wait_lazy(idle)

    def _await_reader(self) -> None:
        """A send failed because the server is gone: take what it said last (a bye, or
        the end of the stream), briefly, so the error says why."""
        self._drain(_READER_GRACE)

    def _ready(self) -> None:
        """Call the ``on_ready`` hook (from the thread reading); what it raises is logged."""
        hook = self._on_ready
        if hook is None:
            return
        try:
            hook()
        except Exception:
            log.exception("on_ready hook failed")

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            if self._lost is None:
                self._lost = reason
            calls = [call for call in self._pending.values() if not call.lead]
            for call in self._pending.values():
                call.lead = False  # woken to read already: that wakes it
                self._unwait(call)
            self._pending.clear()
            streams = list(self._streams.values())
            self._streams.clear()
        for stream in streams:
            stream({})  # the end of the stream
        for call in calls:
            call.done.release()

    def _abandon(self, reason: str) -> None:
        """Give the connection up (a lying or silent server): calls in flight fail EBADF."""
        with self._lock:
            if self._lost is None:
                self._lost = reason
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # the reader sees the end and fails the rest
        self._drain(0)

    # ------------------------------------------------------------------ ioctl
    def ioctl(self, cmd: int, arg: bytes | bytearray | memoryview) -> int:
        """Run ``cmd`` on the server; ``arg`` and the caller's buffers are updated in place
        once the reply has passed the checks (EPROTO and nothing written if not)."""
        return self._call(cmd, arg, nowait=False)

    def recv_nowait(self, arg: bytearray | memoryview) -> int:
        """SUPPL_RECV that never blocks (the server runs the model's ``recv_nowait``):
        EAGAIN at once when no request is queued, else what the ioctl does, with the same
        reply checks.  On an fd without a RECV queue, what SUPPL_RECV gives (EINVAL)."""
        return self._call(_SUPPL_RECV, arg, nowait=True)

    def _call(self, cmd: int, arg: bytes | bytearray | memoryview, *, nowait: bool) -> int:
        if self.closed:
            raise DriverError(errno.EBADF, "context is closed")
        if not isinstance(arg, _BUF_TYPES):
            raise DriverError(
                errno.EFAULT, f"ioctl argument must be a buffer, not {type(arg).__name__}"
            )
        if cmd in WRITES_STRUCT:  # a read-only struct: EFAULT here, as in process
            need_arg(arg, 0)
        if type(cmd) is not int or not 0 <= cmd <= 0xFFFF_FFFF:
            raise DriverError(errno.EINVAL, f"ioctl command {cmd!r} is not a u32")
        kind = type(arg)  # bytes and bytearray go whole: _struct_bytes without the call
        data = bytes(arg) if kind is bytearray or kind is bytes else _struct_bytes(cmd, arg)
        limit = self.device.max_frame
        dialect = self.dialect
        regions = dialect.regions(cmd, data, self.device.memory, limit)
        lazy = cmd == _SUPPL_RECV and not nowait
        call = _Call(cmd, lazy)
        seq = self._request(
            partial(
                encode_call, cmd=cmd, arg=data, regions=regions, max_frame=limit, nowait=nowait
            ),
            self._pending,
            call,
        )
        timeout = self.device.call_timeout
        if timeout is None or lazy:
            self._wait(call, None)  # the reply, or the connection lost
        elif not self._wait(call, timeout):
            self._overdue(seq, call, timeout)
        reply = call.reply
        if reply is None:
            self._drop_shm(call)
            if call.lie is not None:
                raise DriverError(errno.EPROTO, f"the server lied: {call.lie}")
            raise DriverError(errno.EBADF, f"connection lost: {self._lost}")
        shm = call.shm[:2] if call.shm is not None else None
        lie = call.lie or dialect.check(_sent((cmd, data, regions)), reply, shm)
        if lie is not None:
            self._drop_shm(call)
            self._abandon(f"the server lied about call {seq}: {lie}")
            raise DriverError(errno.EPROTO, f"the server lied: {lie}")
        if reply.errno:
            raise DriverError(reply.errno)  # the errno alone: its text is the message
        if call.shm is not None:
            shm_id, _size, buf, fd = call.shm
            with self._lock:
                self._maps[shm_id] = buf
                self._shm_fds[shm_id] = fd
        if reply.arg != data:
            if isinstance(arg, bytes):  # a struct the kernel only reads came back changed
                self._abandon(f"the server lied about call {seq}: it changed a read-only struct")
                raise DriverError(errno.EPROTO, "the server lied: it changed a read-only struct")
            arg[:] = reply.arg
        mem = self.device.memory
        for region in reply.written:
            mem.write(region.addr, region.data)
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


def _timeval(seconds: float) -> bytes:
    """A ``struct timeval`` for SO_SNDTIMEO/SO_RCVTIMEO (inf: all zero, no limit)."""
    if seconds == math.inf:
        return _TIMEVAL.pack(0, 0)
    sec = math.floor(seconds)
    return _TIMEVAL.pack(sec, int((seconds - sec) * 1_000_000))


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
