"""Guests on QTEE through the mediator: unchanged client code, isolation, shadowing, limits.

Specs: qtee-kernel.md §2.2 (ids per context; a bad id is EINVAL), §2.4 (MAP_REGION),
§3.1 (INVOKE/CB_RSP registers, buffers), §3.4 (what QTEE writes back), §3.5 (async
RELEASE), §3.6 (results); optee.md §6.1 (client id in a7, hypervisor duties), §6.2 (Xen:
shadow copy, whitelist write-back, per-guest limits, own SHM_FREE on a refused buffer).
"""

from __future__ import annotations

import errno
import struct
import threading
from collections.abc import Iterator

import pytest

from objects import DriverError, QteeError
from qtee import OUT_OBJECT, CallbackObject, Client, ObjRef, Out, Result, op, uapi, wire
from qtee._qcomtee.primordial_obj import Primordial
from qtee._smc import SmcFid, SmcReturn
from qtee.vm import Guest, GuestRam, VmLimits
from tests._helpers import MEM, OBJ_IN, TEE, expect_invoke_errno
from tests._vm_helpers import (
    TA_NAME,
    U32,
    App,
    Gate,
    Recorder,
    VmEnv,
    VmTA,
    open_app,
    vmm_env,
    whoami,
)

pytestmark = [pytest.mark.qtee_ta(TA_NAME, VmTA), pytest.mark.timeout(60)]

INVOKE = SmcFid.QCOM_SCM_SMCINVOKE_INVOKE
OUT = 4096


@pytest.fixture
def env() -> Iterator[VmEnv]:
    with vmm_env() as e:
        yield e


@pytest.fixture
def two(env: VmEnv) -> Iterator[tuple[Guest, Guest]]:
    yield env.guest("vm1"), env.guest("vm2")


def run_raw(guest: Guest, inbound: bytes, **kw: int) -> tuple[tuple[int, int, int, int], int, int]:
    """A hand-built INVOKE from the guest's kernel: (regs, in_gpa, out_gpa) -- caller frees."""
    ram = guest.ram
    in_gpa = ram.alloc(len(inbound))
    out_gpa = ram.alloc(OUT)
    ram.write(in_gpa, inbound)
    regs = guest.smc(INVOKE, in_gpa, len(inbound), out_gpa, OUT, **kw)
    return regs, in_gpa, out_gpa


def wire_id(app: App, ref: ObjRef) -> int:
    """The QTEE (wire) id behind a userspace object id of this client's context."""
    obj = app.client.ctx.objects.lookup(ref.id)  # type: ignore[union-attr]
    assert obj is not None
    return int(obj.qtee_id)


def signed(raw: int) -> int:
    return raw - (1 << 32) if raw & 0x8000_0000 else raw


# ----------------------------------------------------------------------------- unchanged code


def test_client_pool_and_supplicant_run_unchanged_in_a_guest(env: VmEnv) -> None:
    """The guest runs its own driver model; qtee.Client, its WorkerPool and
    supplicant.Supplicant are the host's code, unchanged (issue 7 "Guests")."""
    from supplicant import Supplicant

    guest = env.guest("vm1", ram_size=2 << 20)
    assert guest.device is not None and guest.device.secure_world is None
    app = open_app(guest.device)
    rec = Recorder()
    try:
        assert whoami(app) == guest.client_id
        (total,) = app.app.invoke(0, struct.pack("<II", 40, 2), Out(4))
        assert U32.unpack(total)[0] == 42
        (answer,) = app.app.invoke(2, rec, Out(64))  # a callback served by the pool
        assert answer == b"seen:" + U32.pack(guest.client_id)
        with Supplicant(guest.device, workers=2) as supp:
            supp.add_listener(0x77, lambda req: b"pong:" + req[:4])
            vm = env.vmm.state(guest)
            assert len(vm.mappings) == 2  # the time listener's buffer and ours, pinned
            (got,) = app.app.invoke(13, U32.pack(0x77), b"ping", Out(64))
            assert got.startswith(b"pong:ping")
        assert not vm.mappings and vm.pinned == 0  # unregistered -> async RELEASE -> unpinned
        assert guest.ram.pinned_pages() == 0
    finally:
        app.close()


def test_same_numeric_id_in_two_guests_names_two_objects(two: tuple[Guest, Guest]) -> None:
    """Per-VM namespaces (optee.md §6.1 partitions): equal userspace and wire ids, two objects."""
    a, b = (open_app(g.device) for g in two)
    try:
        assert a.app.id == b.app.id
        assert wire_id(a, a.app) == wire_id(b, b.app)
        assert (whoami(a), whoami(b)) == (two[0].client_id, two[1].client_id)
    finally:
        a.close()
        b.close()


# ----------------------------------------------------------------------------- isolation table


def test_guessed_or_copied_qtee_ids_are_einval_in_the_guest_driver(
    two: tuple[Guest, Guest],
) -> None:
    """Row 1: a userspace QTEE id (flags TEE) is looked up in the guest's own IDR
    (qtee-kernel.md §2.2): another guest's id names nothing there -> EINVAL, or names the
    guest's own object with that number."""
    a, b = (open_app(g.device) for g in two)
    try:
        (vault,) = a.app.invoke(4, b"A's secret", OUT_OBJECT)
        a.extra.append(vault)
        assert vault.id not in b.client.ctx.objects  # type: ignore[union-attr]
        with pytest.raises(DriverError) as exc:
            ObjRef(b.client, vault.id).invoke(0, Out(64))
        assert exc.value.errno == errno.EINVAL
        with pytest.raises(DriverError) as exc:
            b.app.invoke(10, ObjRef(b.client, vault.id), OUT_OBJECT)  # as an input object
        assert exc.value.errno == errno.EINVAL
        for guessed in range(b.app.id + 1):  # ids B does have are B's own objects
            if guessed in b.client.ctx.objects:  # type: ignore[union-attr]
                obj = b.client.ctx.objects.lookup(guessed)  # type: ignore[union-attr]
                assert obj is not None and obj.device is two[1].device
    finally:
        a.close()
        b.close()


def test_another_guests_shm_id_is_einval(two: tuple[Guest, Guest]) -> None:
    """Row 2: a shm id (flags MEM) must be the caller's context's (qtee-kernel.md §2.2, §5)."""
    a, b = (open_app(g.device) for g in two)
    try:
        mem = a.client.memory(64)
        try:
            ctx = two[1].device.open()
            try:
                param = uapi.Param(OBJ_IN, mem.id, MEM, 0)
                expect_invoke_errno(
                    errno.EINVAL, ctx, two[1].device.memory, uapi.TEE_OBJREF_NULL, 2, [param]
                )
                expect_invoke_errno(
                    errno.EINVAL, ctx, two[1].device.memory, 0, 0, [param]
                )  # and id 0 with flags TEE names nothing in a fresh fd
                p2 = uapi.Param(OBJ_IN, 0, TEE, 0)
                expect_invoke_errno(errno.EINVAL, ctx, two[1].device.memory, b.app.id, 5, [p2])
            finally:
                ctx.close()
        finally:
            mem.release()
    finally:
        a.close()
        b.close()


def test_forged_wire_ids_reach_only_the_guests_own_partition(
    env: VmEnv, two: tuple[Guest, Guest]
) -> None:
    """Row 3: a guest kernel writing any wire id into an inbound message names objects of
    its own partition only; an id it does not hold is BADOBJ (what QTEE gives any unknown
    id).  The other guest's objects keep their ids and references."""
    a, b = (open_app(g.device) for g in two)
    try:
        part_a = env.monitor.partition(two[0].client_id)
        part_b = env.monitor.partition(two[1].client_id)
        assert part_a is not None and part_b is not None
        (vault,) = a.app.invoke(4, b"A only", OUT_OBJECT)
        a.extra.append(vault)
        a_before = part_a.live_ids()
        for ident in range(2, 65):
            inbound = wire.encode_invoke(ident, 0, ob=[64])  # vault read / whatever op 0 is
            regs, in_gpa, out_gpa = run_raw(two[1], inbound)
            result = signed(regs[1])
            if part_b.lookup(ident) is None:
                assert result == Result.ERROR_BADOBJ, ident
            if result == 0:  # B's own object answered: never A's secret
                data = two[1].ram.read(in_gpa, len(inbound))
                assert b"A only" not in data
            two[1].ram.free(in_gpa)
            two[1].ram.free(out_gpa)
        assert part_a.live_ids() == a_before
        (secret,) = vault.invoke(0, Out(64))
        assert secret == U32.pack(two[0].client_id) + b"A only"
    finally:
        a.close()
        b.close()


class Smuggler(CallbackObject):
    """Answers a callback with an object (op 2): whatever ``give`` is set to."""

    def __init__(self) -> None:
        self.give: object = None

    @op(2, oo=1)
    def fetch(self) -> object:
        return self.give


def test_callback_outputs_naming_another_guests_object_are_unavail(
    two: tuple[Guest, Guest],
) -> None:
    """Row 4: OO/IO of a callback answer are decoded in the answering guest's own tables
    (qtee-kernel.md §4.4): another guest's id is EINVAL there, so QTEE gets UNAVAIL."""
    a, b = (open_app(g.device) for g in two)
    try:
        (vault,) = a.app.invoke(4, b"A's", OUT_OBJECT)
        a.extra.append(vault)
        smuggler = Smuggler()
        smuggler.give = ObjRef(b.client, vault.id + 7)  # A's object, as B's pool sends it
        (res,) = b.app.invoke(14, smuggler, Out(4))
        assert signed(U32.unpack(res)[0]) == Result.ERROR_UNAVAIL
        smuggler.give = Recorder()  # control: B's own callback object goes through
        (res,) = b.app.invoke(14, smuggler, Out(4))
        assert U32.unpack(res)[0] == 0
    finally:
        a.close()
        b.close()


class RoguePrimordial(Primordial):
    """A guest kernel answering MAP_REGION with an address of its choosing."""

    __slots__ = ("paddr",)

    def __init__(self, paddr: int) -> None:
        super().__init__()
        self.paddr = paddr

    def dispatch(
        self, op: int, ib: tuple[bytes, ...], ob: tuple[int, ...], io: tuple[object, ...], n_oo: int
    ) -> tuple[int, list[bytes], list[object]]:
        status, data, oo = super().dispatch(op, ib, ob, io, n_oo)
        if op == 0 and status == 0:
            _pa, length, perms = struct.unpack("<QQI", data[0])
            data = [struct.pack("<QQI", self.paddr, length, perms)]
        return status, data, oo


def test_map_region_answered_outside_own_ram_is_unavail(
    env: VmEnv, two: tuple[Guest, Guest]
) -> None:
    """Row 5: the mediator checks a MAP_REGION answer against the guest's RAM
    (optee.md §6.2: only guest RAM pages are translated); QTEE gets UNAVAIL, nothing is
    mapped or pinned, and the mapping NS id the guest gave is released back to it."""
    victim, rogue = two
    b = open_app(rogue.device)
    v = open_app(victim.device)
    try:
        mem = b.client.memory(4096)
        vmem = v.client.memory(4096)
        vmem.view[:6] = b"victim"
        try:
            ns_before = len(rogue.device.ns)
            vm = env.vmm.state(rogue)
            for bad in (
                victim.ram.hpa,  # the other guest's RAM, by host address
                victim.ram.base + rogue.ram.size,  # past the end of the rogue's RAM
                rogue.ram.base - 4096,
                0,
            ):
                rogue.device.primordial = RoguePrimordial(bad)
                with pytest.raises(QteeError) as exc:
                    b.app.invoke(5, mem, Out(16))
                assert exc.value.result == Result.ERROR_UNAVAIL
                assert not vm.mappings and rogue.ram.pinned_pages() == 0
                b.app.invoke(0, bytes(8), Out(4))  # the next return carries the RELEASE
                assert len(rogue.device.ns) == ns_before
            assert vm.stats["refused:map_outside_ram"] == 4
            assert bytes(vmem.view[:6]) == b"victim"
        finally:
            rogue.device.primordial = Primordial()
            mem.release()
            vmem.release()
    finally:
        b.close()
        v.close()


def test_guest_a7_is_ignored(env: VmEnv, two: tuple[Guest, Guest]) -> None:
    """Row 6: the VMM supplies the client id (optee.md §6.1): a guest's a7 of 0 or of
    another VM changes nothing; every SMC reaching the monitor for it carries its id."""
    g = two[1]
    b = open_app(g.device)
    seen: list[tuple[int, int | None]] = []
    env.monitor.trace_smc = lambda cid, fid, regs: seen.append((cid, fid))
    try:
        for a7 in (0, two[0].client_id, 0xFFFF, g.client_id):
            inbound = wire.encode_invoke(wire_id(b, b.app), 1, ob=[4])
            regs, in_gpa, out_gpa = run_raw(g, inbound, a7=a7)
            assert regs[:2] == (0, 0)
            assert g.ram.read(in_gpa + 24, 4) == U32.pack(g.client_id)
            g.ram.free(in_gpa)
            g.ram.free(out_gpa)
        assert seen and {cid for cid, _ in seen} == {g.client_id}
    finally:
        env.monitor.trace_smc = None
        b.close()


def test_a_ta_smuggling_an_ns_object_across_partitions_reaches_nothing(
    two: tuple[Guest, Guest],
) -> None:
    """Python TA classes are process-global: a TA that parks guest A's callback object
    in a class attribute and calls it during B's call fails in the secure world (A's
    partition has no call on that thread), and nothing reaches A."""
    a, b = (open_app(g.device) for g in two)
    rec = Recorder()
    try:
        a.app.invoke(8, rec)  # A's object parked at class level
        with pytest.raises(QteeError) as exc:
            b.app.invoke(9, Out(64))
        assert exc.value.result == Result.ERROR
        assert rec.seen == []
        (answer,) = a.app.invoke(9, Out(64))  # within A's own call it works
        assert answer == b"seen:" + U32.pack(two[0].client_id)
        a.app.invoke(11)
    finally:
        a.close()
        b.close()


# ----------------------------------------------------------------------------- callbacks


def test_callbacks_reach_only_the_guest_whose_call_is_running(env: VmEnv) -> None:
    """A callback request from QTEE for a guest's object goes to that guest only: the TA
    sends its partition's client id, and every handler sees only its own."""
    from qtee import Device

    guests = [env.guest("vm1"), env.guest("vm2")]
    host = Device(env.monitor.host)
    apps = [open_app(host, workers=3)] + [open_app(g.device, workers=3) for g in guests]
    recs = [Recorder() for _ in apps]
    errors: list[BaseException] = []

    def loop(app: App, rec: Recorder) -> None:
        try:
            for _ in range(40):
                app.app.invoke(2, rec, Out(64))
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=loop, args=(app, rec))
        for app, rec in zip(apps, recs, strict=True)
        for _ in (0, 1)
    ]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors
        for rec, cid in zip(recs, [0] + [g.client_id for g in guests], strict=True):
            assert len(rec.seen) == 80
            assert set(rec.seen) == {U32.pack(cid)}
    finally:
        for app in apps:
            app.close()


# ----------------------------------------------------------------------------- TOCTOU


def find(ram: GuestRam, needle: bytes) -> int:
    """The guest address of ``needle`` in guest RAM (exactly one occurrence)."""
    data = ram.read(ram.base, ram.size)
    at = data.find(needle)
    assert at >= 0 and data.find(needle, at + 1) < 0
    return ram.base + at


def test_toctou_guest_rewrites_its_inbound_payload_mid_call(env: VmEnv) -> None:
    """A guest thread rewrites the IB in its inbound page while the TA holds the call:
    the TA saw (and answers) the original -- the mediator forwarded its shadow copy."""
    guest = env.guest("vm1")
    gate = VmTA.gates.setdefault(guest.client_id, Gate())
    app = open_app(guest.device)
    got: list[bytes] = []
    try:
        t = threading.Thread(
            target=lambda: got.extend(app.app.invoke(3, b"ORIGINAL-PAYLOAD", Out(16)))
        )
        t.start()
        assert gate.entered.wait(10)
        at = find(guest.ram, b"ORIGINAL-PAYLOAD")
        guest.ram.write(at, b"REWRITTEN-BYTES!")  # the guest's own page, mid-call
        gate.leave.set()
        t.join(10)
        assert gate.seen == [b"ORIGINAL-PAYLOAD"]
        assert got == [b"ORIGINAL-PAYLOAD"]
    finally:
        gate.leave.set()
        app.close()


def test_toctou_raw_inbound_with_rewritten_header_only_output_fields_come_back(
    env: VmEnv,
) -> None:
    """A raw inbound whose header and payload a guest thread scribbles over mid-call:
    QTEE ran the original message, and afterwards the guest page differs from the
    scribbled version only in the OB size word and the OB payload (qtee-kernel.md §3.4;
    optee.md §6.2: only whitelisted fields are copied back)."""
    guest = env.guest("vm1")
    gate = VmTA.gates.setdefault(guest.client_id, Gate())
    app = open_app(guest.device)
    try:
        inbound = wire.encode_invoke(wire_id(app, app.app), 3, ib=[b"ORIGINAL"], ob=[8])
        msg = wire.decode_invoke(inbound)
        in_gpa = guest.ram.alloc(len(inbound))
        out_gpa = guest.ram.alloc(OUT)
        guest.ram.write(in_gpa, inbound)
        regs: list[tuple[int, int, int, int]] = []
        t = threading.Thread(
            target=lambda: regs.append(guest.smc(INVOKE, in_gpa, len(inbound), out_gpa, OUT))
        )
        t.start()
        assert gate.entered.wait(10)
        scribble = bytes([0xEE]) * len(inbound)
        guest.ram.write(in_gpa, scribble)
        gate.leave.set()
        t.join(10)
        assert regs == [(0, 0, 0, 0)]
        assert gate.seen == [b"ORIGINAL"]
        after = guest.ram.read(in_gpa, len(inbound))
        ob = msg.ob[0]
        size_at = 12 + 8 * 1 + 4  # the OB's size word (1 IB before it)
        changed = {i for i in range(len(inbound)) if after[i] != scribble[i]}
        allowed = set(range(size_at, size_at + 4)) | set(range(ob.offset, ob.offset + 8))
        assert changed <= allowed
        assert after[ob.offset : ob.offset + 8] == b"ORIGINAL"
        assert U32.unpack_from(after, size_at)[0] == 8
        guest.ram.free(in_gpa)
        guest.ram.free(out_gpa)
    finally:
        gate.leave.set()
        app.close()


def test_write_back_whitelist_outputs_only(env: VmEnv) -> None:
    """On success only OB sizes, OB payloads and OO ids are written into the guest's
    inbound page; on an error result nothing is."""
    guest = env.guest("vm1")
    app = open_app(guest.device)
    try:
        target = wire_id(app, app.app)
        for op_, kw, ok in (
            (4, {"ib": [b"k"], "n_oo": 1}, True),  # vault: one OO
            (0, {"ib": [bytes(8)], "ob": [4]}, True),  # add: one OB
            (0, {"ib": [bytes(7)], "ob": [4]}, False),  # wrong IB size: ERROR_INVALID
        ):
            clean = wire.encode_invoke(target, op_, **kw)  # type: ignore[arg-type]
            msg = wire.decode_invoke(clean)
            n = len(msg.ib) + len(msg.ob) + len(msg.io) + msg.n_oo
            # A marker the TEE never writes in padding, OB space and unused arg halves.
            inbound = bytearray(b"\x5a" * len(clean))
            inbound[: 12 + 8 * n] = clean[: 12 + 8 * n]
            for k, data in enumerate(msg.ib):
                (off,) = struct.unpack_from("<I", clean, 12 + 8 * k)
                inbound[off : off + len(data)] = data
            for k in range(msg.n_oo):
                at = 12 + 8 * (n - msg.n_oo + k)
                inbound[at + 4 : at + 8] = b"\x5a" * 4
            regs, in_gpa, out_gpa = run_raw(guest, bytes(inbound))
            after = guest.ram.read(in_gpa, len(inbound))
            allowed: set[int] = set()
            nib, nob = len(msg.ib), len(msg.ob)
            for k, ref in enumerate(msg.ob):
                allowed |= set(range(12 + 8 * (nib + k) + 4, 12 + 8 * (nib + k) + 8))
                allowed |= set(range(ref.offset, ref.offset + ref.size))
            first = 12 + 8 * (nib + nob + len(msg.io))
            for k in range(msg.n_oo):
                allowed |= set(range(first + 8 * k, first + 8 * k + 4))
            changed = {i for i in range(len(inbound)) if after[i] != inbound[i]}
            assert (regs[1] == 0) is ok
            assert changed <= (allowed if ok else set())
            if ok and msg.n_oo:  # a QTEE object came back: drop its reference
                (oo,) = struct.unpack_from("<I", after, first)
                assert oo >= 2
                _regs, rin, rout = run_raw(guest, wire.encode_invoke(oo, 0xFFFF))
                guest.ram.free(rin)
                guest.ram.free(rout)
            guest.ram.free(in_gpa)
            guest.ram.free(out_gpa)
    finally:
        app.close()


# ----------------------------------------------------------------------------- MAP_REGION


def test_map_region_translates_and_pins_until_the_async_release(env: VmEnv) -> None:
    """QTEE maps a guest's memory object: the guest kernel answers a guest address, the
    mediator pins it and QTEE sees the host address (qtee-kernel.md §2.4; optee.md §6.1
    translate + pin); the pin lasts until QTEE releases the mapping (async RELEASE, §3.5)."""
    guest = env.guest("vm1")
    app = open_app(guest.device)
    vm = env.vmm.state(guest)
    try:
        mem = app.client.memory(3 * 4096)
        mem.view[:5] = b"guest"
        try:
            shm = guest.device.shm.lookup(mem.id)
            assert shm is not None and shm.paddr in guest.ram
            (raw,) = app.app.invoke(6, mem, Out(8))
            (hpa,) = struct.unpack("<Q", raw)
            assert hpa == guest.ram.translate(shm.paddr, 3 * 4096)
            assert len(vm.mappings) == 1 and guest.ram.pinned_pages() == 3
            (seen,) = app.app.invoke(5, mem, Out(16))  # a second, temporary mapping
            assert seen[:5] == b"guest" and bytes(mem.view[:7]) == b"from TA"
            assert len(vm.mappings) == 1  # the temporary one went with its call
            app.app.invoke(7)  # unmap: the mapping object is released on this return
            assert not vm.mappings and guest.ram.pinned_pages() == 0 and vm.pinned == 0
        finally:
            mem.release()
    finally:
        app.close()


# ----------------------------------------------------------------------------- limits


def test_call_limit_defaults_to_the_tee_threads_and_answers_busy(env: VmEnv) -> None:
    """Concurrent calls per VM: default the TEE's thread count; one more is ERROR_BUSY
    (qcomtee has no ETHREAD retry; optee.md §6.2's figure is the thread count)."""
    guest = env.guest("vm1")
    vm = env.vmm.state(guest)
    assert vm.max_calls == env.monitor.threads == 8
    gate = VmTA.gates.setdefault(guest.client_id, Gate())
    app = open_app(guest.device)
    threads = [threading.Thread(target=app.app.invoke, args=(3, b"x", Out(1))) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        for _ in range(500):
            if vm.calls == 8:
                break
            gate.entered.wait(0.01)
        assert vm.calls == 8
        with pytest.raises(QteeError) as exc:
            app.app.invoke(0, bytes(8), Out(4))
        assert exc.value.result == Result.ERROR_BUSY
        assert vm.stats["limit:calls"] == 1
    finally:
        gate.leave.set()
        for t in threads:
            t.join(10)
        app.close()
    app2 = open_app(guest.device)
    app2.close()


@pytest.mark.parametrize(
    ("limits", "sizes", "refused_at", "stat"),
    [
        (VmLimits(), [4096] * 17, 16, "limit:shm_buffers"),  # MAX_SHM_BUFFER_COUNT 16
        (VmLimits(), [129 * 4096, 130 * 4096], 1, "limit:shm_buffer_pages"),  # 129 pages
        (VmLimits(pinned_pages=10), [5 * 4096, 5 * 4096], 1, "limit:pinned_pages"),
    ],
    ids=["17th-mapping", "130-page-shm", "total-pins"],
)
def test_shm_limits_answer_kmem_and_give_the_mapping_back(
    env: VmEnv, limits: VmLimits, sizes: list[int], refused_at: int, stat: str
) -> None:
    """Per-VM shm limits (optee.md §6.2 figures): over one, QTEE's MAP_REGION gets KMEM
    (the kernel's -ENOMEM, qtee-kernel.md §3.6), nothing is pinned for it, and the
    mapping NS id the guest handed out comes back to it as an async RELEASE."""
    guest = env.guest("vm1", ram_size=4 << 20, limits=limits)
    vm = env.vmm.state(guest)
    app = open_app(guest.device)
    mems = []
    try:
        ns_base = len(guest.device.ns)
        for k, size in enumerate(sizes):
            mem = app.client.memory(size)
            mems.append(mem)
            if k < refused_at:
                app.app.invoke(6, mem, Out(8))
                continue
            pinned = vm.pinned
            with pytest.raises(QteeError) as exc:
                app.app.invoke(6, mem, Out(8))
            assert exc.value.result == Result.ERROR_KMEM
            assert vm.stats[stat] == 1
            assert len(vm.mappings) == refused_at and vm.pinned == pinned
        app.app.invoke(7)
        assert not vm.mappings and guest.ram.pinned_pages() == 0
        assert len(guest.device.ns) == ns_base
        assert env.vmm.rows()[0].limit_hits == 1
    finally:
        for mem in mems:
            mem.release()
        app.close()


# ----------------------------------------------------------------------------- registers


def test_register_checks_and_other_smcs(env: VmEnv) -> None:
    """qtee-kernel.md §3.1 registers: out_size must be 4096 and both buffers page-aligned
    guest RAM (else the SMC fails EINVAL); an inbound over 4 MiB is MAXDATA; a malformed
    inbound is ERROR_INVALID and never forwarded; CB_RSP with nothing pending is EINVAL;
    the VM calls are the hypervisor's (ENOTAVAIL); other ids are unknown."""
    guest = env.guest("vm1")
    ram = guest.ram
    page = ram.alloc(2 * OUT)
    forwarded: list[int] = []
    env.monitor.trace_smc = lambda cid, fid, regs: forwarded.append(cid)
    try:
        for args in (
            (page, 16, page + OUT, 4095),
            (page + 8, 16, page + OUT, OUT),
            (page, 16, page + 8, OUT),
            (ram.base + ram.size, 16, page, OUT),
            (page, 16, ram.base - OUT, OUT),
            (page, ram.size + OUT, page + OUT, OUT),
        ):
            with pytest.raises(DriverError) as exc:
                guest.smc(INVOKE, *args)
            assert exc.value.errno == errno.EINVAL, args
        assert guest.smc(INVOKE, page, wire.MAX_INBOUND_BUFFER_SIZE + 1, page + OUT, OUT)[1] == (
            Result.ERROR_MAXDATA & 0xFFFF_FFFF
        )
        ram.write(page, struct.pack("<3I", 1, 0, 0xF0000))  # counts with bits above 15
        assert guest.smc(INVOKE, page, 12, page + OUT, OUT)[:2] == (0, Result.ERROR_INVALID)
        with pytest.raises(DriverError) as exc:
            guest.smc(SmcFid.QCOM_SCM_SMCINVOKE_CB_RSP, page + OUT, OUT)
        assert exc.value.errno == errno.EINVAL
        for fid in (SmcFid.QTEE_MODEL_VM_CREATED, SmcFid.QTEE_MODEL_VM_DESTROYED):
            assert guest.smc(fid, 5)[0] == SmcReturn.ENOTAVAIL
        assert guest.smc(SmcFid.QCOM_SCM_SMCINVOKE_INVOKE_LEGACY)[0] == (SmcReturn.UNKNOWN_FUNCTION)
        assert forwarded == []  # none of these reached the monitor
        assert ram.pinned_pages() == 0 and env.vmm.state(guest).calls == 0
    finally:
        env.monitor.trace_smc = None
        ram.free(page)


def test_smc32_invoke_is_mediated_too(env: VmEnv) -> None:
    """Both SMCCC conventions of INVOKE (qtee-kernel.md §3.1) go through the mediator."""
    guest = env.guest("vm1")
    app = open_app(guest.device)
    try:
        inbound = wire.encode_invoke(wire_id(app, app.app), 1, ob=[4])
        in_gpa = guest.ram.alloc(len(inbound))
        out_gpa = guest.ram.alloc(OUT)
        guest.ram.write(in_gpa, inbound)
        regs = guest.smc(SmcFid.QCOM_SCM_SMCINVOKE_INVOKE_32, in_gpa, len(inbound), out_gpa, OUT)
        assert regs[:2] == (0, 0)
        assert guest.ram.read(in_gpa + 24, 4) == U32.pack(guest.client_id)
        guest.ram.free(in_gpa)
        guest.ram.free(out_gpa)
    finally:
        app.close()


def test_host_client_is_unaffected_by_guests(env: VmEnv) -> None:
    """The host (client id 0) keeps its own partition next to the guests'."""
    from qtee import Device

    guest = env.guest("vm1")
    host = Device(env.monitor.host)
    h = open_app(host)
    g = open_app(guest.device)
    try:
        assert (whoami(h), whoami(g)) == (0, guest.client_id)
        assert isinstance(h.client, Client)
    finally:
        h.close()
        g.close()


def test_a_guest_kernel_raising_in_its_callback_server_abandons_the_call(env: VmEnv) -> None:
    """If the guest's callback server raises instead of answering CB_RSP, the call is
    abandoned as for a host caller: QTEE sees DEFUNCT and runs to its end, and the
    exception reaches the guest's SMC; no slot or pin is left behind."""
    guest = env.guest("vm1")
    app = open_app(guest.device)
    seen: list[int] = []
    try:
        ns = wire.QCOMTEE_MSG_OBJECT_PRIMORDIAL  # any NS id: QTEE calls it back
        inbound = wire.encode_invoke(wire_id(app, app.app), 2, io=[ns], ob=[64])
        in_gpa = guest.ram.alloc(len(inbound))
        out_gpa = guest.ram.alloc(OUT)
        guest.ram.write(in_gpa, inbound)

        def boom(regs: tuple[int, int, int, int]) -> tuple[int, int, int]:
            seen.append(regs[0])
            raise RuntimeError("guest kernel bug")

        with pytest.raises(RuntimeError, match="guest kernel bug"):
            guest.smc(INVOKE, in_gpa, len(inbound), out_gpa, OUT, on_return=boom)
        assert seen == [3]
        vm = env.vmm.state(guest)
        assert vm.calls == 0 and vm.pinned == 0 and guest.ram.pinned_pages() == 0
        assert vm.stats["smc_errors"] == 1
        assert whoami(app) == guest.client_id  # the VM goes on
        guest.ram.free(in_gpa)
        guest.ram.free(out_gpa)
    finally:
        app.close()


def test_a_view_of_the_inbound_shadow_kept_past_its_call_costs_only_a_new_shadow(
    env: VmEnv,
) -> None:
    """The VMM reuses each VM's shadow buffers from call to call (issue 7's shadow copy);
    if something still holds a view of the last inbound shadow, the next call gets a new
    one, lent in its place, and the answer is the same."""
    guest = env.guest("vm1")
    g = open_app(guest.device)
    try:
        assert whoami(g) == guest.client_id
        vm = guest._vm
        assert vm is not None and vm.pages
        page = vm.pages[-1]
        old, old_pa = page.inbuf, page.in_pa
        held = memoryview(old)  # the shadow can no longer be resized
        pair = struct.pack("<II", 40, 2)  # a longer message than whoami's
        assert g.app.invoke(0, pair, Out(4)) == [U32.pack(42)]
        assert page.inbuf is not old and page.in_pa != old_pa
        assert env.monitor.phys.lent_at(old_pa) is None  # the old lend ended
        assert env.monitor.phys.lent_at(page.in_pa) is page.inbuf
        held.release()
    finally:
        g.close()
