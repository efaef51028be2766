"""``TEEC_Operation`` and its params, and one call's marshalling: libteec's pre-processing
of the operation into the ioctl's params (temporary shms for temp memrefs, copies into
registered ones), the call, and the post-processing of what came back."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final

from objects import DriverError, UsageError
from qtee import uapi
from qtee.gp._defs import (
    TEEC_CONFIG_PAYLOAD_REF_COUNT,
    TeecError,
    TeecOrigin,
    TeecParamType,
    TeecResult,
    _known,
    param_type_get,
)
from qtee.gp._params import (
    MemrefUpdate,
    NeedTempShm,
    RegisteredMemref,
    TeecParam,
    TempMemref,
    Value,
    ValueUpdate,
    post_process_operation,
    pre_process_operation,
)
from qtee.gp._shared_memory import _IN, TeecSharedMemory
from qtee.gp._teec_errors import _bad, _comms, _is_int
from qtee.secure import _gp_why

if TYPE_CHECKING:
    from qtee.gp._client import TeecContext, TeecSession

__all__ = [
    "TeecOperation",
    "TeecParameter",
    "TeecRegisteredMemoryReference",
    "TeecTempMemoryReference",
    "TeecValue",
]

_T = TeecParamType
_TEMP_OUT_TYPES: Final = frozenset({_T.TEEC_MEMREF_TEMP_OUTPUT, _T.TEEC_MEMREF_TEMP_INOUT})


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
