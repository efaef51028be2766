"""The FS listener's records (listener id 0xA): its numbers, enums, errors, and one frozen
record per request and response, each validating its fields when built (sans-IO).

The byte layouts, and the codec that reads and writes them, are in
:mod:`supplicant.fs_msg`, which also exports every name here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from objects import DecodeError, UsageError
from supplicant._listener_msg import (
    MessageKit,
    Record,
    StatusRecord,
    UnsupportedRecord,
    Wire,
    layout,
)

__all__ = [
    "FILE_SERVICE_BUF_LEN",
    "FILE_SERVICE_ID",
    "MAX_DATA_LEN",
    "MAX_NAME_LEN",
    "MAX_PATH_BYTES",
    "Dirent",
    "DirCloseRequest",
    "DirOpenRequest",
    "DirOpenResponse",
    "DirReadRequest",
    "DirReadResponse",
    "EndRequest",
    "FsCmd",
    "FsDecodeError",
    "FsOpenFlag",
    "FsRequest",
    "FsResponse",
    "FsResult",
    "FsUsageError",
    "CloseRequest",
    "CreatRequest",
    "GetErrnoRequest",
    "LseekRequest",
    "MkdirRequest",
    "OpenRequest",
    "ReadRequest",
    "ReadResponse",
    "RemoveRequest",
    "RenameRequest",
    "StatusResponse",
    "SyncRequest",
    "UnlinkRequest",
    "UnsupportedRequest",
    "WriteRequest",
]

FILE_SERVICE_ID: Final = 0xA
FILE_SERVICE_BUF_LEN: Final = 20 * 1024
MAX_NAME_LEN: Final = 256  # TZ_CM_MAX_NAME_LEN, NUL included
MAX_PATH_BYTES: Final = MAX_NAME_LEN - 1
MAX_DATA_LEN: Final = 20000  # TZ_CM_MAX_DATA_LEN


class FsCmd(enum.IntEnum):
    """``tz_fs_msg_cmd_type``: consecutive from FILE_START = 0x201."""

    FILE_START = 0x201
    FILE_OPEN = 0x202
    FILE_OPENAT = 0x203
    FILE_UNLINKAT = 0x204
    FILE_FCNTL = 0x205
    FILE_CREAT = 0x206
    FILE_READ = 0x207
    FILE_WRITE = 0x208
    FILE_CLOSE = 0x209
    FILE_LSEEK = 0x20A
    FILE_LINK = 0x20B
    FILE_UNLINK = 0x20C
    FILE_RMDIR = 0x20D
    FILE_FSTAT = 0x20E
    FILE_LSTAT = 0x20F
    FILE_MKDIR = 0x210
    FILE_TESTDIR = 0x211
    FILE_TELLDIR = 0x212
    FILE_REMOVE = 0x213
    FILE_CHOWN_CHMOD = 0x214
    FILE_UNUSED = 0x215
    FILE_SYNC = 0x216
    FILE_RENAME = 0x217
    FILE_PAR_FR_SIZE = 0x218
    DIR_OPEN = 0x219
    DIR_READ = 0x21A
    DIR_CLOSE = 0x21B
    FILE_GET_ERRNO = 0x21C
    FILE_END = 0x21D


class FsResult(enum.IntEnum):
    """``tz_common_error_codes``: what DIR_OPEN and DIR_READ put in ``ret``."""

    SUCCESS = 0
    FAILURE = -1
    INVALID_ARG = -2
    DIR_NOT_EXIST = -3
    PATH_TOO_LONG = -4


class FsOpenFlag(enum.IntFlag):
    """Open flags as they arrive on the wire: Linux arm64 values.

    The access mode and the CREAT, EXCL, TRUNC and APPEND bits also equal x86-64's.
    """

    O_RDONLY = 0
    O_WRONLY = 0o1
    O_RDWR = 0o2
    O_ACCMODE = 0o3
    O_CREAT = 0o100
    O_EXCL = 0o200
    O_NOCTTY = 0o400
    O_TRUNC = 0o1000
    O_APPEND = 0o2000
    O_NONBLOCK = 0o4000
    O_DSYNC = 0o10000
    O_LARGEFILE = 0o400000  # arm64
    O_CLOEXEC = 0o2000000
    O_SYNC = 0o4010000


class FsDecodeError(DecodeError):
    """FS listener bytes are malformed (the message says which command and field)."""


class FsUsageError(UsageError):
    """An FS message field or FileStore argument has the wrong type or range."""


# --------------------------------------------------------------------------- fields


_KIT: Final = MessageKit(FsDecodeError, FsUsageError, FsCmd)

#: Struct codes of a path field and of WRITE's payload and its count.
PATH: Final = f"{MAX_NAME_LEN}s"
DATA: Final = f"{MAX_DATA_LEN}sI"


def _path(value: object, what: str) -> bytes:
    """The wire bytes of a path field: at most 255 bytes, no NUL."""
    return _KIT.name_field(value, what, MAX_NAME_LEN)


def _path_wire(attr: str, label: str = "") -> Wire:
    return Wire(attr, PATH, label, kind="name")


_FD: Final = Wire("fd", "i")
_PDIR: Final = Wire("pdir", "Q")
_PATH_FIELD: Final = _path_wire("path")


@dataclass(frozen=True, slots=True, kw_only=True)
class _Record(Record):
    KIT: ClassVar[MessageKit] = _KIT


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True, kw_only=True)
class _Request(_Record):
    """A request record: ``WIRE`` lists its fields in wire order; messages name them after
    the command (``OPEN path``)."""

    CMD: ClassVar[FsCmd]

    def _prefix(self) -> str:
        return self.CMD.name.removeprefix("FILE_") + " "


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenRequest(_Request):
    """OPEN: ``open(path, flags, 0600)``."""

    CMD: ClassVar[FsCmd] = FsCmd.FILE_OPEN
    WIRE: ClassVar[tuple[Wire, ...]] = (_PATH_FIELD, Wire("flags", "i"))
    path: str
    flags: int


@dataclass(frozen=True, slots=True, kw_only=True)
class CreatRequest(_Request):
    """CREAT: ``creat(path, mode)``, that is O_WRONLY | O_CREAT | O_TRUNC."""

    CMD: ClassVar[FsCmd] = FsCmd.FILE_CREAT
    WIRE: ClassVar[tuple[Wire, ...]] = (_PATH_FIELD, Wire("mode", "I"))
    path: str
    mode: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadRequest(_Request):
    """READ: up to ``count`` bytes (the service clamps it to 20000)."""

    CMD: ClassVar[FsCmd] = FsCmd.FILE_READ
    WIRE: ClassVar[tuple[Wire, ...]] = (_FD, Wire("count", "I"))
    fd: int
    count: int


@dataclass(frozen=True, slots=True, kw_only=True)
class WriteRequest(_Request):
    """WRITE: ``data`` (at most 20000 bytes; ``count`` on the wire is its length)."""

    CMD: ClassVar[FsCmd] = FsCmd.FILE_WRITE
    WIRE: ClassVar[tuple[Wire, ...]] = (_FD, Wire("data", DATA, kind="bytes", hi=MAX_DATA_LEN))
    fd: int
    data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class CloseRequest(_Request):
    """CLOSE: close ``fd``."""

    CMD: ClassVar[FsCmd] = FsCmd.FILE_CLOSE
    WIRE: ClassVar[tuple[Wire, ...]] = (_FD,)
    fd: int


@dataclass(frozen=True, slots=True, kw_only=True)
class LseekRequest(_Request):
    """LSEEK: ``lseek(fd, offset, whence)`` with a 32-bit offset."""

    CMD: ClassVar[FsCmd] = FsCmd.FILE_LSEEK
    WIRE: ClassVar[tuple[Wire, ...]] = (_FD, Wire("offset", "i"), Wire("whence", "i"))
    fd: int
    offset: int
    whence: int


@dataclass(frozen=True, slots=True, kw_only=True)
class UnlinkRequest(_Request):
    """UNLINK: remove a file."""

    CMD: ClassVar[FsCmd] = FsCmd.FILE_UNLINK
    WIRE: ClassVar[tuple[Wire, ...]] = (_PATH_FIELD,)
    path: str


@dataclass(frozen=True, slots=True, kw_only=True)
class MkdirRequest(_Request):
    """MKDIR: create a directory and any missing parents."""

    CMD: ClassVar[FsCmd] = FsCmd.FILE_MKDIR
    WIRE: ClassVar[tuple[Wire, ...]] = (_PATH_FIELD, Wire("mode", "I"))
    path: str
    mode: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoveRequest(_Request):
    """REMOVE: remove a file or a directory."""

    CMD: ClassVar[FsCmd] = FsCmd.FILE_REMOVE
    WIRE: ClassVar[tuple[Wire, ...]] = (_PATH_FIELD,)
    path: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncRequest(_Request):
    """SYNC: ``fsync(fd)``; here it commits the pending contents."""

    CMD: ClassVar[FsCmd] = FsCmd.FILE_SYNC
    WIRE: ClassVar[tuple[Wire, ...]] = (_FD,)
    fd: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RenameRequest(_Request):
    """RENAME: ``rename(old, new)``."""

    CMD: ClassVar[FsCmd] = FsCmd.FILE_RENAME
    WIRE: ClassVar[tuple[Wire, ...]] = (
        _path_wire("old", "old path"),
        _path_wire("new", "new path"),
    )
    old: str
    new: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DirOpenRequest(_Request):
    """DIR_OPEN: open a directory stream; the answer is an opaque u64 handle."""

    CMD: ClassVar[FsCmd] = FsCmd.DIR_OPEN
    WIRE: ClassVar[tuple[Wire, ...]] = (_PATH_FIELD,)
    path: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DirReadRequest(_Request):
    """DIR_READ: the next entry of stream ``pdir``."""

    CMD: ClassVar[FsCmd] = FsCmd.DIR_READ
    WIRE: ClassVar[tuple[Wire, ...]] = (_PDIR,)
    pdir: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DirCloseRequest(_Request):
    """DIR_CLOSE: close stream ``pdir``."""

    CMD: ClassVar[FsCmd] = FsCmd.DIR_CLOSE
    WIRE: ClassVar[tuple[Wire, ...]] = (_PDIR,)
    pdir: int


@dataclass(frozen=True, slots=True, kw_only=True)
class GetErrnoRequest(_Request):
    """GET_ERRNO: the errno of the last failed call (0 if none failed yet)."""

    CMD: ClassVar[FsCmd] = FsCmd.FILE_GET_ERRNO


@dataclass(frozen=True, slots=True, kw_only=True)
class EndRequest(_Request):
    """END: a no-op that answers 0."""

    CMD: ClassVar[FsCmd] = FsCmd.FILE_END


@dataclass(frozen=True, slots=True, kw_only=True)
class UnsupportedRequest(UnsupportedRecord):
    """Any id this model does not implement, known (FSTAT, ...) or not."""

    KIT: ClassVar[MessageKit] = _KIT


FsRequest = (
    OpenRequest
    | CreatRequest
    | ReadRequest
    | WriteRequest
    | CloseRequest
    | LseekRequest
    | UnlinkRequest
    | MkdirRequest
    | RemoveRequest
    | SyncRequest
    | RenameRequest
    | DirOpenRequest
    | DirReadRequest
    | DirCloseRequest
    | GetErrnoRequest
    | EndRequest
    | UnsupportedRequest
)


# --------------------------------------------------------------------------- responses


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusResponse(StatusRecord):
    """The 8-byte ``{id, i32 ret}`` answer of every command but READ and DIR_OPEN/READ."""

    KIT: ClassVar[MessageKit] = _KIT


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadResponse(_Record):
    """READ's answer: ``data`` (``ret`` bytes of it) or ``ret`` < 0 and no data."""

    CMD: ClassVar[FsCmd] = FsCmd.FILE_READ
    WIRE: ClassVar[tuple[Wire, ...]] = (
        Wire("data", f"{MAX_DATA_LEN}s", kind="own"),
        Wire("ret", "i", "READ ret", hi=MAX_DATA_LEN),
    )
    data: bytes
    ret: int

    def _check(self) -> None:
        if not isinstance(self.data, bytes):
            raise FsUsageError(f"READ data must be bytes, not {type(self.data).__name__}")
        want = max(self.ret, 0)
        if len(self.data) != want:
            raise FsUsageError(f"READ data is {len(self.data)} bytes but ret is {self.ret}")

    @classmethod
    def decode(cls, data: bytes, cmd_id: int) -> ReadResponse:
        """READ's answer; a ``ret`` past the buffer is a decode error."""
        fields = cls.fields_from(data, cmd_id)
        ret = fields["ret"]
        if ret > MAX_DATA_LEN:
            raise FsDecodeError(f"READ ret {ret} exceeds the {MAX_DATA_LEN}-byte buffer")
        return cls(data=fields["data"][: max(ret, 0)], ret=ret)


@dataclass(frozen=True, slots=True, kw_only=True)
class DirOpenResponse(_Record):
    """DIR_OPEN's answer: an opaque non-zero handle, or 0 and an ``FsResult`` < 0."""

    CMD: ClassVar[FsCmd] = FsCmd.DIR_OPEN
    PREFIX: ClassVar[str] = "DIR_OPEN "
    WIRE: ClassVar[tuple[Wire, ...]] = (_PDIR, Wire("ret", "i"))
    pdir: int
    ret: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Dirent(_Record):
    """``tz_dirent``: one directory entry (``ino`` is never 0: 0 marks the end)."""

    WIRE: ClassVar[tuple[Wire, ...]] = (
        Wire("ino", "Q", "d_ino", lo=1),
        Wire("off", "q", "d_off"),
        Wire("reclen", "H", "d_reclen"),
        Wire("type", "B", "d_type"),
        _path_wire("name", "d_name"),
    )
    ino: int
    off: int
    reclen: int
    type: int
    name: str

    def _check(self) -> None:
        if not self.name or "/" in self.name:
            raise FsUsageError(f"d_name {self.name!r} must be one non-empty path component")


#: A DIR_READ answer's ``tz_dirent`` field: all zeros at the end of the stream.
_NO_ENTRY: Final = (0, 0, 0, 0, b"")


@dataclass(frozen=True, slots=True, kw_only=True)
class DirReadResponse(_Record):
    """DIR_READ's answer: an entry, or ``None`` at the end of the stream."""

    CMD: ClassVar[FsCmd] = FsCmd.DIR_READ
    WIRE: ClassVar[tuple[Wire, ...]] = (
        Wire("entry", f"QqHB{MAX_NAME_LEN}s", kind="own"),
        Wire("ret", "i", "DIR_READ ret"),
    )
    entry: Dirent | None
    ret: int

    def _check(self) -> None:
        if self.entry is not None and not isinstance(self.entry, Dirent):
            raise FsUsageError(f"entry must be a Dirent or None, not {type(self.entry).__name__}")
        if self.ret != 0 and self.entry is not None:
            raise FsUsageError("a failed DIR_READ carries no entry")

    def pack_fields(self) -> tuple[Any, ...]:
        """The entry's fields (zeros when there is none), then ``ret``."""
        entry = _NO_ENTRY if self.entry is None else self.entry.pack_fields()
        return (*entry, self.ret)

    @classmethod
    def decode(cls, data: bytes, cmd_id: int) -> DirReadResponse:
        """DIR_READ's answer: ``ret`` != 0 or ``d_ino`` = 0 carries no entry."""
        _, ino, off, reclen, dtype, name, ret = layout(cls).unpack_from(data, 0)
        if ret != 0 or ino == 0:
            return cls(entry=None, ret=ret)
        text = _KIT.unpack_name(name, "DIR_READ d_name")
        if not text or "/" in text:
            raise FsDecodeError(f"DIR_READ d_name {text!r} is not one path component")
        entry = Dirent(ino=ino, off=off, reclen=reclen, type=dtype, name=text)
        return cls(entry=entry, ret=ret)


FsResponse = StatusResponse | ReadResponse | DirOpenResponse | DirReadResponse
