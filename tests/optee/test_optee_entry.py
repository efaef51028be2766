"""OP-TEE's SMC entry with virtualization, the message records, and GpRuntime.shutdown
(optee.md §2, §4.3, §6.1, §6.2).

The entry is driven through a small fake of the secure monitor (``add_service`` plus a
physical memory of bytearrays), so these tests need neither the real monitor nor a VMM.
Every test ends with no partition, session or registered buffer left (``rig`` fixture).
"""

from __future__ import annotations

import logging
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from objects import DecodeError, UsageError
from qtee._optee.optee_msg import (
    MSG_HEADER_SIZE,
    MSG_MAX_PARAMS,
    OPTEE_MSG_ATTR_META,
    MsgParam,
    OpteeMsg,
    OpteeMsgAttr,
    OpteeMsgCmd,
    OpteeReply,
    OpteeSecCap,
    arg_size,
    decode_msg,
    encode_msg,
    read_reply,
    reply_patches,
    write_reply,
)
from qtee._smc import OPTEE_SMC_SEC_CAP_VIRTUALIZATION, OnReturn, Regs, SmcFid, SmcReturn
from qtee.gp import TeecOrigin, TeecResult
from qtee.secure import (
    TEE_TIMEOUT_INFINITE,
    GpParam,
    GpSession,
    GpTA,
    GpTaError,
    QteeRoot,
    SecureWorld,
    register_gp_ta,
    unregister_gp_ta,
)
from qtee.secure._gp import GpRuntime
from qtee.secure._optee_entry import OPTEE_FIDS, OpteeEntry

A = OpteeMsgAttr
C = OpteeMsgCmd
OK = TeecResult.TEEC_SUCCESS
BAD = TeecResult.TEEC_ERROR_BAD_PARAMETERS
NOT_FOUND = TeecResult.TEEC_ERROR_ITEM_NOT_FOUND
BUSY = TeecResult.TEEC_ERROR_BUSY
CANCEL = TeecResult.TEEC_ERROR_CANCEL
COMM = TeecResult.TEEC_ERROR_COMMUNICATION
TEE = TeecOrigin.TEEC_ORIGIN_TEE
TA = TeecOrigin.TEEC_ORIGIN_TRUSTED_APP
COMMS = TeecOrigin.TEEC_ORIGIN_COMMS
VI, VO, MO = 1, 2, 6

TA_UUID = uuid.UUID("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")
TAG, WAIT, FILL, HOLD = 0, 1, 2, 3
PAGE = 4096


# ----------------------------------------------------------------------------- fakes


class FakePhys:
    """Host-physical memory: page-aligned bytearrays, views inside one region only."""

    def __init__(self) -> None:
        self.regions: dict[int, bytearray] = {}
        self._next = 0x8_0000_0000

    def add(self, buf: bytearray) -> int:
        pa = self._next
        self._next += (len(buf) // PAGE + 2) * PAGE
        self.regions[pa] = buf
        return pa

    def remove(self, pa: int) -> None:
        del self.regions[pa]

    def view(self, paddr: int, length: int) -> memoryview:
        for start, buf in self.regions.items():
            if start <= paddr and paddr + length <= start + len(buf):
                return memoryview(buf)[paddr - start : paddr - start + length]
        raise UsageError(f"{paddr:#x}+{length} is not mapped")


Handler = Callable[[int, int, int, int, int, int, int, int, OnReturn | None], Regs]


class FakeMonitor:
    """``add_service`` and ``smc`` of the secure monitor, nothing else."""

    def __init__(self) -> None:
        self.phys = FakePhys()
        self.services: dict[int, Handler] = {}

    def add_service(self, fids: Iterable[int], handler: Handler) -> None:
        for fid in fids:
            assert fid not in self.services
            self.services[fid] = handler

    def smc(self, fid: int, a1: int = 0, a2: int = 0, a7: int = 0) -> Regs:
        handler = self.services.get(fid)
        if handler is None:
            return (SmcReturn.UNKNOWN_FUNCTION, 0, 0, 0)
        return handler(fid, a1, a2, 0, 0, 0, 0, a7, None)


class Rig:
    def __init__(self, **kw: int | bool) -> None:
        self.mon = FakeMonitor()
        self.entry = OpteeEntry(self.mon, **kw)  # type: ignore[arg-type]

    def fast(self, fid: int, a1: int = 0, a7: int = 0) -> Regs:
        return self.mon.smc(fid, a1, 0, a7)

    def create(self, cid: int) -> int:
        return self.fast(SmcFid.OPTEE_SMC_VM_CREATED, cid)[0]

    def destroy(self, cid: int) -> int:
        return self.fast(SmcFid.OPTEE_SMC_VM_DESTROYED, cid)[0]

    def raw(self, cid: int, page: bytearray) -> tuple[int, bytearray]:
        pa = self.mon.phys.add(page)
        try:
            a0 = self.mon.smc(SmcFid.OPTEE_SMC_CALL_WITH_ARG, pa >> 32, pa & 0xFFFF_FFFF, cid)[0]
        finally:
            self.mon.phys.remove(pa)
        return a0, page

    def call(self, cid: int, msg: OpteeMsg) -> OpteeReply:
        a0, page = self.raw(cid, encode_msg(msg))
        assert a0 == SmcReturn.OK, SmcReturn(a0).name
        return read_reply(page, msg)

    def open(self, cid: int, tag: int = 0) -> OpteeReply:
        return self.call(
            cid,
            OpteeMsg(
                cmd=C.OPTEE_MSG_CMD_OPEN_SESSION,
                uuid=TA_UUID.bytes,
                params=(MsgParam.value(A.OPTEE_MSG_ATTR_TYPE_VALUE_INPUT, tag),),
            ),
        )

    def invoke(self, cid: int, session: int, cmd: int, *params: MsgParam) -> OpteeReply:
        return self.call(
            cid,
            OpteeMsg(cmd=C.OPTEE_MSG_CMD_INVOKE_COMMAND, func=cmd, session=session, params=params),
        )

    def tag(self, cid: int, session: int) -> OpteeReply:
        return self.invoke(cid, session, TAG, MsgParam.value(A.OPTEE_MSG_ATTR_TYPE_VALUE_OUTPUT))

    def close(self, cid: int, session: int) -> OpteeReply:
        return self.call(cid, OpteeMsg(cmd=C.OPTEE_MSG_CMD_CLOSE_SESSION, session=session))


class TagTA(GpTA):
    """Multi-instance: remembers the open's VALUE a; TAG returns it; WAIT blocks in
    TEE_Wait(INFINITE) with cancellation unmasked; FILL writes a memref; HOLD parks on
    an event.  Every entry is logged so tests can see that none ran."""

    UUID = TA_UUID
    entries: ClassVar[list[str]] = []
    entered = threading.Event()
    release = threading.Event()

    def create(self) -> None:
        self.entries.append("create")

    def open_session(self, session: GpSession, types: int, params: list[GpParam]) -> None:
        self.entries.append("open")
        session.context = params[0].a

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
        self.entries.append("invoke")
        if cmd == TAG:
            assert isinstance(session.context, int)
            params[0].a = session.context
        elif cmd == WAIT:
            self.unmask_cancellation()
            self.entered.set()
            rc = self.wait(TEE_TIMEOUT_INFINITE)
            if rc:
                raise GpTaError(rc)
        elif cmd == FILL:
            data = b"from the TA"
            buf = params[0].buffer
            if buf is None or params[0].size < len(data):
                params[0].size = len(data)
                raise GpTaError(TeecResult.TEEC_ERROR_SHORT_BUFFER)
            buf[: len(data)] = data
            params[0].size = len(data)
        elif cmd == HOLD:
            self.entered.set()
            assert self.release.wait(5)
        else:
            raise GpTaError(TeecResult.TEEC_ERROR_NOT_SUPPORTED)

    def close_session(self, session: GpSession) -> None:
        self.entries.append("close")

    def destroy(self) -> None:
        self.entries.append("destroy")


@pytest.fixture(autouse=True)
def tag_ta() -> Iterator[None]:
    register_gp_ta(TagTA)
    TagTA.entries = []
    TagTA.entered.clear()
    TagTA.release.clear()
    yield
    TagTA.release.set()
    unregister_gp_ta(TA_UUID)


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    for cid in r.entry.clients():
        assert r.destroy(cid) == SmcReturn.OK
    assert r.entry.leaks() == {}


def _in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    return t, out


# ----------------------------------------------------------------------------- fast calls


def test_registers_exactly_the_optee_function_ids() -> None:
    """§6.1: the entry owns VM_CREATED/DESTROYED, GET_THREAD_COUNT, EXCHANGE_CAPABILITIES
    and the two std calls, with their SMC32 ids."""
    r = Rig()
    assert set(r.mon.services) == set(OPTEE_FIDS)
    assert {int(f) for f in OPTEE_FIDS} == {
        0xB200000D,
        0xB200000E,
        0xB200000F,
        0xB2000009,
        0x32000004,
        0x32000003,
    }
    with pytest.raises(UsageError):
        OpteeEntry(FakeMonitor(), guest_limit=0)
    with pytest.raises(UsageError):
        OpteeEntry(FakeMonitor(), threads=True)
    with pytest.raises(TypeError):
        OpteeEntry(object())  # type: ignore[arg-type]


def test_vm_created_only_from_the_hypervisor_and_never_for_id_0(rig: Rig) -> None:
    """§6.1: a7 must be 0 (HYP_CLNT_ID), else ENOTAVAIL; guest id 0 is refused; a refusal
    changes nothing."""
    assert rig.fast(SmcFid.OPTEE_SMC_VM_CREATED, 5, a7=3)[0] == SmcReturn.ENOTAVAIL
    assert rig.fast(SmcFid.OPTEE_SMC_VM_CREATED, 0)[0] == SmcReturn.ENOTAVAIL
    assert rig.fast(SmcFid.OPTEE_SMC_VM_CREATED, 0x1_0000)[0] == SmcReturn.ENOTAVAIL
    assert rig.entry.clients() == []
    assert rig.create(5) == SmcReturn.OK
    assert rig.create(5) == SmcReturn.ENOTAVAIL  # exists
    assert rig.entry.clients() == [5]


def test_guest_limit_then_destroy_frees_a_slot(rig: Rig) -> None:
    """§6.1: CFG_VIRT_GUEST_COUNT (default 2) equal slices: guest N+1 gets ENOTAVAIL;
    after a destroy the next creation works."""
    assert rig.entry.guest_limit == 2
    assert rig.create(1) == rig.create(2) == SmcReturn.OK
    assert rig.create(3) == SmcReturn.ENOTAVAIL
    assert rig.entry.clients() == [1, 2]
    assert rig.destroy(1) == SmcReturn.OK
    assert rig.create(3) == SmcReturn.OK
    assert rig.entry.clients() == [2, 3]


def test_vm_destroyed_rules(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """§6.1: VM_DESTROYED from a guest (a7 != 0) is ENOTAVAIL and destroys nothing; id 0 is
    ENOTAVAIL; an unknown id is logged and answers OK."""
    assert rig.create(7) == SmcReturn.OK
    assert rig.fast(SmcFid.OPTEE_SMC_VM_DESTROYED, 7, a7=7)[0] == SmcReturn.ENOTAVAIL
    assert rig.entry.clients() == [7]
    assert rig.destroy(0) == SmcReturn.ENOTAVAIL
    with caplog.at_level(logging.DEBUG, logger="qtee.optee"):
        assert rig.destroy(99) == SmcReturn.OK
    assert any("99" in rec.getMessage() for rec in caplog.records)
    assert all(rec.levelno == logging.DEBUG for rec in caplog.records)
    assert rig.destroy(7) == SmcReturn.OK
    assert rig.entry.clients() == []


def test_thread_count_and_capabilities() -> None:
    """§6.1: GET_THREAD_COUNT answers the thread count; EXCHANGE_CAPABILITIES sets
    SEC_CAP_VIRTUALIZATION (bit 3); both from the hypervisor or a live guest, ENOTAVAIL
    from an id that names no guest."""
    r = Rig(threads=3)
    assert r.fast(SmcFid.OPTEE_SMC_GET_THREAD_COUNT) == (SmcReturn.OK, 3, 0, 0)
    a0, caps, _, _ = r.fast(SmcFid.OPTEE_SMC_EXCHANGE_CAPABILITIES)
    assert a0 == SmcReturn.OK
    assert caps & OPTEE_SMC_SEC_CAP_VIRTUALIZATION == 1 << 3
    assert caps & OpteeSecCap.OPTEE_SMC_SEC_CAP_DYNAMIC_SHM
    assert r.fast(SmcFid.OPTEE_SMC_GET_THREAD_COUNT, a7=4)[0] == SmcReturn.ENOTAVAIL
    assert r.fast(SmcFid.OPTEE_SMC_EXCHANGE_CAPABILITIES, a7=4)[0] == SmcReturn.ENOTAVAIL
    assert r.create(4) == SmcReturn.OK
    assert r.fast(SmcFid.OPTEE_SMC_GET_THREAD_COUNT, a7=4) == (SmcReturn.OK, 3, 0, 0)
    assert r.destroy(4) == SmcReturn.OK


def test_without_virtualization_the_vm_calls_are_unknown() -> None:
    """§6.2 (Xen's probe): OP-TEE built without virtualization answers VM_DESTROYED(0)
    with UNKNOWN_FUNCTION, and its capabilities lack bit 3."""
    r = Rig(virtualization=False)
    assert r.destroy(0) == SmcReturn.UNKNOWN_FUNCTION
    assert r.create(1) == SmcReturn.UNKNOWN_FUNCTION
    caps = r.fast(SmcFid.OPTEE_SMC_EXCHANGE_CAPABILITIES)[1]
    assert not caps & OPTEE_SMC_SEC_CAP_VIRTUALIZATION
    assert r.entry.leaks() == {}


# ----------------------------------------------------------------------------- std calls


def test_std_call_needs_a_live_guest(rig: Rig) -> None:
    """§6.1: every SMC carries the client id in a7; a std call whose a7 names no guest --
    the hypervisor's 0 included -- is ENOTAVAIL (no implicit creation)."""
    page = encode_msg(OpteeMsg(cmd=C.OPTEE_MSG_CMD_CLOSE_SESSION, session=2))
    assert rig.raw(0, bytearray(page))[0] == SmcReturn.ENOTAVAIL
    assert rig.raw(9, bytearray(page))[0] == SmcReturn.ENOTAVAIL
    assert rig.entry.clients() == []
    assert rig.create(9) == SmcReturn.OK
    assert rig.destroy(9) == SmcReturn.OK
    assert rig.raw(9, bytearray(page))[0] == SmcReturn.ENOTAVAIL
    assert rig.fast(SmcFid.OPTEE_SMC_RETURN_FROM_RPC, a7=9)[0] == SmcReturn.ENOTAVAIL


def test_session_lifecycle_in_a_partition(rig: Rig) -> None:
    """§4.2, §4.3: open, invoke, close through CALL_WITH_ARG; a closed session is
    BAD_PARAMETERS (origin TEE) on invoke and ITEM_NOT_FOUND on close."""
    assert rig.create(1) == SmcReturn.OK
    opened = rig.open(1, tag=0x1234)
    assert (opened.ret, opened.ret_origin) == (OK, TA)
    sid = opened.session
    assert sid
    got = rig.tag(1, sid)
    assert (got.ret, got.outs[0].a) == (OK, 0x1234)
    assert rig.close(1, sid).ret == OK
    assert TagTA.entries == ["create", "open", "invoke", "close", "destroy"]
    again = rig.tag(1, sid)
    assert (again.ret, again.ret_origin) == (BAD, TEE)
    assert rig.close(1, sid).ret == NOT_FOUND


def test_same_session_number_in_two_guests_names_two_sessions(rig: Rig) -> None:
    """§2 model note, §6.1: session lists are per partition; the same number in two guests
    names two sessions, and one guest's session is unknown in another (BAD_PARAMETERS,
    origin TEE, §4.3)."""
    assert rig.create(1) == rig.create(2) == SmcReturn.OK
    a = rig.open(1, tag=0xA)
    b = rig.open(2, tag=0xB)
    assert a.session == b.session  # lowest free id in each partition
    assert rig.tag(1, a.session).outs[0].a == 0xA
    assert rig.tag(2, b.session).outs[0].a == 0xB
    second = rig.open(1, tag=0xA2)
    stolen = rig.tag(2, second.session)  # B has no such session
    assert (stolen.ret, stolen.ret_origin) == (BAD, TEE)
    assert rig.close(2, second.session).ret == NOT_FOUND
    assert rig.tag(1, second.session).outs[0].a == 0xA2  # A's untouched
    for cid, sid in ((1, a.session), (1, second.session), (2, b.session)):
        assert rig.close(cid, sid).ret == OK


def test_arg_address_and_command_checks(rig: Rig) -> None:
    """§6.2 (model choices where the sheet is silent): an unaligned or unmapped arg is
    EBADADDR; an unknown command EBADCMD; a malformed message is answered BAD_PARAMETERS
    (origin TEE) in its page; RETURN_FROM_RPC with nothing suspended is ERESUME."""
    assert rig.create(1) == SmcReturn.OK
    smc = rig.mon.smc
    call = SmcFid.OPTEE_SMC_CALL_WITH_ARG
    page = bytearray(encode_msg(OpteeMsg(cmd=C.OPTEE_MSG_CMD_CLOSE_SESSION, session=2)))
    pa = rig.mon.phys.add(page)
    assert smc(call, pa >> 32, (pa + 8) & 0xFFFF_FFFF, 1)[0] == SmcReturn.EBADADDR
    rig.mon.phys.remove(pa)
    assert smc(call, pa >> 32, pa & 0xFFFF_FFFF, 1)[0] == SmcReturn.EBADADDR
    bad_cmd = encode_msg(OpteeMsg(cmd=77))
    assert rig.raw(1, bad_cmd)[0] == SmcReturn.EBADCMD
    junk = encode_msg(OpteeMsg(cmd=C.OPTEE_MSG_CMD_INVOKE_COMMAND, params=(MsgParam.value(1),)))
    struct.pack_into("<Q", junk, MSG_HEADER_SIZE, 0x4)  # attr 4 is no type
    a0, out = rig.raw(1, junk)
    assert a0 == SmcReturn.OK
    assert struct.unpack_from("<II", out, 20) == (BAD, TEE)
    huge = bytearray(MSG_HEADER_SIZE)
    struct.pack_into("<I", huge, 28, MSG_MAX_PARAMS + 1)
    a0, out = rig.raw(1, huge)
    assert (a0, struct.unpack_from("<II", out, 20)) == (SmcReturn.OK, (BAD, TEE))
    assert rig.fast(SmcFid.OPTEE_SMC_RETURN_FROM_RPC, a7=1)[0] == SmcReturn.ERESUME
    too_many = OpteeMsg(
        cmd=C.OPTEE_MSG_CMD_INVOKE_COMMAND,
        session=2,
        params=tuple(MsgParam.value(1) for _ in range(5)),
    )
    assert rig.call(1, too_many).ret == BAD  # TEE_NUM_PARAMS is 4 (§1.2, §4.3)


def test_tmem_and_short_buffer(rig: Rig) -> None:
    """§1.4: memref output sizes come back whatever the result (SHORT_BUFFER carries the
    size needed); the TA writes the physical pages themselves; a NULL memref (address 0)
    reaches the TA as no buffer."""
    assert rig.create(1) == SmcReturn.OK
    sid = rig.open(1).session
    data = bytearray(PAGE)
    pa = rig.mon.phys.add(data)
    try:
        short = rig.invoke(1, sid, FILL, MsgParam.tmem(A.OPTEE_MSG_ATTR_TYPE_TMEM_OUTPUT, pa, 4))
        assert (short.ret, short.outs[0].size) == (TeecResult.TEEC_ERROR_SHORT_BUFFER, 11)
        null = rig.invoke(1, sid, FILL, MsgParam.tmem(A.OPTEE_MSG_ATTR_TYPE_TMEM_OUTPUT, 0, 0))
        assert (null.ret, null.outs[0].size) == (TeecResult.TEEC_ERROR_SHORT_BUFFER, 11)
        ok = rig.invoke(1, sid, FILL, MsgParam.tmem(A.OPTEE_MSG_ATTR_TYPE_TMEM_OUTPUT, pa, 64))
        assert (ok.ret, ok.outs[0].size) == (OK, 11)
        assert bytes(data[:11]) == b"from the TA"
        far = MsgParam.tmem(A.OPTEE_MSG_ATTR_TYPE_TMEM_OUTPUT, pa + 2 * PAGE, 8)
        assert rig.invoke(1, sid, FILL, far).ret == BAD  # not mapped
    finally:
        rig.mon.phys.remove(pa)
    assert rig.close(1, sid).ret == OK


def test_registered_shm_per_partition(rig: Rig) -> None:
    """§6.2: REGISTER_SHM names a buffer by cookie (a duplicate is BAD_PARAMETERS); RMEM
    params resolve it in the caller's partition only; UNREGISTER_SHM of an unknown cookie
    is ITEM_NOT_FOUND, and BUSY while a call uses the buffer."""
    assert rig.create(1) == rig.create(2) == SmcReturn.OK
    data = bytearray(2 * PAGE)
    pa = rig.mon.phys.add(data)
    reg = OpteeMsg(
        cmd=C.OPTEE_MSG_CMD_REGISTER_SHM,
        params=(MsgParam.tmem(A.OPTEE_MSG_ATTR_TYPE_TMEM_INOUT, pa, 2 * PAGE, 0xC00C1E),),
    )

    def unreg(cid: int) -> int:
        rmem = MsgParam.rmem(A.OPTEE_MSG_ATTR_TYPE_RMEM_INPUT, 0xC00C1E, 0, 0)
        return rig.call(cid, OpteeMsg(cmd=C.OPTEE_MSG_CMD_UNREGISTER_SHM, params=(rmem,))).ret

    try:
        assert rig.call(1, reg).ret == OK
        assert rig.call(1, reg).ret == BAD
        sid = rig.open(1).session
        out = MsgParam.rmem(A.OPTEE_MSG_ATTR_TYPE_RMEM_OUTPUT, 0xC00C1E, PAGE, 32)
        assert rig.invoke(1, sid, FILL, out).ret == OK
        assert bytes(data[PAGE : PAGE + 11]) == b"from the TA"
        past = MsgParam.rmem(A.OPTEE_MSG_ATTR_TYPE_RMEM_OUTPUT, 0xC00C1E, 2 * PAGE - 4, 8)
        assert rig.invoke(1, sid, FILL, past).ret == BAD
        sid2 = rig.open(2).session
        assert rig.invoke(2, sid2, FILL, out).ret == BAD  # guest 2 has no such cookie
        assert unreg(2) == NOT_FOUND
        hold = MsgParam.rmem(A.OPTEE_MSG_ATTR_TYPE_RMEM_INPUT, 0xC00C1E, 0, 8)
        t, res = _in_thread(lambda: rig.invoke(1, sid, HOLD, hold))
        assert TagTA.entered.wait(5)
        assert unreg(1) == BUSY
        TagTA.release.set()
        t.join(5)
        assert isinstance(res[0], OpteeReply) and res[0].ret == OK
        assert unreg(1) == OK
        assert unreg(1) == NOT_FOUND
        assert rig.close(1, sid).ret == rig.close(2, sid2).ret == OK
    finally:
        rig.mon.phys.remove(pa)


def test_thread_limit_per_partition() -> None:
    """§4.3, §6.2: more concurrent std calls than OP-TEE threads get ETHREAD_LIMIT (the
    driver queues and retries); the slot is free again once a call returns."""
    r = Rig(threads=1)
    assert r.create(1) == r.create(2) == SmcReturn.OK
    sid = r.open(1).session
    t, res = _in_thread(lambda: r.invoke(1, sid, HOLD))
    assert TagTA.entered.wait(5)
    msg = encode_msg(OpteeMsg(cmd=C.OPTEE_MSG_CMD_CLOSE_SESSION, session=sid))
    assert r.raw(1, msg)[0] == SmcReturn.ETHREAD_LIMIT
    other = r.open(2)  # another partition has its own threads
    assert other.ret == OK
    TagTA.release.set()
    t.join(5)
    assert isinstance(res[0], OpteeReply) and res[0].ret == OK
    assert r.close(1, sid).ret == r.close(2, other.session).ret == OK
    assert r.destroy(1) == r.destroy(2) == SmcReturn.OK
    assert r.entry.leaks() == {}


def test_destroy_ends_a_blocked_call_and_drains(rig: Rig) -> None:
    """§6.1: VM_DESTROYED marks the partition shutting down and frees it when the last
    reference drops: a call blocked in TEE_Wait(INFINITE) returns at once with
    COMMUNICATION/COMMS, no TA entry runs, and the draining partition still counts
    toward the guest limit until its call has left."""
    assert rig.create(1) == rig.create(2) == SmcReturn.OK
    sid = rig.open(1).session
    t, res = _in_thread(lambda: rig.invoke(1, sid, WAIT))
    assert TagTA.entered.wait(5)
    entries = list(TagTA.entries)
    hold_gate = threading.Event()
    part = rig.entry.partition(1)
    assert part is not None
    # Keep the woken call inside the partition until we have looked at the limit.
    orig_shutdown = part.gp.shutdown

    def shutdown() -> dict[str, int]:
        part.gp.shutdown = orig_shutdown  # type: ignore[method-assign]
        # Destroyed but its call still inside: 1 is draining, 2 is live, no slot free.
        assert rig.entry.clients() == [2]
        assert rig.create(3) == SmcReturn.ENOTAVAIL
        hold_gate.set()
        return orig_shutdown()

    part.gp.shutdown = shutdown  # type: ignore[method-assign]
    start = time.monotonic()
    assert rig.destroy(1) == SmcReturn.OK
    t.join(1.0)
    assert not t.is_alive() and time.monotonic() - start < 1.0
    assert hold_gate.is_set()
    reply = res[0]
    assert isinstance(reply, OpteeReply)
    assert (reply.ret, reply.ret_origin) == (COMM, COMMS)
    assert TagTA.entries == entries  # no close, no destroy entry
    assert rig.entry.leaks() == {"optee partitions": 1}
    sid2 = rig.open(2, tag=5).session  # guest 2 unaffected
    assert rig.tag(2, sid2).outs[0].a == 5
    assert rig.close(2, sid2).ret == OK
    assert rig.create(3) == SmcReturn.OK  # the drained slot is free again
    assert rig.entry.clients() == [2, 3]


# ----------------------------------------------------------------------------- records


def _msgs() -> list[OpteeMsg]:
    u = uuid.uuid4().bytes
    return [
        OpteeMsg(
            cmd=C.OPTEE_MSG_CMD_OPEN_SESSION,
            cancel_id=9,
            uuid=u,
            clnt_uuid=bytes(range(16)),
            login=0x8000_0000,
            params=(
                MsgParam.value(A.OPTEE_MSG_ATTR_TYPE_VALUE_INOUT, 1, 2, 3),
                MsgParam.tmem(A.OPTEE_MSG_ATTR_TYPE_TMEM_INOUT, 0x4000_1000, 100, 7),
            ),
        ),
        OpteeMsg(
            cmd=C.OPTEE_MSG_CMD_INVOKE_COMMAND,
            func=0xFFFF_FFFF,
            session=3,
            params=(
                MsgParam(attr=A.OPTEE_MSG_ATTR_TYPE_NONE),
                MsgParam.rmem(A.OPTEE_MSG_ATTR_TYPE_RMEM_OUTPUT, 0xABC, 16, 32),
                MsgParam.value(A.OPTEE_MSG_ATTR_TYPE_VALUE_OUTPUT),
            ),
        ),
        OpteeMsg(cmd=C.OPTEE_MSG_CMD_CLOSE_SESSION, session=2),
        OpteeMsg(cmd=C.OPTEE_MSG_CMD_CANCEL, session=2, cancel_id=5),
    ]


@pytest.mark.parametrize("msg", _msgs(), ids=lambda m: C(m.cmd).name)
def test_record_codec_round_trip(msg: OpteeMsg) -> None:
    """§2: OPEN_SESSION carries two META value params (TA UUID, client UUID + login)
    first; every message decodes to the record it was encoded from."""
    raw = encode_msg(msg)
    assert len(raw) == msg.size == arg_size(len(msg.params) + (2 if msg.cmd == 0 else 0))
    assert decode_msg(raw) == msg
    if msg.cmd == C.OPTEE_MSG_CMD_OPEN_SESSION:
        attr0, a, b, _ = struct.unpack_from("<4Q", raw, MSG_HEADER_SIZE)
        assert attr0 == OPTEE_MSG_ATTR_META | 1
        assert a.to_bytes(8, "little") + b.to_bytes(8, "little") == msg.uuid


def test_reply_touches_only_whitelisted_fields() -> None:
    """§6.2 (Xen): only ret, ret_origin, session, output values and output memref sizes
    are copied back; every other byte of the page stays as it was."""
    msg = _msgs()[1]
    outs = (
        msg.params[0],
        MsgParam.rmem(A.OPTEE_MSG_ATTR_TYPE_RMEM_OUTPUT, 0xABC, 16, 5),
        MsgParam.value(A.OPTEE_MSG_ATTR_TYPE_VALUE_OUTPUT, 7, 8, 9),
    )
    reply = OpteeReply(ret=0xFFFF0010, ret_origin=4, session=3, outs=outs)
    page = bytearray(b"\xee" * msg.size)
    before = bytes(page)
    write_reply(page, msg, reply)
    changed = {i for i in range(len(page)) if page[i] != before[i]}
    allowed: set[int] = set()
    for off, data in reply_patches(msg, reply):
        allowed |= set(range(off, off + len(data)))
    assert changed <= allowed
    assert read_reply(page, msg) == reply
    assert max(allowed) < msg.size and 0 not in allowed  # cmd is never written


def test_records_refuse_bad_fields() -> None:
    """HABITS: records are validated when built (UsageError names the field)."""
    with pytest.raises(UsageError):
        MsgParam(attr=4)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        MsgParam.value(A.OPTEE_MSG_ATTR_TYPE_VALUE_INPUT, -1)
    with pytest.raises(UsageError):
        MsgParam.tmem(A.OPTEE_MSG_ATTR_TYPE_VALUE_INPUT, 0, 0)
    with pytest.raises(UsageError):
        MsgParam.rmem(A.OPTEE_MSG_ATTR_TYPE_RMEM_INPUT, 1, 2**64 - 1, 2)
    with pytest.raises(UsageError):
        OpteeMsg(cmd=C.OPTEE_MSG_CMD_INVOKE_COMMAND, uuid=b"short")
    with pytest.raises(UsageError):
        OpteeMsg(cmd=C.OPTEE_MSG_CMD_INVOKE_COMMAND, login=1)  # OPEN_SESSION's only
    with pytest.raises(UsageError):
        OpteeMsg(cmd=1, params=(MsgParam.value(1),) * (MSG_MAX_PARAMS + 1))
    with pytest.raises(UsageError):
        OpteeReply(ret=2**32, ret_origin=0)
    msg = _msgs()[2]
    with pytest.raises(UsageError):  # outs must match the message's params
        write_reply(
            bytearray(msg.size), msg, OpteeReply(ret=0, ret_origin=0, outs=_msgs()[1].params)
        )


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_decoder_raises_only_decode_error(data: bytes) -> None:
    """HABITS test 4: decode succeeds or raises DecodeError, on whole and cut messages."""
    raws: list[bytes] = [data, *(bytes(encode_msg(m)[: len(data) % 200]) for m in _msgs())]
    for raw in raws:
        try:
            msg = decode_msg(raw)
        except DecodeError:
            continue
        assert decode_msg(encode_msg(msg)) == msg


# ----------------------------------------------------------------------------- shutdown


def _runtime() -> tuple[GpRuntime, SecureWorld]:
    world = SecureWorld(QteeRoot())
    return GpRuntime(world), world


def _open(rt: GpRuntime, tag: int = 1) -> int:
    sid, ret, _ = rt.open_session(TA_UUID, 0, bytes(16), VI, [GpParam(VI, a=tag)], owner="me")
    assert ret == OK
    return sid


def test_shutdown_drops_everything_without_ta_entries() -> None:
    """§6.1 (the model runs no TA entry on VM destroy): sessions and instances go, their
    ids leave the world's table, later calls answer COMMUNICATION/COMMS; idempotent."""
    rt, world = _runtime()
    sids = [_open(rt, n) for n in range(3)]
    before = list(TagTA.entries)
    assert rt.shutdown() == {"sessions": 3, "instances": 3}
    assert TagTA.entries == before
    assert rt.live() == {"sessions": 0, "instances": 0}
    assert world.live_ids() == []
    assert rt.closed
    assert rt.invoke(sids[0], TAG, VO, [GpParam(VO)], owner="me") == (COMM, COMMS)
    assert rt.open_session(TA_UUID, 0, bytes(16), 0, [], owner="me") == (0, COMM, COMMS)
    assert rt.close_session(sids[1], owner="me") == COMM
    assert rt.cancel(sids[2], owner="me") == COMM
    rt.close_owner("me")
    assert rt.shutdown() == {"sessions": 0, "instances": 0}


def test_shutdown_wakes_waits_and_waiters() -> None:
    """§2 cancellation, §6.1 NOTIF_EVENT_SHUTDOWN: a TA in TEE_Wait(INFINITE) sees
    TEE_ERROR_CANCEL at once; a caller queued behind it on the same session gives up;
    both calls answer COMMUNICATION/COMMS and nothing is left behind."""
    rt, world = _runtime()
    sid = _open(rt)
    t1, r1 = _in_thread(lambda: rt.invoke(sid, WAIT, 0, [], owner="me"))
    assert TagTA.entered.wait(5)
    t2, r2 = _in_thread(lambda: rt.invoke(sid, TAG, VO, [GpParam(VO)], owner="me"))
    time.sleep(0.05)  # t2 waits for the session
    start = time.monotonic()
    rt.shutdown()
    t1.join(1)
    t2.join(1)
    assert time.monotonic() - start < 1.0
    assert r1 == [(COMM, COMMS)] and r2 == [(COMM, COMMS)]
    assert rt.live() == {"sessions": 0, "instances": 0}
    assert world.live_ids() == []
    assert TagTA.entries.count("invoke") == 1  # t2 never entered the TA


def test_shutdown_drops_a_kept_instance() -> None:
    """§4.1 keep-alive: a single-instance keep-alive TA outlives its sessions; shutdown
    drops it too (without its destroy entry)."""
    from qtee.gp import TaFlag

    class Kept(TagTA):
        UUID = uuid.UUID("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f1")
        FLAGS = TaFlag.TA_FLAG_SINGLE_INSTANCE | TaFlag.TA_FLAG_INSTANCE_KEEP_ALIVE

    register_gp_ta(Kept)
    try:
        rt, _world = _runtime()
        sid, ret, _ = rt.open_session(Kept.UUID, 0, bytes(16), VI, [GpParam(VI)], owner=1)
        assert ret == OK and rt.close_session(sid, owner=1) == OK
        assert rt.live() == {"sessions": 0, "instances": 1}
        assert rt.shutdown()["instances"] == 1
        assert rt.live() == {"sessions": 0, "instances": 0}
        assert "destroy" not in TagTA.entries
        assert not rt.unload(Kept.UUID)
    finally:
        unregister_gp_ta(Kept.UUID)
