"""Address spaces (qtee/addrspace.py): copy_from_user / copy_to_user with EFAULT."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from objects import DriverError, UsageError
from qtee.addrspace import TASK_SIZE, AddressSpace, CheckedMemory, ProcessMemory, address_of


def efault(fn: object, *args: object) -> DriverError:
    with pytest.raises(DriverError) as info:
        fn(*args)  # type: ignore[operator]
    assert info.value.errno == errno.EFAULT == 14
    return info.value


def test_both_are_address_spaces() -> None:
    assert isinstance(CheckedMemory(), AddressSpace)
    assert isinstance(ProcessMemory(), AddressSpace)
    assert TASK_SIZE == 1 << 47


# --------------------------------------------------------------------------- CheckedMemory


def test_checked_map_read_write_unmap() -> None:
    mem = CheckedMemory()
    buf = bytearray(b"0123456789")
    addr = mem.map(buf)
    assert addr != 0 and addr % CheckedMemory.PAGE == 0
    assert len(mem) == 1
    assert mem.read(addr, 10) == b"0123456789"
    assert mem.read(addr + 3, 4) == b"3456"
    mem.write(addr + 2, b"ab")
    assert buf == bytearray(b"01ab456789")  # writes land in the caller's buffer
    buf[0] = ord("Z")
    assert mem.read(addr, 1) == b"Z"  # and reads see the caller's changes
    mem.unmap(addr)
    assert len(mem) == 0
    efault(mem.read, addr, 1)
    efault(mem.write, addr, b"x")
    with pytest.raises(UsageError):
        mem.unmap(addr)


def test_checked_buffers_do_not_overlap_and_have_guards() -> None:
    mem = CheckedMemory()
    a = bytearray(4096)
    b = bytearray(b"\x01" * 10)
    addr_a, addr_b = mem.map(a), mem.map(b)
    assert addr_b >= addr_a + 4096 + CheckedMemory.PAGE  # a guard page in between
    assert mem.read(addr_a + 4095, 1) == b"\0"
    efault(mem.read, addr_a + 4096, 1)  # the guard page
    efault(mem.read, addr_a + 4090, 7)  # runs past the end of a
    efault(mem.read, addr_b - 1, 2)
    assert mem.read(addr_b, 10) == b"\x01" * 10
    efault(mem.read, addr_b, 11)
    efault(mem.write, addr_b + 9, b"xy")
    assert b == bytearray(b"\x01" * 10)  # a faulting write writes nothing


@pytest.mark.parametrize("addr", [0, 8, CheckedMemory.BASE - 1, TASK_SIZE - 1, TASK_SIZE])
def test_checked_unmapped_addresses(addr: int) -> None:
    mem = CheckedMemory()
    mem.map(bytearray(16))
    efault(mem.read, addr, 1)
    efault(mem.write, addr, b"\0")


def test_checked_read_only_bytes() -> None:
    mem = CheckedMemory()
    data = b"immutable"
    addr = mem.map(data)
    assert mem.read(addr, 9) == b"immutable"
    err = efault(mem.write, addr, b"X")
    assert "read-only" in str(err)
    assert data == b"immutable"


def test_checked_zero_size() -> None:
    mem = CheckedMemory()
    addr = mem.map(bytearray(4))
    assert mem.read(addr, 0) == b""
    assert mem.read(addr + 4, 0) == b""  # one past the end
    assert mem.read(12345, 0) == b""  # unmapped: nothing is copied, nothing faults
    mem.write(12345, b"")
    efault(mem.read, TASK_SIZE + 1, 0)  # access_ok still applies
    efault(mem.read, -1, 0)


def test_checked_empty_buffer_and_memoryview() -> None:
    mem = CheckedMemory()
    empty = mem.map(bytearray())
    efault(mem.read, empty, 1)
    assert mem.read(empty, 0) == b""
    words = memoryview(bytearray(8)).cast("I")
    addr = mem.map(words)
    mem.write(addr + 4, b"\x01\0\0\0")
    assert words[1] == 1
    with pytest.raises(TypeError):
        mem.map("text")  # type: ignore[arg-type]


def test_checked_access_ok() -> None:
    mem = CheckedMemory()
    mem.check(0, 0)
    mem.check(TASK_SIZE - 1, 1)
    mem.check(TASK_SIZE, 0)
    efault(mem.check, TASK_SIZE - 1, 2)
    efault(mem.check, -1, 1)
    efault(mem.check, 0, -1)
    efault(mem.check, 2**64 - 1, 2)  # wraps in u64


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 40), st.integers(-8, 48), st.integers(0, 48))
def test_checked_read_matches_slice(size: int, off: int, n: int) -> None:
    """A read is the buffer's slice when it lies inside the buffer, EFAULT otherwise."""
    mem = CheckedMemory()
    buf = bytearray(range(size))
    addr = mem.map(buf)
    if n == 0 and addr + off >= 0:
        assert mem.read(addr + off, 0) == b""
    elif off >= 0 and off + n <= size:
        assert mem.read(addr + off, n) == bytes(buf[off : off + n])
        mem.write(addr + off, b"\xee" * n)
        assert buf[off : off + n] == b"\xee" * n
    else:
        efault(mem.read, addr + off, n)
        efault(mem.write, addr + off, b"\xee" * n)
        assert buf == bytearray(range(size))


# --------------------------------------------------------------------------- ProcessMemory


def test_process_bytearray() -> None:
    mem = ProcessMemory()
    buf = bytearray(b"hello, world")
    addr = address_of(buf)
    assert addr > 0
    assert mem.read(addr, 12) == b"hello, world"
    assert mem.read(addr + 7, 5) == b"world"
    mem.write(addr + 7, b"W")
    assert buf == bytearray(b"hello, World")
    mem.check(addr, 12)


def test_process_ctypes_buffer() -> None:
    mem = ProcessMemory()
    cbuf = ctypes.create_string_buffer(b"abcdef", 16)
    addr = address_of(cbuf)
    assert addr == ctypes.addressof(cbuf)
    assert mem.read(addr, 6) == b"abcdef"
    mem.write(addr + 1, b"XY")
    assert cbuf.raw[:6] == b"aXYdef"


def test_address_of() -> None:
    assert address_of(bytearray()) == 0
    with pytest.raises(UsageError):
        address_of(memoryview(b"read-only"))  # type: ignore[arg-type]
    buf = bytearray(8)
    assert address_of(memoryview(buf)[2:]) == address_of(buf) + 2


@pytest.mark.parametrize(
    ("addr", "size"),
    [
        (8, 1),  # the zero page is never mapped
        (0, 1),
        (TASK_SIZE, 1),
        (TASK_SIZE - 1, 2),
        (TASK_SIZE + 4096, 8),
        (2**64 - 1, 2),  # wraps around in u64
        (2**64 - 8, 16),
        (-1, 1),
    ],
)
def test_process_efault(addr: int, size: int) -> None:
    mem = ProcessMemory()
    efault(mem.read, addr, size)
    efault(mem.write, addr, b"\0" * size)


def test_process_zero_size() -> None:
    mem = ProcessMemory()
    assert mem.read(8, 0) == b""
    mem.write(8, b"")
    efault(mem.read, TASK_SIZE + 1, 0)


def test_process_write_straddling_a_hole_writes_nothing() -> None:
    """A write whose tail is unmapped faults without touching the mapped head."""
    page = mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    base = libc.mmap(None, 2 * page, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
    assert base not in (None, ctypes.c_void_p(-1).value)
    try:
        assert libc.munmap(base + page, page) == 0
        ctypes.memset(base, 0x5A, page)
        mem = ProcessMemory()
        assert mem.read(base + page - 4, 4) == b"ZZZZ"
        efault(mem.read, base + page - 4, 8)
        efault(mem.write, base + page - 4, b"\x01" * 8)
        assert ctypes.string_at(base + page - 4, 4) == b"ZZZZ"
        efault(mem.read, base + page, 1)
    finally:
        libc.munmap(base, page)


def test_process_memory_after_fork_reads_the_child() -> None:
    """/proc/self/mem names the opener, so after fork the child must reopen it."""
    mem = ProcessMemory()
    buf = bytearray(b"parent")
    addr = address_of(buf)
    assert mem.read(addr, 6) == b"parent"  # opens the fd in this process
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: change its copy, read through the inherited object
        try:
            buf[:] = b"child!"
            mem.write(addr, b"CH")
            os.write(wfd, mem.read(addr, 6))
        finally:
            os._exit(0)
    os.close(wfd)
    try:
        got = os.read(rfd, 64)
    finally:
        os.close(rfd)
        os.waitpid(pid, 0)
    assert got == b"CHild!"
    assert buf == bytearray(b"parent")  # the child's write did not reach the parent
