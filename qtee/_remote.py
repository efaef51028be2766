"""Connecting to a device server: the same ioctl interface, one socket per open fd.

``qtee.connect(path)`` returns a :class:`RemoteDevice`; ``open()`` makes a connection
(one fd on the server).  :meth:`RemoteContext.ioctl` behaves like the in-process
``Context.ioctl``: it sends the struct and the caller's memory the call may touch (the
argument block, UBUF buffers, the RECV scratch buffer, all found by parsing the struct the
way the kernel will), and copies back what the server's driver wrote.  The client's
memory is a :class:`CheckedMemory` (addresses are this process's synthetic ones and mean
nothing elsewhere).  A connection that drops fails every call in flight with EBADF.

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
:meth:`RemoteContext.shm_view` is this process's mapping of the same pages.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import math
import mmap
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from objects import DriverError, UsageError
from qtee import uapi
from qtee._frames import (
    MAX_FRAME,
    Answer,
    Bye,
    Close,
    FrameDecoder,
    FrameError,
    Hello,
    IoctlReply,
    Probe,
    Query,
    ShmFd,
    ShmFree,
    Status,
    Welcome,
    check_written,
    encode,
    encode_call,
    refused,
)
from qtee.addrspace import CheckedMemory

__all__ = ["CALL_TIMEOUT", "PROBE_WAIT", "RemoteContext", "RemoteDevice", "connect"]

_BUF_TYPES: Final = (bytearray, memoryview)  # (a tuple: a union is built per call)

_BUF: Final = struct.Struct("<QQ")
_PARAM: Final = struct.Struct("<4Q")
_U32: Final = struct.Struct("<I")
#: buf_data ioctls: header size and where num_params sits in it.
_HEADS: Final = {
    uapi.TEE_IOC_OBJECT_INVOKE: (24, 16),
    uapi.TEE_IOC_SUPPL_RECV: (8, 4),
    uapi.TEE_IOC_SUPPL_SEND: (8, 4),
}
_UBUF_IN: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_INPUT
_UBUF_OUT: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_OUTPUT
_OBJ_OUT: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_OUTPUT
_UBUF_TYPES: Final = frozenset({8, 9, 10})
_META_TYPES: Final = frozenset({uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_INOUT | 0x100})
#: fds one read may bring (a shm frame carries one).
_MAX_FDS: Final = 16
#: Seconds a call may go without a reply before it fails ETIMEDOUT (``connect``'s default).
CALL_TIMEOUT: Final = 30.0
#: Longest wait, in seconds, for the answer to a probe (at most ``call_timeout``).
PROBE_WAIT: Final = 1.0
#: How often a thread waiting for a probe's answer looks for it.
_POLL: Final = 0.005


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
    reader files the reply, the shm a SHM_ALLOC's fd frame brought, a probe's status, or
    why the server's frames for it are lies."""

    __slots__ = ("cmd", "done", "lie", "reply", "shm", "status")

    def __init__(self, cmd: int) -> None:
        self.cmd = cmd
        self.done = threading.Lock()
        self.done.acquire()
        self.reply: IoctlReply | None = None
        self.shm: tuple[int, int, mmap.mmap | bytearray] | None = None
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
    ) -> None:
        self.path = os.fspath(path)
        if type(max_frame) is not int or not 1 <= max_frame <= 0xFFFF_FFFF:
            raise UsageError(f"max_frame must be an int in [1, 2**32 - 1], not {max_frame!r}")
        self.max_frame = max_frame
        #: Seconds to wait for the server's welcome on each new connection.
        self.handshake_timeout = _seconds(handshake_timeout, "handshake_timeout", none_ok=False)
        #: Seconds a call other than SUPPL_RECV may wait for its reply, not counting the
        #: time it waits on a callback (None: no deadline).
        self.call_timeout = _seconds(call_timeout, "call_timeout", none_ok=True)
        #: This process's memory as the server sees it: buffers pinned here, by address.
        self.memory = CheckedMemory()

    def open(self) -> RemoteContext:
        """Connect: one open fd on the server."""
        return RemoteContext(self)


class RemoteContext:
    """One connection = one fd on the server; ``ioctl`` shaped like ``Context.ioctl``."""

    def __init__(self, device: RemoteDevice) -> None:
        self.device = device
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(device.path)
        except OSError as exc:
            self.sock.close()
            raise DriverError(errno.ENOENT, f"cannot connect to {device.path}: {exc}") from None
        self._send = threading.Lock()
        self._seq = itertools.count(1)
        #: seq -> the call waiting for that reply; each is taken out of here exactly once,
        #: by whoever releases its lock (the reader, a loss, or the caller timing out).
        self._pending: dict[int, _Call] = {}
        self._lock = threading.Lock()
        self.closed = False
        self._lost: str | None = None
        self._decoder = FrameDecoder(max_frame=device.max_frame, expect_increasing_seq=False)
        self._fds: collections.deque[int] = collections.deque()
        self._maps: dict[int, mmap.mmap | bytearray] = {}
        self._streams: dict[int, Callable[[dict[str, Any]], None]] = {}
        try:
            self.sock.settimeout(device.handshake_timeout)
            self.sock.sendall(encode(Hello(client=f"qtee pid {os.getpid()}")))
            welcome = self._read_one()
            if not isinstance(welcome, Welcome):
                raise DriverError(errno.EPROTO, f"server answered {type(welcome).__name__}")
            self.sock.settimeout(None)
            if device.call_timeout is not None:  # a send to a server that reads nothing
                sec = math.floor(device.call_timeout)
                usec = int((device.call_timeout - sec) * 1_000_000)
                self.sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("@ll", sec, usec)
                )
        except (DriverError, FrameError, OSError) as exc:
            self.sock.close()
            for fd in self._fds:
                os.close(fd)
            if isinstance(exc, DriverError):
                raise
            code = errno.ETIMEDOUT if isinstance(exc, TimeoutError) else errno.EPROTO
            raise DriverError(code, f"no welcome from {device.path}: {exc}") from None
        self.welcome = welcome
        self._reader = threading.Thread(target=self._read_loop, name="qtee-remote", daemon=True)
        self._reader.start()

    # ------------------------------------------------------------------ socket
    def _read_one(self) -> object:
        while (msg := self._decoder.next_message()) is None:
            data, fds, flags, _ = socket.recv_fds(self.sock, 1 << 16, _MAX_FDS)
            self._fds.extend(fds)
            if flags & socket.MSG_CTRUNC:
                raise DriverError(errno.EPROTO, "the server sent more fds than one read takes")
            if not data:
                raise DriverError(errno.EPROTO, "server closed the connection")
            self._decoder.feed(data)
        return msg

    def _map_shm(self, msg: ShmFd) -> None:
        """Map the memory file of a new shm (its fd came with the frame's bytes) for the
        SHM_ALLOC call it answers; any other shm frame is a lie."""
        fd = self._fds.popleft() if self._fds else None
        try:
            with self._lock:
                call = self._pending.get(msg.seq)
            if call is None:
                raise DriverError(errno.EPROTO, f"a shm frame for no call in flight ({msg.seq})")
            if call.cmd != uapi.TEE_IOC_SHM_ALLOC or call.shm is not None:
                call.lie = f"a shm frame for call {msg.seq}, which is no SHM_ALLOC awaiting one"
            elif fd is None:
                call.lie = f"shm {msg.id} came without its fd"
            elif os.fstat(fd).st_size != msg.size:
                call.lie = f"shm {msg.id}: memory file size is not {msg.size}"
            else:
                try:
                    buf = mmap.mmap(fd, msg.size) if msg.size else bytearray()
                except (OSError, ValueError, OverflowError) as exc:
                    call.lie = f"shm {msg.id} of {msg.size} bytes cannot be mapped: {exc}"
                else:
                    call.shm = (msg.id, msg.size, buf)
                    return
            raise DriverError(errno.EPROTO, call.lie)
        finally:
            if fd is not None:
                os.close(fd)

    def _read_loop(self) -> None:
        reason = "connection closed"
        try:
            while True:
                msg = self._read_one()
                if isinstance(msg, IoctlReply):
                    with self._lock:
                        call = self._pending.pop(msg.seq, None)
                    if call is None:
                        raise DriverError(errno.EPROTO, f"a reply for no call ({msg.seq})")
                    call.reply = msg
                    call.done.release()
                elif isinstance(msg, ShmFd):
                    self._map_shm(msg)
                elif isinstance(msg, Status):
                    with self._lock:
                        call = self._pending.get(msg.call)
                    if call is not None:
                        call.status = msg
                elif isinstance(msg, Answer):
                    with self._lock:
                        stream = self._streams.get(msg.seq)
                    if stream is not None:
                        stream(msg.data)
                elif isinstance(msg, Bye):
                    reason = f"server said bye: {msg.reason}"
                    return
                else:
                    raise DriverError(errno.EPROTO, f"a {type(msg).__name__} from the server")
        except (DriverError, FrameError, OSError) as exc:
            reason = str(exc)
        finally:
            with contextlib.suppress(OSError):  # the server sees the end too
                self.sock.shutdown(socket.SHUT_RDWR)
            self._fail_all(reason)
            for fd in self._fds:
                os.close(fd)
            self._fds.clear()

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            if self._lost is None:
                self._lost = reason
            calls = list(self._pending.values())
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

    # ------------------------------------------------------------------ ioctl
    def _regions(self, cmd: int, arg: bytearray | memoryview) -> list[tuple[int, bytes, bool]]:
        """The caller memory this ioctl may touch, read from this process's memory."""
        head = _HEADS.get(cmd)
        if head is None or len(arg) < _BUF.size:
            return []
        mem = self.device.memory
        ptr, length = _BUF.unpack_from(arg)
        spans: list[tuple[int, int, bool]] = [(ptr, length, True)]
        try:
            block = mem.read(ptr, length)
        except DriverError:
            return []
        size, at = head
        if len(block) >= size:
            (num,) = struct.unpack_from("<I", block, at)
            for i in range(min(num, (len(block) - size) // 32)):
                attr, a, b, _c = _PARAM.unpack_from(block, size + 32 * i)
                if attr & 0xFF in _UBUF_TYPES:
                    spans.append((a, b, attr & 0xFF != _UBUF_IN))
                elif attr in _META_TYPES:  # the RECV scratch buffer
                    spans.append((a, b, True))
        regions: list[tuple[int, bytes, bool]] = []
        for start, end, writable in _merge(spans):
            try:
                data = mem.read(start, end - start)
            except DriverError:
                continue  # unmapped here: the server's driver faults as the kernel would
            regions.append((start, data, writable))
        return regions

    def ioctl(self, cmd: int, arg: bytearray | memoryview) -> int:
        """Run ``cmd`` on the server; ``arg`` and the caller's buffers are updated in place
        once the reply has passed the checks (EPROTO and nothing written if not)."""
        if self.closed:
            raise DriverError(errno.EBADF, "context is closed")
        if not isinstance(arg, _BUF_TYPES):
            raise DriverError(errno.EFAULT, "ioctl argument must be a writable buffer")
        regions = self._regions(cmd, arg)
        call = _Call(cmd)
        data, limit = bytes(arg), self.device.max_frame
        seq = self._request(
            lambda seq: encode_call(seq, cmd, data, regions, max_frame=limit), self._pending, call
        )
        timeout = self.device.call_timeout
        if timeout is None or cmd == uapi.TEE_IOC_SUPPL_RECV:
            call.done.acquire()  # released with the reply, or when the connection is lost
        elif not call.done.acquire(timeout=timeout):
            self._overdue(seq, call, timeout)
        reply = call.reply
        if reply is None:
            if call.shm is not None:
                self._unmap(call.shm[2])
            if call.lie is not None:
                raise DriverError(errno.EPROTO, f"the server lied: {call.lie}")
            raise DriverError(errno.EBADF, f"connection lost: {self._lost}")
        lie = call.lie or _check(cmd, data, regions, reply, call.shm)
        if lie is not None:
            if call.shm is not None:
                self._unmap(call.shm[2])
            self._abandon(f"the server lied about call {seq}: {lie}")
            raise DriverError(errno.EPROTO, f"the server lied: {lie}")
        if reply.errno:
            raise DriverError(reply.errno, os.strerror(reply.errno))
        if call.shm is not None:
            self._maps[call.shm[0]] = call.shm[2]
        arg[:] = reply.arg
        mem = self.device.memory
        for region in reply.written:
            mem.write(region.addr, region.data)
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
                call.done.acquire()  # lost: the reader's end releases every call
                return
            end = time.monotonic() + min(timeout, PROBE_WAIT)
            while (status := call.probed()) is None:
                left = end - time.monotonic()
                if left <= 0:
                    break
                if call.done.acquire(timeout=min(_POLL, left)):
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
            if wait > 0 and call.done.acquire(timeout=wait):
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

    # ------------------------------------------------------------------ shm, query, close
    @property
    def lost(self) -> bool:
        """The connection is gone (the server closed it, or a call's check failed): every
        call fails EBADF, as on a closed fd."""
        return self._lost is not None

    def shm_view(self, shm_id: int) -> memoryview:
        """This process's mapping of a shm this context allocated (the server's pages)."""
        buf = self._maps.get(shm_id)
        if buf is None:
            raise DriverError(errno.EBADF, f"shm {shm_id} is not owned by this context")
        return memoryview(buf)

    def shm_free(self, shm_id: int) -> None:
        """Close the shm's fd: unmap here, and the server drops the owner's reference."""
        buf = self._maps.pop(shm_id, None)
        if buf is None:
            raise DriverError(errno.EBADF, f"shm {shm_id} is not owned by this context")
        self._unmap(buf)
        self._request(lambda seq: encode(ShmFree(seq=seq, id=shm_id)))

    @staticmethod
    def _unmap(buf: mmap.mmap | bytearray) -> None:
        if isinstance(buf, mmap.mmap):
            with contextlib.suppress(BufferError):  # a view is still open: unmapped with it
                buf.close()

    def _request(
        self,
        frame_of: Callable[[int], bytes],
        waiting: dict[int, Any] | None = None,
        entry: object = None,
    ) -> int:
        """Send the frame ``frame_of(seq)`` of the next request; its seq.  With ``waiting``,
        ``entry`` is filed there under the seq first (so no answer can beat it) and taken
        out again if the frame cannot be sent."""
        with self._send:
            seq = next(self._seq)
            with self._lock:
                if self._lost is not None:
                    raise DriverError(errno.EBADF, f"connection lost: {self._lost}")
                if waiting is not None:
                    waiting[seq] = entry
            try:
                frame = frame_of(seq)
                self.sock.sendall(frame)
            except (OSError, UsageError) as exc:
                if waiting is not None:
                    with self._lock:
                        waiting.pop(seq, None)
                if isinstance(exc, UsageError):  # over the frame limit: nothing was sent
                    raise DriverError(errno.E2BIG, str(exc)) from None
                # Part of the frame may have gone: the stream is no use any more.
                if isinstance(exc, BlockingIOError):  # SO_SNDTIMEO: the server reads nothing
                    reason = f"the server read nothing for {self.device.call_timeout:g} s"
                    self._abandon(reason)
                    raise DriverError(errno.ETIMEDOUT, reason) from None
                self._abandon(f"send failed: {exc}")
                raise DriverError(errno.EBADF, f"connection lost: {exc}") from None
        return seq

    def info(self, timeout: float = 5.0) -> dict[str, Any]:
        """The server's description of its device (what ``qtee info`` prints); EACCES when
        the server does not allow introspection (``qtee serve --introspect``)."""
        got: list[dict[str, Any]] = []
        done = threading.Event()

        def answer(data: dict[str, Any]) -> None:
            got.append(data)
            done.set()

        seq = self._query("info", answer)
        try:
            if not done.wait(timeout):
                raise DriverError(errno.ETIMEDOUT, "the server did not describe itself")
            if not got[0]:  # the end of the stream: the connection went away
                raise DriverError(errno.EBADF, f"connection lost: {self._lost}")
            no = refused(got[0])
            if no is not None:
                raise DriverError(*no)
            return got[0]
        finally:
            with self._lock:
                self._streams.pop(seq, None)

    def stream_trace(self, sink: Callable[[dict[str, Any]], None], timeout: float = 5.0) -> None:
        """Have the server send every crossing from now on: ``sink`` gets each record's map
        (see :meth:`qtee._trace.TraceRecord.to_map`), ``{"dropped": n}`` when the server
        dropped records for a slow reader, and ``{}`` when the stream ends.  Returns once
        the server streams; DriverError if it refuses (EACCES: the server does not allow
        introspection; EALREADY: this connection streams already) or does not answer."""
        first: list[dict[str, Any]] = []
        started = threading.Event()

        def answer(data: dict[str, Any]) -> None:
            if started.is_set():
                sink(data)
                return
            first.append(data)
            started.set()

        seq = self._query("trace", answer)
        ok = False
        try:
            if not started.wait(timeout):
                raise DriverError(errno.ETIMEDOUT, "the server did not start the trace")
            if not first[0]:
                raise DriverError(errno.EBADF, f"connection lost: {self._lost}")
            no = refused(first[0])
            if no is not None:
                raise DriverError(*no)
            if first[0] != {"streaming": True}:
                raise DriverError(errno.EPROTO, f"the server answered a trace with {first[0]!r}")
            ok = True
        finally:
            if not ok:
                with self._lock:
                    self._streams.pop(seq, None)

    def _query(self, what: str, sink: Callable[[dict[str, Any]], None]) -> int:
        """Send a query; its answers go to ``sink``."""
        return self._request(lambda seq: encode(Query(seq=seq, what=what)), self._streams, sink)

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
        self._reader.join(5)
        self.sock.close()
        for buf in self._maps.values():
            self._unmap(buf)
        self._maps.clear()


def _merge(spans: list[tuple[int, int, bool]]) -> list[tuple[int, int, bool]]:
    """Overlapping or touching ``(addr, size, writable)`` spans -> disjoint ``[start, end)``."""
    out: list[tuple[int, int, bool]] = []
    for start, size, writable in sorted((a, b, w) for a, b, w in spans if b > 0):
        end = start + size
        if out and start < out[-1][1]:
            s, e, w = out[-1]
            out[-1] = (s, max(e, end), w or writable)
        else:
            out.append((start, end, writable))
    return out


def connect(
    path: str | os.PathLike[str],
    *,
    max_frame: int = MAX_FRAME,
    handshake_timeout: float = 10.0,
    call_timeout: float | None = CALL_TIMEOUT,
) -> RemoteDevice:
    """A device served at ``path`` (see ``qtee serve``); use it like an in-process Device.
    ``call_timeout``: seconds a call other than SUPPL_RECV may wait for its reply, not
    counting the time it waits on a callback (None: no deadline)."""
    return RemoteDevice(
        path,
        max_frame=max_frame,
        handshake_timeout=handshake_timeout,
        call_timeout=call_timeout,
    )


# --------------------------------------------------------------------------- reply checks
def _check(
    cmd: int,
    arg: bytes,
    regions: list[tuple[int, bytes, bool]],
    reply: IoctlReply,
    shm: tuple[int, int, object] | None,
) -> str | None:
    """What is wrong with ``reply`` to ``cmd`` (sent with ``arg`` and ``regions``), or
    None: the frame-level rules (:func:`check_written`), then what the kernel's ioctl may
    change.  ``shm``: ``(id, size, _)`` from the call's shm fd frame, if one came."""
    try:
        check_written(reply, len(arg), regions)
    except FrameError as exc:
        return str(exc)
    if cmd == uapi.TEE_IOC_SHM_ALLOC:
        return _check_shm(arg, reply, shm)
    if shm is not None:
        return "a shm fd for a call that is no SHM_ALLOC"
    if reply.errno or cmd not in _HEADS:
        return None
    if reply.arg != arg:  # tee_ioctl_buf_data: the kernel never writes it back
        return "the reply changes the buf_data argument"
    if not reply.written or len(arg) < _BUF.size:
        return None
    ptr, length = _BUF.unpack_from(arg)
    before = after = None
    for start, data, _w in regions:  # the block as sent
        if start <= ptr and ptr + length <= start + len(data):
            before = data[ptr - start : ptr - start + length]
            break
    else:
        return None
    for w in reply.written:  # the common case: one written region holds all of it
        if w.addr <= ptr and ptr + length <= w.addr + len(w.data):
            after = w.data[ptr - w.addr : ptr - w.addr + length]
            break
    else:
        after = _overlay(before, ptr, reply.written)
    if cmd == uapi.TEE_IOC_OBJECT_INVOKE:
        return None if before == after else _check_invoke(before, after)
    if cmd == uapi.TEE_IOC_SUPPL_RECV:
        return _check_recv(before, after)
    return None


def _check_shm(arg: bytes, reply: IoctlReply, shm: tuple[int, int, object] | None) -> str | None:
    if reply.errno:
        return None if shm is None else "a shm fd for a SHM_ALLOC that failed"
    if shm is None:
        return "a SHM_ALLOC reply without its shm fd"
    asked = uapi.ShmAllocData.unpack(arg)
    got = uapi.ShmAllocData.unpack(reply.arg)
    if (got.id, got.size) != shm[:2]:
        return f"SHM_ALLOC says shm {got.id} of {got.size} bytes, its fd frame {shm[0]} of {shm[1]}"
    if got.size != asked.size or got.flags != asked.flags:
        return f"SHM_ALLOC of {asked.size} bytes answered with {got.size} (flags {got.flags:#x})"
    return None


def _overlay(block: bytes, ptr: int, written: tuple[Any, ...]) -> bytes:
    """``block`` (the bytes at ``ptr``) as the ``written`` regions leave it."""
    out = bytearray(block)
    end = ptr + len(block)
    for w in written:
        lo, hi = max(w.addr, ptr), min(w.end, end)
        if lo < hi:
            out[lo - ptr : hi - ptr] = w.data[lo - w.addr : hi - w.addr]
    return bytes(out)


def _check_invoke(before: bytes, after: bytes) -> str | None:
    """OBJECT_INVOKE writes back ``ret``, the output sizes (at most the buffer) and the
    output objects; the object, op, count, attrs and every input stay as they were."""
    if len(before) < 24:
        return None
    if before[:12] != after[:12] or before[16:24] != after[16:24]:  # all but ret
        return "the reply changes the invoke's object, op or param count"
    (num,) = _U32.unpack_from(before, 16)
    for i in range(min(num, (len(before) - 24) // 32)):
        at = 24 + 32 * i
        attr, a, b, c = _PARAM.unpack_from(before, at)
        nattr, na, nb, nc = _PARAM.unpack_from(after, at)
        if attr == _UBUF_OUT:
            if (nattr, na, nc) != (attr, a, c) or nb > b:
                return f"param {i}: an output of {nb} bytes for a {b}-byte buffer at {a:#x}"
        elif attr == _OBJ_OUT:
            if nattr != attr:
                return f"param {i}: attr {nattr:#x} for an output object"
        elif (nattr, na, nb, nc) != (attr, a, b, c):
            return f"param {i}: the reply changes an input (attr {attr:#x})"
    return None


def _check_recv(before: bytes, after: bytes) -> str | None:
    """SUPPL_RECV fills at most the params sent; an input buffer lies inside the scratch
    buffer (the first param), an output names no address."""
    if len(before) < 40:
        return None
    (slots,) = _U32.unpack_from(before, 4)
    (num,) = _U32.unpack_from(after, 4)
    if num > slots:
        return f"a request of {num} params for {slots} slots"
    _attr, scratch, size, _c = _PARAM.unpack_from(before, 8)
    for i in range(1, min(num, (len(after) - 8) // 32)):
        attr, a, b, _c = _PARAM.unpack_from(after, 8 + 32 * i)
        if attr == _UBUF_IN and b and not (scratch <= a and a + b <= scratch + size):
            return f"param {i}: an input at [{a:#x}, {a + b:#x}) outside the scratch buffer"
        if attr == _UBUF_OUT and a:
            return f"param {i}: an output buffer at {a:#x}"
    return None
