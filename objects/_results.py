"""Result codes of the object protocol: the generic ones, their two forms, their names.

Every invocation answers a signed 32-bit result: 0 is success, 1..4 are the generic
errors any object may answer (Mink's ``Object_ERROR*``), 10 and up are defined by the
interface (IDL errors).  A transport adds codes of its own (negative ones) and names
them by passing its enum to :func:`register_results`.  Where a result crosses as a
``u32`` (two's complement) it is converted at that boundary only: -96 reads 0xFFFFFFA0.
"""

from __future__ import annotations

import enum

__all__ = [
    "ObjectResult",
    "canonical_result",
    "register_results",
    "result_from_u32",
    "result_name",
    "result_to_u32",
]

_U32 = 0xFFFF_FFFF


class ObjectResult(enum.IntEnum):
    """The generic results every object may answer (Mink's ``Object_*`` names)."""

    OK = 0
    ERROR = 1
    ERROR_INVALID = 2
    ERROR_SIZE_IN = 3
    ERROR_SIZE_OUT = 4
    ERROR_USERBASE = 10  # first interface-defined error


#: The result tables that name codes, the most recently registered first.
_TABLES: list[type[enum.IntEnum]] = [ObjectResult]
#: Each known code's member, from the first table that has it.
_MEMBERS: dict[int, enum.IntEnum] = {int(m): m for m in ObjectResult}


def register_results(table: type[enum.IntEnum]) -> None:
    """Name results by ``table`` (a transport's full result enum) from now on: its
    members come back from :func:`result_from_u32` and name results in errors."""
    if not (isinstance(table, type) and issubclass(table, enum.IntEnum)):
        raise TypeError(f"a result table is an IntEnum class, not {table!r}")
    if table in _TABLES:
        return
    for member in table:
        known = _MEMBERS.get(int(member))
        if known is not None and known.name != member.name:
            raise ValueError(
                f"{table.__name__}.{member.name} = {int(member)} is already {known.name}"
            )
    _TABLES.insert(0, table)
    _MEMBERS.update({int(m): m for m in table})


def is_result_member(value: object) -> bool:
    """Whether ``value`` is a member of a registered result table (not an interface's)."""
    return isinstance(value, enum.IntEnum) and type(value) in _TABLES


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
    """``u32`` wire form -> signed result (an int; a registered member when it is a known
    code)."""
    value = _check_int(raw, "raw result")
    if not 0 <= value <= _U32:
        raise ValueError(f"raw result {value:#x} is not an unsigned 32-bit value")
    signed = value - 0x1_0000_0000 if value & 0x8000_0000 else value
    return _MEMBERS.get(signed, signed)


def canonical_result(result: int) -> int:
    """``result`` as the registered member of its code, when it has one."""
    return _MEMBERS.get(result, result)


def result_name(result: int) -> str:
    """A readable name: ``ERROR_UNAVAIL``, ``USERBASE+3`` or the number itself."""
    member = _MEMBERS.get(result)
    if member is not None:
        return member.name
    if result > ObjectResult.ERROR_USERBASE:
        return f"USERBASE+{result - ObjectResult.ERROR_USERBASE}"
    return str(result)
