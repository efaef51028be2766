"""``TEE_STORAGE_PRIVATE_RPMB``: a TA's persistent objects in the RPMB partition that
tee-supplicant's emulated device holds (issue 16 point 5).

Facts from ``OP-TEE/optee_os:core/tee/tee_rpmb_fs.c@00db65d`` (``tee_rpmb_fs.c`` below)
and ``core/kernel/huk_subkey.c@11f5b73``; the device is
``OP-TEE/optee_client:tee-supplicant/src/rpmb.c@44289ee``.  Every test runs a script in
a GP TA's invoke entry, through ``qtee.gp.TeecContext`` on the OP-TEE device with
:class:`supplicant.OpteeSupplicant` serving RPC 1.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from qtee import (
    TEE_DATA_FLAG_ACCESS_READ,
    TEE_DATA_FLAG_ACCESS_WRITE,
    TEE_DATA_FLAG_ACCESS_WRITE_META,
    TEE_DATA_FLAG_OVERWRITE,
    TEE_DATA_SEEK_END,
    TEE_STORAGE_PRIVATE_RPMB,
    OpteeDevice,
    PersistentObject,
    TrustedStorage,
    trusted_storage,
)
from qtee._optee.supp import attach_rpc
from qtee.addrspace import CheckedMemory
from qtee.gp import Cred, TeecContext, TeecResult
from qtee.secure import (
    GpParam,
    GpSession,
    GpTA,
    GpTaError,
    QteeRoot,
    SecureWorld,
    register_gp_ta,
    set_rpmb_huk,
    unregister_gp_ta,
)
from supplicant import EmulatedRpmb, OpteeSupplicant, RpmbFrame, RpmbMsgType, frame_mac
from supplicant._rpmb import EMU_CID

R = TeecResult
RPMB = TEE_STORAGE_PRIVATE_RPMB
RW = TEE_DATA_FLAG_ACCESS_READ | TEE_DATA_FLAG_ACCESS_WRITE
ALL = RW | TEE_DATA_FLAG_ACCESS_WRITE_META
TA_UUID = uuid.UUID("5e17e5e0-0000-4000-8000-0000000000b1")
OTHER_UUID = uuid.UUID("5e17e5e0-0000-4000-8000-0000000000b2")
SRC = "OP-TEE/optee_os:core/tee/tee_rpmb_fs.c@00db65d"

Script = Callable[[TrustedStorage], object]


class RpmbTA(GpTA):
    """Runs the test's script on its trusted storage; the result (or the GpTaError's
    code) is kept for the test."""

    UUID = TA_UUID
    script: ClassVar[Script | None] = None
    result: ClassVar[object] = None

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
        script = type(self).script
        assert script is not None
        try:
            type(self).result = script(trusted_storage(self))
        except GpTaError as exc:
            type(self).result = ("error", exc.code)


class OtherTA(RpmbTA):
    UUID = OTHER_UUID


class Tampering(EmulatedRpmb):
    """The emulated device with a man in the middle: ``tamper(req, rsp) -> rsp``."""

    tamper: Callable[[bytes, bytes], bytes] | None = None
    calls = 0

    def data_request(
        self,
        req: bytes | bytearray | memoryview,
        rsp_frames: int,
        *,
        rsp: bytes | None = None,
        frame_type_check: bool = False,
    ) -> bytes:
        out = super().data_request(req, rsp_frames, rsp=rsp, frame_type_check=frame_type_check)
        self.calls += 1
        return out if self.tamper is None else self.tamper(bytes(req), out)


class World:
    def __init__(self, tmp: Path, rpmb: EmulatedRpmb, huk: bytes | None = None) -> None:
        (tmp / "ta").mkdir(parents=True, exist_ok=True)
        (tmp / "store").mkdir(exist_ok=True)
        self.mem = CheckedMemory()
        secure = SecureWorld(QteeRoot())
        if huk is not None:
            set_rpmb_huk(secure, huk)
        self.dev = OpteeDevice(secure, memory=self.mem, cred=lambda: Cred(euid=1, egid=1))
        self.rpmb = rpmb
        self.supp = OpteeSupplicant(self.dev, tmp / "ta", tmp / "store", workers=2, rpmb=rpmb)
        self.ctx = TeecContext(self.dev)

    def run(self, script: Script, ta: type[RpmbTA] = RpmbTA) -> object:
        ta.script = script
        ta.result = None
        with self.ctx.open_session(ta.UUID) as session:
            session.invoke_command(0)
        return ta.result

    def close(self) -> None:
        self.ctx.finalize()
        self.supp.stop()
        assert self.dev.leaks() == {}
        assert attach_rpc(self.dev).counts() == {"queued": 0, "in flight": 0}
        assert len(self.mem) == 0


@pytest.fixture
def tas() -> Iterator[None]:
    register_gp_ta(RpmbTA)
    register_gp_ta(OtherTA)
    yield
    unregister_gp_ta(TA_UUID)
    unregister_gp_ta(OTHER_UUID)


@pytest.fixture
def world(tmp_path: Path, tas: None) -> Iterator[World]:
    w = World(tmp_path, EmulatedRpmb())
    yield w
    w.close()


def _expected_key(huk: bytes = bytes(16), cid: bytes = EMU_CID) -> bytes:
    msg = bytearray(cid)
    msg[9] = msg[15] = 0  # PRV and CRC
    return hmac.new(huk, bytes(msg), hashlib.sha256).digest()


# ----------------------------------------------------------------------------- round trips
def test_round_trip_and_the_persistent_object_api(world: World) -> None:
    """The REE storage's API on tee_rpmb_fs.c: create with data, open, read, seek, write inside
    and past the end (``rpmb_fs_write_primitive`` in place or relocated), truncate
    (``rpmb_fs_truncate``), rename, enumerate, close_and_delete; the REE FS and the RPMB
    FS are separate stores."""

    def script(st: TrustedStorage) -> object:
        big = bytes(range(256)) * 20  # 5120 bytes: more than one 4 KiB copy chunk
        st.create(b"obj", ALL, big, RPMB).close()
        st.create(b"ree", RW, b"on the REE FS").close()
        h = st.open(b"obj", ALL, RPMB)
        first = h.read(6000)
        h.seek(250)
        h.write(b"ACROSS")  # crosses a block boundary: relocated
        h.seek(10)
        h.write(b"in")  # fits in one block: in place
        h.seek(0, TEE_DATA_SEEK_END)
        h.write(b"tail")
        h.seek(0)
        after = h.read(6000)
        h.truncate(7000)
        h.seek(5120)
        grown = h.read(10000)
        h.truncate(3)
        h.rename(b"new")
        h.seek(0)
        short = h.read(100)
        ids = (st.enumerate(RPMB), st.enumerate())
        h.close_and_delete()
        return first, after, grown, short, ids, st.enumerate(RPMB)

    first, after, grown, short, ids, left = world.run(script)  # type: ignore[misc]
    big = bytes(range(256)) * 20
    want = bytearray(big)
    want[250:256] = b"ACROSS"
    want[10:12] = b"in"
    want += b"tail"
    assert first == big and after == bytes(want)
    assert grown == b"tail" + bytes(7000 - 5124)
    assert short == bytes(want[:3])
    assert ids == ([b"new"], [b"ree"]) and left == []
    assert world.rpmb.key_programmed


def test_not_found_and_conflicts(world: World) -> None:
    """As for the REE storage: a missing object is ITEM_NOT_FOUND; creating an existing
    one without OVERWRITE, or an object that is open, is ACCESS_CONFLICT; renaming onto
    an existing id is ACCESS_CONFLICT (``rpmb_fs_rename_internal``, tee_rpmb_fs.c); another TA
    never sees the objects; storage ids other than the three are ITEM_NOT_FOUND."""

    def script(st: TrustedStorage) -> object:
        out: list[object] = []
        for attempt in (
            lambda: st.open(b"missing", RW, RPMB),
            lambda: st.create(b"a", RW, b"1", RPMB),
            lambda: st.create(b"a", RW, b"2", RPMB),
            lambda: st.create(b"b", ALL, b"3", RPMB),
        ):
            try:
                handle = attempt()
                out.append(handle.size)
                handle.close()
            except GpTaError as exc:
                out.append(hex(exc.code))
        held = st.open(b"a", TEE_DATA_FLAG_ACCESS_READ, RPMB)
        for attempt2 in (
            lambda: st.create(b"a", RW | TEE_DATA_FLAG_OVERWRITE, b"4", RPMB),
            lambda: st.open(b"a", RW, RPMB),
            lambda: _rename_closing(st.open(b"b", ALL, RPMB), b"a"),
            lambda: st.open(b"x", RW, 0x1234),
        ):
            try:
                attempt2()
            except GpTaError as exc:
                out.append(hex(exc.code))
        held.close()
        replaced = st.create(b"a", RW | TEE_DATA_FLAG_OVERWRITE, b"55", RPMB)
        out.append(replaced.read(10))
        replaced.close()
        return out

    got = world.run(script)
    nf, conflict = hex(R.TEEC_ERROR_ITEM_NOT_FOUND), hex(R.TEEC_ERROR_ACCESS_CONFLICT)
    assert got == [nf, 1, conflict, 1, conflict, conflict, conflict, nf, b"55"]
    assert world.run(lambda st: st.enumerate(RPMB), OtherTA) == []
    assert world.run(lambda st: sorted(st.enumerate(RPMB))) == [b"a", b"b"]


def _rename_closing(handle: PersistentObject, new_id: bytes) -> None:
    try:
        handle.rename(new_id)
    finally:
        handle.close()


# ----------------------------------------------------------------------------- key and layout
def test_key_is_derived_from_the_huk_and_cid_and_programmed_on_first_use(
    tmp_path: Path, tas: None
) -> None:
    """``tee_rpmb_key_gen`` (``CFG_CORE_HUK_SUBKEY_COMPAT``): HMAC-SHA256(HUK, CID with
    bytes 9 and 15 zeroed); a device answering AUTH_KEY_NOT_PROGRAMMED is programmed with
    it (``tee_rpmb_write_and_verify_key``); a device holding another key fails the
    counter read's MAC check: TEE_ERROR_SECURITY."""
    dev = EmulatedRpmb()
    w = World(tmp_path / "a", dev)
    try:
        assert w.run(lambda st: st.enumerate(RPMB)) == []
    finally:
        w.close()
    # the key the device got is the derived one: a write MAC'd with it is accepted
    f = RpmbFrame(data=b"k" * 256, address=100, msg_type=RpmbMsgType.REQ_AUTH_DATA_WRITE)
    signed = RpmbFrame.unpack(f.pack()[:196] + frame_mac(_expected_key(), [f]) + f.pack()[228:])
    assert RpmbFrame.unpack(dev.data_request(signed.pack(), 1)).result == 0

    other = World(tmp_path / "b", dev, huk=b"\x01" * 16)  # another chip's HUK
    try:
        assert other.run(lambda st: st.enumerate(RPMB)) == ("error", R.TEEC_ERROR_SECURITY)
    finally:
        other.close()


def test_partition_layout_in_the_device(tmp_path: Path, tas: None) -> None:
    """tee_rpmb_fs.c: ``struct rpmb_fs_partition`` at byte 0 (magic 0x52504D42, version 2,
    FAT at 512, little-endian); FAT entries of 256 bytes from byte 512, the file's
    ``/<UUID as TEE_UUID in memory>/<id>`` in uppercase hex, then a LAST_ENTRY entry;
    data placed from the top, below block ``max_blk_idx`` (1023 for size_mult 2)."""
    path = tmp_path / "rpmb.bin"
    w = World(tmp_path, EmulatedRpmb(path))
    try:
        w.run(lambda st: st.create(b"obj", RW, b"payload", RPMB).close())
    finally:
        w.close()
        w.rpmb.close()
    blocks = path.read_bytes()[512:]
    assert struct.unpack_from("<4I", blocks, 0) == (0x52504D42, 2, 0, 512)
    start, size, flags, _unused = struct.unpack_from("<4I", blocks, 512)
    name = blocks[512 + 32 : 512 + 256].rstrip(b"\0")
    assert name == f"/{TA_UUID.bytes_le.hex().upper()}/6F626A".encode()
    assert (start, size, flags) == (1022 * 256, 7, 1)
    assert struct.unpack_from("<3I", blocks, 768)[2] == 2  # LAST_ENTRY
    assert blocks[start : start + 7] == b"payload"


def test_objects_survive_a_new_world_on_the_same_device_file(tmp_path: Path, tas: None) -> None:
    """A reboot: a new secure world (same HUK, so the same key) and a new supplicant on the
    same file find the FS (magic present: no re-initialisation) and the object."""
    path = tmp_path / "rpmb.bin"
    first = World(tmp_path / "1", EmulatedRpmb(path))
    try:
        first.run(lambda st: st.create(b"keep", RW, b"across reboots", RPMB).close())
    finally:
        first.close()
        first.rpmb.close()
    second = World(tmp_path / "2", EmulatedRpmb(path))
    try:
        got = second.run(lambda st: st.open(b"keep", RW, RPMB).read(100))
        assert got == b"across reboots"
    finally:
        second.close()
        second.rpmb.close()


# ----------------------------------------------------------------------------- tampering
def _flip_read_data(req: bytes, rsp: bytes) -> bytes:
    if struct.unpack_from(">H", req, 510)[0] != RpmbMsgType.REQ_AUTH_DATA_READ:
        return rsp
    out = bytearray(rsp)
    out[300] ^= 1  # a data byte of the first frame: covered by the MAC
    return bytes(out)


def _replay_nonce(req: bytes, rsp: bytes) -> bytes:
    if struct.unpack_from(">H", req, 510)[0] != RpmbMsgType.REQ_AUTH_DATA_READ:
        return rsp
    out = bytearray(rsp)
    for i in range(0, len(out), 512):
        out[i + 484 : i + 500] = bytes(16)  # an old answer's nonce
    return bytes(out)


@pytest.mark.parametrize("tamper", [_flip_read_data, _replay_nonce])
def test_a_tampered_read_answer_is_security(
    tmp_path: Path, tas: None, tamper: Callable[[bytes, bytes], bytes]
) -> None:
    """``tee_rpmb_resp_unpack_verify``: a read answer whose nonce is not the one sent, or
    whose MAC does not cover its frames, is TEE_ERROR_SECURITY."""
    dev = Tampering()
    w = World(tmp_path, dev)
    try:
        w.run(lambda st: st.create(b"obj", RW, b"data", RPMB).close())
        dev.tamper = tamper
        got = w.run(lambda st: st.open(b"obj", RW, RPMB).read(4))
        assert got == ("error", R.TEEC_ERROR_SECURITY)
        dev.tamper = None
        assert w.run(lambda st: st.open(b"obj", RW, RPMB).read(4)) == b"data"
    finally:
        w.close()


def test_a_tampered_write_answer_is_retried_then_rpmb_is_dead(tmp_path: Path, tas: None) -> None:
    """``write_req``: a write whose answer fails the checks is sent again, 10 times in
    all; then ``rpmb_dead`` is set and every later operation is TEE_ERROR_COMMUNICATION
    (the data may or may not be on the device)."""
    dev = Tampering()
    w = World(tmp_path, dev)
    try:
        w.run(lambda st: st.create(b"obj", RW, b"data", RPMB).close())

        writes: list[int] = []

        def bad_mac(req: bytes, rsp: bytes) -> bytes:
            if struct.unpack_from(">H", req, 510)[0] != RpmbMsgType.REQ_AUTH_DATA_WRITE:
                return rsp
            writes.append(struct.unpack_from(">I", req, 500)[0])  # the counter sent
            return rsp[:196] + bytes(32) + rsp[228:]

        dev.tamper = bad_mac
        got = w.run(lambda st: st.create(b"obj2", RW, b"x", RPMB))
        assert got == ("error", R.TEEC_ERROR_COMMUNICATION)
        # each retry sends the counter the last answer reported (the device took each one)
        assert len(writes) == 10 and writes == list(range(writes[0], writes[0] + 10))
        calls = dev.calls
        dev.tamper = None
        assert w.run(lambda st: st.enumerate(RPMB)) == ("error", R.TEEC_ERROR_COMMUNICATION)
        assert dev.calls == calls  # dead: nothing more reaches the device
    finally:
        w.close()
