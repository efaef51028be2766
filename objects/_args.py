"""Invocation arguments: in/out buffers, in/out objects, and the counts word.

An invocation carries four kinds of argument.  QTEE (and Mink) order them by kind --
every input buffer, then every output buffer, then every input object, then every
output object -- and describe the shape with one ``counts`` word of four nibbles::

    bits 15..12  #OO | bits 11..8  #IO | bits 7..4  #OB | bits 3..0  #IB

Userspace may pass arguments in any order; the kernel groups them by kind, keeping the
relative order within a kind, and maps results back to the original positions.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from objects._errors import DecodeError, UsageError

__all__ = [
    "MAX_ARGS_PER_KIND",
    "Arg",
    "ArgType",
    "Counts",
    "Grouped",
    "InBuffer",
    "InObject",
    "OutBuffer",
    "OutObject",
    "group_args",
]

_BUF_TYPES: Final = (bytearray, memoryview)  # (a tuple: a union is built per call)

#: A nibble holds at most 15 (Mink ``OBJECT_COUNTS_MAX_*``); the kernel's check allows 16.
MAX_ARGS_PER_KIND: Final = 15


class ArgType(enum.IntEnum):
    """The kernel's ``enum qcomtee_arg_type`` (``QCOMTEE_ARG_TYPE_*``)."""

    INV = 0  # terminator
    OB = 1
    OO = 2
    IB = 3
    IO = 4


@dataclass(frozen=True, slots=True)
class InBuffer:
    """An input buffer (IB): bytes copied to the callee."""

    data: bytes

    def __post_init__(self) -> None:
        data: object = self.data
        if not isinstance(data, bytes):
            if not isinstance(data, _BUF_TYPES):
                raise TypeError(f"InBuffer data must be bytes, not {type(data).__name__}")
            object.__setattr__(self, "data", bytes(data))

    kind = ArgType.IB


@dataclass(frozen=True, slots=True)
class OutBuffer:
    """An output buffer (OB) of ``capacity`` bytes; the callee reports the size it wrote."""

    capacity: int

    def __post_init__(self) -> None:
        if not isinstance(self.capacity, int) or isinstance(self.capacity, bool):
            raise TypeError("OutBuffer capacity must be an int")
        if self.capacity < 0:
            raise UsageError(f"OutBuffer capacity must be >= 0, not {self.capacity}")

    kind = ArgType.OB


@dataclass(frozen=True, slots=True)
class InObject:
    """An input object (IO); ``obj`` is None for the NULL object."""

    obj: Any = None

    kind = ArgType.IO


@dataclass(frozen=True, slots=True)
class OutObject:
    """An output object (OO) slot the callee fills in."""

    kind = ArgType.OO


Arg = InBuffer | OutBuffer | InObject | OutObject


@dataclass(frozen=True, slots=True)
class Counts:
    """Number of arguments of each kind; ``pack()`` gives the wire ``counts`` word."""

    ib: int = 0
    ob: int = 0
    io: int = 0
    oo: int = 0

    def __post_init__(self) -> None:
        for name in ("ib", "ob", "io", "oo"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"Counts.{name} must be an int")
            if not 0 <= value <= MAX_ARGS_PER_KIND:
                raise UsageError(
                    f"Counts.{name}={value}: at most {MAX_ARGS_PER_KIND} arguments of a kind"
                )

    @property
    def total(self) -> int:
        """Number of arguments of every kind."""
        return self.ib + self.ob + self.io + self.oo

    @property
    def first_ob(self) -> int:
        """Index of the first OB in the kind-ordered array."""
        return self.ib

    @property
    def first_io(self) -> int:
        """Index of the first IO in the kind-ordered array."""
        return self.ib + self.ob

    @property
    def first_oo(self) -> int:
        """Index of the first OO in the kind-ordered array."""
        return self.ib + self.ob + self.io

    def pack(self) -> int:
        """``IB | OB<<4 | IO<<8 | OO<<12``."""
        return self.ib | self.ob << 4 | self.io << 8 | self.oo << 12

    @classmethod
    def unpack(cls, word: int) -> Counts:
        """Decode a counts word; bits 16..31 must be zero."""
        if not isinstance(word, int) or not 0 <= word <= 0xFFFF_FFFF:
            raise DecodeError(f"counts word {word!r} is not a u32")
        if word >> 16:
            raise DecodeError(f"counts word {word:#010x} has bits set above bit 15")
        counts = _COUNTS_CACHE.get(word)
        if counts is None:
            counts = Counts(word & 0xF, word >> 4 & 0xF, word >> 8 & 0xF, word >> 12 & 0xF)
            _COUNTS_CACHE[word] = counts
        return counts


#: Counts decoded so far, by word (filled as words are seen: all 65,536 at import cost
#: 100 ms of every program's start, the embedded model's in a C program too).
_COUNTS_CACHE: dict[int, Counts] = {}


@dataclass(frozen=True, slots=True)
class Grouped:
    """Arguments regrouped by kind, remembering where each one came from.

    ``order[k]`` is the original position of the k-th argument of the kind-ordered array
    (IB..., OB..., IO..., OO...).
    """

    counts: Counts
    ib: tuple[InBuffer, ...]
    ob: tuple[OutBuffer, ...]
    io: tuple[InObject, ...]
    oo: tuple[OutObject, ...]
    order: tuple[int, ...]

    def scatter(self, values: Sequence[object]) -> list[object]:
        """Put per-argument ``values`` (kind order) back at the original positions."""
        if len(values) != len(self.order):
            raise UsageError(f"scatter needs {len(self.order)} values, got {len(values)}")
        out: list[object] = [None] * len(self.order)
        for value, position in zip(values, self.order, strict=True):
            out[position] = value
        return out


def group_args(args: Sequence[Arg]) -> Grouped:
    """Group ``args`` by kind (stable within a kind); at most 15 of a kind."""
    ib: list[InBuffer] = []
    ob: list[OutBuffer] = []
    io: list[InObject] = []
    oo: list[OutObject] = []
    pos: tuple[list[int], list[int], list[int], list[int]] = ([], [], [], [])
    for i, arg in enumerate(args):
        if isinstance(arg, InBuffer):
            ib.append(arg)
            pos[0].append(i)
        elif isinstance(arg, OutBuffer):
            ob.append(arg)
            pos[1].append(i)
        elif isinstance(arg, InObject):
            io.append(arg)
            pos[2].append(i)
        elif isinstance(arg, OutObject):
            oo.append(arg)
            pos[3].append(i)
        else:
            raise TypeError(f"argument {i} is a {type(arg).__name__}, not an invocation Arg")
    counts = Counts(len(ib), len(ob), len(io), len(oo))
    return Grouped(
        counts, tuple(ib), tuple(ob), tuple(io), tuple(oo), tuple(i for kind in pos for i in kind)
    )
