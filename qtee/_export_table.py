"""The client's export table and pinned argument blocks: the public seam the worker pool
serves a client's callback objects through (libqcomtee's table of objects on the root)."""

from __future__ import annotations

import errno
import sys
import threading
from typing import TYPE_CHECKING, Any, Final

from objects import CyclicAllocator, DriverError, UsageError
from qtee import uapi
from qtee._handles import CallbackObject
from qtee.addrspace import AddressSpace

if TYPE_CHECKING:
    from qtee._tracker import _ClientTrack

__all__ = ["CALLBACK_IDS_MAX", "ArgBlock", "ExportTable"]

_BUF: Final = uapi.BUF_DATA_STRUCT
#: Callback objects one client can have exported at once (libqcomtee: ids 1..1023).
CALLBACK_IDS_MAX: Final = 1023


class ArgBlock:
    """A pinned ioctl argument block (``TEE_MAX_ARG_SIZE`` bytes at ``addr`` in ``mem``) and
    the ``struct tee_ioctl_buf_data`` that points the kernel at it: what one thread hands
    to the TEE ioctls that take a buffer (INVOKE, SUPPL_RECV, SUPPL_SEND)."""

    __slots__ = ("addr", "arg", "buf", "mem")

    def __init__(self, mem: AddressSpace) -> None:
        if not isinstance(mem, AddressSpace):
            raise TypeError(f"an ArgBlock is pinned in an AddressSpace, not {mem!r}")
        self.mem = mem
        self.buf = bytearray(uapi.TEE_MAX_ARG_SIZE)
        self.addr = mem.pin(self.buf)
        self.arg = bytearray(_BUF.size)

    def close(self) -> None:
        """Unpin the block (it is not used again)."""
        self.mem.unpin(self.addr)


class ExportTable:
    """The callback objects one client has exported, by callback id (libqcomtee's table
    on the root object): an id is taken round-robin in 1..1023 when an object is first
    sent and stays the object's while references to it are out -- one per send, each
    dropped by QTEE's release notification or by a send QTEE never received."""

    __slots__ = ("_by_obj", "_entries", "_ids", "_lock", "track")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[int, list[Any]] = {}  # callback id -> [object, references]
        self._by_obj: dict[int, int] = {}  # id() of the object -> callback id
        self._ids = CyclicAllocator(1, CALLBACK_IDS_MAX, name="callback ids")
        #: The leak check's record of where each id was first sent (None: not tracked).
        self.track: _ClientTrack | None = None

    def export(self, obj: CallbackObject, refs: int = 1) -> int:
        """``refs`` more references on ``obj``'s callback id, allocated on its first send;
        the id (ENOSPC with 1023 objects exported)."""
        if not isinstance(obj, CallbackObject):
            raise TypeError(f"only a CallbackObject is exported, not {type(obj).__name__}")
        with self._lock:
            uid = self._by_obj.get(id(obj))
            if uid is None:
                try:
                    uid = self._ids.alloc()
                except DriverError:
                    raise DriverError(
                        errno.ENOSPC, f"{CALLBACK_IDS_MAX} callback objects already exported"
                    ) from None
                self._by_obj[id(obj)] = uid
                self._entries[uid] = [obj, 0]
                if self.track is not None:
                    self.track.exports[uid] = self.track.tracker.where(sys._getframe(1))
            self._entries[uid][1] += refs
            return uid

    def hold(self, uid: int) -> None:
        """One more reference on the exported id ``uid`` (dropped with :meth:`unexport`)."""
        with self._lock:
            entry = self._entries.get(uid)
            if entry is None:
                raise UsageError(f"callback id {uid!r} is not exported")
            entry[1] += 1

    def unexport(self, uid: int) -> None:
        """Drop one reference on ``uid``; the last frees the id (an id not exported: no-op,
        as a release notification for it is)."""
        with self._lock:
            entry = self._entries.get(uid)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] <= 0:
                del self._entries[uid]
                del self._by_obj[id(entry[0])]
                self._ids.free(uid)
                if self.track is not None:
                    self.track.exports.pop(uid, None)

    def get(self, uid: int) -> CallbackObject | None:
        """The callback object exported as ``uid`` (None: not exported)."""
        entry = self._entries.get(uid)  # (one dict lookup, atomic: no lock needed)
        return entry[0] if entry is not None else None

    def items(self) -> list[tuple[int, CallbackObject]]:
        """``(callback id, object)`` for each exported object, by id order of export."""
        with self._lock:
            return [(uid, entry[0]) for uid, entry in self._entries.items()]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
