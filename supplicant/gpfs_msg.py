"""The GPFS listener's messages (listener id 0x7000), byte for byte (sans-IO).

QTEE's GP file-system listener shares one 504 KiB buffer with the supplicant; the
request is written at its start and the response over it (:mod:`supplicant._listener_msg`).
GP trusted storage files live in two partitions, *data* and *persist*; each command
comes in a data and a persist flavour.

**Where the numbers come from.**  ``qualcomm-linux/pkg-minkipc:listeners/libfsservice/``
``gpfs/gpfs_msg.h`` and ``cmn/cmn.h`` (commit ``4dbe8a3``: the ids, sizes and structs),
``gpfs/gpfs.c`` and ``gpfs/gpfs_main.c`` (``6652928``: what each command answers).
Only facts were taken.  ``TZ_CM_MAX_NAME_LEN`` = 256 (NUL-terminated path fields),
``TZ_GPFS_FILE_SIZE`` = 500 KiB (the read and write payload), ``GP_FS_VERSION`` = 2.

=====  ====================  ========================================  ==================
 id     command               request after the u32 id (size)          response after id
=====  ====================  ========================================  ==================
4 / 8  DATA/PERSIST READ     char path[256], i32 offset, u32 count     i32 err, u32 n,
                             (268)                                     u8 buf[n]
5 / 9  DATA/PERSIST WRITE    char path[256], i32 offset, u32 count,    i32 err, u32 n
                             u32 backup, u8 buf[512000] (512272)       (12)
6 / 10 DATA/PERSIST REMOVE   char path[256] (260)                      i32 err (8)
7 / 11 DATA/PERSIST RENAME   char from[256], char to[256] (516)        i32 err (8)
12     GPFS_VERSION          nothing (4)                               u32 version = 2,
                                                                       i32 err = 0 (12)
other  (error)                                                         i32 err = -1 (8)
=====  ====================  ========================================  ==================

``err`` is 0 or a positive errno (not -1 and a GET_ERRNO as the FS listener does); an
unknown id answers ``GPFS_ERROR_NO_CMD`` = -1.  The read response's ``buf`` holds ``n``
bytes; the rest of the buffer keeps what was there.  READ and WRITE clamp ``count`` to
500 KiB.  Decoders raise only :class:`GpfsDecodeError`; records validate their fields
and raise :class:`GpfsUsageError`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar, Final, Self

from objects import DecodeError, UsageError
from supplicant._listener_msg import (
    Codec,
    MessageKit,
    Record,
    UnsupportedRecord,
    Wire,
    id_wire,
    layout,
    status_wire,
)

__all__ = [
    "GPFS_ERROR_NO_CMD",
    "GPFS_FILE_SIZE",
    "GPFS_SERVICE_BUF_LEN",
    "GPFS_SERVICE_ID",
    "GPFS_VERSION",
    "MAX_NAME_LEN",
    "GpfsCmd",
    "GpfsDecodeError",
    "GpfsRequest",
    "GpfsResponse",
    "GpfsUsageError",
    "Partition",
    "ReadRequest",
    "ReadResponse",
    "RemoveRequest",
    "RenameRequest",
    "StatusResponse",
    "UnsupportedRequest",
    "VersionRequest",
    "VersionResponse",
    "WriteRequest",
    "WriteResponse",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "response_size",
]

GPFS_SERVICE_ID: Final = 0x7000
GPFS_SERVICE_BUF_LEN: Final = 504 * 1024  # GPFILE_SERVICE_BUF_LEN = TZ_GP_MAX_BUF_LEN
GPFS_FILE_SIZE: Final = 500 * 1024  # TZ_GPFS_FILE_SIZE
GPFS_VERSION: Final = 2  # GP_FS_VERSION ("Secure File System - version 2")
GPFS_ERROR_NO_CMD: Final = -1
MAX_NAME_LEN: Final = 256  # TZ_CM_MAX_NAME_LEN, NUL included


class GpfsCmd(enum.IntEnum):
    """``tz_gpfs_msg_cmd_type``: consecutive from DATA_FILE_READ = 4."""

    DATA_FILE_READ = 4
    DATA_FILE_WRITE = 5
    DATA_FILE_REMOVE = 6
    DATA_FILE_RENAME = 7
    PERSIST_FILE_READ = 8
    PERSIST_FILE_WRITE = 9
    PERSIST_FILE_REMOVE = 10
    PERSIST_FILE_RENAME = 11
    GPFS_VERSION = 12
    UNKNOWN = 0x7FFFFFFF


class Partition(enum.Enum):
    """Which of the two storage partitions a command names."""

    DATA = "data"
    PERSIST = "persist"


class GpfsDecodeError(DecodeError):
    """GPFS listener bytes are malformed (the message says which command and field)."""


class GpfsUsageError(UsageError):
    """A GPFS message field or service argument has the wrong type or range."""


_KIT: Final = MessageKit(GpfsDecodeError, GpfsUsageError, GpfsCmd)

# (data id, persist id) per operation
_IDS: Final = {
    "read": (GpfsCmd.DATA_FILE_READ, GpfsCmd.PERSIST_FILE_READ),
    "write": (GpfsCmd.DATA_FILE_WRITE, GpfsCmd.PERSIST_FILE_WRITE),
    "remove": (GpfsCmd.DATA_FILE_REMOVE, GpfsCmd.PERSIST_FILE_REMOVE),
    "rename": (GpfsCmd.DATA_FILE_RENAME, GpfsCmd.PERSIST_FILE_RENAME),
}
_OP_OF: Final = {
    int(i): (op, p) for op, ids in _IDS.items() for i, p in zip(ids, Partition, strict=True)
}


def _cmd(op: str, partition: Partition) -> GpfsCmd:
    data, persist = _IDS[op]
    return data if partition is Partition.DATA else persist


def _path_wire(attr: str, label: str = "") -> Wire:
    return Wire(attr, f"{MAX_NAME_LEN}s", label, kind="name")


@dataclass(frozen=True, slots=True, kw_only=True)
class _Record(Record):
    KIT: ClassVar[MessageKit] = _KIT


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True, kw_only=True)
class _FileRequest(_Record):
    """A request on a file of one partition; ``OP`` and the partition pick its id, and
    messages name its fields after the operation (``READ path``)."""

    OP: ClassVar[str]
    partition: Partition

    @property
    def cmd_id(self) -> GpfsCmd:
        """The wire id (data or persist flavour)."""
        return _cmd(self.OP, self.partition)

    def _prefix(self) -> str:
        return self.OP.upper() + " "

    @classmethod
    def command_ids(cls) -> tuple[GpfsCmd, GpfsCmd]:
        """Its data and persist ids."""
        return _IDS[cls.OP]

    def _wire_id(self) -> int:
        return self.cmd_id

    @classmethod
    def decode(cls, data: bytes, cmd_id: int) -> Self:
        """The request, its partition from its id."""
        return cls(partition=_OP_OF[cmd_id][1], **cls.fields_from(data, cmd_id))


_PARTITION: Final = Wire("partition", "", kind="is", types=(Partition,), noun="a Partition")
_PATH: Final = _path_wire("path")
_OFFSET: Final = Wire("offset", "i")


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadRequest(_FileRequest):
    """DATA/PERSIST_FILE_READ: up to ``count`` bytes of ``path`` from ``offset``."""

    OP: ClassVar[str] = "read"
    WIRE: ClassVar[tuple[Wire, ...]] = (_PARTITION, _PATH, _OFFSET, Wire("count", "I"))
    path: str
    offset: int
    count: int


@dataclass(frozen=True, slots=True, kw_only=True)
class WriteRequest(_FileRequest):
    """DATA/PERSIST_FILE_WRITE: ``data`` at ``offset`` (``backup``: copy to ``.bak`` first).

    Its bytes carry the payload's length before ``backup`` and the payload, padded to
    500 KiB, after it."""

    OP: ClassVar[str] = "write"
    WIRE: ClassVar[tuple[Wire, ...]] = (
        _PARTITION,
        _PATH,
        _OFFSET,
        Wire("data", "I", kind="bytes", hi=GPFS_FILE_SIZE),
        Wire("backup", "I", kind="bool"),
    )
    path: str
    offset: int
    data: bytes
    backup: bool = False

    def _tail(self) -> bytes:
        return self.data.ljust(GPFS_FILE_SIZE, b"\0")

    @classmethod
    def fixed_size(cls) -> int:
        """The header and the whole payload field."""
        return layout(cls).size + GPFS_FILE_SIZE

    @classmethod
    def decode(cls, data: bytes, cmd_id: int) -> WriteRequest:
        """The request; its payload is the first ``count`` bytes (at most 500 KiB) after
        the header."""
        fields = cls.fields_from(data, cmd_id)
        head = layout(cls).size
        fields["data"] = data[head : head + min(fields["data"], GPFS_FILE_SIZE)]
        return cls(partition=_OP_OF[cmd_id][1], **fields)


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoveRequest(_FileRequest):
    """DATA/PERSIST_FILE_REMOVE: unlink a file (a directory is refused)."""

    OP: ClassVar[str] = "remove"
    WIRE: ClassVar[tuple[Wire, ...]] = (_PARTITION, _PATH)
    path: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RenameRequest(_FileRequest):
    """DATA/PERSIST_FILE_RENAME: ``rename(old, new)`` inside one partition."""

    OP: ClassVar[str] = "rename"
    WIRE: ClassVar[tuple[Wire, ...]] = (
        _PARTITION,
        _path_wire("old", "from"),
        _path_wire("new", "to"),
    )
    old: str
    new: str


@dataclass(frozen=True, slots=True, kw_only=True)
class VersionRequest(_Record):
    """GPFS_VERSION: which secure file system version the service speaks."""

    CMD: ClassVar[GpfsCmd] = GpfsCmd.GPFS_VERSION

    @property
    def cmd_id(self) -> GpfsCmd:
        """The wire id."""
        return self.CMD


@dataclass(frozen=True, slots=True, kw_only=True)
class UnsupportedRequest(UnsupportedRecord):
    """Any id the dispatch has no case for (UNKNOWN included)."""

    KIT: ClassVar[MessageKit] = _KIT


GpfsRequest = (
    ReadRequest | WriteRequest | RemoveRequest | RenameRequest | VersionRequest | UnsupportedRequest
)
#: The write request's full size: header and the 500 KiB payload field.
WRITE_REQUEST_SIZE: Final = WriteRequest.fixed_size()


# --------------------------------------------------------------------------- responses


_ERR: Final = Wire("err", "i")


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadResponse(_Record):
    """READ's answer: ``err`` and the bytes read (none unless ``err`` is 0), which follow
    their count."""

    PREFIX: ClassVar[str] = "READ "
    WIRE: ClassVar[tuple[Wire, ...]] = (
        id_wire("a read response answers a READ id, not {!r}", _IDS["read"]),
        _ERR,
        Wire("data", "I", kind="bytes", hi=GPFS_FILE_SIZE),
    )
    cmd_id: int
    err: int
    data: bytes

    def _check(self) -> None:
        if self.err != 0 and self.data:
            raise GpfsUsageError("a failed READ carries no data")

    def _tail(self) -> bytes:
        return self.data

    @classmethod
    def decode(cls, data: bytes, cmd_id: int) -> ReadResponse:
        """READ's answer and the ``n`` bytes after it."""
        _, err, n = layout(cls).unpack_from(data, 0)
        if n > GPFS_FILE_SIZE:
            raise GpfsDecodeError(f"READ count {n} exceeds the {GPFS_FILE_SIZE}-byte buffer")
        head = layout(cls).size
        _KIT.need(data, head + n, f"READ response of {n} bytes")
        if err != 0 and n:
            raise GpfsDecodeError(f"READ failed with err {err} but counts {n} bytes")
        return cls(cmd_id=cmd_id, err=err, data=data[head : head + n])


@dataclass(frozen=True, slots=True, kw_only=True)
class WriteResponse(_Record):
    """WRITE's answer: ``err`` and how many bytes were written (0 unless ``err`` is 0)."""

    PREFIX: ClassVar[str] = "WRITE "
    WIRE: ClassVar[tuple[Wire, ...]] = (
        id_wire("a write response answers a WRITE id, not {!r}", _IDS["write"]),
        _ERR,
        Wire("written", "I", "count", hi=GPFS_FILE_SIZE),
    )
    cmd_id: int
    err: int
    written: int

    @classmethod
    def decode(cls, data: bytes, cmd_id: int) -> WriteResponse:
        """WRITE's answer; a count past the buffer is a decode error."""
        fields = cls.fields_from(data, cmd_id)
        if fields["written"] > GPFS_FILE_SIZE:
            n = fields["written"]
            raise GpfsDecodeError(f"WRITE count {n} exceeds the {GPFS_FILE_SIZE}-byte buffer")
        return cls(**fields)


@dataclass(frozen=True, slots=True, kw_only=True)
class VersionResponse(_Record):
    """GPFS_VERSION's answer."""

    CMD: ClassVar[GpfsCmd] = GpfsCmd.GPFS_VERSION
    WIRE: ClassVar[tuple[Wire, ...]] = (Wire("version", "I"), Wire("err", "i", "VERSION err"))
    version: int
    err: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusResponse(_Record):
    """The 8-byte ``{id, i32 err}`` answer: REMOVE's, RENAME's and the unknown-id one."""

    WIRE: ClassVar[tuple[Wire, ...]] = status_wire("err")
    cmd_id: int
    err: int


GpfsResponse = ReadResponse | WriteResponse | VersionResponse | StatusResponse

_CODEC: Final = Codec[GpfsRequest, GpfsResponse](
    _KIT, "a GPFS", GpfsRequest, GpfsResponse, StatusResponse
)
encode_request: Final = _CODEC.encode_request
decode_request: Final = _CODEC.decode_request
encode_response: Final = _CODEC.encode_response
decode_response: Final = _CODEC.decode_response
response_size: Final = _CODEC.response_size
