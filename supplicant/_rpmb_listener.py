"""The QTEE RPMB listener's backend: QTEE's RPMB frames passed to an emulated eMMC device.

:class:`RpmbService` serves the RPMB listener (0x2000, :mod:`supplicant.rpmb_msg`) on an
:class:`~supplicant._rpmb.EmulatedRpmb`.  The real service (``rpmb_service.c``,
``rpmb_emmc.c``; cited in :mod:`supplicant.rpmb_msg`) moves QTEE's frames to the eMMC's
RPMB partition with ``MMC_IOC_MULTI_CMD`` and back; here each ioctl is one
:meth:`EmulatedRpmb.data_request`, and a request the device refuses is a failed ioctl.

* The dispatch refuses a shared buffer shorter than 20040 bytes (the listener's
  callback fails with ``Object_ERROR``).
* INIT, GET_DEV_INFO and PROVISION answer status 0, the partition's size in 512-byte
  sectors (``size_mult`` x 128 KiB / 512) and ``rel_wr_count`` = the device's
  ``rel_wr_sec_c``, with the request's version echoed (``rpmb_emmc_init``).
* READ: one ioctl sends the request frame at ``req_buff_offset`` (CMD25, one block) and
  reads ``num_sectors`` frames (CMD18) to offset 20; ``res_buff_len`` is their size.
  The device returns whole frames (the fields it does not set are zero).
* WRITE: ``rel_wr_count`` = 0, or ``num_sectors`` not a multiple of it, fails at once
  (status -1).  Otherwise one ioctl per ``rel_wr_count`` frames: the data frames
  (reliable write), a REQ_RESULT_READ frame, then the result frame read to offset 20.
  The loop stops at the first failed ioctl or a result frame whose result byte is not
  OK (WRITE_COUNTER_EXPIRED included): status -1 and ``res_buff_len`` 0, the result
  frame left in place.  Success answers the last result frame, 512 bytes.
* PARTITION answers status -1 (as a u32), no partitions, offset 16 (no table version
  is supported); any other id the error answer: status -1, length 0, offset 20.

**Chosen where the source is silent.**  Frames that would run past the shared buffer
(a ``req_buff_offset`` or ``num_sectors`` too large) are a failed ioctl: status -1.  The
device's state lives in the file it was opened on (``--rpmb-file``): every write the
device accepted is on disk before the response is written back, so a WRITE acknowledged
with status 0 survives a kill -9 of the supplicant.
"""

from __future__ import annotations

import threading
from typing import Final

from objects import QteeError, UsageError
from qtee import Result
from supplicant._rpmb import RPMB_FRAME_SIZE, EmulatedRpmb, RpmbRequestError, RpmbResult
from supplicant.rpmb_msg import (
    RPMB_SERVICE_BUF_LEN,
    RW_RSP_SIZE,
    ErrorResponse,
    InitRequest,
    InitResponse,
    PartitionRequest,
    PartitionResponse,
    RpmbCmd,
    RpmbRequest,
    RpmbResponse,
    RwRequest,
    RwResponse,
    UnsupportedRequest,
    decode_request,
    encode_response,
)

__all__ = ["RpmbService"]

_SECTOR: Final = 512
_SIZE_UNIT: Final = 128 * 1024
_RESULT_BYTE: Final = 509  # the low byte of the big-endian result field
_PARTITION_FAILED: Final = 0xFFFF_FFFF  # -1 in the u32 status field


class RpmbService:
    """The RPMB listener's dispatch on one emulated device."""

    def __init__(self, device: EmulatedRpmb) -> None:
        if not isinstance(device, EmulatedRpmb):
            raise UsageError(f"RpmbService needs an EmulatedRpmb, not {type(device).__name__}")
        self.device = device
        self._lock = threading.Lock()

    def handle(self, request: bytes | bytearray | memoryview) -> bytes:
        """Serve one request from the whole shared buffer; the bytes to write back at 0.

        A buffer shorter than 20040 bytes fails the callback (``QteeError`` ERROR), as the
        real dispatch does; a malformed request raises ``RpmbMsgDecodeError``."""
        if len(request) < RPMB_SERVICE_BUF_LEN:
            raise QteeError(
                Result.ERROR,
                f"RPMB buffer is {len(request)} bytes; it needs {RPMB_SERVICE_BUF_LEN}",
            )
        buf = bytes(request)
        req = decode_request(buf)
        with self._lock:
            return encode_response(self.serve(req, buf))

    def serve(self, req: RpmbRequest, buf: bytes) -> RpmbResponse:
        """The response to ``req``; ``buf`` is the shared buffer it came in."""
        match req:
            case InitRequest():
                dev = self.device
                return InitResponse(
                    cmd_id=req.cmd_id,
                    version=req.version,
                    status=0,
                    num_sectors=dev.size_mult * _SIZE_UNIT // _SECTOR,
                    rel_wr_count=dev.rel_wr_sec_c,
                )
            case RwRequest(cmd_id=RpmbCmd.RPMB_READ):
                return self._read(req, buf)
            case RwRequest():
                return self._write(req, buf)
            case PartitionRequest():
                return PartitionResponse(status=_PARTITION_FAILED)
            case UnsupportedRequest():
                return ErrorResponse(cmd_id=req.cmd_id)
            case _:
                raise UsageError(f"not an RPMB request record: {type(req).__name__}")

    def _read(self, req: RwRequest, buf: bytes) -> RwResponse:
        size = req.num_sectors * RPMB_FRAME_SIZE

        def failed() -> RwResponse:
            return RwResponse(
                cmd_id=req.cmd_id, status=-1, version=req.version, frames=b"", res_buff_len=0
            )

        fits = RW_RSP_SIZE + size <= len(buf)
        if len(req.frames) < req.wanted or not fits or req.num_sectors == 0:
            return failed()
        try:
            frames = self.device.data_request(req.frames, req.num_sectors)
        except RpmbRequestError:
            return failed()
        return RwResponse(
            cmd_id=req.cmd_id, status=0, version=req.version, frames=frames, res_buff_len=size
        )

    def _write(self, req: RwRequest, buf: bytes) -> RwResponse:
        result = buf[RW_RSP_SIZE : RW_RSP_SIZE + RPMB_FRAME_SIZE]

        def answer(status: int) -> RwResponse:
            n = RPMB_FRAME_SIZE if status == 0 else 0
            return RwResponse(
                cmd_id=req.cmd_id, status=status, version=req.version, frames=result, res_buff_len=n
            )

        per = req.rel_wr_count
        if per == 0 or req.num_sectors % per or len(req.frames) < req.wanted:
            return answer(-1)
        step = per * RPMB_FRAME_SIZE
        for start in range(0, req.wanted, step):
            try:
                result = self.device.data_request(req.frames[start : start + step], 1)
            except RpmbRequestError:
                return answer(-1)
            if result[_RESULT_BYTE] != RpmbResult.OK:
                return answer(-1)
        return answer(0)
