"""``TEEC_SharedMemory``: a context's allocated or registered buffers, as libteec keeps
them (the shadow buffer of a registration the device cannot take, the copies in and out
around each call that uses it)."""

from __future__ import annotations

import errno
import threading
from typing import TYPE_CHECKING, Final

from objects import DriverError, UsageError
from qtee.gp._defs import TeecMemFlag, TeecResult
from qtee.gp._params import SIZE_MAX, SharedMemory
from qtee.gp._teec_errors import _api, _bad, _is_int
from qtee.gp._transport import GpTransport

if TYPE_CHECKING:
    from qtee.gp._client import TeecContext

__all__ = ["TeecSharedMemory"]

#: The model refuses bigger buffers (OUT_OF_MEMORY) rather than exhaust the host.
_MAX_ALLOC: Final = 1 << 32

_IN: Final = TeecMemFlag.TEEC_MEM_INPUT
_OUT: Final = TeecMemFlag.TEEC_MEM_OUTPUT


def _register_pages(transport: GpTransport, size: int) -> tuple[int, memoryview]:
    """Fresh zeroed pages, registered (libteec's ``teec_paged_aligned_alloc`` + register)."""
    pages = bytearray(size)
    return transport.shm_register(pages), memoryview(pages)


def _shm_failure(exc: DriverError, reg_mem: bool) -> TeecResult:
    """libteec's answer when it cannot get a shm: a failed SHM_ALLOC is OUT_OF_MEMORY, a
    failed registration OUT_OF_MEMORY for ENOMEM and GENERIC otherwise."""
    if exc.code == errno.ENOMEM or not reg_mem:
        return TeecResult.TEEC_ERROR_OUT_OF_MEMORY
    return TeecResult.TEEC_ERROR_GENERIC


# ----------------------------------------------------------------------------- shared memory


class TeecSharedMemory:
    """``TEEC_SharedMemory``: a block of client memory the TEE can reach.

    Made by :meth:`allocate` (``TEEC_AllocateSharedMemory``) or :meth:`register`
    (``TEEC_RegisterSharedMemory``); :meth:`release` (``TEEC_ReleaseSharedMemory``) is
    idempotent.  ``buffer`` is the client's view of ``size`` bytes.  When the TEE cannot
    reach ``buffer`` directly (no ``TEE_GEN_CAP_REG_MEM``, or registration failed) libteec
    keeps a *shadow* shm, copied in before and out after each call that uses it (§1.1).
    """

    __slots__ = ("_buffer", "_lock", "alloced_size", "context", "flags", "id", "shadow", "size")

    def __init__(self, context: TeecContext, size: int, flags: int) -> None:
        """Use :meth:`allocate` or :meth:`register`."""
        self.context = context
        self.size = size
        self.flags = flags
        self.id = -1  # libteec's "released" marker
        self.alloced_size = 0
        self._buffer: memoryview | None = None
        #: The shadow's bytes, or None when the TEE shares ``buffer`` itself.
        self.shadow: memoryview | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ constructors
    @staticmethod
    def _check(flags: int, size: int) -> None:
        if not _is_int(flags) or not flags or flags & ~int(_IN | _OUT):
            raise _bad(f"shared memory flags must be a non-empty subset of INPUT|OUTPUT: {flags}")
        if not _is_int(size) or not 0 <= size <= SIZE_MAX:
            raise UsageError(f"shared memory size must be a size_t, not {size!r}")

    @classmethod
    def allocate(cls, context: TeecContext, size: int, flags: int) -> TeecSharedMemory:
        """``TEEC_AllocateSharedMemory``: ``size`` new bytes (8 internally when 0).

        With ``TEE_GEN_CAP_REG_MEM`` libteec allocates the pages and registers them,
        else it uses ``TEE_IOC_SHM_ALLOC`` and maps the shm.  Any failure is
        OUT_OF_MEMORY (origin API): xtest 5006 allocates SIZE_MAX.
        """
        cls._check(flags, size)
        shm = cls(context, size, flags)
        s = size or 8
        transport = context.transport
        if s > _MAX_ALLOC:
            raise _api(TeecResult.TEEC_ERROR_OUT_OF_MEMORY, f"cannot allocate {size} bytes")
        try:
            if context.reg_mem:
                shm.id, view = _register_pages(transport, s)
            else:
                shm.id, view = transport.shm_alloc(s)
        except (DriverError, MemoryError) as exc:
            raise _api(TeecResult.TEEC_ERROR_OUT_OF_MEMORY, str(exc)) from exc
        shm._buffer = view[:size]
        shm.alloced_size = s
        context._track_shm(shm)
        return shm

    @classmethod
    def register(
        cls,
        context: TeecContext,
        buffer: bytearray | memoryview | bytes,
        flags: int,
        size: int | None = None,
    ) -> TeecSharedMemory:
        """``TEEC_RegisterSharedMemory``: share ``size`` bytes of ``buffer`` (default all).

        With REG_MEM a ``bytearray`` is registered in place; anything the kernel cannot
        pin (a failed ``TEE_IOC_SHM_REGISTER``, read-only memory, a buffer shorter than
        the 8 bytes a size 0 registers) gets a shadow.  Without REG_MEM the shadow is a
        ``TEE_IOC_SHM_ALLOC`` shm.  Bad flags or a None buffer: BAD_PARAMETERS (origin API).
        """
        if buffer is None:
            raise _bad("TEEC_RegisterSharedMemory with a NULL buffer")
        view = memoryview(buffer).cast("B")
        if size is None:
            size = len(view)
        cls._check(flags, size)
        if size > len(view):
            raise _bad(f"size {size} is beyond the {len(view)}-byte buffer")
        if flags & _OUT and view.readonly:
            raise _bad("TEEC_MEM_OUTPUT shared memory over a read-only buffer")
        shm = cls(context, size, flags)
        s = size or 8
        transport = context.transport
        try:
            if not context.reg_mem:
                shm.id, shm.shadow = transport.shm_alloc(s)
            elif isinstance(buffer, bytearray) and len(buffer) >= s:
                try:
                    shm.id = transport.shm_register(buffer)
                except DriverError:  # libteec: fall back to a page-aligned shadow
                    shm.id, shm.shadow = _register_pages(transport, s)
            else:  # not pinnable in place (read-only, or short of the 8 bytes of size 0)
                shm.id, shm.shadow = _register_pages(transport, s)
        except DriverError as exc:
            raise _api(_shm_failure(exc, context.reg_mem), str(exc)) from exc
        except MemoryError as exc:
            raise _api(TeecResult.TEEC_ERROR_OUT_OF_MEMORY, "no memory for a shadow") from exc
        shm._buffer = view[:size]
        shm.alloced_size = s
        context._track_shm(shm)
        return shm

    # ------------------------------------------------------------------ use
    @property
    def buffer(self) -> memoryview:
        """The client's ``size`` bytes (``TEEC_SharedMemory.buffer``)."""
        buf = self._buffer
        if buf is None:
            raise UsageError(f"{self!r} was released")
        return buf

    @property
    def released(self) -> bool:
        """Whether :meth:`release` ran (libteec's ``id == -1``)."""
        return self._buffer is None

    def _record(self) -> SharedMemory:
        """What :mod:`qtee.gp._params` needs to know of it."""
        if self._buffer is None:
            raise _bad(f"{self!r} was released")
        return SharedMemory(self.id, self.size, self.flags)

    def _copy_in(self, offset: int, length: int) -> None:
        """Before a call: client bytes -> shadow."""
        shadow, buf = self.shadow, self._buffer
        if shadow is not None and buf is not None and length:
            shadow[offset : offset + length] = buf[offset : offset + length]

    def _copy_out(self, offset: int, length: int) -> None:
        """After a call: shadow bytes -> client."""
        shadow, buf = self.shadow, self._buffer
        if shadow is not None and buf is not None and length:
            buf[offset : offset + length] = shadow[offset : offset + length]

    def release(self) -> None:
        """``TEEC_ReleaseSharedMemory``: free the shm; later calls do nothing."""
        with self._lock:
            if self._buffer is None:
                return
            shm_id, self.id = self.id, -1
            self._buffer = self.shadow = None
        self.context._forget_shm(self, shm_id)

    def _dropped(self) -> None:
        """The context was finalized: the kernel freed the shm with the fd."""
        with self._lock:
            self.id = -1
            self._buffer = self.shadow = None

    def __enter__(self) -> TeecSharedMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._buffer is None else f"id={self.id}"
        shadow = " shadow" if self.shadow is not None else ""
        return f"<TeecSharedMemory {state} size={self.size} flags={self.flags:#x}{shadow}>"
