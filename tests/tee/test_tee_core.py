"""The TEE core both drivers share (issue 17 "drivers/tee as the map": one ioctl switch,
one fd lifetime, one shm allocation and id table; qtee-kernel.md §5, optee.md §2).

Each check runs against a QTEE fd and an OP-TEE fd alike: what the core decides (an op
the driver lacks, SHM_ALLOC's checks and ids, EBADF after close) is the same errno from
both, and a failing ioctl writes nothing back.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest

from objects import DriverError
from qtee import Context, Device, OpteeContext, OpteeDevice, uapi
from qtee._tee.core import TeeFile
from qtee._tee.shm import SHM_MAX

Fd = Context | OpteeContext


@pytest.fixture(params=["qtee", "optee"])
def fd(request: pytest.FixtureRequest) -> Iterator[Fd]:
    device: Device | OpteeDevice = Device() if request.param == "qtee" else OpteeDevice()
    ctx = device.open()
    try:
        yield ctx
    finally:
        ctx.close()
    assert device.leaks() == {}


def alloc(size: int, flags: int = 0) -> bytearray:
    arg = bytearray(uapi.ShmAllocData.SIZE)
    uapi.ShmAllocData(size, flags, 0).pack_into(arg)
    return arg


def expect(code: int, ctx: Fd, cmd: int, arg: bytearray) -> None:
    before = bytes(arg)
    with pytest.raises(DriverError) as exc:
        ctx.ioctl(cmd, arg)
    assert exc.value.errno == code
    assert bytes(arg) == before


def test_one_switch_for_both_drivers() -> None:
    """The ioctl switch, the lifetime and the shm fds live once, in the core."""
    for cls in (Context, OpteeContext):
        assert issubclass(cls, TeeFile)
        for name in ("ioctl", "_dispatch", "recv_nowait", "close", "abandon", "shm_free"):
            assert name not in vars(cls), (cls, name)


def test_an_op_the_driver_lacks_is_einval(fd: Fd) -> None:
    """§5 / tee_core.c: an ioctl whose op the driver has not is EINVAL, nothing written:
    qcomtee has no GP sessions, optee no object invoke; an unknown number too."""
    lacking = (
        [uapi.TEE_IOC_OPEN_SESSION, uapi.TEE_IOC_INVOKE, uapi.TEE_IOC_CANCEL]
        if isinstance(fd, Context)
        else [uapi.TEE_IOC_OBJECT_INVOKE, uapi.TEE_IOC_SUPPL_RECV, uapi.TEE_IOC_SUPPL_SEND]
    )
    for cmd in [*lacking, 0xDEAD]:
        expect(errno.EINVAL, fd, cmd, bytearray(64))


def test_shm_alloc_checks_and_ids_are_the_cores(fd: Fd) -> None:
    """tee_ioctl_shm_alloc: flags EINVAL, past the largest allocation ENOMEM, both with
    nothing written and no id taken; ids are the lowest free from 1, device-wide."""
    expect(errno.EINVAL, fd, uapi.TEE_IOC_SHM_ALLOC, alloc(16, flags=1))
    expect(errno.ENOMEM, fd, uapi.TEE_IOC_SHM_ALLOC, alloc(SHM_MAX + 1))
    ids = []
    for size in (16, 32):
        arg = alloc(size)
        assert fd.ioctl(uapi.TEE_IOC_SHM_ALLOC, arg) == 0
        ids.append(uapi.ShmAllocData.unpack(arg).id)
    assert ids == [1, 2]
    assert len(fd.shm_view(2)) == 32
    fd.shm_free(1)
    with pytest.raises(DriverError) as exc:
        fd.shm_free(1)
    assert exc.value.errno == errno.EBADF
    arg = alloc(8)
    fd.ioctl(uapi.TEE_IOC_SHM_ALLOC, arg)
    assert uapi.ShmAllocData.unpack(arg).id == 1


def test_closed_fd_is_ebadf(fd: Fd) -> None:
    """tee_release: after close, every ioctl fails EBADF (the fd number is gone)."""
    fd.close()
    arg = bytearray(uapi.VersionData.SIZE)
    expect(errno.EBADF, fd, uapi.TEE_IOC_VERSION, arg)
    assert fd.closed and fd.life.released.is_set()
