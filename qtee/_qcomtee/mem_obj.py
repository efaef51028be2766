"""Memory objects (``qcomtee/mem_obj.c``): a shm passed to QTEE as ``OBJREF_INPUT {shm
id, MEM}`` is wrapped in a :class:`MemObject` -- a callback object that refuses every
direct op; QTEE maps it only through the primordial object's MAP_REGION."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from objects import DriverError
from qtee._qcomtee.object import CbObject
from qtee._qcomtee.shm import Shm

if TYPE_CHECKING:
    from qtee._qcomtee.call import Context

__all__ = ["MemObject", "mem_in"]


class MemObject(CbObject):
    """The kernel's wrapper of a shm passed to QTEE; direct ops are refused (-EINVAL)."""

    __slots__ = ("shm",)

    def __init__(self, shm: Shm) -> None:
        super().__init__()
        self.shm = shm

    def on_release(self) -> None:
        self.shm.put()


def mem_in(ctx: Context, shm_id: int) -> MemObject:
    """A shm of ``ctx`` named in an OBJREF param -> a new memory object (EINVAL if the
    shm does not exist or belongs to another context)."""
    shm = ctx.device.shm.lookup_get(shm_id) if shm_id <= 0x7FFF_FFFF else None
    if shm is None:
        raise DriverError(errno.EINVAL, f"shm {shm_id} does not exist")
    if shm.ctx is not ctx:
        shm.put()
        raise DriverError(errno.EINVAL, f"shm {shm_id} belongs to another context")
    return MemObject(shm)
