"""Root registration with credentials, client env and built-in services through raw ioctls
(qtee-kernel.md §2.5, §3.7, §6 steps 2-4; quic-teec.md §1.4, §1.6, §5.3)."""

from __future__ import annotations

import errno
import struct
import threading
from collections.abc import Iterator

import pytest

from objects import DriverError
from qtee import uapi
from qtee._driver import Context, Device
from qtee.addrspace import CheckedMemory
from qtee.credentials import CredentialKey, Credentials
from qtee.secure import QteeRoot, SecureWorld

UB_IN = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_INPUT
UB_OUT = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_OUTPUT
OBJ_IN = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_INPUT
OBJ_OUT = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_OUTPUT
META_IN = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_INOUT | uapi.TEE_IOCTL_PARAM_ATTR_META
META_OUT = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_OUTPUT | uapi.TEE_IOCTL_PARAM_ATTR_META
USER = uapi.QCOMTEE_OBJREF_FLAG_USER
CRED = Credentials({CredentialKey.UID: 1000, CredentialKey.SYSTEM_TIME: 5}).encode()


class RawSupplicant:
    """Serves one credentials object (user id 1) over SUPPL_RECV/SEND, like libqcomtee."""

    def __init__(self, ctx: Context, mem: CheckedMemory) -> None:
        self.ctx, self.mem = ctx, mem
        self.releases: list[int] = []
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self) -> None:
        scratch = bytearray(1024)
        while True:
            params = [uapi.Param(META_IN, self.mem.map(scratch), 1024)] + [uapi.Param(0)] * 4
            block = bytearray(uapi.pack_arg(uapi.SuppRecvArg(0, 5), params))
            try:
                self.ctx.ioctl(uapi.TEE_IOC_SUPPL_RECV, self.buf(block))
            except DriverError:
                return
            head = uapi.SuppRecvArg.unpack(block)
            p = uapi.unpack_params(block, 8, head.num_params)
            if head.func == 0xFFFF:
                self.releases.append(p[0].a)
                continue
            reply: list[uapi.Param] = [uapi.Param(META_OUT, p[0].b)]
            if head.func == 0:  # getLength
                data = bytearray(struct.pack("<Q", len(CRED)))
                reply.append(uapi.Param(UB_OUT, self.mem.map(data), 8))
            else:  # readAtOffset
                (off,) = struct.unpack("<Q", self.mem.read(p[1].a, 8))
                data = bytearray(CRED[off : off + p[2].b])
                reply += [p[1], uapi.Param(UB_OUT, self.mem.map(data), len(data))]
            sblock = bytearray(uapi.pack_arg(uapi.SuppSendArg(0, len(reply)), reply))
            self.ctx.ioctl(uapi.TEE_IOC_SUPPL_SEND, self.buf(sblock))

    def buf(self, block: bytearray) -> bytearray:
        return bytearray(uapi.BufData(self.mem.map(block), len(block)).pack())


@pytest.fixture
def env() -> Iterator[tuple[Device, Context, CheckedMemory, RawSupplicant]]:
    mem = CheckedMemory()
    dev = Device(SecureWorld(QteeRoot()), memory=mem)
    ctx = dev.open()
    supp = RawSupplicant(ctx, mem)
    yield dev, ctx, mem, supp
    ctx.close()
    supp.thread.join(5)
    assert not supp.thread.is_alive()
    assert len(ctx.objects) == 0 and dev.world.live_ids() == [] and len(dev.ns) == 0


def invoke(ctx: Context, mem: CheckedMemory, obj: int, op: int, params: list[uapi.Param]):  # type: ignore[no-untyped-def]
    block = bytearray(uapi.pack_arg(uapi.ObjectInvokeArg(obj, op, 0, len(params)), params))
    ctx.ioctl(
        uapi.TEE_IOC_OBJECT_INVOKE, bytearray(uapi.BufData(mem.map(block), len(block)).pack())
    )
    return uapi.unpack_arg(uapi.ObjectInvokeArg, block)


@pytest.mark.parametrize("register_op", [2, 5])
def test_register_open_services_release(
    env: tuple[Device, Context, CheckedMemory, RawSupplicant], register_op: int
) -> None:
    dev, ctx, mem, supp = env
    head, p = invoke(
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
    head, p = invoke(ctx, mem, env_id, 0, [uapi.Param(UB_IN, mem.map(uid), 4), uapi.Param(OBJ_OUT)])
    assert head.ret == 0
    fv = p[1].a
    feature = bytearray(struct.pack("<I", 10))
    version = bytearray(4)
    head, _ = invoke(
        ctx,
        mem,
        fv,
        0,
        [uapi.Param(UB_IN, mem.map(feature), 4), uapi.Param(UB_OUT, mem.map(version), 4)],
    )
    (v,) = struct.unpack("<I", version)
    assert head.ret == 0 and ((v >> 22) & 0xFF, (v >> 12) & 0xFF, v & 0xFFF) == (2, 1, 0)

    uid[:] = struct.pack("<I", 143)
    head, p = invoke(ctx, mem, env_id, 0, [uapi.Param(UB_IN, mem.map(uid), 4), uapi.Param(OBJ_OUT)])
    heap = bytearray(24)
    head, _ = invoke(ctx, mem, p[1].a, 0, [uapi.Param(UB_OUT, mem.map(heap), 24)])
    assert head.ret == 0 and len(struct.unpack("<6I", heap)) == 6
    invoke(ctx, mem, p[1].a, 0xFFFF, [])

    uid[:] = struct.pack("<I", 99999)
    head, p = invoke(ctx, mem, env_id, 0, [uapi.Param(UB_IN, mem.map(uid), 4), uapi.Param(OBJ_OUT)])
    assert head.ret == 10 and (p[1].a, p[1].b) == (0, 0)  # IOpener NOT_FOUND

    invoke(ctx, mem, fv, 0xFFFF, [])
    assert supp.releases == []  # QTEE still holds the credentials object
    invoke(ctx, mem, env_id, 0xFFFF, [])
    for _ in range(500):
        if supp.releases:
            break
        threading.Event().wait(0.01)
    assert supp.releases == [1]  # released with the client env (§6 step 2)


def test_null_credentials_on_op5_is_einval(
    env: tuple[Device, Context, CheckedMemory, RawSupplicant],
) -> None:
    _, ctx, mem, _ = env
    with pytest.raises(DriverError) as exc:
        invoke(
            ctx,
            mem,
            uapi.TEE_OBJREF_NULL,
            5,
            [uapi.Param(OBJ_IN, uapi.TEE_OBJREF_NULL, 0), uapi.Param(OBJ_OUT)],
        )
    assert exc.value.errno == errno.EINVAL
    # op 2 with NULL credentials reaches QTEE (the kernel only guards op 5).
    head, p = invoke(
        ctx,
        mem,
        uapi.TEE_OBJREF_NULL,
        2,
        [uapi.Param(OBJ_IN, uapi.TEE_OBJREF_NULL, 0), uapi.Param(OBJ_OUT)],
    )
    assert head.ret == 0
    invoke(ctx, mem, p[1].a, 0xFFFF, [])
