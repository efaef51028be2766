"""Shared and physical memory as the QTEE driver lends it (``qcomtee/shm.c`` and the
tzmem pool): the :class:`Shm` of SHM_ALLOC at a physical address, and page-granular
regions for shm buffers and the inbound/outbound buffers the driver lends for each SMC
(QK §3.1).  The host's is :class:`PhysMemory`; a guest's RAM is another
:class:`PhysSpace`.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import itertools
import mmap
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol

from objects import DriverError, Refcounted, UsageError
from qtee._tee.shm import PAGE_SIZE, ShmBuffer

if TYPE_CHECKING:
    from qtee._qcomtee.call import Context

__all__ = [
    "LEND_SLOT",
    "MAX_LEND",
    "PAGE_SIZE",
    "PhysFault",
    "PhysMemory",
    "PhysSpace",
    "Shm",
]

#: The largest SMC buffer (QK §3.1: inbound <= 4 MiB), and the address span of a lend.
MAX_LEND: Final = 4 << 20
LEND_SLOT: Final = 8 << 20


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
