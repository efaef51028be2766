"""Destroying a VM with calls in flight: they fail in time, nothing of it survives.

optee.md §6.1 (the hypervisor stops all vCPUs before VM_DESTROYED; the partition is freed
when its last reference drops), §6.2 (Xen frees calls, buffers and pins at teardown);
qtee-kernel.md §4.5 (pending requests of a closed context complete DEFUNCT), §4.1 step 6
(an SMC failing after a callback is ENODEV).
"""

from __future__ import annotations

import errno
import struct
import threading
import time

import pytest

from objects import DriverError, QteeError
from qtee import OUT_OBJECT, Device, Out, Result
from qtee.vm import Guest
from tests._vm_helpers import (
    TA_NAME,
    U32,
    App,
    Gate,
    Recorder,
    VmTA,
    open_app,
    vmm_env,
    whoami,
)

pytestmark = [pytest.mark.qtee_ta(TA_NAME, VmTA), pytest.mark.timeout(60)]

DEFUNCT = Result.ERROR_DEFUNCT


class Loop(threading.Thread):
    """Invokes ``add`` until a call fails; remembers successes and the first failure."""

    def __init__(self, app: App) -> None:
        super().__init__(daemon=True)
        self.app = app
        self.ok = 0
        self.failure: BaseException | None = None
        self.failed_at = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        pair = struct.pack("<II", 1, 2)
        while not self.stop.is_set():
            try:
                (out,) = self.app.app.invoke(0, pair, Out(4))
                assert out == U32.pack(3)
                self.ok += 1
            except BaseException as exc:
                self.failed_at = time.monotonic()
                self.failure = exc
                return


class Blocked(threading.Thread):
    """One call whose callback blocks in the guest's supplicant until it is let go."""

    def __init__(self, app: App, rec: Recorder) -> None:
        super().__init__(daemon=True)
        self.app = app
        self.rec = rec
        self.failure: BaseException | None = None
        self.failed_at = 0.0

    def run(self) -> None:
        try:
            self.app.app.invoke(12, U32.pack(1), self.rec)
        except BaseException as exc:
            self.failed_at = time.monotonic()
            self.failure = exc


def is_vm_gone(exc: BaseException | None) -> bool:
    """What a call of a destroyed VM may fail with: DEFUNCT from QTEE's side, ENODEV from
    a stopped guest's SMC, EBADF once the guest kernel's contexts are gone."""
    if isinstance(exc, QteeError):
        return exc.result == DEFUNCT
    return isinstance(exc, DriverError) and exc.errno in (errno.ENODEV, errno.EBADF)


def test_destroy_with_calls_in_flight_and_callbacks_pending() -> None:
    """Guest A: 4 invoke loops and 2 calls blocked in supplicant callbacks.  destroy_vm
    fails every one of them (DEFUNCT / ENODEV) within 1 s; guest B's loop keeps going
    during and after; A's partition, pins and tables are gone; the host is untouched."""
    with vmm_env() as env:
        a_guest = env.guest("vmA")
        b_guest = env.guest("vmB")
        host = Device(env.monitor.host)
        a = open_app(a_guest.device, workers=3)
        b = open_app(b_guest.device)
        h = open_app(host)
        host_ids = env.monitor.host.live_ids()
        recs = [Recorder(), Recorder()]
        loops = [Loop(a) for _ in range(4)]
        blocked = [Blocked(a, rec) for rec in recs]
        b_loop = Loop(b)
        try:
            for t in (*loops, *blocked, b_loop):
                t.start()
            for rec in recs:
                assert rec.entered.wait(10)
            while min(loop.ok for loop in loops) < 3 or b_loop.ok < 3:
                time.sleep(0.005)
            vm = env.vmm.state(a_guest)
            assert vm.calls >= 2 and a_guest.ram.pinned_pages() >= 4
            b_before = b_loop.ok
            t0 = time.monotonic()
            report = env.vmm.destroy_vm(a_guest)
            a_ok_at_destroy = [loop.ok for loop in loops]
            for t in (*loops, *blocked):
                t.join(2)
            assert report.seconds < 1.0 and report.stuck == 0
            for t in (*loops, *blocked):
                assert not t.is_alive()
                assert is_vm_gone(t.failure), repr(t.failure)
                assert t.failed_at - t0 < 1.0
            for t in blocked:  # they were in flight: QTEE's answer is DEFUNCT
                assert isinstance(t.failure, QteeError), repr(t.failure)
            for loop, ok in zip(loops, a_ok_at_destroy, strict=True):
                assert loop.ok - ok <= 1  # at most a call QTEE had answered before the stop
            while b_loop.ok < b_before + 20:  # B keeps going during and after
                assert b_loop.is_alive(), repr(b_loop.failure)
                time.sleep(0.005)
            assert env.monitor.partition(a_guest.client_id) is None
            assert a_guest.client_id not in env.monitor.clients()
            assert a_guest.ram.closed and a_guest.ram.pinned_pages() == 0
            assert a_guest.device.leaks() == {}
            assert report.objects_released >= 3  # env, loader, controller, app...
            assert env.monitor.host.live_ids() == host_ids
            assert whoami(h) == 0 and whoami(b) == b_guest.client_id
            with pytest.raises(DriverError) as exc:
                a_guest.smc(0x72000602)
            assert exc.value.errno == errno.ENODEV
            assert [row.state for row in env.vmm.rows()] == ["destroyed", "running"]
        finally:
            b_loop.stop.set()
            b_loop.join(5)
            for rec in recs:
                rec.leave.set()
            for t in (*loops, *blocked):
                t.join(5)
            a.close(dead=True)
            b.close()
            h.close()


def test_destroy_with_a_call_stuck_in_ta_code() -> None:
    """A call the TA does not return from cannot be failed early: the destroy reports it
    stuck, unpins and frees the guest's RAM anyway (the TA holds only the VMM's shadow),
    and when the TA returns the call fails DEFUNCT and QTEE frees the partition."""
    with vmm_env() as env:
        guest = env.guest("vm1")
        gate = VmTA.gates.setdefault(guest.client_id, Gate())
        app = open_app(guest.device)
        failure: list[BaseException] = []

        def held() -> None:
            try:
                app.app.invoke(3, b"stuck", Out(8))
            except BaseException as exc:
                failure.append(exc)

        t = threading.Thread(target=held, daemon=True)
        t.start()
        try:
            assert gate.entered.wait(10)
            report = env.vmm.destroy_vm(guest, timeout=0.2)
            assert report.stuck == 1 and 0.2 <= report.seconds < 1.0
            assert guest.ram.closed and guest.ram.pinned_pages() == 0
            assert env.monitor.partition(guest.client_id) is None  # closing
            assert env.monitor.leaks()  # ... but alive until the call leaves
            gate.leave.set()
            t.join(5)
            assert isinstance(failure[0], QteeError) and failure[0].result == DEFUNCT
            assert env.monitor.leaks() == {}
        finally:
            gate.leave.set()
            t.join(5)
            app.close(dead=True)


def test_destroy_one_guest_of_two_leaves_the_other_usable() -> None:
    """Destroy frees the client id for later reuse (cyclic), and the other guest's
    objects, namespace and calls are untouched."""
    with vmm_env() as env:
        g1: Guest = env.guest("vm1")
        g2: Guest = env.guest("vm2")
        a = open_app(g1.device)
        b = open_app(g2.device)
        try:
            (vault,) = b.app.invoke(4, b"kept", OUT_OBJECT)
            b.extra.append(vault)
            env.vmm.destroy_vm(g1)
            assert whoami(b) == g2.client_id
            (secret,) = vault.invoke(0, Out(64))
            assert secret == U32.pack(g2.client_id) + b"kept"
            g3 = env.guest("vm3")
            assert g3.client_id == 3  # not 1 again: ids are cyclic
            c = open_app(g3.device)
            assert whoami(c) == 3 and whoami(b) == 2
            c.close()
        finally:
            a.close(dead=True)
            b.close()
