"""Driver model ioctls through raw structs (qtee-kernel.md §1.3, §4.1, §5)."""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator

import pytest

from objects import ENOTSUPP, op
from qtee import Context, Device, Result, uapi
from qtee.addrspace import CheckedMemory
from qtee.secure import SecureObject, SecureWorld
from tests._helpers import (
    OBJ_IN,
    OBJ_OUT,
    UB_IN,
    UB_OUT,
    expect_errno,
    expect_invoke_errno,
    raw_invoke,
)
from tests._tas import Adder


class Target(Adder):
    """The shared adder (op 0), and op 1 answering the object it is given."""

    @op(1, io=1, oo=1)
    def same(self, other: object) -> object:
        return other


class Root(SecureObject):
    @op(0, oo=1)
    def open(self) -> SecureObject:
        return Target()


@pytest.fixture
def env() -> Iterator[tuple[Device, Context, CheckedMemory]]:
    mem = CheckedMemory()
    world = SecureWorld(Root())
    dev = Device(world, memory=mem)
    ctx = dev.open()
    yield dev, ctx, mem
    ctx.close()  # the suite-wide leak check (conftest.py) then wants every table empty


def test_version_section_1_3(env: tuple[Device, Context, CheckedMemory]) -> None:
    _, ctx, _ = env
    arg = bytearray(12)
    ctx.ioctl(uapi.TEE_IOC_VERSION, arg)
    assert arg == bytes.fromhex("04000000 00000000 10000000")


def test_shm_alloc_ids_and_flags_section_5(env: tuple[Device, Context, CheckedMemory]) -> None:
    _, ctx, _ = env

    def alloc(size: int) -> int:
        arg = bytearray(uapi.ShmAllocData(size).pack())
        ctx.ioctl(uapi.TEE_IOC_SHM_ALLOC, arg)
        return uapi.ShmAllocData.unpack(arg).id

    assert [alloc(4096), alloc(10)] == [1, 2]  # device-wide IDR from 1
    assert len(ctx.shm_view(1)) == 4096 and bytes(ctx.shm_view(2)) == bytes(10)
    ctx.shm_free(1)
    assert alloc(8) == 1  # lowest free again
    expect_errno(
        errno.EINVAL, ctx, uapi.TEE_IOC_SHM_ALLOC, bytearray(uapi.ShmAllocData(1, 1).pack())
    )


@pytest.mark.parametrize(
    ("cmd", "code"),
    [
        (uapi.TEE_IOC_OPEN_SESSION, errno.EINVAL),
        (uapi.TEE_IOC_INVOKE, errno.EINVAL),
        (uapi.TEE_IOC_CANCEL, errno.EINVAL),
        (uapi.TEE_IOC_CLOSE_SESSION, errno.EINVAL),
        (uapi.TEE_IOC_SHM_REGISTER, ENOTSUPP),
        (0xC0DEA4FF, errno.EINVAL),
    ],
)
def test_unsupported_ioctls_section_5(
    env: tuple[Device, Context, CheckedMemory], cmd: int, code: int
) -> None:
    expect_errno(code, env[1], cmd, bytearray(64))


def test_open_invoke_release_section_4_1(env: tuple[Device, Context, CheckedMemory]) -> None:
    dev, ctx, mem = env
    head, out = raw_invoke(ctx, mem, uapi.TEE_OBJREF_NULL, 0, [uapi.Param(OBJ_OUT)])
    assert head.ret == 0
    assert (out[0].a, out[0].b) == (0, uapi.QCOMTEE_OBJREF_FLAG_TEE)  # lowest free id 0
    pair = bytearray(struct.pack("<II", 40, 2))
    result = bytearray(8)
    head, out = raw_invoke(
        ctx,
        mem,
        0,
        0,
        [uapi.Param(UB_OUT, mem.map(result), 4), uapi.Param(UB_IN, mem.map(pair), 8)],
    )
    assert head.ret == 0
    assert out[0].b == 4
    assert result[:4] == struct.pack("<I", 42)
    # op 0xFFFF is handled locally; ret keeps the caller's value.
    head, _ = raw_invoke(ctx, mem, 0, 0xFFFF, [])
    assert head.ret == 0
    assert len(ctx.objects) == 0
    assert dev.world.live_ids() == []


def test_result_channel_section_4_1_step_8(env: tuple[Device, Context, CheckedMemory]) -> None:
    _, ctx, mem = env
    raw_invoke(ctx, mem, uapi.TEE_OBJREF_NULL, 0, [uapi.Param(OBJ_OUT)])
    head, out = raw_invoke(ctx, mem, 0, 9, [uapi.Param(OBJ_OUT, 5, 5)])
    assert head.ret == Result.ERROR_INVALID
    assert (out[0].a, out[0].b) == (0, 0)  # OO written back as 0/0 on result != 0
    # A QTEE object passed in and returned comes back as a new id (every crossing).
    head, out = raw_invoke(
        ctx, mem, 0, 1, [uapi.Param(OBJ_IN, 0, uapi.QCOMTEE_OBJREF_FLAG_TEE), uapi.Param(OBJ_OUT)]
    )
    assert head.ret == 0
    assert (out[1].a, out[1].b) == (1, uapi.QCOMTEE_OBJREF_FLAG_TEE)


@pytest.mark.parametrize("op_", [4, 8, 9, 0x10000, 0xFFFE])
def test_forbidden_ops_einval_section_5(
    env: tuple[Device, Context, CheckedMemory], op_: int
) -> None:
    _, ctx, mem = env
    expect_invoke_errno(errno.EINVAL, ctx, mem, uapi.TEE_OBJREF_NULL, op_, [])


def test_bad_ids_and_faults_section_5(env: tuple[Device, Context, CheckedMemory]) -> None:
    _, ctx, mem = env
    for obj_id, params in [
        (7, []),  # not in this context
        (
            uapi.TEE_OBJREF_NULL,
            [uapi.Param(OBJ_IN, 3, uapi.QCOMTEE_OBJREF_FLAG_TEE), uapi.Param(OBJ_OUT)],
        ),
        (uapi.TEE_OBJREF_NULL, [uapi.Param(OBJ_IN, 3, 0), uapi.Param(OBJ_OUT)]),  # flags 0
    ]:
        expect_invoke_errno(errno.EINVAL, ctx, mem, obj_id, 0, params)
    # buf_ptr that is not mapped -> EFAULT; UBUF outside the user range -> EFAULT.
    expect_errno(
        errno.EFAULT, ctx, uapi.TEE_IOC_OBJECT_INVOKE, bytearray(uapi.BufData(0x1000, 24).pack())
    )
    expect_invoke_errno(
        errno.EFAULT,
        ctx,
        mem,
        uapi.TEE_OBJREF_NULL,
        0,
        [uapi.Param(UB_IN, 1 << 48, 8), uapi.Param(OBJ_OUT)],
    )


def test_leaks_name_each_context_by_its_order_of_opening() -> None:
    """Device.leaks names an fd's tables "context N" with N its order of opening, so a
    report does not change with another fd opening or closing around it."""
    import qtee
    from qtee.secure import QteeRoot

    dev = Device(SecureWorld(QteeRoot()))
    first, second = dev.open(), dev.open()
    client = qtee.Client(dev, workers=1)  # the third open
    assert (first.number, second.number, client.ctx.number) == (0, 1, 2)  # type: ignore[union-attr]
    env = client.client_env()
    assert dev.leaks()["context 2 objects"] == 1
    first.close()
    fourth = dev.open()
    assert fourth.number == 3  # numbers are not reused
    assert dev.leaks() == {"secure objects": 1, "ns ids": 1, "context 2 objects": 1}
    env.release()
    client.close()
    for ctx in (second, fourth):
        ctx.close()
    assert dev.leaks() == {}
