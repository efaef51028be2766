"""OP-TEE guests through the VMM mediator (optee.md §1, §2, §4.3, §6.1, §6.2).

Each guest runs its own OP-TEE driver model (``GuestOpteeDevice``) and the unchanged GP
client API on top; its std calls trap to the VMM's OP-TEE backend, which shadows,
translates, pins and forwards them to OP-TEE's per-guest partitions.  The ``env``
fixture destroys every VM at the end and checks that the VMM, the monitor, OP-TEE's entry
and guest RAM hold nothing (the plugin's leak check covers every guest device as well).
"""

from __future__ import annotations

import errno
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import ClassVar

import pytest

import qtee.vm._optee_backend  # noqa: F401  (registers the "optee" backend)
from objects import DriverError
from qtee import uapi
from qtee._optee.optee_msg import (
    MsgParam,
    OpteeMsg,
    OpteeMsgAttr,
    OpteeMsgCmd,
    OpteeReply,
    encode_msg,
    read_reply,
    reply_patches,
)
from qtee._smc import SmcFid, SmcReturn
from qtee.gp import (
    OpteeTransport,
    TeecContext,
    TeecError,
    TeecMemFlag,
    TeecOperation,
    TeecOrigin,
    TeecParamType,
    TeecRegisteredMemoryReference,
    TeecResult,
    TeecSession,
    TeecTempMemoryReference,
    TeecValue,
    param_types,
)
from qtee.secure import (
    TEE_TIMEOUT_INFINITE,
    GpParam,
    GpSession,
    GpTA,
    GpTaError,
    SecureMonitor,
    register_gp_ta,
    unregister_gp_ta,
)
from qtee.secure._optee_entry import OpteeEntry
from qtee.vm import Guest, GuestOpteeDevice, VmError, VmLimits, Vmm
from qtee.vm._guest_optee import _GuestShm

A = OpteeMsgAttr
C = OpteeMsgCmd
T = TeecParamType
OK = TeecResult.TEEC_SUCCESS
BAD = TeecResult.TEEC_ERROR_BAD_PARAMETERS
OOM = TeecResult.TEEC_ERROR_OUT_OF_MEMORY
COMM = TeecResult.TEEC_ERROR_COMMUNICATION
TEE = TeecOrigin.TEEC_ORIGIN_TEE
COMMS = TeecOrigin.TEEC_ORIGIN_COMMS
API = TeecOrigin.TEEC_ORIGIN_API
INOUT = TeecMemFlag.TEEC_MEM_INPUT | TeecMemFlag.TEEC_MEM_OUTPUT
PAGE = 4096
U32 = 0xFFFF_FFFF

TA_UUID = uuid.UUID("5b9e0e40-2636-11e1-ad9e-0002a5d5c51c")
WHO, ADD, FILL, HOLD, WAIT = range(5)
GREETING = b"hello from the partition"


class GuestTA(GpTA):
    """Multi-instance TA.  WHO: the partition's client id and the open's tag; ADD;
    FILL a memref; HOLD until released (records what it saw); WAIT in TEE_Wait(INFINITE)
    with cancellation unmasked."""

    UUID = TA_UUID
    entered = threading.Event()
    release = threading.Event()
    seen: ClassVar[list[tuple[int, int, bytes]]] = []

    def open_session(self, session: GpSession, types: int, params: list[GpParam]) -> None:
        session.context = params[0].a if params[0].type == 1 else 0

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
        if cmd == WHO:
            params[0].a = session._runtime.world.client_id
            assert isinstance(session.context, int)
            params[0].b = session.context
        elif cmd == ADD:
            params[1].a = (params[0].a + params[0].b) & U32
        elif cmd == FILL:
            buf = params[0].buffer
            if buf is None or params[0].size < len(GREETING):
                params[0].size = len(GREETING)
                raise GpTaError(TeecResult.TEEC_ERROR_SHORT_BUFFER)
            buf[: len(GREETING)] = GREETING
            params[0].size = len(GREETING)
        elif cmd == HOLD:
            data = bytes(params[1].buffer or b"") if params[1].type in (5, 7) else b""
            self.seen.append((params[0].a, params[0].b, data))
            self.entered.set()
            assert self.release.wait(5)
            if params[0].type == 3:
                params[0].a = 0x600D
        elif cmd == WAIT:
            self.unmask_cancellation()
            self.entered.set()
            rc = self.wait(TEE_TIMEOUT_INFINITE)
            if rc:
                raise GpTaError(rc)
        else:
            raise GpTaError(TeecResult.TEEC_ERROR_NOT_SUPPORTED)


class Env:
    def __init__(self, guest_limit: int = 2, threads: int = 8) -> None:
        self.monitor = SecureMonitor()
        self.entry = OpteeEntry(self.monitor, guest_limit=guest_limit, threads=threads)
        self.vmm = Vmm(self.monitor)
        self.contexts: list[TeecContext] = []

    def guest(self, name: str, limits: VmLimits | None = None) -> Guest:
        return self.vmm.create_vm(name, tee="optee", ram_size=4 << 20, limits=limits)

    def teec(self, guest: Guest) -> TeecContext:
        ctx = TeecContext(guest.device)
        self.contexts.append(ctx)
        return ctx

    def close(self) -> None:
        GuestTA.release.set()
        for ctx in self.contexts:
            ctx.finalize()
        guests = self.vmm.guests()
        self.vmm.close()
        assert self.vmm.leaks() == {}
        assert self.entry.leaks() == {}
        assert self.monitor.leaks() == {}
        for g in guests:
            assert g.ram.pinned_pages() == 0


@pytest.fixture(autouse=True)
def guest_ta() -> Iterator[None]:
    register_gp_ta(GuestTA)
    GuestTA.entered.clear()
    GuestTA.release.clear()
    GuestTA.seen = []
    yield
    GuestTA.release.set()
    unregister_gp_ta(TA_UUID)


@pytest.fixture
def env() -> Iterator[Env]:
    e = Env()
    yield e
    e.close()


def _values(*pairs: tuple[int, int] | None) -> TeecOperation:
    types = [T.TEEC_VALUE_INOUT if p is not None else T.TEEC_NONE for p in pairs]
    types += [T.TEEC_NONE] * (4 - len(types))
    return TeecOperation(
        param_types(*types), [TeecValue(*p) if p is not None else None for p in pairs]
    )


def _who(session: TeecSession) -> tuple[int, int]:
    op = _values((0, 0))
    session.invoke_command(WHO, op)
    v = op.params[0]
    assert isinstance(v, TeecValue)
    return v.a, v.b


def _open(ctx: TeecContext, tag: int = 0) -> TeecSession:
    op = TeecOperation(param_types(T.TEEC_VALUE_INPUT, 0, 0, 0), [TeecValue(tag)])
    return ctx.open_session(TA_UUID, operation=op)


def _in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # the test looks at it
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def _raw(guest: Guest, msg: OpteeMsg) -> tuple[int, OpteeReply, int]:
    """A guest kernel that writes its own message and makes the std call itself."""
    page = encode_msg(msg)
    gpa = guest.ram.alloc(len(page))
    try:
        guest.ram.write(gpa, page)
        a0 = guest.smc(SmcFid.OPTEE_SMC_CALL_WITH_ARG, gpa >> 32, gpa & U32)[0]
        return a0, read_reply(guest.ram.read(gpa, len(page)), msg), gpa
    finally:
        guest.ram.free(gpa)


# ----------------------------------------------------------------------------- sessions


def test_gp_client_api_runs_unchanged_in_a_guest(env: Env) -> None:
    """§1, §2, §1.4: TEEC_InitializeContext finds the guest's OP-TEE device; open,
    values, a temporary memref (SHORT_BUFFER first, with the size needed), a registered
    shm and close all work through the mediator, and the TA runs in the guest's own
    partition (client id = the VM's)."""
    g = env.guest("vm1")
    assert isinstance(g.device, GuestOpteeDevice)
    ctx = env.teec(g)
    assert ctx.reg_mem and ctx.memref_null
    with pytest.raises(TeecError) as unknown:  # no LOAD_TA RPC to guests: registered TAs only
        ctx.open_session(uuid.UUID(int=1))
    assert (unknown.value.code, unknown.value.origin) == (
        TeecResult.TEEC_ERROR_ITEM_NOT_FOUND,
        TEE,
    )
    with pytest.raises(DriverError):
        g.device.open_supplicant()
    sess = _open(ctx, tag=7)
    assert _who(sess) == (g.client_id, 7)
    op = _values((40, 2), (0, 0))
    sess.invoke_command(ADD, op)
    assert op.params[1].a == 42  # type: ignore[union-attr]
    small = TeecTempMemoryReference(bytearray(4))
    op = TeecOperation(param_types(T.TEEC_MEMREF_TEMP_OUTPUT, 0, 0, 0), [small])
    with pytest.raises(TeecError) as short:
        sess.invoke_command(FILL, op)
    assert (short.value.code, short.value.origin) == (
        TeecResult.TEEC_ERROR_SHORT_BUFFER,
        TeecOrigin.TEEC_ORIGIN_TRUSTED_APP,
    )
    assert small.size == len(GREETING)
    shm = ctx.allocate_shared_memory(64, INOUT)
    op = TeecOperation(
        param_types(T.TEEC_MEMREF_WHOLE, 0, 0, 0), [TeecRegisteredMemoryReference(shm)]
    )
    sess.invoke_command(FILL, op)
    assert bytes(shm.buffer[: len(GREETING)]) == GREETING
    mine = bytearray(64)
    reg = ctx.register_shared_memory(mine, INOUT)
    op = TeecOperation(
        param_types(T.TEEC_MEMREF_PARTIAL_OUTPUT, 0, 0, 0),
        [TeecRegisteredMemoryReference(reg, 8, 40)],
    )
    sess.invoke_command(FILL, op)
    assert bytes(mine[8 : 8 + len(GREETING)]) == GREETING and not any(mine[:8])
    reg.release()
    shm.release()
    tr = ctx.transport  # SHM_ALLOC: the shm is guest RAM itself, shared with the TA
    assert isinstance(tr, OpteeTransport)
    shm_id, view = tr.shm_alloc(32)
    sid = sess.session_id
    ret, _origin, back = tr.invoke(sid, FILL, 0, [uapi.Param(6, 0, 32, shm_id)])
    assert (ret, back[0].b) == (OK, len(GREETING))
    assert bytes(view[: len(GREETING)]) == GREETING
    tr.shm_free(shm_id)
    sess.close()
    row = env.vmm.rows()[0]
    assert row.tee == "optee" and row.calls_ok > 0 and row.calls_failed == 2
    failed = {k: n for k, n in row.results if k}
    assert failed == {
        TeecResult.TEEC_ERROR_ITEM_NOT_FOUND: 1,
        TeecResult.TEEC_ERROR_SHORT_BUFFER: 1,
    }
    assert row.pinned_now == 0 and row.mappings == 0


def test_sessions_of_two_guests_are_isolated(env: Env) -> None:
    """§2 model note, §4.3, §6.1: each guest's sessions live in its own partition.  The
    same session number in two guests names two sessions; a number only guest A has is
    EINVAL in guest B's driver (libteec: BAD_PARAMETERS, origin COMMS) and, sent raw past
    B's driver, BAD_PARAMETERS with origin TEE from B's partition."""
    a, b = env.guest("a"), env.guest("b")
    ca, cb = env.teec(a), env.teec(b)
    sa, sb = _open(ca, tag=0xA), _open(cb, tag=0xB)
    assert sa.session_id == sb.session_id
    assert _who(sa) == (a.client_id, 0xA)
    assert _who(sb) == (b.client_id, 0xB)
    extra = _open(ca, tag=0xAA)
    only_a = extra.session_id
    assert isinstance(cb.transport, OpteeTransport)
    with pytest.raises(DriverError) as bad:
        cb.transport.invoke(only_a, WHO, 0, [uapi.Param(2, 0, 0, 0)])
    assert bad.value.code == errno.EINVAL
    msg = OpteeMsg(
        cmd=C.OPTEE_MSG_CMD_INVOKE_COMMAND,
        session=only_a,
        params=(MsgParam.value(A.OPTEE_MSG_ATTR_TYPE_VALUE_OUTPUT),),
    )
    a0, reply, _ = _raw(b, msg)
    assert (a0, reply.ret, reply.ret_origin) == (SmcReturn.OK, BAD, TEE)
    close = OpteeMsg(cmd=C.OPTEE_MSG_CMD_CLOSE_SESSION, session=only_a)
    assert _raw(b, close)[1].ret == TeecResult.TEEC_ERROR_ITEM_NOT_FOUND
    assert _who(extra) == (a.client_id, 0xAA)  # A's session untouched
    for s in (sa, sb, extra):
        s.close()


def test_registered_buffers_are_per_guest(env: Env) -> None:
    """§6.2: an RMEM names a buffer by its REGISTER_SHM cookie in the caller's partition
    only; guest B naming guest A's cookie reaches no memory (BAD_PARAMETERS, origin TEE)."""
    a, b = env.guest("a"), env.guest("b")
    ca, cb = env.teec(a), env.teec(b)
    shm = ca.allocate_shared_memory(32, INOUT)
    assert isinstance(a.device, GuestOpteeDevice)
    (ctx_a,) = a.device.contexts
    (registered,) = ctx_a.shms.values()
    handle = registered.handle
    assert isinstance(handle, _GuestShm)
    cookie = handle.cookie
    sb = _open(cb)
    rmem = MsgParam.rmem(A.OPTEE_MSG_ATTR_TYPE_RMEM_OUTPUT, cookie, 0, 32)
    sid = sb.session_id
    msg = OpteeMsg(cmd=C.OPTEE_MSG_CMD_INVOKE_COMMAND, func=FILL, session=sid, params=(rmem,))
    a0, reply, _ = _raw(b, msg)
    assert (a0, reply.ret, reply.ret_origin) == (SmcReturn.OK, BAD, TEE)
    assert not any(shm.buffer)
    sb.close()
    shm.release()


# ----------------------------------------------------------------------------- the mediator


def test_shadow_copy_and_reply_whitelist(env: Env) -> None:
    """§6.2: the message is copied out of guest RAM once -- a guest rewriting its page
    while the call runs changes nothing OP-TEE sees -- and only ret, ret_origin, session,
    output values and output memref sizes are written back to the page."""
    g = env.guest("vm1")
    ctx = env.teec(g)
    sess = _open(ctx)
    msg = OpteeMsg(
        cmd=C.OPTEE_MSG_CMD_INVOKE_COMMAND,
        func=HOLD,
        session=sess.session_id,
        params=(MsgParam.value(A.OPTEE_MSG_ATTR_TYPE_VALUE_INOUT, 0x1111, 0x2222),),
    )
    page = encode_msg(msg)
    gpa = g.ram.alloc(len(page))
    g.ram.write(gpa, page)
    t, res = _in_thread(lambda: g.smc(SmcFid.OPTEE_SMC_CALL_WITH_ARG, gpa >> 32, gpa & U32))
    assert GuestTA.entered.wait(5)
    scribble = b"\xee" * len(page)
    g.ram.write(gpa, scribble)  # mid-call: the guest rewrites everything
    GuestTA.release.set()
    t.join(5)
    assert res == [(SmcReturn.OK, 0, 0, 0)]
    assert GuestTA.seen == [(0x1111, 0x2222, b"")]  # what was there when it was sent
    after = g.ram.read(gpa, len(page))
    g.ram.free(gpa)
    reply = read_reply(after, msg)
    assert (reply.ret, reply.outs[0].a) == (OK, 0x600D)
    allowed: set[int] = set()
    for off, data in reply_patches(msg, reply):
        allowed |= set(range(off, off + len(data)))
    changed = {i for i in range(len(page)) if after[i] != scribble[i]}
    assert changed <= allowed
    sess.close()


def test_raw_message_checks(env: Env) -> None:
    """§6.2: an unaligned arg is EBADADDR; a command outside the six is EBADCMD; a TMEM
    outside guest RAM is BAD_PARAMETERS (origin COMMS) and reaches nothing; a cookie
    registered twice is BAD_PARAMETERS (COMMS); a TMEM inside guest RAM is translated
    and the TA writes the guest's own pages."""
    g = env.guest("vm1")
    ram = g.ram
    gpa = ram.alloc(PAGE)
    call = SmcFid.OPTEE_SMC_CALL_WITH_ARG
    assert g.smc(call, gpa >> 32, (gpa + 16) & U32)[0] == SmcReturn.EBADADDR
    ram.free(gpa)
    assert _raw(g, OpteeMsg(cmd=9))[0] == SmcReturn.EBADCMD
    sess = _open(env.teec(g))
    sid = sess.session_id

    def fill(addr: int, size: int) -> OpteeReply:
        p = MsgParam.tmem(A.OPTEE_MSG_ATTR_TYPE_TMEM_OUTPUT, addr, size)
        msg = OpteeMsg(cmd=C.OPTEE_MSG_CMD_INVOKE_COMMAND, func=FILL, session=sid, params=(p,))
        return _raw(g, msg)[1]

    outside = fill(ram.base + ram.size, 64)
    assert (outside.ret, outside.ret_origin) == (BAD, COMMS)
    buf = ram.alloc(PAGE)
    inside = fill(buf + 100, 64)
    assert (inside.ret, inside.outs[0].size) == (OK, len(GREETING))
    assert ram.read(buf + 100, len(GREETING)) == GREETING
    reg = OpteeMsg(
        cmd=C.OPTEE_MSG_CMD_REGISTER_SHM,
        params=(MsgParam.tmem(A.OPTEE_MSG_ATTR_TYPE_TMEM_INOUT, buf, PAGE, 0xBEEF),),
    )
    assert _raw(g, reg)[1].ret == OK
    assert ram.pinned_pages() == 1  # kept until UNREGISTER_SHM
    again = _raw(g, reg)[1]
    assert (again.ret, again.ret_origin) == (BAD, COMMS)
    unreg = OpteeMsg(
        cmd=C.OPTEE_MSG_CMD_UNREGISTER_SHM,
        params=(MsgParam.rmem(A.OPTEE_MSG_ATTR_TYPE_RMEM_INPUT, 0xBEEF, 0, 0),),
    )
    assert _raw(g, unreg)[1].ret == OK
    assert ram.pinned_pages() == 0
    ram.free(buf)
    sess.close()


def test_guest_fast_calls(env: Env) -> None:
    """§6.1, §6.2: a guest's VM_CREATED/VM_DESTROYED never reach OP-TEE (ENOTAVAIL: the
    hypervisor's calls, whatever a7 the guest sets); GET_THREAD_COUNT and
    EXCHANGE_CAPABILITIES are forwarded with its client id; RETURN_FROM_RPC is ERESUME."""
    g = env.guest("vm1")
    other = env.guest("vm2")
    assert g.smc(SmcFid.OPTEE_SMC_VM_DESTROYED, other.client_id, a7=0)[0] == SmcReturn.ENOTAVAIL
    assert g.smc(SmcFid.OPTEE_SMC_VM_CREATED, 77, a7=0)[0] == SmcReturn.ENOTAVAIL
    assert env.entry.clients() == sorted((g.client_id, other.client_id))
    assert g.smc(SmcFid.OPTEE_SMC_GET_THREAD_COUNT) == (SmcReturn.OK, 8, 0, 0)
    a0, caps, _, _ = g.smc(SmcFid.OPTEE_SMC_EXCHANGE_CAPABILITIES)
    assert a0 == SmcReturn.OK and caps & (1 << 3)
    assert g.smc(SmcFid.OPTEE_SMC_RETURN_FROM_RPC)[0] == SmcReturn.ERESUME
    assert g.smc(0x8400_0000)[0] == SmcReturn.UNKNOWN_FUNCTION


# ----------------------------------------------------------------------------- limits


def test_shm_buffer_count_limit(env: Env) -> None:
    """§6.2 MAX_SHM_BUFFER_COUNT: 16 buffers at once; the 17th registration is refused
    with OUT_OF_MEMORY (origin COMMS in the guest's message; libteec reports its failed
    allocation as OUT_OF_MEMORY), counted as a limit hit; freeing one makes room."""
    g = env.guest("vm1")
    ctx = env.teec(g)
    shms = [ctx.allocate_shared_memory(16, INOUT) for _ in range(16)]
    with pytest.raises(TeecError) as full:
        ctx.allocate_shared_memory(16, INOUT)
    assert (full.value.code, full.value.origin) == (OOM, API)
    buf = g.ram.alloc(PAGE)
    reg = OpteeMsg(
        cmd=C.OPTEE_MSG_CMD_REGISTER_SHM,
        params=(MsgParam.tmem(A.OPTEE_MSG_ATTR_TYPE_TMEM_INOUT, buf, PAGE, 0x5EED),),
    )
    reply = _raw(g, reg)[1]
    assert (reply.ret, reply.ret_origin) == (OOM, COMMS)
    g.ram.free(buf)
    assert env.vmm.rows()[0].limit_hits >= 2
    shms.pop().release()
    shms.append(ctx.allocate_shared_memory(16, INOUT))
    for s in shms:
        s.release()


def test_shm_buffer_size_and_total_limits(env: Env) -> None:
    """§6.2 MAX_SHM_BUFFER_PG 129 pages per buffer (GP's 512 KiB plus one), and the total
    of pinned pages kept below MAX_TOTAL_SMH_BUF_PG (here configured lower): over either,
    OUT_OF_MEMORY and nothing pinned."""
    g = env.guest("vm1", limits=VmLimits(pinned_pages=200))
    ctx = env.teec(g)
    biggest = ctx.allocate_shared_memory(129 * PAGE, INOUT)
    with pytest.raises(TeecError) as too_big:
        ctx.allocate_shared_memory(129 * PAGE + 1, INOUT)
    assert too_big.value.code == OOM
    with pytest.raises(TeecError) as total:
        ctx.allocate_shared_memory(80 * PAGE, INOUT)  # 129 + 80 would reach 200
    assert total.value.code == OOM
    assert g.ram.pinned_pages() == 129
    small = ctx.allocate_shared_memory(60 * PAGE, INOUT)
    small.release()
    biggest.release()
    assert g.ram.pinned_pages() == 0


def test_thread_limit_parks_and_completes(env: Env) -> None:
    """§2, §6.2: over the per-VM call limit the mediator answers ETHREAD_LIMIT; the guest
    driver parks the caller and retries when a call returns, so the client sees no error."""
    g = env.guest("vm1", limits=VmLimits(max_calls=1))
    ctx = env.teec(g)
    sess = _open(ctx)
    hold = _values((1, 2))
    t1, r1 = _in_thread(lambda: sess.invoke_command(HOLD, hold))
    assert GuestTA.entered.wait(5)
    t2, r2 = _in_thread(lambda: _who(sess))
    assert isinstance(g.device, GuestOpteeDevice)
    deadline = time.monotonic() + 5
    while not g.device.port.parked and time.monotonic() < deadline:
        time.sleep(0.005)
    assert g.device.port.parked > 0
    GuestTA.release.set()
    t1.join(5)
    t2.join(5)
    assert r1 == [TeecOrigin.TEEC_ORIGIN_TRUSTED_APP] and r2 == [(g.client_id, 0)]
    assert env.vmm.state(g).stats["limit:calls"] > 0
    sess.close()


def test_cancel_reaches_the_guest_partition(env: Env) -> None:
    """§2 cancel path: TEEC_RequestCancellation on a guest is a CANCEL std call to its own
    partition; a TA waiting in TEE_Wait with cancellation unmasked sees TEE_ERROR_CANCEL."""
    g = env.guest("vm1")
    ctx = env.teec(g)
    sess = _open(ctx)
    op = TeecOperation()
    t, res = _in_thread(lambda: sess.invoke_command(WAIT, op))
    assert GuestTA.entered.wait(5)
    ctx.request_cancellation(op)
    t.join(5)
    err = res[0]
    assert isinstance(err, TeecError)
    assert (err.code, err.origin) == (
        TeecResult.TEEC_ERROR_CANCEL,
        TeecOrigin.TEEC_ORIGIN_TRUSTED_APP,
    )
    sess.close()


# ----------------------------------------------------------------------------- lifecycle


def test_destroy_fails_a_blocked_call_within_a_second(env: Env) -> None:
    """§6.1, §6.2: destroying a VM whose TA waits in TEE_Wait(INFINITE) fails that call
    with COMMUNICATION, origin COMMS, within 1 s; the other guest keeps working during and
    after; the partition, its sessions, its registered buffers and every pin are gone."""
    a, b = env.guest("a"), env.guest("b")
    ca, cb = env.teec(a), env.teec(b)
    sa, sb = _open(ca), _open(cb)
    kept = ca.allocate_shared_memory(PAGE, INOUT)  # registered: pinned until destroy
    assert a.ram.pinned_pages() == 1
    stop = threading.Event()
    counts = [0]

    def loop() -> None:
        while not stop.is_set():
            assert _who(sb) == (b.client_id, 0)
            counts[0] += 1

    tb = threading.Thread(target=loop, daemon=True)
    tb.start()
    ta, ra = _in_thread(lambda: sa.invoke_command(WAIT))
    assert GuestTA.entered.wait(5)
    before = counts[0]
    start = time.monotonic()
    report = env.vmm.destroy_vm(a)
    ta.join(1.0)
    elapsed = time.monotonic() - start
    assert not ta.is_alive() and elapsed < 1.0
    err = ra[0]
    assert isinstance(err, TeecError)
    assert (err.code, err.origin) == (COMM, COMMS)
    assert report.stuck == 0 and report.seconds < 1.0
    assert report.objects_released == 1  # sa's session, dropped without a close entry
    mid = counts[0]
    time.sleep(0.05)
    stop.set()
    tb.join(5)
    assert mid >= before and counts[0] > mid  # B ran during and after
    assert env.entry.partition(a.client_id) is None
    assert env.entry.clients() == [b.client_id]
    assert a.ram.pinned_pages() == 0 and a.device.leaks() == {}
    with pytest.raises(TeecError) as dead:  # the guest's device is gone with its VM
        _who(sa)
    assert dead.value.origin == COMMS
    kept.release()
    sb.close()


def test_third_guest_is_refused_with_a_clear_error(env: Env) -> None:
    """§6.1, §6.2: OP-TEE's guest limit (CFG_VIRT_GUEST_COUNT = 2) makes VM_CREATED of a
    third guest ENOTAVAIL; the VMM fails the creation with VmError(ENODEV) naming the
    refusal, keeps nothing, and a later creation after a destroy works."""
    a = env.guest("a")
    env.guest("b")
    rows = env.vmm.rows()
    with pytest.raises(VmError) as refused:
        env.guest("c")
    assert refused.value.code == errno.ENODEV
    assert refused.value.tee_status == SmcReturn.ENOTAVAIL
    assert "ENOTAVAIL" in str(refused.value) and "guest limit" in str(refused.value)
    assert env.vmm.rows() == rows and len(env.vmm.guests()) == 2
    env.vmm.destroy_vm(a)
    c = env.guest("c")
    assert _who(_open(env.teec(c))) == (c.client_id, 0)


def test_no_optee_leaves_guests_without_one_quietly(caplog: pytest.LogCaptureFixture) -> None:
    """§6.2 (Xen: no mediator -> ENODEV; seed 002: no TEE is no warning): without an OP-TEE
    entry, or with one built without virtualization, the backend's probe finds nothing,
    an optee VM is refused with ENODEV, and nothing at INFO or above is logged."""
    for with_entry in (False, True):
        monitor = SecureMonitor()
        if with_entry:
            OpteeEntry(monitor, virtualization=False)
        with caplog.at_level(logging.DEBUG, logger="qtee"):
            vmm = Vmm(monitor)
            with pytest.raises(VmError) as none:
                vmm.create_vm("vm1", tee="optee")
            quiet = vmm.create_vm("vm2", tee="none")
        assert none.value.code == errno.ENODEV and "optee" in str(none.value)
        assert quiet.device is None
        assert not [r for r in caplog.records if r.levelno >= logging.INFO]
        vmm.close()
        caplog.clear()
