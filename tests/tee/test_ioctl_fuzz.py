"""Random ioctls on both devices: only an errno ever leaves ``ioctl`` (issue 13 point 1).

Invariant, in one sentence (HABITS code 9): whatever the command, struct, sizes,
pointers and params, ``Context.ioctl`` returns 0 or raises :class:`objects.DriverError`
(an ``OSError`` with the kernel's errno), and once the fd is closed the device's tables
are empty.

Structs are drawn both as raw bytes and as well-formed ``tee_ioctl_buf_data`` blocks
with random params (attrs from every defined type, huge or unmapped pointers and sizes),
so the checks past the first are reached too.  A call that blocks (a SUPPL_RECV with a
good meta param and nothing queued) is ended by closing the fd, as a signal would.
"""

from __future__ import annotations

import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from objects import DriverError
from qtee import Device, OpteeDevice, uapi
from qtee.addrspace import CheckedMemory
from qtee.secure import QteeRoot, SecureWorld

CMDS = [
    uapi.TEE_IOC_VERSION,
    uapi.TEE_IOC_SHM_ALLOC,
    uapi.TEE_IOC_OPEN_SESSION,
    uapi.TEE_IOC_INVOKE,
    uapi.TEE_IOC_CANCEL,
    uapi.TEE_IOC_CLOSE_SESSION,
    uapi.TEE_IOC_SUPPL_RECV,
    uapi.TEE_IOC_SUPPL_SEND,
    uapi.TEE_IOC_SHM_REGISTER_FD,
    uapi.TEE_IOC_SHM_REGISTER,
    uapi.TEE_IOC_OBJECT_INVOKE,
]
HEADS = {  # header bytes before the params, and where num_params sits in it
    uapi.TEE_IOC_OBJECT_INVOKE: (24, 16),
    uapi.TEE_IOC_SUPPL_RECV: (8, 4),
    uapi.TEE_IOC_SUPPL_SEND: (8, 4),
    uapi.TEE_IOC_OPEN_SESSION: (56, 52),
    uapi.TEE_IOC_INVOKE: (24, 20),
}

u64 = st.one_of(
    st.sampled_from([0, 1, 8, 4096, 1 << 32, 1 << 47, 1 << 62, (1 << 64) - 1]),
    st.integers(0, (1 << 64) - 1),
)
attrs = st.one_of(
    st.sampled_from(sorted(uapi.VALID_PARAM_TYPES)),
    st.sampled_from([0x100 | 3, 0x100 | 2, 0x200, 4]),
    st.integers(0, 0xFFFF),
)


@st.composite
def structs(draw: st.DrawFn, cmd: int, mem: CheckedMemory) -> bytearray | memoryview:
    """The ioctl's own struct: raw bytes, or a buf_data at a random block."""
    if cmd in HEADS and draw(st.booleans()):
        head, at = HEADS[cmd]
        n = draw(st.integers(0, 6))
        block = bytearray(draw(st.binary(min_size=head, max_size=head)))
        block[at : at + 4] = draw(st.sampled_from([n, n + 1, 0xFFFF_FFFF])).to_bytes(4, "little")
        for _ in range(n):
            attr = draw(attrs)
            mapped = bytearray(draw(st.integers(0, 64)))
            a = draw(st.one_of(u64, st.just(mem.map(mapped))))
            b = draw(st.one_of(u64, st.just(len(mapped))))
            c = draw(u64)
            block += uapi.Param(attr, a, b, c).pack()
        length = draw(st.sampled_from([len(block), len(block) - 1, 0, 1 << 20]))
        ptr = draw(st.one_of(st.just(mem.map(block)), u64))
        raw = bytearray(uapi.BufData(ptr, length).pack())
    else:
        raw = bytearray(draw(st.binary(max_size=64)))
        if len(raw) >= 8 and draw(st.booleans()):  # a size word of note (SHM_ALLOC, ...)
            raw[:8] = draw(u64).to_bytes(8, "little")
    kind = draw(st.sampled_from(["bytearray", "view", "read-only", "u32 items"]))
    if kind == "view":
        return memoryview(raw)
    if kind == "read-only":
        return memoryview(bytes(raw))
    if kind == "u32 items" and len(raw) % 4 == 0:
        return memoryview(raw).cast("I")
    return raw


def _run(ctx: object, cmd: int, arg: bytearray | memoryview) -> None:
    """The call, ended by a close of the fd if it blocks (a RECV with nothing queued)."""
    stop = threading.Timer(1.0, ctx.close)  # type: ignore[attr-defined]
    stop.start()
    try:
        ctx.ioctl(cmd, arg)  # type: ignore[attr-defined]
    except DriverError:
        pass
    finally:
        stop.cancel()


SETTINGS = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)


@pytest.mark.parametrize("flavour", ["qtee", "optee", "optee supplicant"])
@SETTINGS
@given(data=st.data())
def test_only_an_errno_leaves_ioctl(flavour: str, data: st.DataObject) -> None:
    mem = CheckedMemory()
    world = SecureWorld(QteeRoot())
    dev: Device | OpteeDevice
    if flavour == "qtee":
        dev = Device(world, memory=mem)
        ctx: object = dev.open()
    else:
        dev = OpteeDevice(world, memory=mem)
        ctx = dev.open_supplicant() if flavour == "optee supplicant" else dev.open()
    try:  # a draw may end the example half-way (hypothesis ran out of data): close anyway
        for _ in range(data.draw(st.integers(1, 4))):
            cmd = data.draw(st.one_of(st.sampled_from(CMDS), st.integers(0, 0xFFFF_FFFF)))
            _run(ctx, cmd, data.draw(structs(cmd, mem)))
    finally:
        ctx.close()  # type: ignore[attr-defined]
    assert dev.leaks() == {}
