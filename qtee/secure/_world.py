"""QTEE's side of the transport: object table, dispatch, callbacks, async releases.

Ids: 0 is NULL, 1 is the root (static, not refcounted); every other object QTEE exports
gets the lowest free id from 2 up, and each id handed to the kernel stands for one
reference the kernel holds.  The kernel gives it back with op RELEASE (0xFFFF).

Every :class:`SecureObject` knows its partition (:attr:`SecureObject.world`) without
being told: one created while a call of a world runs on the thread belongs to that
world, and one a world exports (an output object, an input of a callback) that has none
yet gets that world.  So a TA's sub-objects (a session, an iterator) can call back and
map memory exactly as the TA does.

Objects the kernel passes in (ids with the NS bit) become :class:`NsObject` proxies;
each proxy is one reference QTEE holds on that NS id.  Dropping the last reference on a
proxy queues the id for an async RELEASE message, which goes out in the outbound buffer
on the next return to the kernel (QTEE never sends an explicit release callback).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import struct
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol, Self

from objects import DispatchResult, IdrAllocator, ObjectTable, PyObject, QteeError, UsageError
from qtee import _reason, wire
from qtee._qcomtee_msg import Result

if TYPE_CHECKING:
    from qtee.secure._monitor import SecureMonitor
    from qtee.secure._signing import SigningKey

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
_OP_MASK: Final = wire.QCOMTEE_MSG_OBJECT_OP_MASK
#: ``Result.OK`` read once: an enum member read off its class costs ~150 ns on CPython 3.11.
_RESULT_OK: Final = Result.OK
_ROOT_ID: Final = wire.QCOMTEE_MSG_OBJECT_ROOT
_NULL_ID: Final = wire.QCOMTEE_MSG_OBJECT_NULL
_NS_BIT: Final = wire.QCOMTEE_MSG_OBJECT_NS_BIT
_OUT_SIZE: Final = wire.MAX_OUTBOUND_BUFFER_SIZE
#: A clean outbound buffer (QTEE writes a callback request into a zeroed one).
_ZERO_OUT: Final = bytes(_OUT_SIZE)


class _Running(threading.local):
    """This thread's world calls, innermost first: ``top`` is ``(world, outbound, serve,
    the call it is nested in)``, None outside any call.  One thread-local for what an
    invocation sets up (the call's world, for objects made in it; its outbound buffer
    and server, for its callbacks), read once and set twice per call."""

    top: _Frame | None = None


_running = _Running()


def _call_of(world: SecureWorld) -> _Call | None:
    """The innermost call of ``world`` running on this thread (None: there is none)."""
    frame = _running.top
    while frame is not None:
        if frame[0] is world:
            return frame[1], frame[2]
        frame = frame[3]
    return None


def _badobj(detail: str) -> Result:
    """BADOBJ for this call, and why (noted for the client; the wire carries -92 only)."""
    _reason.note(Result.ERROR_BADOBJ, Result.ERROR_BADOBJ.name, detail)
    return Result.ERROR_BADOBJ


class SecureObject(PyObject):
    """An object hosted in QTEE (services, TAs); ops declared with :func:`objects.op`.

    :attr:`world` is the partition it lives in.  Nobody has to set it: an object made
    while a call of a world runs on this thread (in a handler, say) takes that world, and
    an object a world exports without one (a sub-object returned as an output) takes the
    exporting world.  Setting it by hand still works and is never overridden.
    """

    _secure_world: SecureWorld | None

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        obj = super().__new__(cls)
        top = _running.top
        if top is not None:
            obj._secure_world = top[0]
        return obj

    @property
    def world(self) -> SecureWorld:
        """The secure world (partition) this object lives in."""
        world: SecureWorld | None = getattr(self, "_secure_world", None)
        if world is None:
            raise UsageError(
                f"{type(self).__name__} is in no secure world yet: it takes the world of "
                "the call it is created in, or of the first world that exports it; "
                "outside both, set .world"
            )
        return world

    @world.setter
    def world(self, world: SecureWorld) -> None:
        # None is let through (it unsets the world: the next export sets it again).
        if world is not None and not isinstance(world, SecureWorld):
            raise TypeError(f"world must be a SecureWorld, not {type(world).__name__}")
        self._secure_world = world

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


#: What a secure object's method may return as an output object (besides None); the
#: dispatch refuses anything else as the method's bug (ERROR) before any is exported.
_OUTPUT_KINDS: Final = (SecureObject, NsObject)
#: How a method's output, or a callback's input, of another kind is refused.
_NOT_AN_OUTPUT: Final = "cannot return a {} as an output object"
_NOT_AN_INPUT: Final = "cannot pass a {} as an input object"

#: Per-thread state of one direct invocation: its outbound buffer and the driver's server.
_Call = tuple[_Buf, ServeCallback]
#: One entry of :class:`_Running`'s chain.
_Frame = tuple["SecureWorld", _Buf, ServeCallback, Any]

_LABEL_CLASSES: list[type] = []


def _label_classes() -> tuple[type, type]:
    """(AppController, ClientEnv): the objects whose outputs get named (imported on first
    use: both modules import this one)."""
    if not _LABEL_CLASSES:
        from qtee.secure._apps import AppController
        from qtee.secure._services import ClientEnv

        _LABEL_CLASSES[:] = [AppController, ClientEnv]
    return _LABEL_CLASSES[0], _LABEL_CLASSES[1]


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
        #: Physical memory of the platform (set by the device), for mapped regions.
        self.phys: PhysicalMemory | None = None
        from qtee.secure._listeners import Listeners

        #: Registered listeners and the TA-autoload callback.
        self.listeners = Listeners()
        from qtee.secure._registry import PROCESS_TAS, TaRegistry

        #: The TAs this world loads, looked up before the process-wide ones.
        self.tas = TaRegistry(PROCESS_TAS)
        self._ta_key: SigningKey | None = None
        # Model-only names of exported objects (see label): object -> its label.
        self._labels: weakref.WeakKeyDictionary[object, str] = weakref.WeakKeyDictionary()
        self._adopt(root)
        root.attach(self)

    @property
    def ta_key(self) -> SigningKey:
        """The key this device trusts for model TA images (:mod:`qtee.secure._signing`):
        the process's default model key until a private key is assigned."""
        from qtee.secure._signing import default_model_key

        return self._ta_key if self._ta_key is not None else default_model_key()

    @ta_key.setter
    def ta_key(self, key: SigningKey) -> None:
        from qtee.secure._signing import check_signing_key

        self._ta_key = check_signing_key(key)

    # ---------------------------------------------------------------- table
    def export(self, obj: SecureObject) -> int:
        """Give the kernel one reference to ``obj``: a fresh id every time.  An object in
        no world yet joins this one."""
        self._adopt(obj)
        with self._lock:
            ident = self._table.insert(obj)
            return ident

    def _adopt(self, obj: SecureObject) -> None:
        """``obj`` lives in this world from now on (unless it already lives in one)."""
        if getattr(obj, "_secure_world", None) is None:
            obj._secure_world = self

    def lookup(self, ident: int) -> SecureObject | None:
        """The object behind a live QTEE id."""
        return self._table.lookup(ident)

    def live_ids(self) -> list[int]:
        """QTEE ids the kernel still holds (for leak checks)."""
        with self._lock:
            return list(self._table)

    def label(self, ident: int) -> str | None:
        """Model-only: what the object behind the live id ``ident`` is (None: no such id).

        The class name, with what QTEE knows of it: ``service 0x3 AppLoader`` for a service
        opened through a client env (by its UID), ``TA 'adder' (Adder)`` for a TA's app
        object, ``AppController of TA 'adder'``.  Nothing of this crosses the wire.
        """
        if ident == wire.QCOMTEE_MSG_OBJECT_ROOT:
            return "root"
        obj = self._table.lookup(ident)
        return None if obj is None else self.label_of(obj)

    def label_of(self, obj: object) -> str:
        """Model-only: the label of an object this world exports (see :meth:`label`)."""
        try:
            named = self._labels.get(obj)
        except TypeError:  # a class with __slots__ and no __weakref__: never named
            named = None
        if named is not None:
            return named
        controller, _ = _label_classes()
        if isinstance(obj, controller):
            return f"{type(obj).__name__} of TA {getattr(obj, 'name', '?')!r}"
        return type(obj).__name__

    def _name_outputs(
        self, target: SecureObject, op: int, ib: Sequence[bytes], oo: Sequence[object]
    ) -> None:
        """Remember what a client env's open (op 0) and an app controller's getAppObject
        (op 2) returned: the service UID asked for, the TA's name (model-only)."""
        controller, client_env = _label_classes()
        if op == 0 and isinstance(target, client_env) and ib and len(ib[0]) == 4:
            (uid,) = struct.unpack("<I", ib[0])
            prefix = f"service {uid:#x} "
            labels = [f"{prefix}{type(obj).__name__}" for obj in oo]
        elif op == 2 and isinstance(target, controller):
            name = getattr(target, "name", "?")
            labels = [f"TA {name!r} ({type(obj).__name__})" for obj in oo]
        else:
            return
        with self._lock:
            for obj, text in zip(oo, labels, strict=True):
                if isinstance(obj, SecureObject):
                    with contextlib.suppress(TypeError):  # no weak reference: stays unnamed
                        self._labels[obj] = text

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
        if _call_of(self) is not None:
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
                return _RESULT_OK
            self._table.erase(ident)
        obj.on_release()
        return _RESULT_OK

    # ---------------------------------------------------------------- entry points
    def invoke(self, inbound: _Buf, outbound: _Buf, serve: ServeCallback) -> int:
        """One direct invocation (SMC INVOKE); returns QTEE's result.

        ``serve`` is called, in this thread, for every callback request written to
        ``outbound``.  On return the async RELEASE messages are in ``outbound``.
        """
        # The dispatch is inline (one call per invoke saved) with one result and no return
        # inside the try: the releases are flushed after it on every result, and on an
        # exception not at all (the driver does not read that page then).
        cxt, op, _counts, ib, refs, ids, n_oo, _size = msg = wire.decode_invoke(inbound)
        running = _running
        prev = running.top
        running.top = (self, outbound, serve, prev)
        result: int
        try:
            op &= _OP_MASK
            if cxt == _NULL_ID or cxt & _NS_BIT:
                result = _badobj(f"{cxt:#x} is not a QTEE object id")
            elif (target := self.root if cxt == _ROOT_ID else self._table.lookup(cxt)) is None:
                result = _badobj(f"no object {cxt} in QTEE's table")
            elif op == _OP_RELEASE:
                result = _RESULT_OK if target is self.root else self._drop(cxt)
            elif op == _OP_RETAIN:
                with self._lock:
                    if cxt in self._table:
                        self._extra_refs[cxt] = self._extra_refs.get(cxt, 0) + 1
                result = _RESULT_OK
            else:
                ob = tuple([ref.size for ref in refs]) if refs else ()
                if ids:
                    io = tuple([self._import(i) for i in ids])
                    res = target.dispatch(op, ib, ob, io, n_oo, oo_kinds=_OUTPUT_KINDS)
                    for obj in io:  # the method kept what it wanted with retain()
                        if isinstance(obj, NsObject):
                            obj.release()
                else:
                    res = target.dispatch(op, ib, ob, (), n_oo, oo_kinds=_OUTPUT_KINDS)
                result = res.result
                if result:
                    # Nothing was exported; NsObject proxies the method returned stay its
                    # own, as they do on success (the kernel takes its own reference on an
                    # NS output).
                    _reason.note(result, res.name, res.detail)  # model-only: why, for the client
                elif n_oo or refs:  # outputs to write
                    oo_ids = [self._wire_id(obj, _NOT_AN_OUTPUT) for obj in res.oo]
                    if res.oo and op <= 2:
                        self._name_outputs(target, op, ib, res.oo)
                    wire.write_invoke_response(inbound, msg, res.ob, oo_ids)
        finally:
            running.top = prev
        if self._pending_release:
            self._flush_releases(outbound, 0)
        return result

    def _import(self, ident: int) -> object:
        """A wire id received from the kernel -> what a method sees."""
        if ident == wire.QCOMTEE_MSG_OBJECT_NULL:
            return None
        if ident & wire.QCOMTEE_MSG_OBJECT_NS_BIT:
            return NsObject(self, ident)
        return self.lookup(ident)  # QTEE's own object passed back (kernel keeps its ref)

    def _wire_id(self, obj: object, refused: str) -> int:
        """An object QTEE sends the kernel (an output, or a callback's input) -> its wire
        id: a secure object is exported (one new reference); an NS object goes as its id
        (the kernel keeps its own count for the NS ids it hosts; QTEE keeps its proxy's).
        Anything else: UsageError, ``refused`` worded with the type's name."""
        if obj is None:
            return wire.QCOMTEE_MSG_OBJECT_NULL
        if isinstance(obj, SecureObject):
            return self.export(obj)
        if isinstance(obj, NsObject):
            return obj.ns_id
        raise UsageError(refused.format(type(obj).__name__))

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
        call = _call_of(self)
        if call is None:
            raise UsageError("a callback needs a direct invocation in progress on this thread")
        if target.refs <= 0:
            raise UsageError(f"NS object {target.ns_id:#x} was already released")
        if self.closing:  # the VM is going: nobody is left to serve it
            return DispatchResult(Result.ERROR_DEFUNCT)
        out, serve = call
        out[:] = _ZERO_OUT if len(out) == _OUT_SIZE else bytes(len(out))
        io_ids = [self._wire_id(obj, _NOT_AN_INPUT) for obj in io] if io else []
        msg = wire.encode_callback_msg(out, target.ns_id, op, ib, ob, io_ids, n_oo)
        if self._pending_release:
            self._flush_releases(out, msg.size)
        serve(out)
        answer = wire.decode_callback_response(out, msg)
        if answer.result != _RESULT_OK:
            return DispatchResult(answer.result)
        oo = tuple(map(self._import, answer.oo)) if answer.oo else ()
        return DispatchResult(_RESULT_OK, answer.ob, oo)

    def map_region(self, mem: NsObject) -> Mapping:
        """Map a memory object through the primordial object's MAP_REGION (op 0)."""
        if self.phys is None:
            raise UsageError("this secure world has no physical memory attached")
        primordial = NsObject(self, wire.QCOMTEE_MSG_OBJECT_PRIMORDIAL)
        primordial.refs = 1 << 30  # static: never released
        res = primordial.invoke(0, ob=[20], io=[mem], n_oo=1)
        if res.result != _RESULT_OK:
            raise QteeError(res.result, "MAP_REGION failed")
        paddr, length, perms = struct.unpack("<QQI", res.ob[0])
        mapping = res.oo[0] if isinstance(res.oo[0], NsObject) else None
        return Mapping(self.phys.view(paddr, length), paddr, perms, mapping)

    def _flush_releases(self, out: _Buf, offset: int) -> None:
        if not self._pending_release:
            return
        with self._lock:  # the queue is taken whole (no copy): later releases go to a new one
            ids, self._pending_release = self._pending_release, []
        if not ids:
            return
        room = (len(out) - offset - 12) // 4
        if len(ids) <= room:  # they all fit (the usual case)
            wire._write_async_release(out, offset, ids)
            return
        if room > 0:
            wire._write_async_release(out, offset, ids[:room])
            ids = ids[room:]
        with self._lock:  # what does not fit waits for the next return, first in line
            self._pending_release[:0] = ids
