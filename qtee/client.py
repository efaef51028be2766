"""The client API: open a device, register, open services, invoke with Python values.

Everything goes through :meth:`Context.ioctl` with the kernel's structs, so a client
sees exactly what a libqcomtee user sees.  Arguments of :meth:`ObjRef.invoke`:

* ``bytes`` -> input buffer; :class:`Out` ``(n)`` -> output buffer of capacity ``n``;
* an :class:`ObjRef`, a :class:`CallbackObject`, a :class:`MemoryObject` or ``None``
  (NULL) -> input object; :data:`OUT_OBJECT` -> output object.

It returns the outputs in order (bytes for output buffers, objects for output objects:
an :class:`ObjRef` for a QTEE object, the exported :class:`CallbackObject` itself, or a
new :class:`MemoryObject` handle on the client's own memory, to release like any other).
The ioctl failing raises :class:`objects.DriverError` (errno channel); QTEE answering
non-zero raises :class:`objects.QteeError` (result channel).  Callback objects are
served by worker threads doing SUPPL_RECV/SEND on the same context; a callback that
returns an object it wants to let go of returns it wrapped in :class:`Transfer`.

:attr:`Client.root` is QTEE's root object (the kernel's ``TEE_OBJREF_NULL`` target):
``client.root.invoke(2, credentials, OUT_OBJECT)`` registers with a credentials object
of one's own, which is what :meth:`Client.client_env` does with the default one.
"""

from __future__ import annotations

import errno
import itertools
import logging
import struct
import sys
import threading
from typing import TYPE_CHECKING, Any, Final

from objects import DriverError, QteeError, UsageError
from qtee import _reason, uapi
from qtee import _tracker as _tracking
from qtee._export_table import ArgBlock, ExportTable
from qtee._handles import OUT_OBJECT, CallbackObject, MemoryObject, ObjRef, Out, Transfer, _Root
from qtee._idl import idl_op
from qtee._qcomtee.call import Context
from qtee._qcomtee.core import Device
from qtee._qcomtee_msg import Result
from qtee._tee.core import (
    _INVOKE_HEAD,
    _OBJ_IN,
    _OBJ_OUT,
    _P,
    _U32,
    _UB_IN,
    _UB_OUT,
    _invoke_struct,
)
from qtee._tracker import _ClientTrack
from qtee.credentials import Credentials
from qtee.uapi import PARAM_STRUCT as _PARAM

if TYPE_CHECKING:
    from qtee._remote.remote import RemoteContext, RemoteDevice
    from supplicant import WorkerPool

# (The pytest plugin's handle tracking is qtee/_tracker.py: not public API.)
__all__ = [
    "OUT_OBJECT",
    "ArgBlock",
    "CallbackObject",
    "Client",
    "ExportTable",
    "MemoryObject",
    "ObjRef",
    "Out",
    "Transfer",
]

_BYTES_LIKE: Final = (bytes, bytearray, memoryview)  # (a tuple: a union is built per call)

log = logging.getLogger("qtee.client")

_BUF: Final = uapi.BUF_DATA_STRUCT
_INVOKE_HEAD_SIZE: Final = _INVOKE_HEAD.size
_MAX_ARG_SIZE: Final = uapi.TEE_MAX_ARG_SIZE
_OBJECT_INVOKE: Final = uapi.TEE_IOC_OBJECT_INVOKE


class _Credentials(CallbackObject):
    """IIO over a CBOR credentials map (getLength, readAtOffset)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    @idl_op("IIO", "getLength")
    def get_length(self) -> bytes:
        return struct.pack("<Q", len(self.data))

    @idl_op("IIO", "readAtOffset")
    def read_at_offset(self, offset: bytes) -> bytes:
        (off,) = struct.unpack("<Q", offset)
        if off >= len(self.data):
            raise QteeError(2, "offset past the credentials")
        return self.data[off:]


class Client:
    """One open context, its exported callback objects and its supplicant workers."""

    def __init__(
        self, device: Device | RemoteDevice, *, workers: int = 2, deadline: float | None = None
    ) -> None:
        """Open ``device`` (one fd) and start ``workers`` supplicant threads on it.

        ``deadline`` (seconds): a callback handler that runs longer is answered BUSY
        and its late answer dropped (see :class:`supplicant.WorkerPool`).
        """
        from qtee._remote.remote import RemoteDevice

        if not isinstance(device, Device | RemoteDevice):
            raise TypeError("Client needs a Device or a connected device (qtee.connect)")
        if not isinstance(workers, int) or workers < 0:
            raise UsageError("workers must be an int >= 0")
        if deadline is not None:
            if isinstance(deadline, bool) or not isinstance(deadline, int | float):
                raise UsageError(f"deadline must be seconds (a number) or None, not {deadline!r}")
            if not deadline > 0:
                raise UsageError(f"deadline must be > 0 seconds, not {deadline!r}")
            if not workers:
                raise UsageError("a deadline is the workers' (workers >= 1)")
        self.device = device
        # What the leak check tracks (set first: every ObjRef made on this client asks).
        self._track: _ClientTrack | None = None
        self.ctx: Context | RemoteContext = device.open()
        self._lock = threading.Lock()
        #: The callback objects this client has exported (what its workers serve).
        self.exports = ExportTable()
        self._blocks: list[ArgBlock] = []
        self._shms: dict[int, list[Any]] = {}  # shm id -> [view, handles]
        #: QTEE's root object (register ops 2 and 5); it lives as long as the client.
        self.root: ObjRef = _Root(self, uapi.TEE_OBJREF_NULL)
        tracker = _tracking.current()
        if tracker is not None:
            self._track = tracker._attach(self, sys._getframe(1))
            self.exports.track = self._track
        if isinstance(self.ctx, Context):  # model-only: qtee info names the exports
            self.ctx.callback_class = self._callback_class
        self.pool: WorkerPool | None = None
        if workers:
            from supplicant import WorkerPool

            self.pool = WorkerPool(self, workers, deadline=deadline)

    # ----------------------------------------------------------------- memory
    def new_block(self) -> ArgBlock:
        """A pinned argument block owned by the caller (a supplicant thread), for
        :meth:`call`; the caller closes it."""
        return ArgBlock(self.device.memory)

    def _mem_hold(self, shm_id: int) -> memoryview:
        """One more handle on shm ``shm_id``; its view.  The first handle of a shm takes
        the fd's mapping (EBADF: the fd does not own it, or no longer does)."""
        with self._lock:
            entry = self._shms.get(shm_id)
            if entry is not None:
                if entry[1] <= 0:
                    raise DriverError(errno.EBADF, f"shm {shm_id} is being released")
                entry[1] += 1
                return entry[0]  # type: ignore[no-any-return]
        view = self.ctx.shm_view(shm_id)
        with self._lock:
            entry = self._shms.get(shm_id)
            if entry is None:
                entry = self._shms[shm_id] = [view, 0]
            elif entry[1] <= 0:
                raise DriverError(errno.EBADF, f"shm {shm_id} is being released")
            entry[1] += 1
            return entry[0]  # type: ignore[no-any-return]

    def _mem_drop(self, shm_id: int) -> None:
        """Drop one handle on shm ``shm_id``; the last closes the fd's copy (SHM free).
        While it does, the shm takes no new handle."""
        with self._lock:
            entry = self._shms.get(shm_id)
            if entry is None or entry[1] <= 0:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
        try:
            self.ctx.shm_free(shm_id)
        except DriverError as exc:
            if not self.fd_gone(exc):
                raise
        finally:
            with self._lock:
                del self._shms[shm_id]

    def fd_gone(self, exc: DriverError) -> bool:
        """``exc`` is the EBADF of this client's fd being closed (or its connection
        lost): what the fd held went with it, so there is nothing left to undo."""
        ctx = self.ctx
        return exc.errno == errno.EBADF and (ctx.closed or getattr(ctx, "lost", False))

    def _unpin(self, addrs: list[int]) -> None:
        unpin = self.device.memory.unpin
        for a in addrs:
            unpin(a)

    def call(self, cmd: int, blk: ArgBlock, size: int) -> None:
        """The ioctl ``cmd`` on this client's fd, its argument the first ``size`` bytes of
        ``blk`` (errors: :class:`objects.DriverError`, the errno channel)."""
        if not 0 <= size <= _MAX_ARG_SIZE:
            raise UsageError(f"an ioctl argument is 0..{_MAX_ARG_SIZE} bytes, not {size}")
        _BUF.pack_into(blk.arg, 0, blk.addr, size)
        self.ctx.ioctl(cmd, blk.arg)

    # ----------------------------------------------------------------- exports
    def drop_input(self, ref: object) -> None:
        """An input object a callback handler received: released unless the handler kept
        it (:meth:`ObjRef.keep`)."""
        if isinstance(ref, ObjRef | MemoryObject) and not ref.kept:
            ref.release()

    def exported(self) -> int:
        """Callback objects QTEE still holds references to."""
        return len(self.exports)

    def _callback_class(self, uid: int) -> str | None:
        """The class of the callback object exported as ``uid`` (model-only)."""
        obj = self.exports.get(uid)
        return None if obj is None else type(obj).__name__

    # ----------------------------------------------------------------- model-only
    def _held(self) -> dict[str, Any] | None:
        """What the fd holds, by name (``qtee._cli.info.fd_objects``): asked of the model in
        process, of the server over a connection; None when it cannot say."""
        ctx = self.ctx
        try:
            if isinstance(ctx, Context):
                from qtee._cli.info import fd_objects

                return fd_objects(ctx)
            return ctx.held_objects()
        except DriverError:
            return None

    def _label(self, ident: int) -> str | None:
        """The label of the object the fd holds as ``ident`` (None: the model cannot say)."""
        ctx = self.ctx
        if isinstance(ctx, Context):
            from qtee._cli.info import object_label

            return object_label(ctx, ident)
        held = self._held()
        try:
            labels = {int(i): str(label) for i, label, *_ in (held or {}).get("objects", ())}
        except (TypeError, ValueError):  # a server that sent something else
            return None
        return labels.get(ident)

    # ----------------------------------------------------------------- invoke
    def _invoke(self, ident: int, op_: int, args: tuple[Any, ...]) -> list[Any]:
        if not args:  # the header alone (a null call, a release): no per-argument work
            block = self._take_block()
            try:
                _INVOKE_HEAD.pack_into(block.buf, 0, ident, op_, 0, 0)
                ret = self._ioctl_invoke(block, _INVOKE_HEAD_SIZE)
            finally:
                self._blocks.append(block)
            if ret and op_ != 0xFFFF:  # the secure side's note says which error and why
                raise _reason.error_for(ret)
            return []
        params: list[_P] = []
        pins: list[int] = []
        outs: list[tuple[int, bytearray | None]] = []
        # Each callback id sent is held through the call too (an output may name an object
        # sent in it while QTEE's release of it is being delivered): to_param takes both
        # references at once, the finally drops the hold once the outputs are read.
        sent: list[int] = []
        try:
            blk: ArgBlock | None = None
            called = False
            try:
                mem = self.device.memory
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
                        params.append(self.to_param(a, sent, 2))
                n = len(params)
                size = _INVOKE_HEAD_SIZE + 32 * n
                if size > _MAX_ARG_SIZE:
                    raise UsageError(f"{n} arguments do not fit one invoke ({size} > 4096 bytes)")
                blk = self._take_block()
                _invoke_struct(n).pack_into(
                    blk.buf, 0, ident, op_, 0, n, *itertools.chain.from_iterable(params)
                )
                called = True  # from here the errno channel decides ownership
                try:
                    ret = self._ioctl_invoke(blk, size)
                except DriverError:
                    for uid in sent:  # errno channel: the caller keeps ownership
                        self.exports.unexport(uid)
                    raise
                back = (
                    [_PARAM.unpack_from(blk.buf, _INVOKE_HEAD_SIZE + 32 * i) for i, _ in outs]
                    if outs
                    else ()
                )
            except BaseException:
                if not called:  # failed before the ioctl: the caller keeps ownership
                    for uid in sent:
                        self.exports.unexport(uid)
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
            if not outs:
                return []
            values: list[Any] = []
            try:
                for (_, buf), p in zip(outs, back, strict=True):
                    values.append(
                        bytes(buf[: p[2]]) if buf is not None else self.from_param(*p[1:3])
                    )
            except UsageError as exc:
                # libqcomtee: an output that cannot be unmarshalled makes the result UNAVAIL
                # and every output object made so far is released (quic-teec.md §1.3).
                for v in values:
                    if isinstance(v, ObjRef | MemoryObject):
                        v.release()
                raise QteeError(Result.ERROR_UNAVAIL, str(exc)) from None
            return values
        finally:
            for uid in sent:
                self.exports.unexport(uid)

    def _take_block(self) -> ArgBlock:
        """A pinned argument block (one per concurrent ioctl, reused: give it back to
        ``_blocks``)."""
        try:
            return self._blocks.pop()
        except IndexError:
            return ArgBlock(self.device.memory)

    def _ioctl_invoke(self, blk: ArgBlock, size: int) -> int:
        """OBJECT_INVOKE of the ``size`` bytes packed in ``blk``; QTEE's result (``ret``).
        (:meth:`call` inline, ``size`` checked by the caller: the hot path.)"""
        _reason.clear()  # a note left by another call never names this one
        _BUF.pack_into(blk.arg, 0, blk.addr, size)
        self.ctx.ioctl(_OBJECT_INVOKE, blk.arg)
        ret: int = _U32.unpack_from(blk.buf, 12)[0]
        return ret

    def to_param(self, obj: object, sent: list[int], refs: int = 1) -> tuple[int, int, int, int]:
        """The ``(attr, a, b, c)`` of input object ``obj`` (None, an :class:`ObjRef`, a
        :class:`MemoryObject` or a :class:`CallbackObject`); a callback object is exported
        (``refs`` references: the send's, and an invoke's hold through the call) and its id
        appended to ``sent``."""
        if obj is None:
            return (_OBJ_IN, uapi.TEE_OBJREF_NULL, 0, 0)
        if isinstance(obj, ObjRef):
            if isinstance(obj, _Root):  # libqcomtee refuses a ROOT object as an argument
                raise UsageError(
                    "the root object cannot be passed as an argument "
                    "(its id, TEE_OBJREF_NULL, would arrive as the NULL object)"
                )
            if obj.released or obj.client is not self:
                raise UsageError(f"{obj!r} cannot be passed from this client")
            return (_OBJ_IN, obj.id, uapi.QCOMTEE_OBJREF_FLAG_TEE, 0)
        if isinstance(obj, MemoryObject):
            if obj.id < 0 or obj.client is not self:
                what = "was released" if obj.id < 0 else "belongs to another client"
                raise UsageError(f"this memory object {what}: it cannot be passed")
            return (_OBJ_IN, obj.id, uapi.QCOMTEE_OBJREF_FLAG_MEM, 0)
        if isinstance(obj, Transfer):
            raise UsageError("Transfer is for a callback's output objects, not an argument")
        if isinstance(obj, CallbackObject):
            uid = self.exports.export(obj, refs)
            sent.append(uid)
            return (_OBJ_IN, uid, uapi.QCOMTEE_OBJREF_FLAG_USER, 0)
        name = type(obj).__name__
        raise TypeError(
            f"cannot pass {'an' if name[:1] in 'aeiouAEIOU' else 'a'} {name} to QTEE: an "
            "argument is bytes (an input buffer), Out(n) (an output buffer of n bytes), "
            "OUT_OBJECT (an output object), or an ObjRef, CallbackObject, MemoryObject or "
            "None (an input object)"
        )

    def from_param(self, a: int, b: int) -> Any:
        """The object an OBJREF param ``(a, b)`` names: None, a new :class:`ObjRef`, this
        client's exported :class:`CallbackObject` (None if no longer exported) or a new
        :class:`MemoryObject` handle (:class:`objects.UsageError`: no object kind)."""
        if a == uapi.TEE_OBJREF_NULL:
            return None
        if b & uapi.QCOMTEE_OBJREF_FLAG_TEE:
            return ObjRef(self, a)
        if b & uapi.QCOMTEE_OBJREF_FLAG_USER:
            return self.exports.get(a)
        if b & uapi.QCOMTEE_OBJREF_FLAG_MEM:
            # A new handle on this client's memory (libqcomtee finds it by shm id in its
            # namespace, taking a reference: quic-teec.md §1.7).  Once the client has
            # released it, there is nothing to find.
            try:
                return MemoryObject(self, a)
            except DriverError:
                raise UsageError(
                    f"memory object {a} came back from QTEE, but this client released it"
                ) from None
        raise UsageError(f"objref flags {b:#x} name no object kind")

    # ----------------------------------------------------------------- conveniences
    def client_env(self, credentials: Credentials | None = None) -> ObjRef:
        """Register with QTEE (root op 2) and return the client environment.

        QTEE reads the credentials object through callbacks, so this client needs
        supplicant workers (``workers >= 1``).
        """
        if self.pool is None:
            raise UsageError("client_env needs workers >= 1 to serve the credentials object")
        cred = _Credentials((credentials or Credentials.default()).encode())
        (env,) = self.root.invoke(2, cred, OUT_OBJECT)
        return env  # type: ignore[no-any-return]

    def open_service(self, env: ObjRef, uid: int) -> ObjRef:
        """client_env op 0: the service with class UID ``uid``."""
        if not isinstance(env, ObjRef):
            raise TypeError(f"open_service: env must be an ObjRef, not {type(env).__name__}")
        if type(uid) is not int:
            raise TypeError(f"open_service: uid must be an int, not {type(uid).__name__}")
        if not 0 <= uid <= 0xFFFF_FFFF:
            raise UsageError(f"open_service: uid {uid} does not fit in u32")
        (svc,) = env.invoke(0, struct.pack("<I", uid), OUT_OBJECT)
        return svc  # type: ignore[no-any-return]

    def memory(self, size: int) -> MemoryObject:
        """Allocate shared memory (TEE_IOC_SHM_ALLOC)."""
        arg = bytearray(uapi.ShmAllocData(size).pack())
        self.ctx.ioctl(uapi.TEE_IOC_SHM_ALLOC, arg)
        return MemoryObject(self, uapi.ShmAllocData.unpack(arg).id)

    # ----------------------------------------------------------------- close
    def close(self) -> None:
        """Close the context (QTEE objects released, pending callbacks DEFUNCT), join workers.

        While a KeyboardInterrupt or SystemExit propagates (Ctrl-C during a call whose
        callback is still running), the workers are not waited for: one in a handler
        goes on until its handler returns, and its late answer fails on the closed fd."""
        self._close(interrupted=isinstance(sys.exception(), KeyboardInterrupt | SystemExit))

    def _close(self, *, interrupted: bool) -> None:
        track = self._track
        if track is not None and not track.closed:  # what close releases on the user's behalf
            track.left = track.leftovers(self)
            track.closed = True
        if self.pool is not None:
            self.pool.stop(wait=not interrupted)
        else:
            self.ctx.close()
        while self._blocks:
            self._blocks.pop().close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        self._close(
            interrupted=kind is not None and issubclass(kind, KeyboardInterrupt | SystemExit)
        )
