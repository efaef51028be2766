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

from typing import Final

from supplicant import _fs_records
from supplicant._fs_records import *  # noqa: F403  (every record name: see _fs_records.__all__)
from supplicant._fs_records import _KIT, FsRequest, FsResponse, StatusResponse
from supplicant._listener_msg import Codec

__all__ = [
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "response_size",
]
__all__ += _fs_records.__all__

_CODEC: Final = Codec[FsRequest, FsResponse](
    _KIT, "an FS", FsRequest, FsResponse, StatusResponse, exact=True
)
encode_request: Final = _CODEC.encode_request
decode_request: Final = _CODEC.decode_request
encode_response: Final = _CODEC.encode_response
decode_response: Final = _CODEC.decode_response
response_size: Final = _CODEC.response_size
