"""Connecting to a device server: the same ioctl interface, one socket per open fd.

``qtee.connect(path)`` returns a :class:`RemoteDevice`; ``open()`` makes a connection
(one fd on the server).  :meth:`RemoteContext.ioctl` behaves like the in-process
``Context.ioctl``: it sends the struct and the caller's memory the call may touch (the
argument block, UBUF buffers, the RECV scratch buffer, all found by parsing the struct the
way the kernel will), and copies back what the server's driver wrote.  The client's
memory is a :class:`CheckedMemory` (addresses are this process's synthetic ones and mean
nothing elsewhere).  A connection that drops fails every call in flight with EBADF.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import socket
import struct
import threading
from typing import Final

from objects import DriverError, UsageError
from qtee import uapi
from qtee._frames import (
    MAX_FRAME,
    Bye,
    Close,
    FrameDecoder,
    FrameError,
    Hello,
    Ioctl,
    IoctlReply,
    Region,
    Welcome,
    encode,
)
from qtee.addrspace import CheckedMemory

__all__ = ["RemoteContext", "RemoteDevice", "connect"]

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


class RemoteDevice:
    """A device served at ``path``; each :meth:`open` is one connection."""

    def __init__(self, path: str | os.PathLike[str], *, max_frame: int = MAX_FRAME) -> None:
        self.path = os.fspath(path)
        self.max_frame = max_frame
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
        self._pending: dict[int, list[object]] = {}
        self._lock = threading.Lock()
        self.closed = False
        self._lost: str | None = None
        self._decoder = FrameDecoder(max_frame=device.max_frame, expect_increasing_seq=False)
        self.sock.sendall(encode(Hello(client=f"qtee pid {os.getpid()}")))
        welcome = self._read_one()
        if not isinstance(welcome, Welcome):
            self.sock.close()
            raise DriverError(errno.EPROTO, f"server answered {type(welcome).__name__}")
        self.welcome = welcome
        self._reader = threading.Thread(target=self._read_loop, name="qtee-remote", daemon=True)
        self._reader.start()

    # ------------------------------------------------------------------ socket
    def _read_one(self) -> object:
        while (msg := self._decoder.next_message()) is None:
            data = self.sock.recv(1 << 16)
            if not data:
                raise DriverError(errno.EPROTO, "server closed the connection")
            self._decoder.feed(data)
        return msg

    def _read_loop(self) -> None:
        reason = "connection closed"
        try:
            while True:
                msg = self._read_one()
                if isinstance(msg, IoctlReply):
                    with self._lock:
                        slot = self._pending.get(msg.seq)
                    if slot is not None:
                        slot.append(msg)
                        event = slot[0]
                        assert isinstance(event, threading.Event)
                        event.set()
                elif isinstance(msg, Bye):
                    reason = f"server said bye: {msg.reason}"
                    return
        except (DriverError, FrameError, OSError) as exc:
            reason = str(exc)
        finally:
            self._fail_all(reason)

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            self._lost = reason
            slots = list(self._pending.values())
        for slot in slots:
            event = slot[0]
            assert isinstance(event, threading.Event)
            event.set()

    # ------------------------------------------------------------------ ioctl
    def _regions(self, cmd: int, arg: bytearray | memoryview) -> tuple[Region, ...]:
        """The caller memory this ioctl may touch, read from this process's memory."""
        head = _HEADS.get(cmd)
        if head is None or len(arg) < _BUF.size:
            return ()
        mem = self.device.memory
        ptr, length = _BUF.unpack_from(arg)
        spans: list[tuple[int, int, bool]] = [(ptr, length, True)]
        try:
            block = mem.read(ptr, length)
        except DriverError:
            return ()
        size, at = head
        if len(block) >= size:
            (num,) = struct.unpack_from("<I", block, at)
            for i in range(min(num, (len(block) - size) // 32)):
                attr, a, b, _c = _PARAM.unpack_from(block, size + 32 * i)
                if attr & 0xFF in _UBUF_TYPES:
                    spans.append((a, b, attr & 0xFF != _UBUF_IN))
                elif attr in _META_TYPES:  # the RECV scratch buffer
                    spans.append((a, b, True))
        regions: list[Region] = []
        for start, end, writable in _merge(spans):
            try:
                data = mem.read(start, end - start)
            except DriverError:
                continue  # unmapped here: the server's driver faults as the kernel would
            regions.append(Region(addr=start, data=data, writable=writable))
        return tuple(regions)

    def ioctl(self, cmd: int, arg: bytearray | memoryview) -> int:
        """Run ``cmd`` on the server; ``arg`` and the caller's buffers are updated in place."""
        if self.closed:
            raise DriverError(errno.EBADF, "context is closed")
        if not isinstance(arg, bytearray | memoryview):
            raise DriverError(errno.EFAULT, "ioctl argument must be a writable buffer")
        regions = self._regions(cmd, arg)
        event = threading.Event()
        slot: list[object] = [event]
        with self._send:
            seq = next(self._seq)
            with self._lock:
                if self._lost is not None:
                    raise DriverError(errno.EBADF, f"connection lost: {self._lost}")
                self._pending[seq] = slot
            try:
                msg = Ioctl(seq=seq, cmd=cmd, arg=bytes(arg), regions=regions)
                self.sock.sendall(encode(msg, max_frame=self.device.max_frame))
            except (OSError, UsageError) as exc:
                with self._lock:
                    self._pending.pop(seq, None)
                if isinstance(exc, UsageError):
                    raise DriverError(errno.E2BIG, str(exc)) from None
                raise DriverError(errno.EBADF, f"connection lost: {exc}") from None
        event.wait()
        with self._lock:
            self._pending.pop(seq, None)
            lost = self._lost
        if len(slot) < 2:
            raise DriverError(errno.EBADF, f"connection lost: {lost}")
        reply = slot[1]
        assert isinstance(reply, IoctlReply)
        if reply.errno:
            raise DriverError(reply.errno, os.strerror(reply.errno))
        arg[: len(reply.arg)] = reply.arg
        mem = self.device.memory
        for region in reply.written:
            mem.write(region.addr, region.data)
        return 0

    # ------------------------------------------------------------------ shm, close
    def shm_view(self, shm_id: int) -> memoryview:
        """Shared memory cannot be mapped across processes yet."""
        raise UsageError("memory objects are not available over a connection yet")

    def shm_free(self, shm_id: int) -> None:
        """See :meth:`shm_view`."""
        raise UsageError("memory objects are not available over a connection yet")

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


def connect(path: str | os.PathLike[str]) -> RemoteDevice:
    """A device served at ``path`` (see ``qtee serve``); use it like an in-process Device."""
    return RemoteDevice(path)
