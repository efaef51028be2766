"""Differential: the real tee-supplicant's emulated RPMB against :class:`EmulatedRpmb`
(issue 16 point 5).

The unmodified tee-supplicant of ``OP-TEE/optee_client@44289ee`` (built with
``RPMB_EMU``, its CMake default; ``tee-supplicant/src/rpmb.c``) runs under the preload
bridge on the privileged node of an OP-TEE server in this process; the same RPC 1
requests go to it and to :class:`supplicant.OpteeSupplicant` on an in-process device,
and the answers (TEEC result and response bytes) must be identical.  The response
memref is INOUT here so that both supplicants start from the same response bytes (an
OUT memref's bytes are not handed to a supplicant, and tee-supplicant's buffers keep
whatever they held).  Then a TA's ``TEE_STORAGE_PRIVATE_RPMB`` scenario runs through
each and must give the same results.  Skipped when the peers or the bridge are absent.
"""

from __future__ import annotations

import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import pytest

import qtee
from qtee import (
    TEE_DATA_FLAG_ACCESS_READ,
    TEE_DATA_FLAG_ACCESS_WRITE,
    TEE_DATA_FLAG_ACCESS_WRITE_META,
    TEE_DATA_FLAG_OVERWRITE,
    TEE_STORAGE_PRIVATE_RPMB,
    DeviceServer,
    OpteeDevice,
    TrustedStorage,
    trusted_storage,
)
from qtee._optee.supp import OpteeSupp, RpcParam, _queue_of, attach_rpc
from qtee.addrspace import CheckedMemory
from qtee.gp import Cred, TeecContext
from qtee.secure import (
    GpParam,
    GpSession,
    GpTA,
    GpTaError,
    QteeRoot,
    SecureWorld,
    register_gp_ta,
    unregister_gp_ta,
)
from supplicant import OpteeSupplicant, RpmbFrame, RpmbMsgType, frame_mac
from tests import _peers
from tests._paths import REPO

M = RpmbMsgType
LIBRARY = REPO / "qtee" / "bridge" / "libqtee_preload.so"
KEY = bytes(range(32))
MEMREF_IN, MEMREF_INOUT = 5, 7
RPMB = TEE_STORAGE_PRIVATE_RPMB
RW = TEE_DATA_FLAG_ACCESS_READ | TEE_DATA_FLAG_ACCESS_WRITE
ALL = RW | TEE_DATA_FLAG_ACCESS_WRITE_META
Ask = Callable[[bytes, int, bytes], tuple[int, bytes]]


def _hdr(cmd: int = 0, dev_id: int = 0, count: int = 0) -> bytes:
    return struct.pack("<3H", cmd, dev_id, count)


def _write(
    address: int, blocks: list[bytes], key: bytes = KEY, counter: int = 0, *, swap: bool = False
) -> bytes:
    """Write frames; ``swap``: later frames' type bytes swapped (what rpmb.c accepts)."""
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
    raw = b"".join(f.pack() for f in frames)
    return raw[:-316] + frame_mac(key, frames) + raw[-284:]


def _req(msg_type: int, **fields: object) -> bytes:
    return RpmbFrame(msg_type=msg_type, **fields).pack()  # type: ignore[arg-type]


def scenario(ask: Ask) -> list[tuple[int, bytes]]:
    """A fixed request sequence covering rpmb.c's answers; each answer is (TEEC result,
    response bytes)."""
    z = bytes
    nonce = b"0123456789ABCDEF"
    steps: list[tuple[bytes, int, bytes]] = [
        (_hdr(1, 0), 19, z(19)),  # GET_DEV_INFO
        (_hdr(1, 3), 19, b"\xee" * 19),  # another dev_id
        (_hdr(1, 0) + b"x", 19, z(19)),  # BAD_PARAMETERS: request size
        (_hdr(1, 0), 18, z(18)),  # BAD_PARAMETERS: response size
        (_hdr(9, 0), 19, z(19)),  # unknown command
        (b"\x00\x00", 512, z(512)),  # shorter than the header
        (_hdr() + _req(M.REQ_WRITE_COUNTER_VAL_READ, nonce=nonce), 512, z(512)),  # no key
        (_hdr() + _write(5, [b"a" * 256]), 512, b"\x77" * 512),  # write without key
        (_hdr() + _req(M.REQ_AUTH_KEY_PROGRAM, key_mac=KEY), 512, z(512)),
        (_hdr() + _req(M.REQ_AUTH_KEY_PROGRAM, key_mac=z(32)), 512, z(512)),  # again
        (_hdr() + _req(M.REQ_WRITE_COUNTER_VAL_READ, nonce=nonce), 512, b"\x33" * 512),
        (_hdr() + _write(5, [b"a" * 256]), 512, z(512)),
        (_hdr() + _write(6, [b"b" * 256], key=z(32)), 512, z(512)),  # bad MAC
        (_hdr() + _write(7, [b"c" * 256, b"d" * 256]), 512, z(512)),  # two: refused
        (_hdr() + _write(7, [b"c" * 256, b"d" * 256], swap=True), 512, z(512)),  # accepted
        (_hdr() + _write(1023, [b"e" * 256, b"f" * 256]), 512, z(512)),  # out of range
        (_hdr(0, 0, 3) + _req(M.REQ_AUTH_DATA_READ, nonce=nonce, address=5), 1536, z(1536)),
        (_hdr() + _req(M.REQ_AUTH_DATA_READ, nonce=nonce, address=1023), 1024, b"\x5a" * 1024),
        (_hdr() + _req(M.REQ_AUTH_DATA_READ, address=5) * 2, 512, z(512)),  # two requests
        (_hdr() + _write(5, [b"a" * 256]), 1024, z(1024)),  # a write answers one frame
        (_hdr() + _write(5, [b"a" * 256]) + _req(M.REQ_AUTH_DATA_READ), 512, z(512)),
        (_hdr() + _req(M.REQ_RESULT_READ), 512, z(512)),  # not a request type
        (_hdr() + _req(M.REQ_WRITE_COUNTER_VAL_READ), 1024, z(1024)),
        (_hdr() + _req(M.REQ_WRITE_COUNTER_VAL_READ, nonce=nonce) + b"tail", 512, z(512)),
    ]
    return [ask(req, size, init) for req, size, init in steps]


def _asker(queue: OpteeSupp) -> Ask:
    def ask(req: bytes, size: int, init: bytes) -> tuple[int, bytes]:
        offs = -(-len(req) // 4096) * 4096
        shm = queue.alloc_payload(offs + 4096 * max(1, -(-size // 4096)))
        try:
            queue.shm_write(shm, 0, req)
            queue.shm_write(shm, offs, init)
            out = RpcParam(MEMREF_INOUT, offs, size, shm=shm)
            ret = queue.request(1, [RpcParam(MEMREF_IN, 0, len(req), shm=shm), out])
            return ret, queue.shm_read(shm, offs, size)
        finally:
            queue.free_payload(shm)

    return ask


class Peer:
    """An OP-TEE server in this process and the real tee-supplicant on its privileged node."""

    def __init__(self, tmp: Path) -> None:
        if not LIBRARY.is_file():
            _peers.unavailable(f"the preload bridge is not built ({LIBRARY}): run `make bridge`")
        client = _peers.optee_client()
        self.dir = Path(tempfile.mkdtemp(prefix="qtee-rpmb-"))  # a short socket path
        self.server = DeviceServer(self.dir / "s", tee="optee").start()
        fs = tmp / "fs"
        fs.mkdir(exist_ok=True)
        argv = [sys.executable, "-m", "qtee", "run", "--connect", str(self.server.path), "--"]
        argv += [str(client.tee_supplicant), "--fs-parent-path", str(fs), "--ta-path", str(fs)]
        self.proc = subprocess.Popen(
            argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        end = time.monotonic() + 30
        while _queue_of(self.server.device.runtime) is None or not self._attached():
            if time.monotonic() > end or self.proc.poll() is not None:
                self.close()
                pytest.fail("tee-supplicant did not attach")
            time.sleep(0.05)

    def _attached(self) -> bool:
        queue = _queue_of(self.server.device.runtime)
        return queue is not None and queue.ctx is not None

    @property
    def queue(self) -> OpteeSupp:
        queue = _queue_of(self.server.device.runtime)
        assert queue is not None
        return queue

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.server.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Model:
    """The same, in process: an OP-TEE device and :class:`OpteeSupplicant`."""

    def __init__(self, tmp: Path) -> None:
        (tmp / "m").mkdir(exist_ok=True)
        self.dev = OpteeDevice(
            SecureWorld(QteeRoot()), memory=CheckedMemory(), cred=lambda: Cred(euid=1, egid=1)
        )
        self.supp = OpteeSupplicant(self.dev, tmp / "m", tmp / "m", workers=2)
        self.queue = attach_rpc(self.dev)

    def close(self) -> None:
        self.supp.stop()
        assert self.dev.leaks() == {}


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[Peer]:
    p = Peer(tmp_path)
    yield p
    p.close()


def test_rpmb_answers_are_byte_identical(peer: Peer, tmp_path: Path) -> None:
    """``rpmb.c@44289ee`` ``rpmb_process_request``, ``rpmb_data_req`` and the emulation:
    the same 24 requests (device info, size and type refusals, key program twice, counter
    reads, good, bad-MAC, two-block and out-of-range writes, reads in and out of range)
    give the same TEEC results and the same response bytes from both supplicants."""
    real = scenario(_asker(peer.queue))
    model = Model(tmp_path)
    try:
        ours = scenario(_asker(model.queue))
    finally:
        model.close()
    assert [r for r, _ in ours] == [r for r, _ in real]
    for i, (mine, theirs) in enumerate(zip(ours, real, strict=True)):
        assert mine == theirs, f"step {i}"
    assert real[0] == (0, bytes.fromhex("fe014e4d4d4330344742c8f6552a6115") + b"\x02\x01\x00")


class ScriptTA(GpTA):
    UUID = uuid.UUID("5e17e5e0-0000-4000-8000-0000000000d1")
    result: ClassVar[object] = None

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
        type(self).result = _ta_scenario(trusted_storage(self))


def _ta_scenario(st: TrustedStorage) -> object:
    out: list[object] = []

    def step(fn: Callable[[], object]) -> None:
        try:
            out.append(fn())
        except GpTaError as exc:
            out.append(("error", exc.code))

    big = bytes(range(256)) * 9
    step(lambda: st.enumerate(RPMB))
    step(lambda: st.create(b"one", ALL, big, RPMB).close())
    step(lambda: st.create(b"one", ALL, b"again", RPMB))
    step(lambda: st.create(b"two", RW | TEE_DATA_FLAG_OVERWRITE, b"2", RPMB).close())

    def edit() -> object:
        h = st.open(b"one", ALL, RPMB)
        try:
            h.seek(300)
            h.write(b"patched")
            h.truncate(3000)
            h.seek(0)
            data = h.read(4000)
            h.rename(b"three")
            return data
        finally:
            h.close()

    step(edit)
    step(lambda: sorted(st.enumerate(RPMB)))
    step(lambda: st.open(b"one", RW, RPMB))
    step(lambda: st.open(b"two", ALL, RPMB).close_and_delete())
    step(lambda: sorted(st.enumerate(RPMB)))
    return out


def test_a_ta_behaves_the_same_over_both(peer: Peer, tmp_path: Path) -> None:
    """A TA's TEE_STORAGE_PRIVATE_RPMB scenario (create, conflicts, in-place and
    relocating writes, truncate, rename, delete, enumerate) gives the same results
    through the real tee-supplicant and through OpteeSupplicant, and the secure side
    ends with the same write counter."""
    register_gp_ta(ScriptTA)
    try:
        with (
            TeecContext(qtee.connect(peer.server.path)) as ctx,
            ctx.open_session(ScriptTA.UUID) as session,
        ):
            session.invoke_command(0)
        real, real_cnt = ScriptTA.result, peer.queue.rpmb_fs().wr_cnt
        model = Model(tmp_path)
        try:
            with TeecContext(model.dev) as ctx, ctx.open_session(ScriptTA.UUID) as session:
                session.invoke_command(0)
            ours, our_cnt = ScriptTA.result, model.queue.rpmb_fs().wr_cnt
        finally:
            model.close()
    finally:
        unregister_gp_ta(ScriptTA.UUID)
    assert ours == real and our_cnt == real_cnt
    assert isinstance(real, list) and real[-1] == [b"three"]
