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
import struct
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from objects import DecodeError, UsageError
from supplicant._listener_msg import (
    I32_MAX,
    I32_MIN,
    STATUS,
    U32,
    U32_MAX,
    MessageKit,
    UnsupportedRecord,
    pack_name,
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


_KNOWN: Final = {int(c) for c in GpfsCmd if c is not GpfsCmd.UNKNOWN}
_KIT: Final = MessageKit(GpfsDecodeError, GpfsUsageError, GpfsCmd, _KNOWN)
_int = _KIT.int_field

# (data id, persist id) per operation
_IDS: Final = {
    "read": (GpfsCmd.DATA_FILE_READ, GpfsCmd.PERSIST_FILE_READ),
    "write": (GpfsCmd.DATA_FILE_WRITE, GpfsCmd.PERSIST_FILE_WRITE),
    "remove": (GpfsCmd.DATA_FILE_REMOVE, GpfsCmd.PERSIST_FILE_REMOVE),
    "rename": (GpfsCmd.DATA_FILE_RENAME, GpfsCmd.PERSIST_FILE_RENAME),
}


def _partition(value: object, what: str) -> Partition:
    if not isinstance(value, Partition):
        raise GpfsUsageError(f"{what} partition must be a Partition, not {type(value).__name__}")
    return value


def _cmd(op: str, partition: Partition) -> GpfsCmd:
    data, persist = _IDS[op]
    return data if partition is Partition.DATA else persist


def _path(value: object, what: str) -> bytes:
    return _KIT.name_field(value, what, MAX_NAME_LEN)


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True, kw_only=True)
class _FileRequest:
    """A request on a file of one partition; ``OP`` and the partition pick its id."""

    OP: ClassVar[str]
    partition: Partition

    @property
    def cmd_id(self) -> GpfsCmd:
        """The wire id (data or persist flavour)."""
        return _cmd(self.OP, self.partition)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadRequest(_FileRequest):
    """DATA/PERSIST_FILE_READ: up to ``count`` bytes of ``path`` from ``offset``."""

    OP: ClassVar[str] = "read"
    path: str
    offset: int
    count: int

    def __post_init__(self) -> None:
        _partition(self.partition, "READ")
        _path(self.path, "READ path")
        _int(self.offset, "READ offset", I32_MIN, I32_MAX)
        _int(self.count, "READ count", 0, U32_MAX)


@dataclass(frozen=True, slots=True, kw_only=True)
class WriteRequest(_FileRequest):
    """DATA/PERSIST_FILE_WRITE: ``data`` at ``offset`` (``backup``: copy to ``.bak`` first)."""

    OP: ClassVar[str] = "write"
    path: str
    offset: int
    data: bytes
    backup: bool = False

    def __post_init__(self) -> None:
        _partition(self.partition, "WRITE")
        _path(self.path, "WRITE path")
        _int(self.offset, "WRITE offset", I32_MIN, I32_MAX)
        if not isinstance(self.data, bytes):
            raise GpfsUsageError(f"WRITE data must be bytes, not {type(self.data).__name__}")
        if len(self.data) > GPFS_FILE_SIZE:
            raise GpfsUsageError(f"WRITE data is {len(self.data)} bytes; at most {GPFS_FILE_SIZE}")
        if not isinstance(self.backup, bool):
            raise GpfsUsageError(f"WRITE backup must be a bool, not {type(self.backup).__name__}")


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoveRequest(_FileRequest):
    """DATA/PERSIST_FILE_REMOVE: unlink a file (a directory is refused)."""

    OP: ClassVar[str] = "remove"
    path: str

    def __post_init__(self) -> None:
        _partition(self.partition, "REMOVE")
        _path(self.path, "REMOVE path")


@dataclass(frozen=True, slots=True, kw_only=True)
class RenameRequest(_FileRequest):
    """DATA/PERSIST_FILE_RENAME: ``rename(old, new)`` inside one partition."""

    OP: ClassVar[str] = "rename"
    old: str
    new: str

    def __post_init__(self) -> None:
        _partition(self.partition, "RENAME")
        _path(self.old, "RENAME from")
        _path(self.new, "RENAME to")


@dataclass(frozen=True, slots=True, kw_only=True)
class VersionRequest:
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

_READ_REQ: Final = struct.Struct("<I256siI")
_WRITE_HDR: Final = struct.Struct("<I256siII")
_REMOVE_REQ: Final = struct.Struct("<I256s")
_RENAME_REQ: Final = struct.Struct("<I256s256s")
_OP_OF: Final = {
    int(i): (op, p) for op, ids in _IDS.items() for i, p in zip(ids, Partition, strict=True)
}
#: The write request's full size: header and the 500 KiB payload field.
WRITE_REQUEST_SIZE: Final = _WRITE_HDR.size + GPFS_FILE_SIZE


def encode_request(req: GpfsRequest) -> bytes:
    """The request's bytes (the secure side's half); a write carries its full payload field."""
    match req:
        case ReadRequest():
            return _READ_REQ.pack(
                req.cmd_id, pack_name(_path(req.path, "path"), MAX_NAME_LEN), req.offset, req.count
            )
        case WriteRequest():
            head = _WRITE_HDR.pack(
                req.cmd_id,
                pack_name(_path(req.path, "path"), MAX_NAME_LEN),
                req.offset,
                len(req.data),
                int(req.backup),
            )
            return head + req.data.ljust(GPFS_FILE_SIZE, b"\0")
        case RemoveRequest():
            return _REMOVE_REQ.pack(req.cmd_id, pack_name(_path(req.path, "path"), MAX_NAME_LEN))
        case RenameRequest():
            return _RENAME_REQ.pack(
                req.cmd_id,
                pack_name(_path(req.old, "from"), MAX_NAME_LEN),
                pack_name(_path(req.new, "to"), MAX_NAME_LEN),
            )
        case VersionRequest():
            return U32.pack(req.CMD)
        case UnsupportedRequest():
            return U32.pack(req.cmd_id)
        case _:
            raise GpfsUsageError(f"not a GPFS request record: {type(req).__name__}")


def decode_request(buf: bytes | bytearray | memoryview) -> GpfsRequest:
    """The request at the start of ``buf`` (trailing bytes are ignored)."""
    data, cmd_id = _KIT.request(buf)
    if cmd_id == GpfsCmd.GPFS_VERSION:
        return VersionRequest()
    if cmd_id not in _OP_OF:
        return UnsupportedRequest(cmd_id=cmd_id)
    op, part = _OP_OF[cmd_id]
    name = GpfsCmd(cmd_id).name
    f: tuple[Any, ...]
    match op:
        case "read":
            _KIT.need(data, _READ_REQ.size, f"{name} request")
            f = _READ_REQ.unpack_from(data, 0)
            path = _KIT.unpack_name(f[1], f"{name} path")
            return ReadRequest(partition=part, path=path, offset=f[2], count=f[3])
        case "write":
            _KIT.need(data, WRITE_REQUEST_SIZE, f"{name} request")
            f = _WRITE_HDR.unpack_from(data, 0)
            count = min(f[3], GPFS_FILE_SIZE)
            payload = data[_WRITE_HDR.size : _WRITE_HDR.size + count]
            path = _KIT.unpack_name(f[1], f"{name} path")
            return WriteRequest(
                partition=part, path=path, offset=f[2], data=payload, backup=f[4] != 0
            )
        case "remove":
            _KIT.need(data, _REMOVE_REQ.size, f"{name} request")
            f = _REMOVE_REQ.unpack_from(data, 0)
            return RemoveRequest(partition=part, path=_KIT.unpack_name(f[1], f"{name} path"))
        case _:
            _KIT.need(data, _RENAME_REQ.size, f"{name} request")
            f = _RENAME_REQ.unpack_from(data, 0)
            return RenameRequest(
                partition=part,
                old=_KIT.unpack_name(f[1], f"{name} from"),
                new=_KIT.unpack_name(f[2], f"{name} to"),
            )


# --------------------------------------------------------------------------- responses


def _err(value: object, what: str) -> int:
    return _int(value, what, I32_MIN, I32_MAX)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadResponse:
    """READ's answer: ``err`` and the bytes read (none unless ``err`` is 0)."""

    cmd_id: int
    err: int
    data: bytes

    def __post_init__(self) -> None:
        if self.cmd_id not in (GpfsCmd.DATA_FILE_READ, GpfsCmd.PERSIST_FILE_READ):
            raise GpfsUsageError(f"a read response answers a READ id, not {self.cmd_id!r}")
        _err(self.err, "READ err")
        if not isinstance(self.data, bytes):
            raise GpfsUsageError(f"READ data must be bytes, not {type(self.data).__name__}")
        if len(self.data) > GPFS_FILE_SIZE:
            raise GpfsUsageError(f"READ data is {len(self.data)} bytes; at most {GPFS_FILE_SIZE}")
        if self.err != 0 and self.data:
            raise GpfsUsageError("a failed READ carries no data")


@dataclass(frozen=True, slots=True, kw_only=True)
class WriteResponse:
    """WRITE's answer: ``err`` and how many bytes were written (0 unless ``err`` is 0)."""

    cmd_id: int
    err: int
    written: int

    def __post_init__(self) -> None:
        if self.cmd_id not in (GpfsCmd.DATA_FILE_WRITE, GpfsCmd.PERSIST_FILE_WRITE):
            raise GpfsUsageError(f"a write response answers a WRITE id, not {self.cmd_id!r}")
        _err(self.err, "WRITE err")
        _int(self.written, "WRITE count", 0, GPFS_FILE_SIZE)


@dataclass(frozen=True, slots=True, kw_only=True)
class VersionResponse:
    """GPFS_VERSION's answer."""

    version: int
    err: int

    def __post_init__(self) -> None:
        _int(self.version, "version", 0, U32_MAX)
        _err(self.err, "VERSION err")


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusResponse:
    """The 8-byte ``{id, i32 err}`` answer: REMOVE's, RENAME's and the unknown-id one."""

    cmd_id: int
    err: int

    def __post_init__(self) -> None:
        _KIT.command_field(self.cmd_id)
        if self.cmd_id in _SPECIAL_RSP:
            raise GpfsUsageError(f"{GpfsCmd(self.cmd_id).name} has its own response record")
        _err(self.err, "err")


GpfsResponse = ReadResponse | WriteResponse | VersionResponse | StatusResponse

_READ_RSP: Final = struct.Struct("<IiI")
_WRITE_RSP: Final = struct.Struct("<IiI")
_VERSION_RSP: Final = struct.Struct("<IIi")
_RSP_SIZE: Final[dict[int, int]] = {
    GpfsCmd.DATA_FILE_READ: _READ_RSP.size,
    GpfsCmd.PERSIST_FILE_READ: _READ_RSP.size,
    GpfsCmd.DATA_FILE_WRITE: _WRITE_RSP.size,
    GpfsCmd.PERSIST_FILE_WRITE: _WRITE_RSP.size,
    GpfsCmd.GPFS_VERSION: _VERSION_RSP.size,
}
_SPECIAL_RSP: Final = frozenset(_RSP_SIZE)


def response_size(cmd_id: int) -> int:
    """How many bytes the fixed part of the answer to ``cmd_id`` occupies."""
    return _KIT.response_size(cmd_id, _RSP_SIZE)


def encode_response(rsp: GpfsResponse) -> bytes:
    """The response's bytes, written over the request (a read's data follows its header)."""
    match rsp:
        case ReadResponse():
            return _READ_RSP.pack(rsp.cmd_id, rsp.err, len(rsp.data)) + rsp.data
        case WriteResponse():
            return _WRITE_RSP.pack(rsp.cmd_id, rsp.err, rsp.written)
        case VersionResponse():
            return _VERSION_RSP.pack(GpfsCmd.GPFS_VERSION, rsp.version, rsp.err)
        case StatusResponse():
            return STATUS.pack(rsp.cmd_id, rsp.err)
        case _:
            raise GpfsUsageError(f"not a GPFS response record: {type(rsp).__name__}")


def decode_response(buf: bytes | bytearray | memoryview) -> GpfsResponse:
    """The response at the start of ``buf``; its layout follows the echoed command id."""
    data, cmd_id = _KIT.response(buf, _RSP_SIZE)
    if cmd_id in (GpfsCmd.DATA_FILE_READ, GpfsCmd.PERSIST_FILE_READ):
        _, err, n = _READ_RSP.unpack_from(data, 0)
        if n > GPFS_FILE_SIZE:
            raise GpfsDecodeError(f"READ count {n} exceeds the {GPFS_FILE_SIZE}-byte buffer")
        _KIT.need(data, _READ_RSP.size + n, f"READ response of {n} bytes")
        if err != 0 and n:
            raise GpfsDecodeError(f"READ failed with err {err} but counts {n} bytes")
        return ReadResponse(cmd_id=cmd_id, err=err, data=data[_READ_RSP.size : _READ_RSP.size + n])
    if cmd_id in (GpfsCmd.DATA_FILE_WRITE, GpfsCmd.PERSIST_FILE_WRITE):
        _, err, n = _WRITE_RSP.unpack_from(data, 0)
        if n > GPFS_FILE_SIZE:
            raise GpfsDecodeError(f"WRITE count {n} exceeds the {GPFS_FILE_SIZE}-byte buffer")
        return WriteResponse(cmd_id=cmd_id, err=err, written=n)
    if cmd_id == GpfsCmd.GPFS_VERSION:
        _, version, err = _VERSION_RSP.unpack_from(data, 0)
        return VersionResponse(version=version, err=err)
    _, err = STATUS.unpack_from(data, 0)
    return StatusResponse(cmd_id=cmd_id, err=err)
