"""Guest RAM: guest-physical ranges, the guest kernel's pool, and the VMM's pins.

optee.md §6.1 (hypervisor duties: translate IPA -> PA, pin shared pages, "no swap,
ownership transfer or unmap while shared"), §6.2 (guest RAM at IPA 0 collides with the
NULL memref, so guest RAM starts elsewhere); qtee-kernel.md §3.1 (SMC buffers are page
granular and zero-filled) and §2.4 (MAP_REGION answers one contiguous range).
"""

from __future__ import annotations

import errno

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from objects import DriverError, UsageError
from qtee._qcomtee.shm import PhysMemory
from qtee.vm import GUEST_RAM_BASE, PAGE_SIZE, GuestFault, GuestRam, Pin

SIZE = 16 * PAGE_SIZE


@pytest.fixture
def host() -> PhysMemory:
    return PhysMemory()


@pytest.fixture
def ram(host: PhysMemory) -> GuestRam:
    return GuestRam(SIZE, host)


def test_ram_is_one_host_region_at_a_non_zero_guest_base(host: PhysMemory, ram: GuestRam) -> None:
    """§6.2: IPA 0 would collide with the NULL memref; §2.4: one contiguous host range."""
    assert ram.base == GUEST_RAM_BASE != 0
    assert len(host) == 1
    assert ram.translate(ram.base, SIZE) == ram.hpa
    assert ram.translate(ram.base + 5 * PAGE_SIZE + 7, 1) == ram.hpa + 5 * PAGE_SIZE + 7
    ram.write(ram.base + 100, b"guest")
    assert bytes(host.view(ram.hpa + 100, 5)) == b"guest"  # the host sees the same bytes


@pytest.mark.parametrize(
    ("offset", "size"),
    [(-1, 1), (SIZE, 1), (SIZE - 1, 2), (0, SIZE + 1), (-PAGE_SIZE, PAGE_SIZE), (0, -1)],
)
def test_translate_read_write_pin_refuse_ranges_outside_ram(
    ram: GuestRam, offset: int, size: int
) -> None:
    gpa = ram.base + offset
    for call in (
        lambda: ram.translate(gpa, size),
        lambda: ram.read(gpa, size),
        lambda: ram.pin(gpa, size),
        lambda: ram.view(gpa, size),
    ):
        with pytest.raises(GuestFault) as exc:
            call()
        assert exc.value.errno == errno.EFAULT
        assert "outside guest RAM" in str(exc.value)
    assert ram.pinned_pages() == 0


def test_write_outside_ram_writes_nothing(ram: GuestRam) -> None:
    with pytest.raises(GuestFault):
        ram.write(ram.base + SIZE - 2, b"abcd")
    assert ram.read(ram.base + SIZE - 2, 2) == b"\0\0"


def test_ranges_at_the_edges_are_fine(ram: GuestRam) -> None:
    assert ram.read(ram.base, 0) == b""
    assert ram.read(ram.base + SIZE, 0) == b""
    assert ram.translate(ram.base + SIZE - 1, 1) == ram.hpa + SIZE - 1


def test_pins_count_per_page(ram: GuestRam) -> None:
    """Pinning counts every page the range touches, and each page once per pin."""
    a = ram.pin(ram.base + PAGE_SIZE - 8, 16)  # straddles pages 0 and 1
    assert a == Pin((ram.base >> 12) + 0, 2)
    b = ram.pin(ram.base + PAGE_SIZE, PAGE_SIZE)  # page 1 again
    assert b == Pin((ram.base >> 12) + 1, 1)
    assert ram.pinned_pages() == 2
    ram.unpin(a)
    assert ram.pinned_pages() == 1  # page 1 still held by b
    ram.unpin(b)
    assert ram.pinned_pages() == 0
    with pytest.raises(UsageError):
        ram.unpin(b)  # a second unpin is a bug, and changes nothing
    assert ram.pinned_pages() == 0
    assert ram.pin(ram.base, 0).pages == 0


def test_discard_refuses_pinned_pages(ram: GuestRam) -> None:
    """§6.1: no unmap while shared -> EBUSY; after unpin the range can be discarded."""
    gpa = ram.base + 2 * PAGE_SIZE
    ram.write(gpa, b"shared")
    pin = ram.pin(gpa, 6)
    with pytest.raises(DriverError) as exc:
        ram.discard(ram.base, 4 * PAGE_SIZE)
    assert exc.value.errno == errno.EBUSY
    assert ram.read(gpa, 6) == b"shared"  # nothing changed
    ram.discard(ram.base + 3 * PAGE_SIZE, PAGE_SIZE)  # an unpinned page is fine
    ram.unpin(pin)
    ram.discard(ram.base, 4 * PAGE_SIZE)
    assert ram.read(gpa, 6) == bytes(6)


def test_lend_copies_in_and_take_back_copies_out(ram: GuestRam) -> None:
    """A guest's SMC buffers live in guest pages: lend copies in, take_back copies out."""
    buf = bytearray(b"inbound!" * 3)
    gpa = ram.lend(buf)
    assert gpa % PAGE_SIZE == 0 and gpa in ram
    assert ram.read(gpa, len(buf)) == bytes(buf)
    buf[:4] = b"XXXX"  # not an alias: the guest page keeps the copy
    assert ram.read(gpa, 4) == b"inbo"
    ram.write(gpa, b"resp")  # what the TEE side wrote
    assert len(ram) == 1
    ram.take_back(gpa)
    assert bytes(buf[:8]) == b"respund!"
    assert len(ram) == 0
    with pytest.raises(UsageError):
        ram.take_back(gpa)


def test_lend_is_page_granular_and_reuses_freed_pages(ram: GuestRam) -> None:
    out = bytearray(PAGE_SIZE)
    big = bytearray(PAGE_SIZE + 1)
    a = ram.lend(out)
    b = ram.lend(big)
    assert b == a + PAGE_SIZE
    c = ram.lend(bytearray(1))
    assert c == b + 2 * PAGE_SIZE  # big took two pages
    ram.take_back(a)
    ram.take_back(b)
    assert ram.lend(bytearray(PAGE_SIZE)) == a  # a freed single page is reused first
    ram.take_back(a)
    ram.take_back(c)
    assert len(ram) == 0


def test_single_pages_kept_aside_do_not_fragment_ram(ram: GuestRam) -> None:
    """Every page lent one by one and given back: the whole RAM is still one allocation."""
    pages = [ram.lend(bytearray(8)) for _ in range(SIZE // PAGE_SIZE)]
    assert sorted(pages) == [ram.base + k * PAGE_SIZE for k in range(SIZE // PAGE_SIZE)]
    for gpa in pages:
        ram.take_back(gpa)
    whole = ram.alloc(SIZE)
    assert whole == ram.base and ram.read(whole, SIZE) == bytes(SIZE)
    ram.free(whole)


def test_out_of_guest_ram_is_enomem(ram: GuestRam) -> None:
    gpa = ram.alloc(SIZE)
    with pytest.raises(DriverError) as exc:
        ram.lend(bytearray(1))
    assert exc.value.errno == errno.ENOMEM
    with pytest.raises(DriverError) as exc:
        ram.backing(1)
    assert exc.value.errno == errno.ENOMEM
    ram.free(gpa)
    assert len(ram) == 0


def test_backing_places_shm_in_guest_pages(ram: GuestRam) -> None:
    """SHM_ALLOC in a guest: the shm's bytes are guest pages, its paddr their gpa."""
    view, fd = ram.backing(100)
    assert fd is None and len(view) == 100
    gpa = ram.add(view)
    view[:5] = b"hello"
    assert ram.read(gpa, 5) == b"hello"
    assert bytes(ram.view(gpa, 5)) == b"hello"
    with pytest.raises(UsageError):
        ram.add(bytearray(100))  # only buffers backing() handed out
    ram.remove(gpa)
    assert len(ram) == 0


def test_close_frees_the_host_region_only_when_nothing_is_pinned(
    host: PhysMemory, ram: GuestRam
) -> None:
    ram.alloc(100)  # a guest kernel allocation: it goes with the RAM
    in_flight = bytearray(b"smc")
    lent = ram.lend(in_flight)  # an SMC buffer still lent: its thread takes it back
    pin = ram.pin(ram.base, 1)
    with pytest.raises(DriverError) as exc:
        ram.close()
    assert exc.value.errno == errno.EBUSY
    assert len(host) == 1 and not ram.closed
    ram.unpin(pin)
    ram.close()
    assert len(host) == 0 and ram.closed
    assert len(ram) == 1  # only the lent buffer
    ram.take_back(lent)
    assert len(ram) == 0 and in_flight == b"smc"
    with pytest.raises(GuestFault):
        ram.translate(ram.base, 1)
    with pytest.raises(GuestFault):
        ram.pin(ram.base, 1)
    gpa = ram.lend(bytearray(8))  # the guest kernel side still unwinds cleanly
    ram.take_back(gpa)
    ram.close()  # idempotent


@pytest.mark.parametrize("size", [0, -4096, 4095, 4097, "4096", True])
def test_bad_sizes_are_refused(host: PhysMemory, size: object) -> None:
    with pytest.raises(UsageError, match="positive multiple of 4096"):
        GuestRam(size, host)  # type: ignore[arg-type]
    assert len(host) == 0


def test_pin_smc_pins_both_buffers_of_an_smc_and_copy_reads_them(ram: GuestRam) -> None:
    """An SMC's inbound and outbound pages are pinned together for one call (optee.md
    §6.1: pinned for the call); the inbound is copied into VMM memory, not viewed."""
    ram.write(ram.base, b"in")
    call = object()
    assert ram.pin_smc(call, ram.base, 16, ram.base + PAGE_SIZE, PAGE_SIZE) == 2
    assert ram.pinned_pages() == 2
    with pytest.raises(DriverError) as busy:
        ram.discard(ram.base + PAGE_SIZE, PAGE_SIZE)  # the outbound page is held
    assert busy.value.code == errno.EBUSY
    with pytest.raises(DriverError) as busy:
        ram.close()
    assert busy.value.code == errno.EBUSY and "2 guest pages" in busy.value.detail
    with pytest.raises(UsageError):
        ram.pin_smc(call, ram.base, 16, ram.base + PAGE_SIZE, PAGE_SIZE)  # one pin per call
    shadow = bytearray(b"old contents, longer than 16 bytes")
    ram.copy_into(shadow, ram.base, 16)
    assert shadow == b"in" + bytes(14)  # resized to the range
    ram.write(ram.base, b"XX")  # the guest rewrites its buffer: the copy keeps the original
    assert shadow[:2] == b"in"
    ram.unpin_smc(call)
    assert ram.pinned_pages() == 0
    with pytest.raises(UsageError):
        ram.unpin_smc(call)  # not held any more: nothing changes
    assert ram.pinned_pages() == 0
    assert ram.pin_smc(call, ram.base, 8, ram.base, 8) == 2  # one page, both ranges in it
    assert ram.pinned_pages() == 1
    pin = ram.pin(ram.base, 1)
    ram.unpin_smc(call)
    assert ram.pinned_pages() == 1  # the other pin still holds the page
    ram.unpin(pin)
    assert ram.pinned_pages() == 0
    with pytest.raises(GuestFault):
        ram.pin_smc(call, ram.base, 16, ram.base + SIZE, PAGE_SIZE)
    with pytest.raises(GuestFault):
        ram.pin_smc(call, ram.base, -1, ram.base, 8)
    with pytest.raises(GuestFault):
        ram.copy_into(shadow, ram.base + SIZE - 4, 8)
    assert shadow == b"in" + bytes(14)  # a fault changes nothing
    with pytest.raises(TypeError):
        ram.pin_smc(call, ram.base, 16.0, ram.base, 8)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ram.pin_smc(call, str(ram.base), 16, ram.base, 8)  # type: ignore[arg-type]
    assert ram.pinned_pages() == 0


def test_pin_smc_of_multi_page_and_empty_ranges(ram: GuestRam) -> None:
    """A 3-page inbound and a 0-byte one: pages counted by what each range covers."""
    a, b = object(), object()
    assert ram.pin_smc(a, ram.base + 100, 2 * PAGE_SIZE, ram.base + 4 * PAGE_SIZE, PAGE_SIZE) == 4
    assert ram.pinned_pages() == 4
    assert ram.pin_smc(b, ram.base + 8 * PAGE_SIZE, 0, ram.base + 4 * PAGE_SIZE, PAGE_SIZE) == 1
    assert ram.pinned_pages() == 4  # the empty range pins nothing, page 4 is held twice
    with pytest.raises(DriverError):
        ram.discard(ram.base + 2 * PAGE_SIZE, 1)  # the 3rd page of the inbound
    ram.discard(ram.base + 3 * PAGE_SIZE, PAGE_SIZE)  # between the ranges: free
    ram.unpin_smc(a)
    assert ram.pinned_pages() == 1
    ram.unpin_smc(b)
    assert ram.pinned_pages() == 0


class PinMachine(RuleBasedStateMachine):
    """Random pins, SMC pins and their releases (valid and stale) against a per-page model:
    ``pinned_pages()`` and ``discard``'s EBUSY always agree with it, a refused unpin changes
    nothing, and everything released leaves no page pinned (optee.md §6.1)."""

    def __init__(self) -> None:
        super().__init__()
        self.ram = GuestRam(SIZE, PhysMemory())
        self.model = [0] * (SIZE // PAGE_SIZE)
        self.held: list[tuple[str, object, list[int]]] = []

    def _pages(self, off: int, n: int) -> list[int]:
        return list(range(off // PAGE_SIZE, (off + n + PAGE_SIZE - 1) // PAGE_SIZE)) if n else []

    @rule(off=st.integers(0, SIZE - 1), n=st.integers(0, 3 * PAGE_SIZE))
    def pin(self, off: int, n: int) -> None:
        if off + n > SIZE:
            with pytest.raises(GuestFault):
                self.ram.pin(self.ram.base + off, n)
            return
        pin = self.ram.pin(self.ram.base + off, n)
        pages = self._pages(off, n)
        for p in pages:
            self.model[p] += 1
        self.held.append(("pin", pin, pages))

    @rule(
        a=st.integers(0, SIZE - 1),
        an=st.integers(0, 2 * PAGE_SIZE),
        b=st.integers(0, SIZE // PAGE_SIZE - 1),
    )
    def pin_smc(self, a: int, an: int, b: int) -> None:
        b *= PAGE_SIZE
        if a + an > SIZE:
            with pytest.raises(GuestFault):
                self.ram.pin_smc(object(), self.ram.base + a, an, self.ram.base + b, PAGE_SIZE)
            return
        token = object()
        pages = [*self._pages(a, an), b // PAGE_SIZE]
        got = self.ram.pin_smc(token, self.ram.base + a, an, self.ram.base + b, PAGE_SIZE)
        assert got == len(pages)
        for p in pages:
            self.model[p] += 1
        self.held.append(("smc", token, pages))

    def _release(self, k: int) -> tuple[str, object, list[int]] | None:
        """Release the k-th held pin (modulo), in the RAM and the model; what it was."""
        if not self.held:
            return None
        kind, handle, pages = self.held.pop(k % len(self.held))
        if kind == "pin":
            self.ram.unpin(handle)  # type: ignore[arg-type]
        else:
            self.ram.unpin_smc(handle)
        for p in pages:
            self.model[p] -= 1
        return kind, handle, pages

    @rule(k=st.integers(0, 50))
    def release(self, k: int) -> None:
        self._release(k)

    @rule(k=st.integers(0, 50))
    def release_twice_is_refused_when_uncovered(self, k: int) -> None:
        """A second release of the same handle is refused, nothing changed: always for a
        call's SMC pin (held by its key), and for a plain pin unless other pins still
        cover its pages (those are counted per page)."""
        released = self._release(k)
        if released is None:
            return
        kind, handle, pages = released
        if kind == "smc" or any(self.model[p] < pages.count(p) for p in set(pages)):
            before = list(self.model)
            with pytest.raises(UsageError):
                if kind == "pin":
                    self.ram.unpin(handle)  # type: ignore[arg-type]
                else:
                    self.ram.unpin_smc(handle)
            assert self.model == before

    @invariant()
    def counts_agree(self) -> None:
        assert self.ram.pinned_pages() == sum(1 for c in self.model if c)

    @rule(page=st.integers(0, SIZE // PAGE_SIZE - 1))
    def discard(self, page: int) -> None:
        if self.model[page]:
            with pytest.raises(DriverError) as busy:
                self.ram.discard(self.ram.base + page * PAGE_SIZE, PAGE_SIZE)
            assert busy.value.code == errno.EBUSY
        else:
            self.ram.discard(self.ram.base + page * PAGE_SIZE, PAGE_SIZE)

    def teardown(self) -> None:
        for kind, handle, _pages in self.held:
            if kind == "pin":
                self.ram.unpin(handle)  # type: ignore[arg-type]
            else:
                self.ram.unpin_smc(handle)
        assert self.ram.pinned_pages() == 0
        self.ram.close()


TestPinMachine = PinMachine.TestCase
TestPinMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
