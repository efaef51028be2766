"""What a device-server connection answers besides ioctls: ``watch`` (``ready`` frames
from one notifier thread whenever the fd's queue has a request) and ``query`` (``info``,
``objects``, the ``trace`` stream).  The server side of the client's
:mod:`qtee._remote.remote_queries`; a mixin of
:class:`~qtee._remote.server_conn.Connection`, which owns the attributes declared here.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Final, cast

from qtee._remote.frames import Answer, Query, Ready, Watch, encode, refusal
from qtee._remote.served import NO_THREAD, ServedFile, backoff
from qtee._remote.trace_stream import TraceStream

if TYPE_CHECKING:
    from qtee._remote.server import DeviceServer
    from qtee._remote.server_conn import Connection

__all__ = ["ConnectionQueries"]

log = logging.getLogger("qtee.server")

_INTROSPECT_OFF: Final = (
    "introspection is off: the server was not started with qtee serve --introspect"
)


class ConnectionQueries:
    """The ``watch`` and ``query`` half of a connection (the connection owns the state)."""

    server: DeviceServer
    name: str
    file: ServedFile | None
    ctx: Any
    _lock: threading.Lock
    _threads: set[threading.Thread]
    _notifier: threading.Thread | None
    _ready: threading.Event
    _hook: Any
    _notifying: bool
    _trace: TraceStream | None

    def send(self, msg: object, fd: int | None = None) -> None:
        raise NotImplementedError

    def send_frame(self, data: bytes, fd: int | None = None) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ ready
    def _watch(self, msg: Watch) -> None:
        """Start sending ``ready`` frames: the queue's hook wakes the notifier thread."""
        assert self.file is not None
        q = self.file.queue
        if q is not None and self._notifier is None:
            t = threading.Thread(target=self._notify, name=f"{self.name}-ready", daemon=True)
            try:
                t.start()
            except NO_THREAD as exc:
                log.warning("%s: no notifier thread (%s)", self.name, exc)
                self.send(refusal(msg.seq, errno.EAGAIN, "the server cannot start a notifier"))
                return
            with self._lock:
                self._notifier = t
                self._threads.add(t)
        self.send(Answer(seq=msg.seq, data={"watching": True}))
        if q is None:  # nothing is ever queued for this fd
            return
        with q.cond:  # installed and looked at under the queue's lock: no wake-up lost
            q.on_ready = self._hook
            pending = self.file.pending()
        if pending:
            self._hook()

    def _notify(self) -> None:
        """The notifier: one ``ready`` frame per wake-up; wake-ups while it sends are one
        more frame, not one each."""
        frame = encode(Ready(), max_frame=self.server.max_frame)
        delay = 0.0
        while True:
            self._ready.wait()
            if not self._notifying:
                return
            self._ready.clear()
            try:
                self.send_frame(frame)
                delay = 0.0
            except OSError:
                return  # the connection is gone (send shut it down)
            except MemoryError:
                delay = backoff(delay)
                log.warning("%s: ready frame not sent: out of memory", self.name)
                time.sleep(delay)
                self._ready.set()

    # ------------------------------------------------------------------ query
    def _query(self, msg: Query) -> None:
        """``info``: one answer; ``trace``: ``{"streaming": True}``, then the crossings
        from now until the connection closes.  Refused unless the server introspects;
        ``objects`` (what this connection's own fd holds, by name) never is."""
        if msg.what == "objects":
            from qtee._cli.info import fd_objects
            from qtee._qcomtee.call import Context

            held = fd_objects(self.ctx) if isinstance(self.ctx, Context) else {}
            self.send(
                Answer(seq=msg.seq, data={"objects": [], "callbacks": [], "memory": [], **held})
            )
            return
        if not self.server.introspect:
            self.send(refusal(msg.seq, errno.EACCES, _INTROSPECT_OFF))
            return
        if msg.what == "info":
            self.send(Answer(seq=msg.seq, data=self.server.flavour.describe()))
            return
        if not self.server.flavour.traces:
            self.send(refusal(msg.seq, errno.EOPNOTSUPP, "this device records no crossings"))
            return
        if self._trace is not None:
            self.send(refusal(msg.seq, errno.EALREADY, "this connection streams the trace"))
            return
        try:
            stream = TraceStream(cast("Connection", self), msg.seq, held=True)
        except NO_THREAD as exc:
            log.warning("%s: no trace sender thread (%s)", self.name, exc)
            self.send(refusal(msg.seq, errno.EAGAIN, "the server cannot start a trace sender"))
            return
        self._trace = stream
        self.server._traces.add(stream)  # records queue up from now: the ack is first
        self.send(Answer(seq=msg.seq, data={"streaming": True}))
        stream.go()
