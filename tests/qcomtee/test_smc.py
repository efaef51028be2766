"""The driver's SMC boundary (qtee-kernel.md §3.1 buffers and SMC, §4.1 step 6 the INVOKE ->
callback -> CB_RSP loop and SMC failures, §2.3 RELEASE and CB-object ownership).

The driver reaches QTEE only through ``conduit.smc``; on the host the conduit is the
world's :class:`SecureMonitor`.  These tests watch the registers (``trace_smc``) and put
a failing conduit between the driver and the monitor.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from objects import DriverError, QteeError, UsageError, op, result_to_u32
from qtee import Context, Device, Result, uapi, wire
from qtee._qcomtee.object import QteeObject
from qtee._qcomtee.shm import PhysMemory
from qtee._smc import (
    QCOMTEE_RESULT_INBOUND_REQ_NEEDED,
    OnReturn,
    Regs,
    SmcArgs,
    SmcConduit,
    SmcFid,
    SmcReturn,
    is_smcinvoke,
)
from qtee._tee.shm import PAGE_SIZE
from qtee.addrspace import CheckedMemory
from qtee.secure import NsObject, SecureMonitor, SecureObject, SecureWorld
from tests._helpers import (
    MEM,
    NULL,
    OBJ_IN,
    OBJ_OUT,
    UB_IN,
    UB_OUT,
    USER,
    expect_invoke_errno,
    raw_invoke,
    shm_alloc,
)

INVOKE = SmcFid.QCOM_SCM_SMCINVOKE_INVOKE
CB_RSP = SmcFid.QCOM_SCM_SMCINVOKE_CB_RSP
OUT = wire.MAX_OUTBOUND_BUFFER_SIZE
UNAVAIL = result_to_u32(Result.ERROR_UNAVAIL)
PRIMORDIAL_YIELD = 1


class Probe(SecureObject):
    """A root whose ops make the boundary's cases happen."""

    def __init__(self) -> None:
        self.world: SecureWorld | None = None
        self.kept: NsObject | None = None
        self.seen: list[int] = []  # results of the callbacks this object made

    def attach(self, world: SecureWorld) -> None:
        self.world = world

    def _yield(self) -> None:
        assert self.world is not None
        primordial = NsObject(self.world, wire.QCOMTEE_MSG_OBJECT_PRIMORDIAL)
        primordial.refs = 1 << 30  # static, never released
        res = primordial.invoke(PRIMORDIAL_YIELD)  # served by the driver itself (§2.4)
        self.seen.append(res.result)
        if res.result:
            raise QteeError(res.result)

    @op(0, ib=(None,), ob=(None,))
    def echo(self, data: bytes) -> bytes:
        return data

    @op(1)
    def yield_once(self) -> None:
        self._yield()

    @op(2, io=1)
    def keep_and_yield(self, cb: NsObject) -> None:
        self.kept = cb.retain()
        self._yield()

    @op(3)
    def drop(self) -> None:
        assert self.kept is not None
        self.kept.release()
        self.kept = None

    @op(6, io=1, ob=(None,))
    def map_read(self, mem: NsObject) -> bytes:
        assert self.world is not None
        mapping = self.world.map_region(mem)
        data = bytes(mapping.view[:5])
        mapping.unmap()
        return data


@dataclass
class Rig:
    probe: Probe
    world: SecureWorld
    monitor: SecureMonitor
    dev: Device
    ctx: Context
    mem: CheckedMemory


@pytest.fixture
def rig() -> Iterator[Rig]:
    probe = Probe()
    world = SecureWorld(probe)
    mem = CheckedMemory()
    dev = Device(world, memory=mem)
    ctx = dev.open()
    assert dev.monitor is not None
    yield Rig(probe, world, dev.monitor, dev, ctx, mem)
    ctx.close()


def record(monitor: SecureMonitor) -> list[tuple[int, int | None, Regs]]:
    seen: list[tuple[int, int | None, Regs]] = []
    monitor.trace_smc = lambda cid, fid, regs: seen.append((cid, fid, regs))
    return seen


def test_invoke_with_one_callback_is_invoke_type3_cb_rsp_final(rig: Rig) -> None:
    """§3.1 + §4.1 step 6: INVOKE(in_pa, in_size, out_pa, 4096) with a7 = 0 returns type 3
    (callback request), the driver serves it in this thread and answers CB_RSP(out_pa,
    4096), and the final return is (0, result 0).  Buffers are page aligned."""
    seen = record(rig.monitor)
    head, _ = raw_invoke(rig.ctx, rig.mem, NULL, 1, [])
    assert head.ret == 0 and rig.probe.seen == [0]
    (cid, fid, (in_pa, in_size, out_pa, out_size)) = seen[0]
    assert (cid, fid, in_size, out_size) == (0, INVOKE, len(wire.encode_invoke(1, 1)), OUT)
    assert in_pa % PAGE_SIZE == 0 and out_pa % PAGE_SIZE == 0 and in_pa != out_pa
    assert seen[1:] == [
        (0, None, (QCOMTEE_RESULT_INBOUND_REQ_NEEDED, 0, 0, 0)),
        (0, CB_RSP, (out_pa, OUT, 0, 0)),
        (0, None, (0, 0, 0, 0)),
    ]


def test_inbound_at_in_pa_is_the_byte_exact_message_and_outbound_is_zeroed(rig: Rig) -> None:
    """§3.1, §3.2-3.4: the bytes at in_pa when INVOKE is made are exactly
    ``wire.encode_invoke`` of the call, and the outbound is zero-filled ("QTEE assumes
    unused buffers are zeroed") -- also after a call that left a callback in it."""
    captured: list[tuple[bytes, bytes]] = []

    def capture(cid: int, fid: int | None, regs: Regs) -> None:
        if fid == INVOKE:
            phys = rig.monitor.phys
            captured.append((bytes(phys.view(regs[0], regs[1])), bytes(phys.view(regs[2], OUT))))

    rig.monitor.trace_smc = capture
    data, out = bytearray(b"hello"), bytearray(8)
    params = [uapi.Param(UB_IN, rig.mem.map(data), 5), uapi.Param(UB_OUT, rig.mem.map(out), 8)]
    raw_invoke(rig.ctx, rig.mem, NULL, 1, [])  # leaves a callback message in the page
    head, got = raw_invoke(rig.ctx, rig.mem, NULL, 0, params)
    assert head.ret == 0 and got[1].b == 5 and out[:5] == b"hello"
    assert captured[1] == (bytes(wire.encode_invoke(1, 0, [b"hello"], [8], [], 0)), bytes(OUT))


class Flaky(SmcConduit):
    """A conduit in front of the monitor whose SMCs fail on command."""

    def __init__(self, monitor: SecureMonitor) -> None:
        self.monitor = monitor
        self.fail_invoke = 0  # errno of the INVOKE SMC itself
        self.fail_cb_rsp = 0  # errno of the CB_RSP SMC after a callback was served

    def _smc(self, args: SmcArgs, on_return: OnReturn | None) -> Regs:
        if self.fail_invoke:
            raise DriverError(self.fail_invoke, "INVOKE failed")
        if on_return is not None and self.fail_cb_rsp:
            serve = on_return

            def failing(regs: Regs) -> tuple[int, int, int]:
                serve(regs)  # the driver served the callback...
                raise DriverError(self.fail_cb_rsp, "CB_RSP failed")  # ...its answer did not go

            on_return = failing
        return self.monitor.smc(*args, on_return=on_return)


@pytest.fixture
def flaky() -> Iterator[tuple[Rig, Flaky]]:
    probe = Probe()
    world = SecureWorld(probe)
    monitor = SecureMonitor.of(world)
    conduit = Flaky(monitor)
    mem = CheckedMemory()
    dev = Device(world, memory=mem, conduit=conduit)
    assert dev.conduit is conduit and dev.phys is monitor.phys
    ctx = dev.open()
    yield Rig(probe, world, monitor, dev, ctx, mem), conduit
    ctx.close()


def test_smc_failure_before_the_first_return_is_that_errno_and_drops_cb_inputs(
    flaky: tuple[Rig, Flaky],
) -> None:
    """§4.1 step 6 "SMC failure before first successful SMC return -> that errno (CB inputs
    dropped)", step 7: the user object is dropped without a RELEASE notification, nothing
    is written back, and every table is as before."""
    rig, conduit = flaky
    before = rig.dev.leaks()
    conduit.fail_invoke = errno.ENOMEM
    expect_invoke_errno(errno.ENOMEM, rig.ctx, rig.mem, NULL, 2, [uapi.Param(OBJ_IN, 7, USER)])
    assert rig.probe.kept is None and rig.probe.seen == []
    assert len(rig.dev.ns) == 0 and len(rig.ctx.requests) == 0  # no RELEASE notification
    assert rig.dev.leaks() == before
    assert rig.monitor.phys.lent() == 1  # the device's outbound page; the inbound came back


def test_smc_failure_after_a_callback_is_enodev_and_qtee_keeps_the_cb_objects(
    flaky: tuple[Rig, Flaky],
) -> None:
    """§4.1 step 6 "after -> ENODEV": the CB_RSP after a served callback fails; the ioctl
    fails ENODEV, the secure side saw DEFUNCT for its callback, and the user object stays
    QTEE's (§2.3: "on successful SMC delivery QTEE owns it"), until QTEE releases it."""
    rig, conduit = flaky
    conduit.fail_cb_rsp = errno.EIO
    expect_invoke_errno(errno.ENODEV, rig.ctx, rig.mem, NULL, 2, [uapi.Param(OBJ_IN, 7, USER)])
    assert rig.probe.seen == [Result.ERROR_DEFUNCT]
    assert rig.probe.kept is not None and rig.probe.kept.ns_id in rig.dev.ns
    assert len(rig.dev.ns) == 1 and len(rig.ctx.requests) == 0
    conduit.fail_cb_rsp = 0
    head, _ = raw_invoke(rig.ctx, rig.mem, NULL, 3, [])  # QTEE drops it: async RELEASE
    assert head.ret == 0 and len(rig.dev.ns) == 0
    assert len(rig.ctx.requests) == 1  # now the supplicant hears of it (§2.3 notify)


def test_a_failed_release_smc_frees_the_wrapper(flaky: tuple[Rig, Flaky]) -> None:
    """§2.3: the release work's RELEASE invoke failing (ENODEV) frees the wrapper anyway;
    the ioctl that dropped the last reference still succeeds."""
    rig, conduit = flaky
    ident = rig.world.export(Probe())  # QTEE hands the kernel a reference...
    uid = rig.ctx.objects.insert(QteeObject(rig.dev, ident))  # ...which sits in this fd
    conduit.fail_invoke = errno.ENODEV
    raw_invoke(rig.ctx, rig.mem, uid, 0xFFFF, [])
    assert len(rig.ctx.objects) == 0
    assert rig.world.live_ids() == [ident]  # the RELEASE never reached QTEE
    conduit.fail_invoke = 0
    assert rig.world.release_all() == 1  # QTEE's copy, for the leak check


def test_smc32_function_ids_are_accepted() -> None:
    """§3.1 gives both encodings: INVOKE and CB_RSP with the SMC32 convention work."""
    probe = Probe()
    monitor = SecureMonitor(host_world=SecureWorld(probe))
    phys = monitor.phys
    inbound = wire.encode_invoke(1, 0, [b"abc"], [3])
    outbound = bytearray(OUT)
    in_pa, out_pa = phys.lend(inbound), phys.lend(outbound)
    assert monitor.smc(SmcFid.QCOM_SCM_SMCINVOKE_INVOKE_32, in_pa, len(inbound), out_pa, OUT) == (
        0,
        0,
        0,
        0,
    )
    assert wire.decode_invoke_response(inbound).ob == (b"abc",)

    def answer_ok(regs: Regs) -> tuple[int, int, int]:
        assert regs == (QCOMTEE_RESULT_INBOUND_REQ_NEEDED, 0, 0, 0)
        wire.write_callback_response(outbound, wire.decode_callback(outbound), 0)
        return SmcFid.QCOM_SCM_SMCINVOKE_CB_RSP_32, out_pa, OUT

    phys.take_back(in_pa)
    inbound = wire.encode_invoke(1, 1)
    in_pa = phys.lend(inbound)
    regs = monitor.smc(INVOKE, in_pa, len(inbound), out_pa, OUT, on_return=answer_ok)
    assert regs == (0, 0, 0, 0) and probe.seen == [0]
    phys.take_back(in_pa)
    phys.take_back(out_pa)


@pytest.mark.parametrize(
    "fid",
    [SmcFid.QCOM_SCM_SMCINVOKE_INVOKE_LEGACY, SmcFid.QCOM_SCM_SMCINVOKE_INVOKE_LEGACY_32],
)
def test_invoke_legacy_is_an_unknown_function(fid: int) -> None:
    """§3.1: ``_INVOKE_LEGACY 0x00`` is unused: the call is unknown (a0 = 0xFFFFFFFF)."""
    assert is_smcinvoke(fid)
    assert SecureMonitor().smc(fid) == (SmcReturn.UNKNOWN_FUNCTION, 0, 0, 0)


@pytest.mark.parametrize("answer", ["other buffer", "no on_return", "CB_RSP size"])
def test_a_cb_rsp_for_another_buffer_is_unavail_to_the_ta(answer: str) -> None:
    """Model choice (QK §3.1 is silent): a CB_RSP naming anything but the call's outbound
    buffer, or no one to answer, reaches the callback as the NS result UNAVAIL (§3.6)."""
    probe = Probe()
    monitor = SecureMonitor(host_world=SecureWorld(probe))
    phys = monitor.phys
    inbound, outbound = wire.encode_invoke(1, 1), bytearray(OUT)
    in_pa, out_pa = phys.lend(inbound), phys.lend(outbound)

    def wrong(regs: Regs) -> tuple[int, int, int]:
        wire.write_callback_response(outbound, wire.decode_callback(outbound), 0)  # says OK
        if answer == "CB_RSP size":
            return CB_RSP, out_pa, 2 * OUT
        return CB_RSP, out_pa + PAGE_SIZE, OUT

    on_return = None if answer == "no on_return" else wrong
    regs = monitor.smc(INVOKE, in_pa, len(inbound), out_pa, OUT, on_return=on_return)
    assert probe.seen == [Result.ERROR_UNAVAIL]
    assert regs == (0, UNAVAIL, 0, 0)  # the TA raised what it saw
    phys.take_back(in_pa)
    phys.take_back(out_pa)


def test_probe_without_smcinvoke_gets_eio() -> None:
    """§3.1 probe: an INVOKE with all-zero args returning -EIO means no smcinvoke (no
    device); with smcinvoke the same call fails otherwise (EINVAL: no buffers)."""
    with pytest.raises(DriverError) as absent:
        SecureMonitor(smcinvoke=False).smc(INVOKE)
    assert absent.value.errno == errno.EIO
    with pytest.raises(DriverError) as present:
        SecureMonitor().smc(INVOKE)
    assert present.value.errno == errno.EINVAL
    world = SecureWorld(Probe())
    SecureMonitor(host_world=world, smcinvoke=False)
    mem = CheckedMemory()
    dev = Device(world, memory=mem)
    ctx = dev.open()
    expect_invoke_errno(errno.EIO, ctx, mem, NULL, 1, [])
    ctx.close()


def test_cb_rsp_with_nothing_pending_is_einval() -> None:
    """Model choice: a CB_RSP outside a callback (nothing pending) fails the SMC."""
    monitor = SecureMonitor()
    out_pa = monitor.phys.alloc(OUT)
    for fid in (CB_RSP, SmcFid.QCOM_SCM_SMCINVOKE_CB_RSP_32):
        with pytest.raises(DriverError) as exc:
            monitor.smc(fid, out_pa, OUT)
        assert exc.value.errno == errno.EINVAL
    monitor.phys.remove(out_pa)


def test_unmapped_or_misshaped_buffers_fail_einval(rig: Rig) -> None:
    """Model choice: an SMC naming memory that is not there, an outbound that is not
    4096 bytes, or an inbound above 4 MiB (§3.1) fails with EINVAL; nothing runs."""
    monitor = rig.monitor
    inbound = wire.encode_invoke(1, 1)
    in_pa = monitor.phys.lend(inbound)
    out_pa = monitor.phys.alloc(OUT)
    for regs in [
        (in_pa, len(inbound), out_pa + OUT, OUT),
        (in_pa + 3 * PAGE_SIZE, len(inbound), out_pa, OUT),
        (in_pa, len(inbound), out_pa, 2048),
        (in_pa, wire.MAX_INBOUND_BUFFER_SIZE + 1, out_pa, OUT),
    ]:
        with pytest.raises(DriverError) as exc:
            monitor.smc(INVOKE, *regs)
        assert exc.value.errno == errno.EINVAL
    assert rig.probe.seen == []
    # Views of mapped memory that is not a lend work too (exact match not required).
    assert monitor.smc(INVOKE, in_pa, len(inbound), out_pa, OUT) == (0, UNAVAIL, 0, 0)
    monitor.phys.take_back(in_pa)
    monitor.phys.remove(out_pa)


def test_two_host_devices_on_one_world_share_its_physical_memory() -> None:
    """§2.4 MAP_REGION answers a paddr QTEE maps in *its* view of physical memory: with two
    devices on one world, each device's shm maps (the last device built no longer takes
    the world's memory away from the first)."""
    probe = Probe()
    world = SecureWorld(probe)
    mem = CheckedMemory()
    first, second = Device(world, memory=mem), Device(world, memory=mem)
    assert first.phys is second.phys is SecureMonitor.of(world).phys
    assert first.monitor is second.monitor
    for dev, text in [(first, b"first"), (second, b"secnd")]:
        ctx = dev.open()
        shm = shm_alloc(ctx, 64)
        ctx.shm_view(shm)[:5] = text
        out = bytearray(8)
        head, got = raw_invoke(
            ctx, mem, NULL, 6, [uapi.Param(OBJ_IN, shm, MEM), uapi.Param(UB_OUT, mem.map(out), 8)]
        )
        assert head.ret == 0 and out[: got[1].b] == text
        ctx.shm_free(shm)
        ctx.close()
    assert first.leaks() == {} and second.leaks() == {}


def test_a_device_keeps_one_outbound_page_lent_while_a_context_is_open(rig: Rig) -> None:
    """QK §3.1 pool pages: each call's inbound is lent and taken back; the outbound page is
    reused from call to call, and goes back when the last context closes."""
    phys = rig.monitor.phys
    for _ in range(3):
        raw_invoke(rig.ctx, rig.mem, NULL, 1, [])
    assert phys.lent() == 1
    other = rig.dev.open()
    other.close()
    assert phys.lent() == 1  # rig.ctx is still open
    rig.ctx.close()
    assert phys.lent() == 0
    ctx = rig.dev.open()
    raw_invoke(ctx, rig.mem, NULL, 1, [])
    assert phys.lent() == 1
    ctx.close()
    assert phys.lent() == 0
    rig.ctx = rig.dev.open()  # for the fixture's teardown


def test_device_needs_a_host_world_or_a_conduit_and_memory() -> None:
    """A host Device is built on the host's partition (client id 0); a guest's has no
    world, and then needs both its physical memory and its conduit.  (``Device()`` with
    neither is the standard QTEE: tests/test_public_api.py.)"""
    monitor = SecureMonitor()
    with pytest.raises(UsageError):
        Device(phys=monitor.phys)
    with pytest.raises(TypeError):
        Device(phys=monitor.phys, conduit=object())  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        Device(SecureWorld(Probe(), client_id=3))
    with pytest.raises(UsageError):
        Device(monitor.host, phys=PhysMemory())  # not the monitor's memory
    with pytest.raises(TypeError):
        Device(object())  # type: ignore[arg-type]


def test_a_device_without_a_world_reaches_qtee_through_its_conduit_alone() -> None:
    """The driver has no client id and no world of its own: whatever its conduit reaches
    answers (here the monitor itself, so the host partition).  Its leaks are its own."""
    probe = Probe()
    monitor = SecureMonitor(host_world=SecureWorld(probe))
    mem = CheckedMemory()
    dev = Device(memory=mem, phys=monitor.phys, conduit=monitor)
    assert dev.secure_world is None and dev.monitor is None
    with pytest.raises(UsageError):
        dev.world  # noqa: B018 - the property raises
    ctx = dev.open()
    head, _ = raw_invoke(ctx, mem, NULL, 1, [])
    assert head.ret == 0 and probe.seen == [0]
    head, _ = raw_invoke(ctx, mem, NULL, 0, [uapi.Param(OBJ_OUT)])  # wrong shape: INVALID
    assert head.ret == Result.ERROR_INVALID
    ctx.close()
    assert dev.leaks() == {}
