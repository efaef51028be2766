"""libteec's parameter pre- and post-processing, as pure functions over plain data.

``TEEC_OpenSession`` and ``TEEC_InvokeCommand`` always send four kernel params
``{attr, a, b, c}``.  Before the ioctl, libteec turns each ``TEEC_Parameter`` into one
(``teec_pre_process_operation``): values copy ``a``/``b``; memrefs give ``a`` = offset,
``b`` = size, ``c`` = shm id.  Any failure there is ``TEEC_ERROR_BAD_PARAMETERS`` with
origin API and no ioctl is made.  After a *successful* ioctl -- whatever ``ret`` says, so
that a ``TEEC_ERROR_SHORT_BUFFER`` reports the size it needs -- libteec writes output
values and sizes back into the operation (``teec_post_process_operation``) and copies
shadow buffers back to the client's memory.

Here that is two steps with no memory in them: :func:`pre_process_param` gives a kernel
:class:`~qtee.uapi.Param`, or a :class:`NeedTempShm` telling the caller to register or
allocate a temporary shared memory first; :func:`post_process_param` gives what to write
back and how many bytes of the shadow to copy.  Unlike libteec, all four params are
checked before the caller allocates anything, so a bad param 3 never costs a temporary
shm for param 0 (libteec allocates it and frees it again; nothing observable differs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

from objects import UsageError
from qtee.gp._defs import (
    _U32,
    TEEC_CONFIG_PAYLOAD_REF_COUNT,
    TeecError,
    TeecMemFlag,
    TeecOrigin,
    TeecParamType,
    TeecParamTypeError,
    TeecResult,
    param_type_get,
)
from qtee.uapi import (
    TEE_IOCTL_PARAM_ATTR_TYPE_MEMREF_INOUT,
    TEE_IOCTL_PARAM_ATTR_TYPE_MEMREF_INPUT,
    TEE_IOCTL_PARAM_ATTR_TYPE_MEMREF_OUTPUT,
    TEE_MEMREF_NULL,
    Param,
)

__all__ = [
    "SIZE_MAX",
    "MemrefUpdate",
    "NeedTempShm",
    "RegisteredMemref",
    "SharedMemory",
    "TeecParam",
    "TempMemref",
    "Value",
    "ValueUpdate",
    "check_partial_bounds",
    "post_process_operation",
    "post_process_param",
    "pre_process_operation",
    "pre_process_param",
]

_U64: Final = 0xFFFF_FFFF_FFFF_FFFF
_S32_MIN: Final = -(1 << 31)
_S32_MAX: Final = (1 << 31) - 1

#: ``SIZE_MAX`` of an LP64 client (``size_t`` is 64 bits).
SIZE_MAX: Final = _U64

_T = TeecParamType
_IN = TeecMemFlag.TEEC_MEM_INPUT
_OUT = TeecMemFlag.TEEC_MEM_OUTPUT

_VALUE_TYPES: Final = frozenset({_T.TEEC_VALUE_INPUT, _T.TEEC_VALUE_OUTPUT, _T.TEEC_VALUE_INOUT})
_TEMP: Final[dict[TeecParamType, tuple[int, TeecMemFlag]]] = {
    _T.TEEC_MEMREF_TEMP_INPUT: (TEE_IOCTL_PARAM_ATTR_TYPE_MEMREF_INPUT, _IN),
    _T.TEEC_MEMREF_TEMP_OUTPUT: (TEE_IOCTL_PARAM_ATTR_TYPE_MEMREF_OUTPUT, _OUT),
    _T.TEEC_MEMREF_TEMP_INOUT: (TEE_IOCTL_PARAM_ATTR_TYPE_MEMREF_INOUT, _IN | _OUT),
}
_PARTIAL: Final[dict[TeecParamType, tuple[int, TeecMemFlag]]] = {
    _T.TEEC_MEMREF_PARTIAL_INPUT: (TEE_IOCTL_PARAM_ATTR_TYPE_MEMREF_INPUT, _IN),
    _T.TEEC_MEMREF_PARTIAL_OUTPUT: (TEE_IOCTL_PARAM_ATTR_TYPE_MEMREF_OUTPUT, _OUT),
    _T.TEEC_MEMREF_PARTIAL_INOUT: (TEE_IOCTL_PARAM_ATTR_TYPE_MEMREF_INOUT, _IN | _OUT),
}


def _check(value: object, lo: int, hi: int, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise UsageError(f"{what}={value} is out of range {lo}..{hi}")


def _bad(detail: str) -> TeecError:
    return TeecError(TeecResult.TEEC_ERROR_BAD_PARAMETERS, TeecOrigin.TEEC_ORIGIN_API, detail)


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class SharedMemory:
    """A registered or allocated ``TEEC_SharedMemory`` as libteec sees it.

    ``id`` is the kernel's shm id (an ``int``; libteec stores it sign-extended into the
    u64 ``c``), ``size`` the client-visible size, ``flags`` its ``TEEC_MEM_*`` bits.
    """

    id: int
    size: int
    flags: int

    def __post_init__(self) -> None:
        _check(self.id, _S32_MIN, _S32_MAX, "SharedMemory.id")
        _check(self.size, 0, SIZE_MAX, "SharedMemory.size")
        _check(self.flags, 0, _U32, "SharedMemory.flags")


@dataclass(frozen=True, slots=True)
class Value:
    """``TEEC_Value``: two u32."""

    a: int = 0
    b: int = 0

    def __post_init__(self) -> None:
        _check(self.a, 0, _U32, "Value.a")
        _check(self.b, 0, _U32, "Value.b")


@dataclass(frozen=True, slots=True)
class TempMemref:
    """``TEEC_TempMemoryReference``: ``size`` bytes of client memory; ``null`` if buffer is NULL."""

    size: int
    null: bool = False

    def __post_init__(self) -> None:
        _check(self.size, 0, SIZE_MAX, "TempMemref.size")


@dataclass(frozen=True, slots=True)
class RegisteredMemref:
    """``TEEC_RegisteredMemoryReference``: a window on ``parent`` (WHOLE ignores offset, size)."""

    parent: SharedMemory
    offset: int = 0
    size: int = 0

    def __post_init__(self) -> None:
        _check(self.offset, 0, SIZE_MAX, "RegisteredMemref.offset")
        _check(self.size, 0, SIZE_MAX, "RegisteredMemref.size")


#: One ``TEEC_Parameter`` (a C union; ``None`` stands for an unused slot).
TeecParam = Value | TempMemref | RegisteredMemref | None


@dataclass(frozen=True, slots=True)
class NeedTempShm:
    """A temp memref needs a temporary shm before its kernel param can be built.

    ``register`` True: libteec registers the client's buffer (``TEEC_RegisterSharedMemory``
    with ``flags``), falling back to a shadow copy.  False: the buffer is NULL with size 0
    on a TEE without ``TEE_GEN_CAP_MEMREF_NULL``, and libteec allocates a dummy shm
    (``TEEC_AllocateSharedMemory``) instead.  Either way a size of 0 becomes 8 bytes
    internally (:attr:`alloc_size`), while the param still says 0.  The shm is freed after
    the call.
    """

    attr: int
    size: int
    flags: TeecMemFlag
    register: bool

    @property
    def alloc_size(self) -> int:
        """What libteec registers or allocates: ``size``, or 8 when ``size`` is 0."""
        return self.size or 8

    def param(self, shm_id: int) -> Param:
        """The kernel param once the temporary shm exists: offset 0, ``size``, its id."""
        _check(shm_id, _S32_MIN, _S32_MAX, "shm_id")
        return Param(self.attr, 0, self.size, shm_id & _U64)


# ----------------------------------------------------------------------------- pre-process


def check_partial_bounds(
    offset: int, size: int, parent_size: int, *, size_max: int = SIZE_MAX
) -> None:
    """libteec's PARTIAL check in ``size_t`` arithmetic (``size_max`` = ``SIZE_MAX``).

    ``offset + size`` wraps modulo ``size_max + 1`` as in C; a wrapped sum (smaller than
    ``offset``) or one beyond ``parent_size`` is ``TEEC_ERROR_BAD_PARAMETERS``.
    """
    end = (offset + size) & size_max
    if end < offset:
        raise _bad(f"memref offset {offset:#x} + size {size:#x} overflows size_t")
    if end > parent_size:
        raise _bad(
            f"memref offset {offset:#x} + size {size:#x} is beyond its parent's {parent_size:#x}"
        )


_P = TypeVar("_P", Value, TempMemref, RegisteredMemref)


def _as(kind: type[_P], param: TeecParam, ptype: TeecParamType) -> _P:
    if not isinstance(param, kind):
        raise UsageError(f"{ptype.name} needs a {kind.__name__}, not {param!r}")
    return param


def _type_of(param_type: int, index: int) -> TeecParamType:
    if not isinstance(param_type, int) or isinstance(param_type, bool):
        raise TypeError(f"param type must be an int, not {type(param_type).__name__}")
    try:
        return TeecParamType(param_type)
    except ValueError:
        raise TeecParamTypeError(index, param_type) from None


def pre_process_param(
    param_type: int, param: TeecParam, *, memref_null: bool = False, index: int = 0
) -> Param | NeedTempShm:
    """One ``TEEC_Parameter`` -> its kernel param (``teec_pre_process_operation``).

    ``memref_null`` is the context's ``TEE_GEN_CAP_MEMREF_NULL``.  Raises
    :class:`TeecError` (BAD_PARAMETERS, origin API) exactly where libteec fails; an
    unknown type is a :class:`TeecParamTypeError` naming ``index``.
    """
    ptype = _type_of(param_type, index)
    if ptype == _T.TEEC_NONE:
        return Param(0)
    if ptype in _VALUE_TYPES:
        value = _as(Value, param, ptype)
        return Param(int(ptype), value.a, value.b, 0)
    if ptype in _TEMP:
        tmp = _as(TempMemref, param, ptype)
        attr, flags = _TEMP[ptype]
        if not tmp.null:
            return NeedTempShm(attr, tmp.size, flags, register=True)
        if tmp.size:
            raise _bad(f"{ptype.name} with a NULL buffer and size {tmp.size}")
        if memref_null:
            return Param(attr, 0, 0, TEE_MEMREF_NULL)
        return NeedTempShm(attr, 0, flags, register=False)
    memref = _as(RegisteredMemref, param, ptype)
    parent = memref.parent
    if ptype == _T.TEEC_MEMREF_WHOLE:
        flags = parent.flags & (_IN | _OUT)
        if flags == _IN | _OUT:
            attr = TEE_IOCTL_PARAM_ATTR_TYPE_MEMREF_INOUT
        elif flags & _IN:
            attr = TEE_IOCTL_PARAM_ATTR_TYPE_MEMREF_INPUT
        elif flags & _OUT:
            attr = TEE_IOCTL_PARAM_ATTR_TYPE_MEMREF_OUTPUT
        else:
            raise _bad(f"TEEC_MEMREF_WHOLE on a shm with flags {parent.flags:#x}")
        return Param(attr, 0, parent.size, parent.id & _U64)
    attr, need = _PARTIAL[ptype]
    if parent.flags & need != need:
        raise _bad(f"{ptype.name} on a shm with flags {parent.flags:#x}")
    check_partial_bounds(memref.offset, memref.size, parent.size)
    return Param(attr, memref.offset, memref.size, parent.id & _U64)


def _four(params: Sequence[TeecParam]) -> tuple[TeecParam, ...]:
    if len(params) > TEEC_CONFIG_PAYLOAD_REF_COUNT:
        raise UsageError(f"at most {TEEC_CONFIG_PAYLOAD_REF_COUNT} params, not {len(params)}")
    return (*params, *(None,) * (TEEC_CONFIG_PAYLOAD_REF_COUNT - len(params)))


def pre_process_operation(
    param_types: int | None, params: Sequence[TeecParam] = (), *, memref_null: bool = False
) -> tuple[Param | NeedTempShm, ...]:
    """A whole ``TEEC_Operation`` -> the four kernel params, first failure raising.

    ``param_types`` None is a NULL operation: four NONE params.
    """
    if param_types is None:
        return (Param(0),) * TEEC_CONFIG_PAYLOAD_REF_COUNT
    slots = _four(params)
    return tuple(
        pre_process_param(
            param_type_get(param_types, n), slots[n], memref_null=memref_null, index=n
        )
        for n in range(TEEC_CONFIG_PAYLOAD_REF_COUNT)
    )


# ----------------------------------------------------------------------------- post-process


@dataclass(frozen=True, slots=True)
class ValueUpdate:
    """Write ``a``, ``b`` into ``params[n].value`` (the u64s truncated to u32, as C does)."""

    a: int
    b: int


@dataclass(frozen=True, slots=True)
class MemrefUpdate:
    """Set the memref's ``size``; copy ``copy_length`` shadow bytes at ``copy_offset`` back.

    ``copy_offset`` is the same in the shadow and in the client's buffer (0 for temp and
    WHOLE, the memref's offset for PARTIAL).  ``copy_length`` 0 means copy nothing.
    """

    size: int
    copy_offset: int = 0
    copy_length: int = 0


def post_process_param(
    param_type: int, param: TeecParam, returned: Param, *, shadow: bool = False, index: int = 0
) -> ValueUpdate | MemrefUpdate | None:
    """What libteec writes back for one param after the ioctl succeeded (any ``ret``).

    ``returned`` is the kernel param as the ioctl left it; ``shadow`` whether the shm
    behind the param (the temporary one, or the parent) is a shadow buffer.  None: nothing
    is written (NONE, VALUE_INPUT, the ``*_INPUT`` memrefs, WHOLE on an input-only shm).
    """
    ptype = _type_of(param_type, index)
    if ptype in (_T.TEEC_VALUE_OUTPUT, _T.TEEC_VALUE_INOUT):
        return ValueUpdate(returned.a & _U32, returned.b & _U32)
    if ptype in (_T.TEEC_MEMREF_TEMP_OUTPUT, _T.TEEC_MEMREF_TEMP_INOUT):
        tmp = _as(TempMemref, param, ptype)
        copy = min(returned.b, tmp.size) if shadow and not tmp.null else 0
        return MemrefUpdate(returned.b, 0, copy)
    if ptype == _T.TEEC_MEMREF_WHOLE:
        memref = _as(RegisteredMemref, param, ptype)
        if not memref.parent.flags & _OUT:
            return None
        copy = returned.b if shadow and returned.b <= memref.parent.size else 0
        return MemrefUpdate(returned.b, 0, copy)
    if ptype in (_T.TEEC_MEMREF_PARTIAL_OUTPUT, _T.TEEC_MEMREF_PARTIAL_INOUT):
        memref = _as(RegisteredMemref, param, ptype)
        copy = returned.b if shadow and returned.b <= memref.size else 0
        return MemrefUpdate(returned.b, memref.offset, copy)
    return None


def post_process_operation(
    param_types: int | None,
    params: Sequence[TeecParam],
    returned: Sequence[Param],
    *,
    shadow: Sequence[bool] = (),
) -> tuple[ValueUpdate | MemrefUpdate | None, ...]:
    """:func:`post_process_param` for all four slots (a NULL operation: nothing)."""
    if param_types is None:
        return (None,) * TEEC_CONFIG_PAYLOAD_REF_COUNT
    if len(returned) != TEEC_CONFIG_PAYLOAD_REF_COUNT:
        raise UsageError(f"the kernel returns {TEEC_CONFIG_PAYLOAD_REF_COUNT} params")
    slots = _four(params)
    shadows = (*shadow, *(False,) * (TEEC_CONFIG_PAYLOAD_REF_COUNT - len(shadow)))
    return tuple(
        post_process_param(
            param_type_get(param_types, n), slots[n], returned[n], shadow=shadows[n], index=n
        )
        for n in range(TEEC_CONFIG_PAYLOAD_REF_COUNT)
    )
