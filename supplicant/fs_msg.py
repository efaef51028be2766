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

This module is the codec; the records, enums and limits are in
:mod:`supplicant._fs_records`, and every name is importable here.
"""

from __future__ import annotations

import struct
from typing import Any, Final

from supplicant._fs_records import (
    _KIT,
    _REQ_BY_CMD,
    FILE_SERVICE_BUF_LEN,
    FILE_SERVICE_ID,
    MAX_DATA_LEN,
    MAX_NAME_LEN,
    MAX_PATH_BYTES,
    CloseRequest,
    CreatRequest,
    DirCloseRequest,
    Dirent,
    DirOpenRequest,
    DirOpenResponse,
    DirReadRequest,
    DirReadResponse,
    EndRequest,
    FsCmd,
    FsDecodeError,
    FsOpenFlag,
    FsRequest,
    FsResponse,
    FsResult,
    FsUsageError,
    GetErrnoRequest,
    LseekRequest,
    MkdirRequest,
    OpenRequest,
    ReadRequest,
    ReadResponse,
    RemoveRequest,
    RenameRequest,
    StatusResponse,
    SyncRequest,
    UnlinkRequest,
    UnsupportedRequest,
    WriteRequest,
    _int,
    _path,
)
from supplicant._listener_msg import (
    STATUS,
    U32,
    U32_MAX,
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


_STATUS: Final = STATUS
_READ_RSP = struct.Struct(f"<I{MAX_DATA_LEN}si")
_DIR_OPEN_RSP = struct.Struct("<IQi")
_DIR_READ_RSP = struct.Struct("<IQqHB256si")
_RSP_SIZE: Final[dict[int, int]] = {
    FsCmd.FILE_READ: _READ_RSP.size,
    FsCmd.DIR_OPEN: _DIR_OPEN_RSP.size,
    FsCmd.DIR_READ: _DIR_READ_RSP.size,
}


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
