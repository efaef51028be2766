"""Callback objects hosted in userspace and the requests that reach them (``user_obj.c``).

A :class:`UserObject` is the kernel's wrapper of an object a supplicant exports (an id of
its own choosing).  Invoking it from QTEE queues a :class:`Request` on the owning
context, where a supplicant thread takes it with SUPPL_RECV and answers with SUPPL_SEND.
Request ids come from a per-context lowest-free IDR; requests wait in FIFO order; their
states are QUEUED (1) -> PROCESSING (2) -> PROCESSED (3).
"""

from __future__ import annotations

import errno
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from objects import IdrAllocator, Refcounted

if TYPE_CHECKING:
    from qtee._driver import Context

__all__ = ["CbObject", "Request", "RequestQueue", "UserObject"]

QUEUED: Final = 1
PROCESSING: Final = 2
PROCESSED: Final = 3
OP_RELEASE: Final = 0xFFFF


class CbObject(Refcounted):
    """A kernel-hosted ("callback") object QTEE can invoke through an NS id."""

    __slots__ = ()

    def dispatch(
        self, op: int, ib: tuple[bytes, ...], ob: tuple[int, ...], io: tuple[object, ...], n_oo: int
    ) -> tuple[int, list[bytes], list[object]]:
        """Serve ``op``: (errno-style status, OB data, OO objects).  Default: -EINVAL."""
        return -errno.EINVAL, [], []


@dataclass(eq=False, slots=True)
class Request:
    """One callback request queued on a context (or a release notification)."""

    object_id: int
    op: int
    ib: tuple[bytes, ...] = ()
    ob: tuple[int, ...] = ()
    io: tuple[object, ...] = ()
    n_oo: int = 0
    state: int = QUEUED
    req_id: int = -1
    status: int = 0
    ob_data: list[bytes] = field(default_factory=list)
    oo: list[object] = field(default_factory=list)
    #: Held until the request is PROCESSED; the invoking thread blocks acquiring it.
    done: threading.Lock = field(default_factory=threading.Lock)
    #: The invoking thread stopped waiting while the request was PROCESSING: a
    #: placeholder whose id stays taken until the supplicant's SEND (refused) frees it.
    abandoned: bool = False

    def __post_init__(self) -> None:
        self.done.acquire()

    def wait(self) -> None:
        """Block until PROCESSED."""
        self.done.acquire()
        self.done.release()


class RequestQueue:
    """A context's supplicant queue: FIFO of QUEUED requests and the request-id IDR."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.fifo: deque[Request] = deque()
        self.ids = IdrAllocator(0, 0, name="request ids")
        self.by_id: dict[int, Request] = {}
        self.released = False
        #: Called (under the queue's lock: it must not block) whenever a request is
        #: queued and when the context is released: how a waiter outside Python (a C
        #: thread polling an eventfd) or in another process learns a RECV would find work.
        self.on_ready: Callable[[], None] | None = None

    def submit(self, req: Request) -> bool:
        """Queue ``req``; False when the context is already closed."""
        with self.cond:
            if self.released:
                return False
            req.req_id = self.ids.alloc()
            self.by_id[req.req_id] = req
            self.fifo.append(req)
            self.cond.notify()
            if self.on_ready is not None:
                self.on_ready()
            return True

    def finish(self, req: Request, status: int) -> None:
        """Mark ``req`` PROCESSED with ``status`` and free its id (caller holds ``cond``)."""
        if req.state == PROCESSED:
            return
        req.state = PROCESSED
        req.status = status
        if self.by_id.get(req.req_id) is req:
            del self.by_id[req.req_id]
            self.ids.free(req.req_id)
        req.done.release()

    def abandon(self, req: Request) -> None:
        """The invoking thread stopped waiting for ``req`` (an exception, as Ctrl-C, in its
        wait: the kernel's client killed in its killable wait).  A QUEUED request is
        dropped; a PROCESSING one becomes a placeholder (its id reserved until the SEND
        for it, which gets EINVAL); a PROCESSED one's output objects are dropped."""
        with self.cond:
            if req.state == QUEUED:
                if req in self.fifo:
                    self.fifo.remove(req)
                self.finish(req, -errno.EINTR)
            elif req.state == PROCESSING:
                req.abandoned = True
            else:
                oo, req.oo = req.oo, []
                for o in oo:
                    if isinstance(o, Refcounted):
                        o.put()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until a request is queued or the context is released (True), or until
        ``timeout`` seconds pass (False): when a non-blocking RECV would find something."""
        with self.cond:
            ready = self.cond.wait_for(lambda: bool(self.fifo) or self.released, timeout)
            if ready:  # the wake-up may have been meant for a blocked RECV: pass it on
                self.cond.notify()
            return ready

    def close(self) -> None:
        """Context released: pending requests complete with -ENODEV, notifications dropped."""
        with self.cond:
            self.released = True
            for req in list(self.by_id.values()):
                self.finish(req, -errno.ENODEV)
            self.fifo.clear()
            self.cond.notify_all()
            if self.on_ready is not None:
                self.on_ready()

    def __len__(self) -> int:
        return len(self.by_id)


class UserObject(CbObject):
    """The kernel's wrapper ("uo-<id>") of an object exported by a supplicant."""

    __slots__ = ("ctx", "notify", "user_id")

    def __init__(self, ctx: Context, user_id: int) -> None:
        super().__init__()
        self.ctx = ctx
        self.user_id = user_id
        self.notify = True

    def dispatch(
        self, op: int, ib: tuple[bytes, ...], ob: tuple[int, ...], io: tuple[object, ...], n_oo: int
    ) -> tuple[int, list[bytes], list[object]]:
        """Queue the request on the owning context and wait for the supplicant's answer."""
        req = Request(self.user_id, op, ib, ob, io, n_oo)
        try:
            if not self.ctx.requests.submit(req):
                return -errno.ENODEV, [], []
            req.wait()
        except BaseException:  # KeyboardInterrupt: the caller goes, the request stays sane
            self.ctx.requests.abandon(req)
            raise
        return req.status, req.ob_data, req.oo

    def on_release(self) -> None:
        """Last reference gone: tell the supplicant with a RELEASE notification."""
        if self.notify:
            self.ctx.requests.submit(Request(self.user_id, OP_RELEASE))
