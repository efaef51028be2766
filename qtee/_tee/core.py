"""The TEE core's share of an open fd (``tee_core.c``): the ioctl switch, the layout of
the argument blocks every driver reads, and the fd's lifetime (``tee_release``).

:class:`TeeDriverOps` is what a driver gives the core (``struct tee_driver_ops``), and
:class:`TeeFile` is the fd both drivers' contexts build on: ``ioctl`` runs inside the
fd's :class:`FileLife` and goes through one switch (``tee_ioctl``) to the driver's op;
an ioctl whose op the driver lacks is EINVAL, as the core answers a NULL op.

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
from typing import TYPE_CHECKING, ClassVar, Final, Generic, Protocol, TypeVar

from objects import DriverError
from qtee import _checks, uapi

if TYPE_CHECKING:
    from qtee._tee.shm import ShmBuffer

__all__ = ["FileLife", "TeeDriverOps", "TeeFile", "popped"]

_V = TypeVar("_V")


class FileShm(Protocol):
    """A shm as an fd holds it: the bytes ``mmap`` of its fd would give."""

    @property
    def buf(self) -> ShmBuffer: ...


_S = TypeVar("_S", bound=FileShm)

#: A param as the driver handles it: ``(attr, a, b, c)`` of ``struct tee_ioctl_param``.
_P = tuple[int, int, int, int]

_U32: Final = struct.Struct("<I")
_PARAM: Final = uapi.PARAM_STRUCT  # struct tee_ioctl_param
_INVOKE_HEAD: Final = struct.Struct("<QIII4x")  # struct tee_ioctl_object_invoke_arg
_SUPP_HEAD: Final = uapi.SUPP_ARG_STRUCT  # supp_recv_arg / supp_send_arg
_NONE_P: Final = (0, 0, 0, 0)
_UB_IN: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_INPUT
_UB_OUT: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_OUTPUT
_OBJ_IN: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_INPUT
_OBJ_OUT: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_OUTPUT
_META_IN: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_INOUT | uapi.TEE_IOCTL_PARAM_ATTR_META
_META_OUT: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_OUTPUT | uapi.TEE_IOCTL_PARAM_ATTR_META
_OBJECT_INVOKE: Final = uapi.TEE_IOC_OBJECT_INVOKE
_SUPPL_RECV: Final = uapi.TEE_IOC_SUPPL_RECV
_SUPPL_SEND: Final = uapi.TEE_IOC_SUPPL_SEND


#: ``n`` consecutive ``struct tee_ioctl_param`` (uapi's layout, one struct per ``n``).
_params_struct: Final = functools.cache(uapi.params_struct)


@functools.cache
def _invoke_struct(n: int) -> struct.Struct:
    """``struct tee_ioctl_object_invoke_arg`` followed by ``n`` params."""
    return struct.Struct("<QIII4x" + "4Q" * n)


def _pack_params(params: list[_P]) -> bytes:
    return _params_struct(len(params)).pack(*itertools.chain.from_iterable(params))


def _pack_invoke(ident: int, op: int, ret: int, params: list[_P]) -> bytes:
    """``struct tee_ioctl_object_invoke_arg`` followed by its params."""
    if not params:  # the header alone (a null invoke, a release)
        return _INVOKE_HEAD.pack(ident, op, ret, 0)
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


class TeeDriverOps(Protocol):
    """A TEE driver's ops on one fd (``struct tee_driver_ops``), as :class:`TeeFile`'s
    switch calls them: each takes the ioctl's struct (updated in place), returns 0, and
    fails with the driver's errno.  :class:`TeeFile` gives each one the core's answer
    for a driver without it (EINVAL)."""

    def _version(self) -> uapi.VersionData:
        """``get_version``: what VERSION writes."""
        ...

    def _open_session(self, arg: bytearray | memoryview) -> int:
        """``open_session`` (OPEN_SESSION)."""
        ...

    def _close_session(self, arg: bytearray | memoryview) -> int:
        """``close_session`` (CLOSE_SESSION)."""
        ...

    def _invoke_func(self, arg: bytearray | memoryview) -> int:
        """``invoke_func`` (INVOKE)."""
        ...

    def _cancel_req(self, arg: bytearray | memoryview) -> int:
        """``cancel_req`` (CANCEL)."""
        ...

    def _object_invoke(self, arg: bytearray | memoryview) -> int:
        """``object_invoke_func`` (OBJECT_INVOKE)."""
        ...

    def _supp_recv(self, arg: bytearray | memoryview, *, wait: bool = True) -> int:
        """``supp_recv`` (SUPPL_RECV; ``wait=False``: EAGAIN instead of blocking)."""
        ...

    def _supp_send(self, arg: bytearray | memoryview) -> int:
        """``supp_send`` (SUPPL_SEND)."""
        ...

    def _shm_alloc(self, arg: bytearray | memoryview) -> int:
        """SHM_ALLOC (the driver's pool)."""
        ...

    def _shm_register(self, arg: bytearray | memoryview) -> int:
        """SHM_REGISTER (``shm_register``)."""
        ...

    def _on_close(self) -> None:
        """What the close does at once (fail queued requests, wake blocked waiters)."""
        ...

    def _teardown(self) -> None:
        """``release``: once no call is in flight; idempotent."""
        ...


class TeeFile(Generic[_S]):
    """One open fd of a TEE device, as the core keeps it: its lifetime, its shms (the
    owner's reference of each, by id), and its ioctl switch over the driver's ops
    (:class:`TeeDriverOps`, which a subclass implements; an op it lacks is EINVAL).
    ``DRIVER`` names the driver in those errors."""

    DRIVER: ClassVar[str] = "tee"
    #: The fd's shms by id (a subclass sets it before calling ``__init__``).
    shms: dict[int, _S]

    def __init__(self) -> None:
        #: The fd's lifetime: calls in flight hold it; the teardown waits for the last.
        self.life = FileLife(self._on_close, self._teardown)

    @property
    def closed(self) -> bool:
        """The fd was closed (its teardown may still wait for calls in flight)."""
        return self.life.closed

    def ioctl(self, cmd: int, arg: bytearray | memoryview) -> int:
        """Run ``cmd`` on ``arg`` (the kernel's struct, updated in place); returns 0.
        Failures raise the driver's errno and write nothing back."""
        life = self.life
        life._calls.append(None)  # (FileLife.enter inline: the hot path)
        if life.closed:
            life.leave()
            raise DriverError(errno.EBADF, "context is closed")
        try:
            # The invoke and callback hot paths go straight to their ops (an int only:
            # a float equal to one of them is no command; _dispatch says EINVAL).
            if cmd.__class__ is int:
                if cmd == _OBJECT_INVOKE:
                    return self._object_invoke(arg)
                if cmd == _SUPPL_RECV:
                    return self._supp_recv(arg)
                if cmd == _SUPPL_SEND:
                    return self._supp_send(arg)
            return self._dispatch(cmd, arg)
        finally:
            life.leave()

    def recv_nowait(self, arg: bytearray | memoryview) -> int:
        """SUPPL_RECV that never blocks (the model's own): EAGAIN when no request is
        queued, else exactly what the ioctl does.  A server or a C bridge serves a
        thread's RECV with it without parking a thread in the driver."""
        life = self.life
        life.enter()
        try:
            return self._supp_recv(arg, wait=False)
        finally:
            life.leave()

    def _dispatch(self, cmd: int, arg: bytearray | memoryview) -> int:
        """The ioctl switch (``tee_ioctl``); a subclass may add ioctls in front (all but
        OBJECT_INVOKE, SUPPL_RECV and SUPPL_SEND, which :meth:`ioctl` hands to their ops
        at once)."""
        if type(cmd) is not int or not 0 <= cmd <= 0xFFFF_FFFF:  # (no lookup by it then)
            raise DriverError(errno.EINVAL, f"ioctl command {cmd!r} is not a u32")
        if cmd == _OBJECT_INVOKE:
            return self._object_invoke(arg)
        if cmd == uapi.TEE_IOC_SUPPL_RECV:
            return self._supp_recv(arg)
        if cmd == uapi.TEE_IOC_SUPPL_SEND:
            return self._supp_send(arg)
        if cmd == uapi.TEE_IOC_VERSION:
            _checks.need_arg(arg, uapi.VersionData.SIZE)
            self._version().pack_into(arg)
            return 0
        if cmd == uapi.TEE_IOC_SHM_ALLOC:
            return self._shm_alloc(arg)
        if cmd == uapi.TEE_IOC_SHM_REGISTER:
            return self._shm_register(arg)
        if cmd == uapi.TEE_IOC_OPEN_SESSION:
            return self._open_session(arg)
        if cmd == uapi.TEE_IOC_INVOKE:
            return self._invoke_func(arg)
        if cmd == uapi.TEE_IOC_CANCEL:
            return self._cancel_req(arg)
        if cmd == uapi.TEE_IOC_CLOSE_SESSION:
            return self._close_session(arg)
        raise self._unsupported(cmd)

    _need = staticmethod(_checks.need_arg)

    def _unsupported(self, cmd: int) -> DriverError:
        name = uapi.IOCTL_NAMES.get(cmd, hex(cmd))
        return DriverError(errno.EINVAL, f"ioctl {name} is not supported by {self.DRIVER}")

    # The core's answer for an op the driver lacks (a NULL op): EINVAL.
    def _version(self) -> uapi.VersionData:
        raise self._unsupported(uapi.TEE_IOC_VERSION)

    def _open_session(self, arg: bytearray | memoryview) -> int:
        raise self._unsupported(uapi.TEE_IOC_OPEN_SESSION)

    def _close_session(self, arg: bytearray | memoryview) -> int:
        raise self._unsupported(uapi.TEE_IOC_CLOSE_SESSION)

    def _invoke_func(self, arg: bytearray | memoryview) -> int:
        raise self._unsupported(uapi.TEE_IOC_INVOKE)

    def _cancel_req(self, arg: bytearray | memoryview) -> int:
        raise self._unsupported(uapi.TEE_IOC_CANCEL)

    def _object_invoke(self, arg: bytearray | memoryview) -> int:
        raise self._unsupported(uapi.TEE_IOC_OBJECT_INVOKE)

    def _supp_recv(self, arg: bytearray | memoryview, *, wait: bool = True) -> int:
        raise self._unsupported(uapi.TEE_IOC_SUPPL_RECV)

    def _supp_send(self, arg: bytearray | memoryview) -> int:
        raise self._unsupported(uapi.TEE_IOC_SUPPL_SEND)

    def _shm_alloc(self, arg: bytearray | memoryview) -> int:
        raise self._unsupported(uapi.TEE_IOC_SHM_ALLOC)

    def _shm_register(self, arg: bytearray | memoryview) -> int:
        raise self._unsupported(uapi.TEE_IOC_SHM_REGISTER)

    # ------------------------------------------------------------------ shm fds
    def shm_view(self, shm_id: int) -> memoryview:
        """The bytes of a shm this fd allocated (what ``mmap`` of its fd gives)."""
        shm = self.shms.get(shm_id)
        if shm is None or not self._mappable(shm):
            raise DriverError(errno.EBADF, f"shm {shm_id} is not an allocated shm of this fd")
        return memoryview(shm.buf)

    def shm_free(self, shm_id: int) -> None:
        """Close the shm's fd: the owner's reference goes (EBADF for one not held)."""
        shm = self.shms.pop(shm_id, None)
        if shm is None:
            raise DriverError(errno.EBADF, f"shm {shm_id} is not owned by this context")
        self._drop_shm(shm)

    def _mappable(self, shm: _S) -> bool:
        """Whether the shm's fd maps its bytes (an allocated one; every one by default)."""
        return True

    def _drop_shm(self, shm: _S) -> None:
        """The owner's reference of ``shm`` goes (its fd closed, or the fd's release)."""

    # ------------------------------------------------------------------ close
    def close(self) -> None:
        """Close the fd: new calls fail EBADF; what must not wait (``_on_close``) runs
        now, the driver's release (``_teardown``) once the last call in flight has
        returned (at once if none)."""
        self.life.close()

    def abandon(self) -> None:
        """The kernel this fd lives in is gone (a destroyed VM): close it and tear it
        down now, without waiting for the calls still in it."""
        self.life.abandon()

    def _on_close(self) -> None:
        """What the close does at once (nothing unless the driver says)."""

    def _teardown(self) -> None:
        """The driver's release of the fd (nothing unless the driver says)."""
