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
from supplicant._listener_msg import I32_MAX, I32_MIN, U32, U32_MAX, MessageKit, UnsupportedRecord

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


_KIT: Final = MessageKit(RpmbMsgDecodeError, RpmbMsgUsageError, RpmbCmd, {int(c) for c in RpmbCmd})
_INIT_IDS: Final = frozenset({RpmbCmd.RPMB_INIT, RpmbCmd.GET_DEV_INFO, RpmbCmd.PROVISION})
_RW_IDS: Final = frozenset({RpmbCmd.RPMB_READ, RpmbCmd.RPMB_WRITE})


def _u32(value: object, what: str) -> int:
    return _KIT.int_field(value, what, 0, U32_MAX)


def _i32(value: object, what: str) -> int:
    return _KIT.int_field(value, what, I32_MIN, I32_MAX)


def _bytes(value: object, what: str) -> bytes:
    if not isinstance(value, bytes):
        raise RpmbMsgUsageError(f"{what} must be bytes, not {type(value).__name__}")
    return value


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True, kw_only=True)
class InitRequest:
    """INIT (and GET_DEV_INFO, PROVISION, which the service answers the same way)."""

    cmd_id: int = RpmbCmd.RPMB_INIT
    version: int = 0

    def __post_init__(self) -> None:
        if self.cmd_id not in _INIT_IDS:
            raise RpmbMsgUsageError(
                f"an init request is INIT/GET_DEV_INFO/PROVISION, not {self.cmd_id!r}"
            )
        _u32(self.version, "INIT version")


@dataclass(frozen=True, slots=True, kw_only=True)
class RwRequest:
    """READ or WRITE: ``frames`` are the bytes at ``req_buff_offset`` the command sends.

    For READ that is one request frame and ``num_sectors`` counts the response frames;
    for WRITE it is ``num_sectors`` frames sent ``rel_wr_count`` at a time.  A decoded
    request's ``frames`` stop at the end of the buffer (so may be short)."""

    cmd_id: int
    num_sectors: int
    frames: bytes
    version: int = 0
    rel_wr_count: int = 0
    req_buff_offset: int = 24
    req_buff_len: int | None = None

    def __post_init__(self) -> None:
        if self.cmd_id not in _RW_IDS:
            raise RpmbMsgUsageError(f"a read/write request is READ or WRITE, not {self.cmd_id!r}")
        _u32(self.num_sectors, "num_sectors")
        _bytes(self.frames, "frames")
        _u32(self.version, "version")
        _u32(self.rel_wr_count, "rel_wr_count")
        _u32(self.req_buff_offset, "req_buff_offset")
        if self.req_buff_len is not None:
            _u32(self.req_buff_len, "req_buff_len")

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


@dataclass(frozen=True, slots=True, kw_only=True)
class PartitionRequest:
    """PARTITION: add RPMB partitions from a table (the service supports none)."""

    version: int = 0
    dev_id: int = 0

    def __post_init__(self) -> None:
        _u32(self.version, "PARTITION version")
        _u32(self.dev_id, "PARTITION dev_id")


@dataclass(frozen=True, slots=True, kw_only=True)
class UnsupportedRequest(UnsupportedRecord):
    """Any id the dispatch does not serve."""

    KIT: ClassVar[MessageKit] = _KIT


RpmbRequest = InitRequest | RwRequest | PartitionRequest | UnsupportedRequest

_INIT_REQ: Final = struct.Struct("<II")
_RW_REQ: Final = struct.Struct("<IIIIII")
_PART_REQ: Final = struct.Struct("<III")


def encode_request(req: RpmbRequest) -> bytes:
    """The request's bytes (the secure side's half)."""
    match req:
        case InitRequest():
            return _INIT_REQ.pack(req.cmd_id, req.version)
        case RwRequest():
            blen = len(req.frames) if req.req_buff_len is None else req.req_buff_len
            head = _RW_REQ.pack(
                req.cmd_id,
                req.num_sectors,
                blen,
                req.req_buff_offset,
                req.version,
                req.rel_wr_count,
            )
            if req.req_buff_offset < len(head):
                raise RpmbMsgUsageError(
                    f"req_buff_offset {req.req_buff_offset} is inside the {len(head)}-byte header"
                )
            return head.ljust(req.req_buff_offset, b"\0") + req.frames
        case PartitionRequest():
            return _PART_REQ.pack(RpmbCmd.RPMB_PARTITION, req.version, req.dev_id)
        case UnsupportedRequest():
            return U32.pack(req.cmd_id)
        case _:
            raise RpmbMsgUsageError(f"not an RPMB request record: {type(req).__name__}")


def decode_request(buf: bytes | bytearray | memoryview) -> RpmbRequest:
    """The request at the start of ``buf`` (a READ/WRITE's frames are taken from it too)."""
    data, cmd_id = _KIT.request(buf)
    if cmd_id not in _KIT.supported:
        return UnsupportedRequest(cmd_id=cmd_id)
    cmd = RpmbCmd(cmd_id)
    if cmd in _INIT_IDS:
        _KIT.need(data, _INIT_REQ.size, f"{cmd.name} request")
        _, version = _INIT_REQ.unpack_from(data, 0)
        return InitRequest(cmd_id=cmd, version=version)
    if cmd == RpmbCmd.RPMB_PARTITION:
        _KIT.need(data, _PART_REQ.size, f"{cmd.name} request")
        _, version, dev_id = _PART_REQ.unpack_from(data, 0)
        return PartitionRequest(version=version, dev_id=dev_id)
    _KIT.need(data, _RW_REQ.size, f"{cmd.name} request")
    _, num, blen, off, version, rel = _RW_REQ.unpack_from(data, 0)
    want = _FRAME if cmd == RpmbCmd.RPMB_READ else num * _FRAME
    return RwRequest(
        cmd_id=cmd,
        num_sectors=num,
        frames=data[off : off + want],
        version=version,
        rel_wr_count=rel,
        req_buff_offset=off,
        req_buff_len=blen,
    )


# --------------------------------------------------------------------------- responses


@dataclass(frozen=True, slots=True, kw_only=True)
class InitResponse:
    """INIT's answer: the partition's size in 512-byte sectors and frames per write."""

    cmd_id: int
    version: int
    status: int
    num_sectors: int
    rel_wr_count: int

    def __post_init__(self) -> None:
        if self.cmd_id not in _INIT_IDS:
            raise RpmbMsgUsageError(f"an init response answers INIT-like ids, not {self.cmd_id!r}")
        _u32(self.version, "version")
        _i32(self.status, "status")
        _u32(self.num_sectors, "num_sectors")
        _u32(self.rel_wr_count, "rel_wr_count")


@dataclass(frozen=True, slots=True, kw_only=True)
class RwResponse:
    """READ's or WRITE's answer: ``frames`` were written at offset 20 (``res_buff_len``
    of them count; a failed write leaves its result frame there with a length of 0)."""

    cmd_id: int
    status: int
    version: int
    frames: bytes
    res_buff_len: int

    def __post_init__(self) -> None:
        if self.cmd_id not in _RW_IDS:
            raise RpmbMsgUsageError(
                f"a read/write response answers READ/WRITE, not {self.cmd_id!r}"
            )
        _i32(self.status, "status")
        _u32(self.version, "version")
        _bytes(self.frames, "frames")
        _u32(self.res_buff_len, "res_buff_len")
        if self.res_buff_len > len(self.frames):
            raise RpmbMsgUsageError(
                f"res_buff_len {self.res_buff_len} exceeds the {len(self.frames)} bytes of frames"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class PartitionResponse:
    """PARTITION's answer (status -1 as a u32 field: no table version is supported)."""

    status: int
    num_partitions: int = 0
    rsp_buff_offset: int = 16

    def __post_init__(self) -> None:
        _u32(self.status, "status")
        _u32(self.num_partitions, "num_partitions")
        _u32(self.rsp_buff_offset, "rsp_buff_offset")


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorResponse:
    """An unserved id's answer: ``{id, status -1, res_buff_len 0, res_buff_offset 20}``."""

    cmd_id: int
    status: int = -1
    res_buff_len: int = 0
    res_buff_offset: int = 20

    def __post_init__(self) -> None:
        _KIT.command_field(self.cmd_id)
        _i32(self.status, "status")
        _u32(self.res_buff_len, "res_buff_len")
        _u32(self.res_buff_offset, "res_buff_offset")


RpmbResponse = InitResponse | RwResponse | PartitionResponse | ErrorResponse

_INIT_RSP: Final = struct.Struct("<IIiII")
_RW_RSP: Final = struct.Struct("<IiIII")
_PART_RSP: Final = struct.Struct("<IIII")
_ERR_RSP: Final = struct.Struct("<IiII")
#: Where a READ/WRITE response's frames start (``sizeof(tz_rpmb_rw_res_t)``).
RW_RSP_SIZE: Final = _RW_RSP.size


def encode_response(rsp: RpmbResponse) -> bytes:
    """The response's bytes, written over the request (a read/write's frames follow)."""
    match rsp:
        case InitResponse():
            return _INIT_RSP.pack(
                rsp.cmd_id, rsp.version, rsp.status, rsp.num_sectors, rsp.rel_wr_count
            )
        case RwResponse():
            head = _RW_RSP.pack(rsp.cmd_id, rsp.status, rsp.res_buff_len, RW_RSP_SIZE, rsp.version)
            return head + rsp.frames
        case PartitionResponse():
            return _PART_RSP.pack(
                RpmbCmd.RPMB_PARTITION, rsp.status, rsp.num_partitions, rsp.rsp_buff_offset
            )
        case ErrorResponse():
            return _ERR_RSP.pack(rsp.cmd_id, rsp.status, rsp.res_buff_len, rsp.res_buff_offset)
        case _:
            raise RpmbMsgUsageError(f"not an RPMB response record: {type(rsp).__name__}")


def decode_response(buf: bytes | bytearray | memoryview) -> RpmbResponse:
    """The response at the start of ``buf``; its layout follows the echoed command id."""
    data = _KIT.buffer(buf, "response")
    cmd_id = _KIT.command_id(data, "response")
    if cmd_id in _INIT_IDS:
        _KIT.need(data, _INIT_RSP.size, f"response to {cmd_id:#x}")
        _, version, status, num, rel = _INIT_RSP.unpack_from(data, 0)
        return InitResponse(
            cmd_id=cmd_id, version=version, status=status, num_sectors=num, rel_wr_count=rel
        )
    if cmd_id in _RW_IDS:
        _KIT.need(data, _RW_RSP.size, f"response to {cmd_id:#x}")
        _, status, rlen, roff, version = _RW_RSP.unpack_from(data, 0)
        _KIT.need(data, roff + rlen, f"response to {cmd_id:#x} with {rlen} bytes of frames")
        return RwResponse(
            cmd_id=cmd_id,
            status=status,
            version=version,
            frames=data[roff : roff + rlen],
            res_buff_len=rlen,
        )
    if cmd_id == RpmbCmd.RPMB_PARTITION:
        _KIT.need(data, _PART_RSP.size, f"response to {cmd_id:#x}")
        _, status, num, off = _PART_RSP.unpack_from(data, 0)
        return PartitionResponse(status=status, num_partitions=num, rsp_buff_offset=off)
    _KIT.need(data, _ERR_RSP.size, f"response to {cmd_id:#x}")
    _, status, rlen, roff = _ERR_RSP.unpack_from(data, 0)
    return ErrorResponse(cmd_id=cmd_id, status=status, res_buff_len=rlen, res_buff_offset=roff)
