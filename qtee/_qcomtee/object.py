"""The kernel's object kinds (``qcomtee_object.h``): a QTEE-hosted object held by the
driver, and the callback objects the driver hosts for QTEE (user, memory, primordial).

A callback object crossing to QTEE gets an NS id from the device's table, in
``[QCOMTEE_OBJECT_ID_START, QCOMTEE_OBJECT_ID_END]`` (cyclic, QK §2.2).
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from objects import Refcounted
from qtee import wire

if TYPE_CHECKING:
    from qtee._qcomtee.core import Device

__all__ = ["QCOMTEE_OBJECT_ID_END", "QCOMTEE_OBJECT_ID_START", "CbObject", "QteeObject"]

QCOMTEE_OBJECT_ID_START: Final = wire.QCOMTEE_MSG_OBJECT_NS_BIT + 1
QCOMTEE_OBJECT_ID_END: Final = 0xFFFF_FFFF


class QteeObject(Refcounted):
    """The kernel's wrapper of a QTEE-hosted object (one QTEE reference)."""

    __slots__ = ("device", "qtee_id")

    def __init__(self, device: Device, qtee_id: int) -> None:
        super().__init__()
        self.device = device
        self.qtee_id = qtee_id

    def on_release(self) -> None:
        self.device._release_qtee(self.qtee_id)


class CbObject(Refcounted):
    """A kernel-hosted ("callback") object QTEE can invoke through an NS id."""

    __slots__ = ()

    def dispatch(
        self, op: int, ib: tuple[bytes, ...], ob: tuple[int, ...], io: tuple[object, ...], n_oo: int
    ) -> tuple[int, Sequence[bytes], Sequence[object]]:
        """Serve ``op``: (errno-style status, OB data, OO objects).  Default: -EINVAL."""
        return -errno.EINVAL, [], []
