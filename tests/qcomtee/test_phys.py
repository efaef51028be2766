"""Host-physical memory (qtee-kernel.md §3.1: SMC buffers are page granular and zero-filled;
§2.4: MAP_REGION names one ``{paddr, len}`` range, so a region is one contiguous range).

Invariants of the allocator (checked after every step of the state machine below):
* every region and every lend starts on a page boundary;
* no two live ranges (regions, lends) overlap;
* an allocated region reads back as zeros until written, and ``len()`` counts the live
  regions, ``lent()`` the live lends; after everything is freed both are 0 and every old
  address faults.
"""

from __future__ import annotations

import itertools
import timeit

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from qtee._qcomtee.shm import MAX_LEND, PhysFault, PhysMemory
from qtee._tee.shm import PAGE_SIZE


def test_alloc_is_zeroed_whole_pages_at_page_aligned_addresses() -> None:
    """§3.1 "page granular, zero-filled": 5000 bytes take two whole zeroed pages."""
    phys = PhysMemory()
    pa = phys.alloc(5000)
    assert pa % PAGE_SIZE == 0 and pa >= PhysMemory.BASE
    assert bytes(phys.view(pa, 2 * PAGE_SIZE)) == bytes(2 * PAGE_SIZE)
    with pytest.raises(PhysFault):  # the third page is the unmapped guard
        phys.view(pa, 2 * PAGE_SIZE + 1)
    assert len(phys) == 1
    phys.remove(pa)
    assert len(phys) == 0
    with pytest.raises(PhysFault):
        phys.view(pa, 1)


@pytest.mark.parametrize("size", [0, -1, PhysMemory.LEND_BASE])
def test_alloc_refuses_sizes_it_cannot_place(size: int) -> None:
    """An allocation of nothing, or of more than the region window, is refused."""
    phys = PhysMemory()
    with pytest.raises(PhysFault):
        phys.alloc(size)
    assert len(phys) == 0


def test_host_lend_is_an_alias_not_a_copy() -> None:
    """§3.1 buffers from the driver's pool: on the host QTEE sees the very bytes the
    driver wrote (no copy), and what QTEE writes is in the driver's buffer at once."""
    phys = PhysMemory()
    buf = bytearray(b"inbound!" * 4)
    pa = phys.lend(buf)
    assert pa % PAGE_SIZE == 0 and pa >= PhysMemory.LEND_BASE
    assert phys.buffer(pa, len(buf)) is buf  # the exact lend: the buffer itself
    assert phys.lent_at(pa) is buf
    view = phys.view(pa + 8, 8)  # an interior view aliases too
    view[:] = b"QTEE-was"
    assert buf[8:16] == b"QTEE-was"
    buf[0:4] = b"DRV!"
    assert bytes(phys.view(pa, 4)) == b"DRV!"
    assert phys.lent() == 1 and len(phys) == 0  # a lend is not a region
    del view
    phys.take_back(pa)
    assert phys.lent() == 0 and phys.lent_at(pa) is None
    with pytest.raises(PhysFault):
        phys.view(pa, 1)


def test_lend_and_take_back_refuse_what_they_do_not_own() -> None:
    """Each call raises its specific error and changes nothing."""
    phys = PhysMemory()
    region = phys.alloc(PAGE_SIZE)
    lent = phys.lend(bytearray(16))
    with pytest.raises(TypeError):
        phys.lend(bytes(16))  # type: ignore[arg-type]
    with pytest.raises(PhysFault):
        phys.lend(bytearray(MAX_LEND + 1))  # larger than any SMC buffer (§3.1: 4 MiB)
    with pytest.raises(PhysFault):
        phys.take_back(region)  # a region is removed, not taken back
    with pytest.raises(PhysFault):
        phys.remove(lent)  # and a lend is taken back, not removed
    with pytest.raises(PhysFault):
        phys.remove(region + PAGE_SIZE)
    assert (len(phys), phys.lent()) == (1, 1)
    phys.take_back(lent)
    with pytest.raises(PhysFault):
        phys.take_back(lent)  # twice
    phys.remove(region)
    assert (len(phys), phys.lent()) == (0, 0)


def test_a_freed_lend_slot_is_reused() -> None:
    """Lends come back like pool pages: the next lend after a take_back reuses the slot."""
    phys = PhysMemory()
    a = phys.lend(bytearray(8))
    phys.take_back(a)
    b = phys.lend(bytearray(PAGE_SIZE))
    assert b == a
    phys.take_back(b)


def test_view_exact_interior_and_across_regions() -> None:
    """§2.4: a mapped range lies in one region; one crossing into the guard page or the
    next region faults, as does a negative length or an address below the window."""
    phys = PhysMemory()
    a = phys.add(bytearray(b"A" * 100))
    b = phys.add(bytearray(b"B" * PAGE_SIZE))
    assert b == a + 2 * PAGE_SIZE  # one page for A, one guard page
    assert bytes(phys.view(a, 100)) == b"A" * 100
    assert bytes(phys.view(a + 10, 5)) == b"AAAAA"
    assert bytes(phys.view(b + PAGE_SIZE - 1, 1)) == b"B"
    assert bytes(phys.view(a + 100, 0)) == b""
    for paddr, length in [(a + 90, 20), (a, PAGE_SIZE), (b - 1, 2), (a - 1, 1), (0, 4), (a, -1)]:
        with pytest.raises(PhysFault):
            phys.view(paddr, length)
    with pytest.raises(TypeError):
        phys.view(float(a), 1)  # type: ignore[arg-type]


def test_add_takes_writable_byte_buffers_only() -> None:
    """A region is writable bytes (QTEE writes shared memory); others are refused."""
    phys = PhysMemory()
    with pytest.raises(TypeError):
        phys.add(memoryview(b"read-only"))
    with pytest.raises(TypeError):
        phys.add(memoryview(bytearray(8)).cast("I"))
    with pytest.raises(TypeError):
        phys.add(b"bytes")  # type: ignore[arg-type]
    pa = phys.add(memoryview(bytearray(8))[2:6])  # a slice of someone else's pages
    assert len(phys.view(pa, 4)) == 4
    phys.remove(pa)
    assert len(phys) == 0


def _interior_view_time(phys: PhysMemory, pa: int) -> float:
    return min(timeit.repeat(lambda: phys.view(pa + 100, 8), number=2000, repeat=15))


def test_view_cost_grows_logarithmically_with_regions() -> None:
    """10k regions: an interior view is a bisection (a linear scan would be ~1000x the
    cost of 10 regions); an exact start is one lookup."""
    small, big = PhysMemory(), PhysMemory()
    few = [small.alloc(PAGE_SIZE) for _ in range(10)]
    many = [big.alloc(PAGE_SIZE) for _ in range(10_000)]
    t_small = _interior_view_time(small, few[0])
    t_big = _interior_view_time(big, many[0])
    assert t_big < 4 * t_small, (t_small, t_big)
    exact = min(timeit.repeat(lambda: big.view(many[0], 8), number=2000, repeat=15))
    assert exact < 4 * t_small
    for pa in many:
        big.remove(pa)
    assert len(big) == 0


class PhysMachine(RuleBasedStateMachine):
    """Random alloc / remove / lend / take_back against an oracle of live ranges."""

    regions = Bundle("regions")
    lends = Bundle("lends")

    def __init__(self) -> None:
        super().__init__()
        self.phys = PhysMemory()
        self.live: dict[int, int] = {}  # start -> length, regions and lends
        self.dead: list[int] = []

    @rule(target=regions, size=st.integers(1, 5 * PAGE_SIZE))
    def alloc(self, size: int) -> int:
        pa = self.phys.alloc(size)
        assert bytes(self.phys.view(pa, size)) == bytes(size)
        self.phys.view(pa, 1)[0] = 0xA5  # written: must not show up anywhere else
        self.live[pa] = size
        return pa

    @rule(target=lends, size=st.integers(0, 3 * PAGE_SIZE))
    def lend(self, size: int) -> int:
        buf = bytearray(b"\x5a" * size)
        pa = self.phys.lend(buf)
        assert self.phys.buffer(pa, size) is buf
        self.live[pa] = size
        return pa

    @rule(pa=consumes(regions))
    def remove(self, pa: int) -> None:
        self.phys.remove(pa)
        del self.live[pa]
        self.dead.append(pa)

    @rule(pa=consumes(lends))
    def take_back(self, pa: int) -> None:
        self.phys.take_back(pa)
        del self.live[pa]
        self.dead.append(pa)

    @invariant()
    def aligned_and_disjoint(self) -> None:
        spans = sorted((pa, pa + max(n, 1)) for pa, n in self.live.items())
        for (start, end), (nxt, _) in itertools.pairwise(spans):
            assert end <= nxt, f"{start:#x}..{end:#x} overlaps {nxt:#x}"
        assert all(start % PAGE_SIZE == 0 for start, _ in spans)

    @invariant()
    def counts_match(self) -> None:
        lent = sum(1 for pa in self.live if pa >= PhysMemory.LEND_BASE)
        assert (len(self.phys), self.phys.lent()) == (len(self.live) - lent, lent)

    def teardown(self) -> None:
        for pa in list(self.live):
            if pa >= PhysMemory.LEND_BASE:
                self.phys.take_back(pa)
            else:
                self.phys.remove(pa)
        assert (len(self.phys), self.phys.lent()) == (0, 0)
        for pa in [*self.live, *self.dead]:
            if pa < PhysMemory.LEND_BASE:  # lend slots are reused, region addresses never
                with pytest.raises(PhysFault):
                    self.phys.view(pa, 1)


PhysMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestPhysAllocator = PhysMachine.TestCase
