"""App loader, controllers and Python TAs via raw ioctls (quic-teec.md §5.3; kernel §6 step 5)."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from qtee import Context, Device, uapi
from qtee.addrspace import CheckedMemory
from qtee.secure import QteeRoot, SecureWorld, register_ta, ta_image, unregister_ta
from tests._helpers import OBJ_IN, OBJ_OUT, UB_IN, UB_OUT, USER, RawSupplicant, raw_invoke
from tests._tas import Adder


@pytest.fixture
def env() -> Iterator[tuple[Device, Context, CheckedMemory, int]]:
    register_ta("sample.add", Adder)
    mem = CheckedMemory()
    dev = Device(SecureWorld(QteeRoot()), memory=mem)
    ctx = dev.open()
    supp = RawSupplicant(ctx, mem)
    _, p = raw_invoke(
        ctx, mem, uapi.TEE_OBJREF_NULL, 2, [uapi.Param(OBJ_IN, 1, USER), uapi.Param(OBJ_OUT)]
    )
    uid = bytearray(struct.pack("<I", 3))
    head, q = raw_invoke(
        ctx, mem, p[1].a, 0, [uapi.Param(UB_IN, mem.map(uid), 4), uapi.Param(OBJ_OUT)]
    )
    assert head.ret == 0
    raw_invoke(ctx, mem, p[1].a, 0xFFFF, [])
    yield dev, ctx, mem, q[1].a
    ctx.close()
    supp.stop()
    unregister_ta("sample.add")


def load(ctx: Context, mem: CheckedMemory, loader: int, image: bytes) -> tuple[int, int]:
    buf = bytearray(image)
    head, p = raw_invoke(
        ctx, mem, loader, 0, [uapi.Param(UB_IN, mem.map(buf), len(buf)), uapi.Param(OBJ_OUT)]
    )
    return head.ret, p[1].a


def add(ctx: Context, mem: CheckedMemory, app: int, a: int, b: int) -> int:
    pair = bytearray(struct.pack("<II", a, b))
    out = bytearray(4)
    head, _ = raw_invoke(
        ctx, mem, app, 0, [uapi.Param(UB_IN, mem.map(pair), 8), uapi.Param(UB_OUT, mem.map(out), 4)]
    )
    assert head.ret == 0
    return int(struct.unpack("<I", out)[0])


def test_load_from_buffer_get_app_add_unload(
    env: tuple[Device, Context, CheckedMemory, int],
) -> None:
    _, ctx, mem, loader = env
    ret, ctrl = load(ctx, mem, loader, ta_image("sample.add"))
    assert ret == 0
    head, p = raw_invoke(ctx, mem, ctrl, 2, [uapi.Param(OBJ_OUT)])
    app = p[0].a
    assert add(ctx, mem, app, 1, 2) == 3
    assert load(ctx, mem, loader, ta_image("sample.add"))[0] == 16  # ALREADY_LOADED
    assert load(ctx, mem, loader, b"garbage!")[0] == 10  # INVALID_BUFFER
    assert load(ctx, mem, loader, ta_image("no.such.ta"))[0] == 13  # METADATA_INVALID
    raw_invoke(ctx, mem, ctrl, 1, [])  # unload
    head, _ = raw_invoke(ctx, mem, ctrl, 2, [uapi.Param(OBJ_OUT)])
    assert head.ret == 12  # IAppController UNLOADED
    for ident in (app, ctrl, loader):
        raw_invoke(ctx, mem, ident, 0xFFFF, [])


def test_load_from_region_owner_donates(env: tuple[Device, Context, CheckedMemory, int]) -> None:
    dev, ctx, mem, loader = env
    image = ta_image("sample.add", b"\x00" * 100)
    arg = bytearray(uapi.ShmAllocData(len(image)).pack())
    ctx.ioctl(uapi.TEE_IOC_SHM_ALLOC, arg)
    shm = uapi.ShmAllocData.unpack(arg).id
    ctx.shm_view(shm)[:] = image
    head, p = raw_invoke(
        ctx,
        mem,
        loader,
        1,
        [uapi.Param(OBJ_IN, shm, uapi.QCOMTEE_OBJREF_FLAG_MEM), uapi.Param(OBJ_OUT)],
    )
    ctx.shm_free(shm)  # donate: the owner drops its copy right after the invoke
    assert head.ret == 0
    _, q = raw_invoke(ctx, mem, p[1].a, 2, [uapi.Param(OBJ_OUT)])
    assert add(ctx, mem, q[0].a, 40, 2) == 42
    assert len(dev.shm) == 0  # QTEE unmapped and released it
    for ident in (q[0].a, p[1].a, loader):
        raw_invoke(ctx, mem, ident, 0xFFFF, [])
