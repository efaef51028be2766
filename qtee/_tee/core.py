"""The TEE core's share of an open fd (``tee_core.c``): the layout of the argument
blocks every driver reads, and the fd's lifetime (``tee_release``).

``close(fd)`` drops the descriptor, but the ``struct file`` behind it lives on while an
ioctl that started before is still running (the ioctl holds its own reference); the
driver's ``release`` -- for a TEE context, ``close_context`` and the freeing of every
object, shm and id the fd holds -- runs when the last of those calls has returned.  So
no call can add to the fd's tables after they were emptied: whatever an in-flight
invoke, SHM_ALLOC or SUPPL_RECV makes is torn down with the rest.

:class:`FileLife` counts the calls in flight without a lock (a list that each call
appends to before it reads ``closed``, and that ``close`` reads after setting it; list
operations are atomic under the GIL) and runs the teardown in whichever thread sees the
file closed with no call left in it.  A teardown empties what is there, so running it
again finds nothing to do; :meth:`FileLife.abandon` (the kernel itself going away, as
when a VM is destroyed) runs it at once and again as each straggling call leaves.
"""

from __future__ import annotations

import errno
import functools
import itertools
import struct
import threading
from collections.abc import Callable, Iterator, MutableMapping
from typing import Final, TypeVar

from objects import DriverError
from qtee import uapi

__all__ = ["FileLife", "popped"]

_V = TypeVar("_V")

#: A param as the driver handles it: ``(attr, a, b, c)`` of ``struct tee_ioctl_param``.
_P = tuple[int, int, int, int]

_U32: Final = struct.Struct("<I")
_PARAM: Final = struct.Struct("<4Q")  # struct tee_ioctl_param
_INVOKE_HEAD: Final = struct.Struct("<QIII4x")  # struct tee_ioctl_object_invoke_arg
_SUPP_HEAD: Final = struct.Struct("<II")  # supp_recv_arg / supp_send_arg
_NONE_P: Final = (0, 0, 0, 0)
_UB_IN: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_INPUT
_UB_OUT: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_OUTPUT
_OBJ_IN: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_INPUT
_OBJ_OUT: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_OUTPUT
_META_IN: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_INOUT | uapi.TEE_IOCTL_PARAM_ATTR_META
_META_OUT: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_OUTPUT | uapi.TEE_IOCTL_PARAM_ATTR_META


@functools.cache
def _params_struct(n: int) -> struct.Struct:
    """``n`` consecutive ``struct tee_ioctl_param``."""
    return struct.Struct("<" + "4Q" * n)


@functools.cache
def _invoke_struct(n: int) -> struct.Struct:
    """``struct tee_ioctl_object_invoke_arg`` followed by ``n`` params."""
    return struct.Struct("<QIII4x" + "4Q" * n)


def _pack_params(params: list[_P]) -> bytes:
    return _params_struct(len(params)).pack(*itertools.chain.from_iterable(params))


def _pack_invoke(ident: int, op: int, ret: int, params: list[_P]) -> bytes:
    """``struct tee_ioctl_object_invoke_arg`` followed by its params."""
    return _invoke_struct(len(params)).pack(
        ident, op, ret, len(params), *itertools.chain.from_iterable(params)
    )


class FileLife:
    """Calls in flight on one open fd, and the teardown that waits for them.

    ``on_close`` runs at once when the fd is closed (what must not wait: failing the
    requests queued on it, waking the threads blocked in it); ``teardown`` runs after
    ``on_close`` and after the last call in flight has left.  It must be idempotent.
    """

    __slots__ = ("_calls", "_closing", "_on_close", "_teardown", "closed", "released")

    def __init__(self, on_close: Callable[[], None], teardown: Callable[[], None]) -> None:
        #: True once ``close`` ran: new calls fail EBADF (the fd number is gone).
        self.closed = False
        self._calls: list[None] = []
        self._on_close = on_close
        self._teardown = teardown
        self._closing = threading.Lock()  # taken (never given back) by the one close
        #: Set when the teardown has run: the file is released.
        self.released = threading.Event()

    def enter(self) -> None:
        """A call starts on the fd: EBADF if it is closed, else the file stays until
        :meth:`leave`."""
        self._calls.append(None)
        if self.closed:
            self.leave()
            raise DriverError(errno.EBADF, "context is closed")

    def leave(self) -> None:
        """A call is done; the last one out of a closed fd runs the teardown."""
        calls = self._calls
        calls.pop()
        if self.closed and not calls:
            self._release()

    def close(self) -> bool:
        """Close the fd: ``on_close`` now, the teardown now if no call is in flight, else
        when the last one leaves.  False (nothing done) if it was closed already."""
        if not self._closing.acquire(blocking=False):
            return False
        self._on_close()
        self.closed = True
        if not self._calls:
            self._release()
        return True

    def abandon(self) -> None:
        """The kernel behind the fd is gone (a destroyed VM): close it and tear it down
        now, calls in flight or not; each of those sweeps again as it leaves."""
        self.close()
        self._release()

    @property
    def in_flight(self) -> int:
        """Calls running on the fd now."""
        return len(self._calls)

    def _release(self) -> None:
        try:
            self._teardown()
        finally:
            self.released.set()


def popped(table: MutableMapping[int, _V]) -> Iterator[_V]:
    """Each value of ``table``, taken out of it one at a time until it is empty: a
    teardown's way to empty an fd's table while a racing close of one of its entries
    (a shm fd's) takes entries too -- each entry is taken by exactly one of them."""
    while True:
        try:
            _, value = table.popitem()
        except KeyError:
            return
        yield value
