"""TA loading and trusted storage through tee-supplicant on the OP-TEE device (optee.md §3).

Sessions are opened with raw ioctls on the OP-TEE device; the supplicant is either
:class:`supplicant._optee.OpteeSupplicant` or raw SUPPL_RECV/SEND on the privileged
context, to see the queue's rules errno for errno.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from objects import DriverError
from qtee import (
    TEE_DATA_FLAG_ACCESS_READ,
    TEE_DATA_FLAG_ACCESS_WRITE,
    TEE_DATA_FLAG_ACCESS_WRITE_META,
    TEE_DATA_FLAG_OVERWRITE,
    TEE_DATA_SEEK_END,
    OpteeContext,
    OpteeDevice,
    OpteeSuppContext,
    TrustedStorage,
    gp_ta_image,
    register_loadable_ta,
    trusted_storage,
    uapi,
    unregister_loadable_ta,
)
from qtee._optee import supp as supp_mod
from qtee._optee.supp import attach_rpc
from qtee.addrspace import CheckedMemory
from qtee.gp import Cred, TeecOrigin, TeecResult
from qtee.secure import (
    GpParam,
    GpSession,
    GpTA,
    GpTaError,
    QteeRoot,
    SecureWorld,
    register_gp_ta,
    ta_image,
    unregister_gp_ta,
)
from supplicant import OpteeSupplicant
from supplicant._optee import ta_file_name

LOADABLE_UUID = uuid.UUID("d96a5b40-c3e5-21e3-8794-0002a5d5c51b")
STORE_A_UUID = uuid.UUID("b689f2a7-8adf-477a-9f99-32e90c0ad0a2")
STORE_B_UUID = uuid.UUID("731e279e-aafb-4575-a771-38caa6f0cca6")
OPEN_HEAD = struct.Struct("<16s16s6I")
INVOKE_HEAD = struct.Struct("<6I")
HEAD = struct.Struct("<2I")
PARAM = struct.Struct("<4Q")
VALUE_IN, VALUE_OUT, VALUE_INOUT, MEMREF_OUT = 1, 2, 3, 6
META = 0x100
RW = TEE_DATA_FLAG_ACCESS_READ | TEE_DATA_FLAG_ACCESS_WRITE
ALL = RW | TEE_DATA_FLAG_ACCESS_WRITE_META
TEE, TA = TeecOrigin.TEEC_ORIGIN_TEE, TeecOrigin.TEEC_ORIGIN_TRUSTED_APP
CMD_ADD, CMD_SCRIPT = 0, 1


class Loadable(GpTA):
    """A GP TA that exists only as an image in the supplicant's TA directory."""

    UUID = LOADABLE_UUID

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
        if cmd != CMD_ADD:
            raise GpTaError(TeecResult.TEEC_ERROR_NOT_SUPPORTED)
        params[1].a = params[0].a + params[0].b


Script = Callable[[TrustedStorage], object]


class Scripted(GpTA):
    """Runs the test's script on its trusted storage inside an invoke entry."""

    script: Script | None = None
    results: list[object] = []  # noqa: RUF012

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
        if cmd != CMD_SCRIPT or self.script is None:
            raise GpTaError(TeecResult.TEEC_ERROR_NOT_SUPPORTED)
        type(self).results.append(type(self).script(trusted_storage(self)))  # type: ignore[misc]


class StoreA(Scripted):
    UUID = STORE_A_UUID


class StoreB(Scripted):
    UUID = STORE_B_UUID


Env = tuple[OpteeDevice, OpteeContext, CheckedMemory, Path]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    register_loadable_ta(Loadable)
    register_gp_ta(StoreA)
    register_gp_ta(StoreB)
    for cls in (StoreA, StoreB):
        cls.script, cls.results = None, []
    (tmp_path / "ta").mkdir()
    (tmp_path / "store").mkdir()
    mem = CheckedMemory()
    dev = OpteeDevice(SecureWorld(QteeRoot()), memory=mem, cred=lambda: Cred(euid=1000, egid=1000))
    ctx = dev.open()
    yield dev, ctx, mem, tmp_path
    ctx.close()
    unregister_loadable_ta(LOADABLE_UUID)
    unregister_gp_ta(STORE_A_UUID)
    unregister_gp_ta(STORE_B_UUID)
    assert dev.leaks() == {}
    assert attach_rpc(dev).counts() == {"queued": 0, "in flight": 0}


@pytest.fixture
def supp(env: Env) -> Iterator[OpteeSupplicant]:
    dev, _ctx, _mem, tmp = env
    s = OpteeSupplicant(dev, tmp / "ta", tmp / "store", workers=2)
    yield s
    s.stop()


# ----------------------------------------------------------------------------- helpers


def _buf(mem: CheckedMemory, block: bytearray) -> bytearray:
    return bytearray(uapi.BufData(mem.map(block), len(block)).pack())


def open_session(ctx: OpteeContext, mem: CheckedMemory, ta: uuid.UUID) -> tuple[int, int, int]:
    """(session, ret, origin) of an OPEN_SESSION with four NONE params."""
    block = bytearray(OPEN_HEAD.pack(ta.bytes, bytes(16), 0, 0, 0, 0, 0, 4)) + bytes(128)
    ctx.ioctl(uapi.TEE_IOC_OPEN_SESSION, _buf(mem, block))
    head = OPEN_HEAD.unpack_from(block)
    return head[4], head[5], head[6]


def invoke(
    ctx: OpteeContext, mem: CheckedMemory, session: int, cmd: int, params: list[tuple[int, ...]]
) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    block = bytearray(INVOKE_HEAD.pack(cmd, session, 0, 0, 0, len(params)))
    for p in params:
        block += PARAM.pack(*p)
    ctx.ioctl(uapi.TEE_IOC_INVOKE, _buf(mem, block))
    head = INVOKE_HEAD.unpack_from(block)
    back = [PARAM.unpack_from(block, 24 + 32 * i) for i in range(len(params))]
    return head, back


def close_session(ctx: OpteeContext, session: int) -> None:
    ctx.ioctl(uapi.TEE_IOC_CLOSE_SESSION, bytearray(struct.pack("<I", session)))


def run_script(env: Env, cls: type[Scripted], script: Script) -> tuple[int, int, object]:
    """Open a session to ``cls``, run ``script`` in an invoke: (ret, origin, its result)."""
    _dev, ctx, mem, _tmp = env
    session, ret, _origin = open_session(ctx, mem, cls.UUID)
    assert (session != 0, ret) == (True, 0)
    cls.script = script
    cls.results = []
    try:
        head, _ = invoke(ctx, mem, session, CMD_SCRIPT, [(0, 0, 0, 0)] * 4)
    finally:
        close_session(ctx, session)
    return head[3], head[4], cls.results[0] if cls.results else None


def recv(sctx: OpteeContext, mem: CheckedMemory, slots: list[tuple[int, int, int, int]]) -> bytes:
    """A raw SUPPL_RECV with these param slots: the block it filled in."""
    block = bytearray(HEAD.pack(0, len(slots)) + b"".join(PARAM.pack(*p) for p in slots))
    sctx.ioctl(uapi.TEE_IOC_SUPPL_RECV, _buf(mem, block))
    return bytes(block)


def send(sctx: OpteeContext, mem: CheckedMemory, ret: int, params: list[tuple[int, ...]]) -> None:
    block = bytearray(HEAD.pack(ret, len(params)) + b"".join(PARAM.pack(*p) for p in params))
    sctx.ioctl(uapi.TEE_IOC_SUPPL_SEND, _buf(mem, block))


def opener(
    ctx: OpteeContext, mem: CheckedMemory, ta: uuid.UUID
) -> tuple[threading.Thread, list[tuple[int, int, int]]]:
    out: list[tuple[int, int, int]] = []
    t = threading.Thread(target=lambda: out.append(open_session(ctx, mem, ta)), daemon=True)
    t.start()
    return t, out


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


# ----------------------------------------------------------------------------- LOAD_TA


def test_ta_file_name_is_lowercase_uuid() -> None:
    """teec_ta_load.c: ``%08x-%04x-%04x-%02x%02x-%02x…%02x.ta`` of the UUID octets."""
    assert ta_file_name(LOADABLE_UUID.bytes) == "d96a5b40-c3e5-21e3-8794-0002a5d5c51b.ta"


def test_session_to_a_ta_known_only_to_the_supplicant(env: Env, supp: OpteeSupplicant) -> None:
    """The TA is not registered: LOAD_TA (size query, APPL shm, load) finds its image."""
    dev, ctx, mem, tmp = env
    (tmp / "ta" / f"{LOADABLE_UUID}.ta").write_bytes(gp_ta_image(LOADABLE_UUID, b"\x7fELF..."))
    session, ret, origin = open_session(ctx, mem, LOADABLE_UUID)
    assert (ret, origin) == (0, TA) and session
    head, back = invoke(ctx, mem, session, CMD_ADD, [(VALUE_IN, 40, 2, 0), (VALUE_OUT, 0, 0, 0)])
    assert head[3:5] == (0, TA) and back[1][1] == 42
    # A second session is a second instance: loaded again (multi-instance TA).
    session2, ret, _ = open_session(ctx, mem, LOADABLE_UUID)
    assert ret == 0
    close_session(ctx, session)
    close_session(ctx, session2)
    assert dev.leaks() == {}
    assert not supp.ctx.shms  # every payload shm was freed again


def test_missing_image_is_item_not_found_from_tee(env: Env, supp: OpteeSupplicant) -> None:
    _dev, ctx, mem, _tmp = env
    assert open_session(ctx, mem, LOADABLE_UUID) == (
        0,
        TeecResult.TEEC_ERROR_ITEM_NOT_FOUND,
        TEE,
    )
    assert open_session(ctx, mem, uuid.UUID(int=7)) == (
        0,
        TeecResult.TEEC_ERROR_ITEM_NOT_FOUND,
        TEE,
    )


def test_image_without_a_loadable_class_is_item_not_found(env: Env, supp: OpteeSupplicant) -> None:
    _dev, ctx, mem, tmp = env
    other = uuid.UUID(int=9)
    (tmp / "ta" / f"{other}.ta").write_bytes(gp_ta_image(other))
    assert open_session(ctx, mem, other)[1:] == (TeecResult.TEEC_ERROR_ITEM_NOT_FOUND, TEE)


@pytest.mark.parametrize(
    "image", [b"not a TA image", ta_image(str(STORE_B_UUID)), ta_image("Loadable")]
)
def test_bad_or_foreign_image_is_security(env: Env, supp: OpteeSupplicant, image: bytes) -> None:
    """A corrupt image, or one for another UUID: TEE_ERROR_SECURITY (header check)."""
    _dev, ctx, mem, tmp = env
    (tmp / "ta" / f"{LOADABLE_UUID}.ta").write_bytes(image)
    assert open_session(ctx, mem, LOADABLE_UUID) == (0, TeecResult.TEEC_ERROR_SECURITY, TEE)


def test_registered_ta_never_asks_the_supplicant(env: Env) -> None:
    """With the hook installed and no supplicant, a registered TA opens at once."""
    dev, ctx, mem, _tmp = env
    attach_rpc(dev)
    session, ret, _ = open_session(ctx, mem, STORE_A_UUID)
    assert ret == 0
    close_session(ctx, session)


def test_no_supplicant_waits_then_its_close_is_communication(env: Env) -> None:
    """§3.3: with no supplicant the open waits; a supplicant that receives the request
    and closes instead of answering fails it with COMMUNICATION (origin TEE)."""
    dev, ctx, mem, _tmp = env
    queue = attach_rpc(dev)
    t, out = opener(ctx, mem, LOADABLE_UUID)
    wait_for(lambda: queue.counts()["queued"] == 1)
    time.sleep(0.05)
    assert t.is_alive() and not out
    sctx = dev.open_supplicant()
    block = recv(sctx, mem, [(META, 0, 0, 0)] + [(0, 0, 0, 0)] * 4)
    func, num = HEAD.unpack_from(block)
    params = [PARAM.unpack_from(block, 8 + 32 * i) for i in range(num)]
    octets = LOADABLE_UUID.bytes
    assert (func, num) == (0, 3)
    assert params[0] == (META | VALUE_INOUT, 1, 0, 0)  # request id 1
    assert params[1] == (
        VALUE_IN,
        int.from_bytes(octets[:8], "little"),
        int.from_bytes(octets[8:], "little"),
        0,
    )
    assert params[2] == (MEMREF_OUT, 0, 0, uapi.TEE_MEMREF_NULL)  # the size query
    assert queue.counts() == {"queued": 0, "in flight": 1}
    sctx.close()
    t.join(5)
    assert out == [(0, TeecResult.TEEC_ERROR_COMMUNICATION, TEE)]


def test_a_wait_with_no_supplicant_is_told_once_and_goes_on(
    env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """§3.3: the open waits for a supplicant as the kernel's does; past
    ``NO_SUPPLICANT_NOTE`` one warning names the RPC it waits on (a mistyped UUID would
    otherwise look like a hang), and a supplicant attached later still gets the request."""
    monkeypatch.setattr(supp_mod, "NO_SUPPLICANT_NOTE", 0.05)
    dev, ctx, mem, _tmp = env
    queue = attach_rpc(dev)
    with caplog.at_level("WARNING", logger="qtee.optee"):
        t, out = opener(ctx, mem, LOADABLE_UUID)
        wait_for(lambda: queue.counts()["queued"] == 1)
        wait_for(lambda: bool(caplog.records))
        time.sleep(0.2)  # (four more periods: still one warning)
        assert t.is_alive() and not out
        assert [r.getMessage() for r in caplog.records] == [
            "the secure side waits for tee-supplicant (RPC LOAD_TA) and none is attached: "
            "start one (supplicant.OpteeSupplicant, or qtee supplicant --tee optee), or "
            "register the TA (register_gp_ta); still waiting"
        ]
        sctx = dev.open_supplicant()
        recv(sctx, mem, [(META, 0, 0, 0)] + [(0, 0, 0, 0)] * 4)
        sctx.close()
        t.join(5)
    assert out == [(0, TeecResult.TEEC_ERROR_COMMUNICATION, TEE)]


def test_queued_requests_fail_when_the_supplicant_closes(env: Env) -> None:
    """Requests still queued (never received) also complete with COMMUNICATION."""
    dev, ctx, mem, _tmp = env
    queue = attach_rpc(dev)
    sctx = dev.open_supplicant()
    t, out = opener(ctx, mem, LOADABLE_UUID)
    wait_for(lambda: queue.counts()["queued"] == 1)
    sctx.close()
    t.join(5)
    assert out == [(0, TeecResult.TEEC_ERROR_COMMUNICATION, TEE)]


def test_raw_supplicant_answers_by_id(env: Env) -> None:
    """SEND: unknown id ENOENT, wrong num_params EINVAL; the answer's ret is the open's."""
    dev, ctx, mem, _tmp = env
    sctx = dev.open_supplicant()
    t, out = opener(ctx, mem, LOADABLE_UUID)
    block = recv(sctx, mem, [(META, 0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0)])
    req_id = PARAM.unpack_from(block, 8)[1]
    with pytest.raises(DriverError) as e:
        send(sctx, mem, 0, [(META | VALUE_INOUT, req_id + 5, 0, 0), (0,) * 4, (0,) * 4])
    assert e.value.errno == errno.ENOENT
    with pytest.raises(DriverError) as e:
        send(sctx, mem, 0, [(META | VALUE_INOUT, req_id, 0, 0)])
    assert e.value.errno == errno.EINVAL
    with pytest.raises(DriverError) as e:  # no META param
        send(sctx, mem, 0, [(VALUE_INOUT, req_id, 0, 0), (0,) * 4, (0,) * 4])
    assert e.value.errno == errno.EINVAL
    not_found = TeecResult.TEEC_ERROR_ITEM_NOT_FOUND
    send(sctx, mem, not_found, [(META | VALUE_INOUT, req_id, 0, 0), (0,) * 4, (0,) * 4])
    t.join(5)
    assert out == [(0, not_found, TEE)]
    with pytest.raises(DriverError) as e:  # answered already
        send(sctx, mem, 0, [(META | VALUE_INOUT, req_id, 0, 0), (0,) * 4, (0,) * 4])
    assert e.value.errno == errno.ENOENT
    sctx.close()


def test_recv_rules(env: Env) -> None:
    """RECV params NONE/META only; too few slots EINVAL (request stays queued); closing the
    context wakes a waiting RECV with EINTR; a plain context has no SUPPL_RECV."""
    dev, ctx, mem, _tmp = env
    queue = attach_rpc(dev)
    with pytest.raises(DriverError) as e:
        recv(ctx, mem, [(META, 0, 0, 0)])
    assert e.value.errno == errno.EINVAL
    sctx = dev.open_supplicant()
    with pytest.raises(DriverError) as e:
        recv(sctx, mem, [(META | VALUE_INOUT, 0, 0, 0)])
    assert e.value.errno == errno.EINVAL
    t, out = opener(ctx, mem, LOADABLE_UUID)
    wait_for(lambda: queue.counts()["queued"] == 1)
    with pytest.raises(DriverError) as e:  # LOAD_TA has 2 params, 1 slot after META
        recv(sctx, mem, [(META, 0, 0, 0), (0, 0, 0, 0)])
    assert e.value.errno == errno.EINVAL
    assert queue.counts()["queued"] == 1
    sctx.close()
    t.join(5)
    assert out[0][1] == TeecResult.TEEC_ERROR_COMMUNICATION
    sctx = dev.open_supplicant()
    errs: list[int] = []

    def waiting_recv() -> None:
        try:
            recv(sctx, mem, [(META, 0, 0, 0)] + [(0, 0, 0, 0)] * 4)
        except DriverError as exc:
            errs.append(exc.errno or 0)

    w = threading.Thread(target=waiting_recv, daemon=True)
    w.start()
    time.sleep(0.05)
    assert w.is_alive()
    sctx.close()
    w.join(5)
    assert errs == [errno.EINTR]


def test_synchronous_recv_without_meta(env: Env) -> None:
    """Without META the request is the synchronous one: SEND names none; RECV before its
    SEND is EINVAL."""
    dev, ctx, mem, _tmp = env
    sctx = dev.open_supplicant()
    t, out = opener(ctx, mem, LOADABLE_UUID)
    block = recv(sctx, mem, [(0, 0, 0, 0)] * 2)
    assert HEAD.unpack_from(block) == (0, 2)
    with pytest.raises(DriverError) as e:
        recv(sctx, mem, [(0, 0, 0, 0)] * 2)
    assert e.value.errno == errno.EINVAL
    send(sctx, mem, TeecResult.TEEC_ERROR_ITEM_NOT_FOUND, [(0,) * 4, (0,) * 4])
    t.join(5)
    assert out == [(0, TeecResult.TEEC_ERROR_ITEM_NOT_FOUND, TEE)]
    sctx.close()


def test_second_supplicant_is_ebusy(env: Env) -> None:
    dev, _ctx, _mem, _tmp = env
    first = dev.open_supplicant()
    with pytest.raises(DriverError) as e:
        dev.open_supplicant()
    assert e.value.errno == errno.EBUSY
    first.close()
    again = dev.open_supplicant()
    assert isinstance(again, OpteeSuppContext)
    again.close()


def test_restarted_supplicant_serves_what_was_queued_after(env: Env) -> None:
    dev, ctx, mem, tmp = env
    (tmp / "ta" / f"{LOADABLE_UUID}.ta").write_bytes(gp_ta_image(LOADABLE_UUID))
    queue = attach_rpc(dev)
    t, out = opener(ctx, mem, LOADABLE_UUID)
    wait_for(lambda: queue.counts()["queued"] == 1)
    s = OpteeSupplicant(dev, tmp / "ta", tmp / "store", workers=1)
    try:
        t.join(5)
        assert out[0][1:] == (0, TA)
        close_session(ctx, out[0][0])
    finally:
        s.stop()


# ----------------------------------------------------------------------------- storage


def test_storage_lifecycle(env: Env, supp: OpteeSupplicant) -> None:
    """create/write/seek/read/truncate/rename/enumerate, then the file on disk."""
    _dev, _ctx, _mem, tmp = env

    def script(st: TrustedStorage) -> object:
        obj = st.create(b"first", ALL, b"hello")
        obj.seek(0, TEE_DATA_SEEK_END)
        obj.write(b" world")
        obj.seek(0)
        whole = obj.read(100)
        obj.truncate(5)
        obj.seek(8)
        obj.write(b"!")  # a gap past the end reads as zeros
        obj.seek(0)
        gapped = obj.read(100)
        obj.rename(b"second")
        second = st.create(b"\x00\xff", RW, b"x")
        second.close()
        ids = st.enumerate()
        size = obj.size
        obj.close()
        return whole, gapped, ids, size

    ret, _origin, result = run_script(env, StoreA, script)
    assert ret == 0
    assert result == (
        b"hello world",
        b"hello\0\0\0!",
        [b"\x00\xff", b"second"],
        9,
    )
    ns = tmp / "store" / str(STORE_A_UUID)
    assert sorted(os.listdir(ns)) == ["00ff", b"second".hex()]
    assert (ns / b"second".hex()).read_bytes() == b"hello\0\0\0!"


def test_another_ta_never_sees_the_objects(env: Env, supp: OpteeSupplicant) -> None:
    _dev, _ctx, _mem, tmp = env
    ret, _, _ = run_script(env, StoreA, lambda st: st.create(b"secret", RW, b"A's").close())
    assert ret == 0

    def peek(st: TrustedStorage) -> object:
        return st.enumerate()

    assert run_script(env, StoreB, peek) == (0, TA, [])
    ret, origin, _ = run_script(env, StoreB, lambda st: st.open(b"secret", RW))
    assert (ret, origin) == (TeecResult.TEEC_ERROR_ITEM_NOT_FOUND, TA)
    # B's object of the same id is B's own.
    assert run_script(env, StoreB, lambda st: st.create(b"secret", RW, b"B's").close())[0] == 0
    assert (tmp / "store" / str(STORE_A_UUID) / b"secret".hex()).read_bytes() == b"A's"
    assert (tmp / "store" / str(STORE_B_UUID) / b"secret".hex()).read_bytes() == b"B's"

    def read_back(st: TrustedStorage) -> object:
        obj = st.open(b"secret", TEE_DATA_FLAG_ACCESS_READ)
        try:
            return obj.read(10)
        finally:
            obj.close()

    assert run_script(env, StoreA, read_back) == (0, TA, b"A's")


def test_delete_and_access_rules(env: Env, supp: OpteeSupplicant) -> None:
    _dev, _ctx, _mem, tmp = env
    conflict = TeecResult.TEEC_ERROR_ACCESS_CONFLICT

    def script(st: TrustedStorage) -> object:
        codes: list[int] = []

        def code(fn: Callable[[], object]) -> None:
            try:
                fn()
                codes.append(0)
            except GpTaError as exc:
                codes.append(exc.code)

        st.create(b"obj", RW, b"data").close()
        code(lambda: st.create(b"obj", RW))  # exists: ACCESS_CONFLICT
        st.create(b"obj", RW | TEE_DATA_FLAG_OVERWRITE, b"new").close()
        ro = st.open(b"obj", TEE_DATA_FLAG_ACCESS_READ)
        code(lambda: ro.write(b"x"))  # no ACCESS_WRITE
        code(ro.close_and_delete)  # no WRITE_META
        code(lambda: st.open(b"obj", ALL))  # WRITE_META is exclusive
        ro.close()
        meta = st.open(b"obj", ALL)
        code(lambda: st.open(b"obj", TEE_DATA_FLAG_ACCESS_READ))
        st.create(b"other", RW).close()
        code(lambda: meta.rename(b"other"))  # the target exists
        code(lambda: st.open(b"missing", RW))
        code(lambda: st.open(b"obj", RW, storage_id=0x1234))
        data = meta.read(10)
        meta.close_and_delete()
        code(lambda: st.open(b"obj", RW))
        last = st.open(b"other", ALL)
        last.close_and_delete()
        return codes, data, st.enumerate()

    ret, _, result = run_script(env, StoreA, script)
    nf = TeecResult.TEEC_ERROR_ITEM_NOT_FOUND
    assert ret == 0
    assert result == ([conflict, conflict, conflict, conflict, conflict, conflict, nf, nf, nf],
                      b"new", [])  # fmt: skip
    assert not (tmp / "store" / str(STORE_A_UUID)).exists()  # the empty directory went too


def test_storage_without_a_supplicant_waits_then_communication(env: Env) -> None:
    """A storage call with no supplicant waits; the supplicant closing fails its first
    RPC, the name payload's SHM_ALLOC, which the kernel answers OUT_OF_MEMORY (the TA did
    not catch it: origin TA)."""
    dev, ctx, mem, _tmp = env
    queue = attach_rpc(dev)
    session, ret, _ = open_session(ctx, mem, STORE_A_UUID)
    assert ret == 0
    StoreA.script = lambda st: st.open(b"x", RW)
    out: list[tuple[int, ...]] = []
    t = threading.Thread(
        target=lambda: out.append(invoke(ctx, mem, session, CMD_SCRIPT, [(0, 0, 0, 0)] * 4)[0]),
        daemon=True,
    )
    t.start()
    wait_for(lambda: queue.counts()["queued"] == 1)
    sctx = dev.open_supplicant()
    sctx.close()
    t.join(5)
    assert out[0][3:5] == (TeecResult.TEEC_ERROR_OUT_OF_MEMORY, TA)  # the name payload
    close_session(ctx, session)
