"""QTEE's side of the transport: object table, dispatch, callbacks, async releases.

Ids: 0 is NULL, 1 is the root (static, not refcounted); every other object QTEE exports
gets the lowest free id from 2 up, and each id handed to the kernel stands for one
reference the kernel holds.  The kernel gives it back with op RELEASE (0xFFFF).

Objects the kernel passes in (ids with the NS bit) become :class:`NsObject` proxies;
each proxy is one reference QTEE holds on that NS id.  Dropping the last reference on a
proxy queues the id for an async RELEASE message, which goes out in the outbound buffer
on the next return to the kernel (QTEE never sends an explicit release callback).
"""

from __future__ import annotations

import collections
import logging
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

from objects import (
    DispatchResult,
    IdrAllocator,
    ObjectTable,
    PyObject,
    QteeError,
    Result,
    UsageError,
)
from qtee import _reason, wire

if TYPE_CHECKING:
    from qtee.secure._monitor import SecureMonitor

__all__ = ["Mapping", "NsObject", "SecureObject", "SecureWorld", "ServeCallback"]


class PhysicalMemory(Protocol):
    """What QTEE needs of physical memory: a view of a mapped range."""

    def view(self, paddr: int, length: int) -> memoryview:
        """The bytes at ``[paddr, paddr+length)``."""
        ...


@dataclass(frozen=True, slots=True)
class Mapping:
    """A memory object mapped into QTEE: its bytes, and the mapping object to release."""

    view: memoryview
    paddr: int
    perms: int
    mapping: NsObject | None

    def unmap(self) -> None:
        """Drop the mapping object (the kernel gets it back as an async RELEASE)."""
        if self.mapping is not None:
            self.mapping.release()


#: The driver's side of a callback: serve the request in the outbound buffer in place.
ServeCallback = Callable[[bytearray | memoryview], None]
#: A message buffer: the driver's own, or the bytes at an SMC's physical address.
_Buf = bytearray | memoryview

log = logging.getLogger("qtee.secure")

_FIRST_ID: Final = 2
_OP_RELEASE: Final = wire.QCOMTEE_MSG_OBJECT_OP_RELEASE
_OP_RETAIN: Final = wire.QCOMTEE_MSG_OBJECT_OP_RETAIN


def _badobj(detail: str) -> Result:
    """BADOBJ for this call, and why (noted for the client; the wire carries -92 only)."""
    _reason.note(Result.ERROR_BADOBJ, Result.ERROR_BADOBJ.name, detail)
    return Result.ERROR_BADOBJ


class SecureObject(PyObject):
    """An object hosted in QTEE (services, TAs); ops declared with :func:`objects.op`."""

    def on_release(self) -> None:
        """Called when the last reference to this object is gone."""

    def attach(self, world: SecureWorld) -> None:
        """Called on the root object when a secure world is built around it."""


class NsObject:
    """QTEE's reference to an object hosted in the non-secure world (an NS wire id)."""

    __slots__ = ("_world", "ns_id", "refs")

    def __init__(self, world: SecureWorld, ns_id: int) -> None:
        self._world = world
        self.ns_id = ns_id
        self.refs = 1

    def retain(self) -> NsObject:
        """Keep another reference (QTEE-local; the kernel is not told)."""
        with self._world._lock:
            if self.refs <= 0:
                raise UsageError(f"NS object {self.ns_id:#x} was already released")
            self.refs += 1
        return self

    def release(self) -> None:
        """Drop a reference; the last one queues an async RELEASE of the NS id."""
        with self._world._lock:
            if self.refs <= 0:
                raise UsageError(f"NS object {self.ns_id:#x} released twice")
            self.refs -= 1
            if self.refs == 0:
                self._world._pending_release.append(self.ns_id)

    def invoke(
        self,
        op: int,
        ib: Sequence[bytes] = (),
        ob: Sequence[int] = (),
        io: Sequence[object] = (),
        n_oo: int = 0,
    ) -> DispatchResult:
        """Call back into the non-secure object (see :meth:`SecureWorld.callback`)."""
        return self._world.callback(self, op, ib, ob, io, n_oo)

    def __repr__(self) -> str:
        return f"<NsObject {self.ns_id:#x} refs={self.refs}>"


#: Per-thread state of one direct invocation: its outbound buffer and the driver's server.
_Call = tuple[_Buf, ServeCallback]


class SecureWorld:
    """QTEE: consumes inbound messages and answers them (sans-IO apart from callbacks).

    One world is one partition of the secure side: its own object ids, async releases,
    listeners and root.  The host's has ``client_id`` 0; a guest's is made by the
    :class:`~qtee.secure.SecureMonitor` on VM_CREATED and ``closing`` from VM_DESTROYED.
    """

    def __init__(self, root: SecureObject, *, client_id: int = 0) -> None:
        if not isinstance(root, SecureObject):
            raise TypeError("the root must be a SecureObject")
        if not isinstance(client_id, int) or not 0 <= client_id <= 0xFFFF_FFFF:
            raise UsageError(f"client id {client_id!r} is not a u32")
        self.root = root
        #: The VM this partition belongs to (``a7`` of its SMCs); 0 = the host.
        self.client_id = client_id
        #: The monitor that routes SMCs here (set by it; None until one is made).
        self.monitor: SecureMonitor | None = None
        #: VM_DESTROYED was seen: callbacks answer DEFUNCT (and the monitor refuses
        #: new calls).
        self.closing = False
        #: Calls in flight, as the monitor counts them for a guest partition (one entry
        #: each; a deque for its atomic append and pop).
        self.inflight: collections.deque[None] = collections.deque()
        # Each id holds one reference...
        self._table: ObjectTable[SecureObject] = ObjectTable(
            IdrAllocator(_FIRST_ID, 0), name="qtee objects"
        )
        self._extra_refs: dict[int, int] = {}  # ...plus any the kernel retained
        self._pending_release: list[int] = []
        self._lock = threading.RLock()
        self._local = threading.local()
        #: Physical memory of the platform (set by the device), for mapped regions.
        self.phys: PhysicalMemory | None = None
        from qtee.secure._listeners import Listeners

        #: Registered listeners and the TA-autoload callback.
        self.listeners = Listeners()
        root.attach(self)

    # ---------------------------------------------------------------- table
    def export(self, obj: SecureObject) -> int:
        """Give the kernel one reference to ``obj``: a fresh id every time."""
        with self._lock:
            ident = self._table.insert(obj)
            return ident

    def lookup(self, ident: int) -> SecureObject | None:
        """The object behind a live QTEE id."""
        return self._table.lookup(ident)

    def live_ids(self) -> list[int]:
        """QTEE ids the kernel still holds (for leak checks)."""
        with self._lock:
            return list(self._table)

    def pending_releases(self) -> list[int]:
        """NS ids queued for an async RELEASE, not yet sent."""
        with self._lock:
            return list(self._pending_release)

    def release_all(self) -> int:
        """Drop everything the partition holds for its VM (VM destroyed); returns the
        number of objects released.

        Each exported object's last reference goes (``on_release`` runs), retained counts
        and queued async releases are forgotten (nobody is left to tell), the listener
        table is cleared and the GP runtime shut down.  No TA entry point runs: OP §6.1
        does not say whether OP-TEE runs TA close entries on VM_DESTROYED; the model
        runs none.  The caller makes sure no call is in flight (the monitor defers this
        until the last one leaves); afterwards the world is ``closing``.
        """
        if getattr(self._local, "call", None) is not None:
            raise UsageError("release_all from inside a call of this world")
        self.closing = True
        shutdown = getattr(getattr(self, "gp", None), "shutdown", None)
        if shutdown is not None:
            try:
                shutdown()
            except Exception:
                log.exception("GP runtime of client %d: shutdown raised", self.client_id)
        self.listeners.clear()
        with self._lock:
            drained = self._table.drain()
            self._extra_refs.clear()
        for ident, obj in drained:
            try:
                obj.on_release()
            except Exception:
                log.exception("client %d: on_release of object %d raised", self.client_id, ident)
        with self._lock:
            self._pending_release.clear()
        return len(drained)

    def _drop(self, ident: int) -> Result:
        with self._lock:
            obj = self._table.lookup(ident)
            if obj is None:
                return Result.ERROR_BADOBJ
            extra = self._extra_refs.get(ident)
            if extra:
                if extra == 1:
                    del self._extra_refs[ident]
                else:
                    self._extra_refs[ident] = extra - 1
                return Result.OK
            self._table.erase(ident)
        obj.on_release()
        return Result.OK

    # ---------------------------------------------------------------- entry points
    def invoke(self, inbound: _Buf, outbound: _Buf, serve: ServeCallback) -> int:
        """One direct invocation (SMC INVOKE); returns QTEE's result.

        ``serve`` is called, in this thread, for every callback request written to
        ``outbound``.  On return the async RELEASE messages are in ``outbound``.
        """
        msg = wire.decode_invoke(inbound)
        local = self._local
        prev = getattr(local, "call", None)
        local.call = (outbound, serve)
        try:
            result = self._dispatch(msg, inbound)
        finally:
            local.call = prev
        if self._pending_release:
            self._flush_releases(outbound, 0)
        return result

    def _dispatch(self, msg: wire.InvokeMsg, inbound: _Buf) -> int:
        op = msg.op & wire.QCOMTEE_MSG_OBJECT_OP_MASK
        if msg.cxt == wire.QCOMTEE_MSG_OBJECT_ROOT:
            target: SecureObject | None = self.root
        elif msg.cxt == wire.QCOMTEE_MSG_OBJECT_NULL or msg.cxt & wire.QCOMTEE_MSG_OBJECT_NS_BIT:
            return _badobj(f"{msg.cxt:#x} is not a QTEE object id")
        else:
            target = self._table.lookup(msg.cxt)
        if target is None:
            return _badobj(f"no object {msg.cxt} in QTEE's table")
        if op == _OP_RELEASE:
            return Result.OK if target is self.root else self._drop(msg.cxt)
        if op == _OP_RETAIN:
            with self._lock:
                if msg.cxt in self._table:
                    self._extra_refs[msg.cxt] = self._extra_refs.get(msg.cxt, 0) + 1
            return Result.OK
        ob = tuple([ref.size for ref in msg.ob]) if msg.ob else ()
        if msg.io:
            io = tuple([self._import(i) for i in msg.io])
            res = target.dispatch(op, msg.ib, ob, io, msg.n_oo)
            for obj in io:  # the method kept what it wanted with retain()
                if isinstance(obj, NsObject):
                    obj.release()
        else:
            res = target.dispatch(op, msg.ib, ob, (), msg.n_oo)
        if res.result:
            for obj in res.oo:
                if isinstance(obj, NsObject):
                    obj.release()
            _reason.note(res.result, res.name, res.detail)  # model-only: why, for the client
            return res.result
        if msg.n_oo or msg.ob:  # outputs to write
            oo_ids = [self._export_out(obj) for obj in res.oo]
            wire.write_invoke_response(inbound, msg, res.ob, oo_ids)
        return Result.OK

    def _import(self, ident: int) -> object:
        """A wire id received from the kernel -> what a method sees."""
        if ident == wire.QCOMTEE_MSG_OBJECT_NULL:
            return None
        if ident & wire.QCOMTEE_MSG_OBJECT_NS_BIT:
            return NsObject(self, ident)
        return self.lookup(ident)  # QTEE's own object passed back (kernel keeps its ref)

    def _export_out(self, obj: object) -> int:
        """An output object -> the wire id the kernel receives (one new reference)."""
        if obj is None:
            return wire.QCOMTEE_MSG_OBJECT_NULL
        if isinstance(obj, SecureObject):
            return self.export(obj)
        if isinstance(obj, NsObject):
            # The kernel takes its own reference on the NS id; QTEE keeps its proxy's.
            return obj.ns_id
        raise UsageError(f"cannot return a {type(obj).__name__} as an output object")

    # ---------------------------------------------------------------- callbacks
    def callback(
        self,
        target: NsObject,
        op: int,
        ib: Sequence[bytes],
        ob: Sequence[int],
        io: Sequence[object],
        n_oo: int,
    ) -> DispatchResult:
        """Invoke an NS object: write the outbound request, let the driver serve it."""
        call: _Call | None = getattr(self._local, "call", None)
        if call is None:
            raise UsageError("a callback needs a direct invocation in progress on this thread")
        if target.refs <= 0:
            raise UsageError(f"NS object {target.ns_id:#x} was already released")
        if self.closing:  # the VM is going: nobody is left to serve it
            return DispatchResult(Result.ERROR_DEFUNCT)
        out, serve = call
        out[:] = bytes(len(out))
        io_ids = [self._export_in(obj) for obj in io]
        msg = wire.encode_callback_msg(out, target.ns_id, op, ib, ob, io_ids, n_oo)
        self._flush_releases(out, msg.size)
        serve(out)
        answer = wire.decode_callback_response(out, msg)
        if answer.result != Result.OK:
            return DispatchResult(answer.result)
        return DispatchResult(Result.OK, answer.ob, tuple(self._import(i) for i in answer.oo))

    def map_region(self, mem: NsObject) -> Mapping:
        """Map a memory object through the primordial object's MAP_REGION (op 0)."""
        if self.phys is None:
            raise UsageError("this secure world has no physical memory attached")
        primordial = NsObject(self, wire.QCOMTEE_MSG_OBJECT_PRIMORDIAL)
        primordial.refs = 1 << 30  # static: never released
        res = primordial.invoke(0, ob=[20], io=[mem], n_oo=1)
        if res.result != Result.OK:
            raise QteeError(res.result, "MAP_REGION failed")
        paddr, length, perms = struct.unpack("<QQI", res.ob[0])
        mapping = res.oo[0] if isinstance(res.oo[0], NsObject) else None
        return Mapping(self.phys.view(paddr, length), paddr, perms, mapping)

    def _export_in(self, obj: object) -> int:
        if obj is None:
            return wire.QCOMTEE_MSG_OBJECT_NULL
        if isinstance(obj, SecureObject):
            return self.export(obj)
        if isinstance(obj, NsObject):
            return obj.ns_id  # the kernel keeps its own count for NS ids it hosts
        raise UsageError(f"cannot pass a {type(obj).__name__} as an input object")

    def _flush_releases(self, out: _Buf, offset: int) -> None:
        if not self._pending_release:
            return
        with self._lock:
            ids, self._pending_release[:] = list(self._pending_release), []
        if not ids:
            return
        room = (len(out) - offset - 12) // 4
        if room <= 0:
            with self._lock:
                self._pending_release[:0] = ids
            return
        wire.write_async(out, offset, [wire.encode_async_release(ids[:room])])
        if ids[room:]:
            with self._lock:
                self._pending_release[:0] = ids[room:]
