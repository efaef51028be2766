"""The served device's address space: a request's regions mapped in its thread, every
access checked as ``copy_from_user``/``copy_to_user`` are, whatever region the last access
found (the fast path's remembered one, first the one region or the last one sent)."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from objects import DriverError
from qtee._remote.frames import Region
from qtee._remote.region_memory import CallRegions, RegionMemory
from qtee.addrspace import TASK_SIZE

_BASE = 0x10_0000


@st.composite
def _layouts(draw: st.DrawFn) -> tuple[int, list[Region]]:
    """Up to three disjoint regions (some empty, some read-only), in any order, from a
    base well inside the user address space or just below its end (regions that lie
    across it or past it)."""
    base = draw(st.sampled_from([_BASE, TASK_SIZE - 48]))
    n = draw(st.integers(0, 3))
    regions, addr = [], base
    for _ in range(n):
        addr += draw(st.integers(0, 16))
        size = draw(st.integers(0, 24))
        data = bytes((addr + i) & 0xFF for i in range(size))
        regions.append(Region(addr=addr, data=data, writable=draw(st.booleans())))
        addr += size
    # empty regions anywhere, inside another or at its start too (empty ones overlap nothing)
    for at in draw(st.lists(st.integers(base, addr), max_size=2)):
        regions.append(Region(addr=at, data=b"", writable=draw(st.booleans())))
    return base, draw(st.permutations(regions))


def _outside(addr: int, size: int) -> bool:
    """``access_ok`` fails: EFAULT before any region is looked at."""
    return addr < 0 or size < 0 or addr + size > TASK_SIZE


def _expected_read(regions: list[Region], addr: int, size: int) -> bytes | None:
    """What a read gives in a model of the rules: the bytes, or None for EFAULT."""
    if _outside(addr, size):
        return None
    if size == 0:
        return b""
    for r in regions:
        if r.addr <= addr and addr + size <= r.addr + len(r.data):
            return r.data[addr - r.addr : addr - r.addr + size]
    return None


_ACCESSES = st.lists(
    st.tuples(st.booleans(), st.integers(-4, 160), st.integers(-1, 20)),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(layout=_layouts(), accesses=_ACCESSES)
def test_accesses_follow_the_rules_whatever_region_was_found_last(
    layout: tuple[int, list[Region]], accesses: list[tuple[bool, int, int]]
) -> None:
    """Reads and writes in any order, inside, across, between and outside the regions and
    the user address space: each gives what the model of the rules gives (EFAULT outside
    that space, off a region or into a read-only one, the bytes written read back, written
    regions marked)."""
    base, regions = layout
    mem = RegionMemory()
    call = mem.begin(tuple(regions))
    model = {r.addr: bytearray(r.data) for r in regions if r.data}  # (empty: no bytes)
    writable = {r.addr for r in regions if r.writable and r.data}
    marked: set[int] = set()
    try:
        for is_write, off, size in accesses:
            addr = base + off
            current = [
                Region(addr=a, data=bytes(b), writable=a in writable) for a, b in model.items()
            ]
            if is_write:
                size = max(size, 0)
                data = bytes([0xEE]) * size
                start = next(
                    (
                        r.addr
                        for r in current
                        if r.addr <= addr and addr + size <= r.addr + len(r.data)
                    ),
                    None,
                )
                ok = not _outside(addr, size) and (
                    size == 0 or (start is not None and start in writable)
                )
                if ok:
                    mem.write(addr, data)
                    if size:
                        assert start is not None
                        model[start][addr - start : addr - start + size] = data
                        marked.add(start)
                else:
                    with pytest.raises(DriverError) as exc:
                        mem.write(addr, data)
                    assert exc.value.code == errno.EFAULT
            else:
                want = _expected_read(current, addr, size)
                if want is None:
                    with pytest.raises(DriverError) as exc:
                        mem.read(addr, size)
                    assert exc.value.code == errno.EFAULT
                else:
                    assert mem.read(addr, size) == want
        assert call.written == {a: call.bufs[a] for a in marked}
        assert {a: bytes(b) for a, b in call.bufs.items()} == {
            a: bytes(b) for a, b in model.items()
        }
    finally:
        mem.end()


def test_an_empty_region_inside_another_maps_nothing() -> None:
    """An empty region (a zero-size buffer) that starts inside another, or where it
    starts, takes none of its bytes: a read there gives them whatever came first."""
    a = Region(addr=_BASE, data=bytes(range(16)), writable=True)
    for empty_at in (_BASE + 8, _BASE):
        empty = Region(addr=empty_at, data=b"", writable=False)
        for regions in ((a, empty), (empty, a)):
            mem = RegionMemory()
            call = mem.begin(regions)
            try:
                assert mem.read(_BASE + 8, 4) == bytes(range(8, 12))
                mem.write(_BASE, b"\x01")
                assert call.written == {_BASE: call.bufs[_BASE]}
            finally:
                mem.end()


def test_several_regions_start_with_the_last_one_sent() -> None:
    """A SUPPL_RECV sends its scratch, then its block: the block, which the RECV reads
    first, is the region remembered at the start."""
    scratch = Region(addr=_BASE, data=bytes(64), writable=True)
    block = Region(addr=_BASE + 0x2000, data=bytes(32), writable=True)
    call = CallRegions((scratch, block))
    assert call.only == block.addr and call.one == bytearray(block.data)
    assert CallRegions(()).one == bytearray()


def test_a_region_past_the_user_address_space_is_never_remembered() -> None:
    """A region lying across the end of the user address space is mapped, but an access
    past that end is EFAULT, even right after an access found the region."""
    mem = RegionMemory()
    call = mem.begin((Region(addr=TASK_SIZE - 8, data=bytes(16), writable=True),))
    try:
        assert call.one == bytearray()
        assert mem.read(TASK_SIZE, 0) == b""  # the empty access at the end: allowed
        assert mem.read(TASK_SIZE - 8, 4) == bytes(4)
        mem.write(TASK_SIZE - 4, b"\x01\x02")
        for addr, size in ((TASK_SIZE - 2, 4), (TASK_SIZE, 1), (TASK_SIZE + 1, 0)):
            with pytest.raises(DriverError) as exc:
                mem.read(addr, size)
            assert "outside the user address space" in str(exc.value)
            with pytest.raises(DriverError):
                mem.write(addr, bytes(size))
        assert call.one == bytearray() and call.written.keys() == {TASK_SIZE - 8}
    finally:
        mem.end()
