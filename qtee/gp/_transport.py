"""What the GP TEE Client API talks to: a kernel-shaped transport (optee.md §1, §2).

libteec is a thin layer over eight ioctls of ``/dev/teeN``.  :class:`GpTransport` is
exactly those calls with the kernel's argument and result fields, nothing more: the
client API (:mod:`qtee.gp._client`) does all the GP logic -- param pre/post-processing,
temporary and shadow shared memory, errno mapping, cancellation bookkeeping -- and a
transport only moves kernel structs.  Two implementations are meant to exist:

* :class:`OpteeTransport`: the real ioctls of an :class:`~qtee._optee.core.OpteeContext`,
  argument blocks pinned in the device's address space, as libteec passes them;
* a transport through QTEE objects (written elsewhere against this Protocol).

Contract common to every method: an ioctl that fails raises
:class:`objects.DriverError` carrying the kernel's errno (libteec maps it: ENOMEM ->
OUT_OF_MEMORY, EINVAL -> BAD_PARAMETERS, anything else -> GENERIC, origin COMMS); a
call the TEE answered returns its ``ret``/``ret_origin`` instead of raising, whatever
``ret`` is.  A transport is used from many threads at once and must be safe for that.
"""

from __future__ import annotations

import errno
import threading
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from objects import DriverError, UsageError
from qtee import uapi
from qtee.addrspace import AddressSpace

if TYPE_CHECKING:
    from qtee._optee.core import OpteeContext

__all__ = ["GpTransport", "OpteeTransport"]


@runtime_checkable
class GpTransport(Protocol):
    """One open TEE device (one fd), as libteec uses it.  Every call is one ioctl.

    Ids and numbers are the kernel's: ``shm_id`` an ``s32``, ``session`` a ``u32``
    (never 0 for an open session), ``ret``/``origin`` the ``TEEC_Result`` and
    ``TEEC_ORIGIN_*`` u32s.  ``params`` are the kernel's ``struct tee_ioctl_param``
    (``{attr, a, b, c}``; a memref is ``a`` = offset, ``b`` = size, ``c`` = shm id or
    ``TEE_MEMREF_NULL``); libteec always sends four.  ``params_back`` are the same params
    as the kernel left them after the call (``params_to_user``: VALUE outputs ``a, b, c``,
    MEMREF outputs the size ``b``), in order and of the same length.

    After :meth:`close` every other call raises ``DriverError(EBADF)``, as calls on a
    closed fd do; the client API relies on that for use after ``TEEC_FinalizeContext``.
    """

    def version(self) -> tuple[int, int, int]:
        """``TEE_IOC_VERSION``: ``(impl_id, impl_caps, gen_caps)``."""
        ...

    def shm_alloc(self, size: int) -> tuple[int, memoryview]:
        """``TEE_IOC_SHM_ALLOC`` then ``mmap`` of its fd: ``(shm_id, the shm's bytes)``.

        The view stays valid until :meth:`shm_free`; ``size`` is used as given (libteec
        turns 0 into 8 before calling).
        """
        ...

    def shm_register(self, buf: bytearray) -> int:
        """``TEE_IOC_SHM_REGISTER`` of the whole of ``buf`` (its user pages): the shm id.

        The TEE reads and writes ``buf`` itself until :meth:`shm_free`; may raise
        DriverError (libteec then falls back to a shadow buffer).
        """
        ...

    def shm_free(self, shm_id: int) -> None:
        """Close the shm's fd (and unmap or unpin its memory)."""
        ...

    def open_session(
        self,
        uuid16: bytes,
        clnt_uuid16: bytes,
        login: int,
        cancel_id: int,
        params: list[uapi.Param],
    ) -> tuple[int, int, int, list[uapi.Param]]:
        """``TEE_IOC_OPEN_SESSION``: ``(session, ret, origin, params_back)``.

        ``uuid16`` is the TA's UUID in octet order (``uuid.UUID.bytes``), ``clnt_uuid16``
        the connection data (a gid for GROUP logins, else zeros), ``login`` the
        ``TEEC_LOGIN_*`` method.  ``session`` is meaningful only when ``ret`` is SUCCESS.
        """
        ...

    def invoke(
        self, session: int, func: int, cancel_id: int, params: list[uapi.Param]
    ) -> tuple[int, int, list[uapi.Param]]:
        """``TEE_IOC_INVOKE``: ``(ret, origin, params_back)``; a session this fd did not
        open (or has closed) is EINVAL."""
        ...

    def cancel(self, session: int, cancel_id: int) -> None:
        """``TEE_IOC_CANCEL`` ``{cancel_id, session}``; the outcome shows in the call."""
        ...

    def close_session(self, session: int) -> None:
        """``TEE_IOC_CLOSE_SESSION``; a session this fd does not have is EINVAL."""
        ...

    def close(self) -> None:
        """Close the fd: the kernel closes the sessions still open on it and frees its
        shms.  Idempotent."""
        ...


class OpteeTransport:
    """:class:`GpTransport` over an :class:`~qtee._optee.core.OpteeContext`, with real ioctls.

    Argument blocks (``tee_ioctl_buf_data`` payloads) and registered buffers live in
    ``memory``, the device's address space: each is pinned (``memory.pin``) for as long
    as the kernel may reach it -- an argument block for its ioctl, a registered buffer
    until its shm is freed -- and unpinned after.
    """

    def __init__(self, ctx: OpteeContext, memory: AddressSpace) -> None:
        self.ctx = ctx
        self.memory = memory
        self._lock = threading.Lock()
        self._pinned: dict[int, int] = {}  # shm id -> address of its registered buffer
        self._closed = False

    # ------------------------------------------------------------------ info
    def version(self) -> tuple[int, int, int]:
        """``TEE_IOC_VERSION``."""
        arg = bytearray(uapi.VersionData.SIZE)
        self.ctx.ioctl(uapi.TEE_IOC_VERSION, arg)
        data = uapi.VersionData.unpack(arg)
        return data.impl_id, data.impl_caps, data.gen_caps

    # ------------------------------------------------------------------ shared memory
    def shm_alloc(self, size: int) -> tuple[int, memoryview]:
        """``TEE_IOC_SHM_ALLOC`` + the mapping of the shm (``OpteeContext.shm_view``)."""
        try:
            arg = bytearray(uapi.ShmAllocData(size).pack())
        except UsageError as exc:  # does not fit the u64 size field
            raise DriverError(errno.ENOMEM, f"cannot allocate {size} bytes") from exc
        self.ctx.ioctl(uapi.TEE_IOC_SHM_ALLOC, arg)
        shm_id = uapi.ShmAllocData.unpack(arg).id
        try:
            view = self.ctx.shm_view(shm_id)
        except BaseException:
            self.ctx.shm_free(shm_id)
            raise
        return shm_id, view

    def shm_register(self, buf: bytearray) -> int:
        """Pin ``buf`` in the address space, then ``TEE_IOC_SHM_REGISTER`` it."""
        if not isinstance(buf, bytearray):
            raise TypeError(f"shm_register needs a bytearray, not {type(buf).__name__}")
        addr = self.memory.pin(buf)
        try:
            arg = bytearray(uapi.ShmRegisterData(addr, len(buf)).pack())
            self.ctx.ioctl(uapi.TEE_IOC_SHM_REGISTER, arg)
            shm_id = uapi.ShmRegisterData.unpack(arg).id
        except BaseException:
            self.memory.unpin(addr)
            raise
        with self._lock:
            self._pinned[shm_id] = addr
        return shm_id

    def shm_free(self, shm_id: int) -> None:
        """Close the shm's fd; a registered buffer is unpinned even if that fails."""
        with self._lock:
            addr = self._pinned.pop(shm_id, None)
        try:
            self.ctx.shm_free(shm_id)
        finally:
            if addr is not None:
                self.memory.unpin(addr)

    # ------------------------------------------------------------------ sessions
    def _call(self, cmd: int, head: bytes, params: list[uapi.Param]) -> bytearray:
        """One ``buf_data`` ioctl: the block is pinned for the call, returned as updated."""
        block = bytearray(head + b"".join(p.pack() for p in params))
        addr = self.memory.pin(block)
        try:
            self.ctx.ioctl(cmd, bytearray(uapi.BufData(addr, len(block)).pack()))
        finally:
            self.memory.unpin(addr)
        return block

    @staticmethod
    def _params_back(block: bytearray, offset: int, count: int) -> list[uapi.Param]:
        return [uapi.Param.unpack(block, offset + uapi.Param.SIZE * i) for i in range(count)]

    def open_session(
        self,
        uuid16: bytes,
        clnt_uuid16: bytes,
        login: int,
        cancel_id: int,
        params: list[uapi.Param],
    ) -> tuple[int, int, int, list[uapi.Param]]:
        """``TEE_IOC_OPEN_SESSION`` with a ``tee_ioctl_open_session_arg`` block."""
        head = uapi.OpenSessionArg(
            bytes(uuid16), bytes(clnt_uuid16), login, cancel_id, num_params=len(params)
        )
        block = self._call(uapi.TEE_IOC_OPEN_SESSION, head.pack(), params)
        out = uapi.OpenSessionArg.unpack(block)
        back = self._params_back(block, uapi.OpenSessionArg.SIZE, len(params))
        return out.session, out.ret, out.ret_origin, back

    def invoke(
        self, session: int, func: int, cancel_id: int, params: list[uapi.Param]
    ) -> tuple[int, int, list[uapi.Param]]:
        """``TEE_IOC_INVOKE`` with a ``tee_ioctl_invoke_arg`` block."""
        head = uapi.InvokeArg(func, session, cancel_id, num_params=len(params))
        block = self._call(uapi.TEE_IOC_INVOKE, head.pack(), params)
        out = uapi.InvokeArg.unpack(block)
        return out.ret, out.ret_origin, self._params_back(block, uapi.InvokeArg.SIZE, len(params))

    def cancel(self, session: int, cancel_id: int) -> None:
        """``TEE_IOC_CANCEL``."""
        arg = bytearray(uapi.CancelArg(cancel_id, session).pack())
        self.ctx.ioctl(uapi.TEE_IOC_CANCEL, arg)

    def close_session(self, session: int) -> None:
        """``TEE_IOC_CLOSE_SESSION``."""
        arg = bytearray(uapi.CloseSessionArg(session).pack())
        self.ctx.ioctl(uapi.TEE_IOC_CLOSE_SESSION, arg)

    # ------------------------------------------------------------------ close
    def close(self) -> None:
        """Close the context (its sessions and shms go) and unpin what is still pinned."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pinned, self._pinned = list(self._pinned.values()), {}
        try:
            self.ctx.close()
        finally:
            for addr in pinned:
                self.memory.unpin(addr)

    def __repr__(self) -> str:
        return f"<OpteeTransport pinned={len(self._pinned)} closed={self._closed}>"
