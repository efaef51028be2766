"""The device server's lead watch: one thread that takes the reading back from a
connection's leader running an ioctl for longer than :data:`LEND` (see
:class:`~qtee._remote.server_conn.Connection`, whose ``_lent`` and ``_take_back`` it uses).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Final

from qtee._remote.served import NO_THREAD

if TYPE_CHECKING:
    from qtee._remote.server_conn import Connection

__all__ = ["LEND", "LeadWatch"]

log = logging.getLogger("qtee.server")

#: Seconds a leader runs an ioctl before :class:`LeadWatch` hands the reading on.
LEND: Final = 0.005
#: Seconds the lead watch's thread stays with no leader running an ioctl.
_WATCH_LINGER: Final = 0.5


class LeadWatch:
    """One thread for a whole server that takes the reading back from a leader running an
    ioctl for longer than :data:`LEND` (the connection's next frames -- a probe, another
    call, its close -- do not wait for a long TA).  It looks every ``LEND`` s while a
    leader runs an ioctl, sleeps while none does, and ends after ``_WATCH_LINGER`` s of
    that."""

    def __init__(self) -> None:
        self._lent: set[Connection] = set()
        self._cond = threading.Condition()
        self._asleep = True
        self._stopping = False
        self._thread: threading.Thread | None = None

    def lend(self, conn: Connection) -> bool:
        """``conn``'s leader runs an ioctl (``conn._lent``): watch it; False if no thread
        can watch (the leader hands the reading on at once)."""
        self._lent.add(conn)  # then _asleep: the watch sets it, then looks at _lent
        if self._asleep:
            with self._cond:
                if self._thread is None:
                    t = threading.Thread(target=self._watch, name="qtee-lead-watch", daemon=True)
                    try:
                        t.start()
                    except NO_THREAD as exc:
                        log.warning("no lead watch thread (%s): leaders hand the reading on", exc)
                        self._lent.discard(conn)
                        return False
                    self._thread = t
                self._cond.notify()
        return True

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
            t = self._thread
        if t is not None:
            t.join(5)

    def _watch(self) -> None:
        while True:
            with self._cond:
                self._asleep = True
                if not self._lent and not self._stopping:
                    self._cond.wait(_WATCH_LINGER)
                if self._stopping or not self._lent:  # idle: a lend starts another
                    self._thread = None
                    return
                self._asleep = False
                self._cond.wait(LEND)
            now = time.monotonic()
            for conn in list(self._lent):
                call = conn._lent
                if call is None:
                    self._lent.discard(conn)
                    if conn._lent is not None:  # lent again meanwhile
                        self._lent.add(conn)
                elif not call.callbacks and now - call.quiet_since >= LEND:
                    conn._take_back(call)
