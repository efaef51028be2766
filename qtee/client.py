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
from typing import TYPE_CHECKING, Any, Final

from objects import (
    CyclicAllocator,
    DriverError,
    PyObject,
    QteeError,
    UsageError,
    op,
)
from qtee import _reason, uapi
from qtee._driver import (
    _INVOKE_HEAD,
    _OBJ_IN,
    _OBJ_OUT,
    _P,
    _PARAM,
    _U32,
    _UB_IN,
    _UB_OUT,
    Context,
    Device,
    _invoke_struct,
)
from qtee.addrspace import AddressSpace
from qtee.credentials import Credentials

if TYPE_CHECKING:
    from qtee._remote import RemoteContext, RemoteDevice
    from supplicant._pool import WorkerPool

__all__ = ["OUT_OBJECT", "CallbackObject", "Client", "MemoryObject", "ObjRef", "Out"]

_BYTES_LIKE: Final = (bytes, bytearray, memoryview)  # (a tuple: a union is built per call)

log = logging.getLogger("qtee.client")

_BUF: Final = struct.Struct("<QQ")  # struct tee_ioctl_buf_data
_INVOKE_HEAD_SIZE: Final = _INVOKE_HEAD.size
#: Callback objects one client can have exported at once (libqcomtee: ids 1..1023).
CALLBACK_IDS_MAX: Final = 1023


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
        """Drop this handle (op 0xFFFF, handled by the driver).  On an fd that is closed
        or a connection that is lost (EBADF) there is nothing left to drop: the fd's close
        released every object it held, this one with them."""
        if not self.released:
            self.released = True
            try:
                self.client._invoke(self.id, 0xFFFF, ())
            except DriverError as exc:
                if exc.errno != errno.EBADF:
                    raise

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
        """Close the owner's copy (QTEE's copies live on until QTEE releases them).  As
        for :meth:`ObjRef.release`, nothing is left to close once the fd is gone."""
        if self.id >= 0:
            shm_id, self.id = self.id, -1
            try:
                self.client.ctx.shm_free(shm_id)
            except DriverError as exc:
                ctx = self.client.ctx
                if exc.errno != errno.EBADF or not (ctx.closed or getattr(ctx, "lost", False)):
                    raise

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

    def __init__(self, device: Device | RemoteDevice, *, workers: int = 2) -> None:
        from qtee._remote import RemoteDevice

        if not isinstance(device, Device | RemoteDevice):
            raise TypeError("Client needs a Device or a connected device (qtee.connect)")
        if not isinstance(workers, int) or workers < 0:
            raise UsageError("workers must be an int >= 0")
        self.device = device
        self.ctx: Context | RemoteContext = device.open()
        self._lock = threading.Lock()
        self._exports: dict[int, list[Any]] = {}  # user id -> [object, references]
        self._by_obj: dict[int, int] = {}
        # libqcomtee: callback ids round-robin in [1, 1023] per root, held while referenced.
        self._ids = CyclicAllocator(1, CALLBACK_IDS_MAX, name="callback ids")
        self._blocks: list[_Block] = []
        self.pool: WorkerPool | None = None
        if workers:
            from supplicant._pool import WorkerPool

            self.pool = WorkerPool(self, workers)

    # ----------------------------------------------------------------- memory
    def _take_block(self) -> _Block:
        """A pinned argument block (one per concurrent ioctl, reused)."""
        try:
            return self._blocks.pop()
        except IndexError:
            return _Block(self.device.memory)

    def _new_block(self) -> _Block:
        """A pinned argument block owned by the caller (a supplicant thread)."""
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
        """The object's callback id (allocated on first send, reused while held)."""
        with self._lock:
            uid = self._by_obj.get(id(obj))
            if uid is None:
                try:
                    uid = self._ids.alloc()
                except DriverError:
                    raise DriverError(
                        errno.ENOSPC, f"{CALLBACK_IDS_MAX} callback objects already exported"
                    ) from None
                self._by_obj[id(obj)] = uid
                self._exports[uid] = [obj, 0]
            self._exports[uid][1] += 1
            return uid

    def _hold(self, uid: int) -> None:
        """One more reference on an exported id (dropped with :meth:`_unexport`)."""
        with self._lock:
            self._exports[uid][1] += 1

    def _unexport(self, uid: int) -> None:
        with self._lock:
            entry = self._exports.get(uid)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] <= 0:
                del self._exports[uid]
                del self._by_obj[id(entry[0])]
                self._ids.free(uid)

    def _exported(self, uid: int) -> CallbackObject | None:
        """The callback object QTEE names by ``uid`` (None: not exported by this client)."""
        with self._lock:
            entry = self._exports.get(uid)
        return entry[0] if entry is not None else None

    def _drop_input(self, ref: object) -> None:
        """An input object a handler received: released unless the handler kept it."""
        if isinstance(ref, ObjRef) and not ref.kept:
            ref.release()

    def exported(self) -> int:
        """Callback objects QTEE still holds references to."""
        with self._lock:
            return len(self._exports)

    # ----------------------------------------------------------------- invoke
    def _invoke(self, ident: int, op_: int, args: tuple[Any, ...]) -> list[Any]:
        held: list[int] = []
        try:
            return self._invoke_held(ident, op_, args, held)
        finally:
            for uid in held:
                self._unexport(uid)

    def _invoke_held(
        self, ident: int, op_: int, args: tuple[Any, ...], held: list[int]
    ) -> list[Any]:
        mem = self.device.memory
        params: list[_P] = []
        pins: list[int] = []
        outs: list[tuple[int, bytearray | None]] = []
        sent: list[int] = []
        blk: _Block | None = None
        called = False
        try:
            for i, a in enumerate(args):
                if isinstance(a, _BYTES_LIKE):
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
                    params.append(self._value_to_param(a, sent))
            n = len(params)
            size = _INVOKE_HEAD_SIZE + 32 * n
            if size > uapi.TEE_MAX_ARG_SIZE:
                raise UsageError(f"{n} arguments do not fit one invoke ({size} > 4096 bytes)")
            blk = self._take_block()
            _invoke_struct(n).pack_into(
                blk.buf, 0, ident, op_, 0, n, *itertools.chain.from_iterable(params)
            )
            called = True  # from here the errno channel decides ownership
            for uid in sent:  # held through the call: an output may name an object sent in
                self._hold(uid)  # it while QTEE's release of it is being delivered
            held.extend(sent)
            _reason.clear()  # a note left by another call never names this one
            try:
                self._call(uapi.TEE_IOC_OBJECT_INVOKE, blk, size)
            except DriverError:
                for uid in sent:  # errno channel: the caller keeps ownership
                    self._unexport(uid)
                sent.clear()
                raise
            (ret,) = _U32.unpack_from(blk.buf, 12)
            back = [_PARAM.unpack_from(blk.buf, _INVOKE_HEAD_SIZE + 32 * i) for i, _ in outs]
        except BaseException:
            if not called:  # failed before the ioctl: the caller keeps ownership
                for uid in sent:
                    self._unexport(uid)
            raise
        finally:
            if blk is not None:
                self._blocks.append(blk)
            if pins:
                self._unpin(pins)
        if op_ == 0xFFFF:
            return []
        if ret:  # the secure side's note says which error and why (model-only)
            raise _reason.error_for(ret)
        return [
            bytes(buf[: p[2]]) if buf is not None else self._param_to_value(p[1], p[2])
            for (_, buf), p in zip(outs, back, strict=True)
        ]

    def _value_to_param(self, obj: object, sent: list[int]) -> _P:
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

    def _param_to_value(self, a: int, b: int) -> Any:
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
        """Register with QTEE (root op 2) and return the client environment.

        QTEE reads the credentials object through callbacks, so this client needs
        supplicant workers (``workers >= 1``).
        """
        if self.pool is None:
            raise UsageError("client_env needs workers >= 1 to serve the credentials object")
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

    # ----------------------------------------------------------------- close
    def close(self) -> None:
        """Close the context (QTEE objects released, pending callbacks DEFUNCT), join workers."""
        if self.pool is not None:
            self.pool.stop()
        else:
            self.ctx.close()
        while self._blocks:
            self._blocks.pop().close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
