"""The client API: open a device, register, open services, invoke with Python values.

Everything goes through :meth:`Context.ioctl` with the kernel's structs, so a client
sees exactly what a libqcomtee user sees.  Arguments of :meth:`ObjRef.invoke`:

* ``bytes`` -> input buffer; :class:`Out` ``(n)`` -> output buffer of capacity ``n``;
* an :class:`ObjRef`, a :class:`CallbackObject`, a :class:`MemoryObject` or ``None``
  (NULL) -> input object; :data:`OUT_OBJECT` -> output object.

It returns the outputs in order (bytes for output buffers, objects for output objects).
The ioctl failing raises :class:`objects.DriverError` (errno channel); QTEE answering
non-zero raises :class:`objects.QteeError` (result channel).  Callback objects are
served by worker threads doing SUPPL_RECV/SEND on the same context.
"""

from __future__ import annotations

import errno
import logging
import struct
import threading
from dataclasses import dataclass
from typing import Any, Final

from objects import DriverError, PyObject, QteeError, UsageError, op, result_from_u32
from qtee import uapi
from qtee._driver import Context, Device
from qtee.addrspace import CheckedMemory, address_of
from qtee.credentials import Credentials

__all__ = ["OUT_OBJECT", "CallbackObject", "Client", "MemoryObject", "ObjRef", "Out"]

log = logging.getLogger("qtee.client")

_UB_IN: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_INPUT
_UB_OUT: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_OUTPUT
_OBJ_IN: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_INPUT
_OBJ_OUT: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_OUTPUT
_META_IN: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_INOUT | uapi.TEE_IOCTL_PARAM_ATTR_META
_META_OUT: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_OUTPUT | uapi.TEE_IOCTL_PARAM_ATTR_META
_RECV_PARAMS: Final = 11  # 1 meta + QCOMTEE_OBJECT_PARAMS_MAX (10), as libqcomtee
_SCRATCH: Final = 4096


@dataclass(frozen=True, slots=True)
class Out:
    """An output buffer of ``size`` bytes."""

    size: int

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 0:
            raise UsageError(f"Out size must be an int >= 0, not {self.size!r}")


class _OutObject:
    __slots__ = ()

    def __repr__(self) -> str:
        return "OUT_OBJECT"


#: Marks an output-object argument.
OUT_OBJECT: Final = _OutObject()


class CallbackObject(PyObject):
    """An object hosted by this client that QTEE can call back (ops via :func:`op`)."""


class ObjRef:
    """A handle on a QTEE object held by this client's context; release() drops it."""

    __slots__ = ("client", "id", "kept", "released")

    def __init__(self, client: Client, ident: int) -> None:
        self.client = client
        self.id = ident
        self.released = False
        self.kept = False

    def keep(self) -> ObjRef:
        """In a callback: keep an input object past the call (otherwise it is released)."""
        self.kept = True
        return self

    def invoke(self, op: int, *args: Any) -> list[Any]:
        """Invoke ``op``; see the module docstring for arguments and results."""
        if self.released:
            raise UsageError(f"object {self.id} was released")
        return self.client._invoke(self.id, op, args)

    def release(self) -> None:
        """Drop this handle (op 0xFFFF, handled by the driver)."""
        if not self.released:
            self.released = True
            self.client._invoke(self.id, 0xFFFF, ())

    def __enter__(self) -> ObjRef:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<ObjRef {self.id}{' released' if self.released else ''}>"


class MemoryObject:
    """Shared memory from SHM_ALLOC with a writable :attr:`view`."""

    __slots__ = ("client", "id", "view")

    def __init__(self, client: Client, shm_id: int) -> None:
        self.client = client
        self.id = shm_id
        self.view = client.ctx.shm_view(shm_id)

    def release(self) -> None:
        """Close the owner's copy (QTEE's copies live on until QTEE releases them)."""
        if self.id >= 0:
            self.client.ctx.shm_free(self.id)
            self.id = -1

    def __enter__(self) -> MemoryObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class _Credentials(CallbackObject):
    """IIO over a CBOR credentials map (getLength, readAtOffset)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    @op(0, ob=(8,))
    def get_length(self) -> bytes:
        return struct.pack("<Q", len(self.data))

    @op(1, ib=(8,), ob=(None,))
    def read_at_offset(self, offset: bytes) -> bytes:
        (off,) = struct.unpack("<Q", offset)
        if off >= len(self.data):
            raise QteeError(2, "offset past the credentials")
        return self.data[off:]


class Client:
    """One open context, its exported callback objects and its supplicant workers."""

    def __init__(self, device: Device, *, workers: int = 2) -> None:
        if not isinstance(device, Device):
            raise TypeError("Client needs a Device")
        if not isinstance(workers, int) or workers < 0:
            raise UsageError("workers must be an int >= 0")
        self.device = device
        self.ctx: Context = device.open()
        self._lock = threading.Lock()
        self._exports: dict[int, list[Any]] = {}  # user id -> [object, references]
        self._by_obj: dict[int, int] = {}
        self._next_user_id = 1
        self._threads = [
            threading.Thread(target=self._serve, name=f"qtee-supplicant-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    # ----------------------------------------------------------------- memory
    def _pin(self, buf: bytearray) -> int:
        mem = self.device.memory
        return mem.map(buf) if isinstance(mem, CheckedMemory) else address_of(buf)

    def _unpin(self, addrs: list[int]) -> None:
        mem = self.device.memory
        if isinstance(mem, CheckedMemory):
            for a in addrs:
                mem.unmap(a)

    def _call(self, cmd: int, block: bytearray, pins: list[int]) -> None:
        addr = self._pin(block)
        pins.append(addr)
        self.ctx.ioctl(cmd, bytearray(uapi.BufData(addr, len(block)).pack()))

    # ----------------------------------------------------------------- exports
    def _export(self, obj: CallbackObject) -> int:
        with self._lock:
            uid = self._by_obj.get(id(obj))
            if uid is None:
                uid = self._next_user_id
                self._next_user_id += 1
                self._by_obj[id(obj)] = uid
                self._exports[uid] = [obj, 0]
            self._exports[uid][1] += 1
            return uid

    def _unexport(self, uid: int) -> None:
        with self._lock:
            entry = self._exports.get(uid)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] <= 0:
                del self._exports[uid]
                del self._by_obj[id(entry[0])]

    def exported(self) -> int:
        """Callback objects QTEE still holds references to."""
        with self._lock:
            return len(self._exports)

    # ----------------------------------------------------------------- invoke
    def _invoke(self, ident: int, op_: int, args: tuple[Any, ...]) -> list[Any]:
        params: list[uapi.Param] = []
        pins: list[int] = []
        outs: list[tuple[int, bytearray | None]] = []
        sent: list[int] = []
        try:
            for i, a in enumerate(args):
                if isinstance(a, bytes | bytearray | memoryview):
                    data = bytearray(a)
                    params.append(uapi.Param(_UB_IN, self._pin(data) if data else 0, len(data)))
                    if data:
                        pins.append(params[-1].a)
                elif isinstance(a, Out):
                    out = bytearray(a.size)
                    params.append(uapi.Param(_UB_OUT, self._pin(out) if a.size else 0, a.size))
                    if a.size:
                        pins.append(params[-1].a)
                    outs.append((i, out))
                elif a is OUT_OBJECT:
                    params.append(uapi.Param(_OBJ_OUT))
                    outs.append((i, None))
                else:
                    params.append(self._objref(a, sent))
            block = bytearray(
                uapi.pack_arg(uapi.ObjectInvokeArg(ident, op_, 0, len(params)), params)
            )
            try:
                self._call(uapi.TEE_IOC_OBJECT_INVOKE, block, pins)
            except DriverError:
                for uid in sent:  # errno channel: the caller keeps ownership
                    self._unexport(uid)
                raise
            head, back = uapi.unpack_arg(uapi.ObjectInvokeArg, block)
        finally:
            self._unpin(pins)
        if op_ == 0xFFFF:
            return []
        result = result_from_u32(head.ret)
        if result != 0:
            raise QteeError(result)
        values: list[Any] = []
        for i, buf in outs:
            p = back[i]
            values.append(bytes(buf[: p.b]) if buf is not None else self._objref_out(p))
        return values

    def _objref(self, obj: object, sent: list[int]) -> uapi.Param:
        if obj is None:
            return uapi.Param(_OBJ_IN, uapi.TEE_OBJREF_NULL, 0)
        if isinstance(obj, ObjRef):
            if obj.released or obj.client is not self:
                raise UsageError(f"{obj!r} cannot be passed from this client")
            return uapi.Param(_OBJ_IN, obj.id, uapi.QCOMTEE_OBJREF_FLAG_TEE)
        if isinstance(obj, MemoryObject):
            return uapi.Param(_OBJ_IN, obj.id, uapi.QCOMTEE_OBJREF_FLAG_MEM)
        if isinstance(obj, CallbackObject):
            uid = self._export(obj)
            sent.append(uid)
            return uapi.Param(_OBJ_IN, uid, uapi.QCOMTEE_OBJREF_FLAG_USER)
        raise TypeError(f"cannot pass a {type(obj).__name__} to QTEE")

    def _objref_out(self, p: uapi.Param) -> Any:
        if p.a == uapi.TEE_OBJREF_NULL:
            return None
        if p.b & uapi.QCOMTEE_OBJREF_FLAG_TEE:
            return ObjRef(self, p.a)
        if p.b & uapi.QCOMTEE_OBJREF_FLAG_USER:
            with self._lock:
                entry = self._exports.get(p.a)
            return entry[0] if entry else None
        return p.a

    # ----------------------------------------------------------------- conveniences
    def client_env(self, credentials: Credentials | None = None) -> ObjRef:
        """Register with QTEE (root op 2) and return the client environment."""
        cred = _Credentials((credentials or Credentials.default()).encode())
        (env,) = ObjRef(self, uapi.TEE_OBJREF_NULL).invoke(2, cred, OUT_OBJECT)
        return env  # type: ignore[no-any-return]

    def open_service(self, env: ObjRef, uid: int) -> ObjRef:
        """client_env op 0: the service with class UID ``uid``."""
        (svc,) = env.invoke(0, struct.pack("<I", uid), OUT_OBJECT)
        return svc  # type: ignore[no-any-return]

    def memory(self, size: int) -> MemoryObject:
        """Allocate shared memory (TEE_IOC_SHM_ALLOC)."""
        arg = bytearray(uapi.ShmAllocData(size).pack())
        self.ctx.ioctl(uapi.TEE_IOC_SHM_ALLOC, arg)
        return MemoryObject(self, uapi.ShmAllocData.unpack(arg).id)

    # ----------------------------------------------------------------- supplicant
    def _serve(self) -> None:
        scratch = bytearray(_SCRATCH)
        while True:
            pins: list[int] = []
            params = [uapi.Param(_META_IN, self._pin(scratch), _SCRATCH)]
            pins.append(params[0].a)
            params += [uapi.Param(0)] * (_RECV_PARAMS - 1)
            block = bytearray(uapi.pack_arg(uapi.SuppRecvArg(0, _RECV_PARAMS), params))
            try:
                self._call(uapi.TEE_IOC_SUPPL_RECV, block, pins)
            except DriverError as exc:
                self._unpin(pins)
                if exc.code in (errno.EINTR, errno.EBADF):
                    return
                log.error("SUPPL_RECV failed: %s", exc)
                return
            head = uapi.SuppRecvArg.unpack(block)
            got = uapi.unpack_params(block, 8, head.num_params)
            try:
                self._handle(head.func, got)  # input buffers live in the pinned scratch
            except DriverError as exc:
                log.warning("callback request %d failed: %s", got[0].b, exc)
            finally:
                self._unpin(pins)

    def _handle(self, func: int, p: tuple[uapi.Param, ...]) -> None:
        uid, req = p[0].a, p[0].b
        if func == 0xFFFF:
            self._unexport(uid)  # release notification: never answered
            return
        with self._lock:
            entry = self._exports.get(uid)
        reply: list[uapi.Param] = [uapi.Param(_META_OUT, req)]
        pins: list[int] = []
        io: tuple[Any, ...] = ()
        if entry is None:
            ret = 0xFFFFFFFF & -90  # DEFUNCT: no such object here
        else:
            obj: CallbackObject = entry[0]
            try:
                ib = tuple(self.device.memory.read(x.a, x.b) for x in p[1:] if x.attr == _UB_IN)
            except DriverError:
                self._reply_error(req, -96)  # unmarshalling failed: UNAVAIL
                raise
            ob = tuple(x.b for x in p[1:] if x.attr == _UB_OUT)
            io = tuple(self._objref_out(x) for x in p[1:] if x.attr == _OBJ_IN)
            n_oo = sum(1 for x in p[1:] if x.attr == _OBJ_OUT)
            res = obj.dispatch(func, ib, ob, io, n_oo)
            ret = res.result & 0xFFFFFFFF
            if res.result == 0:
                obs, oos = iter(res.ob), iter(res.oo)
                for x in p[1:]:
                    if x.attr == _UB_OUT:
                        data = bytearray(next(obs))
                        addr = self._pin(data) if data else 0
                        if data:
                            pins.append(addr)
                        reply.append(uapi.Param(_UB_OUT, addr, len(data)))
                    elif x.attr == _OBJ_OUT:
                        ref = self._objref(next(oos), [])
                        reply.append(uapi.Param(_OBJ_OUT, ref.a, ref.b))
                    else:
                        reply.append(x)
        sblock = bytearray(uapi.pack_arg(uapi.SuppSendArg(ret, len(reply)), reply))
        try:
            self._call(uapi.TEE_IOC_SUPPL_SEND, sblock, pins)
        finally:
            self._unpin(pins)
            if entry is not None:  # input objects not kept by the handler are dropped
                for ref in io:
                    if isinstance(ref, ObjRef) and not ref.kept:
                        ref.release()

    def _reply_error(self, req: int, result: int) -> None:
        pins: list[int] = []
        block = bytearray(
            uapi.pack_arg(uapi.SuppSendArg(result & 0xFFFFFFFF, 1), [uapi.Param(_META_OUT, req)])
        )
        try:
            self._call(uapi.TEE_IOC_SUPPL_SEND, block, pins)
        finally:
            self._unpin(pins)

    # ----------------------------------------------------------------- close
    def close(self) -> None:
        """Close the context (QTEE objects released, pending callbacks DEFUNCT), join workers."""
        self.ctx.close()
        for t in self._threads:
            t.join(5)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
