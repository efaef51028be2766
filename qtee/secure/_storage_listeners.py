"""QTEE's side of the GPFS (0x7000) and RPMB (0x2000) listeners: storage calls made by
secure code, as requests through :class:`~qtee.secure._listeners.ListenerHandle`.

Like any listener request (quic-teec.md §5.4) these run inside a direct invocation (a
TA's op): the request is written into the listener's shared buffer, the supplicant's
``request`` callback serves it, and the answer is read back; BUSY -> wait -> retry is
the handle's.  The byte layouts are :mod:`supplicant.gpfs_msg` and
:mod:`supplicant.rpmb_msg`; the RPMB frames are JEDEC's (:class:`supplicant.RpmbFrame`).

* :class:`GpfsClient`: ``read``/``write``/``remove``/``rename`` in the data or persist
  partition and ``version``; a non-zero ``err`` raises :class:`GpfsError` (an
  :class:`OSError` with that errno).
* :class:`RpmbClient`: ``init`` (the partition's size and frames per write), and the
  authenticated operations QTEE performs on the eMMC RPMB partition with its key:
  ``program_key``, ``write_counter``, ``write_blocks`` (frames MAC'd with the key,
  ``rel_wr_count`` frames per MAC) and ``read_blocks`` (MAC and nonce checked).  A
  listener status other than 0 or a device result other than OK raises
  :class:`RpmbError`.
"""

from __future__ import annotations

import dataclasses
import hmac
import os
import secrets
from typing import TYPE_CHECKING, Final

from objects import QteeBaseError, UsageError

if TYPE_CHECKING:
    from qtee.secure._world import SecureWorld
    from supplicant import RpmbFrame
    from supplicant.gpfs_msg import GpfsRequest, GpfsResponse, Partition
    from supplicant.rpmb_msg import InitResponse, RpmbRequest, RpmbResponse

__all__ = [
    "GPFS_LISTENER_ID",
    "RPMB_LISTENER_ID",
    "GpfsClient",
    "GpfsError",
    "RpmbClient",
    "RpmbError",
]

GPFS_LISTENER_ID: Final = 0x7000
RPMB_LISTENER_ID: Final = 0x2000
_BLOCK: Final = 256  # an RPMB frame's data field


class GpfsError(QteeBaseError, OSError):
    """A GPFS request answered ``err`` != 0 (``errno`` is that err; -1 for an unknown id)."""

    def __init__(self, err: int, detail: str) -> None:
        why = os.strerror(err) if err > 0 else f"err {err}"
        OSError.__init__(self, err, f"{why}: {detail}")
        self.detail = detail


class RpmbError(QteeBaseError):
    """An RPMB request failed: the listener's ``status`` or the device's ``result``."""

    def __init__(self, detail: str, *, status: int = 0, result: int = 0) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.result = result


class GpfsClient:
    """GP file storage through the supplicant's GPFS listener, from secure code."""

    def __init__(self, world: SecureWorld) -> None:
        self.world = world

    def request(self, req: GpfsRequest) -> GpfsResponse:
        """Send one request record; its decoded response."""
        from supplicant import gpfs_msg as m

        handle = self.world.listeners.get(GPFS_LISTENER_ID)
        return m.decode_response(handle.request(m.encode_request(req)))

    @staticmethod
    def _check(rsp: GpfsResponse, what: str) -> None:
        if rsp.err != 0:
            raise GpfsError(rsp.err, what)

    def read(self, partition: Partition, path: str, offset: int = 0, count: int = -1) -> bytes:
        """Up to ``count`` bytes (default: the 500 KiB most) of ``path`` from ``offset``."""
        from supplicant import gpfs_msg as m

        n = m.GPFS_FILE_SIZE if count == -1 else count
        rsp = self.request(m.ReadRequest(partition=partition, path=path, offset=offset, count=n))
        self._check(rsp, f"read {path!r}")
        assert isinstance(rsp, m.ReadResponse)
        return rsp.data

    def write(
        self, partition: Partition, path: str, data: bytes, offset: int = 0, *, backup: bool = False
    ) -> int:
        """Write ``data`` at ``offset`` of ``path``; the bytes written."""
        from supplicant import gpfs_msg as m

        req = m.WriteRequest(
            partition=partition, path=path, offset=offset, data=data, backup=backup
        )
        rsp = self.request(req)
        self._check(rsp, f"write {path!r}")
        assert isinstance(rsp, m.WriteResponse)
        return rsp.written

    def remove(self, partition: Partition, path: str) -> None:
        """Delete the file ``path``."""
        from supplicant import gpfs_msg as m

        self._check(self.request(m.RemoveRequest(partition=partition, path=path)), "remove")

    def rename(self, partition: Partition, old: str, new: str) -> None:
        """Rename ``old`` to ``new`` in the partition."""
        from supplicant import gpfs_msg as m

        self._check(self.request(m.RenameRequest(partition=partition, old=old, new=new)), "rename")

    def version(self) -> int:
        """The service's secure file system version."""
        from supplicant import gpfs_msg as m

        rsp = self.request(m.VersionRequest())
        self._check(rsp, "version")
        assert isinstance(rsp, m.VersionResponse)
        return rsp.version


class RpmbClient:
    """QTEE's use of the eMMC RPMB partition through the supplicant's RPMB listener.

    ``key`` is the 32-byte authentication key QTEE programs and MACs with."""

    def __init__(self, world: SecureWorld, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != 32:
            raise UsageError("an RPMB key is 32 bytes")
        self.world = world
        self.key = key

    def request(self, req: RpmbRequest) -> RpmbResponse:
        """Send one request record; its decoded response."""
        from supplicant import rpmb_msg as m

        handle = self.world.listeners.get(RPMB_LISTENER_ID)
        return m.decode_response(handle.request(m.encode_request(req)))

    def init(self) -> InitResponse:
        """INIT: the partition's size (512-byte sectors) and frames per reliable write."""
        from supplicant import rpmb_msg as m

        rsp = self.request(m.InitRequest())
        assert isinstance(rsp, m.InitResponse)
        if rsp.status != 0:
            raise RpmbError(f"RPMB INIT answered status {rsp.status}", status=rsp.status)
        return rsp

    def _send(self, frames: list[RpmbFrame], rel_wr_count: int, what: str) -> RpmbFrame:
        """WRITE the frames; the result frame (device result checked)."""
        from supplicant import RpmbFrame, RpmbResult
        from supplicant import rpmb_msg as m

        raw = b"".join(f.pack() for f in frames)
        handle = self.world.listeners.get(RPMB_LISTENER_ID)
        buf = handle.request(m.encode_request(m.RwRequest.write(raw, rel_wr_count)))
        rsp = m.decode_response(buf)
        assert isinstance(rsp, m.RwResponse)
        # a failed write counts no frames but leaves its result frame in place
        result = RpmbFrame.unpack(buf[m.RW_RSP_SIZE : m.RW_RSP_SIZE + 512])
        code = result.result
        if rsp.status != 0 or code != RpmbResult.OK:
            raise RpmbError(
                f"RPMB {what} failed: status {rsp.status}, result {code:#x}",
                status=rsp.status,
                result=code,
            )
        return result

    def _read(self, frame: RpmbFrame, blocks: int, what: str) -> list[RpmbFrame]:
        from supplicant import RpmbFrame
        from supplicant import rpmb_msg as m

        rsp = self.request(m.RwRequest.read(frame.pack(), blocks))
        assert isinstance(rsp, m.RwResponse)
        if rsp.status != 0:
            raise RpmbError(f"RPMB {what} failed: status {rsp.status}", status=rsp.status)
        return RpmbFrame.unpack_many(rsp.frames)

    def _verify(self, frames: list[RpmbFrame], nonce: bytes, what: str) -> None:
        from supplicant import RpmbResult, frame_mac

        last = frames[-1]
        if last.result != RpmbResult.OK:
            raise RpmbError(f"RPMB {what}: result {last.result:#x}", result=last.result)
        if not hmac.compare_digest(frame_mac(self.key, frames), last.key_mac):
            raise RpmbError(f"RPMB {what}: the response's MAC does not verify")
        if any(f.nonce != nonce for f in frames):
            raise RpmbError(f"RPMB {what}: the response does not echo the nonce")

    def program_key(self) -> None:
        """Program ``key`` into the device (once per device)."""
        from supplicant import RpmbFrame, RpmbMsgType

        frame = RpmbFrame(key_mac=self.key, msg_type=RpmbMsgType.REQ_AUTH_KEY_PROGRAM)
        self._send([frame], 1, "key program")

    def write_counter(self) -> int:
        """The device's write counter (response MAC and nonce checked)."""
        from supplicant import RpmbFrame, RpmbMsgType

        nonce = secrets.token_bytes(16)
        req = RpmbFrame(nonce=nonce, msg_type=RpmbMsgType.REQ_WRITE_COUNTER_VAL_READ)
        frames = self._read(req, 1, "counter read")
        self._verify(frames, nonce, "counter read")
        return frames[0].write_counter

    def write_blocks(self, address: int, data: bytes) -> int:
        """Write ``data`` (whole 256-byte blocks) from block ``address``, ``rel_wr_count``
        frames per MAC as INIT says; the write counter afterwards."""
        from supplicant import RpmbFrame, RpmbMsgType, frame_mac

        if not isinstance(data, bytes) or not data or len(data) % _BLOCK:
            raise UsageError(f"RPMB data is whole {_BLOCK}-byte blocks, not {len(data)} bytes")
        per = self.init().rel_wr_count
        blocks = [data[i : i + _BLOCK] for i in range(0, len(data), _BLOCK)]
        counter = self.write_counter()
        last: RpmbFrame | None = None
        for first in range(0, len(blocks), per):
            batch = blocks[first : first + per]
            frames = [
                RpmbFrame(
                    data=b,
                    write_counter=counter,
                    address=address + first,
                    block_count=len(batch),
                    msg_type=RpmbMsgType.REQ_AUTH_DATA_WRITE,
                )
                for b in batch
            ]
            mac = frame_mac(self.key, frames)
            frames[-1] = dataclasses.replace(frames[-1], key_mac=mac)
            last = self._send(frames, len(batch), "data write")
            counter = last.write_counter
        assert last is not None
        return counter

    def read_blocks(self, address: int, count: int) -> bytes:
        """``count`` blocks from block ``address`` (response MAC and nonce checked)."""
        from supplicant import RpmbFrame, RpmbMsgType

        nonce = secrets.token_bytes(16)
        req = RpmbFrame(
            nonce=nonce, address=address, block_count=count, msg_type=RpmbMsgType.REQ_AUTH_DATA_READ
        )
        frames = self._read(req, count, "data read")
        self._verify(frames, nonce, "data read")
        return b"".join(f.data for f in frames)
