"""The trace of a served device streamed to one connection (``query`` ``trace``)."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Final

from qtee._cli.trace import TraceRecord
from qtee._remote.frames import Answer
from qtee._remote.served import backoff

if TYPE_CHECKING:
    from qtee._remote.server_conn import Connection

__all__ = ["TraceStream"]

log = logging.getLogger("qtee.server")


class TraceStream:
    """Sends one connection the crossings of the device, from a queue and its own thread
    (a slow reader never blocks the driver).  Past ``LIMIT`` queued records new ones are
    dropped and counted, and once the queue has drained the reader is told how many
    (an answer ``{"dropped": n}`` between the records).  A record that cannot be sent for
    want of memory is dropped and counted too, after a pause; the stream goes on.  The
    stream ends when the connection does (a send fails) or at :meth:`stop`.  A ``held``
    stream queues records but sends none before :meth:`go` (the query's answer goes
    first)."""

    LIMIT: Final = 10_000

    def __init__(self, conn: Connection, seq: int, *, held: bool = False) -> None:
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
                delay = backoff(delay)
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
