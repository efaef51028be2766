"""A JEDEC eMMC RPMB partition as tee-supplicant's software emulation answers (sans-IO).

RPMB (Replay Protected Memory Block) is an eMMC partition written only with frames that
carry an HMAC-SHA256 under a 32-byte authentication key programmed once, and a write
counter that the device increments.  The secure world builds the frames; the supplicant
only moves them.  This module is the device: one :class:`EmulatedRpmb` answers what
tee-supplicant's ``RPMB_EMU`` build answers, byte for byte, and can keep its state in a
file so that an acknowledged write survives the supplicant's death.

**Where the facts come from.**  ``OP-TEE/optee_client:tee-supplicant/src/rpmb.c`` at
``44289ee`` (``struct rpmb_data_frame``, the result and message-type numbers,
``rpmb_data_req`` and the ``ioctl_emu_*`` functions).  Only facts were taken.

A frame is 512 bytes, multi-byte fields big-endian::

    0    stuff       196        228  key_mac  32      260  data  256
    484  nonce        16        500  write_counter u32
    504  address     u16        506  block_count u16  508  result u16  510  msg_type u16

The MAC is HMAC-SHA256 over bytes 228..511 of every frame of a request or response, in
order, and sits in the last frame's ``key_mac``.

What one data request does (``rpmb_data_req``): with ``frame_type_check`` (what
tee-supplicant does), every request frame after the first must carry the same message
type, else TEEC_ERROR_BAD_PARAMETERS; rpmb.c compares each frame's raw (big-endian) field
with the first frame's type in host order, so on a little-endian host a second frame
passes only when its type bytes are swapped (two ordinary write frames are refused).
A key program or data write takes exactly one response frame: the request frames are
written, then a zeroed frame holding REQ_RESULT_READ, then that frame is read back as the
result.  A counter read takes one
request and one response frame, a data read one request frame and any number of response
frames; neither zeroes the response buffer first, so fields the emulation does not set
keep what the buffer held.  Any other type is TEEC_ERROR_GENERIC.

The emulation's own behaviour, reproduced including its departures from JEDEC:

* the key can be programmed once; a second program answers GENERAL_FAILURE;
* a write checks the address range first (ADDRESS_FAILURE), then the MAC over all its
  frames (AUTH_FAILURE, also when no key is set); it does not compare the request's
  write counter with its own, and it adds one to the counter per *block* written;
* a write's result frame carries RESP_AUTH_DATA_WRITE, the result, the request's address
  and the counter, MAC'd when a key is set; a key program's carries only the type and
  result;
* a counter read echoes the nonce; its MAC is computed before the result field is set
  (so over the buffer's old result), and without a key the result is
  AUTH_KEY_NOT_PROGRAMMED and no MAC is written;
* a data read returns each block with the nonce, the address and RESP_AUTH_DATA_READ,
  ``block_count`` stored in host (little-endian) order, not big-endian; a read out of
  range writes nothing at all.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from objects import DecodeError, UsageError

__all__ = [
    "RPMB_FRAME_SIZE",
    "EmulatedRpmb",
    "RpmbFileError",
    "RpmbFrame",
    "RpmbFrameError",
    "RpmbMsgType",
    "RpmbRequestError",
    "RpmbResult",
    "frame_mac",
]

RPMB_FRAME_SIZE: Final = 512
RPMB_BLOCK_SIZE: Final = 256  # one frame's data field; the emulated partition's unit
_MAC_START: Final = 228  # bytes 228..511 of each frame are MAC'd
_SIZE_UNIT: Final = 128 * 1024  # rpmb_size_mult counts 128 KiB

# TEEC results rpmb.c answers with (tee_client_api.h).
_TEEC_ERROR_GENERIC: Final = 0xFFFF0000
_TEEC_ERROR_BAD_PARAMETERS: Final = 0xFFFF0006

# tee-supplicant's emulated CID ("taken from an actual eMMC chip": Micron MMC04G).
EMU_CID: Final = bytes.fromhex("fe014e4d4d4330344742c8f6552a6115")

_FRAME = struct.Struct(">196s32s256s16sIHHHH")


class RpmbResult(enum.IntEnum):
    """JEDEC RPMB operation results (the low byte of the frame's result field)."""

    OK = 0
    GENERAL_FAILURE = 1
    AUTH_FAILURE = 2
    COUNTER_FAILURE = 3
    ADDRESS_FAILURE = 4
    WRITE_FAILURE = 5
    READ_FAILURE = 6
    AUTH_KEY_NOT_PROGRAMMED = 7
    WRITE_COUNTER_EXPIRED = 0x80  # a bit ORed into the others


class RpmbMsgType(enum.IntEnum):
    """JEDEC RPMB request and response message types."""

    REQ_AUTH_KEY_PROGRAM = 0x0001
    REQ_WRITE_COUNTER_VAL_READ = 0x0002
    REQ_AUTH_DATA_WRITE = 0x0003
    REQ_AUTH_DATA_READ = 0x0004
    REQ_RESULT_READ = 0x0005
    RESP_AUTH_KEY_PROGRAM = 0x0100
    RESP_WRITE_COUNTER_VAL_READ = 0x0200
    RESP_AUTH_DATA_WRITE = 0x0300
    RESP_AUTH_DATA_READ = 0x0400


class RpmbFrameError(DecodeError):
    """Bytes that are not a whole number of 512-byte RPMB frames."""


class RpmbRequestError(UsageError):
    """A data request rpmb.c refuses; ``teec`` is the TEEC result it answers with."""

    def __init__(self, teec: int, detail: str) -> None:
        super().__init__(detail)
        self.teec = teec


class RpmbFileError(UsageError):
    """An RPMB state file that is not one, or describes another device."""


def _check_bytes(name: str, value: bytes, size: int) -> None:
    if not isinstance(value, bytes):
        raise UsageError(f"RpmbFrame.{name} must be bytes, not {type(value).__name__}")
    if len(value) != size:
        raise UsageError(f"RpmbFrame.{name} must be {size} bytes, not {len(value)}")


def _check_int(name: str, value: int, bits: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise UsageError(f"RpmbFrame.{name} must be an int, not {type(value).__name__}")
    if not 0 <= value < 1 << bits:
        raise UsageError(f"RpmbFrame.{name} {value} is not a u{bits}")


@dataclass(frozen=True, slots=True, kw_only=True)
class RpmbFrame:
    """One ``struct rpmb_data_frame`` (JEDEC's data frame minus start/stop bits)."""

    stuff: bytes = field(default=bytes(196), repr=False)
    key_mac: bytes = bytes(32)
    data: bytes = field(default=bytes(256), repr=False)
    nonce: bytes = bytes(16)
    write_counter: int = 0
    address: int = 0
    block_count: int = 0
    result: int = 0
    msg_type: int = 0

    def __post_init__(self) -> None:
        _check_bytes("stuff", self.stuff, 196)
        _check_bytes("key_mac", self.key_mac, 32)
        _check_bytes("data", self.data, 256)
        _check_bytes("nonce", self.nonce, 16)
        _check_int("write_counter", self.write_counter, 32)
        for name in ("address", "block_count", "result", "msg_type"):
            _check_int(name, getattr(self, name), 16)

    def pack(self) -> bytes:
        """The frame's 512 bytes."""
        return _FRAME.pack(
            self.stuff,
            self.key_mac,
            self.data,
            self.nonce,
            self.write_counter,
            self.address,
            self.block_count,
            self.result,
            self.msg_type,
        )

    @classmethod
    def unpack(cls, raw: bytes | bytearray | memoryview) -> RpmbFrame:
        """Decode exactly 512 bytes; anything else raises :class:`RpmbFrameError`."""
        if not isinstance(raw, bytes | bytearray | memoryview):
            raise RpmbFrameError(f"an RPMB frame is bytes, not {type(raw).__name__}")
        if len(raw) != RPMB_FRAME_SIZE:
            raise RpmbFrameError(f"an RPMB frame is {RPMB_FRAME_SIZE} bytes, not {len(raw)}")
        f = _FRAME.unpack(bytes(raw))
        return cls(
            stuff=f[0],
            key_mac=f[1],
            data=f[2],
            nonce=f[3],
            write_counter=f[4],
            address=f[5],
            block_count=f[6],
            result=f[7],
            msg_type=f[8],
        )

    @staticmethod
    def unpack_many(raw: bytes | bytearray | memoryview) -> list[RpmbFrame]:
        """Decode a whole number of frames."""
        if len(raw) % RPMB_FRAME_SIZE:
            raise RpmbFrameError(f"{len(raw)} bytes is not a whole number of RPMB frames")
        mv = memoryview(bytes(raw))
        return [
            RpmbFrame.unpack(mv[i : i + RPMB_FRAME_SIZE])
            for i in range(0, len(mv), RPMB_FRAME_SIZE)
        ]


def frame_mac(key: bytes, frames: Sequence[RpmbFrame | bytes]) -> bytes:
    """HMAC-SHA256 under ``key`` over bytes 228..511 of each frame, in order."""
    if not isinstance(key, bytes) or len(key) != 32:
        raise UsageError("an RPMB key is 32 bytes")
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for frame in frames:
        raw = frame.pack() if isinstance(frame, RpmbFrame) else frame
        if not isinstance(raw, bytes) or len(raw) != RPMB_FRAME_SIZE:
            raise UsageError(f"frame_mac takes RpmbFrame or {RPMB_FRAME_SIZE}-byte frames")
        mac.update(raw[_MAC_START:])
    return mac.digest()


# -- the emulated device ---------------------------------------------------------------------

# Offsets inside one 512-byte frame.
_O_MAC: Final = 196
_O_DATA: Final = 228
_O_NONCE: Final = 484
_O_COUNTER: Final = 500
_O_ADDR: Final = 504
_O_COUNT: Final = 506
_O_RESULT: Final = 508
_O_TYPE: Final = 510

# The state file: a 512-byte header, then the partition's blocks.
_FILE_MAGIC: Final = b"QTEERPMB"
_FILE_VERSION: Final = 1
_HEADER = struct.Struct("<8sIBBB x16s32sI")
_HEADER_SIZE: Final = 512


def _u16(buf: bytearray, off: int, value: int) -> None:
    struct.pack_into(">H", buf, off, value)


def _mac_into(key: bytes, buf: bytearray, first: int, count: int) -> None:
    """Write the MAC of frames first..first+count-1 into the last one's key_mac."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for i in range(first, first + count):
        mac.update(buf[i * RPMB_FRAME_SIZE + _MAC_START : (i + 1) * RPMB_FRAME_SIZE])
    last = (first + count - 1) * RPMB_FRAME_SIZE
    buf[last + _O_MAC : last + _O_MAC + 32] = mac.digest()


class EmulatedRpmb:
    """tee-supplicant's emulated RPMB partition, in memory or kept in a file.

    ``path=None`` keeps everything in memory, as tee-supplicant does (its state ends with
    the process).  With a path, the key, the write counter and the blocks live in that
    file; every accepted key program and data write is written and ``fsync``'d before
    :meth:`data_request` returns the response, so an acknowledged write survives kill -9.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        size_mult: int = 2,
        rel_wr_sec_c: int = 1,
        cid: bytes = EMU_CID,
    ) -> None:
        for name, value in (("size_mult", size_mult), ("rel_wr_sec_c", rel_wr_sec_c)):
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 255:
                raise UsageError(f"EmulatedRpmb {name} must be an int in 1..255, not {value!r}")
        if not isinstance(cid, bytes) or len(cid) != 16:
            raise UsageError("EmulatedRpmb cid must be 16 bytes")
        if path is not None and not isinstance(path, str | os.PathLike):
            raise UsageError(f"EmulatedRpmb path must be a path, not {type(path).__name__}")
        self._cid = cid
        self._size_mult = size_mult
        self._rel_wr_sec_c = rel_wr_sec_c
        self._size = size_mult * _SIZE_UNIT
        self._buf = bytearray(self._size)
        self._key = bytes(32)
        self._key_set = False
        self._counter = 0
        self._nonce = bytes(16)
        self._last_type = 0
        self._last_result = 0
        self._last_address = 0
        self._lock = threading.Lock()  # rpmb.c's rpmb_mutex
        self._path = None if path is None else Path(path)
        self._fd: int | None = None
        if self._path is not None:
            self._open_file(self._path)

    # -- properties ----------------------------------------------------------------------

    @property
    def cid(self) -> bytes:
        return self._cid

    @property
    def size_mult(self) -> int:
        return self._size_mult

    @property
    def rel_wr_sec_c(self) -> int:
        return self._rel_wr_sec_c

    @property
    def write_counter(self) -> int:
        return self._counter

    @property
    def key_programmed(self) -> bool:
        return self._key_set

    @property
    def path(self) -> Path | None:
        return self._path

    def close(self) -> None:
        """Close the state file (the state stays in it); in-memory devices do nothing."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> EmulatedRpmb:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = "memory" if self._path is None else str(self._path)
        return (
            f"<EmulatedRpmb {where} size_mult={self._size_mult} "
            f"key_programmed={self._key_set} write_counter={self._counter}>"
        )

    # -- the RPC ---------------------------------------------------------------------------

    def data_request(
        self,
        req: bytes | bytearray | memoryview,
        rsp_frames: int,
        *,
        rsp: bytes | None = None,
        frame_type_check: bool = False,
    ) -> bytes:
        """What ``rpmb_data_req`` does for one RPC: ``req`` is the request frames, the
        result is ``rsp_frames`` response frames.  ``rsp`` is what the response buffer held
        before (zeros by default): reads do not clear it.  A request rpmb.c refuses raises
        :class:`RpmbRequestError` carrying its TEEC result.  ``frame_type_check=True``
        adds rpmb.c's comparison of later frames' types (see the module docstring), which
        refuses ordinary multi-frame writes: tee-supplicant (:class:`OpteeSupplicant`) asks
        for it; other callers (QTEE's RPMB listener) send multi-frame writes as they are."""
        if not isinstance(req, bytes | bytearray | memoryview):
            raise UsageError(f"RPMB request frames are bytes, not {type(req).__name__}")
        req_b = bytearray(req)
        if not req_b or len(req_b) % RPMB_FRAME_SIZE:
            raise UsageError(f"{len(req_b)} bytes is not a positive number of RPMB frames")
        if not isinstance(rsp_frames, int) or isinstance(rsp_frames, bool) or rsp_frames < 0:
            raise UsageError(f"rsp_frames must be a non-negative int, not {rsp_frames!r}")
        size = rsp_frames * RPMB_FRAME_SIZE
        if rsp is None:
            out = bytearray(size)
        elif not isinstance(rsp, bytes) or len(rsp) != size:
            raise UsageError(f"rsp must be {size} bytes (rsp_frames * {RPMB_FRAME_SIZE})")
        else:
            out = bytearray(rsp)
        req_n = len(req_b) // RPMB_FRAME_SIZE
        with self._lock:
            self._request(req_b, req_n, out, rsp_frames, frame_type_check)
        return bytes(out)

    def _request(
        self, req: bytearray, req_n: int, out: bytearray, rsp_n: int, type_check: bool
    ) -> None:
        (msg_type,) = struct.unpack_from(">H", req, _O_TYPE)
        for i in range(1 if type_check else req_n, req_n):  # raw field vs host order, as rpmb.c
            if struct.unpack_from("<H", req, i * RPMB_FRAME_SIZE + _O_TYPE)[0] != msg_type:
                raise RpmbRequestError(
                    _TEEC_ERROR_BAD_PARAMETERS, "all request frames must be of one type"
                )
        if msg_type in (RpmbMsgType.REQ_AUTH_KEY_PROGRAM, RpmbMsgType.REQ_AUTH_DATA_WRITE):
            if rsp_n != 1:
                raise RpmbRequestError(_TEEC_ERROR_BAD_PARAMETERS, "a write has one response")
            out[:] = bytes(RPMB_FRAME_SIZE)  # rpmb_data_req zeroes it for REQ_RESULT_READ
            _u16(out, _O_TYPE, RpmbMsgType.REQ_RESULT_READ)
            self._write_cmd(req, req_n)
            self._read_cmd(out, rsp_n)
        elif msg_type in (RpmbMsgType.REQ_WRITE_COUNTER_VAL_READ, RpmbMsgType.REQ_AUTH_DATA_READ):
            if msg_type == RpmbMsgType.REQ_WRITE_COUNTER_VAL_READ and rsp_n != 1:
                raise RpmbRequestError(
                    _TEEC_ERROR_BAD_PARAMETERS, "a counter read has one response"
                )
            if req_n != 1:
                raise RpmbRequestError(_TEEC_ERROR_BAD_PARAMETERS, "a read has one request frame")
            self._write_cmd(req, req_n)
            self._read_cmd(out, rsp_n)
        else:
            raise RpmbRequestError(_TEEC_ERROR_GENERIC, f"unsupported message type {msg_type:#06x}")

    def _write_cmd(self, frames: bytearray, n: int) -> None:
        """MMC_WRITE_MULTIPLE_BLOCK of ``n`` frames (the emulation's ioctl_emu_cmd)."""
        (msg_type,) = struct.unpack_from(">H", frames, _O_TYPE)
        if msg_type == RpmbMsgType.REQ_AUTH_KEY_PROGRAM:
            self._last_type = msg_type
            if self._key_set:
                self._last_result = RpmbResult.GENERAL_FAILURE
            else:
                self._persist_key(bytes(frames[_O_MAC : _O_MAC + 32]))
                self._last_result = RpmbResult.OK
        elif msg_type == RpmbMsgType.REQ_AUTH_DATA_WRITE:
            self._last_type = msg_type
            self._last_address = struct.unpack_from(">H", frames, _O_ADDR)[0]
            self._last_result = self._transfer(frames, n, to_mmc=True)
        elif msg_type in (RpmbMsgType.REQ_WRITE_COUNTER_VAL_READ, RpmbMsgType.REQ_AUTH_DATA_READ):
            self._nonce = bytes(frames[_O_NONCE : _O_NONCE + 16])
            self._last_type = msg_type
            self._last_address = struct.unpack_from(">H", frames, _O_ADDR)[0]

    def _read_cmd(self, out: bytearray, n: int) -> None:
        """MMC_READ_MULTIPLE_BLOCK of ``n`` frames: the answer to the last write command."""
        last = self._last_type
        if last == RpmbMsgType.REQ_AUTH_KEY_PROGRAM:
            _u16(out, _O_TYPE, RpmbMsgType.RESP_AUTH_KEY_PROGRAM)
            _u16(out, _O_RESULT, self._last_result)
        elif last == RpmbMsgType.REQ_AUTH_DATA_WRITE:
            _u16(out, _O_TYPE, RpmbMsgType.RESP_AUTH_DATA_WRITE)
            _u16(out, _O_RESULT, self._last_result)
            _u16(out, _O_ADDR, self._last_address)
            struct.pack_into(">I", out, _O_COUNTER, self._counter)
            if self._key_set:
                _mac_into(self._key, out, 0, 1)
        elif last == RpmbMsgType.REQ_WRITE_COUNTER_VAL_READ:
            _u16(out, _O_TYPE, RpmbMsgType.RESP_WRITE_COUNTER_VAL_READ)
            struct.pack_into(">I", out, _O_COUNTER, self._counter)
            out[_O_NONCE : _O_NONCE + 16] = self._nonce
            if self._key_set:  # the MAC covers the result field as it was
                _mac_into(self._key, out, 0, 1)
                _u16(out, _O_RESULT, RpmbResult.OK)
            else:
                _u16(out, _O_RESULT, RpmbResult.AUTH_KEY_NOT_PROGRAMMED)
        elif last == RpmbMsgType.REQ_AUTH_DATA_READ:
            self._transfer(out, n, to_mmc=False)

    def _transfer(self, frames: bytearray, n: int, *, to_mmc: bool) -> int:
        start = self._last_address * RPMB_BLOCK_SIZE
        if start > self._size or start + n * RPMB_BLOCK_SIZE > self._size:
            return RpmbResult.ADDRESS_FAILURE
        if to_mmc:
            if not self._key_set:
                return RpmbResult.AUTH_FAILURE
            mac = hmac.new(self._key, digestmod=hashlib.sha256)
            for i in range(n):
                mac.update(frames[i * RPMB_FRAME_SIZE + _MAC_START : (i + 1) * RPMB_FRAME_SIZE])
            last = (n - 1) * RPMB_FRAME_SIZE
            if not hmac.compare_digest(mac.digest(), bytes(frames[last + _O_MAC : last + _O_DATA])):
                return RpmbResult.AUTH_FAILURE
            blocks = b"".join(
                frames[i * RPMB_FRAME_SIZE + _O_DATA : i * RPMB_FRAME_SIZE + _O_NONCE]
                for i in range(n)
            )
            self._persist_blocks(start, blocks, (self._counter + n) & 0xFFFFFFFF)
            return RpmbResult.OK
        if n == 0:
            return RpmbResult.OK
        for i in range(n):
            base = i * RPMB_FRAME_SIZE
            at = start + i * RPMB_BLOCK_SIZE
            frames[base + _O_DATA : base + _O_NONCE] = self._buf[at : at + RPMB_BLOCK_SIZE]
            _u16(frames, base + _O_TYPE, RpmbMsgType.RESP_AUTH_DATA_READ)
            _u16(frames, base + _O_ADDR, self._last_address)
            struct.pack_into("<H", frames, base + _O_COUNT, n & 0xFFFF)  # host order, as rpmb.c
            frames[base + _O_NONCE : base + _O_NONCE + 16] = self._nonce
            _u16(frames, base + _O_RESULT, RpmbResult.OK)
        if self._key_set:
            _mac_into(self._key, frames, 0, n)
        return RpmbResult.OK

    # -- durable state ---------------------------------------------------------------------

    def _header(self) -> bytes:
        raw = _HEADER.pack(
            _FILE_MAGIC,
            _FILE_VERSION,
            self._size_mult,
            self._rel_wr_sec_c,
            int(self._key_set),
            self._cid,
            self._key,
            self._counter,
        )
        return raw.ljust(_HEADER_SIZE, b"\0")

    def _open_file(self, path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise RpmbFileError(f"cannot open RPMB state file {path}: {exc.strerror}") from None
        try:
            total = os.fstat(fd).st_size
            if total == 0:
                os.pwrite(fd, self._header() + bytes(self._size), 0)
                os.fsync(fd)
                _fsync_dir(path)
            else:
                self._load(fd, path, total)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _load(self, fd: int, path: Path, total: int) -> None:
        head = os.pread(fd, _HEADER.size, 0)
        if len(head) != _HEADER.size or head[:8] != _FILE_MAGIC:
            raise RpmbFileError(f"{path} is not an RPMB state file")
        _magic, version, mult, rel, key_set, cid, key, counter = _HEADER.unpack(head)
        if version != _FILE_VERSION:
            raise RpmbFileError(f"{path}: RPMB state file version {version} is not supported")
        if (mult, rel, cid) != (self._size_mult, self._rel_wr_sec_c, self._cid):
            raise RpmbFileError(
                f"{path} holds another device (size_mult={mult}, rel_wr_sec_c={rel}, "
                f"cid={cid.hex()})"
            )
        if total != _HEADER_SIZE + self._size:
            raise RpmbFileError(f"{path} is {total} bytes, not {_HEADER_SIZE + self._size}")
        data = os.pread(fd, self._size, _HEADER_SIZE)
        if len(data) != self._size:
            raise RpmbFileError(f"{path}: short read of the RPMB blocks")
        self._buf[:] = data
        self._key_set = bool(key_set)
        self._key = key
        self._counter = counter

    def _persist_key(self, key: bytes) -> None:
        self._key, self._key_set = key, True
        if self._fd is not None:
            os.pwrite(self._fd, self._header(), 0)
            os.fsync(self._fd)

    def _persist_blocks(self, start: int, blocks: bytes, counter: int) -> None:
        self._buf[start : start + len(blocks)] = blocks
        self._counter = counter
        if self._fd is not None:
            # Blocks first, then the counter that acknowledges them, then one fsync: the
            # response frame is built only after this returns.
            os.pwrite(self._fd, blocks, _HEADER_SIZE + start)
            os.pwrite(self._fd, self._header(), 0)
            os.fsync(self._fd)


def _fsync_dir(path: Path) -> None:
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
