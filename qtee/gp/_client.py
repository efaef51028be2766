"""The GlobalPlatform TEE Client API, as libteec implements it (optee.md §1).

Every TEEC type and function has a Python counterpart a GP user will recognise:

=================================  ===============================================
``TEEC_Context``                   :class:`TeecContext` (``TEEC_InitializeContext``
                                   is the constructor, ``TEEC_FinalizeContext``
                                   :meth:`~TeecContext.finalize` / ``with``)
``TEEC_Session``                   :class:`TeecSession` (``TEEC_OpenSession`` is
                                   :meth:`TeecContext.open_session`,
                                   ``TEEC_InvokeCommand``
                                   :meth:`~TeecSession.invoke_command`,
                                   ``TEEC_CloseSession`` :meth:`~TeecSession.close`)
``TEEC_SharedMemory``              :class:`TeecSharedMemory` (``allocate``,
                                   ``register``, ``release``)
``TEEC_Operation``                 :class:`TeecOperation`
``TEEC_Value``                     :class:`TeecValue`
``TEEC_TempMemoryReference``       :class:`TeecTempMemoryReference`
``TEEC_RegisteredMemoryReference`` :class:`TeecRegisteredMemoryReference`
``TEEC_RequestCancellation``       :meth:`TeecContext.request_cancellation`
=================================  ===============================================

A ``TEEC_Result`` other than SUCCESS is raised as :class:`~qtee.gp.TeecError` with its
``code`` and ``origin`` (the ``returnOrigin`` out-param): origin API for what libteec
refuses itself (before any ioctl), COMMS for a failed ioctl (errno mapped by
:func:`~qtee.gp.errno_to_result`), and otherwise what the TEE answered.  When the TEE
answered, the operation's outputs (values, memref sizes, shadow bytes) are written back
*before* the error is raised, so a ``TEEC_ERROR_SHORT_BUFFER`` carries the size it
needs (§1.4).  Passing the wrong Python type (a :class:`TeecValue` where the param type
says memref, say) is a programming error: ``UsageError``/``TypeError``, as C would not
compile or would misread the union.

**Results, one way.**  Every call either succeeds or raises :class:`~qtee.gp.TeecError`
(``code`` and ``origin``: :class:`~qtee.gp.TeecResult` and :class:`~qtee.gp.TeecOrigin`
members for known values, plain ints otherwise).  A call that reached the TEE also
reports its return origin on success, in the same form: ``TEEC_InvokeCommand``'s is what
:meth:`TeecSession.invoke_command` returns, ``TEEC_OpenSession``'s is the new session's
:attr:`TeecSession.origin` (TRUSTED_APP whenever the TA ran).

The API talks only to a :class:`~qtee.gp.GpTransport` (the kernel's ioctls).
:class:`TeecContext` makes one from what it is given: an OP-TEE device
(:class:`qtee.OpteeDevice`, or a served one from :func:`qtee.connect`) gets a context of
its own; a QTEE device (:class:`qtee.Device`, or a served one) gets a
:class:`qtee.Client` of its own that speaks IGPAppClient (0x199); a
:class:`qtee.Client` is used as it is (and stays the caller's).
"""

from __future__ import annotations

import errno
import logging
import threading
import uuid as uuidlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final

from objects import DriverError, UsageError
from qtee import uapi
from qtee.gp._defs import (
    TEEC_CONFIG_PAYLOAD_REF_COUNT,
    TeecError,
    TeecLogin,
    TeecMemFlag,
    TeecOrigin,
    TeecParamType,
    TeecResult,
    _known,
    errno_to_result,
    param_type_get,
)
from qtee.gp._identity import gid_connection_data
from qtee.gp._params import (
    SIZE_MAX,
    MemrefUpdate,
    NeedTempShm,
    RegisteredMemref,
    SharedMemory,
    TeecParam,
    TempMemref,
    Value,
    ValueUpdate,
    post_process_operation,
    pre_process_operation,
)
from qtee.gp._transport import GpTransport, OpteeTransport
from qtee.secure import _gp_why

if TYPE_CHECKING:
    from qtee._optee import OpteeDevice
    from qtee._qcomtee.core import Device
    from qtee._remote.remote import RemoteDevice
    from qtee.client import Client

__all__ = [
    "TEEC_MAX_DEV_SEQ",
    "TeecContext",
    "TeecOperation",
    "TeecParameter",
    "TeecRegisteredMemoryReference",
    "TeecSession",
    "TeecSharedMemory",
    "TeecTempMemoryReference",
    "TeecValue",
]

log = logging.getLogger("qtee.gp.client")

#: libteec tries ``/dev/tee0`` .. ``/dev/tee9``: at most this many devices.
TEEC_MAX_DEV_SEQ: Final = 10
#: The one name ``TEEC_InitializeContext`` recognises.
_OPTEE_TZ: Final = "optee-tz"
_U32: Final = 0xFFFF_FFFF
#: The model refuses bigger buffers (OUT_OF_MEMORY) rather than exhaust the host.
_MAX_ALLOC: Final = 1 << 32

_IN: Final = TeecMemFlag.TEEC_MEM_INPUT
_OUT: Final = TeecMemFlag.TEEC_MEM_OUTPUT
_T = TeecParamType
_TEMP_TYPES: Final = frozenset(
    {_T.TEEC_MEMREF_TEMP_INPUT, _T.TEEC_MEMREF_TEMP_OUTPUT, _T.TEEC_MEMREF_TEMP_INOUT}
)
_TEMP_OUT_TYPES: Final = frozenset({_T.TEEC_MEMREF_TEMP_OUTPUT, _T.TEEC_MEMREF_TEMP_INOUT})
_REG_TYPES: Final = frozenset(
    {
        _T.TEEC_MEMREF_WHOLE,
        _T.TEEC_MEMREF_PARTIAL_INPUT,
        _T.TEEC_MEMREF_PARTIAL_OUTPUT,
        _T.TEEC_MEMREF_PARTIAL_INOUT,
    }
)

#: libteec's ``teec_mutex``: guards ``TEEC_Operation.imp.session`` for cancellation.
_teec_mutex = threading.Lock()


def _api(code: int, detail: str) -> TeecError:
    return TeecError(code, TeecOrigin.TEEC_ORIGIN_API, detail)


def _bad(detail: str) -> TeecError:
    return _api(TeecResult.TEEC_ERROR_BAD_PARAMETERS, detail)


def _comms(exc: DriverError, what: str) -> TeecError:
    """A failed ioctl: libteec's ``ioctl_errno_to_res``, origin COMMS."""
    return TeecError(errno_to_result(exc.code), TeecOrigin.TEEC_ORIGIN_COMMS, f"{what}: {exc}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _register_pages(transport: GpTransport, size: int) -> tuple[int, memoryview]:
    """Fresh zeroed pages, registered (libteec's ``teec_paged_aligned_alloc`` + register)."""
    pages = bytearray(size)
    return transport.shm_register(pages), memoryview(pages)


def _shm_failure(exc: DriverError, reg_mem: bool) -> TeecResult:
    """libteec's answer when it cannot get a shm: a failed SHM_ALLOC is OUT_OF_MEMORY, a
    failed registration OUT_OF_MEMORY for ENOMEM and GENERIC otherwise."""
    if exc.code == errno.ENOMEM or not reg_mem:
        return TeecResult.TEEC_ERROR_OUT_OF_MEMORY
    return TeecResult.TEEC_ERROR_GENERIC


# ----------------------------------------------------------------------------- params


class TeecValue:
    """``TEEC_Value``: two u32, ``a`` and ``b`` (outputs are written back here)."""

    __slots__ = ("a", "b")

    def __init__(self, a: int = 0, b: int = 0) -> None:
        self.a = a
        self.b = b

    def __repr__(self) -> str:
        return f"TeecValue(a={self.a:#x}, b={self.b:#x})"


class TeecTempMemoryReference:
    """``TEEC_TempMemoryReference``: ``size`` bytes of ``buffer`` (None: a NULL buffer).

    ``size`` defaults to ``len(buffer)`` (0 for None).  For each call libteec puts the
    bytes in a temporary shared memory (copied in before, back after, at most
    ``min(returned size, size)`` bytes) and frees it after.  After the call ``size`` is
    what the TEE returned -- with ``TEEC_ERROR_SHORT_BUFFER``, the size it needs.
    """

    __slots__ = ("buffer", "size")

    def __init__(
        self, buffer: bytearray | memoryview | None = None, size: int | None = None
    ) -> None:
        self.buffer = buffer
        self.size: int = (0 if buffer is None else len(buffer)) if size is None else size

    def __repr__(self) -> str:
        what = "NULL" if self.buffer is None else f"<{len(self.buffer)} bytes>"
        return f"TeecTempMemoryReference({what}, size={self.size})"


class TeecRegisteredMemoryReference:
    """``TEEC_RegisteredMemoryReference``: ``size`` bytes at ``offset`` of ``parent``.

    ``TEEC_MEMREF_WHOLE`` ignores ``offset`` and ``size`` (the whole parent, directions
    from its flags); the ``PARTIAL`` types need the parent's matching flags and a window
    inside it.  After an output call ``size`` is what the TEE returned.
    """

    __slots__ = ("offset", "parent", "size")

    def __init__(self, parent: TeecSharedMemory, offset: int = 0, size: int = 0) -> None:
        self.parent = parent
        self.offset = offset
        self.size = size

    def __repr__(self) -> str:
        return (
            f"TeecRegisteredMemoryReference({self.parent!r}, offset={self.offset}, "
            f"size={self.size})"
        )


#: ``TEEC_Parameter`` (a C union): one of the three, or None for an unused slot.
TeecParameter = TeecValue | TeecTempMemoryReference | TeecRegisteredMemoryReference | None


class TeecOperation:
    """``TEEC_Operation``: ``param_types`` (``TEEC_PARAM_TYPES(...)``) and four ``params``.

    ``started`` is GP's field; libteec never reads it and neither does this model.  The
    operation remembers the session of the last :meth:`TeecSession.invoke_command` it was
    used with (``imp.session``), which is what
    :meth:`TeecContext.request_cancellation` cancels.
    """

    __slots__ = ("_session", "param_types", "params", "started")

    def __init__(self, param_types: int = 0, params: Sequence[TeecParameter] = ()) -> None:
        if len(params) > TEEC_CONFIG_PAYLOAD_REF_COUNT:
            raise UsageError(f"at most {TEEC_CONFIG_PAYLOAD_REF_COUNT} params, not {len(params)}")
        self.started = 0
        self.param_types = param_types
        self.params: list[TeecParameter] = [
            *params,
            *(None,) * (TEEC_CONFIG_PAYLOAD_REF_COUNT - len(params)),
        ]
        self._session: TeecSession | None = None

    def __repr__(self) -> str:
        return f"TeecOperation({self.param_types:#06x}, {self.params!r})"


# ----------------------------------------------------------------------------- shared memory


class TeecSharedMemory:
    """``TEEC_SharedMemory``: a block of client memory the TEE can reach.

    Made by :meth:`allocate` (``TEEC_AllocateSharedMemory``) or :meth:`register`
    (``TEEC_RegisterSharedMemory``); :meth:`release` (``TEEC_ReleaseSharedMemory``) is
    idempotent.  ``buffer`` is the client's view of ``size`` bytes.  When the TEE cannot
    reach ``buffer`` directly (no ``TEE_GEN_CAP_REG_MEM``, or registration failed) libteec
    keeps a *shadow* shm, copied in before and out after each call that uses it (§1.1).
    """

    __slots__ = ("_buffer", "_lock", "alloced_size", "context", "flags", "id", "shadow", "size")

    def __init__(self, context: TeecContext, size: int, flags: int) -> None:
        """Use :meth:`allocate` or :meth:`register`."""
        self.context = context
        self.size = size
        self.flags = flags
        self.id = -1  # libteec's "released" marker
        self.alloced_size = 0
        self._buffer: memoryview | None = None
        #: The shadow's bytes, or None when the TEE shares ``buffer`` itself.
        self.shadow: memoryview | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ constructors
    @staticmethod
    def _check(flags: int, size: int) -> None:
        if not _is_int(flags) or not flags or flags & ~int(_IN | _OUT):
            raise _bad(f"shared memory flags must be a non-empty subset of INPUT|OUTPUT: {flags}")
        if not _is_int(size) or not 0 <= size <= SIZE_MAX:
            raise UsageError(f"shared memory size must be a size_t, not {size!r}")

    @classmethod
    def allocate(cls, context: TeecContext, size: int, flags: int) -> TeecSharedMemory:
        """``TEEC_AllocateSharedMemory``: ``size`` new bytes (8 internally when 0).

        With ``TEE_GEN_CAP_REG_MEM`` libteec allocates the pages and registers them,
        else it uses ``TEE_IOC_SHM_ALLOC`` and maps the shm.  Any failure is
        OUT_OF_MEMORY (origin API): xtest 5006 allocates SIZE_MAX.
        """
        cls._check(flags, size)
        shm = cls(context, size, flags)
        s = size or 8
        transport = context.transport
        if s > _MAX_ALLOC:
            raise _api(TeecResult.TEEC_ERROR_OUT_OF_MEMORY, f"cannot allocate {size} bytes")
        try:
            if context.reg_mem:
                shm.id, view = _register_pages(transport, s)
            else:
                shm.id, view = transport.shm_alloc(s)
        except (DriverError, MemoryError) as exc:
            raise _api(TeecResult.TEEC_ERROR_OUT_OF_MEMORY, str(exc)) from exc
        shm._buffer = view[:size]
        shm.alloced_size = s
        context._track_shm(shm)
        return shm

    @classmethod
    def register(
        cls,
        context: TeecContext,
        buffer: bytearray | memoryview | bytes,
        flags: int,
        size: int | None = None,
    ) -> TeecSharedMemory:
        """``TEEC_RegisterSharedMemory``: share ``size`` bytes of ``buffer`` (default all).

        With REG_MEM a ``bytearray`` is registered in place; anything the kernel cannot
        pin (a failed ``TEE_IOC_SHM_REGISTER``, read-only memory, a buffer shorter than
        the 8 bytes a size 0 registers) gets a shadow.  Without REG_MEM the shadow is a
        ``TEE_IOC_SHM_ALLOC`` shm.  Bad flags or a None buffer: BAD_PARAMETERS (origin API).
        """
        if buffer is None:
            raise _bad("TEEC_RegisterSharedMemory with a NULL buffer")
        view = memoryview(buffer).cast("B")
        if size is None:
            size = len(view)
        cls._check(flags, size)
        if size > len(view):
            raise _bad(f"size {size} is beyond the {len(view)}-byte buffer")
        if flags & _OUT and view.readonly:
            raise _bad("TEEC_MEM_OUTPUT shared memory over a read-only buffer")
        shm = cls(context, size, flags)
        s = size or 8
        transport = context.transport
        try:
            if not context.reg_mem:
                shm.id, shm.shadow = transport.shm_alloc(s)
            elif isinstance(buffer, bytearray) and len(buffer) >= s:
                try:
                    shm.id = transport.shm_register(buffer)
                except DriverError:  # libteec: fall back to a page-aligned shadow
                    shm.id, shm.shadow = _register_pages(transport, s)
            else:  # not pinnable in place (read-only, or short of the 8 bytes of size 0)
                shm.id, shm.shadow = _register_pages(transport, s)
        except DriverError as exc:
            raise _api(_shm_failure(exc, context.reg_mem), str(exc)) from exc
        except MemoryError as exc:
            raise _api(TeecResult.TEEC_ERROR_OUT_OF_MEMORY, "no memory for a shadow") from exc
        shm._buffer = view[:size]
        shm.alloced_size = s
        context._track_shm(shm)
        return shm

    # ------------------------------------------------------------------ use
    @property
    def buffer(self) -> memoryview:
        """The client's ``size`` bytes (``TEEC_SharedMemory.buffer``)."""
        buf = self._buffer
        if buf is None:
            raise UsageError(f"{self!r} was released")
        return buf

    @property
    def released(self) -> bool:
        """Whether :meth:`release` ran (libteec's ``id == -1``)."""
        return self._buffer is None

    def _record(self) -> SharedMemory:
        """What :mod:`qtee.gp._params` needs to know of it."""
        if self._buffer is None:
            raise _bad(f"{self!r} was released")
        return SharedMemory(self.id, self.size, self.flags)

    def _copy_in(self, offset: int, length: int) -> None:
        """Before a call: client bytes -> shadow."""
        shadow, buf = self.shadow, self._buffer
        if shadow is not None and buf is not None and length:
            shadow[offset : offset + length] = buf[offset : offset + length]

    def _copy_out(self, offset: int, length: int) -> None:
        """After a call: shadow bytes -> client."""
        shadow, buf = self.shadow, self._buffer
        if shadow is not None and buf is not None and length:
            buf[offset : offset + length] = shadow[offset : offset + length]

    def release(self) -> None:
        """``TEEC_ReleaseSharedMemory``: free the shm; later calls do nothing."""
        with self._lock:
            if self._buffer is None:
                return
            shm_id, self.id = self.id, -1
            self._buffer = self.shadow = None
        self.context._forget_shm(self, shm_id)

    def _dropped(self) -> None:
        """The context was finalized: the kernel freed the shm with the fd."""
        with self._lock:
            self.id = -1
            self._buffer = self.shadow = None

    def __enter__(self) -> TeecSharedMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._buffer is None else f"id={self.id}"
        shadow = " shadow" if self.shadow is not None else ""
        return f"<TeecSharedMemory {state} size={self.size} flags={self.flags:#x}{shadow}>"


# ----------------------------------------------------------------------------- calls


class _TempShm:
    """A temporary shm behind one temp memref, for the duration of one call."""

    __slots__ = ("id", "view")

    def __init__(self, shm_id: int, view: memoryview) -> None:
        self.id = shm_id
        self.view = view


def _slot_record(index: int, ptype: TeecParamType, param: TeecParameter) -> TeecParam:
    """One Python param -> the :mod:`qtee.gp._params` record, with the Python-only checks."""
    if ptype == _T.TEEC_NONE:
        return None
    if isinstance(param, TeecValue):
        return Value(param.a, param.b)
    if isinstance(param, TeecTempMemoryReference):
        buf = param.buffer
        if buf is None:
            return TempMemref(param.size, null=True)
        view = memoryview(buf)
        if not _is_int(param.size) or param.size > view.nbytes:
            raise _bad(f"param {index}: temp memref size {param.size} is beyond its buffer")
        if ptype in _TEMP_OUT_TYPES and view.readonly:
            raise _bad(f"param {index}: {ptype.name} on a read-only buffer")
        return TempMemref(param.size)
    if isinstance(param, TeecRegisteredMemoryReference):
        if not isinstance(param.parent, TeecSharedMemory):
            raise TypeError(f"param {index}: the parent must be a TeecSharedMemory")
        return RegisteredMemref(param.parent._record(), param.offset, param.size)
    if param is None:
        raise UsageError(f"param {index}: {ptype.name} needs a parameter, not None")
    raise TypeError(f"param {index}: not a TEEC parameter: {param!r}")


class _Call:
    """One open or invoke: libteec's pre-processing, temporary shms, post-processing."""

    def __init__(self, context: TeecContext, operation: TeecOperation | None) -> None:
        self.context = context
        self.operation = operation
        self.types: int | None = None if operation is None else operation.param_types
        self.records: list[TeecParam] = []
        self.temps: list[_TempShm | None] = [None] * TEEC_CONFIG_PAYLOAD_REF_COUNT
        self.shadow = [False] * TEEC_CONFIG_PAYLOAD_REF_COUNT

    def prepare(self) -> list[uapi.Param]:
        """``teec_pre_process_operation``: every failure is origin API, nothing leaks."""
        op = self.operation
        if op is None or self.types is None:
            return [uapi.Param(0)] * TEEC_CONFIG_PAYLOAD_REF_COUNT
        self.records = [
            _slot_record(n, param_type_get(self.types, n), op.params[n])
            for n in range(TEEC_CONFIG_PAYLOAD_REF_COUNT)
        ]
        pre = pre_process_operation(self.types, self.records, memref_null=self.context.memref_null)
        params: list[uapi.Param] = []
        try:
            for n, item in enumerate(pre):
                params.append(self._param(n, item))
        except BaseException:
            self.free()
            raise
        return params

    def _param(self, n: int, item: uapi.Param | NeedTempShm) -> uapi.Param:
        op = self.operation
        assert op is not None
        if isinstance(item, NeedTempShm):
            temp = self.context._temp_shm(item.alloc_size)
            self.temps[n] = temp
            self.shadow[n] = True
            param = op.params[n]
            if item.register and isinstance(param, TeecTempMemoryReference):
                assert param.buffer is not None
                src = memoryview(param.buffer).cast("B")
                temp.view[: item.size] = src[: item.size]
            return item.param(temp.id)
        record = self.records[n]
        if isinstance(record, RegisteredMemref):
            param = op.params[n]
            assert isinstance(param, TeecRegisteredMemoryReference)
            parent = param.parent
            self.shadow[n] = parent.shadow is not None
            ptype = param_type_get(op.param_types, n)
            if ptype == _T.TEEC_MEMREF_WHOLE:
                if parent.flags & _IN:
                    parent._copy_in(0, parent.size)
            elif ptype != _T.TEEC_MEMREF_PARTIAL_OUTPUT:
                parent._copy_in(param.offset, param.size)
        return item

    def finish(self, returned: list[uapi.Param]) -> None:
        """``teec_post_process_operation``: outputs back into the operation."""
        op = self.operation
        if op is None or self.types is None:
            return
        updates = post_process_operation(self.types, self.records, returned, shadow=self.shadow)
        for n, update in enumerate(updates):
            param = op.params[n]
            if isinstance(update, ValueUpdate):
                assert isinstance(param, TeecValue)
                param.a, param.b = update.a, update.b
            elif isinstance(update, MemrefUpdate):
                if isinstance(param, TeecTempMemoryReference):
                    param.size = update.size
                    temp = self.temps[n]
                    if update.copy_length and temp is not None and param.buffer is not None:
                        dst = memoryview(param.buffer).cast("B")
                        dst[: update.copy_length] = temp.view[: update.copy_length]
                elif isinstance(param, TeecRegisteredMemoryReference):
                    param.size = update.size
                    param.parent._copy_out(update.copy_offset, update.copy_length)

    def free(self) -> None:
        """``teec_free_temp_refs``: every temporary shm goes, whatever happened."""
        for n, temp in enumerate(self.temps):
            if temp is not None:
                self.temps[n] = None
                self.context._free_temp(temp)

    def run(self, ioctl: Callable[[list[uapi.Param]], tuple[int, int, list[uapi.Param]]]) -> int:
        """Pre-process, make the call, post-process; raise a TeecError unless SUCCESS.

        Returns the origin of a successful call (a :class:`TeecOrigin` when it is a known
        one, as a :class:`TeecError`'s ``origin`` is).
        """
        params = self.prepare()
        try:
            _gp_why.clear()  # the secure side notes why it fails this call, on this thread
            try:
                ret, origin, back = ioctl(params)
            except DriverError as exc:
                raise _comms(exc, "TEE ioctl failed") from exc
            detail = _gp_why.taken(ret)  # model-only: never changes ret or origin
            self.finish(back)
        finally:
            self.free()
        if ret != TeecResult.TEEC_SUCCESS:
            raise TeecError(ret, origin, detail)
        return _known(TeecOrigin, origin)


# ----------------------------------------------------------------------------- context


class _Unqualified(Exception):
    """A candidate device that is no GP TEE (``teec_open_dev`` skips it)."""


def _as_transport(source: object) -> GpTransport:
    """A candidate device -> its transport.

    An OP-TEE device gets a new context (a served one is asked its impl id first); a
    QTEE device gets a new :class:`~qtee.client.Client` (owned by the transport) that
    speaks IGPAppClient; a Client is used as it is.  A QTEE without IGPAppClient raises
    :class:`_Unqualified`."""
    from qtee._optee import OpteeDevice
    from qtee._qcomtee.core import Device
    from qtee._remote.remote import RemoteDevice
    from qtee.client import Client

    if isinstance(source, OpteeDevice):
        return OpteeTransport(source.open(), source.memory)
    if isinstance(source, RemoteDevice):
        ctx = source.open()
        try:
            arg = bytearray(uapi.VersionData.SIZE)
            ctx.ioctl(uapi.TEE_IOC_VERSION, arg)
            impl_id = uapi.VersionData.unpack(arg).impl_id
        except BaseException:
            ctx.close()
            raise
        if impl_id == uapi.TEE_IMPL_ID_OPTEE:
            return OpteeTransport(ctx, source.memory)  # type: ignore[arg-type]
        ctx.close()
        return _qtee_transport(Client(source, workers=1), owned=True)
    if isinstance(source, Device):
        return _qtee_transport(Client(source, workers=1), owned=True)
    if isinstance(source, Client):
        return _qtee_transport(source, owned=False)
    if isinstance(source, GpTransport):
        return source
    raise TypeError(
        "TeecContext takes a GpTransport, an OpteeDevice, a qtee Device, a connected "
        f"device (qtee.connect) or a qtee Client, not {source!r}"
    )


def _qtee_transport(client: Client, *, owned: bool) -> GpTransport:
    """IGPAppClient of ``client``'s QTEE (``owned``: closed with the transport)."""
    from objects import QteeError
    from qtee.gp._qtee_transport import QteeGpTransport
    from qtee.secure._gpclient import CGPAPPCLIENT_UID

    try:
        return QteeGpTransport(client, owns_client=owned)
    except BaseException as exc:
        if owned:
            client.close()
        if isinstance(exc, QteeError):
            raise _Unqualified(
                f"this QTEE offers no IGPAppClient (UID {CGPAPPCLIENT_UID:#x}): qtee.Device() "
                "offers it, or call qtee.secure.install_gp_app_client(world) before use"
            ) from None
        raise


class TeecContext:
    """``TEEC_Context``: one open TEE device, found as ``TEEC_InitializeContext`` does.

    ``transport_or_device`` is a :class:`~qtee.gp.GpTransport`; an
    :class:`~qtee.OpteeDevice` (a new context of it is opened); a QTEE
    :class:`~qtee.Device` (a new :class:`~qtee.Client` of it, closed with the context,
    speaks IGPAppClient); a :class:`~qtee.Client` (used as it is: it stays the
    caller's); a device from :func:`qtee.connect` (either kind, by its impl id); or a
    sequence of them standing for ``/dev/tee0`` .. ``/dev/tee9`` (only the first
    :data:`TEEC_MAX_DEV_SEQ` are tried).  The first that reports ``TEE_GEN_CAP_GP`` (and
    for ``name == "optee-tz"``, impl id OP-TEE with ``TEE_OPTEE_CAP_TZ``) is used; a
    device that does not qualify is closed again.  Any other name matches nothing.  No
    device: ``TEEC_ERROR_ITEM_NOT_FOUND`` (origin API).  The context owns the transport
    it uses: :meth:`finalize` closes it, and with it every session still open (the
    kernel closes them with the fd) and every shared memory.
    """

    def __init__(
        self,
        transport_or_device: (
            GpTransport
            | OpteeDevice
            | Device
            | RemoteDevice
            | Client
            | Sequence[GpTransport | OpteeDevice | Device | RemoteDevice | Client]
        ),
        name: str | None = None,
    ) -> None:
        if name is not None and not isinstance(name, str):
            raise TypeError(f"a context name is a str or None, not {type(name).__name__}")
        source = transport_or_device
        candidates: Sequence[object] = (
            source[:TEEC_MAX_DEV_SEQ] if isinstance(source, Sequence) else [source]
        )
        self.name = name
        self._lock = threading.Lock()
        self._sessions: set[TeecSession] = set()
        self._shms: set[TeecSharedMemory] = set()
        self.closed = False
        why: list[str] = []
        for candidate in candidates:
            found = self._try(candidate, name, why)
            if found is not None:
                self.transport, gen_caps = found
                #: ``imp.reg_mem``: the TEE can share client pages (``TEE_GEN_CAP_REG_MEM``).
                self.reg_mem = bool(gen_caps & uapi.TEE_GEN_CAP_REG_MEM)
                #: ``imp.memref_null``: a NULL memref can be sent (``TEE_GEN_CAP_MEMREF_NULL``).
                self.memref_null = bool(gen_caps & uapi.TEE_GEN_CAP_MEMREF_NULL)
                return
        detail = f"no TEE device matches {name!r}" if name is not None else "no GP TEE device"
        raise _api(
            TeecResult.TEEC_ERROR_ITEM_NOT_FOUND, "; ".join([detail, *why]) if why else detail
        )

    @staticmethod
    def _try(candidate: object, name: str | None, why: list[str]) -> tuple[GpTransport, int] | None:
        """``teec_open_dev``: the transport and its gen caps if it qualifies (else why
        not, in ``why`` when there is more to say than its caps)."""
        try:
            transport = _as_transport(candidate)
        except _Unqualified as exc:
            why.append(str(exc))
            return None
        try:
            impl_id, impl_caps, gen_caps = transport.version()
        except DriverError as exc:
            log.info("TEE_IOC_VERSION failed: %s", exc)
            gen_caps = impl_id = impl_caps = 0
        except BaseException:
            transport.close()
            raise
        ok = bool(gen_caps & uapi.TEE_GEN_CAP_GP)  # only GP TEEs
        if ok and name is not None:
            ok = (
                name == _OPTEE_TZ
                and impl_id == uapi.TEE_IMPL_ID_OPTEE
                and bool(impl_caps & uapi.TEE_OPTEE_CAP_TZ)
            )
        if not ok:
            transport.close()
            return None
        return transport, gen_caps

    # ------------------------------------------------------------------ lifetime
    def finalize(self) -> None:
        """``TEEC_FinalizeContext``: close the device.  Idempotent.

        The kernel closes every session still open on it and frees its shms; the
        :class:`TeecSession` and :class:`TeecSharedMemory` objects become closed and
        released.
        """
        with self._lock:
            if self.closed:
                return
            self.closed = True
            sessions, self._sessions = list(self._sessions), set()
            shms, self._shms = list(self._shms), set()
        for session in sessions:
            session._dropped()
        for shm in shms:
            shm._dropped()
        self.transport.close()

    def __enter__(self) -> TeecContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finalize()

    # ------------------------------------------------------------------ shared memory
    def allocate_shared_memory(self, size: int, flags: int) -> TeecSharedMemory:
        """``TEEC_AllocateSharedMemory`` (see :meth:`TeecSharedMemory.allocate`)."""
        return TeecSharedMemory.allocate(self, size, flags)

    def register_shared_memory(
        self, buffer: bytearray | memoryview | bytes, flags: int, size: int | None = None
    ) -> TeecSharedMemory:
        """``TEEC_RegisterSharedMemory`` (see :meth:`TeecSharedMemory.register`)."""
        return TeecSharedMemory.register(self, buffer, flags, size)

    def _track_shm(self, shm: TeecSharedMemory) -> None:
        with self._lock:
            closed = self.closed
            if not closed:
                self._shms.add(shm)
        if closed:  # finalized while it was being made: the kernel already freed it
            shm._dropped()

    def _forget_shm(self, shm: TeecSharedMemory, shm_id: int) -> None:
        with self._lock:
            self._shms.discard(shm)
            if self.closed:
                return
        try:
            self.transport.shm_free(shm_id)
        except DriverError as exc:
            log.warning("freeing shm %d failed: %s", shm_id, exc)

    def _temp_shm(self, size: int) -> _TempShm:
        """A temporary shm for a temp memref (libteec's per-call register or allocate)."""
        if size > _MAX_ALLOC:
            raise _api(TeecResult.TEEC_ERROR_OUT_OF_MEMORY, f"cannot share {size} bytes")
        try:
            if self.reg_mem:
                return _TempShm(*_register_pages(self.transport, size))
            return _TempShm(*self.transport.shm_alloc(size))
        except DriverError as exc:
            code = _shm_failure(exc, self.reg_mem)
            raise _api(code, f"temporary shared memory: {exc}") from exc
        except MemoryError as exc:
            raise _api(TeecResult.TEEC_ERROR_OUT_OF_MEMORY, "temporary shared memory") from exc

    def _free_temp(self, temp: _TempShm) -> None:
        if self.closed:
            return
        try:
            self.transport.shm_free(temp.id)
        except DriverError as exc:
            log.warning("freeing temporary shm %d failed: %s", temp.id, exc)

    # ------------------------------------------------------------------ sessions
    def open_session(
        self,
        uuid: uuidlib.UUID | bytes,
        login: int = TeecLogin.TEEC_LOGIN_PUBLIC,
        connection_data: int | None = None,
        operation: TeecOperation | None = None,
    ) -> TeecSession:
        """``TEEC_OpenSession``: a session with the TA ``uuid``.

        ``login`` is the ``TEEC_LOGIN_*`` connection method; for GROUP and
        GROUP_APPLICATION ``connection_data`` is the gid (libteec copies the ``gid_t``
        into ``clnt_uuid``), for the others it is ignored.  An OpenSession cannot be
        cancelled through libteec (``cancel_id`` 0, the operation's session not set).
        Raises :class:`TeecError`; on SUCCESS the session's ``origin`` is the return
        origin, a :class:`TeecOrigin` (TRUSTED_APP when the TA ran).
        """
        if isinstance(uuid, uuidlib.UUID):
            uuid16 = uuid.bytes
        elif isinstance(uuid, bytes | bytearray) and len(uuid) == 16:
            uuid16 = bytes(uuid)
        else:
            raise UsageError(f"a TA UUID is a uuid.UUID or 16 bytes, not {uuid!r}")
        if not _is_int(login) or not 0 <= login <= _U32:
            raise UsageError(f"a connection method is a u32, not {login!r}")
        clnt = bytes(16)
        if login in (TeecLogin.TEEC_LOGIN_GROUP, TeecLogin.TEEC_LOGIN_GROUP_APPLICATION):
            if connection_data is None:
                raise _bad("a GROUP login needs the gid as connection data")
            clnt = gid_connection_data(connection_data)
        transport = self.transport
        call = _Call(self, operation)
        opened: list[TeecSession] = []

        def ioctl(params: list[uapi.Param]) -> tuple[int, int, list[uapi.Param]]:
            sid, ret, origin, back = transport.open_session(uuid16, clnt, login, 0, params)
            if ret == TeecResult.TEEC_SUCCESS:
                opened.append(self._adopt(sid, origin))
            return ret, origin, back

        call.run(ioctl)
        return opened[0]

    def _adopt(self, session_id: int, origin: int) -> TeecSession:
        session = TeecSession(self, session_id, origin)
        with self._lock:
            if not self.closed:
                self._sessions.add(session)
                return session
        session._dropped()  # finalized meanwhile: the kernel closed it with the fd
        return session

    def _forget(self, session: TeecSession) -> bool:
        """Drop a closing session; False if the context is already finalized."""
        with self._lock:
            self._sessions.discard(session)
            return not self.closed

    def request_cancellation(self, operation: TeecOperation) -> None:
        """``TEEC_RequestCancellation``: cancel the invoke ``operation`` was last used with.

        Issues ``TEE_IOC_CANCEL {session, cancel_id=0}`` on that session's own context;
        an operation never passed to :meth:`TeecSession.invoke_command` is not cancelled
        (libteec never records an OpenSession's).  The outcome shows in the invoke's
        result (typically ``TEEC_ERROR_CANCEL`` from a TA that unmasked cancellation);
        an ioctl error is only logged, as libteec does.
        """
        with _teec_mutex:
            session = operation._session
        if session is None:
            return
        ctx = session.context
        if ctx.closed:
            return
        try:
            ctx.transport.cancel(session.session_id, 0)
        except DriverError as exc:
            log.warning("TEE_IOC_CANCEL failed: %s", exc)

    def __repr__(self) -> str:
        state = "finalized" if self.closed else f"sessions={len(self._sessions)}"
        return f"<TeecContext {state}>"


class TeecSession:
    """``TEEC_Session``: an open session (``session_id`` 0 once closed).

    ``origin`` is the return origin of the OpenSession that made it.
    """

    __slots__ = ("__weakref__", "_lock", "context", "origin", "session_id")

    def __init__(self, context: TeecContext, session_id: int, origin: int) -> None:
        self.context = context
        self.session_id = session_id
        #: The return origin of the OpenSession that made it (a :class:`TeecOrigin`
        #: when it is a known one, as a :class:`TeecError`'s ``origin`` is).
        self.origin = _known(TeecOrigin, origin)
        self._lock = threading.Lock()

    def invoke_command(self, command_id: int, operation: TeecOperation | None = None) -> int:
        """``TEEC_InvokeCommand``: run ``command_id`` in the TA; returns the return origin
        (a :class:`TeecOrigin` when it is a known one; a failure is a :class:`TeecError`
        with its own).

        Records the session in ``operation`` first (under libteec's mutex) so that
        :meth:`TeecContext.request_cancellation` can reach this call.  On a closed session
        the ioctl goes out with session 0, which the driver refuses (EINVAL:
        BAD_PARAMETERS, origin COMMS), as it refuses a closed session's id.
        """
        if not _is_int(command_id) or not 0 <= command_id <= _U32:
            raise UsageError(f"a command id is a u32, not {command_id!r}")
        if operation is not None:
            with _teec_mutex:
                operation._session = self
        ctx = self.context
        transport = ctx.transport
        session_id = self.session_id

        def ioctl(params: list[uapi.Param]) -> tuple[int, int, list[uapi.Param]]:
            return transport.invoke(session_id, command_id, 0, params)

        return _Call(ctx, operation).run(ioctl)

    def close(self) -> None:
        """``TEEC_CloseSession``: idempotent; an ioctl error is only logged."""
        with self._lock:
            session_id, self.session_id = self.session_id, 0
        if not session_id or not self.context._forget(self):
            return
        try:
            self.context.transport.close_session(session_id)
        except DriverError as exc:
            log.warning("TEE_IOC_CLOSE_SESSION %#x failed: %s", session_id, exc)

    def _dropped(self) -> None:
        with self._lock:
            self.session_id = 0

    def __enter__(self) -> TeecSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<TeecSession {self.session_id:#x}>" if self.session_id else "<TeecSession closed>"
