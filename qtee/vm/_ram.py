"""Guest RAM: guest-physical addresses over one host region, with per-page pins.

A guest's RAM is one host-contiguous buffer placed in host-physical memory (like a
hugepage-backed guest): MAP_REGION answers a single ``{paddr, len}`` (qtee-kernel.md
§2.4), so memory shared with QTEE must be contiguous on the host.  Guest-physical
addresses start at :data:`GUEST_RAM_BASE`, not 0: optee.md §6.2 notes that RAM at IPA 0
collides with "PA 0 = NULL memref".

Two sides use it:

* the **guest kernel** (its driver model's physical space): :meth:`GuestRam.alloc`,
  :meth:`~GuestRam.backing` for SHM_ALLOC, :meth:`~GuestRam.lend` /
  :meth:`~GuestRam.take_back` for the SMC buffers (copied into and out of guest pages,
  page granular and zero-filled as the driver pool's, qtee-kernel.md §3.1);
* the **VMM**: :meth:`~GuestRam.translate` (IPA -> host PA), :meth:`~GuestRam.read` /
  :meth:`~GuestRam.write` / :meth:`~GuestRam.copy_into` (IPA -> VMM memory),
  :meth:`~GuestRam.pin` / :meth:`~GuestRam.unpin` (long-lived, counted per page) and
  :meth:`~GuestRam.pin_smc` / :meth:`~GuestRam.unpin_smc` (an SMC's two buffers for
  one call, kept as that call's ranges); :meth:`~GuestRam.discard` (balloon, unmap)
  refuses pinned pages with EBUSY (optee.md §6.1: "no swap, ownership transfer or unmap
  while shared"), and so does :meth:`~GuestRam.close` while anything is pinned.

A range the guest names outside its RAM is :class:`GuestFault` (EFAULT).
"""

from __future__ import annotations

import bisect
import errno
import threading
from typing import Final, NamedTuple, Protocol

from objects import DriverError, UsageError

__all__ = ["GUEST_RAM_BASE", "PAGE_SIZE", "GuestFault", "GuestRam", "HostPhys", "Pin"]

#: Guest-physical address of the first byte of every guest's RAM.
GUEST_RAM_BASE: Final = 0x4000_0000
PAGE_SIZE: Final = 4096
_SHIFT: Final = 12
_PAGE_MASK: Final = PAGE_SIZE - 1
_KEEP_ASIDE: Final = 64


class HostPhys(Protocol):
    """What guest RAM needs of host-physical memory: a place for its one region."""

    def add(self, buf: bytearray) -> int:
        """Place ``buf`` at a new page-aligned host-physical address."""
        ...

    def remove(self, paddr: int) -> None:
        """Forget the region at ``paddr``."""
        ...


class GuestFault(DriverError):
    """A guest-physical range outside the guest's RAM (EFAULT)."""

    def __init__(self, detail: str) -> None:
        super().__init__(errno.EFAULT, detail)


class Pin(NamedTuple):
    """Pages held by the VMM: ``pages`` guest frames from ``first_gfn`` (gpa >> 12).

    Immutable (a named tuple: one is made per SMC buffer on the call path)."""

    first_gfn: int
    pages: int


_new_pin: Final = tuple.__new__


class GuestRam:
    """One guest's RAM of ``size`` bytes, placed in ``host`` (see the module docstring)."""

    __slots__ = (
        "_backed",
        "_buf",
        "_calls",
        "_closed",
        "_free_lens",
        "_free_starts",
        "_lent",
        "_lock",
        "_mv",
        "_one",
        "_pinned",
        "_pins",
        "_regions",
        "base",
        "host",
        "hpa",
        "size",
    )

    def __init__(self, size: int, host: HostPhys) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size % PAGE_SIZE:
            raise UsageError(f"guest RAM size must be a positive multiple of 4096, not {size!r}")
        if not callable(getattr(host, "add", None)) or not callable(getattr(host, "remove", None)):
            raise TypeError(f"host memory must have add() and remove(), not {type(host).__name__}")
        pages = size >> _SHIFT
        self.base = GUEST_RAM_BASE
        self.size = size
        self.host = host
        self._buf = bytearray(size)
        self._mv = memoryview(self._buf)
        self._lock = threading.Lock()
        self._free_starts: list[int] = [0]  # free page extents, sorted
        self._free_lens: list[int] = [pages]
        self._one: list[int] = []  # single free pages kept aside (SMC buffers come and go)
        self._regions: dict[int, int] = {}  # gpa -> pages: allocations and shm of the guest kernel
        self._lent: dict[int, tuple[bytearray, int]] = {}  # gpa -> (lent buffer, pages)
        self._backed: dict[int, tuple[int, memoryview]] = {}  # id(view) -> (gpa, view)
        self._pins = [0] * pages
        self._pinned = 0
        self._calls: dict[object, tuple[int, int, int, int]] = {}  # SMC pins, by call
        self._closed = False
        self.hpa = host.add(self._buf)

    # ------------------------------------------------------------------ ranges
    def _offset(self, gpa: int, n: int) -> int:
        """Offset of ``[gpa, gpa+n)`` in this RAM; GuestFault when it is not all inside."""
        if type(gpa) is not int or type(n) is not int:
            raise TypeError("guest-physical address and size must be ints")
        off = gpa - self.base
        if off < 0 or n < 0 or off + n > self.size:
            raise GuestFault(
                f"guest range {gpa:#x}+{n} is outside guest RAM "
                f"[{self.base:#x}, {self.base + self.size:#x})"
            )
        return off

    def __contains__(self, gpa: object) -> bool:
        return type(gpa) is int and self.base <= gpa < self.base + self.size

    # ------------------------------------------------------------------ guest kernel side
    def _take(self, pages: int) -> int:
        """First fit over the free extents (caller holds the lock); ENOMEM when none fits.
        A single page comes from the pages kept aside first."""
        lens = self._free_lens
        for _ in (0, 1):
            for i, length in enumerate(lens):
                if length >= pages:
                    start = self._free_starts[i]
                    if length == pages:
                        del self._free_starts[i], lens[i]
                    else:
                        self._free_starts[i] = start + pages
                        lens[i] = length - pages
                    return start
            if not self._one:
                break
            while True:  # merge the pages kept aside, then retry (pops race lock-free ones)
                try:
                    page = self._one.pop()
                except IndexError:
                    break
                self._merge(page, 1)
        raise DriverError(errno.ENOMEM, f"guest RAM has no {pages} free contiguous pages")

    def _give(self, start: int, pages: int) -> None:
        """Return an extent (caller holds the lock); a single page is kept aside."""
        if pages == 1 and len(self._one) < _KEEP_ASIDE:
            self._one.append(start)
        else:
            self._merge(start, pages)

    def _merge(self, start: int, pages: int) -> None:
        """Return an extent to the free list, merging with its neighbours."""
        starts, lens = self._free_starts, self._free_lens
        i = bisect.bisect_right(starts, start)
        if i > 0 and starts[i - 1] + lens[i - 1] == start:
            lens[i - 1] += pages
            if i < len(starts) and start + pages == starts[i]:
                lens[i - 1] += lens[i]
                del starts[i], lens[i]
        elif i < len(starts) and start + pages == starts[i]:
            starts[i] = start
            lens[i] += pages
        else:
            starts.insert(i, start)
            lens.insert(i, pages)

    def alloc(self, size: int) -> int:
        """Zeroed whole pages holding ``size`` bytes (at least one); their gpa."""
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise UsageError(f"allocation size must be an int >= 0, not {size!r}")
        pages = max(1, (size + PAGE_SIZE - 1) >> _SHIFT)
        with self._lock:
            start = self._take(pages)
            self._regions[self.base + (start << _SHIFT)] = pages
        off = start << _SHIFT
        self._mv[off : off + (pages << _SHIFT)] = bytes(pages << _SHIFT)
        return self.base + off

    def free(self, gpa: int) -> None:
        """Give back the pages :meth:`alloc` handed out at ``gpa``."""
        with self._lock:
            pages = self._regions.pop(gpa, None)
            if pages is None:
                raise UsageError(f"nothing is allocated at guest address {gpa!r}")
            self._give((gpa - self.base) >> _SHIFT, pages)

    def backing(self, size: int) -> tuple[memoryview, None]:
        """A shm backing for the guest driver's SHM_ALLOC: zeroed guest pages.

        The view must then be placed with :meth:`add` (the shm's physical address).
        Out of guest RAM raises ``DriverError(ENOMEM)``.
        """
        gpa = self.alloc(size)
        off = gpa - self.base
        view = self._mv[off : off + size]
        with self._lock:
            self._backed[id(view)] = (gpa, view)
        return view, None

    def add(self, buf: object) -> int:
        """The gpa of a view :meth:`backing` handed out (a shm's physical address)."""
        with self._lock:
            got = self._backed.pop(id(buf), None)
        if got is None or got[1] is not buf:
            raise UsageError("guest RAM can only place buffers its backing() handed out")
        return got[0]

    def remove(self, paddr: int) -> None:
        """A shm is gone: its pages go back to the guest kernel."""
        with self._lock:
            pages = self._regions.pop(paddr, None)
            if pages is not None:
                self._give((paddr - self.base) >> _SHIFT, pages)

    def view(self, gpa: int, length: int) -> memoryview:
        """The bytes at ``[gpa, gpa+length)`` (GuestFault outside RAM)."""
        off = self._offset(gpa, length)
        return self._mv[off : off + length]

    def lend(self, buf: bytearray) -> int:
        """Copy an SMC buffer into guest pages of its own; their gpa (page-aligned).

        One-page buffers (the SMC case) take a page kept aside without the lock: list and
        dict operations are atomic, as the host's ``PhysMemory.lend`` relies on too."""
        if type(buf) is not bytearray:
            raise TypeError(f"lend() takes a bytearray, not {type(buf).__name__}")
        n = len(buf)
        if n <= PAGE_SIZE:
            pages = 1
            try:
                start = self._one.pop()
            except IndexError:
                with self._lock:
                    start = self._take(1)
        else:
            pages = (n + _PAGE_MASK) >> _SHIFT
            with self._lock:
                start = self._take(pages)
        off = start << _SHIFT
        gpa = self.base + off
        self._lent[gpa] = (buf, pages)
        self._mv[off : off + n] = buf  # the page's tail is not part of the buffer
        return gpa

    def take_back(self, gpa: int) -> None:
        """Copy a lent buffer's pages back into it, then free them."""
        got = self._lent.pop(gpa, None)
        if got is None:
            raise UsageError(f"nothing was lent at guest address {gpa!r}")
        buf, pages = got
        off = gpa - self.base
        buf[:] = self._buf[off : off + len(buf)]  # (faster than from a memoryview slice)
        if pages == 1 and len(self._one) < _KEEP_ASIDE:
            self._one.append(off >> _SHIFT)
        else:
            with self._lock:
                self._merge(off >> _SHIFT, pages)

    def __len__(self) -> int:
        """Regions the guest kernel holds (allocations, shm, lent SMC buffers)."""
        return len(self._regions) + len(self._lent)

    # ------------------------------------------------------------------ VMM side
    def translate(self, gpa: int, n: int) -> int:
        """IPA -> host PA of ``[gpa, gpa+n)`` (GuestFault outside RAM)."""
        off = self._offset(gpa, n)
        if self._closed:
            raise GuestFault(f"guest RAM was freed; {gpa:#x} has no host address")
        return self.hpa + off

    def read(self, gpa: int, n: int) -> bytes:
        """A copy of ``[gpa, gpa+n)`` (IPA -> VMM memory)."""
        off = self._offset(gpa, n)
        return bytes(self._mv[off : off + n])

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``gpa`` (GuestFault, and nothing written, outside RAM)."""
        off = self._offset(gpa, len(data))
        self._mv[off : off + len(data)] = data

    def _span(self, gpa: int, n: int) -> tuple[int, int]:
        """First page index and page count under ``[gpa, gpa+n)`` (GuestFault outside RAM)."""
        off = self._offset(gpa, n)
        first = off >> _SHIFT
        return first, (((off + n + PAGE_SIZE - 1) >> _SHIFT) - first if n else 0)

    def _count(self, first: int, pages: int) -> None:
        """One more pin on each page (caller holds the lock, RAM not closed)."""
        counts = self._pins
        for page in range(first, first + pages):
            c = counts[page]
            if not c:
                self._pinned += 1
            counts[page] = c + 1

    def _check_pinned(self, pin: Pin) -> int:
        """The first page index of ``pin``; UsageError unless all its pages are pinned."""
        first = pin[0] - (self.base >> _SHIFT)
        pages = pin[1]
        counts = self._pins
        if (
            first < 0
            or first + pages > len(counts)
            or not (counts[first] if pages == 1 else all(counts[first : first + pages]))
        ):
            raise UsageError(f"{pin} is not pinned in this guest RAM")
        return first

    def _uncount(self, first: int, pages: int) -> None:
        """One pin less on each page (caller holds the lock and checked them)."""
        counts = self._pins
        for page in range(first, first + pages):
            c = counts[page] - 1
            counts[page] = c
            if not c:
                self._pinned -= 1

    def pin(self, gpa: int, n: int) -> Pin:
        """Pin the pages under ``[gpa, gpa+n)`` (counted per page) until :meth:`unpin`."""
        first, pages = self._span(gpa, n)
        with self._lock:
            if self._closed:
                raise GuestFault(f"guest RAM was freed; cannot pin {gpa:#x}+{n}")
            self._count(first, pages)
        return _new_pin(Pin, ((self.base >> _SHIFT) + first, pages))

    def unpin(self, pin: Pin) -> None:
        """Drop one pin taken by :meth:`pin` (UsageError, nothing changed, if those pages
        are not pinned)."""
        if type(pin) is not Pin:
            raise TypeError(f"unpin() takes a Pin, not {type(pin).__name__}")
        with self._lock:
            self._uncount(self._check_pinned(pin), pin[1])

    def pin_smc(self, key: object, a: int, an: int, b: int, bn: int) -> int:
        """Pin an SMC's two buffers, ``[a, a+an)`` and ``[b, b+bn)``, for one call named
        ``key`` (unique while pinned) until :meth:`unpin_smc`; the number of pages they
        cover (each range counted on its own).  GuestFault, nothing pinned, if either is
        outside RAM; UsageError if ``key`` already holds a pin.

        The call path of every guest SMC: the call's ranges are recorded as they are (one
        dict entry), and only the rare questions -- :meth:`pinned_pages`,
        :meth:`discard`, :meth:`close` -- walk them."""
        size = self.size
        pages = -1
        try:  # (a TypeError below means a non-int: _offset says so)
            # Guest addresses are >= 2**30, multi-digit ints whose arithmetic is slow in
            # CPython: subtract the base once, work on offsets.
            oa = a - self.base
            ob = b - self.base
            if 0 <= oa <= oa + an <= size and 0 <= ob <= ob + bn <= size:
                pages = ((oa & _PAGE_MASK) + an + _PAGE_MASK) >> _SHIFT if an else 0
                if bn:
                    pages += ((ob & _PAGE_MASK) + bn + _PAGE_MASK) >> _SHIFT
        except TypeError:
            pages = -1
        if pages < 0:
            self._offset(a, an)  # the error: TypeError or GuestFault
            self._offset(b, bn)
            raise AssertionError("unreachable: one of the ranges is outside guest RAM")
        calls = self._calls
        lock = self._lock
        lock.acquire()  # (not ``with``: every guest call's path)
        try:
            if self._closed:
                raise GuestFault(f"guest RAM was freed; cannot pin {a:#x}+{an}")
            if key in calls:
                raise UsageError(f"{key!r} already holds an SMC pin")
            calls[key] = (oa, an, ob, bn)
        finally:
            lock.release()
        return pages

    def unpin_smc(self, key: object) -> None:
        """Drop the pins :meth:`pin_smc` took for ``key`` (UsageError if it holds none)."""
        lock = self._lock
        lock.acquire()
        try:
            got = self._calls.pop(key, None)
        finally:
            lock.release()
        if got is None:
            raise UsageError(f"{key!r} holds no SMC pin")

    def _call_pages(self) -> set[int]:
        """Page indices the SMC pins of the calls in flight cover (caller holds the lock)."""
        pages: set[int] = set()
        for oa, an, ob, bn in self._calls.values():
            for off, n in ((oa, an), (ob, bn)):
                if n:
                    pages.update(range(off >> _SHIFT, (off + n + _PAGE_MASK) >> _SHIFT))
        return pages

    def copy_into(self, dst: bytearray, gpa: int, n: int) -> None:
        """Make ``dst`` a copy of ``[gpa, gpa+n)`` (VMM memory; resized to ``n`` bytes);
        GuestFault, ``dst`` unchanged, outside RAM."""
        off = gpa - self.base if type(gpa) is int else -1
        if not (type(n) is int and 0 <= off <= off + n <= self.size):
            off = self._offset(gpa, n)  # the error
        # A page or less through a bytearray slice (half the time of a memoryview's, for
        # all its second copy); more through a view, copied once.
        dst[:] = self._buf[off : off + n] if n <= PAGE_SIZE else self._mv[off : off + n]

    def pinned_pages(self) -> int:
        """Distinct pages with at least one pin (a :meth:`pin` or a call's SMC pin)."""
        with self._lock:
            if not self._calls:
                return self._pinned
            counts = self._pins
            return self._pinned + sum(1 for p in self._call_pages() if not counts[p])

    def discard(self, gpa: int, n: int) -> None:
        """Balloon out / unmap ``[gpa, gpa+n)`` (its bytes become zero); EBUSY if pinned."""
        off = self._offset(gpa, n)
        first = off >> _SHIFT
        last = (off + n + PAGE_SIZE - 1) >> _SHIFT
        with self._lock:
            if any(self._pins[first:last]) or any(first <= p < last for p in self._call_pages()):
                raise DriverError(
                    errno.EBUSY, f"guest range {gpa:#x}+{n} is pinned (shared with the TEE)"
                )
            self._mv[first << _SHIFT : last << _SHIFT] = bytes((last - first) << _SHIFT)

    def close(self) -> None:
        """Free the host region (the VM is gone); EBUSY while any page is pinned.

        The guest kernel's allocations go with it, except SMC buffers still lent: a guest
        thread unwinding after its VM was destroyed takes them back and fails cleanly (the
        guest side keeps working on the now unreachable buffer).
        """
        with self._lock:
            if self._closed:
                return
            if self._pinned or self._calls:
                pinned = self._pinned + sum(1 for p in self._call_pages() if not self._pins[p])
                raise DriverError(errno.EBUSY, f"{pinned} guest pages are still pinned")
            self._closed = True
            self._regions = {}  # the guest kernel's allocations go; lent buffers come back
            self._backed.clear()
        self.host.remove(self.hpa)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` freed the host region."""
        return self._closed

    def __repr__(self) -> str:
        return (
            f"<GuestRam {self.size >> 10} KiB at gpa {self.base:#x} / hpa {self.hpa:#x}, "
            f"{len(self)} regions, {self.pinned_pages()} pinned pages>"
        )
