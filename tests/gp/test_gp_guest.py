"""GP TAs from inside a guest VM: a guest's QTEE partition offers IGPAppClient (0x199)
as the host's standard QTEE does, and finds the GP TAs registered for the host world or
the process (issue 15, "Defaults and one public API": ``qtee.Device()`` is the standard
QTEE; the TEEC client reaches GP TAs through IGPAppClient, quic-teec.md §1.4).

A call left in TA code while its VM is destroyed ends DEFUNCT on the QTEE side
(optee.md §6.1: the partition is freed after its last call), which the GP client
reports as libminkteec's ``map_err`` does: ``TEEC_ERROR_TARGET_DEAD``, origin TEE.
"""

from __future__ import annotations

import threading
import uuid

import pytest

from qtee import Device, GpParam, GpSession, GpTA, RemoteDevice
from qtee.gp import (
    TeecContext,
    TeecError,
    TeecOperation,
    TeecOrigin,
    TeecResult,
    TeecValue,
    param_types,
)
from qtee.gp import TeecParamType as P
from qtee.secure import CGPAPPCLIENT_UID, SecureMonitor
from qtee.vm import Vmm

ACC_UUID = uuid.UUID("5e0c1d2a-7f3b-4c6e-9a10-0000000ac0ac")
ADD, WAIT = 1, 2
VALUE_INOUT = param_types(P.TEEC_VALUE_INOUT, P.TEEC_NONE, P.TEEC_NONE, P.TEEC_NONE)


class Acc(GpTA):
    """ADD: p0.a += p0.b (VALUE_INOUT).  WAIT: blocks until ``Acc.go`` is set."""

    UUID = ACC_UUID
    entered = threading.Event()
    go = threading.Event()

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
        if cmd == WAIT:
            Acc.entered.set()
            Acc.go.wait(10)
            return
        params[0].a += params[0].b


@pytest.mark.qtee_gp_ta(Acc, loadable=False)
@pytest.mark.qtee_modes("in-process", "server", "guest")
def test_a_gp_ta_answers_in_every_mode(qtee_device: Device | RemoteDevice) -> None:
    """TeecContext(qtee_device) + open_session + invoke_command: the same answer in
    process, through a device server and from inside a guest (whose partition falls back
    on the host world's and the process's registry)."""
    value = TeecValue(40, 2)
    with TeecContext(qtee_device) as ctx, ctx.open_session(ACC_UUID) as session:
        origin = session.invoke_command(ADD, TeecOperation(VALUE_INOUT, [value]))
    assert (value.a, value.b, origin) == (42, 2, TeecOrigin.TEEC_ORIGIN_TRUSTED_APP)


def test_every_partition_of_a_monitor_offers_igpappclient() -> None:
    """``SecureMonitor()`` makes the standard QTEE for the host and for each guest it
    makes a partition for: IGPAppClient among the root's services, each partition with a
    GP runtime of its own (its sessions its own)."""
    monitor = SecureMonitor()
    with Vmm(monitor) as vmm:
        guest = vmm.create_vm("g", tee="qtee")
        partition = monitor.partition(guest.client_id)
        assert partition is not None
        for world in (monitor.host, partition):
            assert CGPAPPCLIENT_UID in world.root.services  # type: ignore[attr-defined]
        assert partition.gp is not monitor.host.gp  # type: ignore[attr-defined]


@pytest.mark.qtee_gp_ta(Acc, loadable=False)
def test_gp_in_a_destroyed_vm_is_target_dead() -> None:
    """A GP invoke still in TA code when its VM is destroyed: QTEE answers the
    IGPSession call DEFUNCT when it leaves (optee.md §6.1), which the client reports as
    TEEC_ERROR_TARGET_DEAD, origin TEE (libminkteec's map_err); nothing is left in the
    monitor afterwards."""
    Acc.entered.clear()
    Acc.go.clear()
    monitor = SecureMonitor()
    failure: list[BaseException] = []
    with Vmm(monitor) as vmm:
        guest = vmm.create_vm("g", tee="qtee")
        ctx = TeecContext(guest.device)
        session = ctx.open_session(ACC_UUID)

        def call() -> None:
            try:
                session.invoke_command(WAIT)
            except BaseException as exc:
                failure.append(exc)

        t = threading.Thread(target=call, daemon=True)
        t.start()
        try:
            assert Acc.entered.wait(10)
            report = vmm.destroy_vm(guest, timeout=0.2)
            assert report.stuck == 1
            Acc.go.set()
            t.join(10)
            assert not t.is_alive()
        finally:
            Acc.go.set()
            t.join(10)
            ctx.finalize()
    assert len(failure) == 1 and isinstance(failure[0], TeecError), failure
    assert (failure[0].code, failure[0].origin) == (
        TeecResult.TEEC_ERROR_TARGET_DEAD,
        TeecOrigin.TEEC_ORIGIN_TEE,
    )
    assert "IGPSession.invokeCommand failed: QTEE result -90 (ERROR_DEFUNCT)" in failure[0].detail
    assert monitor.leaks() == {}
