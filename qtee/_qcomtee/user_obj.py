"""Callback objects in userspace and the requests that reach them (``qcomtee/user_obj.c``).

A :class:`UserObject` is the kernel's wrapper of an object a supplicant exports (an id of
its own choosing).  Invoking it from QTEE queues a :class:`Request` on the owning
context, where a supplicant thread takes it with SUPPL_RECV and answers with SUPPL_SEND.
Request ids come from a per-context lowest-free IDR; requests wait in FIFO order; their
states are QUEUED (1) -> PROCESSING (2) -> PROCESSED (3), every move in one table
(:mod:`qtee._qcomtee.req_state`).  :func:`supp_recv` selects the
FIFO head for a supplicant thread (``ureq_select``) and :func:`supp_send` completes a
request with its answer (``ureq_dequeue``).
"""

from __future__ import annotations

import errno
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from objects import DriverError, Refcounted
from qtee import _checks, uapi
from qtee._checks import _einval
from qtee._qcomtee.mem_obj import MemObject, mem_in
from qtee._qcomtee.object import CbObject, QteeObject
from qtee._qcomtee.req_state import REQUEST_STATES, ReqEvent, ReqState
from qtee._tee.core import (
    _META_IN,
    _META_OUT,
    _NONE_P,
    _OBJ_IN,
    _OBJ_OUT,
    _P,
    _PARAM,
    _SUPP_HEAD,
    _U32,
    _UB_IN,
    _UB_OUT,
    _pack_params,
)

if TYPE_CHECKING:
    from qtee._qcomtee.call import Context
    from qtee.addrspace import AddressSpace

__all__ = ["Request", "RequestQueue", "UserObject", "supp_recv", "supp_send"]

QUEUED: Final = ReqState.QUEUED
PROCESSING: Final = ReqState.PROCESSING
PROCESSED: Final = ReqState.PROCESSED
OP_RELEASE: Final = 0xFFFF
_read: Final = _checks.read_buf_block
#: The table's moves split by event, keyed by the (int) state: a move is one dict lookup.
_SELECT: Final = {s: n for (s, e), n in REQUEST_STATES.transitions.items() if e is ReqEvent.SELECT}
_COMPLETE: Final = {
    s: n for (s, e), n in REQUEST_STATES.transitions.items() if e is ReqEvent.COMPLETE
}
_FLAG_TEE: Final = uapi.QCOMTEE_OBJREF_FLAG_TEE
_FLAG_USER: Final = uapi.QCOMTEE_OBJREF_FLAG_USER
_FLAG_MEM: Final = uapi.QCOMTEE_OBJREF_FLAG_MEM
#: A checked SUPPL_RECV block: ``buf_ptr``, the scratch buffer's address and size, slots.
_RecvBlock = tuple[int, int, int, int]
#: Checked RECV blocks a context remembers (one per supplicant thread, as a rule).
_RECV_BLOCKS_MAX: Final = 64


@dataclass(eq=False, slots=True)
class Request:
    """One callback request queued on a context (or a release notification)."""

    object_id: int
    op: int
    ib: tuple[bytes, ...] = ()
    ob: tuple[int, ...] = ()
    io: tuple[object, ...] = ()
    n_oo: int = 0
    #: Moved only through :meth:`move` (:data:`~qtee._qcomtee.req_state.REQUEST_STATES`).
    state: ReqState = QUEUED
    req_id: int = -1
    status: int = 0
    #: The answer's outputs, set by SUPPL_SEND (empty tuples until then: no lists are
    #: made for a request that has none, as a release notification).
    ob_data: Sequence[bytes] = ()
    oo: Sequence[object] = ()
    #: Held (acquired by its maker) until the request is PROCESSED; the invoking thread
    #: blocks acquiring it.  None for a request nobody waits on (a release notification).
    done: threading.Lock | None = None
    #: The invoking thread stopped waiting while the request was PROCESSING: a
    #: placeholder whose id stays taken until the supplicant's SEND (refused) frees it.
    abandoned: bool = False

    def move(self, event: ReqEvent) -> None:
        """Take the transition ``event`` (an illegal one raises and changes nothing)."""
        try:
            self.state = (_SELECT if event is ReqEvent.SELECT else _COMPLETE)[self.state]
        except KeyError:
            REQUEST_STATES.move(self.state, event)  # raises IllegalTransition, naming it
            raise


class RequestQueue:
    """A context's supplicant queue: FIFO of QUEUED requests and the request-id IDR."""

    def __init__(self) -> None:
        #: The queue's lock (``reqs_lock``); the hot paths take it bare, waits go
        #: through ``cond`` on it.  An RLock: a Condition on one checks ownership and
        #: hands the lock over in C (on a Lock, in Python on every notify and wait).
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.fifo: deque[Request] = deque()
        #: Requests by id; an id is the lowest one not in it (``idr_alloc(.., 0, 0, ..)``),
        #: ``_free`` being that lowest free id.
        self.by_id: dict[int, Request] = {}
        self._free = 0
        self.released = False
        #: Called (under the queue's lock: it must not block) whenever a request is
        #: queued and when the context is released: how a waiter outside Python (a C
        #: thread polling an eventfd) or in another process learns a RECV would find work.
        self.on_ready: Callable[[], None] | None = None

    def submit(self, req: Request) -> bool:
        """Queue ``req``; False when the context is already closed."""
        with self.lock:
            if self.released:
                return False
            by_id = self.by_id
            req.req_id = rid = self._free
            by_id[rid] = req
            rid += 1
            while rid in by_id:
                rid += 1
            self._free = rid
            self.fifo.append(req)
            self.cond.notify()
            if self.on_ready is not None:
                self.on_ready()
            return True

    def finish(self, req: Request, status: int) -> None:
        """Mark ``req`` PROCESSED with ``status`` and free its id (caller holds ``lock``)."""
        try:
            req.state = _COMPLETE[req.state]
        except KeyError:  # PROCESSED already: nothing changes
            return
        req.status = status
        rid = req.req_id
        if self.by_id.get(rid) is req:
            del self.by_id[rid]
            self._free = min(self._free, rid)
        if req.done is not None:
            req.done.release()

    def abandon(self, req: Request) -> None:
        """The invoking thread stopped waiting for ``req`` (an exception, as Ctrl-C, in its
        wait: the kernel's client killed in its killable wait).  A QUEUED request is
        dropped; a PROCESSING one becomes a placeholder (its id reserved until the SEND
        for it, which gets EINVAL); a PROCESSED one's output objects are dropped."""
        with self.lock:
            if req.state == QUEUED:
                if req in self.fifo:
                    self.fifo.remove(req)
                self.finish(req, -errno.EINTR)
            elif req.state == PROCESSING:
                req.abandoned = True
            else:
                oo, req.oo = req.oo, ()
                for o in oo:
                    if isinstance(o, Refcounted):
                        o.put()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until a request is queued or the context is released (True), or until
        ``timeout`` seconds pass (False): when a non-blocking RECV would find something."""
        with self.lock:
            ready = self.cond.wait_for(lambda: bool(self.fifo) or self.released, timeout)
            if ready:  # the wake-up may have been meant for a blocked RECV: pass it on
                self.cond.notify()
            return ready

    def close(self) -> None:
        """Context released: pending requests complete with -ENODEV, notifications dropped."""
        with self.lock:
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
    ) -> tuple[int, Sequence[bytes], Sequence[object]]:
        """Queue the request on the owning context and wait for the supplicant's answer."""
        done = threading.Lock()
        done.acquire()
        req = Request(self.user_id, op, ib, ob, io, n_oo, done=done)
        try:
            if not self.ctx.requests.submit(req):
                return -errno.ENODEV, [], []
            done.acquire()  # until PROCESSED
        except BaseException:  # KeyboardInterrupt: the caller goes, the request stays sane
            self.ctx.requests.abandon(req)
            raise
        return req.status, req.ob_data, req.oo

    def on_release(self) -> None:
        """Last reference gone: tell the supplicant with a RELEASE notification."""
        if self.notify:
            self.ctx.requests.submit(Request(self.user_id, OP_RELEASE))


# ------------------------------------------------------------------ SUPPL_RECV / SUPPL_SEND


def supp_recv(ctx: Context, arg: bytearray | memoryview, *, wait: bool = True) -> int:
    mem = ctx.device.memory
    # A supplicant thread sends the same block on every RECV: one whose argument struct
    # and block bytes are those of a block that passed is taken as it passed then (the
    # checks depend on nothing else), after the same copy_from_user.
    key = bytes(arg) if type(arg) is bytearray else None
    seen = ctx.recv_blocks.get(key) if key is not None else None
    if seen is not None and mem.read(seen[1][0], len(seen[0])) == seen[0]:
        buf_ptr, scratch, size, slots = seen[1]
    else:
        buf_ptr, scratch, size, slots = _recv_block(ctx, mem, arg, key)
    q = ctx.requests
    with q.lock:  # held for the whole selection, as reqs_lock is
        while True:
            if q.released or ctx.life.closed:
                raise DriverError(errno.EINTR, "context closed while waiting")
            req = q.fifo[0] if q.fifo else None
            if req is None:
                if not wait:
                    raise DriverError(errno.EAGAIN, "no request is queued")
                q.cond.wait()
                continue
            if req.op == OP_RELEASE:  # a notification: no args (on_release), so it fits
                q.fifo.popleft()
                q.finish(req, 0)  # freed now, never answered
                meta = _PARAM.pack(_META_IN, req.object_id, req.req_id, 0)
                mem.write(buf_ptr, _SUPP_HEAD.pack(OP_RELEASE, 1) + meta)
                return 0
            n = len(req.ib) + len(req.ob) + len(req.io) + req.n_oo
            if n > slots - 1:  # ureq_select: the request stays QUEUED
                raise _einval(f"request needs {n} params, {slots - 1} given")
            offs: list[int] = []
            top = size
            for data in req.ib:
                top = (top - len(data)) & ~7
                if top < 0:
                    raise _einval("input buffers do not fit the scratch buffer")
                offs.append(top)
            q.fifo.popleft()
            out: list[_P] = [(_META_IN, req.object_id, req.req_id, 0)]
            req.state = _SELECT[req.state]  # QUEUED, as every request in the FIFO
            try:  # qcomtee_cb_params_from_args
                for data, off in zip(req.ib, offs, strict=True):
                    mem.write(scratch + off, data)
                    out.append((_UB_IN, scratch + off, len(data), 0))
                for cap in req.ob:
                    out.append((_UB_OUT, 0, cap, 0))
                for obj in req.io:
                    out.append(_objref_to_user(ctx, obj))
            except DriverError:
                # Undo the conversions and fail the request with -EINVAL (QTEE sees
                # UNAVAIL); keep waiting for the next one.
                for attr, a, b, _c in out[1:]:
                    if attr == _OBJ_IN and b == _FLAG_TEE:
                        dropped = ctx.objects.erase(a)
                        if dropped is not None:
                            dropped.put()
                q.finish(req, -errno.EINVAL)
                continue
            break
    out += [(_OBJ_OUT, 0, 0, 0)] * req.n_oo
    n_out = len(out)
    out += [_NONE_P] * (slots - n_out)
    mem.write(buf_ptr, _SUPP_HEAD.pack(req.op & 0xFFFF, n_out) + _pack_params(out))
    return 0


def _recv_block(
    ctx: Context, mem: AddressSpace, arg: bytearray | memoryview, key: bytes | None
) -> _RecvBlock:
    """SUPPL_RECV's argument block, read and checked: ``(buf_ptr, scratch, size, slots)``;
    remembered under ``key`` (the argument struct's bytes) once it passed."""
    buf_ptr, block, params = _read(mem, arg, _SUPP_HEAD.size, 4)
    if not params or params[0][0] != _META_IN:
        raise _einval("SUPPL_RECV needs a VALUE_INOUT|META first param")
    _attr, scratch, size, _c = params[0]
    if scratch & 7:
        raise _einval("scratch buffer must be 8-byte aligned")
    for p in params[1:]:
        if p[0] != uapi.TEE_IOCTL_PARAM_ATTR_TYPE_NONE:
            raise _einval("SUPPL_RECV params after the first must be NONE")
    checked = (buf_ptr, scratch, size, len(params))
    if key is not None:
        blocks = ctx.recv_blocks
        if len(blocks) >= _RECV_BLOCKS_MAX:
            blocks.clear()
        blocks[key] = (block, checked)
    return checked


def _objref_to_user(ctx: Context, obj: object) -> _P:
    """``qcomtee_objref_to_arg``: an object QTEE passed -> an OBJREF param."""
    if obj is None:
        return (_OBJ_IN, uapi.TEE_OBJREF_NULL, 0, 0)
    if isinstance(obj, QteeObject):
        if not obj.get():
            raise _einval("QTEE object is being released")
        return (_OBJ_IN, ctx.objects.insert(obj), _FLAG_TEE, 0)
    if isinstance(obj, UserObject):
        if obj.ctx is not ctx:
            raise _einval("user object of another context")
        return (_OBJ_IN, obj.user_id, _FLAG_USER, 0)
    if isinstance(obj, MemObject):
        if obj.shm.ctx is not ctx:
            raise _einval("memory object of another context")
        return (_OBJ_IN, obj.shm.id, _FLAG_MEM, 0)
    raise _einval(f"{type(obj).__name__} cannot be passed to userspace")


def supp_send(ctx: Context, arg: bytearray | memoryview) -> int:
    _ptr, block, params = _read(ctx.device.memory, arg, _SUPP_HEAD.size, 4, exact=False)
    if not params or params[0][0] != _META_OUT:
        raise _einval("SUPPL_SEND needs a VALUE_OUTPUT|META first param")
    (raw,) = _U32.unpack_from(block, 0)
    req_id = params[0][1]
    q = ctx.requests
    with q.lock:
        req = q.by_id.get(req_id) if req_id <= 0x7FFF_FFFF else None
        if req is None:  # ureq_dequeue finds nothing
            raise _einval(f"no request {req_id}")
        if req.abandoned:  # its client stopped waiting: the placeholder goes now
            q.finish(req, -errno.EINTR)
            raise _einval(f"request {req_id}: its caller stopped waiting")
        if req.state != PROCESSING:  # still QUEUED: dequeued and completed all the same
            q.fifo.remove(req)
        status = raw - (1 << 32) if raw & 0x8000_0000 else raw
        if status != 0:
            q.finish(req, status)
            return 0
        if req.ib or req.ob or req.io or req.n_oo:  # else no reply param to read
            try:
                req.ob_data, req.oo = _send_outputs(ctx, req, params)
            except DriverError:
                q.finish(req, -errno.EINVAL)
                raise
        q.finish(req, 0)
    return 0


def _send_outputs(ctx: Context, req: Request, params: list[_P]) -> tuple[list[bytes], list[object]]:
    """``qcomtee_cb_params_to_args``: index-aligned reply params -> OB data, OO objects."""
    n_ib, n_ob, n_io = len(req.ib), len(req.ob), len(req.io)
    end = 1 + n_ib + n_ob + n_io + req.n_oo
    if len(params) < end:
        raise _einval("reply has fewer params than the request")
    ob_data: list[bytes] = []
    oo: list[object] = []
    read = ctx.device.memory.read
    try:
        for i in range(1, end):
            attr, a, b, _c = params[i]
            k = i - 1
            if k < n_ib:
                kind = _UB_IN
            elif k < n_ib + n_ob:
                kind = _UB_OUT
            elif k < n_ib + n_ob + n_io:
                kind = _OBJ_IN
            else:
                kind = _OBJ_OUT
            if attr != kind:
                raise _einval(f"reply param attr {attr} does not match the request ({kind})")
            if kind == _UB_OUT:
                if b > req.ob[k - n_ib]:
                    raise _einval("reply output buffer is larger than QTEE accepts")
                try:
                    ob_data.append(read(a, b))
                except DriverError:
                    raise _einval("reply output buffer copy faulted") from None
            elif kind == _OBJ_OUT:
                oo.append(_objref_from_user(ctx, a, b))
    except DriverError:
        for o in oo:  # never reached QTEE: dropped without a release notification
            if isinstance(o, UserObject):
                o.notify = False
            if isinstance(o, Refcounted):
                o.put()
        raise
    return ob_data, oo


def _objref_from_user(ctx: Context, a: int, b: int) -> UserObject | QteeObject | MemObject | None:
    """``qcomtee_objref_from_arg``: an OBJREF param ``(a, b)`` -> its object (a QTEE object
    with a reference taken), for an invoke's inputs and a callback's outputs alike."""
    if a == uapi.TEE_OBJREF_NULL:
        return None
    if b & _FLAG_USER:
        return UserObject(ctx, a)
    if b & _FLAG_TEE:
        obj = ctx.objects.lookup_get(a) if a <= 0x7FFF_FFFF else None
        if obj is None:
            raise _einval(f"object id {a} is not in this context")
        return obj
    if b & _FLAG_MEM:
        return mem_in(ctx, a)
    raise _einval(f"objref flags {b:#x} name no object kind")
