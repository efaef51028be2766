"""The driver model: a device, its open contexts, and their ioctls (kernel ``call.c``).

Work in progress for the invoke-loop issue: VERSION, SHM_ALLOC, the unsupported
ioctls, and OBJECT_INVOKE on QTEE objects (root, services, TAs) with buffers, NULL and
QTEE objects in and out.  User (callback) objects, memory objects, the primordial object
and SUPPL_RECV/SEND come next.

``Context.ioctl(cmd, arg)`` is shaped like ``fcntl.ioctl``: ``arg`` is a mutable buffer
holding the kernel's struct; for buf_data ioctls its ``buf_ptr`` points at the argument
block in the context's address space.  Failures raise :class:`objects.DriverError` (an
``OSError``) with the kernel's errno and write nothing back.
"""

from __future__ import annotations

import errno
import threading
from typing import Final

from objects import ENOTSUPP, CyclicAllocator, DriverError, IdrAllocator, ObjectTable, Refcounted
from qtee import _checks, uapi, wire
from qtee.addrspace import AddressSpace, ProcessMemory
from qtee.secure import SecureWorld

__all__ = ["Context", "Device"]

QCOMTEE_OBJECT_ID_START: Final = wire.QCOMTEE_MSG_OBJECT_NS_BIT + 1
QCOMTEE_OBJECT_ID_END: Final = 0xFFFF_FFFF
_GEN_CAPS: Final = uapi.TEE_GEN_CAP_OBJREF


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


class Device:
    """One ``/dev/teeN`` backed by a secure world."""

    def __init__(self, world: SecureWorld, *, memory: AddressSpace | None = None) -> None:
        self.world = world
        self.memory: AddressSpace = memory if memory is not None else ProcessMemory()
        self.ns_ids = CyclicAllocator(QCOMTEE_OBJECT_ID_START, QCOMTEE_OBJECT_ID_END, name="ns ids")
        self.shm_ids = IdrAllocator(1, 0, name="shm ids")
        self._lock = threading.Lock()
        self.contexts: set[Context] = set()

    def open(self) -> Context:
        """Open the device: one context (one open fd)."""
        ctx = Context(self)
        with self._lock:
            self.contexts.add(ctx)
        return ctx

    def _release_qtee(self, qtee_id: int) -> None:
        """RELEASE (op 0xFFFF, no args) on a QTEE id, as the kernel's release work does."""
        inbound = wire.encode_invoke(qtee_id, wire.QCOMTEE_MSG_OBJECT_OP_RELEASE)
        outbound = bytearray(wire.MAX_OUTBOUND_BUFFER_SIZE)
        self.world.invoke(inbound, outbound, self._serve)
        self._fetch_async(outbound, 0)

    def _serve(self, out: bytearray) -> None:
        """Serve a callback request in ``out`` (no callback objects exist yet: UNAVAIL)."""
        msg = wire.decode_callback(out)
        self._fetch_async(out, wire.async_offset(msg))
        wire.write_callback_response(out, msg, wire.result_from_errno(-errno.EINVAL))

    def _fetch_async(self, out: bytearray, offset: int) -> None:
        try:
            batch = wire.decode_async(out, offset)
        except Exception:  # a malformed tail stops parsing, as in the kernel
            batch = wire.AsyncBatch((), wire.ASYNC_STOP_END)
        for ids in batch.releases:
            for ident in ids:
                if QCOMTEE_OBJECT_ID_START <= ident <= QCOMTEE_OBJECT_ID_END:
                    self.ns_ids.free(ident)
        wire.clear_async(out, offset)


class Context:
    """One open fd: its IDR of QTEE objects and its ioctls."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.objects: ObjectTable[QteeObject] = ObjectTable(IdrAllocator(0), name="ctx objects")
        self.closed = False

    # ------------------------------------------------------------------ ioctl entry
    def ioctl(self, cmd: int, arg: bytearray | memoryview) -> int:
        """Run ``cmd`` on ``arg`` (the kernel's struct, updated in place); returns 0."""
        if self.closed:
            raise DriverError(errno.EBADF, "context is closed")
        if cmd == uapi.TEE_IOC_VERSION:
            self._need(arg, uapi.VersionData.SIZE)
            uapi.VersionData(uapi.TEE_IMPL_ID_QTEE, 0, _GEN_CAPS).pack_into(arg)
            return 0
        if cmd == uapi.TEE_IOC_SHM_ALLOC:
            return self._shm_alloc(arg)
        if cmd == uapi.TEE_IOC_OBJECT_INVOKE:
            return self._object_invoke(arg)
        if cmd == uapi.TEE_IOC_SHM_REGISTER:
            data = uapi.ShmRegisterData.unpack(self._need(arg, uapi.ShmRegisterData.SIZE))
            if data.flags:
                raise _einval("SHM_REGISTER flags must be 0")
            raise DriverError(ENOTSUPP, "qcomtee has no shm_register op")
        raise _einval(f"ioctl {uapi.IOCTL_NAMES.get(cmd, hex(cmd))} is not supported by qcomtee")

    @staticmethod
    def _need(arg: bytearray | memoryview, size: int) -> bytearray | memoryview:
        if not isinstance(arg, bytearray | memoryview) or len(arg) < size:
            raise DriverError(errno.EFAULT, f"ioctl argument must be {size} writable bytes")
        return arg

    def _shm_alloc(self, arg: bytearray | memoryview) -> int:
        data = uapi.ShmAllocData.unpack(self._need(arg, uapi.ShmAllocData.SIZE))
        if data.flags:
            raise _einval("SHM_ALLOC flags must be 0")
        shm_id = self.device.shm_ids.alloc()
        uapi.ShmAllocData(data.size, 0, shm_id).pack_into(arg)
        return 0

    # ------------------------------------------------------------------ OBJECT_INVOKE
    def _object_invoke(self, arg: bytearray | memoryview) -> int:
        mem = self.device.memory
        buf = uapi.BufData.unpack(self._need(arg, uapi.BufData.SIZE))
        if buf.buf_len > uapi.TEE_MAX_ARG_SIZE or buf.buf_len < uapi.ObjectInvokeArg.SIZE:
            raise _einval(f"buf_len {buf.buf_len}")
        block = bytearray(mem.read(buf.buf_ptr, buf.buf_len))
        head = uapi.ObjectInvokeArg.unpack(block)
        _checks.check_buf_len(buf.buf_len, uapi.ObjectInvokeArg.SIZE, head.num_params)
        params = uapi.unpack_params(block, uapi.ObjectInvokeArg.SIZE, head.num_params)
        _checks.check_param_attrs(params)
        for p in params:
            if p.type in (
                uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_INPUT,
                uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_OUTPUT,
                uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_INOUT,
            ):
                mem.check(p.a, p.b)
        _checks.params_check(params)

        if head.op == wire.QCOMTEE_MSG_OBJECT_OP_RELEASE:
            entry = self.objects.erase(head.id) if head.id <= 0x7FFF_FFFF else None
            if entry is not None:
                entry.put()
            out = [
                uapi.Param(p.attr) if p.attr == uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_OUTPUT else p
                for p in params
            ]
            mem.write(buf.buf_ptr, uapi.pack_arg(head, out))
            return 0

        target: QteeObject | None = None
        if head.id == uapi.TEE_OBJREF_NULL:
            _checks.root_object_check(head.op, params)
            cxt = wire.QCOMTEE_MSG_OBJECT_ROOT
        else:
            target = self.objects.lookup_get(head.id) if head.id <= 0x7FFF_FFFF else None
            if target is None:
                raise _einval(f"object id {head.id} is not in this context")
            cxt = target.qtee_id
        held: list[QteeObject] = [] if target is None else [target]
        try:
            if (
                head.op & ~wire.QCOMTEE_MSG_OBJECT_OP_MASK
                or head.op == wire.QCOMTEE_MSG_OBJECT_OP_RETAIN
            ):
                raise _einval(f"op {head.op:#x}")
            ib: list[bytes] = []
            ob: list[int] = []
            io: list[int] = []
            n_oo = 0
            for p in params:
                t = p.attr
                if t == uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_INPUT:
                    try:
                        ib.append(mem.read(p.a, p.b))
                    except DriverError:
                        raise _einval("input buffer copy faulted") from None
                elif t == uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_OUTPUT:
                    ob.append(p.b)
                elif t == uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_INPUT:
                    io.append(self._objref_in(p, held))
                else:
                    n_oo += 1
            try:
                inbound = wire.encode_invoke(cxt, head.op, ib, ob, io, n_oo)
            except wire.MessageTooLarge as exc:
                raise _einval(str(exc)) from None
            outbound = bytearray(wire.MAX_OUTBOUND_BUFFER_SIZE)
            result = self.device.world.invoke(inbound, outbound, self.device._serve)
            out_params = list(params)
            if result == 0:
                result = self._outputs(inbound, params, out_params)
            else:
                out_params = [
                    uapi.Param(p.attr)
                    if p.attr == uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_OUTPUT
                    else p
                    for p in params
                ]
            self.device._fetch_async(outbound, 0)
        finally:
            for obj in held:
                obj.put()
        done = uapi.ObjectInvokeArg(head.id, head.op, result & 0xFFFF_FFFF, head.num_params)
        mem.write(buf.buf_ptr, uapi.pack_arg(done, out_params))
        return 0

    def _objref_in(self, p: uapi.Param, held: list[QteeObject]) -> int:
        if p.a == uapi.TEE_OBJREF_NULL:
            return wire.QCOMTEE_MSG_OBJECT_NULL
        if p.b & uapi.QCOMTEE_OBJREF_FLAG_USER:
            raise _einval("user objects are not modelled yet")
        if p.b & uapi.QCOMTEE_OBJREF_FLAG_TEE:
            obj = self.objects.lookup_get(p.a) if p.a <= 0x7FFF_FFFF else None
            if obj is None:
                raise _einval(f"object id {p.a} is not in this context")
            held.append(obj)
            return obj.qtee_id
        raise _einval(f"objref flags {p.b:#x} name no object kind")

    def _outputs(
        self, inbound: bytearray, params: tuple[uapi.Param, ...], out: list[uapi.Param]
    ) -> int:
        resp = wire.decode_invoke_response(inbound)
        mem = self.device.memory
        made: list[int] = []
        ok = True
        obs = iter(resp.ob)
        oos = iter(resp.oo)
        for i, p in enumerate(params):
            if p.attr == uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_OUTPUT:
                data = next(obs)
                try:
                    mem.write(p.a, data)
                except DriverError:
                    ok = False
                out[i] = uapi.Param(p.attr, p.a, len(data), p.c)
            elif p.attr == uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_OUTPUT:
                ident = next(oos)
                if ident == wire.QCOMTEE_MSG_OBJECT_NULL:
                    out[i] = uapi.Param(p.attr, uapi.TEE_OBJREF_NULL, 0)
                elif ident & wire.QCOMTEE_MSG_OBJECT_NS_BIT:
                    ok = False  # callback objects coming back are not modelled yet
                else:
                    uid = self.objects.insert(QteeObject(self.device, ident))
                    made.append(uid)
                    out[i] = uapi.Param(p.attr, uid, uapi.QCOMTEE_OBJREF_FLAG_TEE)
        if ok:
            return 0
        for uid in made:
            entry = self.objects.erase(uid)
            if entry is not None:
                entry.put()
        for i, p in enumerate(params):
            if p.attr == uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_OUTPUT:
                out[i] = uapi.Param(p.attr)
        return -96  # QCOMTEE_MSG_ERROR_UNAVAIL

    # ------------------------------------------------------------------ close
    def close(self) -> None:
        """Release the fd: every QTEE object of this context is released."""
        if self.closed:
            return
        self.closed = True
        for _, obj in self.objects.drain():
            obj.put()
        with self.device._lock:
            self.device.contexts.discard(self)
