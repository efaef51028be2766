"""What a device server serves and within which limits: the caps of one connection, the
pause after a resource error, who the peer is, and the protocols a served fd and a server
flavour (QTEE in ``server``, OP-TEE in ``server_optee``) implement for a
:class:`~qtee._remote.server_conn.Connection`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from qtee._remote.region_memory import CallRegions

__all__ = [
    "BACKOFF_FIRST",
    "BACKOFF_MAX",
    "NO_THREAD",
    "RECV_LIMIT",
    "SEND_TIMEOUT",
    "THREAD_LIMIT",
    "Flavour",
    "Peer",
    "ReadyQueue",
    "ServedFile",
    "backoff",
]

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
NO_THREAD: Final = (RuntimeError, MemoryError)


def backoff(delay: float) -> float:
    """The pause after ``delay`` (0: the first error in a row)."""
    return BACKOFF_FIRST if delay <= 0 else min(delay * 2, BACKOFF_MAX)


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is at the other end of a connection (``SO_PEERCRED``, ``SO_PEERGROUPS``): the
    credentials the kernel would read of the calling task."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()


class ReadyQueue(Protocol):
    """The request queue behind an fd's SUPPL_RECV (``RequestQueue``, ``OpteeSupp``)."""

    cond: threading.Condition
    on_ready: Callable[[], None] | None


class ServedFile(Protocol):
    """One open fd as a connection serves it."""

    #: The context whose ioctls the connection runs.
    ctx: Any
    #: ``before`` and ``after`` do nothing (the connection then skips them).
    plain: bool

    @property
    def queue(self) -> ReadyQueue | None:
        """The queue SUPPL_RECV takes requests from (None: the fd has no RECV)."""
        ...

    def pending(self) -> bool:
        """Whether a non-blocking RECV would find something (under ``queue.cond``)."""
        ...

    def shm_fd(self, shm_id: int) -> int | None:
        """Take the fd of the memory file behind a new shm (the caller closes it)."""
        ...

    def before(self, cmd: int, arg: bytes, call: CallRegions) -> None:
        """In the request's thread, its regions mapped, before the ioctl runs; never raises."""
        ...

    def after(self, cmd: int, arg: bytes, call: CallRegions) -> list[tuple[int, bytes]]:
        """After a successful ioctl: more ``(addr, data)`` regions for the reply, beside
        and disjoint from the request's; never raises."""
        ...


class Flavour(Protocol):
    """What kind of TEE device a server serves: the Welcome it gives and how it opens fds."""

    impl_id: int
    gen_caps: int
    #: Welcome.server.
    server: str
    #: Whether ``query`` ``trace`` streams are possible.
    traces: bool

    def open(self, node: str, label: str) -> ServedFile:
        """Open ``node`` ("tee" or "teepriv") for a connection; DriverError as open fails."""
        ...

    def describe(self) -> dict[str, Any]:
        """What ``qtee info --connect`` shows."""
        ...

    def leaks(self) -> dict[str, int]:
        """The device's non-empty tables."""
        ...
