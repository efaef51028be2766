"""The shms of one connection: each SHM_ALLOC's memory file, mapped here (sans-IO but
``mmap``).

After a successful SHM_ALLOC the server sends the fd of the shm's memory file with a
``shm`` frame, before the reply; :class:`RemoteShms` maps it for the call it answers
(any other shm frame is a lie), keeps the mapping (:meth:`~RemoteShms.shm_view`) and the
fd (:meth:`~RemoteShms.take_shm_fd`) once the reply passes its checks, and gives both up
on :meth:`~RemoteShms.shm_free` or when the context closes.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import mmap
import os
from typing import TYPE_CHECKING

from objects import DriverError
from qtee import uapi
from qtee._remote.frames import ShmFd, ShmFree, encode
from qtee._remote.remote_send import RemoteSender

if TYPE_CHECKING:
    from qtee._remote.checks import Dialect
    from qtee._remote.remote_lead import _Call

__all__ = ["RemoteShms"]


class RemoteShms(RemoteSender):
    """The shm half of :class:`~qtee._remote.remote.RemoteContext` (a mixin: the context
    owns the attributes declared here)."""

    _fds: collections.deque[int]
    _pending: dict[int, _Call]
    #: shm id -> this process's mapping of its memory file.
    _maps: dict[int, mmap.mmap | bytearray]
    #: shm id -> its memory file's fd, until taken.
    _shm_fds: dict[int, int]
    dialect: Dialect

    def _map_shm(self, msg: ShmFd) -> None:
        """Map the memory file of a new shm (its fd came with the frame's bytes) for the
        SHM_ALLOC call it answers; any other shm frame is a lie."""
        fd = self._fds.popleft() if self._fds else None
        try:
            with self._lock:
                call = self._pending.get(msg.seq)
            if call is None:
                raise DriverError(errno.EPROTO, f"a shm frame for no call in flight ({msg.seq})")
            if call.cmd != uapi.TEE_IOC_SHM_ALLOC or call.shm is not None:
                call.lie = f"a shm frame for call {msg.seq}, which is no SHM_ALLOC awaiting one"
            elif fd is None:
                call.lie = f"shm {msg.id} came without its fd"
            elif os.fstat(fd).st_size != msg.size:
                call.lie = f"shm {msg.id}: memory file size is not {msg.size}"
            else:
                try:
                    buf = mmap.mmap(fd, msg.size) if msg.size else bytearray()
                except (OSError, ValueError, OverflowError) as exc:
                    call.lie = f"shm {msg.id} of {msg.size} bytes cannot be mapped: {exc}"
                else:
                    call.shm = (msg.id, msg.size, buf, fd)
                    fd = None  # the call keeps it
                    return
            raise DriverError(errno.EPROTO, call.lie)
        finally:
            if fd is not None:
                os.close(fd)

    def _drop_shm(self, call: _Call) -> None:
        """A shm frame came for a call that fails: unmap it, close its fd."""
        if call.shm is not None:
            self._unmap(call.shm[2])
            os.close(call.shm[3])
            call.shm = None

    def shm_view(self, shm_id: int) -> memoryview:
        """This process's mapping of a shm this context allocated (the server's pages)."""
        buf = self._maps.get(shm_id)
        if buf is None:
            raise DriverError(errno.EBADF, f"shm {shm_id} is not owned by this context")
        return memoryview(buf)

    def take_shm_fd(self, shm_id: int) -> int:
        """The fd of the memory file behind a shm this context allocated: the caller owns
        it from now on (mapping it gives the same pages; closing it does not free the
        shm, :meth:`shm_free` does).  EBADF for another shm, or one whose fd was taken."""
        with self._lock:
            fd = self._shm_fds.pop(shm_id, None)
        if fd is None:
            raise DriverError(errno.EBADF, f"shm {shm_id} has no memory file fd here")
        return fd

    def shm_free(self, shm_id: int) -> None:
        """Close the shm's fd: unmap here, and the server drops the owner's reference (a
        registered shm of an OP-TEE fd: this side forgets its range)."""
        with self._lock:
            buf = self._maps.pop(shm_id, None)
            fd = self._shm_fds.pop(shm_id, None)
        if buf is not None:
            self._unmap(buf)
        if fd is not None:
            os.close(fd)
        if buf is None and not self.dialect.forget(shm_id):
            raise DriverError(errno.EBADF, f"shm {shm_id} is not owned by this context")
        self._request(lambda seq: encode(ShmFree(seq=seq, id=shm_id)))

    @staticmethod
    def _unmap(buf: mmap.mmap | bytearray) -> None:
        if isinstance(buf, mmap.mmap):
            with contextlib.suppress(BufferError):  # a view is still open: unmapped with it
                buf.close()

    def _unmap_all(self) -> None:
        """The context closed: unmap every shm, close every fd not taken."""
        with self._lock:
            maps, self._maps = list(self._maps.values()), {}
            fds, self._shm_fds = list(self._shm_fds.values()), {}
        for buf in maps:
            self._unmap(buf)
        for fd in fds:
            os.close(fd)
