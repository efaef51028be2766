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
import itertools
import logging
import struct
import threading
from dataclasses import dataclass
from typing import Any, Final

from objects import DriverError, PyObject, QteeError, UsageError, op, result_from_u32
from qtee import uapi
from qtee._driver import Context, Device, _invoke_struct, _params_struct
from qtee.addrspace import AddressSpace
from qtee.credentials import Credentials

__all__ = ["OUT_OBJECT", "CallbackObject", "Client", "MemoryObject", "ObjRef", "Out"]

log = logging.getLogger("qtee.client")

_UB_IN: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_INPUT
_UB_OUT: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_OUTPUT
_OBJ_IN: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_INPUT
_OBJ_OUT: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_OUTPUT
_META_IN: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_INOUT | uapi.TEE_IOCTL_PARAM_ATTR_META
_META_OUT: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_OUTPUT | uapi.TEE_IOCTL_PARAM_ATTR_META
_BUF: Final = struct.Struct("<QQ")  # struct tee_ioctl_buf_data
_U32: Final = struct.Struct("<I")
_PARAM: Final = struct.Struct("<4Q")
_SUPP_HEAD: Final = struct.Struct("<II")
_INVOKE_HEAD_SIZE: Final = 24
_P = tuple[int, int, int, int]
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


class _Block:
    """A pinned ioctl argument block (up to TEE_MAX_ARG_SIZE) and its buf_data struct."""

    __slots__ = ("addr", "arg", "buf", "mem")

    def __init__(self, mem: AddressSpace) -> None:
        self.mem = mem
        self.buf = bytearray(uapi.TEE_MAX_ARG_SIZE)
        self.addr = mem.pin(self.buf)
        self.arg = bytearray(_BUF.size)

    def close(self) -> None:
        self.mem.unpin(self.addr)


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
        self._blocks: list[_Block] = []
        self._threads = [
            threading.Thread(target=self._serve, name=f"qtee-supplicant-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    # ----------------------------------------------------------------- memory
    def _take_block(self) -> _Block:
        """A pinned argument block (one per concurrent ioctl, reused)."""
        try:
            return self._blocks.pop()
        except IndexError:
            return _Block(self.device.memory)

    def _unpin(self, addrs: list[int]) -> None:
        unpin = self.device.memory.unpin
        for a in addrs:
            unpin(a)

    def _call(self, cmd: int, blk: _Block, size: int) -> None:
        _BUF.pack_into(blk.arg, 0, blk.addr, size)
        self.ctx.ioctl(cmd, blk.arg)

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
        mem = self.device.memory
        params: list[_P] = []
        pins: list[int] = []
        outs: list[tuple[int, bytearray | None]] = []
        sent: list[int] = []
        blk: _Block | None = None
        try:
            for i, a in enumerate(args):
                if isinstance(a, bytes | bytearray | memoryview):
                    data = bytes(a)
                    addr = 0
                    if data:
                        addr = mem.pin(data)
                        pins.append(addr)
                    params.append((_UB_IN, addr, len(data), 0))
                elif isinstance(a, Out):
                    out = bytearray(a.size)
                    addr = 0
                    if a.size:
                        addr = mem.pin(out)
                        pins.append(addr)
                    params.append((_UB_OUT, addr, a.size, 0))
                    outs.append((i, out))
                elif a is OUT_OBJECT:
                    params.append((_OBJ_OUT, 0, 0, 0))
                    outs.append((i, None))
                else:
                    params.append(self._objref(a, sent))
            n = len(params)
            size = _INVOKE_HEAD_SIZE + 32 * n
            if size > uapi.TEE_MAX_ARG_SIZE:
                raise UsageError(f"{n} arguments do not fit one invoke ({size} > 4096 bytes)")
            blk = self._take_block()
            _invoke_struct(n).pack_into(
                blk.buf, 0, ident, op_, 0, n, *itertools.chain.from_iterable(params)
            )
            try:
                self._call(uapi.TEE_IOC_OBJECT_INVOKE, blk, size)
            except DriverError:
                for uid in sent:  # errno channel: the caller keeps ownership
                    self._unexport(uid)
                raise
            (ret,) = _U32.unpack_from(blk.buf, 12)
            back = [_PARAM.unpack_from(blk.buf, _INVOKE_HEAD_SIZE + 32 * i) for i, _ in outs]
        finally:
            if blk is not None:
                self._blocks.append(blk)
            if pins:
                self._unpin(pins)
        if op_ == 0xFFFF:
            return []
        if ret:
            raise QteeError(result_from_u32(ret))
        return [
            bytes(buf[: p[2]]) if buf is not None else self._objref_out(p[1], p[2])
            for (_, buf), p in zip(outs, back, strict=True)
        ]

    def _objref(self, obj: object, sent: list[int]) -> _P:
        if obj is None:
            return (_OBJ_IN, uapi.TEE_OBJREF_NULL, 0, 0)
        if isinstance(obj, ObjRef):
            if obj.released or obj.client is not self:
                raise UsageError(f"{obj!r} cannot be passed from this client")
            return (_OBJ_IN, obj.id, uapi.QCOMTEE_OBJREF_FLAG_TEE, 0)
        if isinstance(obj, MemoryObject):
            return (_OBJ_IN, obj.id, uapi.QCOMTEE_OBJREF_FLAG_MEM, 0)
        if isinstance(obj, CallbackObject):
            uid = self._export(obj)
            sent.append(uid)
            return (_OBJ_IN, uid, uapi.QCOMTEE_OBJREF_FLAG_USER, 0)
        raise TypeError(f"cannot pass a {type(obj).__name__} to QTEE")

    def _objref_out(self, a: int, b: int) -> Any:
        if a == uapi.TEE_OBJREF_NULL:
            return None
        if b & uapi.QCOMTEE_OBJREF_FLAG_TEE:
            return ObjRef(self, a)
        if b & uapi.QCOMTEE_OBJREF_FLAG_USER:
            with self._lock:
                entry = self._exports.get(a)
            return entry[0] if entry else None
        return a

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
        mem = self.device.memory
        scratch = bytearray(_SCRATCH)
        scratch_addr = mem.pin(scratch)
        recv = _Block(mem)
        send = _Block(mem)
        recv_size = _SUPP_HEAD.size + 32 * _RECV_PARAMS
        request = _SUPP_HEAD.pack(0, _RECV_PARAMS) + _params_struct(_RECV_PARAMS).pack(
            _META_IN, scratch_addr, _SCRATCH, 0, *(0,) * (4 * (_RECV_PARAMS - 1))
        )
        try:
            while True:
                recv.buf[:recv_size] = request
                try:
                    self._call(uapi.TEE_IOC_SUPPL_RECV, recv, recv_size)
                except DriverError as exc:
                    if exc.code not in (errno.EINTR, errno.EBADF):
                        log.error("SUPPL_RECV failed: %s", exc)
                    return
                func, num = _SUPP_HEAD.unpack_from(recv.buf)
                got = list(
                    _PARAM.iter_unpack(recv.buf[_SUPP_HEAD.size : _SUPP_HEAD.size + 32 * num])
                )
                try:
                    self._handle(func, got, send, scratch, scratch_addr)
                except DriverError as exc:
                    log.warning("callback request %d failed: %s", got[0][2], exc)
        finally:
            recv.close()
            send.close()
            mem.unpin(scratch_addr)

    def _handle(self, func: int, p: list[_P], send: _Block, scratch: bytearray, base: int) -> None:
        uid, req = p[0][1], p[0][2]
        if func == 0xFFFF:
            self._unexport(uid)  # release notification: never answered
            return
        with self._lock:
            entry = self._exports.get(uid)
        if entry is None:
            self._reply(send, 0xFFFFFFFF & -90, [(_META_OUT, req, 0, 0)])  # DEFUNCT
            return
        mem = self.device.memory
        obj: CallbackObject = entry[0]
        args = p[1:]
        try:  # input buffers are in this worker's own scratch buffer
            ib = tuple(
                [
                    bytes(scratch[x[1] - base : x[1] - base + x[2]])
                    if 0 <= x[1] - base <= len(scratch) - x[2]
                    else mem.read(x[1], x[2])
                    for x in args
                    if x[0] == _UB_IN
                ]
            )
        except DriverError:
            self._reply(send, 0xFFFFFFFF & -96, [(_META_OUT, req, 0, 0)])  # UNAVAIL
            raise
        ob = tuple([x[2] for x in args if x[0] == _UB_OUT])
        io = tuple([self._objref_out(x[1], x[2]) for x in args if x[0] == _OBJ_IN])
        n_oo = sum(1 for x in args if x[0] == _OBJ_OUT)
        pins: list[int] = []
        try:
            res = obj.dispatch(func, ib, ob, io, n_oo)
            reply: list[_P] = [(_META_OUT, req, 0, 0)]
            if res.result == 0:
                obs, oos = iter(res.ob), iter(res.oo)
                for x in args:
                    if x[0] == _UB_OUT:
                        data = bytes(next(obs))
                        addr = 0
                        if data:
                            addr = mem.pin(data)
                            pins.append(addr)
                        reply.append((_UB_OUT, addr, len(data), 0))
                    elif x[0] == _OBJ_OUT:
                        ref = self._objref(next(oos), [])
                        reply.append((_OBJ_OUT, ref[1], ref[2], 0))
                    else:
                        reply.append(x)
            self._reply(send, res.result & 0xFFFFFFFF, reply)
        finally:
            if pins:
                self._unpin(pins)
            for ref in io:  # input objects not kept by the handler are dropped
                if isinstance(ref, ObjRef) and not ref.kept:
                    ref.release()

    def _reply(self, send: _Block, ret: int, reply: list[_P]) -> None:
        n = len(reply)
        _SUPP_HEAD.pack_into(send.buf, 0, ret, n)
        _params_struct(n).pack_into(
            send.buf, _SUPP_HEAD.size, *itertools.chain.from_iterable(reply)
        )
        self._call(uapi.TEE_IOC_SUPPL_SEND, send, _SUPP_HEAD.size + 32 * n)

    # ----------------------------------------------------------------- close
    def close(self) -> None:
        """Close the context (QTEE objects released, pending callbacks DEFUNCT), join workers."""
        self.ctx.close()
        for t in self._threads:
            t.join(5)
        while self._blocks:
            self._blocks.pop().close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
