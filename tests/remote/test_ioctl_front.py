"""``RemoteContext.ioctl`` lets the common ioctl (a ``bytearray`` for OBJECT_INVOKE,
SUPPL_RECV or SUPPL_SEND, whose struct the kernel only reads) past its argument checks
at once (issue 18); every other goes through ``_checked_arg``.  Whenever the short test
lets a call through, the checks would have let it through too, with the same bytes."""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

import qtee
from objects import DriverError
from qtee import DeviceServer, uapi
from qtee._remote.remote import _PLAIN, _checked_arg

_CMDS = [
    uapi.TEE_IOC_OBJECT_INVOKE,
    uapi.TEE_IOC_SUPPL_RECV,
    uapi.TEE_IOC_SUPPL_SEND,
    uapi.TEE_IOC_VERSION,
    uapi.TEE_IOC_SHM_ALLOC,
    float(uapi.TEE_IOC_OBJECT_INVOKE),  # equal to a common one, but no int
    True,
    1 << 32,
    -1,
]


class _Bytearray(bytearray):
    pass


def _args() -> list[object]:
    raw = bytes(range(16))
    return [bytearray(raw), raw, memoryview(bytearray(raw)), _Bytearray(raw), "x", None]


def _errno(ioctl: Callable[[object, object], object], cmd: object, arg: object) -> object:
    try:
        ioctl(cmd, arg)
    except DriverError as exc:
        return exc.code
    return 0


@pytest.mark.parametrize("cmd", [*_CMDS, [1], "x", None], ids=repr)
def test_every_ioctl_fails_across_the_socket_as_it_does_in_process(
    qtee_server: DeviceServer, cmd: object
) -> None:
    """Whatever the front lets through at once or sends to ``_checked_arg``, the errno is
    the in-process driver's, for each argument kind."""
    local = qtee.Device().open()
    remote = qtee.connect(qtee_server.path).open()
    try:
        for arg in _args():
            here = _errno(local.ioctl, cmd, arg)  # type: ignore[arg-type]
            there = _errno(remote.ioctl, cmd, arg)  # type: ignore[arg-type]
            assert there == here, (cmd, arg)
    finally:
        remote.close()
        local.close()


@pytest.mark.parametrize("cmd", [[1], "x", None], ids=repr)
def test_a_command_that_is_no_int_is_einval_whatever_the_argument(
    qtee_server: DeviceServer, cmd: object
) -> None:
    """A command of no int type (unhashable, too) is EINVAL before any lookup by it."""
    remote = qtee.connect(qtee_server.path).open()
    try:
        for arg in _args():
            assert _errno(remote.ioctl, cmd, arg) == errno.EINVAL, arg  # type: ignore[arg-type]
    finally:
        remote.close()


@pytest.mark.parametrize("cmd", sorted(_PLAIN), ids=hex)
def test_checked_arg_passes_a_bytearray_for_a_common_ioctl_whole(cmd: int) -> None:
    """What the front's short test lets through, ``_checked_arg`` passes with the same
    bytes (so the short test only skips work)."""
    arg = bytearray(range(16))
    assert _checked_arg(cmd, arg) == bytes(arg)
