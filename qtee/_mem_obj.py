"""Shared memory, memory objects and the primordial object (``mem_obj.c``, ``primordial_obj.c``).

``TEE_IOC_SHM_ALLOC`` creates a :class:`Shm` (ids from 1, device-wide) backed by a
zeroed buffer at a model physical address.  Passing it to QTEE as
``OBJREF_INPUT {shm id, MEM}`` wraps it in a :class:`MemObject` -- a callback object
that refuses every direct op; QTEE maps it only through the primordial object's
MAP_REGION, which answers ``{u64 paddr; u64 len; u32 perms}`` and hands the same
memory back as the mapping object.

Physical memory (:class:`PhysSpace`, the host's :class:`PhysMemory`) holds those buffers
and the inbound/outbound buffers the driver lends for each SMC (QK §3.1: page granular).
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import itertools
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol, TypeAlias

from objects import DriverError, Refcounted, UsageError
from qtee._user_obj import CbObject

if TYPE_CHECKING:
    from qtee._driver import Context

__all__ = [
    "PAGE_SIZE",
    "SHM_MAX",
    "QCOMTEE_OBJECT_OP_MAP_REGION",
    "QCOMTEE_OBJECT_OP_SLEEP",
    "QCOMTEE_OBJECT_OP_YIELD",
    "MemObject",
    "PhysFault",
    "PhysMemory",
    "PhysSpace",
    "Primordial",
    "Shm",
    "ShmBacking",
    "ShmBuffer",
    "discard_backing",
    "memfd_backing",
]

QCOMTEE_OBJECT_OP_MAP_REGION: Final = 0
QCOMTEE_OBJECT_OP_YIELD: Final = 1
QCOMTEE_OBJECT_OP_SLEEP: Final = 2
QCOM_SCM_PERM_RW: Final = 6
_REGION: Final = struct.Struct("<QQI")
#: Physical memory is handed out in whole pages (QK §3.1 "page granular").
PAGE_SIZE: Final = 4096
#: The largest SHM_ALLOC: qcomtee's pool takes a shm's pages with ``alloc_pages_exact``
#: (``tee_dyn_shm_alloc_helper``), which cannot go past 2**MAX_PAGE_ORDER contiguous
#: pages -- 4 MiB with arm64's 4 KiB pages and the default order 10; past it, ENOMEM.
SHM_MAX: Final = PAGE_SIZE << 10
#: The largest SMC buffer (QK §3.1: inbound <= 4 MiB), and the address span of a lend.
MAX_LEND: Final = 4 << 20
LEND_SLOT: Final = 8 << 20

#: What a shm's bytes live in: a private buffer, a mapping of a memory file, or a view
#: of pages someone else owns (a guest's RAM).
ShmBuffer: TypeAlias = bytearray | mmap.mmap | memoryview
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


def discard_backing(buf: ShmBuffer, fd: int | None) -> None:
    """Undo a backing's buffer that never became a shm: close its file, unmap it."""
    if fd is not None:
        os.close(fd)
    if isinstance(buf, mmap.mmap):
        with contextlib.suppress(BufferError):
            buf.close()


class MemfdShm:
    """An OP-TEE shm's memory file: its fd until taken (SHM_ALLOC hands it out), and
    the mapping the TA sees."""

    __slots__ = ("buf", "fd")

    def __init__(self, buf: ShmBuffer, fd: int | None) -> None:
        self.buf = buf
        self.fd = fd

    @classmethod
    def allocate(cls, size: int) -> tuple[bytearray | memoryview, MemfdShm]:
        """A fresh memory file of ``size`` bytes: the view for the shm, and its owner;
        ENOMEM when the file cannot be made."""
        try:
            buf, fd = memfd_backing(size)
        except OSError as exc:
            raise DriverError(errno.ENOMEM, f"cannot allocate {size} bytes: {exc}") from None
        view = buf if isinstance(buf, bytearray) else memoryview(buf)  # size 0: nothing mapped
        return view, cls(buf, fd)

    def take_fd(self) -> int | None:
        fd, self.fd = self.fd, None
        return fd

    def close(self) -> None:
        """Close the fd if still held, and unmap (later, with the last view, if one is
        still open)."""
        discard_backing(self.buf, self.take_fd())


class PhysFault(UsageError):
    """A physical address names no region of this memory (or the wrong kind of one)."""


class PhysSpace(Protocol):
    """Physical memory as a driver model sees it: where shm and SMC buffers live.

    The host's is :class:`PhysMemory`; a guest's RAM (``qtee.vm``) is another, whose
    ``lend`` copies into guest pages and ``take_back`` copies back out.
    """

    def add(self, buf: ShmBuffer) -> int:
        """Place ``buf`` (a shm's bytes) at a new page-aligned address."""
        ...

    def remove(self, paddr: int) -> None:
        """Forget the region :meth:`add` placed at ``paddr``."""
        ...

    def view(self, paddr: int, length: int) -> memoryview:
        """The bytes at ``[paddr, paddr+length)``, inside one region; else :class:`PhysFault`."""
        ...

    def lend(self, buf: bytearray) -> int:
        """Put an SMC buffer at a page-aligned address until :meth:`take_back` (a driver
        lends each call's inbound, and keeps its outbound pages lent while it has an
        open context; it reads those through :meth:`view`)."""
        ...

    def take_back(self, paddr: int) -> None:
        """End a :meth:`lend`: the bytes at ``paddr`` are the lent buffer's again."""
        ...

    def __len__(self) -> int:
        """Regions held: those placed with :meth:`add` (or allocated) and not removed
        (a space may count its lends too)."""
        ...


class PhysMemory:
    """Host-physical memory: page-aligned regions (shm, guest RAM) and lent SMC buffers.

    Regions placed with :meth:`add`/:meth:`alloc` get addresses upwards from :attr:`BASE`,
    never reused, each followed by an unmapped guard page, so a stale address names
    nothing and no range spans two regions.  SMC buffers placed with :meth:`lend` live in
    a window of their own at :attr:`LEND_BASE`, one :data:`LEND_SLOT` each (the largest
    SMC buffer, 4 MiB, plus guard pages), reused once taken back -- like the kernel's pool
    pages.  On the host a lend is an alias: the secure side sees the buffer itself, no
    copy.  A range at a region's exact start is one dict lookup (the SMC case); inside a
    lend it is slot arithmetic; inside a region a bisection over the sorted starts.
    """

    BASE: Final = 0x8_0000_0000
    LEND_BASE: Final = 0x800_0000_0000
    LIMIT: Final = 1 << 64

    def __init__(self) -> None:
        self._regions: dict[int, ShmBuffer] = {}  # added and allocated regions, by start
        self._starts: list[int] = []  # their starts, sorted
        self._next = self.BASE
        self._lock = threading.Lock()  # guards _regions/_starts/_next together
        # Lends: single dict/list operations only, each atomic, so no lock on the SMC path.
        self._lent: dict[int, bytearray] = {}
        #: The buffer lent at exactly this address, or None: one dict lookup, no view
        #: (the secure side's fast path to an SMC buffer).
        self.lent_at: Callable[[int], bytearray | None] = self._lent.get
        self._free_slots: list[int] = []
        self._slots = itertools.count(self.LEND_BASE, LEND_SLOT)

    def add(self, buf: ShmBuffer) -> int:
        """Place ``buf`` at a new page-aligned physical address (no copy)."""
        if not isinstance(buf, bytearray | mmap.mmap | memoryview):
            raise TypeError(
                f"a region is a bytearray, mmap or memoryview, not {type(buf).__name__}"
            )
        if isinstance(buf, memoryview) and (buf.readonly or buf.itemsize != 1 or buf.ndim != 1):
            raise TypeError("a memoryview region must be writable, one-dimensional bytes")
        span = ((len(buf) + PAGE_SIZE - 1) & -PAGE_SIZE or PAGE_SIZE) + PAGE_SIZE
        with self._lock:
            paddr = self._next
            if paddr + span > self.LEND_BASE:
                raise DriverError(errno.ENOMEM, "physical address space exhausted")
            self._next = paddr + span
            self._regions[paddr] = buf
            self._starts.append(paddr)  # the highest start so far: still sorted
            return paddr

    def alloc(self, size: int) -> int:
        """A new zeroed region of whole pages (at least ``size`` bytes); its address."""
        if not isinstance(size, int) or isinstance(size, bool):
            raise TypeError(f"size must be an int, not {type(size).__name__}")
        if not 0 < size < self.LEND_BASE - self.BASE:
            raise PhysFault(f"cannot allocate {size} bytes")
        return self.add(bytearray((size + PAGE_SIZE - 1) & -PAGE_SIZE))

    def remove(self, paddr: int) -> None:
        """Forget the region :meth:`add` or :meth:`alloc` placed at ``paddr``."""
        with self._lock:
            if self._regions.pop(paddr, None) is None:
                what = (
                    "is lent (take_back ends a lend)" if paddr in self._lent else "names no region"
                )
                raise PhysFault(f"physical address {paddr:#x} {what}")
            starts = self._starts
            del starts[bisect.bisect_left(starts, paddr)]

    def lend(self, buf: bytearray) -> int:
        """Place an SMC buffer for one call: on the host, an alias of ``buf`` (no copy)."""
        if type(buf) is not bytearray:
            raise TypeError(f"only a bytearray can be lent, not {type(buf).__name__}")
        if len(buf) > MAX_LEND:
            raise PhysFault(f"an SMC buffer is at most {MAX_LEND} bytes, not {len(buf)}")
        try:
            paddr = self._free_slots.pop()
        except IndexError:
            paddr = next(self._slots)
        self._lent[paddr] = buf
        return paddr

    def take_back(self, paddr: int) -> None:
        """End the lend at ``paddr`` (on the host the bytes already are the buffer's)."""
        if self._lent.pop(paddr, None) is None:
            raise PhysFault(f"physical address {paddr!r} is not lent")
        self._free_slots.append(paddr)

    def buffer(self, paddr: int, length: int) -> bytearray | memoryview:
        """The lent buffer itself when ``[paddr, paddr+length)`` is exactly one lend (no
        view made: what the secure side uses for SMC buffers); else :meth:`view`."""
        buf = self._lent.get(paddr)
        if buf is not None and len(buf) == length:
            return buf
        return self.view(paddr, length)

    def view(self, paddr: int, length: int) -> memoryview:
        """The bytes at ``[paddr, paddr+length)``; the range must lie in one region."""
        if not isinstance(paddr, int) or not isinstance(length, int):
            raise TypeError("a physical range is two ints")
        buf: ShmBuffer | None = None
        start = paddr
        if length >= 0 and self.BASE <= paddr < self.LEND_BASE:
            with self._lock:
                buf = self._regions.get(paddr)
                if buf is None:
                    i = bisect.bisect_right(self._starts, paddr) - 1
                    if i >= 0:
                        start = self._starts[i]
                        buf = self._regions.get(start)
        elif length >= 0 and paddr >= self.LEND_BASE:
            start = paddr - (paddr - self.LEND_BASE) % LEND_SLOT
            buf = self._lent.get(start)
        if buf is None or paddr + length > start + len(buf):
            raise PhysFault(f"physical range {paddr:#x}+{length} is not mapped")
        return memoryview(buf)[paddr - start : paddr - start + length]

    def lent(self) -> int:
        """SMC buffers lent now (0 when no call is in flight)."""
        return len(self._lent)

    def __len__(self) -> int:
        return len(self._regions)


class Shm(Refcounted):
    """A shared buffer from SHM_ALLOC; freed when its last reference goes.

    ``fd`` is the memory file behind ``buf`` while this side still holds it (a device
    server hands it to the client and closes its copy)."""

    __slots__ = ("buf", "ctx", "fd", "id", "paddr", "phys")

    def __init__(
        self, ctx: Context, shm_id: int, buf: ShmBuffer, fd: int | None, phys: PhysSpace
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
