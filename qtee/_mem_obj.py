"""Shared memory, memory objects and the primordial object (``mem_obj.c``, ``primordial_obj.c``).

``TEE_IOC_SHM_ALLOC`` creates a :class:`Shm` (ids from 1, device-wide) backed by a
zeroed buffer at a model physical address.  Passing it to QTEE as
``OBJREF_INPUT {shm id, MEM}`` wraps it in a :class:`MemObject` -- a callback object
that refuses every direct op; QTEE maps it only through the primordial object's
MAP_REGION, which answers ``{u64 paddr; u64 len; u32 perms}`` and hands the same
memory back as the mapping object.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, TypeAlias

from objects import Refcounted
from qtee._user_obj import CbObject

if TYPE_CHECKING:
    from qtee._driver import Context

__all__ = [
    "QCOMTEE_OBJECT_OP_MAP_REGION",
    "QCOMTEE_OBJECT_OP_SLEEP",
    "QCOMTEE_OBJECT_OP_YIELD",
    "MemObject",
    "PhysMemory",
    "Primordial",
    "Shm",
    "ShmBacking",
    "ShmBuffer",
    "memfd_backing",
]

QCOMTEE_OBJECT_OP_MAP_REGION: Final = 0
QCOMTEE_OBJECT_OP_YIELD: Final = 1
QCOMTEE_OBJECT_OP_SLEEP: Final = 2
QCOM_SCM_PERM_RW: Final = 6
_REGION: Final = struct.Struct("<QQI")
_PAGE: Final = 4096

#: What a shm's bytes live in: a private buffer, or a mapping of a memory file.
ShmBuffer: TypeAlias = bytearray | mmap.mmap
#: Makes the buffer of a new shm of a size: the buffer and the fd of the file behind it
#: (None for a private buffer).  Raises OSError when memory runs out.
ShmBacking: TypeAlias = Callable[[int], tuple[ShmBuffer, int | None]]


def private_backing(size: int) -> tuple[ShmBuffer, int | None]:
    """A zeroed private buffer (the in-process default)."""
    return bytearray(size), None


def memfd_backing(size: int) -> tuple[ShmBuffer, int | None]:
    """A zeroed anonymous memory file and its shared mapping: the fd can be handed to
    another process, which maps the same pages (what the kernel's shm fd is for)."""
    fd = os.memfd_create("qtee-shm", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        buf: ShmBuffer = mmap.mmap(fd, size) if size else bytearray()
    except BaseException:
        os.close(fd)
        raise
    return buf, fd


class PhysMemory:
    """Model physical memory: page-aligned regions handed out for shared buffers."""

    BASE: Final = 0x8_0000_0000

    def __init__(self) -> None:
        self._regions: dict[int, ShmBuffer] = {}
        self._next = self.BASE
        self._lock = threading.Lock()

    def add(self, buf: ShmBuffer) -> int:
        """Place ``buf`` at a new physical address."""
        with self._lock:
            paddr = self._next
            self._next += (max(len(buf), 1) + _PAGE - 1) // _PAGE * _PAGE + _PAGE
            self._regions[paddr] = buf
            return paddr

    def remove(self, paddr: int) -> None:
        """Forget the region at ``paddr``."""
        with self._lock:
            self._regions.pop(paddr, None)

    def view(self, paddr: int, length: int) -> memoryview:
        """The bytes at ``[paddr, paddr+length)``; the range must lie in one region."""
        with self._lock:
            for start, buf in self._regions.items():
                if start <= paddr and paddr + length <= start + len(buf):
                    return memoryview(buf)[paddr - start : paddr - start + length]
        raise ValueError(f"physical range {paddr:#x}+{length} is not mapped")

    def __len__(self) -> int:
        return len(self._regions)


class Shm(Refcounted):
    """A shared buffer from SHM_ALLOC; freed when its last reference goes.

    ``fd`` is the memory file behind ``buf`` while this side still holds it (a device
    server hands it to the client and closes its copy)."""

    __slots__ = ("buf", "ctx", "fd", "id", "paddr", "phys")

    def __init__(
        self, ctx: Context, shm_id: int, buf: ShmBuffer, fd: int | None, phys: PhysMemory
    ) -> None:
        super().__init__()
        self.ctx = ctx
        self.id = shm_id
        self.buf = buf
        self.fd = fd
        self.phys = phys
        self.paddr = phys.add(self.buf)

    def take_fd(self) -> int | None:
        """Hand over the memory file's fd (the caller closes it); None when there is none."""
        fd, self.fd = self.fd, None
        return fd

    def on_release(self) -> None:
        self.phys.remove(self.paddr)
        self.ctx.device.shm.erase_if(self.id, self)
        fd = self.take_fd()
        if fd is not None:
            os.close(fd)
        if isinstance(self.buf, mmap.mmap):
            with contextlib.suppress(BufferError):  # a view still open: unmapped when it goes
                self.buf.close()


class MemObject(CbObject):
    """The kernel's wrapper of a shm passed to QTEE; direct ops are refused (-EINVAL)."""

    __slots__ = ("shm",)

    def __init__(self, shm: Shm) -> None:
        super().__init__()
        self.shm = shm

    def on_release(self) -> None:
        self.shm.put()


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
        if op == QCOMTEE_OBJECT_OP_MAP_REGION:
            if len(ib) != 0 or len(ob) != 1 or len(io) != 1 or n_oo != 1 or ob[0] < _REGION.size:
                return -errno.EINVAL, [], []
            mem = io[0]
            if not isinstance(mem, MemObject) or not mem.get():
                return -errno.EINVAL, [], []
            region = _REGION.pack(mem.shm.paddr, len(mem.shm.buf), QCOM_SCM_PERM_RW)
            return 0, [region], [mem]  # the mapping object: the same memory, +1 ref
        if op == QCOMTEE_OBJECT_OP_YIELD:
            time.sleep(0)
            return 0, [], []
        if op == QCOMTEE_OBJECT_OP_SLEEP:
            if len(ib) != 1 or len(ob) or len(io) or n_oo or len(ib[0]) < 4:
                return -errno.EINVAL, [], []
            time.sleep(struct.unpack_from("<I", ib[0])[0] / 1000)
            return 0, [], []
        return -errno.EINVAL, [], []
