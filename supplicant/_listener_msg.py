"""The skeleton every QTEE listener's messages share (sans-IO).

A QTEE listener (time 0xB, FS 0xA, GPFS 0x7000, RPMB 0x2000; quic-teec.md §5.4) shares
one buffer with the supplicant.  QTEE writes a request at its start; the supplicant's
dispatch reads the u32 command id there and writes the response over the request, in
place.  Every struct is packed and little-endian (the supplicant runs on aarch64, LP64).
A dispatch that refuses the buffer outright (shorter than the service needs) returns
non-zero, which CListenerCBO turns into ``Object_ERROR``: a transport failure, not a
response.

:class:`MessageKit` holds what each listener's codec repeats: its two error classes
(bytes that cannot be decoded; a record field of the wrong type or range), its command
enum and the ids it serves, the integer and name-field checks, the u32 command id at the
start of a buffer, the NUL-terminated fixed-size name fields and the size of an answer.
:class:`UnsupportedRecord` and :class:`StatusRecord` are the two records every listener
has: the request of an id its dispatch does not serve, and the 8-byte ``{id, i32 ret}``
answer.  The codecs (:mod:`supplicant.time_msg`, :mod:`supplicant.fs_msg`,
:mod:`supplicant.gpfs_msg`, :mod:`supplicant.rpmb_msg`) keep their own command tables and
layouts on top of them.
"""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Final, TypeVar

from objects import DecodeError, UsageError

__all__ = [
    "I32_MAX",
    "I32_MIN",
    "I64_MAX",
    "I64_MIN",
    "STATUS",
    "U32",
    "U32_MAX",
    "U64_MAX",
    "MessageKit",
    "StatusRecord",
    "UnsupportedRecord",
    "pack_name",
]

I32_MIN: Final = -(1 << 31)
I32_MAX: Final = (1 << 31) - 1
U32_MAX: Final = (1 << 32) - 1
U64_MAX: Final = (1 << 64) - 1
I64_MIN: Final = -(1 << 63)
I64_MAX: Final = (1 << 63) - 1

#: The command id every request and response starts with.
U32: Final = struct.Struct("<I")
#: ``{u32 cmd_id, i32 ret}``: the shortest response, the error answer of most services.
STATUS: Final = struct.Struct("<Ii")

_BYTES_LIKE: Final = (bytes, bytearray, memoryview)  # (a tuple: a union is built per call)
_R = TypeVar("_R")


@dataclass(frozen=True, slots=True)
class MessageKit:
    """One listener's errors, commands and the field checks its records and decoders use."""

    decode_error: type[DecodeError]
    usage_error: type[UsageError]
    cmd: type[enum.IntEnum]
    #: The ids the dispatch serves with a record of their own (filled by :meth:`requests`).
    supported: set[int] = field(default_factory=set)

    def requests(self, *records: _R) -> dict[int, _R]:
        """``records`` by their ``CMD``; those ids become :attr:`supported`."""
        table = {int(getattr(cls, "CMD")): cls for cls in records}  # noqa: B009  (a class var)
        self.supported.update(table)
        return table

    def int_field(self, value: object, what: str, lo: int, hi: int) -> int:
        """``value`` if it is an int (not a bool) in ``[lo, hi]``; else a usage error."""
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.usage_error(f"{what} must be an int, not {type(value).__name__}")
        if not lo <= value <= hi:
            raise self.usage_error(f"{what} {value} is outside [{lo}, {hi}]")
        return value

    def command_field(self, value: object) -> int:
        """``value`` if it is a u32 command id; else a usage error."""
        return self.int_field(value, "command id", 0, U32_MAX)

    def name_field(self, value: object, what: str, size: int) -> bytes:
        """The wire bytes of a str that goes in a NUL-terminated ``size``-byte field."""
        if not isinstance(value, str):
            raise self.usage_error(f"{what} must be a str, not {type(value).__name__}")
        try:
            raw = os.fsencode(value)
        except UnicodeEncodeError as exc:
            raise self.usage_error(f"{what} {value!r} cannot be encoded: {exc.reason}") from None
        if b"\0" in raw:
            raise self.usage_error(f"{what} {value!r} contains a NUL byte")
        if len(raw) > size - 1:
            raise self.usage_error(f"{what} is {len(raw)} bytes; the field holds {size - 1}")
        return raw

    def unpack_name(self, field: bytes, what: str) -> str:
        """The str before the first NUL of a name field (a field without one is an error)."""
        end = field.find(b"\0")
        if end < 0:
            raise self.decode_error(f"{what} has no NUL within its {len(field)} bytes")
        return os.fsdecode(field[:end])

    def buffer(self, buf: object, what: str) -> bytes:
        """``buf`` as bytes; a decode error if it is not bytes-like."""
        if not isinstance(buf, _BYTES_LIKE):
            raise self.decode_error(f"{what} must be bytes-like, not {type(buf).__name__}")
        return bytes(buf)

    def command_id(self, data: bytes, what: str) -> int:
        """The u32 command id at the start of ``data``."""
        if len(data) < U32.size:
            raise self.decode_error(f"{what} is {len(data)} bytes; the command id needs 4")
        (cmd_id,) = U32.unpack_from(data, 0)
        return int(cmd_id)

    def need(self, data: bytes, size: int, what: str) -> None:
        """A decode error unless ``data`` holds at least ``size`` bytes."""
        if len(data) < size:
            raise self.decode_error(f"{what} is {len(data)} bytes; it needs {size}")

    def request(self, buf: object) -> tuple[bytes, int]:
        """A request buffer as bytes and the command id at its start."""
        data = self.buffer(buf, "request")
        return data, self.command_id(data, "request")

    def response(self, buf: object, sizes: Mapping[int, int]) -> tuple[bytes, int]:
        """A response buffer as bytes and its echoed id, checked to hold the id's answer."""
        data = self.buffer(buf, "response")
        cmd_id = self.command_id(data, "response")
        self.need(data, self.response_size(cmd_id, sizes), f"response to {cmd_id:#x}")
        return data, cmd_id

    def response_size(self, cmd_id: int, sizes: Mapping[int, int]) -> int:
        """How many bytes the answer to ``cmd_id`` occupies: its entry in ``sizes``, or the
        8-byte status answer."""
        self.command_field(cmd_id)
        return sizes.get(cmd_id, STATUS.size)


@dataclass(frozen=True, slots=True, kw_only=True)
class UnsupportedRecord:
    """The request of an id the dispatch does not serve (``KIT`` names the listener)."""

    KIT: ClassVar[MessageKit]
    cmd_id: int

    def __post_init__(self) -> None:
        self.KIT.command_field(self.cmd_id)
        if self.cmd_id in self.KIT.supported:
            raise self.KIT.usage_error(f"command {self.cmd_id:#x} is supported; use its own record")


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusRecord:
    """The 8-byte ``{id, i32 ret}`` answer of every id not in ``OWN``."""

    KIT: ClassVar[MessageKit]
    #: The ids answered by a record of their own.
    OWN: ClassVar[Collection[int]]
    cmd_id: int
    ret: int

    def __post_init__(self) -> None:
        kit = self.KIT
        kit.command_field(self.cmd_id)
        if self.cmd_id in self.OWN:
            raise kit.usage_error(f"{kit.cmd(self.cmd_id).name} has its own response record")
        kit.int_field(self.ret, "ret", I32_MIN, I32_MAX)


def pack_name(raw: bytes, size: int) -> bytes:
    """``raw`` NUL-padded to a ``size``-byte field."""
    return raw.ljust(size, b"\0")
