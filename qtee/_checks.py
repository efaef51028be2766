"""Argument checks the kernel makes before any object is touched (pure, no side effects).

These are the errno rows that fail an ioctl early: the TEE core's buf_data size rules
(``tee_core.c``), the attr checks of ``params_from_user``, qcomtee's
``qcomtee_params_check`` and ``qcomtee_root_object_check``.  Each raises
:class:`objects.DriverError` (EINVAL) and changes nothing, so the driver model can call
them before it takes a reference.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Sequence
from typing import Final

from objects import DriverError
from qtee import uapi
from qtee.addrspace import TASK_SIZE, AddressSpace

__all__ = [
    "QCOMTEE_ARGS_MAX",
    "QCOMTEE_ARGS_PER_TYPE",
    "QCOMTEE_ROOT_OP_ADCI_ACCEPT",
    "QCOMTEE_ROOT_OP_ADCI_SHUTDOWN",
    "QCOMTEE_ROOT_OP_NOTIFY_DOMAIN_CHANGE",
    "QCOMTEE_ROOT_OP_REG_WITH_CREDENTIALS",
    "WRITES_STRUCT",
    "check_buf_len",
    "check_param_attrs",
    "need_arg",
    "read_buf_block",
    "params_check",
    "root_object_check",
]


QCOMTEE_ARGS_PER_TYPE: Final = 16
QCOMTEE_ARGS_MAX: Final = 4 * QCOMTEE_ARGS_PER_TYPE

QCOMTEE_ROOT_OP_NOTIFY_DOMAIN_CHANGE: Final = 4
QCOMTEE_ROOT_OP_REG_WITH_CREDENTIALS: Final = 5
QCOMTEE_ROOT_OP_ADCI_ACCEPT: Final = 8
QCOMTEE_ROOT_OP_ADCI_SHUTDOWN: Final = 9

_QCOMTEE_TYPES: Final = frozenset(
    {
        uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_INPUT,
        uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_OUTPUT,
        uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_INPUT,
        uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_OUTPUT,
    }
)


#: A param as a record or as the driver's raw ``(attr, a, b, c)`` tuple.
ParamLike = uapi.Param | tuple[int, int, int, int]


def _einval(why: str) -> DriverError:
    return DriverError(errno.EINVAL, why)


def _attr(p: ParamLike) -> int:
    return p[0] if isinstance(p, tuple) else p.attr


def _a(p: ParamLike) -> int:
    return p[1] if isinstance(p, tuple) else p.a


_BUF: Final = uapi.BUF_DATA_STRUCT
_BUF_SIZE: Final = _BUF.size
_U32: Final = struct.Struct("<I")
_MAX_ARG_SIZE: Final = uapi.TEE_MAX_ARG_SIZE
_PARAM: Final = uapi.PARAM_STRUCT
_UBUF_TYPES: Final = frozenset(
    {
        uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_INPUT,
        uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_OUTPUT,
        uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_INOUT,
    }
)


#: The ioctls whose own struct the TEE core writes back (``copy_to_user``): for them a
#: read-only struct is EFAULT.  Every other ioctl only reads its struct (a buf_data, a
#: cancel or close-session arg), so a read-only one works, as with the kernel.
WRITES_STRUCT: Final = frozenset(
    {
        uapi.TEE_IOC_VERSION,
        uapi.TEE_IOC_SHM_ALLOC,
        uapi.TEE_IOC_SHM_REGISTER,
        uapi.TEE_IOC_SHM_REGISTER_FD,
    }
)


def need_arg(arg: object, size: int, *, writable: bool = True) -> bytes | bytearray | memoryview:
    """The ioctl's own struct: ``size`` bytes, writable when the ioctl writes its struct
    back, else EFAULT before anything happens (``copy_from_user``/``copy_to_user``).

    A bytearray, or a one-dimensional byte memoryview that is not released; when the
    ioctl only reads its struct, a read-only one too (``bytes``, a read-only view).
    Anything else is a bad pointer: EFAULT, saying what it was."""
    if isinstance(arg, bytearray):
        if len(arg) >= size:
            return arg
        raise DriverError(errno.EFAULT, f"ioctl argument is {len(arg)} bytes, the struct {size}")
    if isinstance(arg, bytes):
        if writable:
            raise DriverError(
                errno.EFAULT, "ioctl argument is read-only (bytes): this ioctl writes it back"
            )
        if len(arg) >= size:
            return arg
        raise DriverError(errno.EFAULT, f"ioctl argument is {len(arg)} bytes, the struct {size}")
    if isinstance(arg, memoryview):
        try:
            usable = arg.ndim == 1 and arg.itemsize == 1 and arg.c_contiguous
            readonly = arg.readonly
        except ValueError:  # a released memoryview
            raise DriverError(errno.EFAULT, "ioctl argument is a released memoryview") from None
        if not usable:
            raise DriverError(errno.EFAULT, "ioctl argument is not a flat view of bytes")
        if writable and readonly:
            raise DriverError(
                errno.EFAULT, "ioctl argument is a read-only view: this ioctl writes it back"
            )
        if len(arg) >= size:
            return arg
        raise DriverError(errno.EFAULT, f"ioctl argument is {len(arg)} bytes, the struct {size}")
    raise DriverError(errno.EFAULT, f"ioctl argument must be a buffer, not {type(arg).__name__}")


def read_buf_block(
    memory: AddressSpace,
    arg: bytearray | memoryview,
    head_size: int,
    np_at: int,
    *,
    exact: bool = True,
) -> tuple[int, bytes, list[tuple[int, int, int, int]]]:
    """The TEE core's half of a buf_data ioctl: copy the block in, check its size, then each
    param in order (attr bits and type, ``access_ok`` of UBUF ranges).

    Returns ``buf_ptr``, the block and its params as ``(attr, a, b, c)`` tuples;
    ``np_at`` is where ``num_params`` sits in the header.
    """
    # A bytearray that holds the struct is the usual arg: need_arg checks the others.
    fits = type(arg) is bytearray and len(arg) >= _BUF_SIZE
    buf_ptr, buf_len = _BUF.unpack_from(arg if fits else need_arg(arg, _BUF_SIZE, writable=False))
    if buf_len > _MAX_ARG_SIZE or buf_len < head_size:
        raise _einval(f"buf_len {buf_len}")
    block = memory.read(buf_ptr, buf_len)
    (num,) = _U32.unpack_from(block, np_at)
    end = head_size + 32 * num
    if (buf_len != end) if exact else (buf_len < end):
        check_buf_len(buf_len, head_size, num, exact=exact)
    params = list(_PARAM.iter_unpack(block[head_size:end])) if num else []
    for attr, a, b, _c in params:
        if attr & ~uapi.TEE_IOCTL_PARAM_ATTR_MASK or attr & 0xFF not in uapi.VALID_PARAM_TYPES:
            check_param_attrs(params)
        if a + b > TASK_SIZE and attr & 0xFF in _UBUF_TYPES:
            memory.check(a, b)  # access_ok fails: EFAULT
    return buf_ptr, block, params


def check_buf_len(buf_len: int, header: int, num_params: int, *, exact: bool = True) -> None:
    """The TEE core's size rule for a buf_data ioctl (qtee-kernel.md §1.5).

    ``buf_len`` must lie in ``[header, TEE_MAX_ARG_SIZE]`` and equal
    ``header + 32 * num_params`` (OBJECT_INVOKE, SUPPL_RECV) or be at least that
    (SUPPL_SEND, ``exact=False``).
    """
    if buf_len > uapi.TEE_MAX_ARG_SIZE or buf_len < header:
        raise _einval(f"buf_len {buf_len} outside [{header}, {uapi.TEE_MAX_ARG_SIZE}]")
    need = header + uapi.Param.SIZE * num_params
    if (buf_len != need) if exact else (buf_len < need):
        rel = "!=" if exact else "<"
        raise _einval(f"buf_len {buf_len} {rel} {header} + 32 * {num_params} params")


def check_param_attrs(params: Sequence[ParamLike]) -> None:
    """``params_from_user``: attr bits outside 0x1FF or an undefined type -> EINVAL."""
    for i, p in enumerate(params):
        attr = _attr(p)
        if attr & ~uapi.TEE_IOCTL_PARAM_ATTR_MASK:
            raise _einval(f"param {i}: attr {attr:#x} has bits outside 0x1ff")
        if attr & uapi.TEE_IOCTL_PARAM_ATTR_TYPE_MASK not in uapi.VALID_PARAM_TYPES:
            raise _einval(f"param {i}: attr type {attr & 0xFF} is undefined")


def params_check(params: Sequence[ParamLike]) -> tuple[int, int, int, int]:
    """``qcomtee_params_check``: at most 64 params, only UBUF/OBJREF INPUT/OUTPUT, at most
    16 of a type (the kernel's limit; only 15 fit the wire's nibble, spec §7).

    Returns the counts (IB, OB, IO, OO).
    """
    if len(params) > QCOMTEE_ARGS_MAX:
        raise _einval(f"{len(params)} params, at most {QCOMTEE_ARGS_MAX}")
    counts = dict.fromkeys(_QCOMTEE_TYPES, 0)
    for i, p in enumerate(params):
        attr = _attr(p)
        if attr not in _QCOMTEE_TYPES:  # META bit, NONE, VALUE, MEMREF, INOUT
            raise _einval(f"param {i}: attr {attr:#x} is not UBUF/OBJREF INPUT/OUTPUT")
        counts[attr] += 1
    ib = counts[uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_INPUT]
    ob = counts[uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_OUTPUT]
    io = counts[uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_INPUT]
    oo = counts[uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_OUTPUT]
    if max(ib, ob, io, oo) > QCOMTEE_ARGS_PER_TYPE:
        raise _einval(f"more than {QCOMTEE_ARGS_PER_TYPE} params of a type")
    return ib, ob, io, oo


def root_object_check(op: int, params: Sequence[ParamLike]) -> None:
    """``qcomtee_root_object_check`` for a userspace invoke of the root (spec §2.5).

    Ops 4, 8 and 9 are privileged; op 5 with exactly ``[OBJREF_INPUT NULL,
    OBJREF_OUTPUT]`` would register a NULL credential (kernel-only).  Anything else
    passes through to QTEE.
    """
    if op in (
        QCOMTEE_ROOT_OP_NOTIFY_DOMAIN_CHANGE,
        QCOMTEE_ROOT_OP_ADCI_ACCEPT,
        QCOMTEE_ROOT_OP_ADCI_SHUTDOWN,
    ):
        raise _einval(f"root op {op} is privileged")
    if (
        op == QCOMTEE_ROOT_OP_REG_WITH_CREDENTIALS
        and len(params) == 2
        and _attr(params[0]) == uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_INPUT
        and _attr(params[1]) == uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_OUTPUT
        and _a(params[0]) == uapi.TEE_OBJREF_NULL
    ):
        raise _einval("root op 5 with a NULL credentials object is kernel-only")
