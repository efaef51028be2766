"""The QTEE driver's fd (``qcomtee/call.c``): one open context, its ioctls, and
OBJECT_INVOKE -- the params read from the caller, the inbound message, the outputs
written back (QK §4).

``Context.ioctl(cmd, arg)`` is shaped like ``fcntl.ioctl``: ``arg`` is a mutable buffer
holding the kernel's struct; for buf_data ioctls its ``buf_ptr`` points at the argument
block in the context's address space.  Failures raise :class:`objects.DriverError` (an
``OSError``) with the kernel's errno and write nothing back.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from typing import Final

from objects import (
    ENOTSUPP,
    DriverError,
    IdrAllocator,
    ObjectTable,
    result_name,
)
from qtee import _checks, uapi, wire
from qtee._checks import _einval
from qtee._qcomtee.async_ import fetch_async
from qtee._qcomtee.core import Device, InvokeCtx, _emit
from qtee._qcomtee.mem_obj import MemObject
from qtee._qcomtee.object import QteeObject
from qtee._qcomtee.shm import Shm
from qtee._qcomtee.user_obj import (
    RequestQueue,
    UserObject,
    _objref_from_user,
    supp_recv,
    supp_send,
)
from qtee._qcomtee_msg import pack_counts
from qtee._tee.core import (
    _INVOKE_HEAD,
    _OBJ_IN,
    _OBJ_OUT,
    _P,
    _U32,
    _UB_IN,
    _UB_OUT,
    TeeFile,
    _pack_invoke,
    popped,
)
from qtee._tee.shm import alloc_size, discard_backing, install

__all__ = ["Context"]

_GEN_CAPS: Final = uapi.TEE_GEN_CAP_OBJREF
_read: Final = _checks.read_buf_block
_head: Final = _INVOKE_HEAD.pack  # the header alone: a null invoke's whole block
_FLAG_TEE: Final = uapi.QCOMTEE_OBJREF_FLAG_TEE
_FLAG_USER: Final = uapi.QCOMTEE_OBJREF_FLAG_USER
_FLAG_MEM: Final = uapi.QCOMTEE_OBJREF_FLAG_MEM
_ARGS_MAX: Final = _checks.QCOMTEE_ARGS_MAX
_ARGS_PER_TYPE: Final = _checks.QCOMTEE_ARGS_PER_TYPE
_OBJREF_NULL: Final = uapi.TEE_OBJREF_NULL
_OP_RELEASE: Final = wire.QCOMTEE_MSG_OBJECT_OP_RELEASE
_OP_RETAIN: Final = wire.QCOMTEE_MSG_OBJECT_OP_RETAIN
_OP_MASK: Final = wire.QCOMTEE_MSG_OBJECT_OP_MASK
_OP_HIGH: Final = ~_OP_MASK  # the bits a userspace op may not set


def _encode_wrapped(
    cxt: int, op: int, ib: Sequence[bytes], ob: Sequence[int], io: Sequence[int], n_oo: int
) -> bytearray:
    """The inbound message when a kind has 16 args (spec §7): ``qcomtee_msg_init`` masks
    each count to its nibble (16 -> 0) while every arg is still laid out in full."""
    return wire._encode_inbound(cxt, op, ib, ob, io, n_oo)


def _wrapped_outputs(
    buf: bytearray, n_ib: int, n_ob: int, n_io: int, n_oo: int
) -> tuple[tuple[bytes, ...], tuple[int, ...]]:
    """Outputs read back by the kernel's own arg indexes (not the wrapped counts)."""
    return wire._read_outputs(buf, 12, "invoke response", (n_ib, n_ob, n_io, n_oo))


class Context(TeeFile[Shm]):
    """One open fd: its IDR of QTEE objects, its request queue, its shms, and the
    qcomtee ops the TEE core's switch calls (:class:`~qtee._tee.core.TeeFile`)."""

    DRIVER = "qcomtee"

    def __init__(self, device: Device, number: int = 0) -> None:
        self.device = device
        #: The device's count of opens when this one was made (0 for the first fd): how
        #: :meth:`Device.leaks` names it.
        self.number = number
        self.objects: ObjectTable[QteeObject] = ObjectTable(IdrAllocator(0), name="ctx objects")
        self.requests = RequestQueue()
        #: SUPPL_RECV blocks that passed the checks, by their argument struct's bytes:
        #: (the block's bytes, what they gave) (``user_obj._recv_block``).
        self.recv_blocks: dict[bytes, tuple[bytes, tuple[int, int, int, int]]] = {}
        self.shms: dict[int, Shm] = {}  # the owner's reference (its shm fd)
        super().__init__()
        #: Who holds this fd, for ``qtee info`` (a device server names its connections).
        self.label = f"fd {number}"
        #: Model-only, for ``qtee info``: the class name of the callback object the fd's
        #: owner exported as a user id (set by the ``Client`` on the fd).
        self.callback_class: Callable[[int], str | None] | None = None

    # ------------------------------------------------------------------ ops
    def _version(self) -> uapi.VersionData:
        return uapi.VersionData(uapi.TEE_IMPL_ID_QTEE, 0, _GEN_CAPS)

    def _shm_register(self, arg: bytearray | memoryview) -> int:
        # qcomtee fails before the TEE core would write the struct back: read only
        size = uapi.ShmRegisterData.SIZE
        data = uapi.ShmRegisterData.unpack(self._need(arg, size, writable=False))
        if data.flags:
            raise _einval("SHM_REGISTER flags must be 0")
        raise DriverError(ENOTSUPP, "qcomtee has no shm_register op")

    def _shm_alloc(self, arg: bytearray | memoryview) -> int:
        """``tee_ioctl_shm_alloc``: a shm from the dynamic pool, or ENOMEM and nothing made
        (no buffer, no memory file, no id)."""
        device = self.device
        size = alloc_size(arg, device.shm_max)
        try:
            buf, fd = device.shm_backing(size)
        except (OSError, ValueError, OverflowError, MemoryError) as exc:
            raise DriverError(errno.ENOMEM, f"cannot allocate {size} bytes: {exc!r}") from None
        shm = install(
            device.shm,
            self.shms,
            lambda shm_id: Shm(self, shm_id, buf, fd, device.phys),
            lambda: discard_backing(buf, fd),
        )
        uapi.ShmAllocData(size, 0, shm.id).pack_into(arg)
        return 0

    def _drop_shm(self, shm: Shm) -> None:
        """The shm's fd is closed: drop the owner's reference (QTEE's copies live on)."""
        shm.put()

    # ------------------------------------------------------------------ OBJECT_INVOKE
    def _object_invoke(self, arg: bytearray | memoryview) -> int:
        device = self.device
        mem = device.memory
        buf_ptr, block, params = _read(mem, arg, _INVOKE_HEAD.size, 16)
        ident, op, _ret, num = _INVOKE_HEAD.unpack_from(block)
        n_ib = n_ob = n_io = n_oo = most = 0
        if params:  # (no params: nothing to count or check)
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
        try:  # a free outbound page and its invoke context (device._page inline)
            page = device._pages.pop()
        except IndexError:
            page = device._page()
        call = page.ctx  # its last call left it reset: held and created empty
        call.params = params
        held = call.held
        if target is not None:
            held.append(target)
        clean = True  # nothing is in the page before the SMC
        try:
            if op & _OP_HIGH or op == _OP_RETAIN:
                raise _einval(f"op {op:#x}")
            ib: list[bytes] | tuple[()] = ()  # (lists only for a call with params)
            ob: list[int] | tuple[()] = ()
            io: list[int] | tuple[()] = ()
            if params:
                ib, ob, io = [], [], []
                for attr, a, b, _c in params:
                    if attr == _UB_IN:
                        ib.append(mem.read(a, b))  # a fault is EFAULT (qcomtee_prepare_msg)
                    elif attr == _UB_OUT:
                        ob.append(b)
                    elif attr == _OBJ_IN:
                        io.append(_objref_in(self, a, b, call))
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
                counts = pack_counts(n_ib, n_ob, n_io, n_oo)  # the word QTEE reads (§7)
                _emit(trace, records, "NS -> QTEE", cxt, op, counts, "invoke")
            clean = False
            try:
                result = device._smc_invoke(inbound, page, call)
                if trace or records:
                    _emit(trace, records, "QTEE -> NS", cxt, op, counts, result_name(result))
                if result == 0:
                    if n_ob or n_oo:
                        if wrapped:
                            obs, oos = _wrapped_outputs(inbound, n_ib, n_ob, n_io, n_oo)
                        else:
                            obs, oos = wire.decode_invoke_response(inbound)
                        result, params = _outputs(self, obs, oos, params)
                elif n_oo:
                    params = [(p[0], 0, 0, 0) if p[0] == _OBJ_OUT else p for p in params]
                if _U32.unpack_from(page.out, 0)[0]:  # an async message is there
                    fetch_async(device, page.out, 0)
                clean = True
            except BaseException:
                if page.abandoned:  # QTEE's final return came all the same
                    fetch_async(device, page.out, 0)
                raise
        finally:
            for obj in held:
                obj.put()
            held.clear()
            if call.created:
                if not call.accepted:  # QTEE never saw them: mimic its release, unnotified
                    for ns_id, cb in call.created:
                        device.ns.erase(ns_id)
                        if isinstance(cb, UserObject):
                            cb.notify = False
                        cb.put()
                call.created = ()
            call.accepted = False
            if clean and not page.served and device.contexts:  # (the common case of
                page.call = None  # device._recycle inline: nothing to zero-fill)
                device._pages.append(page)
            else:
                device._recycle(page, clean)
        ret = result & 0xFFFF_FFFF
        back = _pack_invoke(ident, op, ret, params) if params else _head(ident, op, ret, 0)
        mem.write(buf_ptr, back)
        return 0

    # ------------------------------------------------------------------ supplicant
    # The ops themselves, no wrapper frame (the callback hot path).
    _supp_recv = supp_recv
    _supp_send = supp_send

    # ------------------------------------------------------------------ close
    # close(): at once, requests queued or in service on the fd complete with -ENODEV
    # (QTEE sees DEFUNCT), threads blocked in its SUPPL_RECV return EINTR, new calls fail
    # EBADF; once the last call in flight has returned, close_context's teardown: every
    # QTEE object of the fd is released, its shms go, the device forgets it (QK §2.3, §4.5).
    def _on_close(self) -> None:
        self.requests.close()

    def _teardown(self) -> None:
        """The file's release, once no call is in flight (see :class:`FileLife`); finds
        nothing to do when it runs again."""
        for shm in popped(self.shms):
            self._drop_shm(shm)
        for _, obj in self.objects.drain():
            obj.put()
        device = self.device
        with device._lock:
            device.contexts.discard(self)
            idle = not device.contexts
        if idle:
            device.release_pages()


def _objref_in(ctx: Context, a: int, b: int, call: InvokeCtx) -> int:
    """An OBJREF_INPUT param's object as QTEE will name it: a QTEE object by its id (held
    for the call), a user or memory object by a new NS id (dropped if QTEE never takes it)."""
    obj = _objref_from_user(ctx, a, b)
    if obj is None:
        return wire.QCOMTEE_MSG_OBJECT_NULL
    if isinstance(obj, QteeObject):
        call.held.append(obj)
        return obj.qtee_id
    try:
        ns_id = ctx.device.ns.insert(obj)
    except DriverError:
        if isinstance(obj, UserObject):
            obj.notify = False
        obj.put()
        raise DriverError(errno.ENOSPC, "NS ids exhausted") from None
    if call.created:
        call.created.append((ns_id, obj))
    else:
        call.created = [(ns_id, obj)]
    return ns_id


def _outputs(
    ctx: Context, ob_data: Sequence[bytes], oo_ids: Sequence[int], params: list[_P]
) -> tuple[int, list[_P]]:
    """Copy OB data and convert OO ids; UNAVAIL (and no objects) if any fails."""
    mem = ctx.device.memory
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
                cb = ctx.device.ns.lookup_get(ident)
                if isinstance(cb, UserObject) and cb.ctx is ctx:
                    out[i] = (attr, cb.user_id, _FLAG_USER, 0)
                elif isinstance(cb, MemObject) and cb.shm.ctx is ctx:
                    out[i] = (attr, cb.shm.id, _FLAG_MEM, 0)
                else:
                    ok = False
                if cb is not None:
                    cb.put()
            else:
                uid = ctx.objects.insert(QteeObject(ctx.device, ident))
                made.append(uid)
                out[i] = (attr, uid, _FLAG_TEE, 0)
    if ok:
        return 0, out
    for uid in made:
        entry = ctx.objects.erase(uid)
        if entry is not None:
            entry.put()
    out = [(p[0], 0, 0, 0) if p[0] == _OBJ_OUT else p for p in out]
    return -96, out  # QCOMTEE_MSG_ERROR_UNAVAIL
