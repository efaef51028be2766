"""One connection of the device server: the threads that serve one open fd.

A :class:`Connection` reads its client's frames leader/follower style (one thread reads
and runs the ioctls it reads, and hands the reading on when one waits on a callback or runs
long), parks waiting SUPPL_RECVs for one
receiver thread, sends ``ready`` frames to a watching client from one notifier thread,
and streams the trace from one sender thread (``trace_stream``).  What the fd is -- a
QTEE context, an OP-TEE client or supplicant context -- is the business of a
``ServedFile`` made by the server's ``Flavour`` (``served``; ``server``,
``server_optee``); the connection only moves frames and runs calls.  The caps and pauses
are the server's (``served``; ``qtee._remote.server`` re-exports the constants).  Its
lifecycle is the table in ``conn_state``.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Final

from objects import DriverError, UsageError
from qtee import _reason, uapi
from qtee._remote.conn_state import CONNECTION_STATES, ConnEvent, ConnState
from qtee._remote.frames import (
    PROTOCOL_VERSION,
    Bye,
    Close,
    Denied,
    FrameDecoder,
    FrameError,
    Hello,
    Ioctl,
    Probe,
    Query,
    RecvNowait,
    ShmFd,
    ShmFree,
    Status,
    Watch,
    Welcome,
    encode,
    encode_reply,
)
from qtee._remote.region_memory import CallRegions, RegionMemory
from qtee._remote.served import BACKOFF_FIRST, NO_THREAD, Peer, ServedFile
from qtee._remote.server_queries import ConnectionQueries
from qtee._remote.trace_stream import TraceStream

if TYPE_CHECKING:
    from qtee._remote.server import DeviceServer

__all__ = ["Connection"]

log = logging.getLogger("qtee.server")

_SUPPL_RECV: Final = uapi.TEE_IOC_SUPPL_RECV
_OBJECT_INVOKE: Final = uapi.TEE_IOC_OBJECT_INVOKE
#: Calls whose reply carries the secure side's note (a QTEE invocation, a GP call).
_NOTED: Final = frozenset({_OBJECT_INVOKE, uapi.TEE_IOC_OPEN_SESSION, uapi.TEE_IOC_INVOKE})
_SHM_ALLOC: Final = uapi.TEE_IOC_SHM_ALLOC
_CALLS: Final = (Ioctl, RecvNowait)  # (a tuple: a union is built per use)


class Connection(ConnectionQueries):
    """One client: its fd and the threads that serve it, leader/follower style.

    One thread at a time (the leader) reads the socket.  Control frames it handles itself;
    when it has an ioctl and a thread waits to take the lead (one is started if none
    waits), it runs the ioctl keeping the lead, which goes to that thread when the call
    waits on a callback or runs past ``LEND`` (``server_watch.LeadWatch``): a quick call is
    answered with no thread woken, and a long one holds up no other frame of the fd.
    A thread whose ioctl is done queues up to lead again; one blocked in SUPPL_RECV simply
    is not among them.  When no thread can take the lead (``thread_limit`` reached, or the
    system starts no more threads), the leader keeps it: an OBJECT_INVOKE is answered
    EBUSY, any other ioctl (which never blocks) runs in the leader.  A SUPPL_RECV is
    parked for the receiver thread (EBUSY past ``recv_limit`` parked ones); a
    ``recv_nowait`` runs in the leader.  After a ``watch``, a notifier thread sends a
    ``ready`` frame whenever the fd's queue calls its ``on_ready`` hook (which only sets
    an event: the TA thread that queues never waits on the socket).
    """

    def __init__(
        self, server: DeviceServer, sock: socket.socket, name: str, peer: Peer | None = None
    ) -> None:
        self.server = server
        self.sock = sock
        self.name = name
        self.peer = peer
        self.file: ServedFile | None = None
        self.ctx: Any = None  # self.file.ctx, once the hello has opened it
        self._send = threading.Lock()
        self._read = threading.Lock()  # held by the leader
        self._decoder = FrameDecoder(max_frame=server.max_frame)
        self._threads: set[threading.Thread] = set()
        self._waiting = 0  # threads queued to lead
        #: CONNECTION_STATES, moved under ``_lock``; from ENDING threads that get the
        #: lead leave.
        self.state = ConnState.ACCEPTED
        self._lock = threading.Lock()
        #: SUPPL_RECVs waiting for a request, oldest first (each with the regions its
        #: first try mapped), and the thread serving them.
        self._parked: collections.deque[tuple[Ioctl, CallRegions]] = collections.deque()
        self._parked_cond = threading.Condition(self._lock)
        self._receiver: threading.Thread | None = None
        self._calls: dict[int, CallRegions] = {}  # seq -> the ioctl running (for probes)
        #: ``ready`` notifications: the queue's hook sets the event, the notifier sends.
        self._ready = threading.Event()
        self._hook = self._ready.set
        self._notifier: threading.Thread | None = None
        self._notifying = True
        self.closed = threading.Event()
        self._trace: TraceStream | None = None
        #: The ioctl the leader runs while it keeps the lead (see :meth:`_run_lent`).
        self._lent: CallRegions | None = None
        self._lender = self._take_back  # (bound once: every lent call gets it)

    @property
    def memory(self) -> RegionMemory:
        return self.server.memory

    def _move(self, event: ConnEvent) -> None:
        """Move through :data:`CONNECTION_STATES` (with ``_lock`` held; an illegal move
        raises and changes nothing)."""
        self.state = CONNECTION_STATES.move(self.state, event)

    @property
    def _done(self) -> bool:
        """The stream ended: threads that get the lead leave."""
        return self.state >= ConnState.ENDING

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

    def say_bye(self, reason: str, wait: float = 0.2) -> None:
        """The last frame, ``bye`` with ``reason``, if it can go without blocking: the
        client's calls then fail saying why (a send in progress for longer than ``wait``,
        or a full socket buffer, and the client sees only the end of the stream)."""
        data = encode(Bye(reason=reason[:200]))
        with self._lock:
            if not CONNECTION_STATES.allows(self.state, ConnEvent.BYE):
                return  # closed: the socket is gone
            self._move(ConnEvent.BYE)
        if not self._send.acquire(timeout=wait):
            return
        try:
            with contextlib.suppress(OSError):
                self.sock.send(data, socket.MSG_DONTWAIT)
        finally:
            self._send.release()

    def run(self) -> None:
        """The connection's first thread (more start when every thread is busy)."""
        with self._lock:
            self._threads.add(threading.current_thread())
        self._serve()

    def _serve(self) -> None:
        """Queue up to lead; lead until an ioctl another thread can take the lead for; run
        it, keeping the lead unless it is taken back meanwhile (:meth:`_run_lent`); lead
        on, or queue up again, until the stream ends.  The read lock is released on every
        path."""
        while True:
            with self._lock:
                self._waiting += 1
            self._read.acquire()
            with self._lock:
                self._waiting -= 1
                if self.state >= ConnState.ENDING:  # _done, inline: once per request
                    self._read.release()
                    return
            while True:
                try:
                    job, reason = self._lead()
                except BaseException:
                    job, reason = None, "server error"
                    log.exception("%s: reading failed", self.name)
                if job is None:
                    with self._lock:
                        self._move(ConnEvent.END)
                        self._parked_cond.notify_all()
                    self._read.release()
                    self._close(reason)
                    return
                if not self._run_lent(*job):
                    break

    def _run_lent(self, req: Ioctl | RecvNowait, call: CallRegions) -> bool:
        """Run an ioctl in the leader, which keeps the lead (a waiting thread is there to
        take it): the call waiting on a callback (``call.lender``), or running for
        ``LEND`` s (``server_watch.LeadWatch``), hands the reading to that thread.  True if
        this thread still leads."""
        self._lent = call
        if not self.server.lead_watch.lend(self):
            self._lent = None
            self._read.release()
            self._run(req, call)
            return False
        call.lender = self._lender
        self._run(req, call)
        with self._lock:
            kept = self._lent is call
            if kept:  # (else another leader may have lent it since)
                self._lent = None
        return kept

    def _take_back(self, call: CallRegions) -> None:
        """The leader's ioctl ``call`` waits on a callback or runs long: the reading goes to
        a waiting thread (once; from the leader's thread or the lead watch)."""
        with self._lock:
            if self._lent is not call:
                return
            self._lent = None
        self._read.release()

    def _lead(self) -> tuple[tuple[Ioctl | RecvNowait, CallRegions] | None, str]:
        """Read, holding the lead, until an ioctl this thread may run while another leads
        (with its call state) or the end of the stream (None and why).  Control frames on
        the way are handled here (:meth:`_handle`).  (The reading is inline, not a method of
        its own: a call and a tuple fewer per request.)"""
        decoder = self._decoder
        while True:
            try:
                # (a frame left in the decoder's buffer: an empty one needs no call)
                req = decoder.feed_next() if decoder.pending else None
                while req is None:
                    data = self.sock.recv(1 << 16)
                    if not data:
                        return None, "end of stream"
                    req = decoder.feed_next(data)
                if not isinstance(req, _CALLS) or self.state is not ConnState.SERVING:
                    end = self._handle(req)
                    if end is not None:
                        return None, end
                    continue
            except FrameError as exc:
                return None, self._bad_frame(exc)
            except OSError as exc:
                return None, f"socket error: {exc}"
            cmd = req.cmd
            if cmd == _SUPPL_RECV:  # (a recv_nowait's cmd too: one test for the others)
                if isinstance(req, RecvNowait):  # never blocks: here, still leading
                    self._run(req, self._begin(req), nowait=True)
                    continue
                assert self.file is not None
                if self.file.queue is None:  # no RECV on this fd: it fails at once
                    self._run(req, self._begin(req))
                elif self._run(req, call := self._begin(req), nowait=True, park=True):
                    pass  # answered now: a request was queued, or the RECV is bad (errno)
                elif not self._park(req, call):
                    self._reply_now(req.seq, errno.EBUSY)
                continue
            pause = False
            # (a thread counted in _waiting leaves the count only once it has the read
            # lock this thread holds: a count seen without _lock stands)
            handed = self._waiting > 0
            if not handed:
                with self._lock:
                    handed = self._waiting > 0
                    if not handed:
                        handed, pause = self._spawn()
            if handed:
                return (req, self._begin(req)), ""
            if cmd == _OBJECT_INVOKE:  # may block as long as a TA takes
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
        except NO_THREAD as exc:
            log.warning("%s: no new request thread (%s): the reader keeps the lead", self.name, exc)
            return False, True
        self._threads.add(t)
        return True, False

    def _park(self, req: Ioctl, call: CallRegions) -> bool:
        """File a SUPPL_RECV for the receiver thread (started on the first); False when
        ``recv_limit`` are parked already or no receiver thread can start."""
        with self._lock:
            if len(self._parked) >= self.server.recv_limit:
                return False
            if self._receiver is None:
                t = threading.Thread(target=self._receive, name=f"{self.name}-recv", daemon=True)
                try:
                    t.start()
                except NO_THREAD as exc:
                    log.warning("%s: no receiver thread (%s)", self.name, exc)
                    return False
                self._receiver = t
                self._threads.add(t)
            self._parked.append((req, call))
            self._parked_cond.notify()
            return True

    def _receive(self) -> None:
        """The receiver: serve the parked SUPPL_RECVs, oldest first, each when a request
        is queued (or the fd closes, or the stream ends), with the driver's non-blocking
        RECV; one that would still block (the request went meanwhile) waits again."""
        file = self.file
        assert file is not None and file.queue is not None
        q = file.queue
        while True:
            with self._lock:
                while not self._parked and not self._done:
                    self._parked_cond.wait()
                if not self._parked:
                    return
                req, call = self._parked[0]
            with q.cond:
                q.cond.wait_for(lambda: file.pending() or self._done)
                q.cond.notify()  # the wake-up may have been meant for another waiter
            if self._run(req, self._resume(req, call), nowait=True, park=True):
                with self._lock:
                    self._parked.popleft()

    def _begin(self, req: Ioctl | RecvNowait) -> CallRegions:
        """Map the request's regions in this thread and file it for probes."""
        call = self.server.memory.begin(req.regions, self.peer)
        self._calls[req.seq] = call
        return call

    def _resume(self, req: Ioctl, call: CallRegions) -> CallRegions:
        """:meth:`_begin` for a parked RECV's next try: its last try's regions, which that
        try (a RECV that would wait) left as they came, else (anything written) new ones.
        (A RECV brings two regions: not copying them again is most of a parked one's cost.)"""
        if call.written:
            return self._begin(req)
        call.quiet_since = time.monotonic()  # as a new CallRegions starts
        self.server.memory.resume(call)
        self._calls[req.seq] = call
        return call

    def _reply_now(self, seq: int, code: int) -> None:
        """A refusal, sent by the leader (the client may be gone)."""
        with contextlib.suppress(OSError):
            self.send_frame(encode_reply(seq, code, max_frame=self.server.max_frame))

    def _bad_frame(self, exc: FrameError) -> str:
        """The leader read a bad frame: a ``bye`` saying why, if it can go; why it ends."""
        log.warning("%s: closing: bad frame: %s", self.name, exc)
        with self._lock:
            self._move(ConnEvent.BYE)
        with contextlib.suppress(OSError):
            self.send(Bye(reason=str(exc)[:200]))
        return f"bad frame: {exc}"

    def _handle(self, msg: object) -> str | None:
        """A control frame; why the connection ends, or None to go on."""
        if self.state is ConnState.ACCEPTED:
            if not isinstance(msg, Hello):
                raise FrameError(f"expected hello first, got {type(msg).__name__}")
            if msg.version != PROTOCOL_VERSION:
                raise FrameError(f"protocol version {msg.version} is not {PROTOCOL_VERSION}")
            flavour = self.server.flavour
            self.name = self.server._named()
            threading.current_thread().name = self.name
            try:
                self.file = flavour.open(msg.node, f"{self.name} ({msg.client})")
            except DriverError as exc:
                code = exc.errno or errno.EIO
                self.send(Denied(errno=code, reason=str(exc)[:200]))
                return f"open of {msg.node} failed: {os.strerror(code)}"
            self.ctx = self.file.ctx
            with self._lock:
                self._move(ConnEvent.WELCOME)
            self.send(
                Welcome(impl_id=flavour.impl_id, gen_caps=flavour.gen_caps, server=flavour.server)
            )
            return None
        if isinstance(msg, Close):
            return "client said close"
        if isinstance(msg, ShmFree):
            try:
                self.ctx.shm_free(msg.id)
            except DriverError as exc:
                raise FrameError(f"shm_free of shm {msg.id}: {exc}") from None
            return None
        if isinstance(msg, Probe):
            call = self._calls.get(msg.call)
            self.send(
                call.status(msg)
                if call is not None
                else Status(seq=msg.seq, call=msg.call, running=False)
            )
            return None
        if isinstance(msg, Query):
            self._query(msg)
            return None
        if isinstance(msg, Watch):
            self._watch(msg)
            return None
        raise FrameError(f"unexpected {type(msg).__name__} from a client")

    def _run(
        self,
        req: Ioctl | RecvNowait,
        call: CallRegions,
        *,
        nowait: bool = False,
        park: bool = False,
    ) -> bool:
        """Run one ioctl in this thread and send its reply (an errno reply if the driver
        model itself failed: the client must not wait for ever).  ``nowait``: a SUPPL_RECV
        run without blocking (EAGAIN when nothing is queued); ``park``: a parked one, for
        which EAGAIN is no answer (False, nothing sent: it waits again)."""
        max_frame = self.server.max_frame
        file = self.file
        assert file is not None
        try:
            arg = bytearray(req.arg)
            ok = False
            try:
                plain = file.plain
                if not plain:
                    file.before(req.cmd, req.arg, call)
                _reason.clear()  # the secure side notes why it fails this call, on this thread
                # (the plain ioctl tests nowait alone)
                if nowait and (recv := getattr(self.ctx, "recv_nowait", None)) is not None:
                    recv(arg)
                else:  # the fd has no queue: SUPPL_RECV fails as the ioctl does
                    self.ctx.ioctl(req.cmd, arg)
                extra = None if plain else file.after(req.cmd, bytes(arg), call)
            except DriverError as exc:
                if park and exc.code == errno.EAGAIN:
                    return False
                reply = encode_reply(req.seq, exc.code, max_frame=max_frame)
            except MemoryError:
                log.error("%s: ioctl %#x (seq %d): out of memory", self.name, req.cmd, req.seq)
                reply = encode_reply(req.seq, errno.ENOMEM, max_frame=max_frame)
            except Exception:
                log.exception("%s: ioctl %#x (seq %d) failed", self.name, req.cmd, req.seq)
                reply = encode_reply(req.seq, errno.EIO, max_frame=max_frame)
            else:
                # (the buffers themselves, packed as bytes are: no copy; the starts differ,
                # so the pairs sort by address)
                written: list[tuple[int, bytes | bytearray]] = sorted(call.written.items())
                if extra:
                    written = sorted([*written, *extra])
                note = _reason.take()
                why = None
                if note is not None and req.cmd in _NOTED:  # model-only, for the client
                    why = (note.result, note.name, note.detail)
                try:
                    reply = encode_reply(req.seq, 0, arg, written, max_frame, why)
                    ok = True
                except UsageError:  # what the call wrote does not fit a frame
                    log.error("%s: ioctl %#x (seq %d): reply too big", self.name, req.cmd, req.seq)
                    reply = encode_reply(req.seq, errno.EIO, max_frame=max_frame)
            try:
                if req.cmd == _SHM_ALLOC and ok:
                    self._send_shm_fd(req.seq, arg)
                with self._send:  # send_frame without the call (no fd rides on a reply)
                    try:
                        self.sock.sendall(reply)
                    except OSError:
                        with contextlib.suppress(OSError):
                            self.sock.shutdown(socket.SHUT_RDWR)
                        raise
            except OSError:  # the client is gone; its context is closing
                pass
        except Exception:
            log.exception("%s: ioctl %#x (seq %d): no reply", self.name, req.cmd, req.seq)
        finally:
            self.server.memory.end()
            self._calls.pop(req.seq, None)  # after the reply: a probe after it finds none
        return True

    def _send_shm_fd(self, seq: int, arg: bytearray) -> None:
        """The new shm's memory file goes to the client; the server keeps only its mapping."""
        data = uapi.ShmAllocData.unpack(arg)
        assert self.file is not None
        fd = self.file.shm_fd(data.id)
        if fd is None:
            raise UsageError("a served device must put shms in memory files")
        try:
            self.send(ShmFd(seq=seq, id=data.id, size=data.size), fd)
        finally:
            os.close(fd)

    def _close(self, reason: str) -> None:
        """The fd's close: run by the thread that saw the end of the stream."""
        log.info("%s: closed (%s)", self.name, reason)
        if self._trace is not None:
            self.server._traces.discard(self._trace)
            self._trace.stop()
        if self.ctx is not None:
            self.ctx.close()  # wakes the threads blocked in SUPPL_RECV or a callback
        q = self.file.queue if self.file is not None else None
        if q is not None:
            with q.cond:
                if q.on_ready is self._hook:
                    q.on_ready = None
                q.cond.notify_all()  # the receiver sees _done
        self._notifying = False
        self._ready.set()
        with contextlib.suppress(OSError):
            self.sock.close()
        me = threading.current_thread()
        with self._lock:
            threads = [t for t in self._threads if t is not me]
        end = time.monotonic() + 2  # threads still in a TA's code finish on their own
        for t in threads:
            t.join(max(0.0, end - time.monotonic()))
        with self._lock:
            self._move(ConnEvent.CLOSE)
        self.closed.set()
        self.server._forget(self)
