"""The TA side of GP: :class:`GpTA`, the base class of TAs written in Python, with the
TEE internal API it may call inside its entry points (``TEE_Wait``, the cancellation
flag and mask, ``TEE_OpenTASession`` and :class:`TaSession`), and the process-wide
registration of GP TAs (preloaded, or loadable through LOAD_TA, and their model images).
"""

from __future__ import annotations

import uuid as uuidlib
from typing import TYPE_CHECKING, ClassVar, Final, TypeVar

from objects import UsageError
from qtee.gp._defs import TeecOrigin, TeecResult, _known
from qtee.secure._gp_params import GpParam, GpTaError, _is_u32
from qtee.secure._gp_session import _current_entry
from qtee.secure._registry import PROCESS_TAS, refuse_marker_call, uuid_bytes

if TYPE_CHECKING:
    from qtee.secure._gp import GpRuntime
    from qtee.secure._gp_session import GpSession, _Entry, _Instance
    from qtee.secure._signing import SigningKey

__all__ = [
    "TEE_TIMEOUT_INFINITE",
    "GpTA",
    "TaSession",
    "gp_ta_image",
    "lookup_gp_ta",
    "lookup_loadable_ta",
    "register_gp_ta",
    "register_loadable_ta",
    "unregister_gp_ta",
    "unregister_loadable_ta",
]

#: ``TEE_Wait(TEE_TIMEOUT_INFINITE)`` waits until cancelled.
TEE_TIMEOUT_INFINITE: Final = 0xFFFF_FFFF


class GpTA:
    """Base class of GP TAs written in Python (``TA_*EntryPoint`` as methods).

    One object is one instance; it is built (no arguments) right before :meth:`create`.
    The helpers (:meth:`wait`, the cancellation calls, :meth:`open_ta_session`) are the
    TEE internal API and work only inside one of this instance's entry points.
    """

    UUID: ClassVar[uuidlib.UUID]
    FLAGS: ClassVar[int] = 0

    def __new__(cls, *args: object, **kwargs: object) -> GpTA:
        refuse_marker_call(cls, args, kwargs)
        return super().__new__(cls)

    def create(self) -> None:
        """``TA_CreateEntryPoint``: once per instance, before its first open."""

    def open_session(self, session: GpSession, types: int, params: list[GpParam]) -> None:
        """``TA_OpenSessionEntryPoint``; raise :class:`GpTaError` to refuse the session."""

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
        """``TA_InvokeCommandEntryPoint``."""
        raise GpTaError(TeecResult.TEEC_ERROR_NOT_SUPPORTED)

    def close_session(self, session: GpSession) -> None:
        """``TA_CloseSessionEntryPoint`` (a GpTaError raised here is ignored)."""

    def destroy(self) -> None:
        """``TA_DestroyEntryPoint``: after the last session closes (not if keep-alive)."""

    # ------------------------------------------------------------ TEE internal API
    def _entry(self) -> _Entry:
        entry = _current_entry()
        if entry is None or entry.instance.ta is not self:
            raise UsageError("TEE internal API calls work only inside this TA's entry points")
        return entry

    def wait(self, ms: int) -> int:
        """``TEE_Wait``: SUCCESS after ``ms``, or TEE_ERROR_CANCEL as soon as the session
        is cancelled while cancellation is unmasked (``TEE_TIMEOUT_INFINITE``: no limit)."""
        entry = self._entry()
        return entry.runtime._wait(entry.session, ms)

    def cancellation_requested(self) -> bool:
        """``TEE_GetCancellationFlag``: the flag, always False while masked."""
        entry = self._entry()
        return entry.runtime._cancelled(entry.session)

    def unmask_cancellation(self) -> bool:
        """``TEE_UnmaskCancellation``: True if cancellation was masked."""
        entry = self._entry()
        return entry.runtime._set_mask(entry.session, False)

    def mask_cancellation(self) -> bool:
        """``TEE_MaskCancellation``: True if cancellation was masked."""
        entry = self._entry()
        return entry.runtime._set_mask(entry.session, True)

    def open_ta_session(
        self,
        uuid: uuidlib.UUID | bytes,
        types: int,
        params: list[GpParam],
        *,
        timeout: int = TEE_TIMEOUT_INFINITE,
    ) -> tuple[TaSession | None, int, int]:
        """``TEE_OpenTASession``: login TRUSTED_APP, client identity = this TA's UUID.

        ``timeout`` is the cancellationRequestTimeout in milliseconds (a u32): once it
        expires the target's open entry reads as cancelled (see :meth:`TaSession.invoke`).
        Returns ``(session or None, TEE_Result, origin)`` (``TeecResult``/``TeecOrigin``
        members for known values, as a TEEC client sees them); the session belongs to
        this instance (closed with it if the TA forgets) and is unusable from the normal
        world.
        """
        entry = self._entry()
        _check_timeout(timeout)
        raw = uuid.bytes if isinstance(uuid, uuidlib.UUID) else uuid
        sess, code, origin = entry.runtime._open_from_ta(
            entry.instance, raw, types, params, timeout
        )
        return sess, _known(TeecResult, code), _known(TeecOrigin, origin)


class TaSession:
    """A TA's handle on a session it opened (``TEE_TASessionHandle``)."""

    __slots__ = ("_owner", "_runtime", "id")

    def __init__(self, runtime: GpRuntime, ident: int, owner: _Instance) -> None:
        self._runtime = runtime
        self._owner = owner
        self.id = ident

    def invoke(
        self, cmd: int, types: int, params: list[GpParam], *, timeout: int = TEE_TIMEOUT_INFINITE
    ) -> tuple[int, int]:
        """``TEE_InvokeTACommand``: ``(TEE_Result, origin)`` (as :meth:`GpTA.open_ta_session`
        gives them); a panic of the target gives TARGET_DEAD (origin TEE) and leaves the
        caller running.

        ``timeout`` is the cancellationRequestTimeout in milliseconds (a u32,
        ``TEE_TIMEOUT_INFINITE`` by default).  When it expires the call is not cut short:
        the target's session reads as cancelled from then on (its ``TEE_Wait`` returns
        TEE_ERROR_CANCEL, its cancellation flag reads set) but only while it has
        cancellation unmasked, and the caller gets whatever the target then returns."""
        _check_timeout(timeout)
        code, origin = self._runtime._invoke(
            self.id, cmd, types, params, self._owner, from_ta=True, timeout=timeout
        )
        return _known(TeecResult, code), _known(TeecOrigin, origin)

    def close(self) -> None:
        """``TEE_CloseTASession``."""
        self._runtime._close_checked(self.id, self._owner, from_ta=True)

    def __repr__(self) -> str:
        return f"<TaSession {self.id}>"


# The process-wide layer's table of GP TAs, under the name older code reads.
_REGISTRY = PROCESS_TAS._gp
_uuid_bytes = uuid_bytes

_T = TypeVar("_T", bound=type[GpTA])


def register_gp_ta(cls: _T) -> _T:
    """Make ``cls`` the TA for ``cls.UUID`` in every world (process-wide; usable as a
    class decorator).  One world's own: ``world.tas.register_gp(cls)``."""
    return PROCESS_TAS.register_gp(cls)


def unregister_gp_ta(uuid: uuidlib.UUID | bytes) -> None:
    """Forget the TA registered process-wide for ``uuid`` (running instances are not
    affected)."""
    key = uuid_bytes(uuid)
    if lookup_gp_ta(key) is None:
        raise UsageError(f"no GP TA is registered for {uuid!r}")
    PROCESS_TAS.unregister_gp(key)


def lookup_gp_ta(uuid: uuidlib.UUID | bytes) -> type[GpTA] | None:
    """The TA class registered process-wide for ``uuid``, or None."""
    return PROCESS_TAS.lookup_gp(uuid, inherit=False)


def register_loadable_ta(cls: _T) -> _T:
    """Make ``cls`` the code of images named ``str(cls.UUID)`` (:func:`gp_ta_image`), in
    every world: found only through tee-supplicant's LOAD_TA (usable as a class
    decorator).  One world's own: ``world.tas.register_gp(cls, loadable=True)``."""
    return PROCESS_TAS.register_gp(cls, loadable=True)


def unregister_loadable_ta(uuid: uuidlib.UUID | bytes) -> None:
    """Forget the loadable TA registered process-wide for ``uuid``."""
    key = uuid_bytes(uuid)
    if lookup_loadable_ta(key) is None:
        raise UsageError(f"no loadable GP TA for {uuidlib.UUID(bytes=key)}")
    PROCESS_TAS.unregister_gp(key, loadable=True)


def lookup_loadable_ta(uuid: uuidlib.UUID | bytes) -> type[GpTA] | None:
    """The loadable TA registered process-wide for ``uuid``, or None."""
    return PROCESS_TAS.lookup_loadable(uuid, inherit=False)


def gp_ta_image(
    uuid: uuidlib.UUID,
    payload: bytes = b"",
    *,
    key: SigningKey | None = None,
    algo: int | None = None,
) -> bytes:
    """The image (``<uuid>.ta`` file contents) of the loadable GP TA ``uuid``: OP-TEE's
    signed layout (``struct shdr``, :mod:`qtee.secure._signing`) signed with ``key`` (an
    RSA private key; default: the process's default model key, which every world trusts
    unless given another ``ta_key``), ``algo`` TEE_ALG_RSASSA_PKCS1_V1_5_SHA256 (default)
    or TEE_ALG_RSASSA_PKCS1_PSS_MGF1_SHA256."""
    from qtee.secure._signing import default_model_key, optee_model_image

    if not isinstance(uuid, uuidlib.UUID):
        raise UsageError(f"a TA UUID is a uuid.UUID, not {uuid!r}")
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise UsageError(f"a TA payload is bytes, not {type(payload).__name__}")
    return optee_model_image(uuid, payload, default_model_key() if key is None else key, algo)


def _check_timeout(timeout: object) -> None:
    """A cancellationRequestTimeout is a u32 of milliseconds."""
    if not _is_u32(timeout):
        raise UsageError(
            f"a cancellation timeout is a u32 of milliseconds (or TEE_TIMEOUT_INFINITE), "
            f"not {timeout!r}"
        )
