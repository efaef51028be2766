"""Id allocators that hand out ids the way the kernel's IDR and XArray do.

* :class:`IdrAllocator` is ``idr_alloc(idr, ptr, start, end)``: the **lowest free** id in
  ``[start, end)``; ``end <= 0`` means "up to INT_MAX" (the kernel's convention).
  A driver uses it for per-file object ids (start 0) and request ids.
* :class:`CyclicAllocator` is ``xa_alloc_cyclic(xa, &id, ptr, XA_LIMIT(min, max), &next)``:
  the first free id at or after ``next``, wrapping to ``min`` once, with ``next`` set to
  the id handed out plus one.  A driver uses it for ids it names on a wire.

Both answer ``ENOSPC`` (as a :class:`DriverError`) when the range is full.  Both keep the
*free* space as sorted disjoint intervals (two parallel lists searched by bisection), so
memory is proportional to the number of holes, not of live ids, and taking the lowest
free id is an in-place update.
"""

from __future__ import annotations

import errno
from bisect import bisect_right

from objects._errors import DriverError, UsageError

__all__ = ["INT_MAX", "CyclicAllocator", "IdrAllocator"]

INT_MAX = 0x7FFF_FFFF


class _FreeRanges:
    """Disjoint inclusive free intervals over ``[lo, hi]``, as two sorted parallel lists.

    ``starts[i]..lasts[i]`` is the i-th hole.  Lookups bisect; taking the first id of a
    hole (what both allocators do almost always) is an in-place update.
    """

    __slots__ = ("hi", "lasts", "lo", "starts", "used")

    def __init__(self, lo: int, hi: int) -> None:
        self.lo = lo
        self.hi = hi
        self.starts: list[int] = [lo]
        self.lasts: list[int] = [hi]
        self.used = 0

    def first_free_at_or_after(self, x: int) -> tuple[int, int] | None:
        """The hole holding the first free id at or after ``x``, and that id (None:
        there is none)."""
        idx = bisect_right(self.starts, x) - 1
        if idx >= 0 and self.lasts[idx] >= x:
            return idx, x
        if idx + 1 < len(self.starts):
            return idx + 1, self.starts[idx + 1]
        return None

    def is_free(self, x: int) -> bool:
        idx = bisect_right(self.starts, x) - 1
        return idx >= 0 and self.lasts[idx] >= x

    def take(self, idx: int, x: int) -> None:
        """Mark free id ``x``, which lies in hole ``idx``, used (the allocator found it
        there: no second lookup)."""
        starts, lasts = self.starts, self.lasts
        start, last = starts[idx], lasts[idx]
        if start == x:
            if x == last:
                del starts[idx], lasts[idx]
            else:
                starts[idx] = x + 1
        elif x == last:
            lasts[idx] = x - 1
        else:  # split the hole
            lasts[idx] = x - 1
            starts.insert(idx + 1, x + 1)
            lasts.insert(idx + 1, last)
        self.used += 1

    def give_back(self, x: int) -> bool:
        """Mark used id ``x`` free, merging with its neighbours; False (and nothing
        changes) if ``x`` is free already (the lookup :meth:`is_free` does, shared)."""
        starts, lasts = self.starts, self.lasts
        idx = bisect_right(starts, x)
        if idx and lasts[idx - 1] >= x:  # inside hole idx - 1: free
            return False
        joins_next = idx < len(starts) and starts[idx] == x + 1
        joins_prev = idx > 0 and lasts[idx - 1] == x - 1
        if joins_prev and joins_next:
            lasts[idx - 1] = lasts[idx]
            del starts[idx], lasts[idx]
        elif joins_prev:
            lasts[idx - 1] = x
        elif joins_next:
            starts[idx] = x
        else:
            starts.insert(idx, x)
            lasts.insert(idx, x)
        self.used -= 1
        return True

    def holes(self) -> int:
        return len(self.starts)


class _Allocator:
    __slots__ = ("_free", "name")

    def __init__(self, lo: int, hi: int, name: str) -> None:
        for what, v in (("start", lo), ("end", hi)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"{name}: {what} must be an int, not {type(v).__name__}")
        if lo < 0 or hi < lo:
            raise UsageError(f"{name}: empty or negative id range [{lo}, {hi}]")
        self._free = _FreeRanges(lo, hi)
        self.name = name

    @property
    def lo(self) -> int:
        """Smallest id this allocator may hand out."""
        return self._free.lo

    @property
    def hi(self) -> int:
        """Largest id this allocator may hand out (inclusive)."""
        return self._free.hi

    def __len__(self) -> int:
        return self._free.used

    def __contains__(self, ident: object) -> bool:
        return (
            isinstance(ident, int)
            and self._free.lo <= ident <= self._free.hi
            and not self._free.is_free(ident)
        )

    def free(self, ident: int) -> bool:
        """Release ``ident``; False (and nothing changes) if it was not allocated.

        Like ``idr_remove``/``xa_erase`` of an absent index, this is not an error.
        """
        free = self._free  # (__contains__ inline: its lookup is give_back's)
        if not isinstance(ident, int) or not free.lo <= ident <= free.hi:
            return False
        return free.give_back(ident)

    def _enospc(self) -> DriverError:
        return DriverError(errno.ENOSPC, f"{self.name}: all ids in [{self.lo}, {self.hi}] in use")


class IdrAllocator(_Allocator):
    """Lowest-free allocator over ``[start, end)`` (``idr_alloc``)."""

    __slots__ = ()

    def __init__(self, start: int = 0, end: int = 0, *, name: str = "idr") -> None:
        if isinstance(end, int) and not isinstance(end, bool) and end <= 0:
            end = INT_MAX + 1
        super().__init__(start, end - 1 if isinstance(end, int) else end, name)

    def alloc(self) -> int:
        """Hand out the lowest free id; ``ENOSPC`` when none is left."""
        free = self._free
        if not free.starts:
            raise self._enospc()
        ident = free.starts[0]  # (the first free id: the first hole's start)
        free.take(0, ident)
        return ident


class CyclicAllocator(_Allocator):
    """Cyclic allocator over ``[lo, hi]`` inclusive (``xa_alloc_cyclic`` with XA_LIMIT)."""

    __slots__ = ("next",)

    def __init__(self, lo: int, hi: int, *, name: str = "xarray") -> None:
        super().__init__(lo, hi, name)
        self.next = lo

    def alloc(self) -> int:
        """Hand out the first free id at or after ``next``, wrapping once to ``lo``.

        ``next`` becomes the id handed out plus one, as in the kernel.
        """
        free = self._free
        found = free.first_free_at_or_after(self.next) if self.next <= free.hi else None
        if found is None:  # nothing at or after next: wrap once to the first hole
            if not free.starts:
                raise self._enospc()
            found = 0, free.starts[0]
        idx, ident = found
        free.take(idx, ident)
        self.next = ident + 1
        return ident
