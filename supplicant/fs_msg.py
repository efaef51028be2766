"""The FS listener's messages (listener id 0xA), byte for byte (sans-IO).

QTEE's file-storage listener shares one 20 KiB buffer with the supplicant.  A request is
written at its start and the response is written over it, in place.  Both begin with a
u32 command id, and the response echoes the request's id.  Every struct is packed and
little-endian (the supplicant runs on aarch64).

**Where the numbers come from.**  The numbers and layouts below are the ones in
``qualcomm-linux/pkg-minkipc:listeners/libfsservice/fs/fs_msg.h`` and ``cmn/cmn.h``
(commit ``4dbe8a3``).  The behaviour comes from ``fs/fs.c`` and ``fs/fs_main.c``
(``6652928``).  Only facts were taken: numbers, field order and sizes.  Names are
``TZ_CM_MAX_NAME_LEN`` = 256 (path and name fields, NUL-terminated) and
``TZ_CM_MAX_DATA_LEN`` = 20000 (the read and write payload).

=====  ==========  ==============================================  =====================
 id     command     request after the u32 id (size)                response after the id
=====  ==========  ==============================================  =====================
0x202  OPEN        char path[256], i32 flags (264)                 i32 ret (8)
0x206  CREAT       char path[256], u32 mode (264)                  i32 ret (8)
0x207  READ        i32 fd, u32 count (12)                          u8 buf[20000], i32 ret
0x208  WRITE       i32 fd, u8 buf[20000], u32 count (20012)        i32 ret (8)
0x209  CLOSE       i32 fd (8)                                      i32 ret (8)
0x20A  LSEEK       i32 fd, i32 offset, i32 whence (16)             i32 ret (8)
0x20C  UNLINK      char path[256] (260)                            i32 ret (8)
0x210  MKDIR       char path[256], u32 mode (264)                  i32 ret (8)
0x213  REMOVE      char path[256] (260)                            i32 ret (8)
0x216  SYNC        i32 fd (8)                                      i32 ret (8)
0x217  RENAME      char old[256], char new[256] (516)              i32 ret (8)
0x219  DIR_OPEN    char path[256] (260)                            u64 pdir, i32 ret (16)
0x21A  DIR_READ    u64 pdir (12)                                   tz_dirent, i32 ret (283)
0x21B  DIR_CLOSE   u64 pdir (12)                                   i32 ret (8)
0x21C  GET_ERRNO   nothing (4)                                     i32 ret = errno (8)
0x21D  END         nothing (4)                                     i32 ret = 0 (8)
=====  ==========  ==============================================  =====================

``tz_dirent`` is ``u64 d_ino, i64 d_off, u16 d_reclen, u8 d_type, char d_name[256]`` (275
bytes).  End of stream is ``ret`` = 0 with ``d_ino`` = 0.  The other ids in
:class:`FsCmd` (OPENAT, FCNTL, FSTAT, ...) are real, but this model does not implement
them.  They decode to :class:`UnsupportedRequest`, and so does any unknown id.  They are
answered with the generic 8-byte ``{id, ret = -1}`` response, which is what the real
service writes for an unknown id.

**Result convention (the real one).**  A failed call answers ``ret`` = -1 and remembers
the errno.  The secure side fetches that errno with GET_ERRNO.  DIR_OPEN and DIR_READ
instead answer the ``E_FS_*`` codes (:class:`FsResult`).  READ and WRITE clamp ``count``
to 20000, as the real service does.

Decoding a request accepts trailing bytes, because the listener hands over the whole
shared buffer.  Decoders raise only :class:`FsDecodeError`, whatever the bytes.  Records
validate their fields when they are built and raise :class:`FsUsageError`.
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
    I64_MAX,
    I64_MIN,
    STATUS,
    U32,
    U32_MAX,
    U64_MAX,
    MessageKit,
    pack_name,
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
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "response_size",
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


# --------------------------------------------------------------------------- validation


_KIT: Final = MessageKit(FsDecodeError, FsUsageError)
_int = _KIT.int_field


def _path(value: object, what: str) -> bytes:
    """The wire bytes of a path field: at most 255 bytes, no NUL."""
    return _KIT.name_field(value, what, MAX_NAME_LEN)


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenRequest:
    """OPEN: ``open(path, flags, 0600)``."""

    CMD: ClassVar[FsCmd] = FsCmd.FILE_OPEN
    path: str
    flags: int

    def __post_init__(self) -> None:
        _path(self.path, "OPEN path")
        _int(self.flags, "OPEN flags", I32_MIN, I32_MAX)


@dataclass(frozen=True, slots=True, kw_only=True)
class CreatRequest:
    """CREAT: ``creat(path, mode)``, that is O_WRONLY | O_CREAT | O_TRUNC."""

    CMD: ClassVar[FsCmd] = FsCmd.FILE_CREAT
    path: str
    mode: int

    def __post_init__(self) -> None:
        _path(self.path, "CREAT path")
        _int(self.mode, "CREAT mode", 0, U32_MAX)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadRequest:
    """READ: up to ``count`` bytes (the service clamps it to 20000)."""

    CMD: ClassVar[FsCmd] = FsCmd.FILE_READ
    fd: int
    count: int

    def __post_init__(self) -> None:
        _int(self.fd, "READ fd", I32_MIN, I32_MAX)
        _int(self.count, "READ count", 0, U32_MAX)


@dataclass(frozen=True, slots=True, kw_only=True)
class WriteRequest:
    """WRITE: ``data`` (at most 20000 bytes; ``count`` on the wire is its length)."""

    CMD: ClassVar[FsCmd] = FsCmd.FILE_WRITE
    fd: int
    data: bytes

    def __post_init__(self) -> None:
        _int(self.fd, "WRITE fd", I32_MIN, I32_MAX)
        if not isinstance(self.data, bytes):
            raise FsUsageError(f"WRITE data must be bytes, not {type(self.data).__name__}")
        if len(self.data) > MAX_DATA_LEN:
            raise FsUsageError(f"WRITE data is {len(self.data)} bytes; at most {MAX_DATA_LEN}")


@dataclass(frozen=True, slots=True, kw_only=True)
class CloseRequest:
    """CLOSE: close ``fd``."""

    CMD: ClassVar[FsCmd] = FsCmd.FILE_CLOSE
    fd: int

    def __post_init__(self) -> None:
        _int(self.fd, "CLOSE fd", I32_MIN, I32_MAX)


@dataclass(frozen=True, slots=True, kw_only=True)
class LseekRequest:
    """LSEEK: ``lseek(fd, offset, whence)`` with a 32-bit offset."""

    CMD: ClassVar[FsCmd] = FsCmd.FILE_LSEEK
    fd: int
    offset: int
    whence: int

    def __post_init__(self) -> None:
        _int(self.fd, "LSEEK fd", I32_MIN, I32_MAX)
        _int(self.offset, "LSEEK offset", I32_MIN, I32_MAX)
        _int(self.whence, "LSEEK whence", I32_MIN, I32_MAX)


@dataclass(frozen=True, slots=True, kw_only=True)
class UnlinkRequest:
    """UNLINK: remove a file."""

    CMD: ClassVar[FsCmd] = FsCmd.FILE_UNLINK
    path: str

    def __post_init__(self) -> None:
        _path(self.path, "UNLINK path")


@dataclass(frozen=True, slots=True, kw_only=True)
class MkdirRequest:
    """MKDIR: create a directory and any missing parents."""

    CMD: ClassVar[FsCmd] = FsCmd.FILE_MKDIR
    path: str
    mode: int

    def __post_init__(self) -> None:
        _path(self.path, "MKDIR path")
        _int(self.mode, "MKDIR mode", 0, U32_MAX)


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoveRequest:
    """REMOVE: remove a file or a directory."""

    CMD: ClassVar[FsCmd] = FsCmd.FILE_REMOVE
    path: str

    def __post_init__(self) -> None:
        _path(self.path, "REMOVE path")


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncRequest:
    """SYNC: ``fsync(fd)``; here it commits the pending contents."""

    CMD: ClassVar[FsCmd] = FsCmd.FILE_SYNC
    fd: int

    def __post_init__(self) -> None:
        _int(self.fd, "SYNC fd", I32_MIN, I32_MAX)


@dataclass(frozen=True, slots=True, kw_only=True)
class RenameRequest:
    """RENAME: ``rename(old, new)``."""

    CMD: ClassVar[FsCmd] = FsCmd.FILE_RENAME
    old: str
    new: str

    def __post_init__(self) -> None:
        _path(self.old, "RENAME old path")
        _path(self.new, "RENAME new path")


@dataclass(frozen=True, slots=True, kw_only=True)
class DirOpenRequest:
    """DIR_OPEN: open a directory stream; the answer is an opaque u64 handle."""

    CMD: ClassVar[FsCmd] = FsCmd.DIR_OPEN
    path: str

    def __post_init__(self) -> None:
        _path(self.path, "DIR_OPEN path")


@dataclass(frozen=True, slots=True, kw_only=True)
class DirReadRequest:
    """DIR_READ: the next entry of stream ``pdir``."""

    CMD: ClassVar[FsCmd] = FsCmd.DIR_READ
    pdir: int

    def __post_init__(self) -> None:
        _int(self.pdir, "DIR_READ pdir", 0, U64_MAX)


@dataclass(frozen=True, slots=True, kw_only=True)
class DirCloseRequest:
    """DIR_CLOSE: close stream ``pdir``."""

    CMD: ClassVar[FsCmd] = FsCmd.DIR_CLOSE
    pdir: int

    def __post_init__(self) -> None:
        _int(self.pdir, "DIR_CLOSE pdir", 0, U64_MAX)


@dataclass(frozen=True, slots=True, kw_only=True)
class GetErrnoRequest:
    """GET_ERRNO: the errno of the last failed call (0 if none failed yet)."""

    CMD: ClassVar[FsCmd] = FsCmd.FILE_GET_ERRNO


@dataclass(frozen=True, slots=True, kw_only=True)
class EndRequest:
    """END: a no-op that answers 0."""

    CMD: ClassVar[FsCmd] = FsCmd.FILE_END


@dataclass(frozen=True, slots=True, kw_only=True)
class UnsupportedRequest:
    """Any id this model does not implement, known (FSTAT, ...) or not."""

    cmd_id: int

    def __post_init__(self) -> None:
        _int(self.cmd_id, "command id", 0, U32_MAX)
        if self.cmd_id in _REQ_BY_CMD:
            raise FsUsageError(f"command {self.cmd_id:#x} is supported; use its own record")


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

# Layouts after the u32 id; "256s" is a NUL-terminated path field.
_REQ_LAYOUT: Final[dict[FsCmd, str]] = {
    FsCmd.FILE_OPEN: "<256si",
    FsCmd.FILE_CREAT: "<256sI",
    FsCmd.FILE_READ: "<iI",
    FsCmd.FILE_WRITE: f"<i{MAX_DATA_LEN}sI",
    FsCmd.FILE_CLOSE: "<i",
    FsCmd.FILE_LSEEK: "<iii",
    FsCmd.FILE_UNLINK: "<256s",
    FsCmd.FILE_MKDIR: "<256sI",
    FsCmd.FILE_REMOVE: "<256s",
    FsCmd.FILE_SYNC: "<i",
    FsCmd.FILE_RENAME: "<256s256s",
    FsCmd.DIR_OPEN: "<256s",
    FsCmd.DIR_READ: "<Q",
    FsCmd.DIR_CLOSE: "<Q",
    FsCmd.FILE_GET_ERRNO: "<",
    FsCmd.FILE_END: "<",
}
_REQ_STRUCT: Final = {cmd: struct.Struct(fmt) for cmd, fmt in _REQ_LAYOUT.items()}
_REQ_BY_CMD: Final[dict[int, type]] = {
    cls.CMD: cls
    for cls in (
        OpenRequest,
        CreatRequest,
        ReadRequest,
        WriteRequest,
        CloseRequest,
        LseekRequest,
        UnlinkRequest,
        MkdirRequest,
        RemoveRequest,
        SyncRequest,
        RenameRequest,
        DirOpenRequest,
        DirReadRequest,
        DirCloseRequest,
        GetErrnoRequest,
        EndRequest,
    )
}
_U32: Final = U32


def _pack_path(raw: bytes) -> bytes:
    return pack_name(raw, MAX_NAME_LEN)


_unpack_path = _KIT.unpack_name


def encode_request(req: FsRequest) -> bytes:
    """The request's bytes, exactly its struct's size (the secure side's half)."""
    if isinstance(req, UnsupportedRequest):
        return _U32.pack(req.cmd_id)
    if type(req) not in _REQ_BY_CMD.values():
        raise FsUsageError(f"not an FS request record: {type(req).__name__}")
    cmd = req.CMD
    s = _REQ_STRUCT[cmd]
    fields: tuple[object, ...]
    match req:
        case OpenRequest():
            fields = (_pack_path(_path(req.path, "path")), req.flags)
        case CreatRequest() | MkdirRequest():
            fields = (_pack_path(_path(req.path, "path")), req.mode)
        case ReadRequest():
            fields = (req.fd, req.count)
        case WriteRequest():
            fields = (req.fd, req.data.ljust(MAX_DATA_LEN, b"\0"), len(req.data))
        case CloseRequest() | SyncRequest():
            fields = (req.fd,)
        case LseekRequest():
            fields = (req.fd, req.offset, req.whence)
        case UnlinkRequest() | RemoveRequest() | DirOpenRequest():
            fields = (_pack_path(_path(req.path, "path")),)
        case RenameRequest():
            fields = (_pack_path(_path(req.old, "old")), _pack_path(_path(req.new, "new")))
        case DirReadRequest() | DirCloseRequest():
            fields = (req.pdir,)
        case _:
            fields = ()
    return _U32.pack(cmd) + s.pack(*fields)


_buffer = _KIT.buffer


def decode_request(buf: bytes | bytearray | memoryview) -> FsRequest:
    """The request at the start of ``buf`` (trailing bytes are ignored)."""
    data = _buffer(buf, "request")
    cmd_id = _KIT.command_id(data, "request")
    if cmd_id not in _REQ_BY_CMD:
        return UnsupportedRequest(cmd_id=cmd_id)
    cmd = FsCmd(cmd_id)
    s = _REQ_STRUCT[cmd]
    _KIT.need(data, 4 + s.size, f"{cmd.name} request")
    try:
        return _build_request(cmd, s.unpack_from(data, 4))
    except FsUsageError as exc:  # defensive: the layouts above cannot produce one
        raise FsDecodeError(f"{cmd.name} request: {exc}") from None


def _build_request(cmd: FsCmd, f: tuple[Any, ...]) -> FsRequest:
    name = cmd.name
    match cmd:
        case FsCmd.FILE_OPEN:
            return OpenRequest(path=_unpack_path(f[0], f"{name} path"), flags=f[1])
        case FsCmd.FILE_CREAT:
            return CreatRequest(path=_unpack_path(f[0], f"{name} path"), mode=f[1])
        case FsCmd.FILE_MKDIR:
            return MkdirRequest(path=_unpack_path(f[0], f"{name} path"), mode=f[1])
        case FsCmd.FILE_READ:
            return ReadRequest(fd=f[0], count=f[1])
        case FsCmd.FILE_WRITE:
            return WriteRequest(fd=f[0], data=f[1][: min(f[2], MAX_DATA_LEN)])
        case FsCmd.FILE_CLOSE:
            return CloseRequest(fd=f[0])
        case FsCmd.FILE_SYNC:
            return SyncRequest(fd=f[0])
        case FsCmd.FILE_LSEEK:
            return LseekRequest(fd=f[0], offset=f[1], whence=f[2])
        case FsCmd.FILE_UNLINK:
            return UnlinkRequest(path=_unpack_path(f[0], f"{name} path"))
        case FsCmd.FILE_REMOVE:
            return RemoveRequest(path=_unpack_path(f[0], f"{name} path"))
        case FsCmd.DIR_OPEN:
            return DirOpenRequest(path=_unpack_path(f[0], f"{name} path"))
        case FsCmd.FILE_RENAME:
            return RenameRequest(
                old=_unpack_path(f[0], f"{name} old path"),
                new=_unpack_path(f[1], f"{name} new path"),
            )
        case FsCmd.DIR_READ:
            return DirReadRequest(pdir=f[0])
        case FsCmd.DIR_CLOSE:
            return DirCloseRequest(pdir=f[0])
        case FsCmd.FILE_GET_ERRNO:
            return GetErrnoRequest()
        case _:
            return EndRequest()


# --------------------------------------------------------------------------- responses


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusResponse:
    """The 8-byte ``{id, i32 ret}`` answer of every command but READ and DIR_OPEN/READ."""

    cmd_id: int
    ret: int

    def __post_init__(self) -> None:
        _int(self.cmd_id, "command id", 0, U32_MAX)
        if self.cmd_id in _SPECIAL_RSP:
            raise FsUsageError(f"{FsCmd(self.cmd_id).name} has its own response record")
        _int(self.ret, "ret", I32_MIN, I32_MAX)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadResponse:
    """READ's answer: ``data`` (``ret`` bytes of it) or ``ret`` < 0 and no data."""

    data: bytes
    ret: int

    def __post_init__(self) -> None:
        _int(self.ret, "READ ret", I32_MIN, MAX_DATA_LEN)
        if not isinstance(self.data, bytes):
            raise FsUsageError(f"READ data must be bytes, not {type(self.data).__name__}")
        want = max(self.ret, 0)
        if len(self.data) != want:
            raise FsUsageError(f"READ data is {len(self.data)} bytes but ret is {self.ret}")


@dataclass(frozen=True, slots=True, kw_only=True)
class DirOpenResponse:
    """DIR_OPEN's answer: an opaque non-zero handle, or 0 and an ``FsResult`` < 0."""

    pdir: int
    ret: int

    def __post_init__(self) -> None:
        _int(self.pdir, "DIR_OPEN pdir", 0, U64_MAX)
        _int(self.ret, "DIR_OPEN ret", I32_MIN, I32_MAX)


@dataclass(frozen=True, slots=True, kw_only=True)
class Dirent:
    """``tz_dirent``: one directory entry (``ino`` is never 0: 0 marks the end)."""

    ino: int
    off: int
    reclen: int
    type: int
    name: str

    def __post_init__(self) -> None:
        _int(self.ino, "d_ino", 1, U64_MAX)
        _int(self.off, "d_off", I64_MIN, I64_MAX)
        _int(self.reclen, "d_reclen", 0, 0xFFFF)
        _int(self.type, "d_type", 0, 0xFF)
        raw = _path(self.name, "d_name")
        if not raw or b"/" in raw:
            raise FsUsageError(f"d_name {self.name!r} must be one non-empty path component")


@dataclass(frozen=True, slots=True, kw_only=True)
class DirReadResponse:
    """DIR_READ's answer: an entry, or ``None`` at the end of the stream."""

    entry: Dirent | None
    ret: int

    def __post_init__(self) -> None:
        _int(self.ret, "DIR_READ ret", I32_MIN, I32_MAX)
        if self.entry is not None and not isinstance(self.entry, Dirent):
            raise FsUsageError(f"entry must be a Dirent or None, not {type(self.entry).__name__}")
        if self.ret != 0 and self.entry is not None:
            raise FsUsageError("a failed DIR_READ carries no entry")


FsResponse = StatusResponse | ReadResponse | DirOpenResponse | DirReadResponse

_STATUS: Final = STATUS
_READ_RSP = struct.Struct(f"<I{MAX_DATA_LEN}si")
_DIR_OPEN_RSP = struct.Struct("<IQi")
_DIR_READ_RSP = struct.Struct("<IQqHB256si")
_RSP_SIZE: Final[dict[int, int]] = {
    FsCmd.FILE_READ: _READ_RSP.size,
    FsCmd.DIR_OPEN: _DIR_OPEN_RSP.size,
    FsCmd.DIR_READ: _DIR_READ_RSP.size,
}
_SPECIAL_RSP: Final = frozenset(_RSP_SIZE)


def response_size(cmd_id: int) -> int:
    """How many bytes the answer to ``cmd_id`` occupies."""
    _int(cmd_id, "command id", 0, U32_MAX)
    return _RSP_SIZE.get(cmd_id, _STATUS.size)


def encode_response(rsp: FsResponse) -> bytes:
    """The response's bytes, to be written over the request (the supplicant's half)."""
    match rsp:
        case StatusResponse():
            return _STATUS.pack(rsp.cmd_id, rsp.ret)
        case ReadResponse():
            return _READ_RSP.pack(FsCmd.FILE_READ, rsp.data, rsp.ret)
        case DirOpenResponse():
            return _DIR_OPEN_RSP.pack(FsCmd.DIR_OPEN, rsp.pdir, rsp.ret)
        case DirReadResponse():
            e = rsp.entry
            if e is None:
                return _DIR_READ_RSP.pack(FsCmd.DIR_READ, 0, 0, 0, 0, b"", rsp.ret)
            name = _pack_path(_path(e.name, "d_name"))
            return _DIR_READ_RSP.pack(FsCmd.DIR_READ, e.ino, e.off, e.reclen, e.type, name, rsp.ret)
        case _:
            raise FsUsageError(f"not an FS response record: {type(rsp).__name__}")


def decode_response(buf: bytes | bytearray | memoryview) -> FsResponse:
    """The response at the start of ``buf``; its layout follows the echoed command id."""
    data = _buffer(buf, "response")
    cmd_id = _KIT.command_id(data, "response")
    _KIT.need(data, response_size(cmd_id), f"response to {cmd_id:#x}")
    if cmd_id == FsCmd.FILE_READ:
        _, payload, ret = _READ_RSP.unpack_from(data, 0)
        if ret > MAX_DATA_LEN:
            raise FsDecodeError(f"READ ret {ret} exceeds the {MAX_DATA_LEN}-byte buffer")
        return ReadResponse(data=payload[: max(ret, 0)], ret=ret)
    if cmd_id == FsCmd.DIR_OPEN:
        _, pdir, ret = _DIR_OPEN_RSP.unpack_from(data, 0)
        return DirOpenResponse(pdir=pdir, ret=ret)
    if cmd_id == FsCmd.DIR_READ:
        _, ino, off, reclen, dtype, name, ret = _DIR_READ_RSP.unpack_from(data, 0)
        if ret != 0 or ino == 0:
            return DirReadResponse(entry=None, ret=ret)
        text = _unpack_path(name, "DIR_READ d_name")
        if not text or "/" in text:
            raise FsDecodeError(f"DIR_READ d_name {text!r} is not one path component")
        entry = Dirent(ino=ino, off=off, reclen=reclen, type=dtype, name=text)
        return DirReadResponse(entry=entry, ret=ret)
    _, ret = _STATUS.unpack_from(data, 0)
    return StatusResponse(cmd_id=cmd_id, ret=ret)
