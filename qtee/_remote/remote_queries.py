"""What a connection asks the server besides ioctls: ``ready`` frames (``watch``, the
``on_ready`` hook), the server's description (``info``), what the fd holds
(``held_objects``) and the trace stream (``stream_trace``).

Each is a request frame whose answers go to a sink filed under its ``seq`` (the reader
calls it with each ``answer``, and with ``{}`` when the connection ends); a refusal
(:func:`~qtee._remote.frames.refused`) is raised as its errno.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from typing import Any

from objects import DriverError, UsageError
from qtee._remote.frames import Query, Watch, encode, refused
from qtee._remote.remote_send import RemoteSender

__all__ = ["RemoteQueries"]


class RemoteQueries(RemoteSender):
    """The query half of :class:`~qtee._remote.remote.RemoteContext` (a mixin: the context
    owns the attributes declared here)."""

    #: seq -> the sink of that query's answers.
    _streams: dict[int, Callable[[dict[str, Any]], None]]
    _on_ready: Callable[[], None] | None
    _watching: bool
    _told_lost: bool

    def _ready(self) -> None:
        raise NotImplementedError

    def _reading(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ ready
    @property
    def on_ready(self) -> Callable[[], None] | None:
        """Called from the thread reading the socket whenever the server says a request was
        queued on this fd (several may come as one call), and once when the connection is
        lost or closed; it must not block.  Setting it the first time asks the server to watch
        the fd (a ``watch`` frame, answered within ``timeout`` of :meth:`watch`); a
        connection already lost calls it at once.  None: no more calls."""
        return self._on_ready

    @on_ready.setter
    def on_ready(self, hook: Callable[[], None] | None) -> None:
        if hook is not None and not callable(hook):
            raise UsageError(f"on_ready must be callable or None, not {type(hook).__name__}")
        self._on_ready = hook
        if hook is None:
            return
        if not self._watching and not self._told_lost:
            try:
                self.watch()
            except DriverError:
                if self._lost is None:
                    raise
        if self._told_lost:  # lost before, or while, it was set: tell it now
            self._ready()

    def watch(self, timeout: float = 5.0) -> None:
        """Ask the server for ``ready`` frames on this fd (idempotent); DriverError if it
        refuses (EAGAIN: no thread for it), does not answer, or the connection is lost."""
        if self._watching:
            return
        got: list[dict[str, Any]] = []
        done = threading.Event()

        def answer(data: dict[str, Any]) -> None:
            got.append(data)
            done.set()

        with self._lock:
            self._watching = True  # a ready may beat the answer
        seq = self._request(lambda seq: encode(Watch(seq=seq)), self._streams, answer)
        self._reading()
        try:
            if not done.wait(timeout):  # it may watch all the same: ready frames are fine
                raise DriverError(errno.ETIMEDOUT, "the server did not answer the watch")
            if not got[0]:
                raise DriverError(errno.EBADF, f"connection lost: {self._lost}")
            no = refused(got[0])
            if no is not None:
                with self._lock:
                    self._watching = False  # it does not: ready frames are lies
                raise DriverError(*no)
            if got[0] != {"watching": True}:
                raise DriverError(errno.EPROTO, f"the server answered a watch with {got[0]!r}")
        finally:
            with self._lock:
                self._streams.pop(seq, None)

    def info(self, timeout: float = 5.0) -> dict[str, Any]:
        """The server's description of its device (what ``qtee info`` prints); EACCES when
        the server does not allow introspection (``qtee serve --introspect``)."""
        return self._ask("info", timeout, "the server did not describe itself")

    def held_objects(self, timeout: float = 2.0) -> dict[str, Any]:
        """What this fd holds on the server, by name (model-only; ``qtee._cli.info.fd_objects``):
        ``objects`` ``[id, label]``, ``callbacks`` ``[user id, "", refs]``, ``memory``
        ``[shm id, size, refs, owned]``.  ETIMEDOUT without an answer, EBADF once lost."""
        return self._ask("objects", timeout, "the server did not name the fd's objects")

    def _ask(self, kind: str, timeout: float, silent: str) -> dict[str, Any]:
        """One query frame of ``kind`` and its one answer: ETIMEDOUT (``silent``) without
        one, EBADF once the connection is lost, the server's refusal as its errno."""
        got: list[dict[str, Any]] = []
        done = threading.Event()

        def answer(data: dict[str, Any]) -> None:
            got.append(data)
            done.set()

        seq = self._query(kind, answer)
        try:
            if not done.wait(timeout):
                raise DriverError(errno.ETIMEDOUT, silent)
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
        (see :meth:`qtee._cli.trace.TraceRecord.to_map`), ``{"dropped": n}`` when the server
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
        seq = self._request(lambda seq: encode(Query(seq=seq, what=what)), self._streams, sink)
        self._reading()
        return seq
