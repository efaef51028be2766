"""The QTEE RPMB listener's messages (listener id 0x2000), byte for byte (sans-IO).

QTEE's RPMB listener shares one ``TZ_MAX_BUF_LEN`` = 20040-byte buffer with the
supplicant; the request is written at its start and the response over it
(:mod:`supplicant._listener_msg`).  QTEE builds the JEDEC RPMB frames (512 bytes each,
:class:`supplicant._rpmb.RpmbFrame`) itself; the listener hands them to the eMMC device
and returns the device's frames.

**Where the numbers come from.**  ``qualcomm-linux/pkg-minkipc:listeners/librpmbservice/``
``rpmb_service.c`` and ``rpmb.c`` (commit ``4dbe8a3``: the ids, the structs, the dispatch)
and ``rpmb_emmc.c`` (``539ab27``: the eMMC ioctl sequences).  Only facts were taken.

======  =============  ==========================================  ========================
 id      command        request after the u32 id                    response after the id
======  =============  ==========================================  ========================
0x101   INIT           u32 version (8)                              u32 version, i32 status,
14      GET_DEV_INFO   (same as INIT)                               u32 num_sectors,
15      PROVISION      (same as INIT)                               u32 rel_wr_count (20)
0x102   READ           u32 num_sectors, u32 req_buff_len,           i32 status,
0x103   WRITE          u32 req_buff_offset, u32 version,            u32 res_buff_len,
                       u32 rel_wr_count (24); frames at             u32 res_buff_offset = 20,
                       ``req_buff_offset``                          u32 version (20); frames
0x104   PARTITION      u32 version, u32 dev_id (12)                 u32 status = -1,
                                                                    u32 num_partitions = 0,
                                                                    u32 rsp_buff_offset = 16
other   (error)                                                     i32 status = -1,
                                                                    u32 res_buff_len = 0,
                                                                    u32 res_buff_offset = 20
======  =============  ==========================================  ========================

READ sends the one request frame at ``req_buff_offset`` and answers ``num_sectors``
frames; WRITE sends ``num_sectors`` frames, ``rel_wr_count`` per device transaction, and
answers the last transaction's result frame.  ``req_buff_len`` is carried but never read
by the service.  The error answer leaves the id and the bytes after offset 16 as they
were.  Decoders raise only :class:`RpmbMsgDecodeError`; records validate their fields
and raise :class:`RpmbMsgUsageError`.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import ClassVar, Final

from objects import DecodeError, UsageError
from supplicant._listener_msg import (
    U32_MAX,
    Codec,
    MessageKit,
    Record,
    UnsupportedRecord,
    Wire,
    id_wire,
)

__all__ = [
    "RPMB_SERVICE_BUF_LEN",
    "RPMB_SERVICE_ID",
    "RW_RSP_SIZE",
    "ErrorResponse",
    "InitRequest",
    "InitResponse",
    "PartitionRequest",
    "PartitionResponse",
    "RpmbCmd",
    "RpmbMsgDecodeError",
    "RpmbMsgUsageError",
    "RpmbRequest",
    "RpmbResponse",
    "RwRequest",
    "RwResponse",
    "UnsupportedRequest",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
]

RPMB_SERVICE_ID: Final = 0x2000
RPMB_SERVICE_BUF_LEN: Final = 20000 + 40  # TZ_MAX_BUF_LEN
_FRAME: Final = 512


class RpmbCmd(enum.IntEnum):
    """``tz_rpmb_cmd_type``: the ids the service's dispatch serves."""

    GET_DEV_INFO = 14
    PROVISION = 15
    RPMB_INIT = 0x101
    RPMB_READ = 0x102
    RPMB_WRITE = 0x103
    RPMB_PARTITION = 0x104


class RpmbMsgDecodeError(DecodeError):
    """RPMB listener bytes are malformed (the message says which command and field)."""


class RpmbMsgUsageError(UsageError):
    """An RPMB listener message field has the wrong type or range."""


_KIT: Final = MessageKit(RpmbMsgDecodeError, RpmbMsgUsageError, RpmbCmd)
_INIT_IDS: Final = frozenset({RpmbCmd.RPMB_INIT, RpmbCmd.GET_DEV_INFO, RpmbCmd.PROVISION})
_RW_IDS: Final = frozenset({RpmbCmd.RPMB_READ, RpmbCmd.RPMB_WRITE})


def _bytes(value: object, what: str) -> bytes:
    if not isinstance(value, bytes):
        raise RpmbMsgUsageError(f"{what} must be bytes, not {type(value).__name__}")
    return value


_VERSION: Final = Wire("version", "I")
_STATUS: Final = Wire("status", "i")
_FRAMES: Final = Wire("frames", "", kind="bytes")


@dataclass(frozen=True, slots=True, kw_only=True)
class _Record(Record):
    KIT: ClassVar[MessageKit] = _KIT


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True, kw_only=True)
class InitRequest(_Record):
    """INIT (and GET_DEV_INFO, PROVISION, which the service answers the same way)."""

    WIRE: ClassVar[tuple[Wire, ...]] = (
        id_wire("an init request is INIT/GET_DEV_INFO/PROVISION, not {!r}", _INIT_IDS),
        Wire("version", "I", "INIT version"),
    )
    cmd_id: int = RpmbCmd.RPMB_INIT
    version: int = 0

    @classmethod
    def decode(cls, data: bytes, cmd_id: int) -> InitRequest:
        """The request, its id as the command."""
        return cls(**{**cls.fields_from(data, cmd_id), "cmd_id": RpmbCmd(cmd_id)})


#: READ's and WRITE's header: id, num_sectors, req_buff_len, req_buff_offset, version,
#: rel_wr_count (not the order its fields are checked in).
_RW_REQ: Final = struct.Struct("<IIIIII")


@dataclass(frozen=True, slots=True, kw_only=True)
class RwRequest(_Record):
    """READ or WRITE: ``frames`` are the bytes at ``req_buff_offset`` the command sends.

    For READ that is one request frame and ``num_sectors`` counts the response frames;
    for WRITE it is ``num_sectors`` frames sent ``rel_wr_count`` at a time.  A decoded
    request's ``frames`` stop at the end of the buffer (so may be short)."""

    #: In the order they are checked; the header packs them as :data:`_RW_REQ` does.
    WIRE: ClassVar[tuple[Wire, ...]] = (
        id_wire("a read/write request is READ or WRITE, not {!r}", _RW_IDS),
        Wire("num_sectors", "I"),
        _FRAMES,
        _VERSION,
        Wire("rel_wr_count", "I"),
        Wire("req_buff_offset", "I"),
    )
    cmd_id: int
    num_sectors: int
    frames: bytes
    version: int = 0
    rel_wr_count: int = 0
    req_buff_offset: int = 24
    req_buff_len: int | None = None

    def _check(self) -> None:
        if self.req_buff_len is not None:
            self.KIT.int_field(self.req_buff_len, "req_buff_len", 0, U32_MAX)

    @classmethod
    def read(cls, frame: bytes, blocks: int = 1, *, version: int = 0) -> RwRequest:
        """A READ of ``blocks`` response frames for the request ``frame``."""
        return cls(cmd_id=RpmbCmd.RPMB_READ, num_sectors=blocks, frames=frame, version=version)

    @classmethod
    def write(cls, frames: bytes, rel_wr_count: int = 1, *, version: int = 0) -> RwRequest:
        """A WRITE of ``frames`` (a whole number of frames), ``rel_wr_count`` per MAC."""
        _bytes(frames, "frames")
        return cls(
            cmd_id=RpmbCmd.RPMB_WRITE,
            num_sectors=len(frames) // _FRAME,
            frames=frames,
            version=version,
            rel_wr_count=rel_wr_count,
        )

    @property
    def wanted(self) -> int:
        """How many bytes at ``req_buff_offset`` the command sends to the device."""
        return _FRAME if self.cmd_id == RpmbCmd.RPMB_READ else self.num_sectors * _FRAME

    def encode(self) -> bytes:
        """The header, zeros up to ``req_buff_offset``, then the frames."""
        blen = len(self.frames) if self.req_buff_len is None else self.req_buff_len
        head = _RW_REQ.pack(
            self.cmd_id,
            self.num_sectors,
            blen,
            self.req_buff_offset,
            self.version,
            self.rel_wr_count,
        )
        if self.req_buff_offset < len(head):
            raise RpmbMsgUsageError(
                f"req_buff_offset {self.req_buff_offset} is inside the {len(head)}-byte header"
            )
        return head.ljust(self.req_buff_offset, b"\0") + self.frames

    @classmethod
    def fixed_size(cls) -> int:
        """The header's size."""
        return _RW_REQ.size

    @classmethod
    def decode(cls, data: bytes, cmd_id: int) -> RwRequest:
        """The request; its frames are the bytes the command sends from ``req_buff_offset``
        (as many of them as ``data`` holds)."""
        cmd = RpmbCmd(cmd_id)
        _, num, blen, off, version, rel = _RW_REQ.unpack_from(data, 0)
        want = _FRAME if cmd == RpmbCmd.RPMB_READ else num * _FRAME
        return cls(
            cmd_id=cmd,
            num_sectors=num,
            frames=data[off : off + want],
            version=version,
            rel_wr_count=rel,
            req_buff_offset=off,
            req_buff_len=blen,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class PartitionRequest(_Record):
    """PARTITION: add RPMB partitions from a table (the service supports none)."""

    CMD: ClassVar[RpmbCmd] = RpmbCmd.RPMB_PARTITION
    PREFIX: ClassVar[str] = "PARTITION "
    WIRE: ClassVar[tuple[Wire, ...]] = (_VERSION, Wire("dev_id", "I"))
    version: int = 0
    dev_id: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class UnsupportedRequest(UnsupportedRecord):
    """Any id the dispatch does not serve."""

    KIT: ClassVar[MessageKit] = _KIT


RpmbRequest = InitRequest | RwRequest | PartitionRequest | UnsupportedRequest


# --------------------------------------------------------------------------- responses


@dataclass(frozen=True, slots=True, kw_only=True)
class InitResponse(_Record):
    """INIT's answer: the partition's size in 512-byte sectors and frames per write."""

    WIRE: ClassVar[tuple[Wire, ...]] = (
        id_wire("an init response answers INIT-like ids, not {!r}", _INIT_IDS),
        _VERSION,
        _STATUS,
        Wire("num_sectors", "I"),
        Wire("rel_wr_count", "I"),
    )
    cmd_id: int
    version: int
    status: int
    num_sectors: int
    rel_wr_count: int


#: READ's and WRITE's answer before its frames: id, status, res_buff_len,
#: res_buff_offset (always 20: the frames follow), version.
_RW_RSP: Final = struct.Struct("<IiIII")
#: Where a READ/WRITE response's frames start (``sizeof(tz_rpmb_rw_res_t)``).
RW_RSP_SIZE: Final = _RW_RSP.size


@dataclass(frozen=True, slots=True, kw_only=True)
class RwResponse(_Record):
    """READ's or WRITE's answer: ``frames`` were written at offset 20 (``res_buff_len``
    of them count; a failed write leaves its result frame there with a length of 0)."""

    #: In the order they are checked; the header packs them as :data:`_RW_RSP` does.
    WIRE: ClassVar[tuple[Wire, ...]] = (
        id_wire("a read/write response answers READ/WRITE, not {!r}", _RW_IDS),
        _STATUS,
        _VERSION,
        _FRAMES,
        Wire("res_buff_len", "I"),
    )
    cmd_id: int
    status: int
    version: int
    frames: bytes
    res_buff_len: int

    def _check(self) -> None:
        if self.res_buff_len > len(self.frames):
            raise RpmbMsgUsageError(
                f"res_buff_len {self.res_buff_len} exceeds the {len(self.frames)} bytes of frames"
            )

    def encode(self) -> bytes:
        """The answer's header, then all of ``frames``."""
        head = _RW_RSP.pack(self.cmd_id, self.status, self.res_buff_len, RW_RSP_SIZE, self.version)
        return head + self.frames

    @classmethod
    def fixed_size(cls) -> int:
        """The header's size."""
        return RW_RSP_SIZE

    @classmethod
    def decode(cls, data: bytes, cmd_id: int) -> RwResponse:
        """The answer and the ``res_buff_len`` bytes at ``res_buff_offset``."""
        _, status, rlen, roff, version = _RW_RSP.unpack_from(data, 0)
        _KIT.need(data, roff + rlen, f"response to {cmd_id:#x} with {rlen} bytes of frames")
        return cls(
            cmd_id=cmd_id,
            status=status,
            version=version,
            frames=data[roff : roff + rlen],
            res_buff_len=rlen,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class PartitionResponse(_Record):
    """PARTITION's answer (status -1 as a u32 field: no table version is supported)."""

    CMD: ClassVar[RpmbCmd] = RpmbCmd.RPMB_PARTITION
    WIRE: ClassVar[tuple[Wire, ...]] = (
        Wire("status", "I"),
        Wire("num_partitions", "I"),
        Wire("rsp_buff_offset", "I"),
    )
    status: int
    num_partitions: int = 0
    rsp_buff_offset: int = 16


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorResponse(_Record):
    """An unserved id's answer: ``{id, status -1, res_buff_len 0, res_buff_offset 20}``."""

    WIRE: ClassVar[tuple[Wire, ...]] = (
        Wire("cmd_id", "I", kind="cmd"),
        _STATUS,
        Wire("res_buff_len", "I"),
        Wire("res_buff_offset", "I"),
    )
    cmd_id: int
    status: int = -1
    res_buff_len: int = 0
    res_buff_offset: int = 20


RpmbResponse = InitResponse | RwResponse | PartitionResponse | ErrorResponse
_CODEC: Final = Codec[RpmbRequest, RpmbResponse](
    _KIT, "an RPMB", RpmbRequest, RpmbResponse, ErrorResponse
)
encode_request: Final = _CODEC.encode_request
decode_request: Final = _CODEC.decode_request
encode_response: Final = _CODEC.encode_response
decode_response: Final = _CODEC.decode_response
