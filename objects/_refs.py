"""Refcounted entries and the object table built on the id allocators.

A :class:`Refcounted` is the kernel's ``kref``: it starts at one, ``get()`` refuses an
object whose count already reached zero (the use-after-free class of CVE-2021-44733),
and the ``put()`` that drops the last reference runs :meth:`Refcounted.on_release`
exactly once.

An :class:`ObjectTable` maps ids from an allocator to entries.  All lookups that hand an
entry out take a reference under the table's lock, so an entry cannot be freed between
being found and being used.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Generic, TypeVar

from objects._errors import UsageError
from objects._ids import CyclicAllocator, IdrAllocator

__all__ = ["ObjectTable", "RefcountError", "Refcounted"]

# One lock for every refcount: cheap under the GIL and keeps entries small.
_REF_LOCK = threading.Lock()


class RefcountError(UsageError):
    """A reference was taken on a dead object, or dropped once too often."""


class Refcounted:
    """A ``kref``: starts at 1; the last :meth:`put` calls :meth:`on_release` once."""

    __slots__ = ("refs",)

    def __init__(self) -> None:
        self.refs = 1

    def get(self) -> bool:
        """Take a reference; False (nothing changes) if the object is already dead.

        This is ``kref_get_unless_zero``: a zero count is never raised back to life.
        """
        with _REF_LOCK:
            if self.refs <= 0:
                return False
            self.refs += 1
            return True

    def put(self) -> bool:
        """Drop a reference; True when it was the last one (``on_release`` has run)."""
        with _REF_LOCK:
            if self.refs <= 0:
                raise RefcountError(f"{self!r}: reference dropped after it reached zero")
            self.refs -= 1
            last = self.refs == 0
        if last:
            self.on_release()
        return last

    def on_release(self) -> None:
        """Called once, outside any lock, when the count reaches zero."""


E = TypeVar("E")


class ObjectTable(Generic[E]):
    """Ids from an allocator mapped to entries, safe to use from several threads.

    The table does not own references by itself: callers decide whether an entry in
    the table stands for a reference (as the kernel's IDRs do).
    """

    __slots__ = ("_alloc", "_entries", "_lock", "name")

    def __init__(self, alloc: IdrAllocator | CyclicAllocator, *, name: str = "table") -> None:
        if not isinstance(alloc, IdrAllocator | CyclicAllocator):
            raise TypeError("ObjectTable needs an IdrAllocator or a CyclicAllocator")
        self._alloc = alloc
        self._entries: dict[int, E] = {}
        self._lock = threading.Lock()
        self.name = name

    @property
    def allocator(self) -> IdrAllocator | CyclicAllocator:
        """The allocator the ids come from."""
        return self._alloc

    def insert(self, entry: E) -> int:
        """Store ``entry`` under a new id (``ENOSPC`` when the id space is full)."""
        with self._lock:
            ident = self._alloc.alloc()
            self._entries[ident] = entry
            return ident

    def reserve(self) -> int:
        """Allocate an id with no entry yet (``idr_alloc`` of NULL); see :meth:`replace`."""
        with self._lock:
            return self._alloc.alloc()

    def replace(self, ident: int, entry: E) -> None:
        """Store ``entry`` under an id that is allocated (reserved or in use)."""
        with self._lock:
            if ident not in self._alloc:
                raise UsageError(f"{self.name}: id {ident} is not allocated")
            self._entries[ident] = entry

    def lookup(self, ident: int) -> E | None:
        """The entry stored under ``ident``, or None."""
        return self._entries.get(ident)

    def lookup_get(self, ident: int) -> E | None:
        """The entry under ``ident`` with a reference taken, or None if absent or dying."""
        with self._lock:
            entry = self._entries.get(ident)
            if entry is None:
                return None
            if isinstance(entry, Refcounted) and not entry.get():
                return None
            return entry

    def erase(self, ident: int) -> E | None:
        """Remove ``ident`` and free it; returns the entry that was there (or None)."""
        with self._lock:
            entry = self._entries.pop(ident, None)
            self._alloc.free(ident)
            return entry

    def erase_if(self, ident: int, entry: E) -> bool:
        """Remove ``ident`` only if it still maps to ``entry`` (no ABA on recycled ids)."""
        with self._lock:
            if self._entries.get(ident) is not entry:
                return False
            del self._entries[ident]
            self._alloc.free(ident)
            return True

    def drain(self) -> list[tuple[int, E]]:
        """Remove every entry and free every id; returns what was there."""
        with self._lock:
            items = list(self._entries.items())
            for ident in self._entries:
                self._alloc.free(ident)
            self._entries.clear()
            return items

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, ident: object) -> bool:
        return ident in self._entries

    def __iter__(self) -> Iterator[int]:
        with self._lock:
            return iter(list(self._entries))

    def items(self) -> list[tuple[int, E]]:
        """A snapshot of ``(id, entry)`` pairs."""
        with self._lock:
            return list(self._entries.items())

    def __repr__(self) -> str:
        return f"<ObjectTable {self.name} live={len(self._entries)}>"
