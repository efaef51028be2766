"""The primordial object (``qcomtee/primordial_obj.c``): the kernel-hosted object at wire
id 0x80000000 that QTEE asks to map a memory object (MAP_REGION, answering ``{u64
paddr; u64 len; u32 perms}`` and the same memory back as the mapping object), to yield
or to sleep."""

from __future__ import annotations

import enum
import errno
import struct
import time
from typing import Final

from qtee._qcomtee.mem_obj import MemObject
from qtee._qcomtee.object import CbObject

__all__ = ["Primordial", "PrimordialOp"]


class PrimordialOp(enum.IntEnum):
    """The primordial object's ops, by the kernel's names."""

    QCOMTEE_OBJECT_OP_MAP_REGION = 0
    QCOMTEE_OBJECT_OP_YIELD = 1
    QCOMTEE_OBJECT_OP_SLEEP = 2


_OP = PrimordialOp
QCOM_SCM_PERM_RW: Final = 6
_REGION: Final = struct.Struct("<QQI")


class Primordial(CbObject):
    """The kernel-hosted object at wire id 0x80000000 (not refcounted)."""

    __slots__ = ()

    def get(self) -> bool:
        return True

    def put(self) -> bool:
        return False

    def dispatch(
        self, op: int, ib: tuple[bytes, ...], ob: tuple[int, ...], io: tuple[object, ...], n_oo: int
    ) -> tuple[int, list[bytes], list[object]]:
        """MAP_REGION, YIELD, SLEEP; anything else -EINVAL (QTEE sees UNAVAIL)."""
        if op == _OP.QCOMTEE_OBJECT_OP_MAP_REGION:
            if len(ib) != 0 or len(ob) != 1 or len(io) != 1 or n_oo != 1 or ob[0] < _REGION.size:
                return -errno.EINVAL, [], []
            mem = io[0]
            if not isinstance(mem, MemObject) or not mem.get():
                return -errno.EINVAL, [], []
            region = _REGION.pack(mem.shm.paddr, len(mem.shm.buf), QCOM_SCM_PERM_RW)
            return 0, [region], [mem]  # the mapping object: the same memory, +1 ref
        if op == _OP.QCOMTEE_OBJECT_OP_YIELD:
            time.sleep(0)
            return 0, [], []
        if op == _OP.QCOMTEE_OBJECT_OP_SLEEP:
            if len(ib) != 1 or len(ob) or len(io) or n_oo or len(ib[0]) < 4:
                return -errno.EINVAL, [], []
            time.sleep(struct.unpack_from("<I", ib[0])[0] / 1000)
            return 0, [], []
        return -errno.EINVAL, [], []
