"""Memory objects and the primordial object (qtee-kernel.md §2.3, §2.4, §6 memory sharing)."""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator

import pytest

from objects import QteeError, op
from qtee import Context, Device, Result, uapi
from qtee.addrspace import CheckedMemory
from qtee.secure import NsObject, SecureObject, SecureWorld
from tests._helpers import (
    MEM,
    OBJ_IN,
    OBJ_OUT,
    UB_IN,
    UB_OUT,
    expect_invoke_errno,
    raw_invoke,
    shm_alloc,
)


class Mapper(SecureObject):
    def __init__(self, world: SecureWorld) -> None:
        self.world = world

    @op(0, io=1, ob=(None,))
    def read_and_write(self, mem: NsObject) -> bytes:
        m = self.world.map_region(mem)
        assert m.perms == 6  # QCOM_SCM_PERM_RW
        seen = bytes(m.view[:5])
        m.view[:13] = b"written by TA"
        m.unmap()
        return seen

    @op(1, io=1)
    def poke(self, mem: NsObject) -> None:
        res = mem.invoke(0)
        raise QteeError(res.result if res.result else 1)

    @op(2, ib=(4,))
    def nap(self, ms: bytes) -> None:
        primordial = NsObject(self.world, 0x80000000)
        primordial.refs = 1 << 30
        for op_, ib in ((2, [ms]), (1, [])):
            res = primordial.invoke(op_, ib)
            if res.result:
                raise QteeError(res.result)
        res = primordial.invoke(7)
        raise QteeError(res.result)


class Root(SecureObject):
    def __init__(self) -> None:
        self.world: SecureWorld | None = None

    @op(0, oo=1)
    def open(self) -> SecureObject:
        assert self.world is not None
        return Mapper(self.world)


@pytest.fixture
def env() -> Iterator[tuple[Device, Context, CheckedMemory]]:
    mem = CheckedMemory()
    root = Root()
    world = SecureWorld(root)
    root.world = world
    dev = Device(world, memory=mem)
    ctx = dev.open()
    yield dev, ctx, mem
    ctx.close()


def test_ta_maps_reads_and_writes_shared_memory(env: tuple[Device, Context, CheckedMemory]) -> None:
    dev, ctx, mem = env
    raw_invoke(ctx, mem, uapi.TEE_OBJREF_NULL, 0, [uapi.Param(OBJ_OUT)])
    shm = shm_alloc(ctx, 64)
    ctx.shm_view(shm)[:5] = b"hello"
    out = bytearray(8)
    for _ in range(2):  # shared twice: each pass is one more QTEE-held reference
        head, params = raw_invoke(
            ctx, mem, 0, 0, [uapi.Param(OBJ_IN, shm, MEM), uapi.Param(UB_OUT, mem.map(out), 8)]
        )
        assert head.ret == 0 and params[1].b == 5 and out[:5] == b"hello"
        assert bytes(ctx.shm_view(shm)[:13]) == b"written by TA"
        ctx.shm_view(shm)[:5] = b"hello"
    # QTEE released the memory object and the mapping: only the owner's copy is left.
    assert len(dev.ns) == 0 and len(dev.shm) == 1
    ctx.shm_free(shm)
    raw_invoke(ctx, mem, 0, 0xFFFF, [])


def test_memory_objects_reject_direct_ops(env: tuple[Device, Context, CheckedMemory]) -> None:
    _, ctx, mem = env
    raw_invoke(ctx, mem, uapi.TEE_OBJREF_NULL, 0, [uapi.Param(OBJ_OUT)])
    shm = shm_alloc(ctx, 16)
    head, _ = raw_invoke(ctx, mem, 0, 1, [uapi.Param(OBJ_IN, shm, MEM)])
    assert head.ret == Result.ERROR_UNAVAIL & 0xFFFFFFFF  # -EINVAL from the kernel -> UNAVAIL
    ctx.shm_free(shm)
    raw_invoke(ctx, mem, 0, 0xFFFF, [])


def test_primordial_sleep_yield_and_unknown_op(env: tuple[Device, Context, CheckedMemory]) -> None:
    _, ctx, mem = env
    raw_invoke(ctx, mem, uapi.TEE_OBJREF_NULL, 0, [uapi.Param(OBJ_OUT)])
    ms = bytearray(struct.pack("<I", 1))
    head, _ = raw_invoke(ctx, mem, 0, 2, [uapi.Param(UB_IN, mem.map(ms), 4)])
    assert head.ret == Result.ERROR_UNAVAIL & 0xFFFFFFFF  # op 7 on the primordial object
    raw_invoke(ctx, mem, 0, 0xFFFF, [])


def test_shm_of_another_context_is_einval(env: tuple[Device, Context, CheckedMemory]) -> None:
    dev, ctx, mem = env
    other = dev.open()
    shm = shm_alloc(other, 16)
    expect_invoke_errno(
        errno.EINVAL,
        ctx,
        mem,
        uapi.TEE_OBJREF_NULL,
        0,
        [uapi.Param(OBJ_IN, shm, MEM), uapi.Param(OBJ_OUT)],
    )
    assert len(dev.shm) == 1 and len(dev.ns) == 0  # the error path undid nothing it did not do
    other.close()
