"""tee-supplicant's emulated RPMB device and its RPC (issue 16 point 5).

Facts from ``OP-TEE/optee_client:tee-supplicant/src/rpmb.c@44289ee`` (``rpmb.c`` below):
the frame layout, ``rpmb_data_req`` and the ``ioctl_emu_*`` functions, and
``rpmb_process_request``'s size checks; the RPC from ``tee_supplicant.c@44289ee``
``process_rpmb``/``get_param``.  Exact result codes and bytes are asserted.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qtee import OpteeDevice
from qtee._optee.supp import OpteeRpcCmd, attach_rpc
from qtee.addrspace import CheckedMemory
from qtee.gp import Cred, TeecResult
from qtee.secure import GpTaError, QteeRoot, SecureWorld
from supplicant import (
    EmulatedRpmb,
    OpteeSupplicant,
    RpmbFileError,
    RpmbFrame,
    RpmbFrameError,
    RpmbMsgType,
    RpmbRequestError,
    RpmbResult,
    frame_mac,
)
from supplicant._rpmb import EMU_CID
from tests._paths import REPO

M = RpmbMsgType
KEY = bytes(range(32))
BAD = int(TeecResult.TEEC_ERROR_BAD_PARAMETERS)
GENERIC = int(TeecResult.TEEC_ERROR_GENERIC)


def _mac(key: bytes, frames: list[bytes]) -> bytes:
    m = hmac.new(key, digestmod=hashlib.sha256)
    for f in frames:
        m.update(f[228:512])
    return m.digest()


def program(dev: EmulatedRpmb, key: bytes = KEY) -> RpmbFrame:
    raw = dev.data_request(RpmbFrame(key_mac=key, msg_type=M.REQ_AUTH_KEY_PROGRAM).pack(), 1)
    return RpmbFrame.unpack(raw)


def write(
    dev: EmulatedRpmb,
    address: int,
    blocks: list[bytes],
    key: bytes = KEY,
    counter: int = 0,
    *,
    swap: bool = False,
) -> RpmbFrame:
    """A data write; ``swap`` gives frames after the first the byte-swapped type rpmb.c
    lets through (see test_second_frame_type_is_compared_byte_swapped)."""
    frames = [
        RpmbFrame(
            data=b,
            address=address,
            block_count=len(blocks),
            write_counter=counter,
            msg_type=0x0300 if swap and i else M.REQ_AUTH_DATA_WRITE,
        )
        for i, b in enumerate(blocks)
    ]
    frames[-1] = replace(frames[-1], key_mac=frame_mac(key, frames))
    raw = b"".join(f.pack() for f in frames)
    return RpmbFrame.unpack(dev.data_request(raw, 1, frame_type_check=True))


def read(dev: EmulatedRpmb, address: int, count: int, nonce: bytes = b"N" * 16) -> bytes:
    req = RpmbFrame(nonce=nonce, address=address, msg_type=M.REQ_AUTH_DATA_READ).pack()
    return dev.data_request(req, count)


# ----------------------------------------------------------------------------- frames
@given(st.binary(min_size=512, max_size=512))
def test_frame_unpack_pack_round_trips_any_512_bytes(raw: bytes) -> None:
    """rpmb.c ``struct rpmb_data_frame``: stuff 196, key_mac 32, data 256, nonce 16, then
    write_counter u32, address, block_count, result, msg_type u16, all big-endian."""
    frame = RpmbFrame.unpack(raw)
    assert frame.pack() == raw
    assert frame.write_counter == int.from_bytes(raw[500:504], "big")
    assert (frame.address, frame.block_count) == struct.unpack(">HH", raw[504:508])
    assert (frame.result, frame.msg_type) == struct.unpack(">HH", raw[508:512])
    assert (frame.key_mac, frame.data, frame.nonce) == (raw[196:228], raw[228:484], raw[484:500])


@given(st.integers(0, 2000).filter(lambda n: n != 512))
def test_frame_of_another_size_is_a_frame_error(n: int) -> None:
    """Decoding accepts exactly 512 bytes and raises only RpmbFrameError otherwise."""
    with pytest.raises(RpmbFrameError):
        RpmbFrame.unpack(bytes(n))


def test_frame_fields_are_checked_and_mac_covers_bytes_228_to_511() -> None:
    """rpmb.c ``hmac_update_frm``: data, nonce, counter, address, count, result, type of
    each frame (bytes 228..511), in order."""
    with pytest.raises(ValueError, match="key_mac"):
        RpmbFrame(key_mac=b"short")
    with pytest.raises(ValueError, match="u16"):
        RpmbFrame(address=1 << 16)
    frames = [RpmbFrame(data=bytes([i]) * 256, address=i).pack() for i in range(3)]
    assert frame_mac(KEY, frames) == _mac(KEY, frames)
    changed = bytearray(frames[0])
    changed[0:228] = b"\xff" * 228  # stuff and key_mac are not covered
    assert frame_mac(KEY, [bytes(changed), *frames[1:]]) == _mac(KEY, frames)


# ----------------------------------------------------------------------------- the device
def test_key_is_programmed_once() -> None:
    """rpmb.c ``ioctl_emu_setkey``: the first program is OK; a second is GENERAL_FAILURE;
    the result frame (``ioctl_emu_get_keyprog_result``) is a zeroed frame with only the
    type and result set."""
    dev = EmulatedRpmb()
    before = dev.key_programmed
    first = program(dev)
    assert first.pack() == RpmbFrame(msg_type=M.RESP_AUTH_KEY_PROGRAM).pack()
    assert (before, dev.key_programmed) == (False, True)
    second = program(dev, bytes(32))
    assert second.result == RpmbResult.GENERAL_FAILURE
    assert second.pack()[508:512] == b"\x00\x01\x01\x00"
    # the first key stays: a write MAC'd with it is accepted
    assert write(dev, 0, [b"a" * 256]).result == RpmbResult.OK


def test_counter_read_before_the_key_is_auth_key_not_programmed() -> None:
    """rpmb.c ``ioctl_emu_read_ctr``: nonce echoed, counter 0, no MAC, result 7."""
    dev = EmulatedRpmb()
    req = RpmbFrame(nonce=b"0123456789abcdef", msg_type=M.REQ_WRITE_COUNTER_VAL_READ)
    rsp = RpmbFrame.unpack(dev.data_request(req.pack(), 1))
    assert rsp == RpmbFrame(
        nonce=b"0123456789abcdef",
        result=RpmbResult.AUTH_KEY_NOT_PROGRAMMED,
        msg_type=M.RESP_WRITE_COUNTER_VAL_READ,
    )
    program(dev)
    rsp = RpmbFrame.unpack(dev.data_request(req.pack(), 1))
    assert (rsp.result, rsp.write_counter, rsp.nonce) == (0, 0, b"0123456789abcdef")
    assert rsp.key_mac == frame_mac(KEY, [rsp])


def test_write_mac_failure_counter_and_result_read() -> None:
    """rpmb.c ``ioctl_emu_mem_transfer`` + ``ioctl_emu_get_write_result``: a bad MAC (or no
    key) is AUTH_FAILURE and writes nothing; a good write adds one per block to the
    counter; the result frame carries type 0x0300, result, address and counter, MAC'd."""
    dev = EmulatedRpmb()
    assert write(dev, 3, [b"x" * 256]).result == RpmbResult.AUTH_FAILURE  # no key yet
    program(dev)
    bad = write(dev, 3, [b"x" * 256], key=bytes(32))
    assert (bad.result, bad.write_counter, bad.address) == (RpmbResult.AUTH_FAILURE, 0, 3)
    assert bad.key_mac == frame_mac(KEY, [bad])
    ok = write(dev, 3, [b"x" * 256, b"y" * 256], swap=True)
    assert (ok.result, ok.write_counter, ok.msg_type) == (0, 2, M.RESP_AUTH_DATA_WRITE)
    assert ok.pack()[:196] == bytes(196) and ok.data == bytes(256) and ok.nonce == bytes(16)
    assert ok.key_mac == frame_mac(KEY, [ok]) and dev.write_counter == 2
    # the emulation does not compare the request's counter with its own
    assert write(dev, 5, [b"z" * 256], counter=77).write_counter == 3


def test_second_frame_type_is_compared_byte_swapped() -> None:
    """rpmb.c ``rpmb_data_req`` compares ``req_frm[i].msg_type`` (raw, big-endian) with
    ``ntohs(req_frm->msg_type)``: on a little-endian host two ordinary write frames are
    BAD_PARAMETERS (found by the differential test against the real tee-supplicant), and
    a second frame whose type bytes are swapped passes.  ``frame_type_check=True`` is
    tee-supplicant's path (OpteeSupplicant); without it the device takes both frames."""
    dev = EmulatedRpmb()
    program(dev)
    with pytest.raises(RpmbRequestError) as exc:
        write(dev, 3, [b"x" * 256, b"y" * 256])
    assert exc.value.teec == BAD and dev.write_counter == 0
    assert write(dev, 3, [b"x" * 256, b"y" * 256], swap=True).result == RpmbResult.OK
    # without rpmb_data_req's check (the default: a caller that is not tee-supplicant)
    frames = [
        RpmbFrame(data=b * 256, address=9, msg_type=M.REQ_AUTH_DATA_WRITE) for b in (b"p", b"q")
    ]
    frames[1] = replace(frames[1], key_mac=frame_mac(KEY, frames))
    raw = b"".join(f.pack() for f in frames)
    rsp = RpmbFrame.unpack(dev.data_request(raw, 1))
    assert (rsp.result, rsp.write_counter) == (RpmbResult.OK, 4)


def test_address_failure_and_reads() -> None:
    """rpmb.c: size_mult 2 is 256 KiB, 1024 blocks of 256 bytes; a write past the end is
    ADDRESS_FAILURE (before the MAC check); a read past it writes nothing; a read echoes
    the nonce, sets the address and type, stores block_count in host order, and MACs all
    frames."""
    dev = EmulatedRpmb()
    program(dev)
    two = [b"a" * 256, b"b" * 256]
    assert write(dev, 1023, two, swap=True).result == RpmbResult.ADDRESS_FAILURE
    assert write(dev, 1024, [b"a" * 256], key=bytes(32)).result == RpmbResult.ADDRESS_FAILURE
    assert dev.write_counter == 0
    assert read(dev, 1023, 2) == bytes(1024)
    write(dev, 1022, [b"p" * 256, b"q" * 256], swap=True)
    raw = read(dev, 1022, 2, nonce=b"n" * 16)
    frames = RpmbFrame.unpack_many(raw)
    assert [f.data for f in frames] == [b"p" * 256, b"q" * 256]
    for f in frames:
        assert (f.address, f.nonce, f.msg_type, f.result) == (1022, b"n" * 16, 0x400, 0)
        assert raw[506:508] == b"\x02\x00"  # nfrm in host (little-endian) order
    assert frames[1].key_mac == frame_mac(KEY, frames) and frames[0].key_mac == bytes(32)


def test_requests_rpmb_data_req_refuses() -> None:
    """rpmb.c ``rpmb_data_req``: mixed types, a write or counter read with other than one
    response frame, a read with several request frames → BAD_PARAMETERS; an unknown
    type → GENERIC.  Bad Python inputs raise named errors."""
    dev = EmulatedRpmb()
    w = RpmbFrame(msg_type=M.REQ_AUTH_DATA_WRITE).pack()
    r = RpmbFrame(msg_type=M.REQ_AUTH_DATA_READ).pack()
    c = RpmbFrame(msg_type=M.REQ_WRITE_COUNTER_VAL_READ).pack()
    for req, n, code in [
        (w + r, 1, BAD),
        (w, 2, BAD),
        (c, 2, BAD),
        (r + r, 1, BAD),
        (RpmbFrame(msg_type=M.REQ_RESULT_READ).pack(), 1, GENERIC),
    ]:
        with pytest.raises(RpmbRequestError) as exc:
            dev.data_request(req, n, frame_type_check=True)
        assert exc.value.teec == code
    with pytest.raises(ValueError, match="RPMB frames"):
        dev.data_request(b"x" * 100, 1)
    with pytest.raises(ValueError, match="size_mult"):
        EmulatedRpmb(size_mult=0)


# ----------------------------------------------------------------------------- durability
def test_state_file_keeps_key_counter_and_blocks(tmp_path: Path) -> None:
    """With a path, the key, counter and blocks are in the file when the answer is given,
    and a new device on the file continues from them; a file of another device, or not a
    state file, is refused by name."""
    path = tmp_path / "rpmb.bin"
    dev = EmulatedRpmb(path)
    program(dev)
    write(dev, 7, [b"k" * 256])
    again = EmulatedRpmb(path)  # the first is still open: no close is needed
    assert (again.key_programmed, again.write_counter) == (True, 1)
    assert RpmbFrame.unpack(read(again, 7, 1)).data == b"k" * 256
    assert program(again).result == RpmbResult.GENERAL_FAILURE
    dev.close()
    again.close()
    with pytest.raises(RpmbFileError, match="another device"):
        EmulatedRpmb(path, size_mult=3)
    (tmp_path / "junk").write_bytes(b"junk")
    with pytest.raises(RpmbFileError, match="not an RPMB state file"):
        EmulatedRpmb(tmp_path / "junk")


_KILLED_WRITER = """
import os, sys
sys.path.insert(0, {repo!r})
from tests.supp.test_rpmb_device import program, write
from supplicant import EmulatedRpmb
dev = EmulatedRpmb({path!r})
program(dev)
ok = write(dev, 9, [b"D" * 256])
assert ok.result == 0
os.write(1, b"ACK\\n")
os.kill(os.getpid(), 9)
"""


def test_an_acknowledged_write_survives_kill_9(tmp_path: Path) -> None:
    """Issue 16 point 5: the response is built after the write is on disk, so a process
    killed right after the answer leaves it in the file."""
    path = tmp_path / "rpmb.bin"
    repo = str(REPO)
    code = _KILLED_WRITER.format(repo=repo, path=str(path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, check=False)
    assert out.returncode == -9 and out.stdout == b"ACK\n", out
    dev = EmulatedRpmb(path)
    assert dev.write_counter == 1
    assert RpmbFrame.unpack(read(dev, 9, 1)).data == b"D" * 256
    dev.close()


# ----------------------------------------------------------------------------- the RPC
@pytest.fixture
def rpc(tmp_path: Path) -> Iterator[tuple[OpteeDevice, OpteeSupplicant]]:
    (tmp_path / "ta").mkdir()
    (tmp_path / "store").mkdir()
    dev = OpteeDevice(
        SecureWorld(QteeRoot()), memory=CheckedMemory(), cred=lambda: Cred(euid=1, egid=1)
    )
    supp = OpteeSupplicant(dev, tmp_path / "ta", tmp_path / "store", workers=1)
    yield dev, supp
    supp.stop()
    assert dev.leaks() == {}
    assert attach_rpc(dev).counts() == {"queued": 0, "in flight": 0}


def _ask(dev: OpteeDevice, req: bytes, rsp_size: int, rsp: bytes | None = None) -> bytes:
    return attach_rpc(dev).rpmb_request(req, rsp_size, rsp if rsp is not None else bytes(rsp_size))


def test_get_dev_info_and_its_size_checks(
    rpc: tuple[OpteeDevice, OpteeSupplicant],
) -> None:
    """rpmb.c ``rpmb_get_dev_info`` (emulated): the test CID, size_mult 2, rel_wr_sec_c 1,
    ret_code 0; any dev_id is served; the request must be exactly the 6-byte header and
    the response 19 bytes, else BAD_PARAMETERS; a header shorter than 6 bytes or an
    unknown command is BAD_PARAMETERS."""
    dev, supp = rpc
    info = _ask(dev, struct.pack("<3H", 1, 7, 0), 19, b"\xee" * 19)
    assert info == EMU_CID + b"\x02\x01\x00"
    assert EMU_CID.hex() == "fe014e4d4d4330344742c8f6552a6115"
    for req, size in [
        (struct.pack("<3H", 1, 0, 0) + b"x", 19),
        (struct.pack("<3H", 1, 0, 0), 20),
        (b"\x01\x00", 19),
        (struct.pack("<3H", 2, 0, 0), 19),
    ]:
        with pytest.raises(GpTaError) as exc:
            _ask(dev, req, size)
        assert exc.value.code == BAD
    assert supp.rpmb.write_counter == 0


def test_data_request_through_the_rpc(rpc: tuple[OpteeDevice, OpteeSupplicant]) -> None:
    """rpmb.c ``rpmb_process_request_unlocked``: request frames are ``(size - 6) // 512``
    (a trailing partial frame is ignored), response frames ``size // 512``; the device's
    refusals are the RPC's results; the answer is the device's frames byte for byte."""
    dev, supp = rpc
    head = struct.pack("<3H", 0, 0, 0)
    key_req = RpmbFrame(key_mac=KEY, msg_type=M.REQ_AUTH_KEY_PROGRAM).pack()
    got = _ask(dev, head + key_req + b"tail", 512 + 100, b"\xaa" * 612)
    assert got[:512] == RpmbFrame(msg_type=M.RESP_AUTH_KEY_PROGRAM).pack()
    assert got[512:] == b"\xaa" * 100  # not a whole frame: untouched
    assert supp.rpmb.key_programmed
    with pytest.raises(GpTaError) as exc:
        _ask(dev, head + key_req, 1024)  # a write answers one frame
    assert exc.value.code == BAD
    with pytest.raises(GpTaError) as exc:
        _ask(dev, head, 512)  # no frame at all
    assert exc.value.code == GENERIC
    # a read does not clear the response buffer: what the emulation leaves is kept
    req = RpmbFrame(nonce=b"n" * 16, address=0, msg_type=M.REQ_AUTH_DATA_READ).pack()
    raw = _ask(dev, head + req, 512, b"\x11" * 512)
    assert raw[500:504] == b"\x11" * 4 and raw[:196] == b"\x11" * 196
    assert raw == supp.rpmb.data_request(req, 1, rsp=b"\x11" * 512)


def test_rpmb_option_is_checked(tmp_path: Path) -> None:
    """OpteeSupplicant(rpmb=...) takes an EmulatedRpmb and names what else it got."""
    dev = OpteeDevice(SecureWorld(QteeRoot()), memory=CheckedMemory())
    with pytest.raises(TypeError, match="EmulatedRpmb"):
        OpteeSupplicant(dev, tmp_path, tmp_path, rpmb=object())  # type: ignore[arg-type]
    assert dev.leaks() == {}
    assert OpteeRpcCmd.OPTEE_RPC_CMD_RPMB == 1  # optee.md §3.2
