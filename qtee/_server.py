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

No client can take the server down or wedge it for others:

* a waiting SUPPL_RECV holds no thread: it is parked, and the connection's one receiver
  thread serves the parked RECVs in turn as requests are queued (a non-blocking RECV in
  the driver); past :data:`RECV_LIMIT` parked ones, a SUPPL_RECV is answered EBUSY;
* a connection has at most :data:`THREAD_LIMIT` request threads; past it an
  OBJECT_INVOKE is answered EBUSY at once (nothing blocks), and the other ioctls (which
  never block) run in the thread that read them;
* the accept loop, each connection's reader and each trace sender outlive resource
  errors (no thread, EMFILE/ENFILE/ENOMEM, MemoryError): they log, pause
  (:data:`BACKOFF_FIRST` doubling to :data:`BACKOFF_MAX`) and go on, never holding a lock;
* a client that leaves the server's frames unread for :data:`SEND_TIMEOUT` seconds with its
  socket buffer full is disconnected;
* a client may ``probe`` a call it has waited on past its deadline: the ``status``
  answer says whether the call is waiting on a callback (the driver's
  ``Device.on_callback`` hook), so the client's deadline stands still meanwhile.

Shared memory is real shared memory: the server's shms live in memory files, and the fd
of each goes to the client that allocated it (a ``shm`` frame, SCM_RIGHTS), which maps
the same pages.  ``query`` frames ask for a description of the device (``qtee info
--connect``) or a live stream of its crossings (``qtee trace --connect``); both show
every connection's labels and calls, so a server answers them only when started with
``introspect=True`` (``qtee serve --introspect``) and refuses them (EACCES) otherwise.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import errno
import logging
import math
import os
import queue
import socket
import stat
import struct
import threading
import time
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
    Probe,
    Query,
    Region,
    ShmFd,
    ShmFree,
    Status,
    Welcome,
    encode,
    encode_reply,
    refusal,
)
from qtee._info import describe
from qtee._mem_obj import memfd_backing
from qtee._trace import TraceRecord
from qtee.addrspace import TASK_SIZE

__all__ = [
    "BACKOFF_FIRST",
    "BACKOFF_MAX",
    "RECV_LIMIT",
    "SEND_TIMEOUT",
    "THREAD_LIMIT",
    "DeviceServer",
    "RegionMemory",
]

log = logging.getLogger("qtee.server")

_GEN_CAPS: Final = uapi.TEE_GEN_CAP_OBJREF

#: SUPPL_RECVs one connection may have waiting in the server at once; one more is answered
#: EBUSY at once.  Waiting RECVs hold no thread: they are parked and served in turn by the
#: connection's one receiver thread as requests arrive.
RECV_LIMIT: Final = 64
#: Request threads one connection may have (the one reading and its receiver included).
#: At the limit the reader answers an OBJECT_INVOKE EBUSY and runs the other ioctls itself.
THREAD_LIMIT: Final = 96
#: Seconds one send to a client may wait for room in its socket buffer; then the client,
#: which has read nothing for that long, is disconnected.
SEND_TIMEOUT: Final = 30.0
#: First pause of a server loop after a resource error (seconds); it doubles on each error
#: in a row, up to BACKOFF_MAX, and starts again after a success.
BACKOFF_FIRST: Final = 0.01
BACKOFF_MAX: Final = 1.0
#: What starting a thread raises at the system's limits.
_NO_THREAD: Final = (RuntimeError, MemoryError)
_INTROSPECT_OFF: Final = (
    "introspection is off: the server was not started with qtee serve --introspect"
)


def _backoff(delay: float) -> float:
    """The pause after ``delay`` (0: the first error in a row)."""
    return BACKOFF_FIRST if delay <= 0 else min(delay * 2, BACKOFF_MAX)


def _efault(addr: int, size: int, why: str) -> DriverError:
    return DriverError(errno.EFAULT, f"user range {addr:#x}+{size} {why}")


class _CallRegions:
    """One request in a server thread: the regions it brought, at their addresses, which
    were written, and (for a client's probe) its callbacks in flight and since when it
    has run without one."""

    __slots__ = ("bufs", "callbacks", "quiet_since", "starts", "writable", "written")

    def __init__(self, regions: tuple[Region, ...]) -> None:
        self.starts = sorted(r.addr for r in regions)
        self.bufs = {r.addr: bytearray(r.data) for r in regions}
        self.writable = {r.addr for r in regions if r.writable}
        self.written: set[int] = set()
        self.callbacks = 0  # nesting depth of Device.on_callback(True) in this thread
        self.quiet_since = time.monotonic()

    def on_callback(self, entering: bool) -> None:
        """``Device.on_callback`` in this request's thread."""
        if entering:
            self.callbacks += 1
        else:
            self.callbacks -= 1
            if not self.callbacks:
                self.quiet_since = time.monotonic()

    def status(self, probe: Probe) -> Status:
        """The answer to a probe about this call."""
        if self.callbacks:
            return Status(seq=probe.seq, call=probe.call, running=True, callback=True)
        quiet = max(0, int((time.monotonic() - self.quiet_since) * 1000))
        return Status(seq=probe.seq, call=probe.call, running=True, quiet_ms=quiet)

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

    def current(self) -> _CallRegions | None:
        """The request running in this thread, if any."""
        call: _CallRegions | None = getattr(self._local, "call", None)
        return call

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
    is not among them.  When no thread can take the lead (``thread_limit`` reached, or the
    system starts no more threads), the leader keeps it: an OBJECT_INVOKE is answered
    EBUSY, any other ioctl (which never blocks) runs in the leader.  A SUPPL_RECV is
    parked for the receiver thread (EBUSY past ``recv_limit`` parked ones).
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
        #: SUPPL_RECVs waiting for a request, oldest first, and the thread serving them.
        self._parked: collections.deque[Ioctl] = collections.deque()
        self._parked_cond = threading.Condition(self._lock)
        self._receiver: threading.Thread | None = None
        self._calls: dict[int, _CallRegions] = {}  # seq -> the ioctl running (for probes)
        self.closed = threading.Event()
        self._trace: _TraceStream | None = None

    def send(self, msg: object, fd: int | None = None) -> None:
        """One frame; ``fd`` rides on its first bytes (SCM_RIGHTS)."""
        self.send_frame(encode(msg, max_frame=self.server.max_frame), fd)  # type: ignore[arg-type]

    def send_frame(self, data: bytes, fd: int | None = None) -> None:
        """An encoded frame; ``fd`` rides on its first bytes (SCM_RIGHTS).  A send that
        fails (the client is gone, or read nothing for SEND_TIMEOUT) may have sent part of
        the frame, so the connection is shut down: its reader sees the end."""
        with self._send:
            try:
                if fd is None:
                    self.sock.sendall(data)
                    return
                sent = socket.send_fds(self.sock, [data], [fd])
                if sent < len(data):
                    self.sock.sendall(data[sent:])
            except OSError:
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_RDWR)
                raise

    def run(self) -> None:
        """The connection's first thread (more start when every thread is busy)."""
        with self._lock:
            self._threads.add(threading.current_thread())
        self._serve()

    def _serve(self) -> None:
        """Queue up to lead; lead until an ioctl another thread can take the lead for; run
        it; again, until the stream ends.  The read lock is released on every path."""
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
                job, reason = self._lead()
            except BaseException:
                job, reason = None, "server error"
                log.exception("%s: reading failed", self.name)
            if job is None:
                with self._lock:
                    self._done = True
                    self._parked_cond.notify_all()
                self._read.release()
                self._close(reason)
                return
            self._read.release()
            self._run(*job)

    def _lead(self) -> tuple[tuple[Ioctl, _CallRegions] | None, str]:
        """Read, holding the lead, until an ioctl this thread may run while another leads
        (with its call state) or the end of the stream (None and why)."""
        while True:
            req, reason = self._next_request()
            if req is None:
                return None, reason
            cmd = req.cmd
            if cmd == uapi.TEE_IOC_SUPPL_RECV:
                if not self._park(req):
                    self._reply_now(req.seq, errno.EBUSY)
                continue
            pause = False
            with self._lock:
                handed = self._waiting > 0
                if not handed:
                    handed, pause = self._spawn()
            if handed:
                return (req, self._begin(req)), ""
            if cmd == uapi.TEE_IOC_OBJECT_INVOKE:  # may block as long as a TA takes
                self._reply_now(req.seq, errno.EBUSY)
            else:  # never blocks: run it here, still leading
                self._run(req, self._begin(req))
            if pause:  # the system starts no threads: give it a moment
                time.sleep(BACKOFF_FIRST)

    def _spawn(self) -> tuple[bool, bool]:
        """A new thread to queue for the lead, unless at the limit (with ``_lock`` held):
        ``(started, failed)``; failed: the system refused it."""
        if len(self._threads) >= self.server.thread_limit:
            return False, False
        t = threading.Thread(
            target=self._serve, name=f"{self.name}-t{len(self._threads)}", daemon=True
        )
        try:
            t.start()
        except _NO_THREAD as exc:
            log.warning("%s: no new request thread (%s): the reader keeps the lead", self.name, exc)
            return False, True
        self._threads.add(t)
        return True, False

    def _park(self, req: Ioctl) -> bool:
        """File a SUPPL_RECV for the receiver thread (started on the first); False when
        ``recv_limit`` are parked already or no receiver thread can start."""
        with self._lock:
            if len(self._parked) >= self.server.recv_limit:
                return False
            if self._receiver is None:
                t = threading.Thread(target=self._receive, name=f"{self.name}-recv", daemon=True)
                try:
                    t.start()
                except _NO_THREAD as exc:
                    log.warning("%s: no receiver thread (%s)", self.name, exc)
                    return False
                self._receiver = t
                self._threads.add(t)
            self._parked.append(req)
            self._parked_cond.notify()
            return True

    def _receive(self) -> None:
        """The receiver: serve the parked SUPPL_RECVs, oldest first, each when a request
        is queued (or the fd closes), with the driver's non-blocking RECV; one that
        would still block (the request went meanwhile) waits again."""
        assert self.ctx is not None
        requests = self.ctx.requests
        while True:
            with self._lock:
                while not self._parked and not self._done:
                    self._parked_cond.wait()
                if not self._parked:
                    return
                req = self._parked[0]
            requests.wait_ready()
            if self._run(req, self._begin(req), nowait=True):
                with self._lock:
                    self._parked.popleft()

    def _begin(self, req: Ioctl) -> _CallRegions:
        """Map the request's regions in this thread and file it for probes."""
        call = self.server.memory.begin(req.regions)
        self._calls[req.seq] = call
        return call

    def _reply_now(self, seq: int, code: int) -> None:
        """A refusal, sent by the leader (the client may be gone)."""
        with contextlib.suppress(OSError):
            self.send_frame(encode_reply(seq, code, max_frame=self.server.max_frame))

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
        if isinstance(msg, Probe):
            call = self._calls.get(msg.call)
            self.send(
                call.status(msg)
                if call is not None
                else Status(seq=msg.seq, call=msg.call, running=False)
            )
            return True
        if isinstance(msg, Query):
            self._query(msg)
            return True
        raise FrameError(f"unexpected {type(msg).__name__} from a client")

    def _run(self, req: Ioctl, call: _CallRegions, *, nowait: bool = False) -> bool:
        """Run one ioctl in this thread and send its reply (an errno reply if the driver
        model itself failed: the client must not wait for ever).  ``nowait``: the
        request is a SUPPL_RECV run without blocking; False (nothing sent) if it would
        block."""
        max_frame = self.server.max_frame
        try:
            arg = bytearray(req.arg)
            assert self.ctx is not None
            ok = False
            try:
                if nowait:
                    self.ctx.recv_nowait(arg)
                else:
                    self.ctx.ioctl(req.cmd, arg)
            except DriverError as exc:
                if nowait and exc.code == errno.EAGAIN:
                    return False
                reply = encode_reply(req.seq, exc.code, max_frame=max_frame)
            except MemoryError:
                log.error("%s: ioctl %#x (seq %d): out of memory", self.name, req.cmd, req.seq)
                reply = encode_reply(req.seq, errno.ENOMEM, max_frame=max_frame)
            except Exception:
                log.exception("%s: ioctl %#x (seq %d) failed", self.name, req.cmd, req.seq)
                reply = encode_reply(req.seq, errno.EIO, max_frame=max_frame)
            else:
                written = [(a, bytes(call.bufs[a])) for a in sorted(call.written)]
                reply = encode_reply(req.seq, 0, bytes(arg), written, max_frame=max_frame)
                ok = True
            with contextlib.suppress(OSError):  # the client is gone; its context is closing
                if req.cmd == uapi.TEE_IOC_SHM_ALLOC and ok:
                    self._send_shm_fd(req.seq, arg)
                self.send_frame(reply)
        except Exception:
            log.exception("%s: ioctl %#x (seq %d): no reply", self.name, req.cmd, req.seq)
        finally:
            self.server.memory.end()
            self._calls.pop(req.seq, None)  # after the reply: a probe after it finds none
        return True

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
        try:
            stream = _TraceStream(self, msg.seq, held=True)
        except _NO_THREAD as exc:
            log.warning("%s: no trace sender thread (%s)", self.name, exc)
            self.send(refusal(msg.seq, errno.EAGAIN, "the server cannot start a trace sender"))
            return
        self._trace = stream
        self.server._traces.add(stream)  # records queue up from now: the ack is first
        self.send(Answer(seq=msg.seq, data={"streaming": True}))
        stream.go()

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
        end = time.monotonic() + 2  # threads still in a TA's code finish on their own
        for t in threads:
            t.join(max(0.0, end - time.monotonic()))
        self.closed.set()
        self.server._forget(self)


class _TraceStream:
    """Sends one connection the crossings of the device, from a queue and its own thread
    (a slow reader never blocks the driver).  Past ``LIMIT`` queued records new ones are
    dropped and counted, and once the queue has drained the reader is told how many
    (an answer ``{"dropped": n}`` between the records).  A record that cannot be sent for
    want of memory is dropped and counted too, after a pause; the stream goes on.  The
    stream ends when the connection does (a send fails) or at :meth:`stop`.  A ``held``
    stream queues records but sends none before :meth:`go` (the query's answer goes
    first)."""

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
            self._drop()
            return
        self._queue.put(record)

    def _drop(self) -> None:
        with self._lock:
            self.dropped += 1
            self._unsaid += 1

    def go(self) -> None:
        """Start sending (a held stream)."""
        self._go.set()

    def stop(self) -> None:
        self._queue.put(None)
        self._go.set()

    def _run(self) -> None:
        self._go.wait()
        delay = 0.0
        while (record := self._queue.get()) is not None:
            try:
                self.conn.send(Answer(seq=self.seq, data=record.to_map()))
                if self._unsaid and self._queue.empty():
                    self._tell()
                delay = 0.0
            except OSError:
                return  # the connection is gone (send shut it down)
            except MemoryError:
                self._drop()
                delay = _backoff(delay)
                log.warning("%s: trace record dropped: out of memory", self.conn.name)
                time.sleep(delay)
            except Exception:
                self._drop()
                log.exception("%s: trace record dropped", self.conn.name)
        if self._unsaid:  # stopping: the last word is how many never went
            with contextlib.suppress(OSError, MemoryError):
                self._tell()

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


def _clear_stale_socket(path: str) -> None:
    """Make room to bind ``path``: nothing there, or a socket nobody listens on (removed);
    a live server's socket or any other file is a UsageError."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"{path} exists and is not a socket: not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # stale: its server is gone
        return
    except OSError:
        pass  # cannot tell (a full backlog, a timeout): someone holds it
    finally:
        probe.close()
    raise UsageError(f"a server is already listening on {path}")


def _limit(value: object, what: str, lo: int) -> int:
    if type(value) is not int or value < lo:
        raise UsageError(f"{what} must be an int >= {lo}, not {value!r}")
    return value


class DeviceServer:
    """Serve ``device`` on the Unix socket ``path``; a device given here must be built with
    ``memory=RegionMemory()`` and ``shm_backing=memfd_backing``.

    ``introspect``: answer ``query`` frames (``qtee info``/``qtee trace --connect``), which
    show every connection's labels and calls; off by default (refused with EACCES).
    ``recv_limit``/``thread_limit``: per-connection caps (:data:`RECV_LIMIT`,
    :data:`THREAD_LIMIT`).  The server sets the device's ``on_callback`` hook (to answer
    probes).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        device: Device | None = None,
        *,
        max_frame: int = MAX_FRAME,
        introspect: bool = False,
        recv_limit: int = RECV_LIMIT,
        thread_limit: int = THREAD_LIMIT,
    ) -> None:
        from qtee.secure import QteeRoot, SecureWorld

        if type(introspect) is not bool:
            raise UsageError(f"introspect must be a bool, not {introspect!r}")
        self.recv_limit = _limit(recv_limit, "recv_limit", 1)
        self.thread_limit = _limit(thread_limit, "thread_limit", 2)
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
        device.on_callback = self._on_callback
        self.max_frame = max_frame
        #: Whether ``query`` frames are answered (see the class docstring).
        self.introspect = introspect
        self._sock: socket.socket | None = None
        self._bound: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket bound
        self._accept: threading.Thread | None = None
        self._lock = threading.Lock()
        self._conns: set[_Connection] = set()
        self._traces = _TraceFanout(device)
        self._count = 0
        self._stopping = False
        self._stopped = threading.Event()  # wakes the accept loop's pauses

    @property
    def connections(self) -> int:
        """Connections open now."""
        with self._lock:
            return len(self._conns)

    def _on_callback(self, entering: bool) -> None:
        """``Device.on_callback``: a request thread's call waits on a callback, or no more."""
        call = self.memory.current()
        if call is not None:
            call.on_callback(entering)

    def start(self) -> DeviceServer:
        """Bind and listen; connections are served by background threads.

        A socket left at ``path`` by a server that is gone is replaced; anything else
        there -- a live server's socket, a file -- is a :class:`UsageError`, and stays."""
        _clear_stale_socket(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            st = os.stat(self.path)
            self._bound = (st.st_dev, st.st_ino)
            sock.listen(64)
            self._sock = sock
            self._accept = threading.Thread(
                target=self._accept_loop, name="qtee-server", daemon=True
            )
            self._accept.start()
        except BaseException:
            sock.close()
            self._sock = None
            raise
        return self

    def _accept_loop(self) -> None:
        """Accept until stopped.  A failed accept (EMFILE, ENFILE, ENOMEM...) or a new
        connection that gets no thread is logged, and the loop pauses (BACKOFF_FIRST,
        doubling to BACKOFF_MAX) and goes on; the pause ends early at :meth:`stop`."""
        listener = self._sock
        assert listener is not None
        delay = 0.0
        while not self._stopping:
            try:
                sock, _ = listener.accept()
            except OSError as exc:
                if self._stopping or listener.fileno() < 0:
                    return
                delay = _backoff(delay)
                log.warning("accept failed (%s); again in %.2f s", exc, delay)
                self._stopped.wait(delay)
                continue
            try:
                self._serve_new(sock)
            except (*_NO_THREAD, OSError) as exc:
                with contextlib.suppress(OSError):
                    sock.close()  # the client sees the end of the stream
                delay = _backoff(delay)
                log.warning("a new connection was closed unserved (%s); pause %.2f s", exc, delay)
                self._stopped.wait(delay)
                continue
            delay = 0.0

    def _serve_new(self, sock: socket.socket) -> None:
        """File a new connection and start its first thread."""
        sec = math.floor(SEND_TIMEOUT)
        timeval = struct.pack("@ll", sec, int((SEND_TIMEOUT - sec) * 1_000_000))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        with self._lock:
            self._count += 1
            conn = _Connection(self, sock, f"conn-{self._count}")
            self._conns.add(conn)
        try:
            threading.Thread(target=conn.run, name=conn.name, daemon=True).start()
        except BaseException:
            self._forget(conn)
            raise

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._conns.discard(conn)

    def stop(self) -> None:
        """Stop accepting, close every connection (their contexts close), remove the socket."""
        self._stopping = True
        self._stopped.set()
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
        try:  # only the socket this server bound: another may have taken the path since
            st = os.stat(self.path)
        except OSError:
            return
        if (st.st_dev, st.st_ino) == self._bound and stat.S_ISSOCK(st.st_mode):
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def __enter__(self) -> DeviceServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
