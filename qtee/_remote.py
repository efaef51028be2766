"""Connecting to a device server: the same ioctl interface, one socket per open fd.

``qtee.connect(path)`` returns a :class:`RemoteDevice`; ``open()`` makes a connection
(one fd on the server).  :meth:`RemoteContext.ioctl` behaves like the in-process
``Context.ioctl``: it sends the struct and the caller's memory the call may touch (the
argument block, UBUF buffers, the RECV scratch buffer, all found by parsing the struct the
way the kernel will), and copies back what the server's driver wrote.  The client's
memory is a :class:`CheckedMemory` (addresses are this process's synthetic ones and mean
nothing elsewhere).  A connection that drops fails every call in flight with EBADF.

Shared memory is shared: the server sends the fd of each new shm's memory file, and
:meth:`RemoteContext.shm_view` is this process's mapping of the same pages.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import mmap
import os
import socket
import struct
import threading
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
    Query,
    ShmFd,
    ShmFree,
    Welcome,
    encode,
    encode_call,
    refused,
)
from qtee.addrspace import CheckedMemory

__all__ = ["RemoteContext", "RemoteDevice", "connect"]

_BUF_TYPES: Final = (bytearray, memoryview)  # (a tuple: a union is built per call)

_BUF: Final = struct.Struct("<QQ")
_PARAM: Final = struct.Struct("<4Q")
#: buf_data ioctls: header size and where num_params sits in it.
_HEADS: Final = {
    uapi.TEE_IOC_OBJECT_INVOKE: (24, 16),
    uapi.TEE_IOC_SUPPL_RECV: (8, 4),
    uapi.TEE_IOC_SUPPL_SEND: (8, 4),
}
_UBUF_IN: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_INPUT
_UBUF_TYPES: Final = frozenset({8, 9, 10})
_META_TYPES: Final = frozenset({uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_INOUT | 0x100})
#: fds one read may bring (a shm frame carries one).
_MAX_FDS: Final = 16


class RemoteDevice:
    """A device served at ``path``; each :meth:`open` is one connection."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_frame: int = MAX_FRAME,
        handshake_timeout: float = 10.0,
    ) -> None:
        self.path = os.fspath(path)
        self.max_frame = max_frame
        #: Seconds to wait for the server's welcome on each new connection.
        self.handshake_timeout = handshake_timeout
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
        #: seq -> [lock held until the reply (or the loss) is in, reply]; each slot is
        #: taken out of here exactly once, by whoever releases its lock.
        self._pending: dict[int, list[Any]] = {}
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
        """Map the memory file of a new shm (its fd came with the frame's bytes)."""
        if not self._fds:
            raise DriverError(errno.EPROTO, f"shm {msg.id} came without its fd")
        fd = self._fds.popleft()
        try:
            if os.fstat(fd).st_size != msg.size:
                raise DriverError(errno.EPROTO, f"shm {msg.id}: memory file size is not {msg.size}")
            self._maps[msg.id] = mmap.mmap(fd, msg.size) if msg.size else bytearray()
        finally:
            os.close(fd)

    def _read_loop(self) -> None:
        reason = "connection closed"
        try:
            while True:
                msg = self._read_one()
                if isinstance(msg, IoctlReply):
                    with self._lock:
                        slot = self._pending.pop(msg.seq, None)
                    if slot is not None:
                        slot.append(msg)
                        slot[0].release()
                elif isinstance(msg, ShmFd):
                    self._map_shm(msg)
                elif isinstance(msg, Answer):
                    with self._lock:
                        stream = self._streams.get(msg.seq)
                    if stream is not None:
                        stream(msg.data)
                elif isinstance(msg, Bye):
                    reason = f"server said bye: {msg.reason}"
                    return
        except (DriverError, FrameError, OSError) as exc:
            reason = str(exc)
        finally:
            self._fail_all(reason)
            for fd in self._fds:
                os.close(fd)
            self._fds.clear()

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            self._lost = reason
            slots = list(self._pending.values())
            self._pending.clear()
            streams = list(self._streams.values())
            self._streams.clear()
        for stream in streams:
            stream({})  # the end of the stream
        for slot in slots:
            slot[0].release()

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
        """Run ``cmd`` on the server; ``arg`` and the caller's buffers are updated in place."""
        if self.closed:
            raise DriverError(errno.EBADF, "context is closed")
        if not isinstance(arg, _BUF_TYPES):
            raise DriverError(errno.EFAULT, "ioctl argument must be a writable buffer")
        regions = self._regions(cmd, arg)
        done = threading.Lock()
        done.acquire()
        slot: list[Any] = [done]
        data, limit = bytes(arg), self.device.max_frame
        self._request(
            lambda seq: encode_call(seq, cmd, data, regions, max_frame=limit), self._pending, slot
        )
        done.acquire()  # released with the reply, or when the connection is lost
        if len(slot) < 2:
            raise DriverError(errno.EBADF, f"connection lost: {self._lost}")
        reply: IoctlReply = slot[1]
        if reply.errno:
            raise DriverError(reply.errno, os.strerror(reply.errno))
        arg[: len(reply.arg)] = reply.arg
        mem = self.device.memory
        for region in reply.written:
            mem.write(region.addr, region.data)
        return 0

    # ------------------------------------------------------------------ shm, query, close
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
        entry: Any = None,
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
                self.sock.sendall(frame_of(seq))
            except (OSError, UsageError) as exc:
                if waiting is not None:
                    with self._lock:
                        waiting.pop(seq, None)
                if isinstance(exc, UsageError):  # over the frame limit
                    raise DriverError(errno.E2BIG, str(exc)) from None
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
    path: str | os.PathLike[str], *, max_frame: int = MAX_FRAME, handshake_timeout: float = 10.0
) -> RemoteDevice:
    """A device served at ``path`` (see ``qtee serve``); use it like an in-process Device."""
    return RemoteDevice(path, max_frame=max_frame, handshake_timeout=handshake_timeout)
