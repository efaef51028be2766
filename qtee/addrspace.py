"""Address spaces: how the driver model reaches the user pointers an ioctl carries.

A real driver reads ``buf_ptr`` and UBUF addresses with ``copy_from_user`` and answers
EFAULT when the range is not mapped.  qtee does the same through an address space:

* :class:`ProcessMemory` (the default) reads and writes this process's real memory, so
  the address of a ``ctypes`` buffer works as it would with the real driver; unmapped
  addresses give EFAULT instead of a crash (on Linux it goes through ``/proc/self/mem``).
* :class:`CheckedMemory` maps only buffers registered with it, at synthetic addresses,
  and answers EFAULT for everything else -- what tests and the device server use.

``access_ok`` rules are the kernel's: the range must not wrap and must end below the
top of the user address space; a zero-length range is fine anywhere below it.

Both can also :meth:`~SharedSpace.view` a range: the live, writable bytes a driver gets
when it pins user pages for writing (``pin_user_pages`` with ``FOLL_WRITE``, what
SHM_REGISTER does), so a TA works on the caller's memory itself.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import mmap
import os
import threading
from typing import Final, Protocol, runtime_checkable

from objects import DriverError, UsageError

__all__ = [
    "TASK_SIZE",
    "AddressSpace",
    "CheckedMemory",
    "ProcessMemory",
    "SharedSpace",
    "address_of",
]

_BYTES_LIKE: Final = (bytes, bytearray, memoryview)  # (a tuple: a union is built per call)

#: Top of the user address space (arm64 and x86-64 with 48-bit VA).
TASK_SIZE: Final = 1 << 47


def _efault(addr: int, size: int, why: str) -> DriverError:
    return DriverError(errno.EFAULT, f"user range {addr:#x}+{size} {why}")


def _short_pin(addr: int, size: int, pinned: int) -> DriverError:
    """A pin for writing that got no page (EFAULT) or only the leading ``pinned`` bytes
    (the TEE core turns a short pin into ENOMEM)."""
    if pinned <= 0:
        return _efault(addr, size, "is not mapped writable")
    return DriverError(errno.ENOMEM, f"user range {addr:#x}+{size}: only {pinned} bytes pin")


def _access_ok(addr: int, size: int) -> None:
    if not isinstance(addr, int) or not isinstance(size, int):
        raise TypeError("user address and size must be ints")
    if addr < 0 or size < 0 or addr + size > TASK_SIZE:
        raise _efault(addr, size, "is outside the user address space")


@runtime_checkable
class AddressSpace(Protocol):
    """What the driver model needs from user memory."""

    def check(self, addr: int, size: int) -> None:
        """``access_ok``: raise EFAULT if ``[addr, addr+size)`` cannot be a user range."""

    def read(self, addr: int, size: int) -> bytes:
        """``copy_from_user``: ``size`` bytes at ``addr`` or EFAULT."""

    def write(self, addr: int, data: bytes) -> None:
        """``copy_to_user``: ``data`` at ``addr`` or EFAULT (nothing written on EFAULT)."""

    def pin(self, buf: bytes | bytearray) -> int:
        """Make ``buf`` reachable (read-only if ``bytes``) and return its user address."""

    def unpin(self, addr: int) -> None:
        """Undo :meth:`pin` for the buffer at ``addr``."""


@runtime_checkable
class SharedSpace(AddressSpace, Protocol):
    """An address space whose memory the driver can share instead of copying."""

    def view(self, addr: int, size: int) -> memoryview:
        """``pin_user_pages(FOLL_WRITE)``: the live bytes of ``[addr, addr+size)``.

        EFAULT if the first page is not mapped writable, ENOMEM if only a leading part
        is (the TEE core's answer to a short pin)."""
        ...


def _writable_prefix(addr: int, size: int) -> int:
    """How many bytes from ``addr`` (up to ``size``) lie in contiguous writable mappings
    of this process, by ``/proc/self/maps`` (whole pages, as the kernel pins them)."""
    page = mmap.PAGESIZE
    lo = addr - addr % page
    end = addr + size
    reach = lo
    with open("/proc/self/maps", "rb") as maps:
        for line in maps:
            span, perms = line.split(maxsplit=2)[:2]
            start_s, _, stop_s = span.partition(b"-")
            start, stop = int(start_s, 16), int(stop_s, 16)
            if stop <= reach:
                continue
            if start > reach or perms[1:2] != b"w":
                break
            reach = stop
            if reach >= end:
                break
    return max(0, min(reach, end) - addr)


def address_of(buf: bytearray | memoryview | ctypes.Array[ctypes.c_char]) -> int:
    """The address of a writable buffer (for filling ``buf_ptr`` or a UBUF ``a``)."""
    if isinstance(buf, ctypes.Array):
        return ctypes.addressof(buf)
    view = memoryview(buf)
    if view.readonly:
        raise UsageError("address_of needs a writable buffer")
    if view.nbytes == 0:
        return 0
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class ProcessMemory:
    """This process's memory, with EFAULT for unmapped ranges instead of a crash.

    Buffers the caller pins (the client's argument blocks and payloads) are known to be
    mapped, so ranges inside one starting at its address are copied directly; every
    other address goes through ``/proc/self/mem``.
    """

    __slots__ = ("_fd", "_lock", "_pid", "_pinned")

    def __init__(self) -> None:
        self._fd = -1
        self._pid = -1
        self._lock = threading.Lock()
        self._pinned: dict[int, memoryview] = {}

    def pin(self, buf: bytes | bytearray) -> int:
        """The real address of ``buf``, remembered for direct copies until :meth:`unpin`."""
        if isinstance(buf, bytearray):
            if not buf:
                raise UsageError("cannot pin an empty buffer")
            addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        elif isinstance(buf, bytes):
            if not buf:
                raise UsageError("cannot pin an empty buffer")
            addr = ctypes.cast(ctypes.c_char_p(buf), ctypes.c_void_p).value or 0
        else:
            raise TypeError(f"can only pin bytes or bytearray, not {type(buf).__name__}")
        self._pinned[addr] = memoryview(buf)
        return addr

    def unpin(self, addr: int) -> None:
        """Forget the pinned buffer at ``addr``."""
        if self._pinned.pop(addr, None) is None:
            raise UsageError(f"nothing is pinned at {addr:#x}")

    def view(self, addr: int, size: int) -> memoryview:
        """``pin_user_pages(FOLL_WRITE)``: a slice of the pinned buffer holding the range
        (EFAULT if it is pinned read-only), else the real pages themselves -- only once
        ``/proc/self/maps`` shows the whole range mapped writable.  The view stays valid
        while the memory stays mapped: unmapping it under a view is the caller's bug."""
        _access_ok(addr, size)
        for start, pinned in list(self._pinned.items()):
            if start <= addr and addr + size <= start + pinned.nbytes:
                if pinned.readonly:
                    raise _efault(addr, size, "is a read-only pinned buffer")
                return pinned.cast("B")[addr - start : addr - start + size]
        if size == 0:
            return memoryview(bytearray())
        got = _writable_prefix(addr, size)
        if got < size:
            raise _short_pin(addr, size, got)
        return memoryview((ctypes.c_char * size).from_address(addr)).cast("B")

    def _mem_fd(self) -> int:
        pid = os.getpid()
        if self._pid != pid:  # /proc/self/mem names the opener: reopen after fork
            with self._lock:
                if self._pid != pid:
                    self._fd = os.open("/proc/self/mem", os.O_RDWR | os.O_CLOEXEC)
                    self._pid = pid
        return self._fd

    def check(self, addr: int, size: int) -> None:
        """``access_ok``."""
        _access_ok(addr, size)

    def read(self, addr: int, size: int) -> bytes:
        """``copy_from_user``."""
        view = self._pinned.get(addr)
        if view is not None and 0 <= size <= len(view):
            return view[:size].tobytes()  # (tobytes: one call less than bytes() of a slice)
        _access_ok(addr, size)
        if size == 0:
            return b""
        try:
            data = os.pread(self._mem_fd(), size, addr)
        except OSError as exc:
            raise _efault(addr, size, "is not mapped") from exc
        if len(data) != size:
            raise _efault(addr, size, "is only partly mapped")
        return data

    def write(self, addr: int, data: bytes) -> None:
        """``copy_to_user``: probe the whole range first so a fault writes nothing."""
        size = len(data)
        view = self._pinned.get(addr)
        if view is not None and size <= len(view):
            if view.readonly:  # pinned as an input: never written behind its owner's back
                raise _efault(addr, size, "is a read-only pinned buffer")
            view[:size] = data
            return
        _access_ok(addr, size)
        if size == 0:
            return
        self.read(addr, size)
        try:
            written = os.pwrite(self._mem_fd(), data, addr)
        except OSError as exc:
            raise _efault(addr, size, "is not writable") from exc
        if written != size:
            raise _efault(addr, size, "is only partly writable")


class CheckedMemory:
    """Only registered buffers are mapped; everything else is EFAULT.

    Buffers are placed at page-aligned synthetic addresses (never 0), so a pointer into
    one is an ordinary integer that can be stored in ``buf_ptr`` or a UBUF param.
    """

    PAGE: Final = 4096
    BASE: Final = 0x10_0000

    __slots__ = ("_bufs", "_lock", "_next", "_starts")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._bufs: dict[int, memoryview] = {}
        self._next = self.BASE
        self._lock = threading.Lock()

    def map(self, buf: bytearray | memoryview | bytes) -> int:
        """Map ``buf`` (read-only if it is ``bytes``) and return its address."""
        if not isinstance(buf, _BYTES_LIKE):
            raise TypeError(f"can only map bytes-like buffers, not {type(buf).__name__}")
        view = memoryview(buf).cast("B")
        with self._lock:
            addr = self._next
            span = max(view.nbytes, 1)
            self._next = addr + (span + 2 * self.PAGE - 1) // self.PAGE * self.PAGE  # guard page
            if self._next > TASK_SIZE:
                raise DriverError(errno.ENOMEM, "checked address space exhausted")
            bisect.insort(self._starts, addr)
            self._bufs[addr] = view
        return addr

    def unmap(self, addr: int) -> None:
        """Remove the buffer mapped at ``addr``."""
        with self._lock:
            if addr not in self._bufs:
                raise UsageError(f"nothing is mapped at {addr:#x}")
            del self._bufs[addr]
            self._starts.remove(addr)

    def pin(self, buf: bytes | bytearray) -> int:
        """:meth:`map` (the address-space protocol's name)."""
        return self.map(buf)

    def unpin(self, addr: int) -> None:
        """:meth:`unmap`."""
        self.unmap(addr)

    def __len__(self) -> int:
        return len(self._bufs)

    def view(self, addr: int, size: int) -> memoryview:
        """``pin_user_pages(FOLL_WRITE)``: a slice of the mapped buffer holding the range;
        EFAULT if none holds its start or that buffer is read-only (``bytes``), ENOMEM
        if the range runs past the buffer's end (only the leading part pins)."""
        _access_ok(addr, size)
        with self._lock:
            i = bisect.bisect_right(self._starts, addr) - 1
            start = self._starts[i] if i >= 0 else -1
            buf = self._bufs.get(start)
        if buf is None or addr - start >= max(buf.nbytes, 1) or buf.readonly:
            raise _short_pin(addr, size, 0)
        off = addr - start
        if off + size > buf.nbytes:
            raise _short_pin(addr, size, buf.nbytes - off)
        return buf[off : off + size]

    def _find(self, addr: int, size: int) -> tuple[memoryview, int]:
        view = self._bufs.get(addr)
        if view is not None and 0 <= size <= view.nbytes:
            return view, 0
        _access_ok(addr, size)
        with self._lock:
            i = bisect.bisect_right(self._starts, addr) - 1
            if i < 0:
                raise _efault(addr, size, "is not mapped")
            start = self._starts[i]
            view = self._bufs[start]
        off = addr - start
        if off + size > view.nbytes or (size == 0 and off > view.nbytes):
            raise _efault(addr, size, "runs past the mapped buffer")
        return view, off

    def check(self, addr: int, size: int) -> None:
        """``access_ok`` (range sanity only, like the kernel)."""
        _access_ok(addr, size)

    def read(self, addr: int, size: int) -> bytes:
        """``copy_from_user``."""
        view = self._bufs.get(addr)  # the common case, inline: a whole mapped buffer's head
        if view is not None and 0 < size <= view.nbytes:
            return view[:size].tobytes()
        if size == 0:
            _access_ok(addr, size)
            return b""
        view, off = self._find(addr, size)
        return bytes(view[off : off + size])

    def write(self, addr: int, data: bytes) -> None:
        """``copy_to_user``."""
        size = len(data)
        view = self._bufs.get(addr)  # the common case, inline
        if view is not None and 0 < size <= view.nbytes and not view.readonly:
            view[:size] = data
            return
        if size == 0:
            _access_ok(addr, size)
            return
        view, off = self._find(addr, size)
        if view.readonly:
            raise _efault(addr, size, "is read-only")
        view[off : off + size] = data
