"""The driver model: a device, its open contexts, and their ioctls (kernel ``call.c``).

VERSION, SHM_ALLOC, OBJECT_INVOKE (QTEE, callback and memory objects in and out, the
primordial object), SUPPL_RECV/SEND, the ioctls qcomtee does not support, and the fd's
close (QK §4).

``Context.ioctl(cmd, arg)`` is shaped like ``fcntl.ioctl``: ``arg`` is a mutable buffer
holding the kernel's struct; for buf_data ioctls its ``buf_ptr`` points at the argument
block in the context's address space.  Failures raise :class:`objects.DriverError` (an
``OSError``) with the kernel's errno and write nothing back.

QTEE is reached through SMCs on a conduit (:mod:`qtee._smc`): INVOKE with the physical
addresses of the inbound and outbound buffers, then CB_RSP after each callback (QK §3.1,
§4.1 step 6).  On the host the conduit is the world's :class:`~qtee.secure.SecureMonitor`.
"""

from __future__ import annotations

import errno
import functools
import itertools
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

from objects import (
    ENOTSUPP,
    CyclicAllocator,
    DriverError,
    IdrAllocator,
    ObjectTable,
    Refcounted,
    UsageError,
    result_from_u32,
    result_name,
)
from qtee import _checks, uapi, wire
from qtee._cli.trace import TraceRecord
from qtee._file import FileLife, popped
from qtee._mem_obj import (
    SHM_MAX,
    MemObject,
    PhysMemory,
    PhysSpace,
    Primordial,
    Shm,
    ShmBacking,
    discard_backing,
    private_backing,
)
from qtee._qcomtee_msg import Counts
from qtee._smc import HYP_CLIENT_ID, OnReturn, Regs, SmcConduit, SmcFid
from qtee._user_obj import OP_RELEASE, PROCESSING, CbObject, Request, RequestQueue, UserObject
from qtee.addrspace import AddressSpace, ProcessMemory
from qtee.secure import SecureWorld
from qtee.secure._monitor import SecureMonitor

if TYPE_CHECKING:
    from qtee.secure import GpTA, TrustedApp

_G = TypeVar("_G", bound="type[GpTA]")

__all__ = ["Context", "Device"]

QCOMTEE_OBJECT_ID_START: Final = wire.QCOMTEE_MSG_OBJECT_NS_BIT + 1
QCOMTEE_OBJECT_ID_END: Final = 0xFFFF_FFFF
_GEN_CAPS: Final = uapi.TEE_GEN_CAP_OBJREF


#: A param as the driver handles it: ``(attr, a, b, c)`` of ``struct tee_ioctl_param``.
_P = tuple[int, int, int, int]

_U32: Final = struct.Struct("<I")
_PARAM: Final = struct.Struct("<4Q")  # struct tee_ioctl_param
_INVOKE_HEAD: Final = struct.Struct("<QIII4x")  # struct tee_ioctl_object_invoke_arg
_SUPP_HEAD: Final = struct.Struct("<II")  # supp_recv_arg / supp_send_arg
_NONE_P: Final = (0, 0, 0, 0)
_read: Final = _checks.read_buf_block
_UB_IN: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_INPUT
_UB_OUT: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_OUTPUT
_OBJ_IN: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_INPUT
_OBJ_OUT: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_OUTPUT
_META_IN: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_INOUT | uapi.TEE_IOCTL_PARAM_ATTR_META
_META_OUT: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_OUTPUT | uapi.TEE_IOCTL_PARAM_ATTR_META
_FLAG_TEE: Final = uapi.QCOMTEE_OBJREF_FLAG_TEE
_FLAG_USER: Final = uapi.QCOMTEE_OBJREF_FLAG_USER
_FLAG_MEM: Final = uapi.QCOMTEE_OBJREF_FLAG_MEM
_ARGS_MAX: Final = _checks.QCOMTEE_ARGS_MAX
_ARGS_PER_TYPE: Final = _checks.QCOMTEE_ARGS_PER_TYPE
_OBJREF_NULL: Final = uapi.TEE_OBJREF_NULL
_OP_RELEASE: Final = wire.QCOMTEE_MSG_OBJECT_OP_RELEASE
_OP_RETAIN: Final = wire.QCOMTEE_MSG_OBJECT_OP_RETAIN
_OP_MASK: Final = wire.QCOMTEE_MSG_OBJECT_OP_MASK
_SMC_INVOKE: Final = int(SmcFid.QCOM_SCM_SMCINVOKE_INVOKE)
_SMC_CB_RSP: Final = int(SmcFid.QCOM_SCM_SMCINVOKE_CB_RSP)
_OUT_SIZE: Final = wire.MAX_OUTBOUND_BUFFER_SIZE


@functools.cache
def _params_struct(n: int) -> struct.Struct:
    return struct.Struct("<" + "4Q" * n)


@functools.cache
def _invoke_struct(n: int) -> struct.Struct:
    return struct.Struct("<QIII4x" + "4Q" * n)


def _pack_params(params: list[_P]) -> bytes:
    return _params_struct(len(params)).pack(*itertools.chain.from_iterable(params))


def _encode_wrapped(
    cxt: int, op: int, ib: list[bytes], ob: list[int], io: list[int], n_oo: int
) -> bytearray:
    """The inbound message when a kind has 16 args (spec §7): ``qcomtee_msg_init`` masks
    each count to its nibble (16 -> 0) while every arg is still laid out in full."""
    n = len(ib) + len(ob) + len(io) + n_oo
    off = (12 + 8 * n + 7) & ~7
    fields: list[int] = []
    for data in ib:
        fields += (off, len(data))
        off += (len(data) + 7) & ~7
    for size in ob:
        fields += (off, size)
        off += (size + 7) & ~7
    for ident in io:
        fields += (ident, 0)
    fields += [0] * (2 * n_oo)
    if off > wire.MAX_INBOUND_BUFFER_SIZE:
        raise wire.MessageTooLarge(f"inbound message needs {off} bytes")
    counts = (len(ib) & 15) | (len(ob) & 15) << 4 | (len(io) & 15) << 8 | (n_oo & 15) << 12
    buf = bytearray(off)
    struct.pack_into(f"<3I{len(fields)}I", buf, 0, cxt, op, counts, *fields)
    for k, data in enumerate(ib):
        buf[fields[2 * k] : fields[2 * k] + len(data)] = data
    return buf


def _wrapped_outputs(
    buf: bytearray, n_ib: int, n_ob: int, n_io: int, n_oo: int
) -> tuple[list[bytes], list[int]]:
    """Outputs read back by the kernel's own arg indexes (not the wrapped counts)."""
    obs = []
    for j in range(n_ob):
        off, size = struct.unpack_from("<II", buf, 12 + 8 * (n_ib + j))
        obs.append(bytes(buf[off : off + size]))
    base = 12 + 8 * (n_ib + n_ob + n_io)
    oos = [struct.unpack_from("<I", buf, base + 8 * j)[0] for j in range(n_oo)]
    return obs, oos


def _pack_invoke(ident: int, op: int, ret: int, params: list[_P]) -> bytes:
    """``struct tee_ioctl_object_invoke_arg`` followed by its params."""
    return _invoke_struct(len(params)).pack(
        ident, op, ret, len(params), *itertools.chain.from_iterable(params)
    )


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


def _einval(why: str) -> DriverError:
    return DriverError(errno.EINVAL, why)


class QteeObject(Refcounted):
    """The kernel's wrapper of a QTEE-hosted object (one QTEE reference)."""

    __slots__ = ("device", "qtee_id")

    def __init__(self, device: Device, qtee_id: int) -> None:
        super().__init__()
        self.device = device
        self.qtee_id = qtee_id

    def on_release(self) -> None:
        self.device._release_qtee(self.qtee_id)


_NO_CALL: Final[list[Any]] = []  # what an idle page points at (never written to)
_ZERO_PAGE: Final = bytes(_OUT_SIZE)


class _OutPage:
    """An outbound buffer (4 KiB) a device keeps lent to ``phys`` and reuses from call to
    call while it has an open context, as the kernel keeps its pool pages registered; and
    the state of the call using it.  ``on_return`` is bound once, so a call makes no
    callable (the invoke hot path)."""

    __slots__ = ("abandoned", "accepted", "device", "lent", "on_return", "out", "pa", "served")

    def __init__(self, device: Device) -> None:
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
        self.accepted: list[bool] = _NO_CALL
        self.lent: list[QteeObject] = _NO_CALL
        self.on_return: OnReturn = self._on_return

    def _on_return(self, regs: Regs) -> tuple[int, int, int]:
        """A type-3 return: serve the callback request in this thread, answer CB_RSP."""
        self.accepted[0] = True
        self.served = True
        device = self.device
        local = device._local
        outer = getattr(local, "lent", None)
        local.lent = self.lent
        hook = device.on_callback
        if hook is not None:
            hook(True)
        try:
            device._serve(self.out)
        except BaseException:
            self.abandoned = True
            raise
        finally:
            local.lent = outer
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
        #: Physical memory: shm regions and the buffers lent for each SMC.
        self.phys: PhysSpace = phys
        self.memory: AddressSpace = memory if memory is not None else ProcessMemory()
        #: Where SHM_ALLOC puts a buffer (a device server uses memory files it can share).
        self.shm_backing: ShmBacking = shm_backing or private_backing
        #: The largest SHM_ALLOC; past it ENOMEM (see :data:`qtee._mem_obj.SHM_MAX`).
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
        self._local = threading.local()
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
        lent: list[QteeObject] = []
        page = self._page()
        ok = False
        try:
            self._smc_invoke(inbound, page, [False], lent)
            self._fetch_async(page.out, 0)
            ok = True
        except DriverError:
            pass
        finally:
            self._recycle(page, ok)
            for obj in lent:
                obj.put()

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
        page.accepted = page.lent = _NO_CALL
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
        accepted: list[bool],
        lent: list[QteeObject],
    ) -> int:
        """INVOKE, then serve each callback and answer CB_RSP until a final return (QK §4.1
        step 6); returns QTEE's result.

        ``inbound`` is lent to ``phys`` for the call; the outbound ``page`` already is.
        ``accepted[0]`` turns True at the first successful return: QTEE has the message
        and owns the CB objects in it.  A failed SMC raises its errno before that and
        ENODEV after it, as the kernel does.  QTEE objects lent to QTEE in callback
        responses are added to ``lent``; the caller drops their temporary references once
        the call is over.
        """
        phys = self.phys
        in_pa = phys.lend(inbound)
        try:
            page.accepted = accepted
            page.lent = lent
            try:
                regs = self.conduit.smc(
                    _SMC_INVOKE,
                    in_pa,
                    len(inbound),
                    page.pa,
                    _OUT_SIZE,
                    on_return=page.on_return,
                )
            except DriverError as exc:
                if accepted[0]:
                    raise DriverError(errno.ENODEV, f"SMC failed after a callback: {exc}") from exc
                raise
        finally:
            phys.take_back(in_pa)
        accepted[0] = True
        raw = regs[1]
        return 0 if raw == 0 else result_from_u32(raw)

    def _serve(self, out: bytearray | memoryview) -> None:
        """Serve the callback request in ``out`` in this thread (``qcomtee_cb_object_invoke``)."""
        msg = wire.decode_callback(out)
        self._fetch_async(out, wire.async_offset(msg))
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
                lent = getattr(self._local, "lent", None)
                for o in oo:
                    if isinstance(o, QteeObject):
                        if lent is not None:
                            lent.append(o)
                        else:
                            o.put()
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

    def _cb_invoke(self, msg: wire.CallbackMsg) -> tuple[int, list[bytes], list[object]]:
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
                status, ob_data, oo = obj.dispatch(
                    op, msg.ib, tuple(r.size for r in msg.ob), tuple(io), msg.n_oo
                )
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

    def _fetch_async(self, out: bytearray | memoryview, offset: int) -> None:
        if len(out) - offset <= 8 or not _U32.unpack_from(out, offset)[0]:
            return  # no async message (version 0): nothing to parse or clear
        try:
            batch = wire.decode_async(out, offset)
        except Exception:  # a malformed tail stops parsing, as in the kernel
            batch = wire.AsyncBatch((), wire.ASYNC_STOP_END)
        for ids in batch.releases:
            if ids and (self.trace or self.trace_records):
                what = f"async RELEASE of {', '.join(hex(i) for i in ids)}"
                if self.trace:
                    self.trace(f"{'QTEE -> NS':<11} {what}")
                if self.trace_records:
                    self.trace_records(
                        TraceRecord(time.time(), "QTEE -> NS", None, None, 0, 0, 0, 0, what)
                    )
            for ident in ids:
                if QCOMTEE_OBJECT_ID_START <= ident <= QCOMTEE_OBJECT_ID_END:
                    obj = self.ns.erase(ident)
                    if obj is not None:
                        obj.put()
        wire.clear_async(out, offset)


class Context:
    """One open fd: its IDR of QTEE objects and its ioctls."""

    def __init__(self, device: Device, number: int = 0) -> None:
        self.device = device
        #: The device's count of opens when this one was made (0 for the first fd): how
        #: :meth:`Device.leaks` names it.
        self.number = number
        self.objects: ObjectTable[QteeObject] = ObjectTable(IdrAllocator(0), name="ctx objects")
        self.requests = RequestQueue()
        self.shms: dict[int, Shm] = {}  # the owner's reference (its shm fd)
        #: The fd's lifetime: calls in flight hold it; the teardown waits for the last.
        self.life = FileLife(self.requests.close, self._teardown)
        #: Who holds this fd, for ``qtee info`` (a device server names its connections).
        self.label = f"fd {number}"
        #: Model-only, for ``qtee info``: the class name of the callback object the fd's
        #: owner exported as a user id (set by the ``Client`` on the fd).
        self.callback_class: Callable[[int], str | None] | None = None

    @property
    def closed(self) -> bool:
        """The fd was closed (its teardown may still wait for calls in flight)."""
        return self.life.closed

    # ------------------------------------------------------------------ ioctl entry
    def ioctl(self, cmd: int, arg: bytearray | memoryview) -> int:
        """Run ``cmd`` on ``arg`` (the kernel's struct, updated in place); returns 0."""
        life = self.life
        life.enter()
        try:
            if cmd == uapi.TEE_IOC_OBJECT_INVOKE:
                return self._object_invoke(arg)
            if cmd == uapi.TEE_IOC_SUPPL_RECV:
                return self._supp_recv(arg)
            if cmd == uapi.TEE_IOC_SUPPL_SEND:
                return self._supp_send(arg)
            if cmd == uapi.TEE_IOC_SHM_ALLOC:
                return self._shm_alloc(arg)
            if cmd == uapi.TEE_IOC_VERSION:
                self._need(arg, uapi.VersionData.SIZE)
                uapi.VersionData(uapi.TEE_IMPL_ID_QTEE, 0, _GEN_CAPS).pack_into(arg)
                return 0
            if cmd == uapi.TEE_IOC_SHM_REGISTER:
                # qcomtee fails before the TEE core would write the struct back: read only
                size = uapi.ShmRegisterData.SIZE
                data = uapi.ShmRegisterData.unpack(self._need(arg, size, writable=False))
                if data.flags:
                    raise _einval("SHM_REGISTER flags must be 0")
                raise DriverError(ENOTSUPP, "qcomtee has no shm_register op")
            raise _einval(
                f"ioctl {uapi.IOCTL_NAMES.get(cmd, hex(cmd))} is not supported by qcomtee"
            )
        finally:
            life.leave()

    _need = staticmethod(_checks.need_arg)

    def _shm_alloc(self, arg: bytearray | memoryview) -> int:
        """``tee_ioctl_shm_alloc``: a shm from the dynamic pool, or ENOMEM and nothing made
        (no buffer, no memory file, no id)."""
        data = uapi.ShmAllocData.unpack(self._need(arg, uapi.ShmAllocData.SIZE))
        if data.flags:
            raise _einval("SHM_ALLOC flags must be 0")
        device = self.device
        size = data.size
        if size > device.shm_max:  # alloc_pages_exact past the largest page order
            raise DriverError(
                errno.ENOMEM, f"cannot allocate {size} bytes (at most {device.shm_max})"
            )
        try:
            buf, fd = device.shm_backing(size)
        except (OSError, ValueError, OverflowError, MemoryError) as exc:
            raise DriverError(errno.ENOMEM, f"cannot allocate {size} bytes: {exc!r}") from None
        shm_id = -1
        shm: Shm | None = None
        try:
            shm_id = device.shm.reserve()
            shm = Shm(self, shm_id, buf, fd, device.phys)
        finally:
            if shm is None:  # no id or no physical address: undo what was made
                if shm_id >= 0:
                    device.shm.erase(shm_id)
                discard_backing(buf, fd)
        device.shm.replace(shm_id, shm)
        self.shms[shm_id] = shm
        uapi.ShmAllocData(size, 0, shm_id).pack_into(arg)
        return 0

    def shm_view(self, shm_id: int) -> memoryview:
        """The buffer of a shm this context allocated (what ``mmap`` of its fd gives)."""
        shm = self.shms.get(shm_id)
        if shm is None:
            raise DriverError(errno.EBADF, f"shm {shm_id} is not owned by this context")
        return memoryview(shm.buf)

    def shm_free(self, shm_id: int) -> None:
        """Close the shm's fd: drop the owner's reference (QTEE's copies live on)."""
        shm = self.shms.pop(shm_id, None)
        if shm is None:
            raise DriverError(errno.EBADF, f"shm {shm_id} is not owned by this context")
        shm.put()

    # ------------------------------------------------------------------ OBJECT_INVOKE
    def _object_invoke(self, arg: bytearray | memoryview) -> int:
        device = self.device
        mem = device.memory
        buf_ptr, block, params = _read(self.device.memory, arg, _INVOKE_HEAD.size, 16)
        ident, op, _ret, num = _INVOKE_HEAD.unpack_from(block)
        n_ib = n_ob = n_io = n_oo = 0
        for attr, _a, _b, _c in params:
            if attr == _UB_IN:
                n_ib += 1
            elif attr == _UB_OUT:
                n_ob += 1
            elif attr == _OBJ_IN:
                n_io += 1
            elif attr == _OBJ_OUT:
                n_oo += 1
        most = max(n_ib, n_ob, n_io, n_oo)
        if num > _ARGS_MAX or n_ib + n_ob + n_io + n_oo != num or most > _ARGS_PER_TYPE:
            _checks.params_check(params)

        if op == _OP_RELEASE:
            entry = self.objects.erase(ident) if ident <= 0x7FFF_FFFF else None
            if entry is not None:
                entry.put()
            if n_oo:
                params = [(p[0], 0, 0, 0) if p[0] == _OBJ_OUT else p for p in params]
            mem.write(buf_ptr, _pack_invoke(ident, op, _ret, params))
            return 0

        target: QteeObject | None = None
        if ident == _OBJREF_NULL:
            _checks.root_object_check(op, params)
            cxt = wire.QCOMTEE_MSG_OBJECT_ROOT
        else:
            target = self.objects.lookup_get(ident) if ident <= 0x7FFF_FFFF else None
            if target is None:
                raise _einval(f"object id {ident} is not in this context")
            cxt = target.qtee_id
        held: list[QteeObject] = [] if target is None else [target]
        created: list[tuple[int, CbObject]] = []
        accepted = [False]
        try:
            if op & ~_OP_MASK or op == _OP_RETAIN:
                raise _einval(f"op {op:#x}")
            ib: list[bytes] = []
            ob: list[int] = []
            io: list[int] = []
            for attr, a, b, _c in params:
                if attr == _UB_IN:
                    ib.append(mem.read(a, b))  # a fault is EFAULT (qcomtee_prepare_msg)
                elif attr == _UB_OUT:
                    ob.append(b)
                elif attr == _OBJ_IN:
                    io.append(self._objref_in(a, b, held, created))
            wrapped = most > 15
            try:
                if wrapped:
                    inbound = _encode_wrapped(cxt, op, ib, ob, io, n_oo)
                else:
                    inbound = wire.encode_invoke(cxt, op, ib, ob, io, n_oo)
            except wire.MessageTooLarge as exc:
                raise _einval(str(exc)) from None
            trace, records = device.trace, device.trace_records
            if trace or records:
                counts = Counts(n_ib, n_ob, n_io, n_oo).pack()
                _emit(trace, records, "NS -> QTEE", cxt, op, counts, "invoke")
            page = device._page()
            clean = False
            try:
                result = device._smc_invoke(inbound, page, accepted, held)
                if trace or records:
                    _emit(trace, records, "QTEE -> NS", cxt, op, counts, result_name(result))
                if result == 0:
                    if n_ob or n_oo:
                        if wrapped:
                            obs, oos = _wrapped_outputs(inbound, n_ib, n_ob, n_io, n_oo)
                        else:
                            resp = wire.decode_invoke_response(inbound)
                            obs, oos = list(resp.ob), list(resp.oo)
                        result, params = self._outputs(obs, oos, params)
                elif n_oo:
                    params = [(p[0], 0, 0, 0) if p[0] == _OBJ_OUT else p for p in params]
                if _U32.unpack_from(page.out, 0)[0]:  # an async message is there
                    device._fetch_async(page.out, 0)
                clean = True
            except BaseException:
                if page.abandoned:  # QTEE's final return came all the same
                    device._fetch_async(page.out, 0)
                raise
            finally:
                device._recycle(page, clean)
        finally:
            for obj in held:
                obj.put()
            if not accepted[0]:  # QTEE never saw them: mimic its release, without notifying
                for ns_id, cb in created:
                    device.ns.erase(ns_id)
                    if isinstance(cb, UserObject):
                        cb.notify = False
                    cb.put()
        mem.write(buf_ptr, _pack_invoke(ident, op, result & 0xFFFF_FFFF, params))
        return 0

    def _objref_in(
        self, a: int, b: int, held: list[QteeObject], created: list[tuple[int, CbObject]]
    ) -> int:
        if a == uapi.TEE_OBJREF_NULL:
            return wire.QCOMTEE_MSG_OBJECT_NULL
        if b & _FLAG_USER:
            uo = UserObject(self, a)
            try:
                ns_id = self.device.ns.insert(uo)
            except DriverError:
                uo.notify = False
                uo.put()
                raise DriverError(errno.ENOSPC, "NS ids exhausted") from None
            created.append((ns_id, uo))
            return ns_id
        if b & _FLAG_TEE:
            obj = self.objects.lookup_get(a) if a <= 0x7FFF_FFFF else None
            if obj is None:
                raise _einval(f"object id {a} is not in this context")
            held.append(obj)
            return obj.qtee_id
        if b & _FLAG_MEM:
            mem = self._mem_in(a)
            try:
                ns_id = self.device.ns.insert(mem)
            except DriverError:
                mem.put()
                raise DriverError(errno.ENOSPC, "NS ids exhausted") from None
            created.append((ns_id, mem))
            return ns_id
        raise _einval(f"objref flags {b:#x} name no object kind")

    def _outputs(
        self, ob_data: list[bytes], oo_ids: list[int], params: list[_P]
    ) -> tuple[int, list[_P]]:
        """Copy OB data and convert OO ids; UNAVAIL (and no objects) if any fails."""
        mem = self.device.memory
        out = list(params)
        made: list[int] = []
        ok = True
        obs = iter(ob_data)
        oos = iter(oo_ids)
        for i, (attr, a, _b, c) in enumerate(params):
            if attr == _UB_OUT:
                data = next(obs)
                try:
                    mem.write(a, data)
                except DriverError:
                    ok = False
                out[i] = (attr, a, len(data), c)
            elif attr == _OBJ_OUT:
                ident = next(oos)
                if ident == wire.QCOMTEE_MSG_OBJECT_NULL:
                    out[i] = (attr, uapi.TEE_OBJREF_NULL, 0, 0)
                elif ident & wire.QCOMTEE_MSG_OBJECT_NS_BIT:
                    cb = self.device.ns.lookup_get(ident)
                    if isinstance(cb, UserObject) and cb.ctx is self:
                        out[i] = (attr, cb.user_id, _FLAG_USER, 0)
                    elif isinstance(cb, MemObject) and cb.shm.ctx is self:
                        out[i] = (attr, cb.shm.id, _FLAG_MEM, 0)
                    else:
                        ok = False
                    if cb is not None:
                        cb.put()
                else:
                    uid = self.objects.insert(QteeObject(self.device, ident))
                    made.append(uid)
                    out[i] = (attr, uid, _FLAG_TEE, 0)
        if ok:
            return 0, out
        for uid in made:
            entry = self.objects.erase(uid)
            if entry is not None:
                entry.put()
        out = [(p[0], 0, 0, 0) if p[0] == _OBJ_OUT else p for p in out]
        return -96, out  # QCOMTEE_MSG_ERROR_UNAVAIL

    # ------------------------------------------------------------------ supplicant
    def recv_nowait(self, arg: bytearray | memoryview) -> int:
        """SUPPL_RECV that never blocks (the model's own): EAGAIN when no request is
        queued, else exactly what the ioctl does.  With :meth:`RequestQueue.wait_ready`,
        a server or a C bridge serves a thread's RECV without parking a thread here."""
        life = self.life
        life.enter()
        try:
            return self._supp_recv(arg, wait=False)
        finally:
            life.leave()

    def _supp_recv(self, arg: bytearray | memoryview, *, wait: bool = True) -> int:
        mem = self.device.memory
        buf_ptr, _block, params = _read(self.device.memory, arg, _SUPP_HEAD.size, 4)
        if not params or params[0][0] != _META_IN:
            raise _einval("SUPPL_RECV needs a VALUE_INOUT|META first param")
        _attr, scratch, size, _c = params[0]
        if scratch & 7:
            raise _einval("scratch buffer must be 8-byte aligned")
        for p in params[1:]:
            if p[0] != uapi.TEE_IOCTL_PARAM_ATTR_TYPE_NONE:
                raise _einval("SUPPL_RECV params after the first must be NONE")
        slots = len(params)
        q = self.requests
        with q.cond:  # held for the whole selection, as reqs_lock is
            while True:
                if q.released or self.closed:
                    raise DriverError(errno.EINTR, "context closed while waiting")
                req = q.fifo[0] if q.fifo else None
                if req is None:
                    if not wait:
                        raise DriverError(errno.EAGAIN, "no request is queued")
                    q.cond.wait()
                    continue
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
                if req.op == OP_RELEASE:
                    q.finish(req, 0)  # notification: freed now, never answered
                    mem.write(buf_ptr, _SUPP_HEAD.pack(OP_RELEASE, 1) + _PARAM.pack(*out[0]))
                    return 0
                req.state = PROCESSING
                try:  # qcomtee_cb_params_from_args
                    for data, off in zip(req.ib, offs, strict=True):
                        mem.write(scratch + off, data)
                        out.append((_UB_IN, scratch + off, len(data), 0))
                    for cap in req.ob:
                        out.append((_UB_OUT, 0, cap, 0))
                    for obj in req.io:
                        out.append(self._objref_to_user(obj))
                except DriverError:
                    # Undo the conversions and fail the request with -EINVAL (QTEE sees
                    # UNAVAIL); keep waiting for the next one.
                    for attr, a, b, _c in out[1:]:
                        if attr == _OBJ_IN and b == _FLAG_TEE:
                            dropped = self.objects.erase(a)
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

    def _objref_to_user(self, obj: object) -> _P:
        """``qcomtee_objref_from_arg``: an object QTEE passed -> an OBJREF param."""
        if obj is None:
            return (_OBJ_IN, uapi.TEE_OBJREF_NULL, 0, 0)
        if isinstance(obj, QteeObject):
            if not obj.get():
                raise _einval("QTEE object is being released")
            return (_OBJ_IN, self.objects.insert(obj), _FLAG_TEE, 0)
        if isinstance(obj, UserObject):
            if obj.ctx is not self:
                raise _einval("user object of another context")
            return (_OBJ_IN, obj.user_id, _FLAG_USER, 0)
        if isinstance(obj, MemObject):
            if obj.shm.ctx is not self:
                raise _einval("memory object of another context")
            return (_OBJ_IN, obj.shm.id, _FLAG_MEM, 0)
        raise _einval(f"{type(obj).__name__} cannot be passed to userspace")

    def _supp_send(self, arg: bytearray | memoryview) -> int:
        _ptr, block, params = _read(self.device.memory, arg, _SUPP_HEAD.size, 4, exact=False)
        if not params or params[0][0] != _META_OUT:
            raise _einval("SUPPL_SEND needs a VALUE_OUTPUT|META first param")
        (raw,) = _U32.unpack_from(block, 0)
        req_id = params[0][1]
        q = self.requests
        with q.cond:
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
            try:
                ob_data, oo = self._send_outputs(req, params)
            except DriverError:
                q.finish(req, -errno.EINVAL)
                raise
            req.ob_data, req.oo = ob_data, oo
            q.finish(req, 0)
        return 0

    def _send_outputs(self, req: Request, params: list[_P]) -> tuple[list[bytes], list[object]]:
        """``qcomtee_cb_params_to_args``: index-aligned reply params -> OB data, OO objects."""
        n_ib, n_ob, n_io = len(req.ib), len(req.ob), len(req.io)
        end = 1 + n_ib + n_ob + n_io + req.n_oo
        if len(params) < end:
            raise _einval("reply has fewer params than the request")
        ob_data: list[bytes] = []
        oo: list[object] = []
        read = self.device.memory.read
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
                    oo.append(self._objref_from_user(a, b))
        except DriverError:
            for o in oo:  # never reached QTEE: dropped without a release notification
                if isinstance(o, UserObject):
                    o.notify = False
                if isinstance(o, Refcounted):
                    o.put()
            raise
        return ob_data, oo

    def _mem_in(self, shm_id: int) -> MemObject:
        shm = self.device.shm.lookup_get(shm_id) if shm_id <= 0x7FFF_FFFF else None
        if shm is None:
            raise _einval(f"shm {shm_id} does not exist")
        if shm.ctx is not self:
            shm.put()
            raise _einval(f"shm {shm_id} belongs to another context")
        return MemObject(shm)

    def _objref_from_user(self, a: int, b: int) -> object:
        if a == uapi.TEE_OBJREF_NULL:
            return None
        if b & _FLAG_USER:
            return UserObject(self, a)
        if b & _FLAG_TEE:
            obj = self.objects.lookup_get(a) if a <= 0x7FFF_FFFF else None
            if obj is None:
                raise _einval(f"object id {a} is not in this context")
            return obj
        if b & _FLAG_MEM:
            return self._mem_in(a)
        raise _einval(f"objref flags {b:#x} name no object kind")

    # ------------------------------------------------------------------ close
    def close(self) -> None:
        """Close the fd.  At once: requests queued or in service on it complete with
        -ENODEV (QTEE sees DEFUNCT), threads blocked in its SUPPL_RECV return EINTR, new
        calls fail EBADF.  When the last call in flight has returned (at once if none):
        ``close_context``'s teardown -- every QTEE object of the fd is released, its shms
        go, the device forgets it (QK §2.3, §4.5)."""
        self.life.close()

    def abandon(self) -> None:
        """The guest kernel this fd lives in is gone (a destroyed VM): close it and tear
        it down now, without waiting for the calls still in it."""
        self.life.abandon()

    def _teardown(self) -> None:
        """The file's release, once no call is in flight (see :class:`FileLife`); finds
        nothing to do when it runs again."""
        for shm in popped(self.shms):
            shm.put()
        for _, obj in self.objects.drain():
            obj.put()
        device = self.device
        with device._lock:
            device.contexts.discard(self)
            idle = not device.contexts
        if idle:
            device.release_pages()
