"""The secure monitor's partitions and the model's VM calls (optee.md §6.1, borrowed for
QTEE: qtee-kernel.md has no VM lifecycle, so QTEE_MODEL_VM_CREATED/DESTROYED are the
model's own function ids with OP-TEE's a7 rule and return codes).

Each client id has its own partition (a SecureWorld): the same object id in two VMs
names two objects.  VM_DESTROYED marks a partition closing; it is freed when its last
call leaves (OP §6.1 "frees it when the last reference drops").
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import pytest

from objects import DriverError, QteeError, UsageError, op, result_to_u32
from qtee import Result, wire
from qtee._qcomtee.shm import PhysMemory
from qtee._smc import HYP_CLIENT_ID, OnReturn, Regs, SmcFid, SmcReturn
from qtee.secure import NsObject, SecureMonitor, SecureObject, SecureWorld

CREATED = SmcFid.QTEE_MODEL_VM_CREATED
DESTROYED = SmcFid.QTEE_MODEL_VM_DESTROYED
INVOKE = SmcFid.QCOM_SCM_SMCINVOKE_INVOKE
CB_RSP = SmcFid.QCOM_SCM_SMCINVOKE_CB_RSP
OUT = wire.MAX_OUTBOUND_BUFFER_SIZE
OK = (SmcReturn.OK, 0, 0, 0)
ENOTAVAIL = (SmcReturn.ENOTAVAIL, 0, 0, 0)
DEFUNCT = result_to_u32(Result.ERROR_DEFUNCT)


class Thing(SecureObject):
    """An exported object that says which partition made it."""

    released: ClassVar[list[int]] = []

    def __init__(self, client_id: int) -> None:
        self.client_id = client_id

    @op(0, ob=(4,))
    def whoami(self) -> bytes:
        return self.client_id.to_bytes(4, "little")

    def on_release(self) -> None:
        Thing.released.append(self.client_id)


class Root(SecureObject):
    """A partition's root: makes Things, and can hold a call open on an event."""

    def __init__(self) -> None:
        self.world: SecureWorld | None = None
        self.entered = threading.Event()
        self.leave = threading.Event()
        self.seen: list[int] = []

    def attach(self, world: SecureWorld) -> None:
        self.world = world

    @op(0, oo=1)
    def make(self) -> SecureObject:
        assert self.world is not None
        return Thing(self.world.client_id)

    @op(1)
    def call_back_after_leave(self) -> None:
        """Blocks until told, then calls the primordial object (a callback)."""
        assert self.world is not None
        self.entered.set()
        assert self.leave.wait(5)
        primordial = NsObject(self.world, wire.QCOMTEE_MSG_OBJECT_PRIMORDIAL)
        primordial.refs = 1 << 30
        res = primordial.invoke(1)
        self.seen.append(res.result)
        if res.result:
            raise QteeError(res.result)


@dataclass
class Rig:
    monitor: SecureMonitor


@pytest.fixture
def rig() -> Iterator[Rig]:
    monitor = SecureMonitor(Root, guest_limit=2)
    Thing.released = []
    yield Rig(monitor)
    for cid in monitor.clients():
        assert monitor.smc(DESTROYED, cid) == OK


def invoke(
    monitor: SecureMonitor,
    cid: int,
    inbound: bytearray,
    on_return: OnReturn | None = None,
) -> tuple[Regs, bytearray]:
    """One INVOKE as client ``cid`` on lent buffers; the final regs and the outbound."""
    phys = monitor.phys
    outbound = bytearray(OUT)
    in_pa, out_pa = phys.lend(inbound), phys.lend(outbound)
    try:
        return monitor.smc(INVOKE, in_pa, len(inbound), out_pa, OUT, a7=cid, on_return=on_return), (
            outbound
        )
    finally:
        phys.take_back(in_pa)
        phys.take_back(out_pa)


def make_thing(monitor: SecureMonitor, cid: int) -> int:
    inbound = wire.encode_invoke(wire.QCOMTEE_MSG_OBJECT_ROOT, 0, n_oo=1)
    regs, _ = invoke(monitor, cid, inbound)
    assert regs == (0, 0, 0, 0)
    (ident,) = wire.decode_invoke_response(inbound).oo
    return int(ident)


def whoami(monitor: SecureMonitor, cid: int, ident: int) -> tuple[int, int]:
    """(result, client id the object says it belongs to, or -1)."""
    inbound = wire.encode_invoke(ident, 0, ob=[4])
    regs, _ = invoke(monitor, cid, inbound)
    if regs[1]:
        return regs[1], -1
    return 0, int.from_bytes(wire.decode_invoke_response(inbound).ob[0], "little")


# ---------------------------------------------------------------------- VM calls
def test_vm_created_follows_optee_rules(rig: Rig) -> None:
    """OP §6.1: a1 = client id, a7 must be 0 (hypervisor only), client id 0 refused, and
    past the guest limit (CFG_VIRT_GUEST_COUNT, here 2) -> ENOTAVAIL; nothing is made."""
    m = rig.monitor
    assert m.smc(CREATED, 5, a7=3) == ENOTAVAIL  # a guest cannot announce a VM
    assert m.smc(CREATED, 0) == ENOTAVAIL  # 0 is the hypervisor's
    assert m.smc(CREATED, 0x1_0000) == ENOTAVAIL  # guest ids are 16-bit (OP §6.2)
    assert m.clients() == []
    assert m.smc(CREATED, 1) == OK
    assert m.smc(CREATED, 1) == ENOTAVAIL  # already there
    assert m.smc(CREATED, 7) == OK
    assert m.smc(CREATED, 9) == ENOTAVAIL  # guest N+1
    assert m.clients() == [1, 7]
    assert m.partition(1) is not m.partition(7) and m.partition(9) is None
    assert m.partition(0) is m.host and m.host.client_id == HYP_CLIENT_ID
    part = m.partition(1)
    assert part is not None and part.client_id == 1 and part.monitor is m
    assert part.phys is m.phys
    assert m.leaks() == {"guest partitions": 2}


def test_vm_destroyed_rules_and_unknown_id_is_ok_with_a_debug_log(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """OP §6.1: VM_DESTROYED also needs a7 = 0 and refuses id 0; an unknown id "is logged
    and still returns OK" (DEBUG: not worth a warning)."""
    m = rig.monitor
    assert m.smc(CREATED, 4) == OK
    assert m.smc(DESTROYED, 4, a7=4) == ENOTAVAIL
    assert m.smc(DESTROYED, 0) == ENOTAVAIL
    assert m.clients() == [4]
    with caplog.at_level(logging.DEBUG, logger="qtee.secure.monitor"):
        assert m.smc(DESTROYED, 33) == OK
    assert [(r.levelno, r.name) for r in caplog.records] == [(logging.DEBUG, "qtee.secure.monitor")]
    assert "33" in caplog.records[0].getMessage()
    assert m.smc(DESTROYED, 4) == OK
    assert m.clients() == [] and m.leaks() == {}
    assert m.smc(CREATED, 4) == OK  # the slot is free again


def test_without_virtualization_the_vm_calls_are_unknown() -> None:
    """The way Xen probes (OP §6.2): VM_DESTROYED(0) answering UNKNOWN_FUNCTION means the
    TEE has no VM support; the same for a QTEE without smcinvoke at all."""
    unknown = (SmcReturn.UNKNOWN_FUNCTION, 0, 0, 0)
    for m in (SecureMonitor(virtualization=False), SecureMonitor(smcinvoke=False)):
        if m.smcinvoke:
            assert m.smc(DESTROYED, 0) == unknown
            assert m.smc(CREATED, 1) == unknown
        else:
            with pytest.raises(DriverError) as exc:
                m.smc(CREATED, 1)
            assert exc.value.errno == errno.EIO
        assert m.clients() == []
    assert SecureMonitor().smc(DESTROYED, 0) == ENOTAVAIL  # present: not UNKNOWN_FUNCTION


def test_invoke_for_a_client_id_never_created_is_enodev(rig: Rig) -> None:
    """Model choice: an INVOKE whose a7 names no partition fails the SMC (ENODEV)."""
    with pytest.raises(DriverError) as exc:
        invoke(rig.monitor, 12, wire.encode_invoke(1, 0, n_oo=1))
    assert exc.value.errno == errno.ENODEV
    assert rig.monitor.phys.lent() == 0


# ---------------------------------------------------------------------- partitions
def test_the_same_id_in_two_partitions_names_two_objects(rig: Rig) -> None:
    """Per-VM namespaces: each partition hands out ids from 2 (QK §2.2), so id 2 exists in
    both guests and names each guest's own object; the host has no id 2 (BADOBJ)."""
    m = rig.monitor
    assert m.smc(CREATED, 1) == OK and m.smc(CREATED, 2) == OK
    a, b = make_thing(m, 1), make_thing(m, 2)
    assert a == b == 2
    assert whoami(m, 1, 2) == (0, 1)
    assert whoami(m, 2, 2) == (0, 2)
    assert whoami(m, 0, 2) == (result_to_u32(Result.ERROR_BADOBJ), -1)
    assert m.leaks() == {
        "guest partitions": 2,
        "partition 1 secure objects": 1,
        "partition 2 secure objects": 1,
    }


def test_destroy_releases_every_object_of_the_partition_and_nothing_else(rig: Rig) -> None:
    """OP §6.1 VM_DESTROYED frees the partition: every object it exported is released
    (no TA entry point runs); the other guest and the host keep theirs."""
    m = rig.monitor
    assert m.smc(CREATED, 1) == OK and m.smc(CREATED, 2) == OK
    for _ in range(3):
        make_thing(m, 1)
    make_thing(m, 2)
    host_thing = m.host.export(Thing(0))
    part = m.partition(1)
    assert part is not None
    assert m.smc(DESTROYED, 1) == OK
    assert Thing.released == [1, 1, 1]
    assert part.live_ids() == [] and part.closing and m.partition(1) is None
    assert whoami(m, 2, 2) == (0, 2) and m.host.live_ids() == [host_thing]
    assert m.host.release_all() == 1


def test_destroy_with_a_call_in_flight_defers_release_and_defuncts_callbacks(rig: Rig) -> None:
    """OP §6.1 "freed when the last reference drops": VM_DESTROYED during a call marks the
    partition closing at once (new calls are answered DEFUNCT, the id cannot be created
    again yet) and releases its objects only when that call leaves; a callback the
    closing partition makes gets DEFUNCT without reaching the guest (issue 7)."""
    m = rig.monitor
    assert m.smc(CREATED, 1) == OK
    make_thing(m, 1)
    part = m.partition(1)
    assert part is not None
    root = part.root
    assert isinstance(root, Root)
    served: list[Regs] = []

    def guest_serves(regs: Regs) -> tuple[int, int, int]:
        served.append(regs)
        raise AssertionError("a closing partition must not call back")

    result: list[Regs] = []
    t = threading.Thread(
        target=lambda: result.append(invoke(m, 1, wire.encode_invoke(1, 1), guest_serves)[0])
    )
    t.start()
    assert root.entered.wait(5)
    assert m.calls_in_flight(1) == 1
    assert m.smc(DESTROYED, 1) == OK
    assert m.partition(1) is None and m.clients() == [] and part.closing
    assert part.live_ids() == [2] and Thing.released == []  # deferred
    assert invoke(m, 1, wire.encode_invoke(2, 0, ob=[4]))[0] == (0, DEFUNCT, 0, 0)
    assert m.smc(CREATED, 1) == ENOTAVAIL  # still draining
    assert m.leaks() == {
        "guest partitions": 1,
        "partition 1 secure objects": 1,
        "partition 1 calls in flight": 1,
    }
    root.leave.set()
    t.join(5)
    assert not t.is_alive()
    assert result == [(0, DEFUNCT, 0, 0)] and root.seen == [Result.ERROR_DEFUNCT]
    assert served == []
    assert part.live_ids() == [] and Thing.released == [1]
    assert m.leaks() == {} and m.calls_in_flight(1) == 0
    assert m.smc(CREATED, 1) == OK


def test_destroy_racing_many_calls_frees_the_partition_once_after_the_last(rig: Rig) -> None:
    """The in-flight count is lock-free: with 6 threads calling into a partition while
    VM_DESTROYED arrives, every call answers 0 (before), DEFUNCT (closing) or fails
    ENODEV (freed), no call runs in a released partition, and its objects are released
    exactly once, after the last call left (OP §6.1).  20 rounds, bounded in time."""
    m = rig.monitor
    for _ in range(20):
        Thing.released = []
        assert m.smc(CREATED, 1) == OK
        ident = make_thing(m, 1)
        part = m.partition(1)
        assert part is not None
        answers: list[tuple[int, int]] = []
        stop = threading.Event()

        def caller(
            stop: threading.Event = stop,
            ident: int = ident,
            answers: list[tuple[int, int]] = answers,
        ) -> None:
            while not stop.is_set():
                try:
                    got = whoami(m, 1, ident)
                except DriverError as exc:
                    got = (-exc.errno, -1)
                answers.append(got)
                if got[0]:
                    return

        threads = [threading.Thread(target=caller) for _ in range(6)]
        for t in threads:
            t.start()
        while len(answers) < 30:
            threading.Event().wait(0.0005)
        assert m.smc(DESTROYED, 1) == OK
        stop.set()
        for t in threads:
            t.join(5)
            assert not t.is_alive()
        assert set(answers) <= {(0, 1), (DEFUNCT, -1), (-errno.ENODEV, -1)}
        assert answers.count((0, 1)) >= 30
        assert Thing.released == [1]  # once, and only once no call was in it
        assert part.live_ids() == [] and m.calls_in_flight(1) == 0
        assert m.leaks() == {} and m.partition(1) is None


def test_an_on_return_that_raises_abandons_the_call(rig: Rig) -> None:
    """The caller could not make its CB_RSP: the secure side sees DEFUNCT for that
    callback, runs to its end, and the caller's exception comes out of ``smc``."""
    m = rig.monitor
    assert m.smc(CREATED, 3) == OK
    part = m.partition(3)
    assert part is not None and isinstance(part.root, Root)
    part.root.leave.set()

    def gone(regs: Regs) -> tuple[int, int, int]:
        raise DriverError(errno.ENODEV, "the guest is gone")

    with pytest.raises(DriverError) as exc:
        invoke(m, 3, wire.encode_invoke(1, 1), gone)
    assert exc.value.errno == errno.ENODEV
    assert part.root.seen == [Result.ERROR_DEFUNCT]
    assert m.calls_in_flight(3) == 0 and m.phys.lent() == 0


def test_release_all_runs_no_entry_point_and_clears_the_queues() -> None:
    """release_all (VM destroyed): each object's last reference goes, retained counts and
    queued async releases are forgotten, the GP runtime is shut down; a second call
    finds nothing; from inside a call it is refused."""
    world = SecureWorld(Root())
    shut: list[bool] = []

    class Gp:
        def shutdown(self) -> None:
            shut.append(True)

    world.gp = Gp()  # type: ignore[attr-defined]
    Thing.released = []
    a = world.export(Thing(5))
    world.export(Thing(6))
    inbound, outbound = wire.encode_invoke(a, wire.QCOMTEE_MSG_OBJECT_OP_RETAIN), bytearray(OUT)
    assert world.invoke(inbound, outbound, lambda out: None) == 0  # a retained count
    NsObject(world, 0x8000_0007).release()  # queues an async RELEASE
    assert world.pending_releases() == [0x8000_0007]
    assert world.release_all() == 2
    assert sorted(Thing.released) == [5, 6] and shut == [True]
    assert world.live_ids() == [] and world.pending_releases() == [] and world.closing
    assert world.release_all() == 0 and shut == [True, True]

    inner: list[BaseException] = []

    class SelfDestruct(SecureObject):
        @op(0)
        def boom(self) -> None:
            try:
                world.release_all()
            except UsageError as exc:
                inner.append(exc)

    b = world.export(SelfDestruct())
    assert world.invoke(wire.encode_invoke(b, 0), bytearray(OUT), lambda out: None) == 0
    assert len(inner) == 1 and world.live_ids() == [b]
    world.release_all()


# ---------------------------------------------------------------------- services, of()
def test_add_service_routes_fids_and_refuses_taken_ones(rig: Rig) -> None:
    """The OP-TEE entry registers its own fids (OP §6.1); the monitor's own ids and ones
    already routed are refused, and a refused call adds nothing."""
    m = rig.monitor
    calls: list[tuple[int, ...]] = []

    def handler(
        fid: int, a1: int, a2: int, a3: int, a4: int, a5: int, a6: int, a7: int, on_return: object
    ) -> Regs:
        calls.append((fid, a1, a2, a3, a4, a5, a6, a7, on_return is None))
        return (SmcReturn.OK, 8, 0, 0)

    fids = [SmcFid.OPTEE_SMC_GET_THREAD_COUNT, SmcFid.OPTEE_SMC_VM_CREATED]
    m.add_service(fids, handler)
    assert m.smc(SmcFid.OPTEE_SMC_GET_THREAD_COUNT, 1, 2, 3, 4, 5, 6, 7) == (0, 8, 0, 0)
    assert calls == [(SmcFid.OPTEE_SMC_GET_THREAD_COUNT, 1, 2, 3, 4, 5, 6, 7, True)]
    for taken in ([SmcFid.OPTEE_SMC_VM_CREATED], [CREATED], [INVOKE], [CB_RSP]):
        with pytest.raises(UsageError):
            m.add_service([SmcFid.OPTEE_SMC_EXCHANGE_CAPABILITIES, *taken], handler)
    assert m.smc(SmcFid.OPTEE_SMC_EXCHANGE_CAPABILITIES) == (SmcReturn.UNKNOWN_FUNCTION, 0, 0, 0)
    with pytest.raises(UsageError):
        m.add_service([1 << 32], handler)
    with pytest.raises(TypeError):
        m.add_service([0xB2000001], "not callable")  # type: ignore[arg-type]


def test_registers_must_be_64_bit_values(rig: Rig) -> None:
    """A register is an unsigned 64-bit value; anything else is the caller's error."""
    for bad in (-1, 1 << 64):
        with pytest.raises(UsageError):
            rig.monitor.smc(CREATED, bad)
        with pytest.raises(UsageError):
            rig.monitor.smc(SmcFid.OPTEE_SMC_GET_THREAD_COUNT, a7=bad)
    with pytest.raises(UsageError):
        rig.monitor.smc(CREATED, "1")  # type: ignore[arg-type]
    assert rig.monitor.clients() == []


def test_of_finds_or_makes_the_one_monitor_of_a_world() -> None:
    """SecureMonitor.of: one monitor per world, made on first use with the given memory;
    a different memory later, or a second monitor on a world, is refused."""
    world = SecureWorld(Root())
    phys = PhysMemory()
    m = SecureMonitor.of(world, phys)
    assert m.host is world and m.phys is phys and world.monitor is m and world.phys is phys
    assert SecureMonitor.of(world) is m and SecureMonitor.of(world, phys) is m
    with pytest.raises(UsageError):
        SecureMonitor.of(world, PhysMemory())
    with pytest.raises(UsageError):
        SecureMonitor(host_world=world)
    with pytest.raises(UsageError):
        SecureMonitor(host_world=SecureWorld(Root(), client_id=2))
    with pytest.raises(UsageError):
        SecureMonitor(guest_limit=-1)
    with pytest.raises(TypeError):
        SecureMonitor.of(object())  # type: ignore[arg-type]


def test_trace_shows_the_vm_calls_with_their_client_ids(rig: Rig) -> None:
    """trace_smc sees every call with its a7 and every return."""
    m = rig.monitor
    seen: list[tuple[int, int | None, Regs]] = []
    m.trace_smc = lambda cid, fid, regs: seen.append((cid, fid, regs))
    m.smc(CREATED, 6)
    m.smc(CREATED, 8, a7=6)
    assert seen == [
        (0, CREATED, (6, 0, 0, 0)),
        (0, None, OK),
        (6, CREATED, (8, 0, 0, 0)),
        (6, None, ENOTAVAIL),
    ]
