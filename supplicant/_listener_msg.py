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
start of a buffer, and the dispatch from a command id to the record that decodes it.

Every request and response is a :class:`Record` whose field table (``WIRE``, one
:class:`Wire` a field, in wire order) is both its check and its layout: built, a record
checks each field in turn; encoded, it packs the command id and the fields' struct codes
(:func:`layout`); decoded, it unpacks them.  What a record adds is only what is its own:
a check across fields, a payload after the fixed part, a layout whose order differs from
the order its fields are checked in.  :class:`UnsupportedRecord` and
:class:`StatusRecord` are the two records every listener has: the request of an id its
dispatch does not serve, and the 8-byte ``{id, i32 ret}`` answer.  The codecs
(:mod:`supplicant.time_msg`, :mod:`supplicant.fs_msg`, :mod:`supplicant.gpfs_msg`,
:mod:`supplicant.rpmb_msg`) hold their command tables and records.
"""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Generic, Self, TypeVar, get_args

from objects import DecodeError, UsageError

__all__ = [
    "I32_MAX",
    "I32_MIN",
    "I64_MAX",
    "I64_MIN",
    "U32",
    "U32_MAX",
    "U64_MAX",
    "Codec",
    "MessageKit",
    "Record",
    "StatusRecord",
    "UnsupportedRecord",
    "Wire",
    "id_wire",
    "layout",
    "status_wire",
]

I32_MIN: Final = -(1 << 31)
I32_MAX: Final = (1 << 31) - 1
U32_MAX: Final = (1 << 32) - 1
U64_MAX: Final = (1 << 64) - 1
I64_MIN: Final = -(1 << 63)
I64_MAX: Final = (1 << 63) - 1

#: The command id every request and response starts with.
U32: Final = struct.Struct("<I")

#: The range of each integer struct code a field may have.
_RANGE: Final = {
    "i": (I32_MIN, I32_MAX),
    "I": (0, U32_MAX),
    "q": (I64_MIN, I64_MAX),
    "Q": (0, U64_MAX),
    "H": (0, 0xFFFF),
    "B": (0, 0xFF),
}

_BYTES_LIKE: Final = (bytes, bytearray, memoryview)  # (a tuple: a union is built per call)
_Q = TypeVar("_Q")
_P = TypeVar("_P")


@dataclass(frozen=True, slots=True)
class MessageKit:
    """One listener's errors, commands and the field checks its records and decoders use."""

    decode_error: type[DecodeError]
    usage_error: type[UsageError]
    cmd: type[enum.IntEnum]
    #: The ids the dispatch serves with a request record of their own, and the ids
    #: answered by a response record of their own (both filled by :class:`Codec`).
    supported: set[int] = field(default_factory=set)
    answered: set[int] = field(default_factory=set)

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


@dataclass(frozen=True, slots=True)
class Wire:
    """One record field in wire order: its attribute, its struct code (``""`` when the
    field is not on the wire), the name messages give it and what it must hold.

    ``kind`` is one of:

    * ``"int"``: in ``[lo, hi]``, by default the code's range;
    * ``"name"``: a str, NUL-terminated in a ``"<size>s"`` field;
    * ``"bytes"``: at most ``hi`` of them; code ``"<size>sI"`` is the payload padded to
      its size, then its length; code ``"I"`` is the length alone (the record places
      the payload);
    * ``"bool"``: a u32 0 or 1;
    * ``"is"``: an instance of ``types`` (``noun`` in messages); with a struct code, a
      nested :class:`Record` whose fields are packed in place;
    * ``"cmd"``: a u32 command id, one of ``ids`` if given; ``"id"``: one of ``ids``;
      for both, ``label`` is the whole message, formatted with the value;
    * ``"status"``: a u32 command id not answered by a record of its own;
    * ``"own"``: the record checks it itself.
    """

    attr: str
    code: str
    label: str = ""
    kind: str = "int"
    lo: int | None = None
    hi: int | None = None
    types: tuple[type, ...] = ()
    noun: str = ""
    ids: Collection[int] = ()

    #: An int field's range: ``lo``/``hi`` where given, else its code's.
    min: int = field(init=False, repr=False, default=0)
    max: int = field(init=False, repr=False, default=-1)

    def __post_init__(self) -> None:
        if self.kind == "int":
            lo, hi = _RANGE[self.code]
            object.__setattr__(self, "min", lo if self.lo is None else self.lo)
            object.__setattr__(self, "max", hi if self.hi is None else self.hi)

    @property
    def what(self) -> str:
        """The field's name in messages (``path``, ``old path``, ``fd``...)."""
        return self.label or self.attr

    def check(self, value: object, what: str, kit: MessageKit) -> None:
        """A usage error of ``kit`` unless ``value`` fits the field (``what`` names it)."""
        kind = self.kind
        if kind == "int":
            kit.int_field(value, what, self.min, self.max)
        elif kind == "name":
            kit.name_field(value, what, int(self.code[:-1]))
        elif kind == "bytes":
            if not isinstance(value, bytes):
                raise kit.usage_error(f"{what} must be bytes, not {type(value).__name__}")
            if self.hi is not None and len(value) > self.hi:
                raise kit.usage_error(f"{what} is {len(value)} bytes; at most {self.hi}")
        elif kind == "is":
            if not isinstance(value, self.types):
                raise kit.usage_error(f"{what} must be {self.noun}, not {type(value).__name__}")
        elif kind == "bool":
            if not isinstance(value, bool):
                raise kit.usage_error(f"{what} must be a bool, not {type(value).__name__}")
        elif kind == "status":
            cmd_id = kit.command_field(value)
            if cmd_id in kit.answered:
                raise kit.usage_error(f"{kit.cmd(cmd_id).name} has its own response record")
        elif kind in ("cmd", "id"):
            if kind == "cmd":
                kit.command_field(value)
            if self.ids and value not in self.ids:
                raise kit.usage_error(self.label.format(value))

    def pack(self, value: Any) -> tuple[Any, ...]:
        """The field's values for its struct code."""
        if not self.code:
            return ()
        if self.kind == "name":
            return (os.fsencode(value),)
        if self.kind == "bytes" and self.code.endswith("I"):  # the payload's length
            return (len(value),) if self.code == "I" else (value, len(value))
        if self.kind == "is":
            return value.pack_fields()  # type: ignore[no-any-return]
        if self.kind == "bool":
            return (int(value),)
        return (value,)

    def unpack(self, values: Iterator[Any], kit: MessageKit, cmd_id: int) -> Any:
        """The field's value from its struct values (of a message with id ``cmd_id``)."""
        if self.kind == "is":  # a nested record
            return _build(self.types[0], values, kit, cmd_id)
        value = next(values)
        if self.kind == "name":
            return kit.unpack_name(value, f"{kit.cmd(cmd_id).name} {self.what}")
        if self.kind == "bytes" and self.code.endswith("sI"):
            return value[: min(next(values), self.hi or 0)]
        if self.kind == "bool":
            return value != 0
        return value


@dataclass(frozen=True, slots=True, kw_only=True)
class Record:
    """A record whose fields ``WIRE`` lists in wire order: built, it checks each of them
    (messages put ``PREFIX`` before a field's name), then what is its own
    (:meth:`_check`).  Its bytes are the command id (unless ``WIRE`` starts with it), the
    fields' struct codes and :meth:`_tail`."""

    KIT: ClassVar[MessageKit]
    WIRE: ClassVar[tuple[Wire, ...]] = ()
    PREFIX: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for wire in self.WIRE:
            value = getattr(self, wire.attr)
            if type(value) is int and wire.kind == "int" and wire.min <= value <= wire.max:
                continue  # the common case, decided without building a message
            wire.check(value, self._prefix() + wire.what, self.KIT)
        self._check()

    def _prefix(self) -> str:
        return self.PREFIX

    def _check(self) -> None:
        """What the record checks beyond its fields' own ranges (nothing)."""

    @classmethod
    def command_ids(cls) -> Collection[int]:
        """The ids of the messages this record is (its ``CMD``, or the ids its first
        field allows)."""
        if _id_in_wire(cls):
            return cls.WIRE[0].ids
        return (getattr(cls, "CMD"),)  # noqa: B009  (a class var of the subclasses)

    def _wire_id(self) -> int:
        """The command id its bytes start with when ``WIRE`` does not hold it."""
        return int(getattr(self, "CMD"))  # noqa: B009  (a class var of the subclasses)

    def pack_fields(self) -> tuple[Any, ...]:
        """The values of its fields for :func:`layout`'s struct, in wire order."""
        values: list[Any] = []
        for wire in self.WIRE:
            value = getattr(self, wire.attr)
            if wire.kind == "int":
                values.append(value)
            else:
                values += wire.pack(value)
        return tuple(values)

    def _tail(self) -> bytes:
        """The bytes that follow its fixed fields (none)."""
        return b""

    @classmethod
    def fixed_size(cls) -> int:
        """How many bytes its fixed part occupies (all a decoder needs before it looks)."""
        return layout(cls).size

    def encode(self) -> bytes:
        """The record's bytes."""
        cls = type(self)
        head = () if _id_in_wire(cls) else (self._wire_id(),)
        return layout(cls).pack(*head, *self.pack_fields()) + self._tail()

    @classmethod
    def fields_from(cls, data: bytes, cmd_id: int) -> dict[str, Any]:
        """Its fields from the fixed part at the start of ``data`` (at least
        ``layout(cls).size`` bytes), a message with id ``cmd_id``."""
        values = iter(layout(cls).unpack_from(data, 0))
        if not _id_in_wire(cls):
            next(values)
        return {wire.attr: wire.unpack(values, cls.KIT, cmd_id) for wire in cls.WIRE if wire.code}

    @classmethod
    def decode(cls, data: bytes, cmd_id: int) -> Self:
        """The record from ``data``, which holds at least its fixed part."""
        return cls(**cls.fields_from(data, cmd_id))


def _id_in_wire(cls: type[Record]) -> bool:
    """Whether the record's first field is the command id its bytes start with."""
    return bool(cls.WIRE) and cls.WIRE[0].kind in ("cmd", "id", "status")


def _build(cls: type[Record], values: Iterator[Any], kit: MessageKit, cmd_id: int) -> Record:
    """A nested record from the struct values of its fields."""
    return cls(**{wire.attr: wire.unpack(values, kit, cmd_id) for wire in cls.WIRE})


def layout(cls: type[Record]) -> struct.Struct:
    """The struct of a record's fixed part: the command id, then its fields' codes."""
    found = _LAYOUTS.get(cls)
    if found is None:
        head = "" if _id_in_wire(cls) else "I"
        found = _LAYOUTS[cls] = struct.Struct("<" + head + "".join(_codes(cls)))
    return found


_LAYOUTS: Final[dict[type[Record], struct.Struct]] = {}


def _codes(cls: type[Record]) -> list[str]:
    codes: list[str] = []
    for wire in cls.WIRE:
        if wire.kind == "is" and wire.code:
            codes += _codes(wire.types[0])  # a nested record
        else:
            codes.append(wire.code)
    return codes


@dataclass(frozen=True, slots=True, kw_only=True)
class UnsupportedRecord(Record):
    """The request of an id the dispatch does not serve (``KIT`` names the listener)."""

    WIRE: ClassVar[tuple[Wire, ...]] = (Wire("cmd_id", "I", kind="cmd"),)
    cmd_id: int

    def _check(self) -> None:
        if self.cmd_id in self.KIT.supported:
            raise self.KIT.usage_error(f"command {self.cmd_id:#x} is supported; use its own record")


def status_wire(result: str = "ret") -> tuple[Wire, Wire]:
    """The fields of a ``{id, i32 result}`` answer: an id not answered by a record of
    its own, and the result."""
    return (Wire("cmd_id", "I", kind="status"), Wire(result, "i"))


def id_wire(message: str, ids: Collection[int], *, u32: bool = False) -> Wire:
    """A ``cmd_id`` field that must be one of ``ids`` (``message`` is the error, formatted
    with the value; ``u32``: checked to be a u32 command id first)."""
    return Wire("cmd_id", "I", message, kind="cmd" if u32 else "id", ids=ids)


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusRecord(Record):
    """The 8-byte ``{id, i32 ret}`` answer of every id not answered by a record of its
    own."""

    WIRE: ClassVar[tuple[Wire, ...]] = status_wire()
    cmd_id: int
    ret: int


class Codec(Generic[_Q, _P]):
    """One listener's codec: its request and response records by command id.

    ``requests`` and ``responses`` are the unions of the listener's records.  The
    request of every id no request record serves is the union's
    :class:`UnsupportedRecord`; ``other`` is the answer of every id no response record
    answers; ``what`` names the listener in messages (``an FS``).  ``exact`` refuses a
    subclass of a request record."""

    def __init__(
        self,
        kit: MessageKit,
        what: str,
        requests: object,
        responses: object,
        other: type[Record],
        *,
        exact: bool = False,
    ) -> None:
        request_types: tuple[type[Record], ...] = get_args(requests)
        response_types: tuple[type[Record], ...] = get_args(responses)
        served = [cls for cls in request_types if not issubclass(cls, UnsupportedRecord)]
        (unsupported,) = (cls for cls in request_types if issubclass(cls, UnsupportedRecord))
        answers = [cls for cls in response_types if cls is not other]
        self._kit = kit
        self._what = what
        self._requests = {int(i): cls for cls in served for i in cls.command_ids()}
        self._responses = {int(i): cls for cls in answers for i in cls.command_ids()}
        kit.supported.update(self._requests)
        kit.answered.update(self._responses)
        self._unsupported = unsupported
        self._other = other
        self._request_types = request_types
        self._response_types = response_types
        self._exact = exact

    def encode_request(self, req: _Q) -> bytes:
        """The request's bytes (the secure side's half)."""
        served = not isinstance(req, self._unsupported)
        if self._exact and served and type(req) not in self._request_types:
            raise self._kit.usage_error(f"not {self._what} request record: {_name(req)}")
        return self._encode(req, self._request_types, "request")

    def decode_request(self, buf: bytes | bytearray | memoryview) -> _Q:
        """The request at the start of ``buf`` (trailing bytes are ignored)."""
        kit = self._kit
        data, cmd_id = kit.request(buf)
        cls = self._requests.get(cmd_id)
        if cls is None:
            return self._unsupported(cmd_id=cmd_id)  # type: ignore[return-value]
        size = cls.fixed_size()
        if len(data) < size:
            kit.need(data, size, f"{kit.cmd(cmd_id).name} request")
        try:
            return cls.decode(data, cmd_id)  # type: ignore[return-value]
        except kit.usage_error as exc:  # defensive: the layouts cannot produce one
            raise kit.decode_error(f"{kit.cmd(cmd_id).name} request: {exc}") from None

    def response_size(self, cmd_id: int) -> int:
        """How many bytes the fixed part of the answer to ``cmd_id`` occupies."""
        self._kit.command_field(cmd_id)
        return self._responses.get(cmd_id, self._other).fixed_size()

    def encode_response(self, rsp: _P) -> bytes:
        """The response's bytes, written over the request (the supplicant's half)."""
        return self._encode(rsp, self._response_types, "response")

    def decode_response(self, buf: bytes | bytearray | memoryview) -> _P:
        """The response at the start of ``buf``; its layout follows the echoed command id."""
        kit = self._kit
        data = kit.buffer(buf, "response")
        cmd_id = kit.command_id(data, "response")
        cls = self._responses.get(cmd_id, self._other)
        kit.need(data, cls.fixed_size(), f"response to {cmd_id:#x}")
        return cls.decode(data, cmd_id)  # type: ignore[return-value]

    def _encode(self, record: object, kinds: tuple[type[Record], ...], half: str) -> bytes:
        if not isinstance(record, kinds):
            raise self._kit.usage_error(f"not {self._what} {half} record: {_name(record)}")
        return record.encode()


def _name(value: object) -> str:
    return type(value).__name__
