"""The QTEE device (``qcomtee/core.c``): one ``/dev/teeN``, the SMC loop that carries an
invoke to QTEE and serves each callback request QTEE makes on the invoking thread, the
object ids both ways (NS ids for the driver's objects, QTEE ids wrapped in
:class:`QteeObject`), and the release of QTEE objects.

QTEE is reached through SMCs on a conduit (:mod:`qtee._smc`): INVOKE with the physical
addresses of the inbound and outbound buffers, then CB_RSP after each callback (QK §3.1,
§4.1 step 6).  On the host the conduit is the world's :class:`~qtee.secure.SecureMonitor`.
"""

from __future__ import annotations

import errno
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, TypeVar

from objects import (
    CyclicAllocator,
    DriverError,
    IdrAllocator,
    ObjectTable,
    Refcounted,
    UsageError,
    result_from_u32,
    result_name,
)
from qtee import wire
from qtee._cli.trace import TraceRecord
from qtee._qcomtee.async_ import fetch_async
from qtee._qcomtee.object import (
    QCOMTEE_OBJECT_ID_END,
    QCOMTEE_OBJECT_ID_START,
    CbObject,
    QteeObject,
)
from qtee._qcomtee.primordial_obj import Primordial
from qtee._qcomtee.shm import PhysMemory, PhysSpace, Shm
from qtee._qcomtee_msg import Counts
from qtee._smc import HYP_CLIENT_ID, OnReturn, Regs, SmcArgs, SmcConduit, SmcFid
from qtee._tee.core import _P
from qtee._tee.shm import SHM_MAX, ShmBacking, private_backing
from qtee.addrspace import AddressSpace, ProcessMemory
from qtee.secure import SecureWorld
from qtee.secure._monitor import SecureMonitor

if TYPE_CHECKING:
    from qtee._qcomtee.call import Context
    from qtee.secure import GpTA, TrustedApp

_G = TypeVar("_G", bound="type[GpTA]")

__all__ = [
    "QCOMTEE_OBJECT_ID_END",
    "QCOMTEE_OBJECT_ID_START",
    "Device",
    "InvokeCtx",
    "QteeObject",
]

_SMC_INVOKE: Final = int(SmcFid.QCOM_SCM_SMCINVOKE_INVOKE)
_SMC_CB_RSP: Final = int(SmcFid.QCOM_SCM_SMCINVOKE_CB_RSP)
_OUT_SIZE: Final = wire.MAX_OUTBOUND_BUFFER_SIZE


def _crossing(direction: str, obj: int, op: int, counts: int, what: str) -> str:
    c = Counts.unpack(counts)
    return f"{direction:<11} obj={obj:#010x} op={op:<5} IB{c.ib} OB{c.ob} IO{c.io} OO{c.oo}  {what}"


def _emit(
    trace: Callable[[str], None] | None,
    records: Callable[[TraceRecord], None] | None,
    direction: str,
    obj: int,
    op: int,
    counts: int,
    what: str,
) -> None:
    """One crossing to the text trace and to the structured one, whichever are set."""
    if trace:
        trace(_crossing(direction, obj, op, counts, what))
    if records:
        c = Counts.unpack(counts)
        records(TraceRecord(time.time(), direction, obj, op, c.ib, c.ob, c.io, c.oo, what))


_ZERO_PAGE: Final = bytes(_OUT_SIZE)


@dataclass(slots=True, eq=False)
class InvokeCtx:
    """One invocation's state, from OBJECT_INVOKE (or a RELEASE the driver makes) to its
    final return: the kernel's ``qcomtee_object_invoke_ctx``.  Passed down to the SMC loop
    and to each callback request QTEE makes during it, and back to the caller, who undoes
    what the call leaves.  As the kernel's context owns its message buffers, each outbound
    page owns one (:attr:`_OutPage.ctx`): a call that takes the page resets it, and a
    finished call leaves ``held`` empty."""

    #: ``u[]``: the call's params as the caller gave them (``(attr, a, b, c)``).
    params: list[_P]
    #: QTEE objects referenced for the call -- its target, its inputs, and those lent to
    #: QTEE in callback responses: their temporary references go once the call is over.
    held: list[QteeObject]
    #: NS ids made for the inbound message: erased (without a release notification) if
    #: QTEE never accepted it.  Empty (a shared tuple, no list made) until the first.
    created: list[tuple[int, CbObject]] | tuple[()] = ()
    #: QTEE has the message (its first successful return): it owns the CB objects in it.
    accepted: bool = False


class _OutPage:
    """An outbound buffer (4 KiB) a device keeps lent to ``phys`` and reuses from call to
    call while it has an open context, as the kernel keeps its pool pages registered; and
    the state of the call using it.  ``on_return`` is bound once, so a call makes no
    callable (the invoke hot path)."""

    __slots__ = ("abandoned", "call", "ctx", "device", "on_return", "out", "pa", "served")

    def __init__(self, device: Device) -> None:
        #: The invoke context of the call that takes this page (reset by that call).
        self.ctx = InvokeCtx([], [])
        phys = device.phys
        buf = bytearray(_OUT_SIZE)
        self.device = device
        self.pa = phys.lend(buf)
        view = phys.view(self.pa, _OUT_SIZE)
        #: The page as lent: what QTEE writes and the driver reads (the buffer itself
        #: when the lend is an alias, as on the host; else a view of where it went).
        self.out: bytearray | memoryview = buf if view.obj is buf else view
        self.served = False
        #: Serving a callback raised (Ctrl-C in its wait): QTEE then ends the call on
        #: DEFUNCT, and its final return's async tail is still the driver's to read.
        self.abandoned = False
        #: The call using the page (None while it is free).
        self.call: InvokeCtx | None = None
        self.on_return: OnReturn = self._on_return

    def _on_return(self, regs: Regs) -> tuple[int, int, int]:
        """A type-3 return: serve the callback request in this thread, answer CB_RSP."""
        call = self.call
        if call is None:  # set by _smc_invoke for the length of its SMC
            raise UsageError("a callback request on an outbound page no call is using")
        call.accepted = True
        self.served = True
        device = self.device
        hook = device.on_callback
        if hook is not None:
            hook(True)
        try:
            device._serve(self.out, call)
        except BaseException:
            self.abandoned = True
            raise
        finally:
            if hook is not None:
                hook(False)
        return _SMC_CB_RSP, self.pa, _OUT_SIZE


class Device:
    """One ``/dev/teeN``: reaches QTEE through SMCs on a conduit (QK §3.1).

    ``Device()`` is the standard QTEE on a secure world of its own: the root with its
    services (the app loader, listeners, TA autoload, FeatureVersions, Diagnostics) and
    IGPAppClient (0x199) for GP clients.  On the host, ``Device(world)`` uses the
    world's :class:`~qtee.secure.SecureMonitor` (made on first use) as its conduit and
    the monitor's host-physical memory as ``phys``; every host device on one world
    shares both.  A guest's device (``qtee.vm``) has no world:
    ``Device(memory=..., phys=guest_ram, conduit=guest)``.
    """

    def __init__(
        self,
        world: SecureWorld | None = None,
        *,
        memory: AddressSpace | None = None,
        shm_backing: ShmBacking | None = None,
        phys: PhysSpace | None = None,
        conduit: SmcConduit | None = None,
    ) -> None:
        if conduit is not None and not callable(getattr(conduit, "smc", None)):
            raise TypeError("conduit must have an smc method")
        monitor: SecureMonitor | None = None
        if world is None and phys is None and conduit is None:  # the standard QTEE
            from qtee.secure import QteeRoot
            from qtee.secure._gpclient import install_gp_app_client

            world = SecureWorld(QteeRoot())
            install_gp_app_client(world)
        if world is None:
            if phys is None or conduit is None:
                missing = "conduit=" if conduit is None else "phys="
                raise UsageError(
                    f"a guest's Device needs both phys= and conduit=; {missing} is missing "
                    "(Device() alone is a standard QTEE; Device(world) runs on a SecureWorld)"
                )
        elif not isinstance(world, SecureWorld):
            raise TypeError(f"world must be a SecureWorld, not {type(world).__name__}")
        elif world.client_id != HYP_CLIENT_ID:
            raise UsageError(f"world of client {world.client_id} is a guest's partition")
        else:
            if phys is not None and not isinstance(phys, PhysMemory):
                raise TypeError("a host Device's phys is the monitor's PhysMemory")
            monitor = SecureMonitor.of(world, phys)
            phys = monitor.phys
            if conduit is None:
                conduit = monitor
        self._world = world
        #: The monitor of ``world`` (None for a guest's device).
        self.monitor = monitor
        #: Where this device's SMCs go: the monitor, or a given conduit (a VMM trap).
        self.conduit: SmcConduit = conduit
        #: The conduit's SMC with every register in one tuple: its own ``_smc`` when its
        #: ``smc`` is the standard spelling (no keyword call, no repacking per SMC).
        self._smc_regs: Callable[[SmcArgs, OnReturn | None], Regs] = (
            conduit._smc
            if getattr(type(conduit), "smc", None) is SmcConduit.smc
            else lambda args, on_return: conduit.smc(*args, on_return=on_return)
        )
        #: Physical memory: shm regions and the buffers lent for each SMC.
        self.phys: PhysSpace = phys
        self.memory: AddressSpace = memory if memory is not None else ProcessMemory()
        #: Where SHM_ALLOC puts a buffer (a device server uses memory files it can share).
        self.shm_backing: ShmBacking = shm_backing or private_backing
        #: The largest SHM_ALLOC; past it ENOMEM (see :data:`qtee._tee.shm.SHM_MAX`).
        self.shm_max = SHM_MAX
        self.ns: ObjectTable[CbObject] = ObjectTable(
            CyclicAllocator(QCOMTEE_OBJECT_ID_START, QCOMTEE_OBJECT_ID_END), name="ns ids"
        )
        self.shm: ObjectTable[Shm] = ObjectTable(IdrAllocator(1, 0), name="shm ids")
        self.primordial = Primordial()
        #: Called with one line per crossing when set (``qtee demo`` prints them).
        self.trace: Callable[[str], None] | None = None
        #: Called with the same crossings as structured records (``qtee trace``).
        self.trace_records: Callable[[TraceRecord], None] | None = None
        #: Called in the invoking thread with True when QTEE asks it to serve a callback
        #: request and with False once it is answered (a device server tells its client
        #: that the call is waiting on a callback, so the client's deadline stands still).
        self.on_callback: Callable[[bool], None] | None = None
        self._lock = threading.Lock()
        self._pages: list[_OutPage] = []  # free outbound pages
        self.contexts: set[Context] = set()
        self._opens = itertools.count()

    @property
    def world(self) -> SecureWorld:
        """The host's secure world (a guest's device has none: :class:`UsageError`)."""
        if self._world is None:
            raise UsageError("a guest's device sees no secure world (see secure_world)")
        return self._world

    @property
    def secure_world(self) -> SecureWorld | None:
        """The secure world this device was built on; None for a guest's device."""
        return self._world

    def register_ta(self, name: str, cls: type[TrustedApp]) -> None:
        """Make ``cls`` the TA ``name`` of this device's world only (``world.tas``),
        found before a process-wide :func:`~qtee.secure.register_ta` of that name."""
        self.world.tas.register(name, cls)

    def register_gp_ta(self, cls: _G) -> _G:
        """Make ``cls`` a GP TA of this device's world only (reached through
        IGPAppClient, :class:`~qtee.gp.TeecContext`); returns ``cls``."""
        return self.world.tas.register_gp(cls)

    def open(self) -> Context:
        """Open the device: one context (one open fd), numbered in the order of opens."""
        from qtee._qcomtee.call import Context  # the fd's module builds on this one

        with self._lock:
            ctx = Context(self, next(self._opens))
            self.contexts.add(ctx)
        return ctx

    def leaks(self) -> dict[str, int]:
        """Every table that still holds something, by name (empty when nothing leaked).

        Covers the secure world's object table and pending async releases, NS ids, shm ids,
        physical regions, and per open context (by its :attr:`Context.number`) its object
        IDR and request ids.
        """
        world = self._world
        found = {
            "secure objects": len(world.live_ids()) if world is not None else 0,
            "pending async releases": len(world.pending_releases()) if world is not None else 0,
            "ns ids": len(self.ns),
            "shm ids": len(self.shm.allocator),  # reserved ids too
            "physical regions": len(self.phys),
        }
        with self._lock:
            contexts = sorted(self.contexts, key=lambda c: c.number)
        for ctx in contexts:
            found[f"context {ctx.number} objects"] = len(ctx.objects)
            found[f"context {ctx.number} request ids"] = len(ctx.requests)
        return {name: count for name, count in found.items() if count}

    def _release_qtee(self, qtee_id: int) -> None:
        """RELEASE (op 0xFFFF, no args) on a QTEE id, as the kernel's release work does.

        A failed SMC frees the wrapper all the same (the kernel retries only errors other
        than ENODEV, QK §2.3; the model's conduits fail only when QTEE is gone)."""
        inbound = wire.encode_invoke(qtee_id, wire.QCOMTEE_MSG_OBJECT_OP_RELEASE)
        page = self._page()
        call = page.ctx  # (reset by its last call; this one creates no NS id)
        call.params = []
        ok = False
        try:
            self._smc_invoke(inbound, page, call)
            fetch_async(self, page.out, 0)
            ok = True
        except DriverError:
            pass
        finally:
            held = call.held
            for obj in held:
                obj.put()
            held.clear()
            call.accepted = False
            self._recycle(page, ok)

    def _page(self) -> _OutPage:
        """An outbound page for one call: a free one, or a new one."""
        try:
            return self._pages.pop()
        except IndexError:
            return _OutPage(self)

    def _recycle(self, page: _OutPage, clean: bool) -> None:
        """Give a page back, zero-filled again (QK §3.1: QTEE assumes unused buffers are
        zeroed): a callback or a failed call may have left bytes in it."""
        if page.served or not clean:
            page.out[:] = _ZERO_PAGE
            page.served = page.abandoned = False
        page.call = None
        self._pages.append(page)
        if not self.contexts:  # no fd is open (release work): the pool goes
            self.release_pages()

    def release_pages(self) -> int:
        """Take back the free outbound pages this device keeps lent (see
        :class:`_OutPage`); returns how many.  Runs by itself when the last context
        closes, so a device with no open fd holds no lent page."""
        n = 0
        while True:
            try:
                page = self._pages.pop()
            except IndexError:
                return n
            self.phys.take_back(page.pa)
            n += 1

    def _smc_invoke(
        self,
        inbound: bytearray,
        page: _OutPage,
        call: InvokeCtx,
    ) -> int:
        """INVOKE, then serve each callback and answer CB_RSP until a final return (QK §4.1
        step 6); returns QTEE's result.

        ``inbound`` is lent to ``phys`` for the call; the outbound ``page`` already is.
        ``call.accepted`` turns True at the first successful return: QTEE has the message
        and owns the CB objects in it.  A failed SMC raises its errno before that and
        ENODEV after it, as the kernel does.  QTEE objects lent to QTEE in callback
        responses are added to ``call.held``; the caller drops their temporary references
        once the call is over.
        """
        phys = self.phys
        in_pa = phys.lend(inbound)
        try:
            page.call = call
            try:
                regs = self._smc_regs(
                    (_SMC_INVOKE, in_pa, len(inbound), page.pa, _OUT_SIZE, 0, 0, 0),
                    page.on_return,
                )
            except DriverError as exc:
                if call.accepted:
                    raise DriverError(errno.ENODEV, f"SMC failed after a callback: {exc}") from exc
                raise
        finally:
            phys.take_back(in_pa)
        call.accepted = True
        raw = regs[1]
        return 0 if raw == 0 else result_from_u32(raw)

    def _serve(self, out: bytearray | memoryview, call: InvokeCtx) -> None:
        """Serve the callback request in ``out`` in this thread, for the invocation ``call``
        (``qcomtee_cb_object_invoke``)."""
        msg = wire.decode_callback(out)
        fetch_async(self, out, msg.size)  # the async tail follows the request
        trace, records = self.trace, self.trace_records
        if trace or records:
            _emit(trace, records, "QTEE -> NS", msg.cxt, msg.op, msg.counts, "callback")
        status, ob_data, oo = self._cb_invoke(msg)
        if trace or records:
            _emit(
                trace,
                records,
                "NS -> QTEE",
                msg.cxt,
                msg.op,
                msg.counts,
                result_name(wire.result_from_errno(status)),
            )
        oo_ids: list[int] = []
        if status == 0:
            try:
                for o in oo:
                    oo_ids.append(self._id_out(o))
                wire.write_callback_response(out, msg, 0, ob_data, oo_ids)
                # QTEE objects were lent for the call: their temporary references go once
                # QTEE has consumed this response (CB references moved to the NS ids).
                held = call.held
                for o in oo:
                    if isinstance(o, QteeObject):
                        held.append(o)
                return
            except DriverError as exc:
                status = -exc.code
            except Exception:
                status = -errno.EINVAL
            # The response cannot be delivered: drop what was going to QTEE.
            for ident in oo_ids:
                if ident & wire.QCOMTEE_MSG_OBJECT_NS_BIT:
                    self.ns.erase(ident)
            for o in oo:
                if isinstance(o, Refcounted):
                    o.put()
        wire.write_callback_response(out, msg, wire.result_from_errno(status))

    def _cb_invoke(self, msg: wire.CallbackMsg) -> tuple[int, Sequence[bytes], Sequence[object]]:
        cxt = msg.cxt
        if not cxt & wire.QCOMTEE_MSG_OBJECT_NS_BIT:
            return -errno.EINVAL, [], []  # NULL or a QTEE-hosted id
        obj = (
            self.primordial
            if cxt == wire.QCOMTEE_MSG_OBJECT_PRIMORDIAL
            else self.ns.lookup_get(cxt)
        )
        if obj is None:
            return -errno.EINVAL, [], []
        try:
            op = msg.op & wire.QCOMTEE_MSG_OBJECT_OP_MASK
            if op == wire.QCOMTEE_MSG_OBJECT_OP_RELEASE:
                if self.ns.erase_if(cxt, obj):
                    obj.put()
                return 0, [], []
            if op == wire.QCOMTEE_MSG_OBJECT_OP_RETAIN:
                obj.get()
                return 0, [], []
            io: list[object] = []
            for ident in msg.io:
                got = self._id_in(ident)
                if got is False:
                    for o in io:
                        if isinstance(o, Refcounted):
                            o.put()
                    return -errno.EINVAL, [], []
                io.append(got)
            try:
                ob = tuple([r.size for r in msg.ob]) if msg.ob else ()
                status, ob_data, oo = obj.dispatch(op, msg.ib, ob, tuple(io), msg.n_oo)
            finally:  # whoever keeps one (a supplicant's IDR) took its own reference
                for o in io:
                    if isinstance(o, Refcounted):
                        o.put()
            return status, ob_data, oo
        finally:
            obj.put()

    def _id_in(self, ident: int) -> object:
        """A wire id from QTEE -> kernel object with a reference (False if unknown)."""
        if ident == wire.QCOMTEE_MSG_OBJECT_NULL:
            return None
        if ident == wire.QCOMTEE_MSG_OBJECT_PRIMORDIAL:
            return self.primordial
        if ident & wire.QCOMTEE_MSG_OBJECT_NS_BIT:
            obj = self.ns.lookup_get(ident)
            return False if obj is None else obj
        return QteeObject(self, ident)

    def _id_out(self, obj: object) -> int:
        """A kernel object going to QTEE -> wire id (CB objects get a new NS id each time)."""
        if obj is None:
            return wire.QCOMTEE_MSG_OBJECT_NULL
        if isinstance(obj, QteeObject):
            return obj.qtee_id
        if obj is self.primordial:
            return wire.QCOMTEE_MSG_OBJECT_PRIMORDIAL
        if isinstance(obj, CbObject):
            try:
                return self.ns.insert(obj)
            except DriverError:
                raise DriverError(errno.ENOSPC, "NS ids exhausted") from None
        raise DriverError(errno.EINVAL, f"cannot send a {type(obj).__name__} to QTEE")
