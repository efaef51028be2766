"""Random guest operations never reach a capability the guest was not given.

A Hypothesis state machine (HABITS tests 1 and 9; Cap'n Proto's RPC fuzzer) over the host
and two QTEE guests, each with a client and VmTA loaded.  Rules: mint and read a vault,
invoke its own objects, call back and round-trip a callback object, release, use an id
copied from another actor, use another actor's shm id, forge wire ids 2..64 in a raw
inbound, answer MAP_REGION with an address of the guest's choosing, return an object from
a callback, and destroy a guest.

Invariants, one sentence each:

1. Every vault secret an actor reads was minted in that actor's own partition.
2. Every callback an actor's object serves came from that actor's own partition.
3. Every SMC that reached the monitor on a guest's behalf carried a7 = that guest's
   client id, and every other one a7 = 0.
4. Nothing an actor does changes another actor's secure objects.
5. Every operation of a destroyed guest fails (DEFUNCT, ENODEV or EBADF).
6. Teardown leaves every partition, pin and table empty.

Specs: optee.md §6.1-§6.3 (per-VM partitions, client id in a7, translate and pin),
qtee-kernel.md §2.2 (ids per context), §2.4 (MAP_REGION), §3.6 (results).
"""

from __future__ import annotations

import errno
import struct
import threading
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from objects import DriverError, QteeError
from qtee import OUT_OBJECT, Device, ObjRef, Out, Result, uapi, wire
from qtee._qcomtee.primordial_obj import Primordial
from qtee._smc import SmcFid
from qtee.secure import SecureMonitor
from qtee.vm import Guest, Vmm
from tests._helpers import MEM, OBJ_IN, raw_invoke
from tests._vm_helpers import TA_NAME, U32, App, Recorder, VmTA, open_app
from tests.vm.test_vm_qtee import RoguePrimordial, Smuggler

pytestmark = [pytest.mark.qtee_ta(TA_NAME, VmTA), pytest.mark.timeout(120)]

ACTORS = ("host", "vm1", "vm2")
GUESTS = ("vm1", "vm2")
OUT = 4096
DEFUNCT = Result.ERROR_DEFUNCT


def gone(exc: BaseException) -> bool:
    if isinstance(exc, QteeError):
        return exc.result == DEFUNCT
    return isinstance(exc, DriverError) and exc.errno in (errno.ENODEV, errno.EBADF)


class Actor:
    """One of host / vm1 / vm2: its client, TA, vaults, callback object and shm."""

    def __init__(self, name: str, cid: int, device: Any, guest: Guest | None) -> None:
        self.name = name
        self.cid = cid
        self.device = device
        self.guest = guest
        self.marker = f"<{name}-secret>".encode()
        self.app: App = open_app(device)
        self.rec = Recorder()
        self.vaults: list[tuple[ObjRef, bytes]] = []
        self.mem = self.app.client.memory(OUT)
        self.mem.view[: len(self.marker)] = self.marker
        self.alive = True
        self.scratch = guest.ram.alloc(OUT) if guest is not None else 0

    def close(self) -> None:
        if self.alive:
            for ref, _ in self.vaults:
                ref.release()
            self.mem.release()
            if self.guest is not None:
                self.guest.ram.free(self.scratch)
        self.app.close(dead=not self.alive)


class Isolation(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.monitor = SecureMonitor()
        self.vmm = Vmm(self.monitor)
        self.host_device = Device(self.monitor.host)
        self.local = threading.local()
        self.bad_smcs: list[tuple[int, int]] = []
        self.actors: dict[str, Actor] = {}
        self.actors["host"] = Actor("host", 0, self.host_device, None)
        for name in GUESTS:
            guest = self.vmm.create_vm(name, tee="qtee", ram_size=1 << 20)
            self._watch(guest)
            self.actors[name] = Actor(name, guest.client_id, guest.device, guest)
        self.monitor.trace_smc = self._trace

    # ------------------------------------------------------------------ SMC accounting
    def _watch(self, guest: Guest) -> None:
        """Mark every trap of ``guest`` on its thread, so the monitor's trace can say who."""
        real = guest._handle
        assert real is not None
        local = self.local

        def handle(*args: Any) -> Any:
            outer = getattr(local, "who", None)
            local.who = guest.client_id
            try:
                return real(*args)
            finally:
                local.who = outer

        guest._handle = handle

    def _trace(self, cid: int, fid: int | None, regs: tuple[int, ...]) -> None:
        if fid in (SmcFid.QTEE_MODEL_VM_CREATED, SmcFid.QTEE_MODEL_VM_DESTROYED):
            return  # the VMM's own calls: a7 = 0 by rule
        who = getattr(self.local, "who", None)
        if cid != (0 if who is None else who):
            self.bad_smcs.append((cid, who or 0))

    def _objects(self) -> dict[int, list[int]]:
        out = {}
        for cid in [0, *self.monitor.clients()]:
            world = self.monitor.partition(cid)
            if world is not None:
                out[cid] = world.live_ids()
        return out

    def _alive(self, name: str) -> bool:
        return self.actors[name].alive

    # ------------------------------------------------------------------ rules
    @rule(who=st.sampled_from(ACTORS), secret=st.binary(max_size=8))
    def mint_vault(self, who: str, secret: bytes) -> None:
        actor = self.actors[who]
        if not actor.alive:
            with pytest.raises((QteeError, DriverError)) as exc:
                actor.app.app.invoke(4, secret, OUT_OBJECT)
            assert gone(exc.value)
            return
        (ref,) = actor.app.app.invoke(4, actor.marker + secret, OUT_OBJECT)
        actor.vaults.append((ref, U32.pack(actor.cid) + actor.marker + secret))

    @rule(who=st.sampled_from(ACTORS), k=st.integers(0, 7))
    def read_vault(self, who: str, k: int) -> None:
        actor = self.actors[who]
        if not actor.vaults:
            return
        ref, expected = actor.vaults[k % len(actor.vaults)]
        if not actor.alive:
            with pytest.raises((QteeError, DriverError)) as exc:
                ref.invoke(0, Out(64))
            assert gone(exc.value)
            return
        (secret,) = ref.invoke(0, Out(64))
        assert secret == expected  # invariant 1
        assert secret.startswith(U32.pack(actor.cid))

    @rule(who=st.sampled_from(ACTORS), k=st.integers(0, 7))
    @precondition(lambda self: any(a.vaults and a.alive for a in self.actors.values()))
    def release_vault(self, who: str, k: int) -> None:
        actor = self.actors[who]
        if not actor.vaults or not actor.alive:
            return
        ref, _ = actor.vaults.pop(k % len(actor.vaults))
        ref.release()

    @rule(who=st.sampled_from(ACTORS))
    def invoke_own(self, who: str) -> None:
        actor = self.actors[who]
        try:
            (raw,) = actor.app.app.invoke(1, Out(4))
        except (QteeError, DriverError) as exc:
            assert not actor.alive and gone(exc)
            return
        assert actor.alive and U32.unpack(raw)[0] == actor.cid

    @rule(who=st.sampled_from(ACTORS))
    def call_back(self, who: str) -> None:
        actor = self.actors[who]
        try:
            (answer,) = actor.app.app.invoke(2, actor.rec, Out(64))
        except (QteeError, DriverError) as exc:
            assert not actor.alive and gone(exc)
            return
        assert answer == b"seen:" + U32.pack(actor.cid)

    @rule(who=st.sampled_from(ACTORS))
    def round_trip_callback_object(self, who: str) -> None:
        actor = self.actors[who]
        try:
            (back,) = actor.app.app.invoke(10, actor.rec, OUT_OBJECT)
        except (QteeError, DriverError) as exc:
            assert not actor.alive and gone(exc)
            return
        assert back is actor.rec

    @rule(src=st.sampled_from(ACTORS), dst=st.sampled_from(ACTORS), k=st.integers(0, 7))
    def use_copied_id(self, src: str, dst: str, k: int) -> None:
        a, b = self.actors[src], self.actors[dst]
        if not a.vaults or not b.alive or src == dst:
            return
        ident = a.vaults[k % len(a.vaults)][0].id
        before = self._objects()
        own = b.app.client.ctx.objects.lookup(ident)  # type: ignore[union-attr]
        if own is not None:  # the same number in b's table is b's own object
            assert own.device is b.device
            return
        with pytest.raises(DriverError) as exc:
            ObjRef(b.app.client, ident).invoke(0, Out(64))
        assert exc.value.errno == errno.EINVAL
        assert self._objects() == before  # invariant 4

    @rule(src=st.sampled_from(ACTORS), dst=st.sampled_from(ACTORS))
    def use_another_actors_shm_id(self, src: str, dst: str) -> None:
        a, b = self.actors[src], self.actors[dst]
        if not a.alive or not b.alive or src == dst:
            return
        shm_id = a.mem.id
        ctx = b.app.client.ctx
        if shm_id in ctx.shms:  # type: ignore[union-attr]
            (seen,) = b.app.app.invoke(5, b.mem, Out(16))  # b's own memory, b's marker
            assert seen.startswith(b.marker[:16])
            b.mem.view[: len(b.marker)] = b.marker
            return
        with pytest.raises(DriverError) as exc:
            raw_invoke(
                ctx,  # type: ignore[arg-type]
                b.device.memory,
                b.app.app.id,
                5,
                [uapi.Param(OBJ_IN, shm_id, MEM, 0), uapi.Param(9, 0, 16, 0)],
            )
        assert exc.value.errno == errno.EINVAL

    @rule(who=st.sampled_from(GUESTS), ident=st.integers(2, 64))
    def forge_wire_id(self, who: str, ident: int) -> None:
        actor = self.actors[who]
        guest = actor.guest
        assert guest is not None
        inbound = wire.encode_invoke(ident, 0, ob=[64])
        if not actor.alive:
            with pytest.raises(DriverError) as exc:
                guest.smc(SmcFid.QCOM_SCM_SMCINVOKE_INVOKE, 0, len(inbound), 0, OUT)
            assert exc.value.errno == errno.ENODEV
            return
        ram = guest.ram
        in_gpa = ram.alloc(len(inbound))
        out_gpa = ram.alloc(OUT)
        try:
            ram.write(in_gpa, inbound)
            before = self._objects()
            regs = guest.smc(SmcFid.QCOM_SCM_SMCINVOKE_INVOKE, in_gpa, len(inbound), out_gpa, OUT)
            part = self.monitor.partition(actor.cid)
            assert part is not None
            if part.lookup(ident) is None:
                assert regs[1] == Result.ERROR_BADOBJ & 0xFFFF_FFFF
            data = ram.read(in_gpa, len(inbound))
            for other in self.actors.values():
                if other is not actor:
                    assert other.marker not in data
            after = self._objects()
            assert {c: v for c, v in after.items() if c != actor.cid} == {
                c: v for c, v in before.items() if c != actor.cid
            }
        finally:
            ram.free(in_gpa)
            ram.free(out_gpa)

    @rule(
        who=st.sampled_from(GUESTS),
        where=st.sampled_from(["scratch", "past-end", "below", "zero", "other-hpa", "host-hpa"]),
    )
    def rogue_map_region(self, who: str, where: str) -> None:
        actor = self.actors[who]
        if not actor.alive:
            return
        guest = actor.guest
        assert guest is not None
        other = self.actors["vm2" if who == "vm1" else "vm1"].guest
        assert other is not None
        pa = {
            "scratch": actor.scratch,
            "past-end": guest.ram.base + guest.ram.size,
            "below": guest.ram.base - OUT,
            "zero": 0,
            "other-hpa": other.ram.hpa,
            "host-hpa": self.monitor.phys.BASE,
        }[where]
        device = actor.device
        device.primordial = RoguePrimordial(pa)
        ns = len(device.ns)
        try:
            if where == "scratch":  # its own RAM: fine, and only its own bytes
                guest.ram.write(actor.scratch, actor.marker)
                (seen,) = actor.app.app.invoke(5, actor.mem, Out(16))
                assert seen.startswith(actor.marker[:16])
            else:
                with pytest.raises(QteeError) as exc:
                    actor.app.app.invoke(5, actor.mem, Out(16))
                assert exc.value.result == Result.ERROR_UNAVAIL
        finally:
            device.primordial = Primordial()
        actor.app.app.invoke(1, Out(4))  # the refused mapping id comes back on a return
        assert len(device.ns) == ns
        assert not self.vmm.state(guest).mappings

    @rule(who=st.sampled_from(ACTORS), src=st.sampled_from(ACTORS), own=st.booleans())
    def return_object_from_callback(self, who: str, src: str, own: bool) -> None:
        actor = self.actors[who]
        if not actor.alive:
            return
        smuggler = Smuggler()
        if own:
            smuggler.give = Recorder()
        else:
            donor = self.actors[src]
            if not donor.vaults or donor is actor:
                return
            ident = donor.vaults[0][0].id
            smuggler.give = ObjRef(actor.app.client, ident)
            mine = actor.app.client.ctx.objects.lookup(ident)  # type: ignore[union-attr]
            own = mine is not None
        (res,) = actor.app.app.invoke(14, smuggler, Out(4))
        result = U32.unpack(res)[0]
        assert result == (0 if own else Result.ERROR_UNAVAIL & 0xFFFF_FFFF)

    @rule(who=st.sampled_from(GUESTS))
    @precondition(lambda self: sum(a.alive for a in self.actors.values()) == 3)
    def destroy_guest(self, who: str) -> None:
        actor = self.actors[who]
        assert actor.guest is not None
        report = self.vmm.destroy_vm(actor.guest)
        assert report.stuck == 0 and report.seconds < 1.0
        actor.alive = False
        assert self.monitor.partition(actor.cid) is None
        assert actor.guest.ram.closed and actor.device.leaks() == {}

    # ------------------------------------------------------------------ invariants
    @invariant()
    def callbacks_came_from_their_own_partition(self) -> None:
        for actor in self.actors.values():
            assert set(actor.rec.seen) <= {U32.pack(actor.cid)}  # invariant 2

    @invariant()
    def smcs_carried_the_right_client_id(self) -> None:
        assert self.bad_smcs == []  # invariant 3

    @invariant()
    def nothing_pinned_between_calls(self) -> None:
        for guest in self.vmm.guests():
            vm = self.vmm.state(guest)
            assert vm.calls == 0 and not vm.pins
            assert guest.ram.pinned_pages() == vm.pinned

    def teardown(self) -> None:
        self.monitor.trace_smc = None
        try:
            for actor in self.actors.values():
                actor.close()
            self.vmm.close()
            assert self.vmm.leaks() == {}
            assert self.monitor.leaks() == {}  # invariant 6
            for actor in self.actors.values():
                assert actor.device.leaks() == {}, (actor.name, actor.device.leaks())
        finally:
            VmTA.stash = None


Isolation.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.mark.qtee_ta(TA_NAME, VmTA)
def test_random_guest_operations_stay_isolated() -> None:
    state_machine = Isolation.TestCase("runTest")
    state_machine.runTest()


def test_the_machine_s_actors_are_what_they_claim() -> None:
    """Sanity: the host's client id is 0 and a marker never appears in another's RAM."""
    machine = Isolation()
    try:
        assert [a.cid for a in machine.actors.values()] == [0, 1, 2]
        vm1, vm2 = machine.actors["vm1"].guest, machine.actors["vm2"].guest
        assert vm1 is not None and vm2 is not None
        assert machine.actors["vm1"].marker not in vm2.ram.read(vm2.ram.base, vm2.ram.size)
        assert struct.calcsize("<I") == 4
    finally:
        machine.teardown()
