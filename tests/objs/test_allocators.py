"""Id allocators against reference models (objects/_ids.py).

* ``IdrAllocator`` is ``idr_alloc``: the lowest free id in ``[start, end)``.
* ``CyclicAllocator`` is ``xa_alloc_cyclic``: the first free id at or after ``next``,
  wrapping to ``lo``; ``next`` becomes the id handed out plus one.

Both raise ``DriverError(ENOSPC)`` when the range is full (spec §2.2).  The models below
are a plain Python set plus (for the cyclic allocator) a cursor; the ranges are tiny so
that exhaustion and wrap-around happen in almost every run.
"""

from __future__ import annotations

import errno

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from objects import INT_MAX, CyclicAllocator, DriverError, IdrAllocator, UsageError

# (lo, hi) inclusive.  Small, a single id, and near the top of the u32 space (where the
# cursor of the cyclic allocator runs past 0xFFFFFFFF).
RANGES = [(0, 7), (0, 2), (5, 5), (3, 12), (0xFFFF_FFF0, 0xFFFF_FFFF), (0x8000_0001, 0x8000_0009)]

MACHINE_SETTINGS = settings(max_examples=150, stateful_step_count=60, deadline=None)


class IdrModel:
    """Lowest free id in [lo, hi]."""

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi
        self.live: set[int] = set()

    def alloc(self) -> int | None:
        for ident in range(self.lo, self.hi + 1):
            if ident not in self.live:
                self.live.add(ident)
                return ident
        return None


class CyclicModel:
    """First free id in [next, hi], else in [lo, next); next = id + 1."""

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi
        self.live: set[int] = set()
        self.next = lo

    def alloc(self) -> int | None:
        order = [*range(max(self.next, self.lo), self.hi + 1), *range(self.lo, self.next)]
        for ident in order:
            if ident not in self.live:
                self.live.add(ident)
                self.next = ident + 1
                return ident
        return None


class _AllocatorMachine(RuleBasedStateMachine):
    """Shared rules; subclasses build the allocator and its model."""

    def make(self, lo: int, hi: int) -> tuple[IdrAllocator | CyclicAllocator, object]:
        raise NotImplementedError

    @initialize(bounds=st.sampled_from(RANGES))
    def setup(self, bounds: tuple[int, int]) -> None:
        self.lo, self.hi = bounds
        self.alloc, self.model = self.make(self.lo, self.hi)

    @rule()
    def allocate(self) -> None:
        size_before = len(self.alloc)
        expected = self.model.alloc()
        if expected is None:
            with pytest.raises(DriverError) as info:
                self.alloc.alloc()
            assert info.value.errno == errno.ENOSPC
            assert len(self.alloc) == size_before
        else:
            got = self.alloc.alloc()
            assert got == expected
            assert got in self.alloc

    @precondition(lambda self: bool(self.model.live))
    @rule(data=st.data())
    def free_live(self, data: st.DataObject) -> None:
        ident = data.draw(st.sampled_from(sorted(self.model.live)))
        assert self.alloc.free(ident) is True
        self.model.live.discard(ident)
        assert ident not in self.alloc

    @rule(offset=st.integers(-3, 20))
    def free_any(self, offset: int) -> None:
        """Ids around and inside the range; freeing a free id is a no-op returning False."""
        ident = self.lo + offset
        was_live = ident in self.model.live
        assert self.alloc.free(ident) is was_live
        self.model.live.discard(ident)
        # a second free of the same id never succeeds
        assert self.alloc.free(ident) is False

    @rule()
    def free_nonsense(self) -> None:
        size_before = len(self.alloc)
        for bogus in (-1, self.hi + 1, "1", None, 1.0):
            assert self.alloc.free(bogus) is False  # type: ignore[arg-type]
        assert len(self.alloc) == size_before

    @invariant()
    def same_population(self) -> None:
        assert len(self.alloc) == len(self.model.live)
        for ident in range(self.lo - 2, min(self.hi, self.lo + 20) + 3):
            assert (ident in self.alloc) == (ident in self.model.live), ident
        assert self.alloc.lo == self.lo
        assert self.alloc.hi == self.hi


class IdrMachine(_AllocatorMachine):
    def make(self, lo: int, hi: int) -> tuple[IdrAllocator, IdrModel]:
        return IdrAllocator(lo, hi + 1), IdrModel(lo, hi)


class CyclicMachine(_AllocatorMachine):
    def make(self, lo: int, hi: int) -> tuple[CyclicAllocator, CyclicModel]:
        return CyclicAllocator(lo, hi), CyclicModel(lo, hi)

    @invariant()
    def same_cursor(self) -> None:
        assert self.alloc.next == self.model.next


TestIdrMachine = IdrMachine.TestCase
TestIdrMachine.settings = MACHINE_SETTINGS
TestCyclicMachine = CyclicMachine.TestCase
TestCyclicMachine.settings = MACHINE_SETTINGS


# --------------------------------------------------------------------------- plain tests


def test_ns_id_allocator_is_cyclic_not_lowest_free() -> None:
    ns = CyclicAllocator(0x8000_0001, 0xFFFF_FFFF)
    assert ns.alloc() == 0x8000_0001
    assert ns.alloc() == 0x8000_0002
    assert ns.free(0x8000_0001) is True
    assert ns.alloc() == 0x8000_0003
    assert ns.next == 0x8000_0004
    assert len(ns) == 2
    assert 0x8000_0001 not in ns
    assert 0x8000_0000 not in ns  # the primordial id is outside the range


def test_cyclic_wraps_to_lo_and_skips_live_ids() -> None:
    c = CyclicAllocator(0xFFFF_FFFC, 0xFFFF_FFFF)
    assert [c.alloc() for _ in range(4)] == [0xFFFF_FFFC, 0xFFFF_FFFD, 0xFFFF_FFFE, 0xFFFF_FFFF]
    assert c.next == 0x1_0000_0000
    with pytest.raises(DriverError) as info:
        c.alloc()
    assert info.value.errno == errno.ENOSPC
    assert c.next == 0x1_0000_0000  # a failed allocation leaves the cursor alone
    c.free(0xFFFF_FFFE)
    c.free(0xFFFF_FFFD)
    assert c.alloc() == 0xFFFF_FFFD  # wrapped: first free from lo
    assert c.next == 0xFFFF_FFFE
    assert c.alloc() == 0xFFFF_FFFE
    with pytest.raises(DriverError):
        c.alloc()


def test_idr_is_lowest_free() -> None:
    idr = IdrAllocator(0)
    assert [idr.alloc(), idr.alloc(), idr.alloc()] == [0, 1, 2]
    assert idr.free(1) is True
    assert idr.alloc() == 1
    assert idr.alloc() == 3
    assert idr.free(0) and idr.free(2)
    assert [idr.alloc(), idr.alloc(), idr.alloc()] == [0, 2, 4]


@pytest.mark.parametrize("end", [0, -1, -(2**40)])
def test_idr_end_not_positive_means_int_max(end: int) -> None:
    idr = IdrAllocator(INT_MAX - 1, end)
    assert idr.lo == INT_MAX - 1
    assert idr.hi == INT_MAX == 0x7FFF_FFFF
    assert idr.alloc() == INT_MAX - 1
    assert idr.alloc() == INT_MAX
    with pytest.raises(DriverError) as info:
        idr.alloc()
    assert info.value.errno == errno.ENOSPC
    assert INT_MAX + 1 not in idr


def test_idr_default_range() -> None:
    idr = IdrAllocator()
    assert (idr.lo, idr.hi) == (0, INT_MAX)


def test_idr_end_is_exclusive() -> None:
    idr = IdrAllocator(1, 4)
    assert [idr.alloc(), idr.alloc(), idr.alloc()] == [1, 2, 3]
    with pytest.raises(DriverError) as info:
        idr.alloc()
    assert info.value.code == errno.ENOSPC
    assert isinstance(info.value, OSError)


def test_many_ids_lowest_free_after_holes() -> None:
    idr = IdrAllocator(0)
    assert [idr.alloc() for _ in range(5000)] == list(range(5000))
    for ident in range(0, 5000, 2):
        assert idr.free(ident)
    assert len(idr) == 2500
    assert [idr.alloc() for _ in range(2501)] == [*range(0, 5000, 2), 5000]


@pytest.mark.parametrize(
    ("factory", "exc"),
    [
        (lambda: IdrAllocator(5, 5), UsageError),
        (lambda: IdrAllocator(-1, 5), UsageError),
        (lambda: CyclicAllocator(3, 2), UsageError),
        (lambda: CyclicAllocator(-1, 2), UsageError),
        (lambda: CyclicAllocator("0", 2), TypeError),
        (lambda: CyclicAllocator(0, 2.5), TypeError),
        (lambda: IdrAllocator(True, 5), TypeError),
    ],
)
def test_bad_ranges(factory: object, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        factory()  # type: ignore[operator]
