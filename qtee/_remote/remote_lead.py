"""Reading a connection's socket: who reads, and who is handed what it reads
(leader/follower).

No thread reads the socket for nobody.  A caller whose reply is due reads it itself when
nobody does (it leads: :meth:`RemoteLead._lead`), filing each frame for its call (replies
there, shm fds, probe answers, query answers and ``ready`` in :meth:`RemoteLead._file`),
until its own reply comes; then it stops and wakes one caller with a deadline that waits,
to read in its place (:meth:`RemoteLead._pass_lead`).  A caller whose reply another thread
files is woken with it: one thread switch, not two.

A call without a deadline (a blocking SUPPL_RECV) reads only through one lazy delegate at a
time, which reads while nobody else does, looks every :data:`_LAZY` s whether anyone does,
and stops after another caller's reply (that caller reads its own next reply); the other
lazy calls wait until the delegate is answered and wakes one to take its place.  A leader's
deadline bounds its read (``SO_RCVTIMEO``, no poll before it).  A thread is kept reading
(:meth:`RemoteLead._read_loop`, a lazy waiter never answered) only while a query or a
``watch`` needs one.  The end of the stream (a bye, EOF, a bad frame) is seen by the
leader, which keeps the lead for good and fails every call in flight.
"""

from __future__ import annotations

import array
import collections
import contextlib
import errno
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
from typing import Any, Final

from objects import DriverError
from qtee._remote.frames import (
    Answer,
    Bye,
    FrameDecoder,
    FrameError,
    IoctlReply,
    Ready,
    ShmFd,
    Status,
)
from qtee._remote.remote_shm import RemoteShms

__all__ = ["RemoteLead"]

log = logging.getLogger("qtee.remote")

#: fds one read may bring (a shm frame carries one).
_MAX_FDS: Final = 16
_FD_SPACE: Final = socket.CMSG_LEN(_MAX_FDS * 4)  # as socket.recv_fds asks for them
_MSG_CTRUNC: Final = int(socket.MSG_CTRUNC)  # a plain int: ``&`` with the IntFlag is 3 calls
_SOL_SOCKET: Final = int(socket.SOL_SOCKET)
_SCM_RIGHTS: Final = int(socket.SCM_RIGHTS)
#: How often a thread waiting for a probe's answer looks for it.
_POLL: Final = 0.005
#: How long a failed send waits for the reader to see why the server went away.
_READER_GRACE: Final = 1.0
#: How often a thread whose wait has no deadline (a blocking SUPPL_RECV, the reader kept
#: for ``ready`` frames and query answers) looks whether anyone reads the socket.
_LAZY: Final = 0.002
#: How long the reader kept for queries (no ``watch``) reads before it looks whether a
#: query still waits.
_KEPT_READS: Final = 0.1
_TIMEVAL: Final = struct.Struct("@ll")
_monotonic: Final = time.monotonic
_new_lock: Final = threading.Lock
#: What :meth:`RemoteLead._lead` ends with: ``end`` passed (or a lazy reader stops), the
#: leader's own reply filed (its ``done`` still held: nobody need release it to itself),
#: or the stream ended (every call in flight released).
_STOPPED: Final = 0
_ANSWERED: Final = 1
_ENDED: Final = 2


class _Closed(DriverError):
    """The server closed the connection (the end of the stream)."""


class _Bye(Exception):
    """The server said bye (the end of the stream, and why)."""


class _Call:
    """One ioctl in flight: ``done`` is held until its reply (or the loss) is in; the
    thread reading the socket files the reply, the shm a SHM_ALLOC's fd frame brought, a
    probe's status, or why the server's frames for it are lies.  ``waiting``: its thread
    waits on ``done`` and may be woken to read (``lead``); ``lazy``: its wait has no
    deadline (a blocking SUPPL_RECV; see :meth:`RemoteLead._wait_lazy`)."""

    # (No __slots__: what most calls never change is a class default, not a store per call.)
    lazy = waiting = lead = False
    reply: IoctlReply | None = None
    shm: tuple[int, int, mmap.mmap | bytearray, int] | None = None  # id, size, map, fd
    status: Status | None = None
    lie: str | None = None

    def __init__(self, cmd: int, lazy: bool = False) -> None:
        self.cmd = cmd
        if lazy:
            self.lazy = True
        self.done = done = _new_lock()
        done.acquire()

    def probed(self) -> Status | None:
        """The answer to the last probe, once the reader has filed it."""
        return self.status


class RemoteLead(RemoteShms):
    """The socket-reading half of :class:`~qtee._remote.remote.RemoteContext` (a mixin: the
    context owns the attributes declared here)."""

    _decoder: FrameDecoder
    _poll: select.poll
    #: What a read waits at most (SO_RCVTIMEO; inf: for ever), and what it waits now.
    _rcv_base: float
    _rcv_now: float
    #: Someone reads the socket (the leader); once the stream has ended, for good.
    _leading: bool
    _ended: bool
    _end: threading.Event  # set once the end of the stream is handled
    _reader: threading.Thread | None  # kept while queries or a watch need it
    #: The lazy call that reads when nobody does, and the others, waiting to take over.
    _delegate: _Call | None
    _lazies: collections.deque[_Call]
    _followers: int  # callers with a deadline waiting (``waiting``)
    _streams: dict[int, Callable[[dict[str, Any]], None]]
    _on_ready: Callable[[], None] | None
    _watching: bool
    _told_lost: bool

    # ------------------------------------------------------------------ socket
    def _set_rcv(self, seconds: float) -> None:
        """How long a read may wait (SO_RCVTIMEO, set by the thread that reads)."""
        self.sock.setsockopt(_SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))
        self._rcv_now = seconds

    def _read_one(self, end: float | None = None) -> object | None:
        """The next frame; None if none is in by ``end`` (a ``time.monotonic()``).  A read
        waits at most SO_RCVTIMEO (no poll before it: a call releases the GIL, and every
        release may hand it to another thread)."""
        decoder = self._decoder
        # (a frame left in the decoder's buffer first; an empty buffer needs no call)
        msg = decoder.feed_next() if decoder.pending else None
        while msg is None:
            if end is not None:
                left = end - _monotonic()
                if left <= 0:
                    if not self._poll.poll(0):
                        return None
                elif left + _POLL < self._rcv_now:  # (within _POLL of it: late by as much)
                    self._set_rcv(max(left, 0.001))  # (0 would be no limit at all)
            try:
                # socket.recv_fds, inline (a Python function, run for every frame).
                data, ancdata, flags, _ = self.sock.recvmsg(1 << 16, _FD_SPACE)
            except BlockingIOError:  # SO_RCVTIMEO: nothing came in time
                if self._rcv_now < self._rcv_base:  # shortened for a deadline: back
                    self._set_rcv(self._rcv_base)
                continue
            if ancdata:  # (most reads bring no fd)
                for level, kind, cdata in ancdata:
                    if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
                        fds = array.array("i")
                        fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
                        self._fds.extend(fds)
            if flags & _MSG_CTRUNC:
                raise DriverError(errno.EPROTO, "the server sent more fds than one read takes")
            if not data:
                raise _Closed(errno.EPROTO, "server closed the connection")
            msg = decoder.feed_next(data)
        return msg

    def _file(self, msg: object) -> None:
        """File one frame from the server other than a reply (:meth:`_lead` files those).
        A bye raises :class:`_Bye` with what it said, a frame no client expects
        DriverError."""
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

    def _lead(self, call: _Call, end: float | None) -> int:
        """Read the socket (this thread leads) and file what comes until ``call`` is
        answered (:data:`_ANSWERED`: its ``done`` is left held, the reader has its reply)
        or the stream ends (:data:`_ENDED`), or ``end`` passes (:data:`_STOPPED`); a lazy
        call stops after another call's reply too (:data:`_STOPPED`): that caller reads its
        next one itself.  The lead is passed on (:meth:`_pass_lead`) before it returns."""
        reason = "connection closed"
        passed = False
        try:
            try:
                while True:
                    msg = self._read_one(end)
                    if msg is None:
                        return _STOPPED
                    answered: _Call | None = None
                    if isinstance(msg, IoctlReply):  # (filed here: one call fewer per reply)
                        with self._lock:
                            answered = self._pending.pop(msg.seq, None)
                            if answered is call:  # (the reader: neither waiting nor woken)
                                call.reply = msg
                                passed = True  # (under the lock held already)
                                self._hand_on()
                                return _ANSWERED
                            if answered is not None:
                                answered.reply = msg
                                # woken to read: that wakes it
                                woken, answered.lead = answered.lead, False
                                if answered.waiting:
                                    self._unwait(answered)
                        if answered is None:
                            raise DriverError(errno.EPROTO, f"a reply for no call ({msg.seq})")
                        if not woken:
                            answered.done.release()
                    else:
                        self._file(msg)
                    if call.lazy and (
                        answered is not None  # that caller reads its next reply itself
                        or (call.cmd == 0 and not (self._watching or self._streams))
                    ):
                        return _STOPPED
            except _Bye as exc:
                reason = str(exc)
            except _Closed:
                reason = f"the server at {self.device.path} closed the connection"
            except (DriverError, FrameError, OSError) as exc:
                reason = str(exc)
            self._end_stream(reason)
            return _ENDED
        finally:
            if not passed:
                self._pass_lead()

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
            self._hand_on()

    def _hand_on(self) -> None:
        """:meth:`_pass_lead` with ``_lock`` held."""
        if not self._ended:
            self._leading = False
            if self._followers:
                self._promote()

    def _wait(self, call: _Call, timeout: float | None) -> bool:
        """Wait for ``call``'s reply or the loss (True), at most ``timeout`` s (False).
        If nobody reads the socket this thread reads it, filing what comes for the others,
        until its own reply; else it waits to be handed its reply, or the reading.  (A call
        with a deadline: a lazy one waits in :meth:`_wait_lazy`.)"""
        end = None if timeout is None else _monotonic() + timeout
        while True:
            if call.done.acquire(False):  # answered already
                return True
            with self._lock:
                lead = not self._leading
                if lead:
                    self._leading = True
                else:
                    call.waiting = True
                    self._followers += 1
            if lead:
                led = self._lead(call, end)
                if led == _ENDED:
                    call.done.acquire()  # released by the loss
                return led != _STOPPED
            try:
                got = call.done.acquire(
                    timeout=-1.0 if end is None else max(0.0, end - _monotonic())
                )
            except BaseException:  # interrupted (Ctrl-C): a wake-up to read goes on
                with self._lock:
                    self._unwait(call)
                    if call.lead:
                        call.lead = False
                        call.done.acquire(False)
                        self._promote()
                raise
            with self._lock:
                self._unwait(call)
                promoted, call.lead = call.lead, False
                if promoted and not got:  # woken to read as the wait ran out
                    got = call.done.acquire(False)
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
                if call.done.acquire(False):  # answered already
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
                    led = self._lead(call, end)
                    if led:
                        if not call.cmd:  # the kept reader saw the end: nobody answers it
                            return False
                        if led == _ENDED:
                            call.done.acquire()  # released by the loss
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
                if self._lazies and call in self._lazies:
                    self._lazies.remove(call)
                if call.lead:  # made the delegate as it stopped waiting (Ctrl-C)
                    call.lead = False
                    call.done.acquire(False)
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
        self._lead(_Call(0), _monotonic() + grace)

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


def _timeval(seconds: float) -> bytes:
    """A ``struct timeval`` for SO_SNDTIMEO/SO_RCVTIMEO (inf: all zero, no limit)."""
    if seconds == math.inf:
        return _TIMEVAL.pack(0, 0)
    sec = math.floor(seconds)
    return _TIMEVAL.pack(sec, int((seconds - sec) * 1_000_000))
