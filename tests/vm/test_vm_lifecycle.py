"""VM lifecycle: per-VM TEE choice, creation refused at the guest limit, quiet absence.

optee.md §6.1 (VM_CREATED with the client id in a1 and a7 = 0; ENOTAVAIL past the guest
count; 0 is the hypervisor's id), §6.2 (Xen: the toolstack decides ``tee=`` per domain,
default none; a refused creation fails the domain with ENODEV; a missing mediator is
ENODEV; the VM_DESTROYED(0) probe), qtee-kernel.md §3.1 (the -EIO probe); seed 002 (no
TEE is a valid configuration, not worth a warning).
"""

from __future__ import annotations

import errno
import logging
import pickle

import pytest

from objects import DriverError, UsageError
from qtee._smc import SmcFid, SmcReturn
from qtee.secure import SecureMonitor
from qtee.vm import GuestRam, TeeKind, VmError, VmLimits, Vmm, register_backend
from tests._vm_helpers import TA_NAME, VmTA, open_app, vmm_env, whoami

pytestmark = [pytest.mark.qtee_ta(TA_NAME, VmTA), pytest.mark.timeout(60)]


def snapshot(vmm: Vmm, monitor: SecureMonitor) -> tuple[object, ...]:
    return (vmm.rows(), vmm.guests(), monitor.clients(), len(monitor.phys), vmm.leaks())


def test_guest_limit_refuses_creation_cleanly_and_frees_up_after_a_destroy() -> None:
    """VM N+1 with a TEE: VmError(ENODEV) naming the limit, and nothing is kept -- no
    row, no RAM, no partition, and not even the id cursor moves (HABITS "an illegal move
    changes nothing"): the next VM gets the id the refused one would have had."""
    with vmm_env(guest_limit=2) as env:
        g1 = env.guest("vm1")
        g2 = env.guest("vm2")
        assert (g1.client_id, g2.client_id) == (1, 2)
        before = snapshot(env.vmm, env.monitor)
        with pytest.raises(VmError) as exc:
            env.guest("vm3")
        assert exc.value.errno == errno.ENODEV
        assert exc.value.tee_status == SmcReturn.ENOTAVAIL
        assert "QTEE refused client id 3" in str(exc.value)
        assert str(exc.value).endswith(
            "QTEE refused client id 3: guest limit 2 reached (its SMC answered ENOTAVAIL)"
        )
        assert snapshot(env.vmm, env.monitor) == before
        env.guest("plain", tee="none")  # a VM without a TEE is not counted by QTEE
        env.vmm.destroy_vm(g1)
        g3 = env.guest("vm3")
        assert g3.client_id == 4  # 3 went to "plain"; the refused attempt took nothing
        app = open_app(g3.device)
        assert whoami(app) == 4
        app.close()


def test_creation_and_destruction_are_announced_by_the_hypervisor() -> None:
    """VM_CREATED / VM_DESTROYED carry the VM's client id in a1 and the hypervisor's 0 in
    a7 (optee.md §6.1; the model's QTEE calls borrow that rule)."""
    with vmm_env() as env:
        seen: list[tuple[int, int | None, tuple[int, ...]]] = []
        env.monitor.trace_smc = lambda cid, fid, regs: seen.append((cid, fid, regs))
        guest = env.guest("vm1")
        env.vmm.destroy_vm(guest)
        env.monitor.trace_smc = None
        calls = [(cid, fid, regs[0]) for cid, fid, regs in seen if fid is not None]
        assert calls == [
            (0, SmcFid.QTEE_MODEL_VM_CREATED, guest.client_id),
            (0, SmcFid.QTEE_MODEL_VM_DESTROYED, guest.client_id),
        ]
        assert guest.client_id != 0


def test_tee_none_has_no_device_and_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """tee="none" (the default, as xl.cfg's): no backend call, no TEE device, no log
    record at all; its SMCs to the TEE are unknown functions."""
    caplog.set_level(logging.DEBUG, logger="qtee")
    with vmm_env() as env:
        caplog.clear()
        guest = env.vmm.create_vm("plain", ram_size=1 << 20)
        assert guest.tee is TeeKind.NONE and guest.device is None
        assert guest.smc(SmcFid.QCOM_SCM_SMCINVOKE_INVOKE)[0] == SmcReturn.UNKNOWN_FUNCTION
        assert env.monitor.clients() == []
        row = env.vmm.rows()[0]
        assert (row.tee, row.state, row.secure_objects) == ("none", "running", 0)
        report = env.vmm.destroy_vm(guest)
        assert (report.stuck, report.objects_released, report.pins_dropped) == (0, 0, 0)
        assert [r for r in caplog.records if r.name.startswith("qtee.vm")] == []


@pytest.mark.parametrize(
    ("monitor_kw", "why"),
    [
        ({"smcinvoke": False}, "its probe found no TEE with VM support"),
        ({"virtualization": False}, "its probe found no TEE with VM support"),
    ],
    ids=["no-smcinvoke", "no-vm-calls"],
)
def test_no_qtee_is_quiet_and_a_qtee_vm_is_enodev(
    caplog: pytest.LogCaptureFixture, monitor_kw: dict[str, bool], why: str
) -> None:
    """The probe finds no QTEE (INVOKE -EIO, qtee-kernel.md §3.1) or no VM support
    (VM_DESTROYED is unknown, as Xen probes OP-TEE): nothing logged at INFO or above,
    tee="qtee" is VmError(ENODEV) as Xen's tee_domain_init, tee="none" works."""
    caplog.set_level(logging.DEBUG, logger="qtee")
    with vmm_env(**monitor_kw) as env:
        assert env.vmm.backend("qtee") is None
        with pytest.raises(VmError) as exc:
            env.guest("vm1")
        assert exc.value.errno == errno.ENODEV
        assert str(exc.value).endswith(f"no qtee mediator: {why}")
        assert env.vmm.rows() == []
        env.guest("plain", tee="none")
    assert [r for r in caplog.records if r.levelno >= logging.INFO] == []


def test_optee_without_an_optee_tee_is_enodev() -> None:
    """A VM asking for a TEE the platform lacks fails at creation with ENODEV."""
    with vmm_env() as env:
        with pytest.raises(VmError) as exc:
            env.guest("vm1", tee="optee")
        assert exc.value.errno == errno.ENODEV
        assert "no optee mediator" in str(exc.value)
    monitor = SecureMonitor()
    vmm = Vmm(monitor, backends=("qtee",))  # a VMM that never asked for OP-TEE
    with pytest.raises(VmError, match="not asked for"):
        vmm.create_vm("vm1", tee="optee", ram_size=1 << 20)
    vmm.close()


def test_client_ids_are_never_zero_and_cyclic() -> None:
    """Client id = VM id, from 1 (0 is the hypervisor's, optee.md §6.1), cyclic so a
    destroyed VM's id is not handed out again at once."""
    with vmm_env(guest_limit=1) as env:
        ids = []
        for k in range(4):
            guest = env.guest(f"vm{k}")
            ids.append(guest.client_id)
            env.vmm.destroy_vm(guest)
        assert ids == [1, 2, 3, 4]
        assert [row.state for row in env.vmm.rows()] == ["destroyed"] * 4


def test_destroy_stops_the_vcpus_first() -> None:
    """Destroy stops the guest (its SMCs no longer reach the VMM: ENODEV) before
    VM_DESTROYED; a second destroy is a usage error and changes nothing."""
    with vmm_env() as env:
        guest = env.guest("vm1")
        calls: list[int] = []
        env.monitor.trace_smc = lambda cid, fid, regs: calls.append(fid or 0)
        env.vmm.destroy_vm(guest)
        env.monitor.trace_smc = None
        assert not guest.running
        assert SmcFid.QTEE_MODEL_VM_DESTROYED in calls
        with pytest.raises(DriverError) as exc:
            guest.smc(SmcFid.QCOM_SCM_SMCINVOKE_INVOKE)
        assert exc.value.errno == errno.ENODEV
        rows = env.vmm.rows()
        with pytest.raises(UsageError):
            env.vmm.destroy_vm(guest)
        assert env.vmm.rows() == rows


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"name": ""}, UsageError, "non-empty name"),
        ({"name": "vm1", "tee": "xen"}, UsageError, "tee must be one of"),
        ({"name": "vm1", "ram_size": 4097}, UsageError, "multiple of 4096"),
        ({"name": "vm1", "ram_size": 0}, UsageError, "positive int"),
        ({"name": "vm1", "limits": {"max_calls": 2}}, TypeError, "VmLimits"),
        ({"name": "taken"}, UsageError, "already exists"),
    ],
)
def test_bad_create_arguments_change_nothing(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with vmm_env() as env:
        env.guest("taken", tee="none")
        before = snapshot(env.vmm, env.monitor)
        with pytest.raises(error, match=match):
            env.vmm.create_vm(**kwargs)  # type: ignore[arg-type]
        assert snapshot(env.vmm, env.monitor) == before


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_calls": 0},
        {"shm_buffers": 0},
        {"shm_buffer_pages": -1},
        {"pinned_pages": True},
        {"max_calls": 1.5},
    ],
)
def test_vm_limits_are_validated(kwargs: dict[str, object]) -> None:
    with pytest.raises(UsageError, match="VmLimits"):
        VmLimits(**kwargs)  # type: ignore[arg-type]


def test_limits_are_per_vm_and_configurable() -> None:
    with vmm_env() as env:
        small = env.guest("small", limits=VmLimits(max_calls=2, shm_buffers=1))
        default = env.guest("default")
        assert env.vmm.state(small).max_calls == 2
        assert env.vmm.state(default).max_calls == env.monitor.threads
        assert env.vmm.state(default).limits == VmLimits()


def test_rows_count_calls_callbacks_and_results() -> None:
    from qtee import Out
    from tests._vm_helpers import Recorder

    with vmm_env() as env:
        guest = env.guest("vm1")
        app = open_app(guest.device)
        try:
            app.app.invoke(2, Recorder(), Out(64))
            with pytest.raises(Exception):  # noqa: B017 - any QTEE error result
                app.app.invoke(0, b"short", Out(4))
        finally:
            app.close()
        (row,) = env.vmm.rows()
        assert row.name == "vm1" and row.client_id == guest.client_id and row.tee == "qtee"
        assert row.calls_ok >= 5 and row.calls_failed == 1 and row.callbacks >= 1
        assert dict(row.results)[2] == 1  # ERROR_INVALID from the op table
        assert row.pinned_now == 0 and row.pinned_peak >= 2 and row.secure_objects == 0


def test_vm_error_pickles_with_its_tee_status() -> None:
    err = VmError(errno.ENODEV, "QTEE refused client id 3", tee_status=7)
    back = pickle.loads(pickle.dumps(err))
    assert (back.errno, back.detail, back.tee_status) == (errno.ENODEV, err.detail, 7)
    assert isinstance(back, DriverError)


def test_register_backend_checks_its_input() -> None:
    with pytest.raises(UsageError, match="'qtee' or 'optee'"):
        register_backend("xen")
    with pytest.raises(TypeError, match="no probe"):

        @register_backend("qtee")
        class Broken:
            pass


def test_vmm_checks_its_input() -> None:
    monitor = SecureMonitor()
    with pytest.raises(UsageError, match="unknown TEE backend"):
        Vmm(monitor, backends=("qtee", "xen"))
    with pytest.raises(UsageError, match="not one string"):
        Vmm(monitor, backends="qtee")
    vmm = Vmm(monitor)
    with pytest.raises(UsageError, match="not a live VM"):
        vmm.destroy_vm(object())  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="timeout"):
        vmm.destroy_vm(object(), timeout=-1)  # type: ignore[arg-type]
    vmm.close()
    with pytest.raises(UsageError, match="closed"):
        vmm.create_vm("late")
    assert vmm.leaks() == {} and monitor.leaks() == {}


def test_guest_ram_is_a_host_region_only_while_the_vm_lives() -> None:
    with vmm_env() as env:
        regions = len(env.monitor.phys)
        guest = env.guest("plain", tee="none", ram_size=2 << 20)
        assert isinstance(guest.ram, GuestRam) and guest.ram.size == 2 << 20
        assert len(env.monitor.phys) == regions + 1
        env.vmm.destroy_vm(guest)
        assert len(env.monitor.phys) == regions and guest.ram.closed
