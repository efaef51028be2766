"""Result codes of the QTEE/Mink object protocol.

QTEE answers every invocation with a signed 32-bit result.  0 is success, 1..4 are
generic errors, 10 and up are defined by the interface (IDL errors), and -90..-103
are transport errors.  The kernel hands the result to userspace as the ``u32 ret``
field of ``TEE_IOC_OBJECT_INVOKE`` (two's complement), so -96 reads 0xFFFFFFA0 there.
qtee keeps results signed and converts only at that boundary.
"""

from __future__ import annotations

import enum

__all__ = [
    "USERSPACE_ONLY_RESULTS",
    "Result",
    "result_from_u32",
    "result_name",
    "result_to_u32",
]

_U32 = 0xFFFF_FFFF


class Result(enum.IntEnum):
    """Result codes under the kernel's ``QCOMTEE_MSG_*`` / Mink ``Object_*`` names."""

    OK = 0
    ERROR = 1
    ERROR_INVALID = 2
    ERROR_SIZE_IN = 3
    ERROR_SIZE_OUT = 4
    ERROR_MEM = 5  # libqcomtee only; not in the kernel's list
    ERROR_USERBASE = 10  # first interface-defined error
    ERROR_DEFUNCT = -90  # object no longer exists
    ERROR_ABORT = -91  # calling thread must exit
    ERROR_BADOBJ = -92  # invalid object context
    ERROR_NOSLOTS = -93  # caller's object table full
    ERROR_MAXARGS = -94  # too many args
    ERROR_MAXDATA = -95  # buffers too large
    ERROR_UNAVAIL = -96  # the request could not be processed
    ERROR_KMEM = -97  # kernel out of memory
    ERROR_REMOTE = -98  # local method sent to a remote object
    ERROR_BUSY = -99  # object is busy
    ERROR_AUTH = -100  # Mink userspace only
    ERROR_REPLAY = -101  # Mink userspace only
    ERROR_MAXREPLAY = -102  # Mink userspace only
    ERROR_TIMEOUT = -103  # callback object invocation timed out


#: Codes that exist in Qualcomm's userspace headers but never come out of the kernel.
USERSPACE_ONLY_RESULTS: frozenset[Result] = frozenset(
    {Result.ERROR_MEM, Result.ERROR_AUTH, Result.ERROR_REPLAY, Result.ERROR_MAXREPLAY}
)


def _check_int(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    return value


def result_to_u32(result: int) -> int:
    """Signed result -> the ``u32`` two's-complement form used on the wire and in ``ret``."""
    value = _check_int(result, "result")
    if not -0x8000_0000 <= value <= 0x7FFF_FFFF:
        raise ValueError(f"result {value} does not fit in a signed 32-bit integer")
    return value & _U32


def result_from_u32(raw: int) -> int:
    """``u32`` wire form -> signed result (an int; a :class:`Result` when it is a known code)."""
    value = _check_int(raw, "raw result")
    if not 0 <= value <= _U32:
        raise ValueError(f"raw result {value:#x} is not an unsigned 32-bit value")
    signed = value - 0x1_0000_0000 if value & 0x8000_0000 else value
    try:
        return Result(signed)
    except ValueError:
        return signed


def result_name(result: int) -> str:
    """A readable name: ``ERROR_UNAVAIL``, ``USERBASE+3`` or the number itself."""
    try:
        return Result(result).name
    except ValueError:
        if result > Result.ERROR_USERBASE:
            return f"USERBASE+{result - Result.ERROR_USERBASE}"
        return str(result)
