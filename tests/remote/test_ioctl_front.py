"""``RemoteContext.ioctl`` lets the common ioctl (a ``bytearray`` for OBJECT_INVOKE,
SUPPL_RECV or SUPPL_SEND, whose struct the kernel only reads) past its argument checks
at once (issue 18); every other goes through ``_checked_arg``.  Whenever the short test
lets a call through, the checks would have let it through too, with the same bytes."""

from __future__ import annotations

import errno

import pytest

from objects import DriverError
from qtee import uapi
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


@pytest.mark.parametrize("cmd", _CMDS, ids=repr)
def test_the_short_test_passes_only_what_the_checks_pass(cmd: object) -> None:
    for arg in _args():
        short = type(arg) is bytearray and cmd in _PLAIN and type(cmd) is int
        try:
            general: object = _checked_arg(cmd, arg)  # type: ignore[arg-type]
        except DriverError as exc:
            general = exc.code
        if short:
            assert isinstance(arg, bytearray)
            assert general == bytes(arg)
        else:
            assert general in (errno.EFAULT, errno.EINVAL) or isinstance(general, bytes)
