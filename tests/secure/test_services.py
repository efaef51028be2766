"""Root registration with credentials, client env and built-in services through raw ioctls
(qtee-kernel.md §2.5, §3.7, §6 steps 2-4; quic-teec.md §1.4, §1.6, §5.3)."""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator

import pytest

from qtee import Context, Device, uapi
from qtee.addrspace import CheckedMemory
from qtee.secure import QteeRoot, SecureWorld
from tests._helpers import (
    OBJ_IN,
    OBJ_OUT,
    UB_IN,
    UB_OUT,
    USER,
    RawSupplicant,
    expect_invoke_errno,
    raw_invoke,
    wait_until,
)


@pytest.fixture
def env() -> Iterator[tuple[Device, Context, CheckedMemory, RawSupplicant]]:
    mem = CheckedMemory()
    dev = Device(SecureWorld(QteeRoot()), memory=mem)
    ctx = dev.open()
    supp = RawSupplicant(ctx, mem)
    yield dev, ctx, mem, supp
    ctx.close()
    supp.stop()


@pytest.mark.parametrize("register_op", [2, 5])
def test_register_open_services_release(
    env: tuple[Device, Context, CheckedMemory, RawSupplicant], register_op: int
) -> None:
    dev, ctx, mem, supp = env
    head, p = raw_invoke(
        ctx,
        mem,
        uapi.TEE_OBJREF_NULL,
        register_op,
        [uapi.Param(OBJ_IN, 1, USER), uapi.Param(OBJ_OUT)],
    )
    assert head.ret == 0
    env_id = p[1].a
    assert p[1].b == uapi.QCOMTEE_OBJREF_FLAG_TEE
    env_obj = dev.world.lookup(dev.world.live_ids()[0])
    assert env_obj is not None and env_obj.credentials.uid == 1000  # type: ignore[attr-defined]

    uid = bytearray(struct.pack("<I", 2033))
    head, p = raw_invoke(
        ctx, mem, env_id, 0, [uapi.Param(UB_IN, mem.map(uid), 4), uapi.Param(OBJ_OUT)]
    )
    assert head.ret == 0
    fv = p[1].a
    feature = bytearray(struct.pack("<I", 10))
    version = bytearray(4)
    head, _ = raw_invoke(
        ctx,
        mem,
        fv,
        0,
        [uapi.Param(UB_IN, mem.map(feature), 4), uapi.Param(UB_OUT, mem.map(version), 4)],
    )
    (v,) = struct.unpack("<I", version)
    assert head.ret == 0 and ((v >> 22) & 0xFF, (v >> 12) & 0xFF, v & 0xFFF) == (2, 1, 0)

    uid[:] = struct.pack("<I", 143)
    head, p = raw_invoke(
        ctx, mem, env_id, 0, [uapi.Param(UB_IN, mem.map(uid), 4), uapi.Param(OBJ_OUT)]
    )
    heap = bytearray(24)
    head, _ = raw_invoke(ctx, mem, p[1].a, 0, [uapi.Param(UB_OUT, mem.map(heap), 24)])
    assert head.ret == 0 and len(struct.unpack("<6I", heap)) == 6
    raw_invoke(ctx, mem, p[1].a, 0xFFFF, [])

    uid[:] = struct.pack("<I", 99999)
    head, p = raw_invoke(
        ctx, mem, env_id, 0, [uapi.Param(UB_IN, mem.map(uid), 4), uapi.Param(OBJ_OUT)]
    )
    assert head.ret == 10 and (p[1].a, p[1].b) == (0, 0)  # IOpener NOT_FOUND

    raw_invoke(ctx, mem, fv, 0xFFFF, [])
    assert supp.releases == []  # QTEE still holds the credentials object
    raw_invoke(ctx, mem, env_id, 0xFFFF, [])
    assert wait_until(lambda: bool(supp.releases))
    assert supp.releases == [1]  # released with the client env (§6 step 2)


def test_null_credentials_on_op5_is_einval(
    env: tuple[Device, Context, CheckedMemory, RawSupplicant],
) -> None:
    _, ctx, mem, _ = env
    expect_invoke_errno(
        errno.EINVAL,
        ctx,
        mem,
        uapi.TEE_OBJREF_NULL,
        5,
        [uapi.Param(OBJ_IN, uapi.TEE_OBJREF_NULL, 0), uapi.Param(OBJ_OUT)],
    )
    # op 2 with NULL credentials reaches QTEE (the kernel only guards op 5).
    head, p = raw_invoke(
        ctx,
        mem,
        uapi.TEE_OBJREF_NULL,
        2,
        [uapi.Param(OBJ_IN, uapi.TEE_OBJREF_NULL, 0), uapi.Param(OBJ_OUT)],
    )
    assert head.ret == 0
    raw_invoke(ctx, mem, p[1].a, 0xFFFF, [])
