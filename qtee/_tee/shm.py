"""Shared memory as the TEE core keeps it (``tee_shm.c``): what a shm's bytes live in,
the largest allocation, and the steps of SHM_ALLOC every
driver shares (:func:`alloc_size`: the struct's checks; :func:`install`: the next id of
the device-wide table, nothing left behind on failure).

``TEE_IOC_SHM_ALLOC`` creates a shm (ids from 1, device-wide) backed by a zeroed buffer:
a private one in process, a memory file a device server can hand to its client.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from collections.abc import Callable, MutableMapping
from typing import Final, TypeAlias, TypeVar

from objects import DriverError, ObjectTable
from qtee import _checks, uapi

__all__ = [
    "PAGE_SIZE",
    "SHM_MAX",
    "MemfdShm",
    "ShmBacking",
    "ShmBuffer",
    "alloc_size",
    "discard_backing",
    "install",
    "memfd_backing",
    "private_backing",
]

#: Physical memory is handed out in whole pages (QK §3.1 "page granular").
PAGE_SIZE: Final = 4096
#: The largest SHM_ALLOC: qcomtee's pool takes a shm's pages with ``alloc_pages_exact``
#: (``tee_dyn_shm_alloc_helper``), which cannot go past 2**MAX_PAGE_ORDER contiguous
#: pages -- 4 MiB with arm64's 4 KiB pages and the default order 10; past it, ENOMEM.
SHM_MAX: Final = PAGE_SIZE << 10


_S = TypeVar("_S")

#: What a shm's bytes live in: a private buffer, a mapping of a memory file, or a view
#: of pages someone else owns (a guest's RAM).
ShmBuffer: TypeAlias = bytearray | mmap.mmap | memoryview
#: Makes the buffer of a new shm of a size: the buffer and the fd of the file behind it
#: (None for a private buffer).  Raises OSError when memory runs out.
ShmBacking: TypeAlias = Callable[[int], tuple[ShmBuffer, int | None]]


def private_backing(size: int) -> tuple[ShmBuffer, int | None]:
    """A zeroed private buffer (the in-process default)."""
    return bytearray(size), None


def memfd_backing(size: int) -> tuple[ShmBuffer, int | None]:
    """A zeroed anonymous memory file and its shared mapping: the fd can be handed to
    another process, which maps the same pages (what the kernel's shm fd is for)."""
    fd = os.memfd_create("qtee-shm", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        buf: ShmBuffer = mmap.mmap(fd, size) if size else bytearray()
    except BaseException:
        os.close(fd)
        raise
    return buf, fd


def discard_backing(buf: ShmBuffer, fd: int | None) -> None:
    """Undo a backing's buffer that never became a shm: close its file, unmap it."""
    if fd is not None:
        os.close(fd)
    if isinstance(buf, mmap.mmap):
        with contextlib.suppress(BufferError):
            buf.close()


class MemfdShm:
    """An OP-TEE shm's memory file: its fd until taken (SHM_ALLOC hands it out), and
    the mapping the TA sees."""

    __slots__ = ("buf", "fd")

    def __init__(self, buf: ShmBuffer, fd: int | None) -> None:
        self.buf = buf
        self.fd = fd

    @classmethod
    def allocate(cls, size: int) -> tuple[bytearray | memoryview, MemfdShm]:
        """A fresh memory file of ``size`` bytes: the view for the shm, and its owner;
        ENOMEM when the file cannot be made."""
        try:
            buf, fd = memfd_backing(size)
        except OSError as exc:
            raise DriverError(errno.ENOMEM, f"cannot allocate {size} bytes: {exc}") from None
        view = buf if isinstance(buf, bytearray) else memoryview(buf)  # size 0: nothing mapped
        return view, cls(buf, fd)

    def take_fd(self) -> int | None:
        fd, self.fd = self.fd, None
        return fd

    def close(self) -> None:
        """Close the fd if still held, and unmap (later, with the last view, if one is
        still open)."""
        discard_backing(self.buf, self.take_fd())


def alloc_size(arg: bytearray | memoryview, shm_max: int) -> int:
    """SHM_ALLOC's struct read (EFAULT), its flags (EINVAL unless 0), and its size: past
    ``shm_max`` -- ``alloc_pages_exact`` past the largest page order -- ENOMEM."""
    data = uapi.ShmAllocData.unpack(_checks.need_arg(arg, uapi.ShmAllocData.SIZE))
    if data.flags:
        raise DriverError(errno.EINVAL, "SHM_ALLOC flags must be 0")
    if data.size > shm_max:
        raise DriverError(errno.ENOMEM, f"cannot allocate {data.size} bytes (at most {shm_max})")
    return data.size


def install(
    table: ObjectTable[_S],
    shms: MutableMapping[int, _S],
    make: Callable[[int], _S],
    undo: Callable[[], None],
) -> _S:
    """A new shm under the next free id of the device's ``table`` (``tee_shm_alloc``'s
    ``idr_alloc``), filed in the fd's ``shms``.  ``make(shm_id)`` builds it; if that
    (or the id) fails, the id is freed and ``undo`` discards the bytes made for it."""
    shm_id = -1
    shm: _S | None = None
    try:
        shm_id = table.reserve()
        shm = make(shm_id)
    finally:
        if shm is None:  # no id, or no shm: undo what was made
            if shm_id >= 0:
                table.erase(shm_id)
            undo()
    table.replace(shm_id, shm)
    shms[shm_id] = shm
    return shm
