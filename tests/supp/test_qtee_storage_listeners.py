"""QTEE's GPFS (0x7000) and RPMB (0x2000) listeners in the supplicant (quic-teec.md §5.4;
issue 16 point 5), reached as QTEE reaches them: secure code in a TA's op
(:class:`tests.supp.test_listeners.ProbeTA`) makes the request through the listener handle.

Facts checked here come from qualcomm-linux/pkg-minkipc:
* ``listeners/libfsservice/gpfs/gpfs_msg.h@4dbe8a3c9b9fa5c4f769cc90ed6c52de470c7448``
  and ``cmn/cmn.h@4dbe8a3`` (ids from 4, 504 KiB buffer, 500 KiB payload, version 2,
  structs), ``gpfs/gpfs.c@6652928397b976fcf4e8cdec41f2081acecee3ff`` and
  ``gpfs/gpfs_main.c@6652928`` (err codes, no truncation, backup, remove of a directory
  EINVAL, unknown id -1, short buffer fails the dispatch);
* ``listeners/librpmbservice/rpmb_service.c@4dbe8a3c9b9fa5c4f769cc90ed6c52de470c7448``
  (ids 0x101.., 14, 15, TZ_MAX_BUF_LEN 20040, the structs, PARTITION and error answers)
  and ``rpmb_emmc.c@539ab277d8fb199561056d6a0265764b858aca44`` (size in 512-byte sectors,
  READ = one request frame + num_sectors frames, WRITE = rel_wr_count frames per
  transaction with a result frame, stop on a non-OK result).
"""

from __future__ import annotations

import errno
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import qtee
from objects import QteeError
from qtee import Device, DeviceServer, Result
from qtee.secure import (
    GpfsClient,
    GpfsError,
    RpmbClient,
    RpmbError,
    SecureWorld,
    register_ta,
    unregister_ta,
)
from supplicant import (
    GPFS_BUFFER_SIZE,
    GPFS_LISTENER_ID,
    RPMB_BUFFER_SIZE,
    RPMB_LISTENER_ID,
    EmulatedRpmb,
    GpfsService,
    RpmbFrame,
    RpmbMsgType,
    RpmbResult,
    RpmbService,
    Supplicant,
    frame_mac,
)
from supplicant import gpfs_msg as gm
from supplicant import rpmb_msg as rm
from tests._helpers import wait_until
from tests._paths import REPO
from tests.supp.test_listeners import PROBE, ProbeTA, TaClient

KEY = bytes(range(32))
DATA = gm.Partition.DATA
PERSIST = gm.Partition.PERSIST


@pytest.fixture
def dev(qtee_device: Device) -> Iterator[Device]:
    register_ta(PROBE, ProbeTA)
    try:
        yield qtee_device
    finally:
        unregister_ta(PROBE)


@pytest.fixture
def ta(dev: Device) -> Iterator[TaClient]:
    t = TaClient(dev)
    yield t
    t.close()


def _raw(world: SecureWorld, lid: int, request: bytes) -> bytes:
    """The shared buffer after the listener served ``request`` (as QTEE reads it)."""
    return world.listeners.get(lid).request(request)


# --------------------------------------------------------------------------- registration


def test_supplicant_registers_gpfs_and_rpmb_with_their_buffers(dev: Device, tmp_path: Path) -> None:
    """§5.4 buffer table: GPFS 0x7000 with 504 KiB, RPMB 0x2000 with TZ_MAX_BUF_LEN =
    20040 bytes; both unregistered by stop, nothing left behind."""
    assert (GPFS_LISTENER_ID, GPFS_BUFFER_SIZE) == (0x7000, 504 * 1024)
    assert (RPMB_LISTENER_ID, RPMB_BUFFER_SIZE) == (0x2000, 20040)
    sup = Supplicant(dev, gpfs=tmp_path / "g", rpmb=EmulatedRpmb(), time_service=False)
    try:
        assert dev.world.listeners.ids() == [0x2000, 0x7000]
        assert dev.world.listeners.get(0x7000).buffer_size == 504 * 1024
        assert dev.world.listeners.get(0x2000).buffer_size == 20040
        assert (tmp_path / "g" / "data").is_dir() and (tmp_path / "g" / "persist").is_dir()
    finally:
        sup.stop()
    assert dev.world.listeners.ids() == []
    assert dev.leaks() == {}


# --------------------------------------------------------------------------- GPFS bytes


def test_gpfs_request_and_response_bytes() -> None:
    """gpfs_msg.h: each struct packed little-endian; ids 4..12 (data 4-7, persist 8-11,
    version 12); a write request is 512272 bytes with its 500 KiB payload field."""
    name = b"d/f".ljust(256, b"\0")
    rd = gm.ReadRequest(partition=PERSIST, path="d/f", offset=3, count=10)
    assert gm.encode_request(rd) == struct.pack("<I", 8) + name + struct.pack("<iI", 3, 10)
    wr = gm.encode_request(gm.WriteRequest(partition=DATA, path="d/f", offset=1, data=b"xy"))
    assert len(wr) == 4 + 256 + 12 + 500 * 1024
    assert wr[:272] == struct.pack("<I", 5) + name + struct.pack("<iII", 1, 2, 0)
    assert wr[272:274] == b"xy" and not any(wr[274:])
    assert gm.decode_request(wr) == gm.WriteRequest(
        partition=DATA, path="d/f", offset=1, data=b"xy"
    )
    rn = gm.RenameRequest(partition=DATA, old="a", new="b")
    assert gm.encode_request(rn) == struct.pack("<I", 7) + b"a".ljust(256, b"\0") + b"b".ljust(
        256, b"\0"
    )
    assert gm.encode_request(gm.RemoveRequest(partition=PERSIST, path="a"))[:4] == b"\x0a\0\0\0"
    assert gm.encode_response(gm.VersionResponse(version=2, err=0)) == struct.pack("<IIi", 12, 2, 0)
    assert gm.encode_response(gm.ReadResponse(cmd_id=4, err=0, data=b"abc")) == (
        struct.pack("<IiI", 4, 0, 3) + b"abc"
    )
    assert gm.encode_response(gm.WriteResponse(cmd_id=9, err=28, written=0)) == struct.pack(
        "<IiI", 9, 28, 0
    )
    assert gm.decode_request(struct.pack("<I", 13)) == gm.UnsupportedRequest(cmd_id=13)
    with pytest.raises(gm.GpfsDecodeError, match="no NUL"):
        gm.decode_request(struct.pack("<I", 4) + b"x" * 264)
    with pytest.raises(gm.GpfsDecodeError, match="needs 268"):
        gm.decode_request(struct.pack("<I", 4) + b"x\0")
    with pytest.raises(gm.GpfsUsageError, match="at most 512000"):
        gm.WriteRequest(partition=DATA, path="f", offset=0, data=bytes(500 * 1024 + 1))


# --------------------------------------------------------------------------- GPFS service


@pytest.fixture
def gpfs(dev: Device, tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "gpfs"
    sup = Supplicant(dev, gpfs=root, time_service=False)
    yield root
    sup.stop()


def test_gpfs_file_life_cycle_from_a_ta(ta: TaClient, gpfs: Path) -> None:
    """gpfs.c: WRITE creates the file and its parents and writes at the offset without
    truncating (err 0, bytes written); READ answers the bytes (short at the end of the
    file); backup copies the old contents to <path>.bak; RENAME and REMOVE; VERSION 2;
    the partitions are separate directories."""

    def scenario(world: SecureWorld) -> dict[str, Any]:
        g = GpfsClient(world)
        out: dict[str, Any] = {"version": g.version()}
        out["w1"] = g.write(DATA, "app/obj", b"0123456789")
        out["w2"] = g.write(DATA, "app/obj", b"ab", 2)  # no truncation
        out["whole"] = g.read(DATA, "app/obj")
        out["part"] = g.read(DATA, "app/obj", 8, 100)  # short at the end of the file
        out["gap"] = g.write(PERSIST, "/p", b"z", 3)  # a leading '/' is one more separator
        out["gapped"] = g.read(PERSIST, "p")
        out["bak"] = g.write(DATA, "app/obj", b"NEW", 0, backup=True)
        out["backup"] = g.read(DATA, "app/obj.bak")
        g.rename(DATA, "app/obj", "app/moved")
        out["moved"] = g.read(DATA, "app/moved")
        g.remove(DATA, "app/moved")
        return out

    out = ta.run(scenario)
    assert out == {
        "version": 2,
        "w1": 10,
        "w2": 2,
        "whole": b"01ab456789",
        "part": b"89",
        "gap": 1,
        "gapped": b"\0\0\0z",
        "bak": 3,
        "backup": b"01ab456789",
        "moved": b"NEWb456789",
    }
    assert (gpfs / "persist" / "p").read_bytes() == b"\0\0\0z"
    assert sorted(os.listdir(gpfs / "data" / "app")) == ["obj.bak"]


def test_gpfs_errors_are_errnos_in_err(ta: TaClient, gpfs: Path) -> None:
    """gpfs.c: err carries the errno (ENOENT for a missing file, EINVAL for an empty path,
    a negative offset or REMOVE of a directory); the data partition does not see the
    persist one; an escape from the partition is refused (FileStore: EACCES)."""
    (gpfs / "data" / "dir").mkdir()
    (gpfs / "persist" / "only-persist").write_bytes(b"p")

    def code(fn: Any) -> int:
        try:
            fn()
        except GpfsError as exc:
            return exc.errno or 0
        return 0

    def scenario(world: SecureWorld) -> list[int]:
        g = GpfsClient(world)
        return [
            code(lambda: g.read(DATA, "missing")),
            code(lambda: g.read(DATA, "only-persist")),
            code(lambda: g.read(DATA, "")),
            code(lambda: g.write(DATA, "f", b"x", -1)),
            code(lambda: g.remove(DATA, "dir")),
            code(lambda: g.remove(DATA, "missing")),
            code(lambda: g.rename(DATA, "missing", "x")),
            code(lambda: g.read(DATA, "../persist/only-persist")),
            code(lambda: g.read(PERSIST, "only-persist")),
        ]

    E = errno
    assert ta.run(scenario) == [
        E.ENOENT,
        E.ENOENT,
        E.EINVAL,
        E.EINVAL,
        E.EINVAL,
        E.ENOENT,
        E.ENOENT,
        E.EACCES,
        0,
    ]


def test_gpfs_raw_answers_in_the_shared_buffer(ta: TaClient, gpfs: Path) -> None:
    """gpfs.c gpfile_error / gpfile_read: an unknown id answers {id, err -1}; a failed
    READ answers {id, err, 0} and leaves the rest of the buffer alone."""

    def scenario(world: SecureWorld) -> tuple[bytes, bytes]:
        unknown = _raw(world, 0x7000, struct.pack("<I", 0x7FFFFFFF) + b"\xaa" * 8)
        req = gm.encode_request(
            gm.ReadRequest(partition=DATA, path="abcdefghij", offset=0, count=4)
        )
        failed = _raw(world, 0x7000, req)
        return unknown[:12], failed[:20]

    unknown, failed = ta.run(scenario)
    assert unknown == struct.pack("<Ii", 0x7FFFFFFF, -1) + b"\xaa" * 4
    assert failed == struct.pack("<IiI", 4, errno.ENOENT, 0) + b"ij\0\0\0\0\0\0"


def test_gpfs_short_buffer_fails_the_callback(dev: Device, ta: TaClient, tmp_path: Path) -> None:
    """gpfs_main.c smci_dispatch: a buffer shorter than TZ_GP_MAX_BUF_LEN returns -1,
    which CListenerCBO turns into Object_ERROR (§5.4): QTEE sees ERROR, not a response."""
    with pytest.raises(QteeError) as info:
        GpfsService(tmp_path / "x").handle(bytes(504 * 1024 - 1))
    assert info.value.result == Result.ERROR
    sup = Supplicant(dev, time_service=False)
    try:
        sup.add_listener(0x7000, GpfsService(tmp_path / "y").handle, 20 * 1024)

        def probe(world: SecureWorld) -> int:
            try:
                GpfsClient(world).version()
            except QteeError as exc:
                return exc.result
            return 0

        assert ta.run(probe) == Result.ERROR
    finally:
        sup.stop()


# --------------------------------------------------------------------------- RPMB bytes


def test_rpmb_request_and_response_bytes() -> None:
    """rpmb_service.c: INIT {id, version} -> {id, version, status, num_sectors,
    rel_wr_count}; READ/WRITE {id, num_sectors, req_buff_len, req_buff_offset, version,
    rel_wr_count} with frames at the offset -> {id, status, res_buff_len,
    res_buff_offset = 20, version} and frames at 20."""
    assert rm.encode_request(rm.InitRequest(version=7)) == struct.pack("<II", 0x101, 7)
    frames = bytes(range(256)) * 4
    wr = rm.encode_request(rm.RwRequest.write(frames, 2, version=1))
    assert wr == struct.pack("<IIIIII", 0x103, 2, 1024, 24, 1, 2) + frames
    assert rm.decode_request(wr) == rm.RwRequest(
        cmd_id=0x103,
        num_sectors=2,
        frames=frames,
        version=1,
        rel_wr_count=2,
        req_buff_offset=24,
        req_buff_len=1024,
    )
    rd = rm.decode_request(struct.pack("<IIIIII", 0x102, 3, 0, 32, 0, 0) + bytes(8) + frames)
    assert isinstance(rd, rm.RwRequest) and rd.frames == frames[:512]  # one request frame
    rsp = rm.RwResponse(cmd_id=0x102, status=0, version=4, frames=b"F" * 512, res_buff_len=512)
    assert rm.encode_response(rsp) == struct.pack("<IiIII", 0x102, 0, 512, 20, 4) + b"F" * 512
    assert rm.decode_response(rm.encode_response(rsp)) == rsp
    init = rm.InitResponse(cmd_id=14, version=0, status=0, num_sectors=512, rel_wr_count=1)
    assert rm.encode_response(init) == struct.pack("<IIiII", 14, 0, 0, 512, 1)
    assert rm.decode_request(struct.pack("<I", 0x105)) == rm.UnsupportedRequest(cmd_id=0x105)


# --------------------------------------------------------------------------- RPMB service


@pytest.fixture
def rpmb(dev: Device) -> Iterator[EmulatedRpmb]:
    device = EmulatedRpmb(size_mult=2, rel_wr_sec_c=2)
    sup = Supplicant(dev, rpmb=device, time_service=False)
    yield device
    sup.stop()


def test_rpmb_init_partition_and_unknown_ids(ta: TaClient, rpmb: EmulatedRpmb) -> None:
    """rpmb_service.c: INIT, GET_DEV_INFO (14) and PROVISION (15) answer the device's size
    in 512-byte sectors (size_mult x 128 KiB / 512) and rel_wr_count, echoing id and
    version; PARTITION answers status 0xFFFFFFFF, 0 partitions, offset 16; an unknown id
    answers {status -1, length 0, offset 20} and leaves the id and bytes from 16 alone."""

    def scenario(world: SecureWorld) -> list[bytes]:
        return [
            _raw(world, 0x2000, struct.pack("<II", 0x101, 9))[:20],
            _raw(world, 0x2000, struct.pack("<II", 14, 3))[:20],
            _raw(world, 0x2000, struct.pack("<II", 15, 0))[:20],
            _raw(world, 0x2000, struct.pack("<III", 0x104, 0x100, 0))[:16],
            _raw(world, 0x2000, struct.pack("<I", 0x105) + b"\xaa" * 30)[:34],
        ]

    assert ta.run(scenario) == [
        struct.pack("<IIiII", 0x101, 9, 0, 512, 2),
        struct.pack("<IIiII", 14, 3, 0, 512, 2),
        struct.pack("<IIiII", 15, 0, 0, 512, 2),
        struct.pack("<IIII", 0x104, 0xFFFFFFFF, 0, 16),
        struct.pack("<IiII", 0x105, -1, 0, 20) + b"\xaa" * 18,
    ]


def test_rpmb_key_write_and_read_through_qtee(ta: TaClient, rpmb: EmulatedRpmb) -> None:
    """rpmb_emmc.c: frames pass to the device as built by QTEE -- the key programmed once,
    an authenticated write of 3 blocks in transactions of rel_wr_count = 2 and 1 frames
    (the counter moves by one per block), an authenticated read MAC'd and nonce'd; a
    second key program answers the result frame GENERAL_FAILURE with status -1."""

    def scenario(world: SecureWorld) -> dict[str, Any]:
        r = RpmbClient(world, KEY)
        out: dict[str, Any] = {"init": r.init().num_sectors}
        r.program_key()
        out["counter0"] = r.write_counter()
        out["counter1"] = r.write_blocks(5, b"A" * 256 + b"B" * 256 + b"C" * 256)
        out["read"] = r.read_blocks(5, 3)
        try:
            r.program_key()
        except RpmbError as exc:
            out["again"] = (exc.status, exc.result)
        return out

    out = ta.run(scenario)
    assert out == {
        "init": 512,
        "counter0": 0,
        "counter1": 3,
        "read": b"A" * 256 + b"B" * 256 + b"C" * 256,
        "again": (-1, RpmbResult.GENERAL_FAILURE),
    }
    assert rpmb.key_programmed and rpmb.write_counter == 3


def _write_frames(address: int, blocks: list[bytes], counter: int, key: bytes) -> bytes:
    frames = [
        RpmbFrame(
            data=b,
            write_counter=counter,
            address=address,
            block_count=len(blocks),
            msg_type=RpmbMsgType.REQ_AUTH_DATA_WRITE,
        )
        for b in blocks
    ]
    last = frames[-1]
    mac = frame_mac(key, frames)
    frames[-1] = RpmbFrame(
        data=last.data,
        key_mac=mac,
        write_counter=last.write_counter,
        address=last.address,
        block_count=last.block_count,
        msg_type=last.msg_type,
    )
    return b"".join(f.pack() for f in frames)


def test_rpmb_write_failures(ta: TaClient, rpmb: EmulatedRpmb) -> None:
    """rpmb_emmc.c rpmb_emmc_write: rel_wr_count 0 or a num_sectors that is not a multiple
    of it fails at once (status -1, res_buff_len 0); a result frame that is not OK
    (AUTH_FAILURE for a bad MAC, ADDRESS_FAILURE past the end) stops the loop with status
    -1 and res_buff_len 0, the result frame left at offset 20."""

    def scenario(world: SecureWorld) -> list[tuple[int, int, int]]:
        RpmbClient(world, KEY).program_key()
        good = _write_frames(0, [b"x" * 256, b"y" * 256], 0, KEY)
        bad_mac = _write_frames(0, [b"x" * 256, b"y" * 256], 0, bytes(32))
        far = _write_frames(1023, [b"x" * 256, b"y" * 256], 0, KEY)
        out = []
        for frames, per in ((good, 0), (good, 3), (bad_mac, 2), (far, 2), (good, 2)):
            req = rm.encode_request(rm.RwRequest.write(frames, per))
            raw = _raw(world, 0x2000, req)
            _, status, rlen, roff, _ = struct.unpack_from("<IiIII", raw)
            result = RpmbFrame.unpack(raw[20:532])
            out.append((status, rlen, result.result if per in (2,) else -9))
            assert roff == 20
        return out

    assert ta.run(scenario) == [
        (-1, 0, -9),
        (-1, 0, -9),
        (-1, 0, RpmbResult.AUTH_FAILURE),
        (-1, 0, RpmbResult.ADDRESS_FAILURE),
        (0, 512, RpmbResult.OK),
    ]
    assert rpmb.write_counter == 2


def test_rpmb_read_raw_answers(ta: TaClient, rpmb: EmulatedRpmb) -> None:
    """rpmb_emmc.c rpmb_emmc_read: the one request frame goes to the device and
    num_sectors response frames come back at offset 20 (status 0, res_buff_len =
    num_sectors x 512); frames that would not fit the buffer, or none, fail (status -1,
    length 0)."""
    nonce = bytes(range(16, 32))

    def scenario(world: SecureWorld) -> list[tuple[Any, ...]]:
        RpmbClient(world, KEY).program_key()
        counter = RpmbFrame(nonce=nonce, msg_type=RpmbMsgType.REQ_WRITE_COUNTER_VAL_READ)
        data = RpmbFrame(nonce=nonce, msg_type=RpmbMsgType.REQ_AUTH_DATA_READ)
        out: list[tuple[Any, ...]] = []
        for frame, blocks in ((counter, 1), (data, 39), (data, 40), (data, 0)):
            req = rm.RwRequest.read(frame.pack(), blocks)
            raw = _raw(world, 0x2000, rm.encode_request(req))
            out.append(struct.unpack_from("<IiIII", raw))
            if blocks == 1:
                rsp = RpmbFrame.unpack(raw[20:532])
                mac_ok = frame_mac(KEY, [rsp]) == rsp.key_mac
                out.append((rsp.msg_type, rsp.nonce, rsp.result, rsp.write_counter, mac_ok))
        return out

    assert ta.run(scenario) == [
        (0x102, 0, 512, 20, 0),
        (RpmbMsgType.RESP_WRITE_COUNTER_VAL_READ, nonce, RpmbResult.OK, 0, True),
        (0x102, 0, 39 * 512, 20, 0),  # 20 + 39 x 512 = 19988 bytes fit in 20040
        (0x102, -1, 0, 20, 0),
        (0x102, -1, 0, 20, 0),
    ]


def test_rpmb_short_buffer_fails_the_dispatch() -> None:
    """rpmb_service.c smci_dispatch: buf_len < TZ_MAX_BUF_LEN returns -1 (Object_ERROR)."""
    service = RpmbService(EmulatedRpmb())
    with pytest.raises(QteeError) as info:
        service.handle(struct.pack("<II", 0x101, 0).ljust(20039, b"\0"))
    assert info.value.result == Result.ERROR
    ok = rm.decode_response(service.handle(struct.pack("<II", 0x101, 0).ljust(20040, b"\0")))
    assert isinstance(ok, rm.InitResponse) and ok.status == 0


def test_rpmb_busy_listener_makes_qtee_wait(dev: Device, ta: TaClient) -> None:
    """§5.4 busy/wait rule on the RPMB listener: while it serves a request from its own
    side, QTEE's request is answered BUSY, QTEE waits and retries, and gets its answer."""
    sup = Supplicant(dev, rpmb=EmulatedRpmb(), time_service=False)
    listener = sup.listeners[0x2000]
    inner = listener.handler
    entered, release = threading.Event(), threading.Event()

    def blocking(data: bytes) -> bytes:
        if not entered.is_set():
            entered.set()
            release.wait(10)
        return inner(data)

    listener.handler = blocking
    answers: list[Any] = []
    try:
        listener.buffer.view[:8] = struct.pack("<II", 0x101, 0)
        d = threading.Thread(target=listener.request, daemon=True)
        d.start()
        assert entered.wait(5)
        t = threading.Thread(
            target=lambda: answers.append(ta.run(lambda w: RpmbClient(w, KEY).init())),
            daemon=True,
        )
        t.start()
        time.sleep(0.2)
        assert answers == []  # QTEE is waiting on the busy listener
        release.set()
        d.join(10)
        t.join(10)
    finally:
        release.set()
        sup.stop()
    assert answers == [
        rm.InitResponse(cmd_id=0x101, version=0, status=0, num_sectors=512, rel_wr_count=1)
    ]
    assert listener.served == 2


# --------------------------------------------------------------------------- kill -9


class RpmbUser(qtee.TrustedApp):
    """op 0: program the key (once); op 1 write(u16 address, 256 bytes) -> u32 counter;
    op 2 read(u16 address) -> 256 bytes.  QTEE's RPMB use, through listener 0x2000."""

    @qtee.op(0)
    def program(self) -> None:
        RpmbClient(self.world, KEY).program_key()

    @qtee.op(1, ib=(258,), ob=(4,))
    def write(self, req: bytes) -> bytes:
        (address,) = struct.unpack_from("<H", req)
        return struct.pack("<I", RpmbClient(self.world, KEY).write_blocks(address, req[2:]))

    @qtee.op(2, ib=(2,), ob=(256,))
    def read(self, req: bytes) -> bytes:
        (address,) = struct.unpack("<H", req)
        return RpmbClient(self.world, KEY).read_blocks(address, 1)


def _supplicant(server: DeviceServer, rpmb_file: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qtee",
            "supplicant",
            "--connect",
            server.path,
            "--no-time",
            "--rpmb-file",
            str(rpmb_file),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if not wait_until(lambda: server.device.world.listeners.ids() == [0x2000], 20):
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the supplicant did not register: {out!r} {err!r}")
    return proc


def test_acknowledged_rpmb_write_survives_kill_9(tmp_path: Path) -> None:
    """Issue 16 point 5: ``qtee supplicant --rpmb-file`` serving a device server; a TA's
    RPMB write is acknowledged (status 0, result OK, counter 1), the supplicant is killed
    with SIGKILL, a new one on the same file serves the same partition: the key is still
    programmed, the data reads back and the counter goes on from 1."""
    name = f"rpmb.user.{os.getpid()}"
    register_ta(name, RpmbUser)
    server = DeviceServer(str(tmp_path / "s"), introspect=True).start()
    rpmb_file = tmp_path / "rpmb.bin"
    procs: list[subprocess.Popen[str]] = []
    try:
        procs.append(_supplicant(server, rpmb_file))
        with (
            qtee.Client(qtee.connect(server.path), workers=1) as client,
            client.client_env() as env,
            client.open_service(env, 3) as loader,
        ):
            (ctrl,) = loader.invoke(0, qtee.ta_image(name), qtee.OUT_OBJECT)
            (app,) = ctrl.invoke(2, qtee.OUT_OBJECT)
            try:
                app.invoke(0)
                (counter,) = app.invoke(1, struct.pack("<H", 7) + b"K" * 256, qtee.Out(4))
                assert struct.unpack("<I", counter) == (1,)
                procs[0].send_signal(signal.SIGKILL)
                procs[0].wait(10)
                assert wait_until(lambda: server.device.world.listeners.ids() == [], 10)
                procs.append(_supplicant(server, rpmb_file))
                (data,) = app.invoke(2, struct.pack("<H", 7), qtee.Out(256))
                assert data == b"K" * 256
                (counter,) = app.invoke(1, struct.pack("<H", 8) + b"L" * 256, qtee.Out(4))
                assert struct.unpack("<I", counter) == (2,)
            finally:
                app.release()
                ctrl.release()
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.communicate(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.communicate()
            else:
                p.communicate()
        server.stop()
        unregister_ta(name)
    assert procs[0].returncode == -signal.SIGKILL
    assert procs[1].returncode == 0
    with EmulatedRpmb(rpmb_file) as device:
        assert device.key_programmed and device.write_counter == 2


# --------------------------------------------------------------------------- CLI


def test_cli_check_calls_gpfs_and_rpmb(tmp_path: Path) -> None:
    """``qtee supplicant --gpfs DIR --rpmb --check`` registers 0x7000 and 0x2000 and a TA
    calls each once: GPFS VERSION 2, RPMB INIT with the emulated partition's size."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qtee",
            "supplicant",
            "--no-time",
            "--gpfs",
            str(tmp_path / "g"),
            "--rpmb",
            "--check",
        ],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "listeners registered: 0x2000, 0x7000; TA autoload: off",
        "  rpmb (0x2000): InitResponse(cmd_id=257, version=0, status=0, num_sectors=512, "
        "rel_wr_count=1)",
        "  gpfs (0x7000): VersionResponse(version=2, err=0)",
        "requests served: {'0x7000': 1, '0x2000': 1}",
        "tables: empty",
    ]


def test_cli_qtee_storage_options_are_checked(tmp_path: Path) -> None:
    """``--rpmb`` (memory) and ``--rpmb-file`` (a file) are one choice; ``--gpfs`` and
    ``--rpmb`` belong to the QTEE listener daemon, not to ``--tee optee`` (exit 2)."""
    base = [sys.executable, "-m", "qtee", "supplicant"]
    for extra, says in [
        (["--rpmb", "--rpmb-file", str(tmp_path / "r")], "give one"),
        (["--tee", "optee", "--connect", "P", "--gpfs", str(tmp_path)], "QTEE listener daemon"),
        (["--tee", "optee", "--connect", "P", "--rpmb"], "QTEE listener daemon"),
    ]:
        out = subprocess.run(
            [*base, *extra], cwd=REPO, capture_output=True, text=True, check=False, timeout=60
        )
        assert out.returncode == 2 and says in out.stderr, out
    assert not (tmp_path / "r").exists()
