"""What QTEE's message protocol names (kernel ``qcomtee_msg.h``): its results and the
``counts`` word.

QTEE answers every invocation with a signed 32-bit result under the kernel's
``QCOMTEE_MSG_*`` names: the generic object results (:class:`objects.ObjectResult`) and
the transport's own, -90..-103.  The kernel hands the result to userspace as the ``u32
ret`` field of ``TEE_IOC_OBJECT_INVOKE`` (two's complement), so -96 reads 0xFFFFFFA0 there.

An invocation's arguments travel ordered by kind -- every input buffer, then every output
buffer, then every input object, then every output object -- and one ``counts`` word of
four nibbles describes the shape::

    bits 15..12  #OO | bits 11..8  #IO | bits 7..4  #OB | bits 3..0  #IB
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from objects import DecodeError, UsageError, register_results

__all__ = [
    "MAX_ARGS_PER_KIND",
    "USERSPACE_ONLY_RESULTS",
    "Counts",
    "Result",
    "pack_counts",
    "unpack_counts",
]


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


register_results(Result)

#: Codes that exist in Qualcomm's userspace headers but never come out of the kernel.
USERSPACE_ONLY_RESULTS: frozenset[Result] = frozenset(
    {Result.ERROR_MEM, Result.ERROR_AUTH, Result.ERROR_REPLAY, Result.ERROR_MAXREPLAY}
)

#: A nibble holds at most 15 (Mink ``OBJECT_COUNTS_MAX_*``); the kernel's check allows 16.
MAX_ARGS_PER_KIND: Final = 15


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
        """``IB | OB<<4 | IO<<8 | OO<<12`` (:func:`pack_counts`)."""
        return pack_counts(self.ib, self.ob, self.io, self.oo)

    @classmethod
    def unpack(cls, word: int) -> Counts:
        """Decode a counts word; bits 16..31 must be zero (:func:`unpack_counts`)."""
        if not isinstance(word, int) or not 0 <= word <= 0xFFFF_FFFF:
            raise DecodeError(f"counts word {word!r} is not a u32")
        counts = _COUNTS_CACHE.get(word)
        if counts is None:
            counts = Counts(*unpack_counts(word))
            _COUNTS_CACHE[word] = counts
        return counts


def pack_counts(ib: int, ob: int, io: int, oo: int) -> int:
    """The counts word as ``qcomtee_msg_init`` writes it: each count masked to its nibble,
    so a kind with 16 args (which ``qcomtee_params_check`` lets through) reads as 0 and
    its neighbours are unchanged (qtee-kernel.md §3.3, §7)."""
    return (ib & 0xF) | (ob & 0xF) << 4 | (io & 0xF) << 8 | (oo & 0xF) << 12


class _Nibbles(dict[int, tuple[int, int, int, int]]):
    """Counts words decoded so far (filled as words are seen: all 65,536 at import cost
    100 ms of every program's start, the embedded model's in a C program too)."""

    __slots__ = ()

    def __missing__(self, word: int) -> tuple[int, int, int, int]:
        if word >> 16 or word < 0:
            raise DecodeError(f"counts {word:#010x} has bits set above bit 15")
        nibbles = (word & 0xF, word >> 4 & 0xF, word >> 8 & 0xF, word >> 12)
        self[word] = nibbles
        return nibbles


#: ``unpack_counts(word)``: ``(IB, OB, IO, OO)`` of a u32 counts word; bits 16..31 set ->
#: :class:`DecodeError`.  A cached dict lookup: every message decoded reads its word here.
unpack_counts: Final[Callable[[int], tuple[int, int, int, int]]] = _Nibbles().__getitem__

#: Counts decoded so far, by word (filled as words are seen, as the nibbles are).
_COUNTS_CACHE: dict[int, Counts] = {}
