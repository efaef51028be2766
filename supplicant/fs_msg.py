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

from supplicant import _fs_records
from supplicant._fs_records import *  # noqa: F403  (every record name: see _fs_records.__all__)
from supplicant._fs_records import (
    _KIT,
    _REQ_BY_CMD,
    DATA,
    MAX_DATA_LEN,
    MAX_NAME_LEN,
    PATH,
    Dirent,
    DirOpenResponse,
    DirReadResponse,
    FsCmd,
    FsDecodeError,
    FsRequest,
    FsResponse,
    FsUsageError,
    ReadResponse,
    StatusResponse,
    UnsupportedRequest,
    _path,
)
from supplicant._listener_msg import STATUS, U32, pack_name

__all__ = [
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "response_size",
]
__all__ += _fs_records.__all__

# Each request's layout after the u32 id, from its record's field table.
_REQ_STRUCT: Final = {
    cmd: struct.Struct("<" + "".join(wire.code for wire in cls.WIRE))
    for cmd, cls in _REQ_BY_CMD.items()
}


def _pack_path(raw: bytes) -> bytes:
    return pack_name(raw, MAX_NAME_LEN)


_unpack_path = _KIT.unpack_name


def encode_request(req: FsRequest) -> bytes:
    """The request's bytes, exactly its struct's size (the secure side's half)."""
    if isinstance(req, UnsupportedRequest):
        return U32.pack(req.cmd_id)
    if type(req) not in _REQ_BY_CMD.values():
        raise FsUsageError(f"not an FS request record: {type(req).__name__}")
    fields: list[object] = []
    for wire in req.WIRE:
        value = getattr(req, wire.attr)
        if wire.code == PATH:
            fields.append(_pack_path(_path(value, wire.attr)))
        elif wire.code == DATA:
            fields += (value.ljust(MAX_DATA_LEN, b"\0"), len(value))
        else:
            fields.append(value)
    return U32.pack(req.CMD) + _REQ_STRUCT[req.CMD].pack(*fields)


def decode_request(buf: bytes | bytearray | memoryview) -> FsRequest:
    """The request at the start of ``buf`` (trailing bytes are ignored)."""
    data, cmd_id = _KIT.request(buf)
    cls = _REQ_BY_CMD.get(cmd_id)
    if cls is None:
        return UnsupportedRequest(cmd_id=cmd_id)
    cmd = cls.CMD
    s = _REQ_STRUCT[cmd]
    _KIT.need(data, 4 + s.size, f"{cmd.name} request")
    values = iter(s.unpack_from(data, 4))
    fields: dict[str, Any] = {}
    for wire in cls.WIRE:
        value = next(values)
        if wire.code == PATH:
            value = _unpack_path(value, f"{cmd.name} {wire.what}")
        elif wire.code == DATA:
            value = value[: min(next(values), MAX_DATA_LEN)]
        fields[wire.attr] = value
    try:
        return cls(**fields)
    except FsUsageError as exc:  # defensive: the layouts above cannot produce one
        raise FsDecodeError(f"{cmd.name} request: {exc}") from None


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
    return _KIT.response_size(cmd_id, _RSP_SIZE)


def encode_response(rsp: FsResponse) -> bytes:
    """The response's bytes, to be written over the request (the supplicant's half)."""
    match rsp:
        case StatusResponse():
            return STATUS.pack(rsp.cmd_id, rsp.ret)
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
    data, cmd_id = _KIT.response(buf, _RSP_SIZE)
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
    _, ret = STATUS.unpack_from(data, 0)
    return StatusResponse(cmd_id=cmd_id, ret=ret)
