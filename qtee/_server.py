"""The device server: one driver model and secure world on a Unix socket.

Each connection is one open fd (a :class:`qtee.Context`).  Frames are those of
:mod:`qtee._frames`: a Hello/Welcome handshake, then Ioctl requests answered by
IoctlReply.  Addresses do not cross processes, so an Ioctl carries the caller's memory
the call may touch (the argument block, buffers, the RECV scratch) as regions; the
server maps them at the same addresses for that call only and sends back the regions the
driver wrote.  Each request runs on a request thread of its connection, a new one only
when all are busy (a SUPPL_RECV may block for a long time).  A malformed, oversized or
out-of-order frame closes that connection with a logged reason; other connections go on.
A connection that ends is an fd close: its pending callbacks complete DEFUNCT, its QTEE
objects are released.

Shared memory is real shared memory: the server's shms live in memory files, and the fd
of each goes to the client that allocated it (a ``shm`` frame, SCM_RIGHTS), which maps
the same pages.  ``query`` frames ask for a description of the device (``qtee info
--connect``) or a live stream of its crossings (``qtee trace --connect``); both show
every connection's labels and calls, so a server answers them only when started with
``introspect=True`` (``qtee serve --introspect``) and refuses them (EACCES) otherwise.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import logging
import os
import queue
import socket
import threading
from typing import Final

from objects import DriverError, UsageError
from qtee import uapi
from qtee._driver import Context, Device
from qtee._frames import (
    MAX_FRAME,
    PROTOCOL_VERSION,
    Answer,
    Bye,
    Close,
    FrameDecoder,
    FrameError,
    Hello,
    Ioctl,
    Query,
    Region,
    ShmFd,
    ShmFree,
    Welcome,
    encode,
    encode_reply,
    refusal,
)
from qtee._info import describe
from qtee._mem_obj import memfd_backing
from qtee._trace import TraceRecord
from qtee.addrspace import TASK_SIZE

__all__ = ["DeviceServer", "RegionMemory"]

log = logging.getLogger("qtee.server")

_GEN_CAPS: Final = uapi.TEE_GEN_CAP_OBJREF
_INTROSPECT_OFF: Final = (
    "introspection is off: the server was not started with qtee serve --introspect"
)


def _efault(addr: int, size: int, why: str) -> DriverError:
    return DriverError(errno.EFAULT, f"user range {addr:#x}+{size} {why}")


class _CallRegions:
    """The regions one request brought, at their addresses, and which were written."""

    __slots__ = ("bufs", "starts", "writable", "written")

    def __init__(self, regions: tuple[Region, ...]) -> None:
        self.starts = sorted(r.addr for r in regions)
        self.bufs = {r.addr: bytearray(r.data) for r in regions}
        self.writable = {r.addr for r in regions if r.writable}
        self.written: set[int] = set()

    def find(self, addr: int, size: int) -> tuple[int, bytearray]:
        i = bisect.bisect_right(self.starts, addr) - 1
        if i < 0:
            raise _efault(addr, size, "is not mapped for this call")
        start = self.starts[i]
        buf = self.bufs[start]
        if addr + size > start + len(buf):
            raise _efault(addr, size, "runs past the mapped buffer")
        return start, buf


class RegionMemory:
    """An address space whose mappings are the current request's regions (per thread)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def _regions(self) -> _CallRegions:
        call: _CallRegions | None = getattr(self._local, "call", None)
        if call is None:
            raise DriverError(errno.EFAULT, "no caller memory in this thread")
        return call

    def begin(self, regions: tuple[Region, ...]) -> _CallRegions:
        """Map ``regions`` for the request running in this thread."""
        call = _CallRegions(regions)
        self._local.call = call
        return call

    def end(self) -> None:
        """Unmap this thread's request regions."""
        self._local.call = None

    def check(self, addr: int, size: int) -> None:
        """``access_ok``."""
        if addr < 0 or size < 0 or addr + size > TASK_SIZE:
            raise _efault(addr, size, "is outside the user address space")

    def read(self, addr: int, size: int) -> bytes:
        """``copy_from_user`` from the caller's regions."""
        self.check(addr, size)
        if size == 0:
            return b""
        start, buf = self._regions().find(addr, size)
        return bytes(buf[addr - start : addr - start + size])

    def write(self, addr: int, data: bytes) -> None:
        """``copy_to_user`` into a writable region (sent back with the reply)."""
        size = len(data)
        self.check(addr, size)
        if size == 0:
            return
        call = self._regions()
        start, buf = call.find(addr, size)
        if start not in call.writable:
            raise _efault(addr, size, "is read-only")
        buf[addr - start : addr - start + size] = data
        call.written.add(start)

    def pin(self, buf: bytes | bytearray) -> int:
        """Pinning is the client's business; the server only maps what it is sent."""
        raise UsageError("the server's address space maps regions sent by clients")

    def unpin(self, addr: int) -> None:
        """See :meth:`pin`."""
        raise UsageError("the server's address space maps regions sent by clients")


class _Connection:
    """One client: its context and the threads that serve it, leader/follower style.

    One thread at a time (the leader) reads the socket.  Control frames it handles itself;
    when it has an ioctl, it hands the reading to a waiting thread (starting one if none
    waits) and runs the ioctl, so a request never waits for another thread to wake up.
    A thread whose ioctl is done queues up to lead again; one blocked in SUPPL_RECV simply
    is not among them.
    """

    def __init__(self, server: DeviceServer, sock: socket.socket, name: str) -> None:
        self.server = server
        self.sock = sock
        self.name = name
        self.ctx: Context | None = None
        self._send = threading.Lock()
        self._read = threading.Lock()  # held by the leader
        self._decoder = FrameDecoder(max_frame=server.max_frame)
        self._threads: set[threading.Thread] = set()
        self._waiting = 0  # threads queued to lead
        self._done = False  # the stream ended: threads that get the lead leave
        self._lock = threading.Lock()
        self.closed = threading.Event()
        self._trace: _TraceStream | None = None

    def send(self, msg: object, fd: int | None = None) -> None:
        """One frame; ``fd`` rides on its first bytes (SCM_RIGHTS)."""
        self.send_frame(encode(msg, max_frame=self.server.max_frame), fd)  # type: ignore[arg-type]

    def send_frame(self, data: bytes, fd: int | None = None) -> None:
        """An encoded frame; ``fd`` rides on its first bytes (SCM_RIGHTS)."""
        with self._send:
            if fd is None:
                self.sock.sendall(data)
                return
            sent = socket.send_fds(self.sock, [data], [fd])
            if sent < len(data):
                self.sock.sendall(data[sent:])

    def run(self) -> None:
        """The connection's first thread (more start when every thread is busy)."""
        with self._lock:
            self._threads.add(threading.current_thread())
        self._serve()

    def _spawn(self) -> None:
        t = threading.Thread(
            target=self._serve, name=f"{self.name}-t{len(self._threads)}", daemon=True
        )
        self._threads.add(t)
        t.start()

    def _serve(self) -> None:
        while True:
            with self._lock:
                self._waiting += 1
            self._read.acquire()
            with self._lock:
                self._waiting -= 1
                if self._done:
                    self._read.release()
                    return
            try:
                req, reason = self._next_request()
            except BaseException:
                req, reason = None, "server error"
                log.exception("%s: reading failed", self.name)
            if req is None:
                with self._lock:
                    self._done = True
                self._read.release()
                self._close(reason)
                return
            with self._lock:  # someone must read while this thread runs the ioctl
                if self._waiting == 0:
                    self._spawn()
            self._read.release()
            self._ioctl(req)

    def _next_request(self) -> tuple[Ioctl | None, str]:
        """Read until an ioctl (handling the control frames on the way) or the end."""
        decoder = self._decoder
        try:
            while True:
                msg = decoder.next_message()
                if msg is None:
                    data = self.sock.recv(1 << 16)
                    if not data:
                        return None, "end of stream"
                    decoder.feed(data)
                elif isinstance(msg, Ioctl) and self.ctx is not None:
                    return msg, ""
                elif not self._handle(msg):
                    return None, "client said close"
        except FrameError as exc:
            log.warning("%s: closing: bad frame: %s", self.name, exc)
            with contextlib.suppress(OSError):
                self.send(Bye(reason=str(exc)[:200]))
            return None, f"bad frame: {exc}"
        except OSError as exc:
            return None, f"socket error: {exc}"

    def _handle(self, msg: object) -> bool:
        """A control frame; False when the client said close."""
        if self.ctx is None:
            if not isinstance(msg, Hello):
                raise FrameError(f"expected hello first, got {type(msg).__name__}")
            if msg.version != PROTOCOL_VERSION:
                raise FrameError(f"protocol version {msg.version} is not {PROTOCOL_VERSION}")
            self.ctx = self.server.device.open()
            self.ctx.label = f"{self.name} ({msg.client})"
            self.send(
                Welcome(impl_id=uapi.TEE_IMPL_ID_QTEE, gen_caps=_GEN_CAPS, server="qtee server")
            )
            return True
        if isinstance(msg, Close):
            return False
        if isinstance(msg, ShmFree):
            try:
                self.ctx.shm_free(msg.id)
            except DriverError as exc:
                raise FrameError(f"shm_free of shm {msg.id}: {exc}") from None
            return True
        if isinstance(msg, Query):
            self._query(msg)
            return True
        raise FrameError(f"unexpected {type(msg).__name__} from a client")

    def _ioctl(self, req: Ioctl) -> None:
        mem = self.server.memory
        call = mem.begin(req.regions)
        try:
            arg = bytearray(req.arg)
            assert self.ctx is not None
            try:
                self.ctx.ioctl(req.cmd, arg)
            except DriverError as exc:
                reply = encode_reply(req.seq, exc.code, max_frame=self.server.max_frame)
                ok = False
            else:
                written = [(a, bytes(call.bufs[a])) for a in sorted(call.written)]
                reply = encode_reply(
                    req.seq, 0, bytes(arg), written, max_frame=self.server.max_frame
                )
                ok = True
            with contextlib.suppress(OSError):  # the client is gone; its context is closing
                if req.cmd == uapi.TEE_IOC_SHM_ALLOC and ok:
                    self._send_shm_fd(req.seq, arg)
                self.send_frame(reply)
        except Exception:
            log.exception("%s: ioctl %#x (seq %d) failed", self.name, req.cmd, req.seq)
        finally:
            mem.end()

    def _send_shm_fd(self, seq: int, arg: bytearray) -> None:
        """The new shm's memory file goes to the client; the server keeps only its mapping."""
        data = uapi.ShmAllocData.unpack(arg)
        assert self.ctx is not None
        shm = self.ctx.shms[data.id]
        fd = shm.take_fd()
        if fd is None:
            raise UsageError("a served device must put shms in memory files (memfd_backing)")
        try:
            self.send(ShmFd(seq=seq, id=data.id, size=data.size), fd)
        finally:
            os.close(fd)

    def _query(self, msg: Query) -> None:
        """``info``: one answer; ``trace``: ``{"streaming": True}``, then the crossings
        from now until the connection closes.  Refused unless the server introspects."""
        if not self.server.introspect:
            self.send(refusal(msg.seq, errno.EACCES, _INTROSPECT_OFF))
            return
        if msg.what == "info":
            self.send(Answer(seq=msg.seq, data=describe(self.server.device)))
            return
        if self._trace is not None:
            self.send(refusal(msg.seq, errno.EALREADY, "this connection streams the trace"))
            return
        self._trace = _TraceStream(self, msg.seq, held=True)
        self.server._traces.add(self._trace)  # records queue up from now: the ack is first
        self.send(Answer(seq=msg.seq, data={"streaming": True}))
        self._trace.go()

    def _close(self, reason: str) -> None:
        """The fd's close: run by the thread that saw the end of the stream."""
        log.info("%s: closed (%s)", self.name, reason)
        if self._trace is not None:
            self.server._traces.discard(self._trace)
            self._trace.stop()
        if self.ctx is not None:
            self.ctx.close()  # wakes the threads blocked in SUPPL_RECV or a callback
        with contextlib.suppress(OSError):
            self.sock.close()
        me = threading.current_thread()
        with self._lock:
            threads = [t for t in self._threads if t is not me]
        for t in threads:
            t.join(2)
        self.closed.set()
        self.server._forget(self)


class _TraceStream:
    """Sends one connection the crossings of the device, from a queue and its own thread
    (a slow reader never blocks the driver).  Past ``LIMIT`` queued records new ones are
    dropped and counted, and once the queue has drained the reader is told how many
    (an answer ``{"dropped": n}`` between the records).  A ``held`` stream queues records
    but sends none before :meth:`go` (the query's answer goes first)."""

    LIMIT: Final = 10_000

    def __init__(self, conn: _Connection, seq: int, *, held: bool = False) -> None:
        self.conn = conn
        self.seq = seq
        self._go = threading.Event()
        if not held:
            self._go.set()
        self.dropped = 0  # all the stream dropped
        self._unsaid = 0  # dropped and not yet told
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[TraceRecord | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"{conn.name}-trace", daemon=True)
        self._thread.start()

    def __call__(self, record: TraceRecord) -> None:
        if self._queue.qsize() >= self.LIMIT:
            with self._lock:
                self.dropped += 1
                self._unsaid += 1
            return
        self._queue.put(record)

    def go(self) -> None:
        """Start sending (a held stream)."""
        self._go.set()

    def stop(self) -> None:
        self._queue.put(None)
        self._go.set()

    def _run(self) -> None:
        self._go.wait()
        try:
            while (record := self._queue.get()) is not None:
                self.conn.send(Answer(seq=self.seq, data=record.to_map()))
                if self._unsaid and self._queue.empty():
                    self._tell()
            if self._unsaid:  # stopping: the last word is how many never went
                self._tell()
        except OSError:
            return

    def _tell(self) -> None:
        with self._lock:
            n, self._unsaid = self._unsaid, 0
        self.conn.send(Answer(seq=self.seq, data={"dropped": n}))


class _TraceFanout:
    """The device's ``trace_records`` hook while any connection streams the trace."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self._streams: tuple[_TraceStream, ...] = ()
        self._lock = threading.Lock()

    def add(self, stream: _TraceStream) -> None:
        with self._lock:
            self._streams = (*self._streams, stream)
            self.device.trace_records = self

    def discard(self, stream: _TraceStream) -> None:
        with self._lock:
            self._streams = tuple(s for s in self._streams if s is not stream)
            if not self._streams and self.device.trace_records is self:
                self.device.trace_records = None

    def __call__(self, record: TraceRecord) -> None:
        for stream in self._streams:
            stream(record)


class DeviceServer:
    """Serve ``device`` on the Unix socket ``path``; a device given here must be built with
    ``memory=RegionMemory()`` and ``shm_backing=memfd_backing``.

    ``introspect``: answer ``query`` frames (``qtee info``/``qtee trace --connect``), which
    show every connection's labels and calls; off by default (refused with EACCES).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        device: Device | None = None,
        *,
        max_frame: int = MAX_FRAME,
        introspect: bool = False,
    ) -> None:
        from qtee.secure import QteeRoot, SecureWorld

        if type(introspect) is not bool:
            raise UsageError(f"introspect must be a bool, not {introspect!r}")

        self.path = os.fspath(path)
        self.memory = RegionMemory()
        if device is None:
            device = Device(SecureWorld(QteeRoot()), memory=self.memory, shm_backing=memfd_backing)
        elif not isinstance(device.memory, RegionMemory):
            raise UsageError("a served Device must be built with memory=RegionMemory()")
        elif device.shm_backing is not memfd_backing:
            raise UsageError("a served Device must be built with shm_backing=memfd_backing")
        else:
            self.memory = device.memory
        self.device = device
        self.max_frame = max_frame
        #: Whether ``query`` frames are answered (see the class docstring).
        self.introspect = introspect
        self._sock: socket.socket | None = None
        self._accept: threading.Thread | None = None
        self._lock = threading.Lock()
        self._conns: set[_Connection] = set()
        self._traces = _TraceFanout(device)
        self._count = 0
        self._stopping = False

    @property
    def connections(self) -> int:
        """Connections open now."""
        with self._lock:
            return len(self._conns)

    def start(self) -> DeviceServer:
        """Bind and listen; connections are served by background threads."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(self.path):
            os.unlink(self.path)
        sock.bind(self.path)
        sock.listen(64)
        self._sock = sock
        self._accept = threading.Thread(target=self._accept_loop, name="qtee-server", daemon=True)
        self._accept.start()
        return self

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping:
            try:
                sock, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self._count += 1
                conn = _Connection(self, sock, f"conn-{self._count}")
                self._conns.add(conn)
            threading.Thread(target=conn.run, name=conn.name, daemon=True).start()
            del conn  # the connection lives as long as its thread, not until the next accept

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._conns.discard(conn)

    def stop(self) -> None:
        """Stop accepting, close every connection (their contexts close), remove the socket."""
        self._stopping = True
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        for conn in conns:
            conn.closed.wait(5)
        if self._accept is not None:
            self._accept.join(5)
        if os.path.exists(self.path):
            os.unlink(self.path)

    def __enter__(self) -> DeviceServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
