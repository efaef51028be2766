"""The device server's address space: the current request's regions, per thread.

Addresses do not cross processes, so an ioctl frame brings the caller's memory the call
may touch (the argument block, buffers, the RECV scratch, registered windows) as regions
(:class:`qtee._remote.frames.Region`).  :class:`RegionMemory` is the served device's
``memory``: in the thread that runs a request it maps that request's regions at their
addresses (:meth:`RegionMemory.begin`) and records which writable ones the driver wrote,
to send back with the reply; anywhere else an access is EFAULT.  ``copy_from_user`` and
``copy_to_user`` keep the kernel's rules: a range outside the user address space or not
inside one region is EFAULT, and a write into a region the client sent read-only too.
"""

from __future__ import annotations

import bisect
import errno
import threading
import time
from collections.abc import Callable
from typing import Final

from objects import DriverError, UsageError
from qtee._remote.frames import Probe, Region, Status
from qtee.addrspace import TASK_SIZE

__all__ = ["CallRegions", "RegionMemory"]


#: ``CallRegions.only`` with no region to remember (none, or one that does not lie in the
#: user address space): empty, at the end of that space.  The one access it holds, an empty
#: one there, the general path answers the same (an empty read or write).
_NOWHERE = TASK_SIZE
_EMPTY: Final = bytearray()  # (never written: an access into it is empty or fails)


def _efault(addr: int, size: int, why: str) -> DriverError:
    return DriverError(errno.EFAULT, f"user range {addr:#x}+{size} {why}")


class CallRegions:
    """One request in a server thread: the regions it brought, at their addresses, which
    were written, who sent it (``peer``: the connection's credentials, or None), and
    (for a client's probe) its callbacks in flight and since when it has run without one.
    ``lender``: called with the call when it starts waiting on a callback (the connection
    takes back the reading it lent to the thread running the call)."""

    __slots__ = (
        "bufs",
        "callbacks",
        "lender",
        "one",
        "only",
        "peer",
        "quiet_since",
        "starts",
        "writable",
        "written",
    )

    def __init__(self, regions: tuple[Region, ...], peer: object = None) -> None:
        #: The start and buffer of the region the last access found (:meth:`remember`),
        #: first the one region of a call that brought one (most do), or the last of
        #: several (a SUPPL_RECV's block: its scratch comes first).
        self.only = _NOWHERE
        self.one = _EMPTY
        if len(regions) == 1 and regions[0].data:  # (most calls: their block alone, no loop)
            r = regions[0]
            addr = r.addr
            buf = bytearray(r.data)
            self.starts = [addr]
            self.bufs = {addr: buf}
            self.writable = {addr} if r.writable else set()
            self.remember(addr, buf)
        else:
            bufs: dict[int, bytearray] = {}
            writable: set[int] = set()
            last = None
            for r in regions:  # (a loop, not two comprehensions: this runs for every ioctl)
                data = r.data
                if data:  # an empty region maps no byte (and may start where another does)
                    last = addr = r.addr
                    bufs[addr] = bytearray(data)
                    if r.writable:
                        writable.add(addr)
            self.starts = sorted(bufs)  # (the starts once each: no list to append to)
            self.bufs = bufs
            self.writable = writable
            if last is not None:
                self.remember(last, bufs[last])
        #: The writable regions written, start -> buffer (what the reply sends back).
        self.written: dict[int, bytearray] = {}
        self.peer = peer
        self.callbacks = 0  # nesting depth of Device.on_callback(True) in this thread
        self.quiet_since = time.monotonic()
        self.lender: Callable[[CallRegions], None] | None = None

    def remember(self, start: int, buf: bytearray) -> None:
        """The next access inside region ``start`` needs no lookup and no range check, if
        the region lies inside the user address space (else nothing is remembered)."""
        if start + len(buf) <= TASK_SIZE:
            self.only = start
            self.one = buf

    def on_callback(self, entering: bool) -> None:
        """``Device.on_callback`` in this request's thread."""
        if entering:
            self.callbacks += 1
            if self.lender is not None:
                self.lender(self)
        else:
            self.callbacks -= 1
            if not self.callbacks:
                self.quiet_since = time.monotonic()

    def status(self, probe: Probe) -> Status:
        """The answer to a probe about this call."""
        if self.callbacks:
            return Status(seq=probe.seq, call=probe.call, running=True, callback=True)
        quiet = max(0, int((time.monotonic() - self.quiet_since) * 1000))
        return Status(seq=probe.seq, call=probe.call, running=True, quiet_ms=quiet)

    def find(self, addr: int, size: int) -> tuple[int, bytearray]:
        i = bisect.bisect_right(self.starts, addr) - 1
        if i < 0:
            raise _efault(addr, size, "is not mapped for this call")
        start = self.starts[i]
        buf = self.bufs[start]
        if addr + size > start + len(buf):
            raise _efault(addr, size, "runs past the mapped buffer")
        return start, buf

    def overlaps(self, addr: int, size: int) -> bool:
        """Whether ``[addr, addr+size)`` shares a byte with a region of this call."""
        end = addr + size
        return any(s < end and addr < s + len(self.bufs[s]) for s in self.starts)

    def copy_out(self, addr: int, dest: bytearray | memoryview) -> None:
        """Copy into ``dest`` what this call's regions hold of ``[addr, addr+len(dest))``
        (the bytes no region covers are left as they are)."""
        end = addr + len(dest)
        for start in self.starts:
            buf = self.bufs[start]
            lo, hi = max(start, addr), min(start + len(buf), end)
            if lo < hi:
                dest[lo - addr : hi - addr] = buf[lo - start : hi - start]


class _ThreadCall(threading.local):
    """The request running in a thread (None in a thread running none)."""

    call: CallRegions | None = None


class RegionMemory:
    """An address space whose mappings are the current request's regions (per thread)."""

    def __init__(self) -> None:
        self._local = _ThreadCall()

    def _regions(self) -> CallRegions:
        call = self._local.call
        if call is None:
            raise DriverError(errno.EFAULT, "no caller memory in this thread")
        return call

    def begin(self, regions: tuple[Region, ...], peer: object = None) -> CallRegions:
        """Map ``regions`` for the request running in this thread (sent by ``peer``)."""
        call = CallRegions(regions, peer)
        self._local.call = call
        return call

    def resume(self, call: CallRegions) -> None:
        """Map again, in this thread, the regions of a request :meth:`begin` mapped."""
        self._local.call = call

    def end(self) -> None:
        """Unmap this thread's request regions."""
        self._local.call = None

    def current(self) -> CallRegions | None:
        """The request running in this thread, if any."""
        return self._local.call

    def on_callback(self, entering: bool) -> None:
        """The served device's ``on_callback`` hook: the request running in this thread
        waits on a callback, or no more (:meth:`CallRegions.on_callback`; the hook reads
        the thread's request itself, as :meth:`current` would, a call fewer per callback)."""
        call = self._local.call
        if call is not None:
            call.on_callback(entering)

    def check(self, addr: int, size: int) -> None:
        """``access_ok``."""
        if addr < 0 or size < 0 or addr + size > TASK_SIZE:
            raise _efault(addr, size, "is outside the user address space")

    def _mapped(self, addr: int, size: int) -> tuple[CallRegions, int, bytearray]:
        """The caller's region holding ``size`` bytes at ``addr``: the call, its start, its
        buffer (EFAULT: no caller memory, unmapped, or running past the buffer)."""
        call = self._local.call
        if call is None:
            raise DriverError(errno.EFAULT, "no caller memory in this thread")
        starts = call.starts
        i = bisect.bisect_right(starts, addr) - 1
        if i < 0:
            raise _efault(addr, size, "is not mapped for this call")
        start = starts[i]
        buf = call.bufs[start]
        if addr + size > start + len(buf):
            raise _efault(addr, size, "runs past the mapped buffer")
        call.remember(start, buf)
        return call, start, buf

    # read and write run for every block an ioctl touches: inside the region the last
    # access found (the call's one region, if it brought one) they need no lookup and no
    # range check (that region lies in the user address space); anywhere else the checks
    # run in the kernel's order, and _mapped finds the region or names the EFAULT.
    def read(self, addr: int, size: int) -> bytes:
        """``copy_from_user`` from the caller's regions."""
        call = self._local.call
        if call is not None:
            off = addr - call.only
            one = call.one
            if off >= 0 and size >= 0 and off + size <= len(one):
                return bytes(one[off : off + size])
        if addr < 0 or size < 0 or addr + size > TASK_SIZE:
            raise _efault(addr, size, "is outside the user address space")
        if size == 0:
            return b""
        _, start, buf = self._mapped(addr, size)
        return bytes(buf[addr - start : addr - start + size])

    def write(self, addr: int, data: bytes) -> None:
        """``copy_to_user`` into a writable region (sent back with the reply)."""
        size = len(data)
        call = self._local.call
        if call is not None:
            start = call.only
            off = addr - start
            one = call.one
            if off >= 0 and size and off + size <= len(one) and start in call.writable:
                one[off : off + size] = data
                call.written[start] = one
                return
        if addr < 0 or addr + size > TASK_SIZE:
            raise _efault(addr, size, "is outside the user address space")
        if size == 0:
            return
        call, start, buf = self._mapped(addr, size)
        if start not in call.writable:
            raise _efault(addr, size, "is read-only")
        buf[addr - start : addr - start + size] = data
        call.written[start] = buf

    def pin(self, buf: bytes | bytearray) -> int:
        """Pinning is the client's business; the server only maps what it is sent."""
        raise UsageError("the server's address space maps regions sent by clients")

    def unpin(self, addr: int) -> None:
        """See :meth:`pin`."""
        raise UsageError("the server's address space maps regions sent by clients")
