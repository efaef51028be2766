"""The secure side of GP sessions: OP-TEE's TA manager, for TAs written in Python.

A GP TA is a :class:`GpTA` subclass with a ``UUID`` and ``TA_FLAG_*`` bits in ``FLAGS``,
registered with :func:`register_gp_ta` (process-wide) or ``world.tas.register_gp`` (one
world's, looked up first: :mod:`qtee.secure._registry`), or handed over by
:attr:`GpRuntime.load_ta`, the LOAD_TA path (:func:`register_loadable_ta` TAs).
:class:`GpRuntime` is ``tee_ta_manager.c`` for one secure world (optee.md §4):

* A **session** is a :class:`GpSession` in the world's object table: its id is a QTEE
  object id (``world.export``), and closing it drops that id.  It may be used only by the
  ``owner`` that opened it (the driver's per-context list), and never from the normal
  world when a TA opened it (login ``TEE_LOGIN_TRUSTED_APP``).
* An **instance** (OP-TEE's ``tee_ta_ctx``) is a refcounted object shared by its
  sessions, plus one reference while a single-instance keep-alive TA is kept.  Only
  single-instance TAs are found again by UUID; every other open makes a new instance.
* **Entries** (create + open, invoke, close + destroy) of one instance run one at a time
  unless ``TA_FLAG_CONCURRENT``; invokes on one session are exclusive.  A wait that
  would close a cycle of waiting threads fails with ``TEE_ERROR_BUSY`` instead
  ("deadlock avoided", §4.2 step 4).
* A TA returns an error by raising :class:`GpTaError`; :func:`panic` (``TEE_Panic``) or
  anything else it raises is a **panic**: that call and every later one on the instance
  give ``TARGET_DEAD`` (origin TEE), and the instance leaves the UUID lookup at once
  (§4.4).
* Every failure is noted on the calling thread, model-only (:mod:`qtee.secure._gp_why`):
  the client's :class:`~qtee.gp.TeecError` says why in its ``detail``.

``create``/``destroy`` follow libutee (``user_ta_entry.c``): create runs in the first
open entry of an instance, at most once until destroy (its flag is set before it runs,
so a kept instance whose create failed is not created again); destroy runs in the entry
that removes the TA's last session (a close, or a refused open), unless the TA is
single-instance keep-alive, and never in a panicked TA.

Where the model differs from OP-TEE: session ids are the world's lowest free object ids
(not OP-TEE's cyclic counter); a wait for a busy TA or session fails with BUSY only when
it would really deadlock (a cycle of waiting threads) rather than by OP-TEE's global
single-instance-lock rule; ``TA_FLAG_CONCURRENT`` lifts the serialisation of invokes
only (open and close entries still take the instance); :meth:`GpRuntime.unload` exists.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Final, NoReturn, TypeVar

from objects import DriverError, Refcounted, UsageError
from qtee.gp._defs import TaFlag, TeecLogin, TeecOrigin, TeecResult, _known
from qtee.secure import _gp_why
from qtee.secure._gp_state import (
    INSTANCE_STATES,
    SESSION_STATES,
    InstEvent,
    InstState,
    SessEvent,
    SessState,
)
from qtee.secure._registry import PROCESS_TAS, refuse_marker_call, uuid_bytes
from qtee.secure._world import SecureObject, SecureWorld

if TYPE_CHECKING:
    from qtee.secure._signing import SigningKey

__all__ = [
    "TEE_NUM_PARAMS",
    "TEE_TIMEOUT_INFINITE",
    "GpParam",
    "GpRuntime",
    "GpSession",
    "GpTA",
    "GpTaError",
    "TaPanic",
    "TaSession",
    "TeeParamType",
    "gp_params",
    "gp_ta_image",
    "lookup_gp_ta",
    "lookup_loadable_ta",
    "panic",
    "register_gp_ta",
    "register_loadable_ta",
    "tee_param_types",
    "unregister_gp_ta",
    "unregister_loadable_ta",
]

log = logging.getLogger("qtee.gp")

TEE_NUM_PARAMS: Final = 4
#: ``TEE_Wait(TEE_TIMEOUT_INFINITE)`` waits until cancelled.
TEE_TIMEOUT_INFINITE: Final = 0xFFFF_FFFF
_U32: Final = 0xFFFF_FFFF

_OK: Final = int(TeecResult.TEEC_SUCCESS)
_BAD_PARAMETERS: Final = int(TeecResult.TEEC_ERROR_BAD_PARAMETERS)
_NOT_FOUND: Final = int(TeecResult.TEEC_ERROR_ITEM_NOT_FOUND)
_BUSY: Final = int(TeecResult.TEEC_ERROR_BUSY)
_DEAD: Final = int(TeecResult.TEEC_ERROR_TARGET_DEAD)
_CANCEL: Final = int(TeecResult.TEEC_ERROR_CANCEL)
_COMMUNICATION: Final = int(TeecResult.TEEC_ERROR_COMMUNICATION)
_GENERIC: Final = int(TeecResult.TEEC_ERROR_GENERIC)
_SECURITY: Final = int(TeecResult.TEEC_ERROR_SECURITY)
_OVERFLOW: Final = int(TeecResult.TEE_ERROR_OVERFLOW)
_COMMS: Final = int(TeecOrigin.TEEC_ORIGIN_COMMS)
_TEE: Final = int(TeecOrigin.TEEC_ORIGIN_TEE)
_TA: Final = int(TeecOrigin.TEEC_ORIGIN_TRUSTED_APP)
_TRUSTED_APP: Final = int(TeecLogin.TEE_LOGIN_TRUSTED_APP)

_SINGLE: Final = TaFlag.TA_FLAG_SINGLE_INSTANCE
_MULTI: Final = TaFlag.TA_FLAG_MULTI_SESSION
_KEEP_ALIVE: Final = TaFlag.TA_FLAG_INSTANCE_KEEP_ALIVE
_KEEP_CRASHED: Final = TaFlag.TA_FLAG_INSTANCE_KEEP_CRASHED
_CONCURRENT: Final = TaFlag.TA_FLAG_CONCURRENT


# ----------------------------------------------------------------------------- params


class TeeParamType(enum.IntEnum):
    """``TEE_PARAM_TYPE_*``: what a TA sees, one nibble per param in ``types``."""

    TEE_PARAM_TYPE_NONE = 0
    TEE_PARAM_TYPE_VALUE_INPUT = 1
    TEE_PARAM_TYPE_VALUE_OUTPUT = 2
    TEE_PARAM_TYPE_VALUE_INOUT = 3
    TEE_PARAM_TYPE_MEMREF_INPUT = 5
    TEE_PARAM_TYPE_MEMREF_OUTPUT = 6
    TEE_PARAM_TYPE_MEMREF_INOUT = 7


_VALUES: Final = frozenset({1, 2, 3})
_MEMREFS: Final = frozenset({5, 6, 7})
_OUT_VALUES: Final = frozenset({2, 3})
_OUT_MEMREFS: Final = frozenset({6, 7})


def tee_param_types(p0: int = 0, p1: int = 0, p2: int = 0, p3: int = 0) -> int:
    """``TEE_PARAM_TYPES(p0, p1, p2, p3)``; a nibble that is no TEE type raises ValueError."""
    word = 0
    for i, t in enumerate((p0, p1, p2, p3)):
        word |= TeeParamType(t) << (4 * i)
    return word


@dataclass(slots=True, eq=False)
class GpParam:
    """One of a TA's four params (``TEE_Param`` plus its type), mutable by the TA.

    Values: ``a``, ``b`` (u32).  Memrefs: ``buffer`` is the shared bytes (writable for
    OUTPUT/INOUT, ``None`` for a NULL memref) and ``size`` its size, which the TA may
    set (the required size, with ``TEE_ERROR_SHORT_BUFFER``).
    """

    type: int = 0
    a: int = 0
    b: int = 0
    buffer: memoryview | None = None
    size: int = 0


def _is_u32(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _U32


def gp_params(types: int, params: Sequence[GpParam]) -> list[GpParam]:
    """Check a call's params and build the four the TA sees (``copy_in_params``).

    ``types`` must hold TEE types only, agree with each ``params[i].type`` and name NONE
    for every missing param; at most four params; values are u32; a memref's ``size``
    fits its buffer and an output buffer is writable.  Anything else raises
    ``GpTaError(TEE_ERROR_BAD_PARAMETERS)``.  The TA gets copies: values and sizes reach
    the caller only through :func:`_copy_out`, buffers are shared (INPUT read-only).
    """
    if not _is_u32(types) or types >> (4 * TEE_NUM_PARAMS) or len(params) > TEE_NUM_PARAMS:
        raise GpTaError(_BAD_PARAMETERS, f"param types {types!r} with {len(params)} params")
    out: list[GpParam] = []
    for i in range(TEE_NUM_PARAMS):
        t = (types >> (4 * i)) & 0xF
        p = params[i] if i < len(params) else None
        if p is None:
            if t:
                raise GpTaError(_BAD_PARAMETERS, f"param {i}: type {t} but no param")
            out.append(GpParam())
            continue
        if not isinstance(p, GpParam) or p.type != t:
            raise GpTaError(_BAD_PARAMETERS, f"param {i}: param types say {t}, the param is {p!r}")
        if t == 0:
            out.append(GpParam())
        elif t in _VALUES:
            if not (_is_u32(p.a) and _is_u32(p.b)):
                raise GpTaError(_BAD_PARAMETERS, f"param {i}: a value is two u32s")
            out.append(GpParam(t, p.a, p.b))
        elif t in _MEMREFS:
            out.append(GpParam(t, buffer=_ta_view(t, p), size=p.size))
        else:
            raise GpTaError(_BAD_PARAMETERS, f"param {i}: {t} is no TEE param type")
    return out


def _ta_view(t: int, p: GpParam) -> memoryview | None:
    if not isinstance(p.size, int) or isinstance(p.size, bool) or p.size < 0:
        raise GpTaError(_BAD_PARAMETERS, f"a memref size of {p.size!r}")
    if p.buffer is None:
        return None  # a NULL memref: any size (the short-buffer size query)
    try:
        view = memoryview(p.buffer)
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
    except (TypeError, ValueError):
        raise GpTaError(_BAD_PARAMETERS, "a memref buffer is no buffer of bytes") from None
    if p.size > len(view):
        raise GpTaError(_BAD_PARAMETERS, f"a memref of {p.size} bytes over {len(view)} bytes")
    if t in _OUT_MEMREFS and view.readonly:
        raise GpTaError(_BAD_PARAMETERS, "an output memref over read-only bytes")
    view = view[: p.size]
    return view if t in _OUT_MEMREFS else view.toreadonly()


def _copy_out(params: Sequence[GpParam], ta: Sequence[object]) -> None:
    """``copy_out_param``: output values and output memref sizes, whatever the result."""
    for p, q in zip(params, ta, strict=False):
        if not isinstance(q, GpParam):
            continue
        if p.type in _OUT_VALUES:
            if isinstance(q.a, int):
                p.a = q.a & _U32
            if isinstance(q.b, int):
                p.b = q.b & _U32
        elif p.type in _OUT_MEMREFS and isinstance(q.size, int) and q.size >= 0:
            p.size = q.size


# ----------------------------------------------------------------------------- TA side


class GpTaError(Exception):
    """Raised by a TA entry point to return ``code`` (a ``TEE_Result``), origin TA.

    ``detail`` (model-only) says why; the client sees it in the
    :class:`~qtee.gp.TeecError`'s ``detail``."""

    code: int
    detail: str

    def __init__(self, code: int, detail: str = "") -> None:
        if not _is_u32(code):
            raise ValueError(f"a TEE_Result is a u32, not {code!r}")
        self.code = int(code)
        self.detail = str(detail)
        super().__init__(f"0x{code:08X}: {detail}" if detail else f"0x{code:08X}")


class TaPanic(BaseException):
    """``TEE_Panic(code)`` on its way out of a TA entry (see :func:`panic`).

    A ``BaseException``, so that a TA's own ``except Exception`` cannot swallow it:
    ``TEE_Panic`` never returns.
    """

    code: int

    def __init__(self, code: int) -> None:
        self.code = code
        super().__init__(f"TEE_Panic(0x{code:08X})")


def panic(code: int = 0) -> NoReturn:
    """``TEE_Panic(code)``: end the calling TA for good, from inside one of its entry
    points.

    The entry's caller gets ``TEE_ERROR_TARGET_DEAD`` (origin TEE), and so does every
    later call on the instance; a single-instance TA leaves the UUID lookup (unless
    keep-crashed), so the next open makes a new instance.  No close or destroy entry
    runs in it again.  ``code`` (a u32) is only logged, as OP-TEE only prints it.
    Outside a TA entry: :class:`~objects.UsageError`.
    """
    if not _is_u32(code):
        raise UsageError(f"a panic code is a u32, not {code!r}")
    if _current_entry() is None:
        raise UsageError("panic() works only inside a GP TA's entry point")
    raise TaPanic(int(code))


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


# ----------------------------------------------------------------------------- registry

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


# ----------------------------------------------------------------------------- runtime state


class _Instance(Refcounted):
    """``tee_ta_ctx``: one TA object; a reference per session, plus one while kept."""

    __slots__ = (
        "cls",
        "flags",
        "holder",
        "kept",
        "outbound",
        "runtime",
        "sessions",
        "state",
        "ta",
        "ta_sessions",
        "uuid",
    )

    def __init__(self, runtime: GpRuntime, cls: type[GpTA], uuid: bytes) -> None:
        super().__init__()
        self.runtime = runtime
        self.cls = cls
        self.uuid = uuid
        self.flags = int(cls.FLAGS)
        self.ta: GpTA | None = None
        self.state = InstState.NEW  # INSTANCE_STATES: CREATED is libutee's init_done
        self.kept = False  # single-instance keep-alive: the lookup holds a reference
        self.sessions = 0  # core sessions bound to it (ref_count)
        self.ta_sessions = 0  # sessions the TA itself knows (libutee's list)
        self.holder: int | None = None  # thread running an entry (ctx->busy)
        self.outbound: set[int] = set()  # ids of sessions this TA opened

    def move(self, event: InstEvent) -> None:
        """Move through :data:`INSTANCE_STATES` (an illegal move raises, nothing changes)."""
        self.state = INSTANCE_STATES.move(self.state, event)

    @property
    def created(self) -> bool:
        """libutee's ``init_done``: its create entry has run (and no destroy since)."""
        return self.state is InstState.CREATED

    @property
    def panicked(self) -> bool:
        """``ctx->panicked``: an entry panicked; the instance is dead for good."""
        return self.state is InstState.PANICKED

    @property
    def single(self) -> bool:
        return bool(self.flags & _SINGLE)

    @property
    def keep_alive(self) -> bool:
        return bool(self.flags & _SINGLE and self.flags & _KEEP_ALIVE)

    @property
    def keep_crashed(self) -> bool:
        return self.keep_alive and bool(self.flags & _KEEP_CRASHED)

    def on_release(self) -> None:
        self.runtime._instance_gone(self)

    def __repr__(self) -> str:
        return f"<GP instance {self.cls.__name__} sessions={self.sessions} dead={self.panicked}>"


class GpSession(SecureObject):
    """One session (``tee_ta_session``), an object in the secure world's table.

    A TA sees ``id``, ``login``, ``client_uuid`` (16 bytes), ``uuid`` (the TA's, 16
    bytes), ``ta`` (its instance) and ``context``, a slot for its own per-session data.
    """

    def __init__(
        self, runtime: GpRuntime, uuid: bytes, login: int, client_uuid: bytes, owner: object
    ) -> None:
        super().__init__()
        self.id = 0
        self.uuid = uuid
        self.login = login
        self.client_uuid = client_uuid
        self.context: object = None
        self._runtime = runtime
        self._owner = owner
        self._instance: _Instance | None = None
        self._state = SessState.OPENING  # SESSION_STATES
        self._holder: int | None = None  # thread holding it exclusively (an invoke)
        self._depth = 0
        self._cancel = False  # sess->cancel
        self._mask = True  # sess->cancel_mask
        self._cancel_at: float | None = None  # sess->cancel_time (monotonic; None: never)
        self.cancel_id = 0

    @property
    def ta(self) -> GpTA | None:
        """The TA instance behind the session (None once its instance is gone)."""
        inst = self._instance
        return None if inst is None else inst.ta

    def _move(self, event: SessEvent) -> None:
        """Move through :data:`SESSION_STATES` (an illegal move raises, nothing changes)."""
        self._state = SESSION_STATES.move(self._state, event)

    def on_release(self) -> None:
        # The id went away without close_session (the kernel released it on the QTEE
        # wire): close the GP session too.
        self._runtime._close(self, drop_id=False)

    def __repr__(self) -> str:
        return f"<GpSession {self.id} {self._state.value}>"


@dataclass(frozen=True, slots=True)
class _Entry:
    runtime: GpRuntime
    instance: _Instance
    session: GpSession | None


_tls = threading.local()


def _entry_stack() -> list[_Entry]:
    stack: list[_Entry] | None = getattr(_tls, "stack", None)
    if stack is None:
        stack = _tls.stack = []
    return stack


def _current_entry() -> _Entry | None:
    stack = _entry_stack()
    return stack[-1] if stack else None


class _Deadlock(Exception):
    """Waiting would close a cycle of waiting threads."""


# ----------------------------------------------------------------------------- runtime


def _entry_text(inst: _Instance, where: int | tuple[int, int] | None, what: str) -> str:
    """A failed entry for people: ``TA Acc, command 1 (param types ...): what``."""
    if isinstance(where, tuple):
        entry = f", command {where[0]} (param types {_gp_why.types_text(where[1])})"
    elif where is not None:
        entry = f", OpenSession (param types {_gp_why.types_text(where)})"
    else:
        entry = ""
    return f"TA {inst.cls.__name__}{entry}: {what}"


class GpRuntime:
    """OP-TEE's TA manager over one secure world (optee.md §2 cancel, §3, §4)."""

    def __init__(self, world: SecureWorld) -> None:
        if not isinstance(world, SecureWorld):
            raise TypeError("a GpRuntime runs in a SecureWorld")
        self.world = world
        #: The LOAD_TA path: called (outside any lock, may block) with the UUID of a TA
        #: that is not registered, each time a new instance of it is needed.
        self.load_ta: Callable[[bytes], type[GpTA] | None] | None = None
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._by_uuid: dict[bytes, _Instance] = {}  # single-instance TAs only
        self._instances: set[_Instance] = set()
        self._sessions: set[GpSession] = set()
        self._waiting: dict[int, _Instance | GpSession] = {}  # thread -> what it waits for
        self._closed = False  # shut down: no entry runs any more
        #: GP TAs QTEE's IAppLoader loaded from an image, by UUID (:meth:`load_app`).
        self._app_loaded: dict[bytes, type[GpTA]] = {}

    @property
    def ta_key(self) -> SigningKey:
        """The key this device trusts for model TA images: its world's
        (:attr:`SecureWorld.ta_key`); assigning one replaces the world's."""
        return self.world.ta_key

    @ta_key.setter
    def ta_key(self, key: SigningKey) -> None:
        self.world.ta_key = key

    # ------------------------------------------------------------------ NS entry points
    def open_session(
        self,
        uuid: bytes | uuidlib.UUID,
        login: int,
        client_uuid: bytes | uuidlib.UUID,
        types: int,
        params: list[GpParam],
        *,
        cancel_id: int = 0,
        owner: object = None,
        timeout: int = TEE_TIMEOUT_INFINITE,
    ) -> tuple[int, int, int]:
        """``OPTEE_MSG_CMD_OPEN_SESSION``: ``(session id or 0, TEE_Result, origin)``.

        UUIDs are 16 bytes (``uuid.UUID.bytes`` order) or ``uuid.UUID``s.  ``timeout``:
        the cancellationRequestTimeout in ms (OP-TEE's normal-world entry always passes
        ``TEE_TIMEOUT_INFINITE``; QTEE's ``openSessionV2`` carries one)."""
        _check_timeout(timeout)
        if self._closed:
            return 0, *self._shut()
        if isinstance(uuid, uuidlib.UUID):
            uuid = uuid.bytes
        if isinstance(client_uuid, uuidlib.UUID):
            client_uuid = client_uuid.bytes
        if (
            not _is_16(uuid)
            or not _is_16(client_uuid)
            or not _is_u32(login)
            or login == _TRUSTED_APP  # the normal world cannot claim to be a TA
        ):
            return 0, _BAD_PARAMETERS, _TEE
        return self._open(
            bytes(uuid), login, bytes(client_uuid), types, params, owner, cancel_id, timeout
        )

    def invoke(
        self,
        session_id: int,
        cmd: int,
        types: int,
        params: list[GpParam],
        *,
        cancel_id: int = 0,
        owner: object = None,
        timeout: int = TEE_TIMEOUT_INFINITE,
    ) -> tuple[int, int]:
        """``OPTEE_MSG_CMD_INVOKE_COMMAND``: ``(TEE_Result, origin)``.  ``timeout``: the
        cancellationRequestTimeout in ms, as for :meth:`open_session`."""
        _check_timeout(timeout)
        return self._invoke(session_id, cmd, types, params, owner, from_ta=False, timeout=timeout)

    def cancel(self, session_id: int, cancel_id: int = 0, owner: object = None) -> int:
        """``OPTEE_MSG_CMD_CANCEL``: flag the session (``cancel_id`` is ignored, as
        OP-TEE's ``entry_cancel`` ignores it); unknown session -> BAD_PARAMETERS.

        The lookup is not exclusive: it reaches a session while an invoke runs on it,
        and while a close waits for that invoke."""
        with self._cond:
            if self._closed:
                return _COMMUNICATION
            sess = self._find(session_id)
            if (
                sess is None
                or sess._state is SessState.CLOSED
                or not self._may_use(sess, owner, from_ta=False)
            ):
                return _BAD_PARAMETERS
            sess._cancel = True
            self._cond.notify_all()
        return _OK

    def close_session(self, session_id: int, owner: object = None) -> int:
        """``OPTEE_MSG_CMD_CLOSE_SESSION``: the TA's close entry (not if it panicked),
        then the id is dropped.  Unknown id -> ITEM_NOT_FOUND; another owner's or a
        TA's session -> BAD_PARAMETERS."""
        return self._close_checked(session_id, owner, from_ta=False)

    def close_owner(self, owner: object) -> None:
        """A client context went away: close every session it opened."""
        with self._lock:
            mine = [
                s
                for s in self._sessions
                if s._state is SessState.OPEN and s.login != _TRUSTED_APP and _same(s._owner, owner)
            ]
        for sess in sorted(mine, key=lambda s: s.id):
            self._close(sess, drop_id=True)

    @property
    def closed(self) -> bool:
        """Whether :meth:`shutdown` ran."""
        return self._closed

    def shutdown(self) -> dict[str, int]:
        """The partition is going away (``VM_DESTROYED``, optee.md §6.1): drop everything.

        From now on no TA entry point runs: every session and instance is dropped at
        once without close or destroy entries (the sheet does not say OP-TEE runs them;
        the model runs none), kept instances too.  Threads inside a TA are not killed,
        but every wait ends: ``TEE_Wait`` returns ``TEE_ERROR_CANCEL`` and the
        cancellation flag reads set, whatever the mask; waits for a busy instance or
        session give up.  A call cut short this way, and every NS call made later,
        answers ``TEEC_ERROR_COMMUNICATION`` origin COMMS -- what a normal-world client
        is told when its call cannot complete (§2).  ``live()`` is empty on return even
        while such threads are still leaving TA code (they touch only what they hold).
        Idempotent; returns how many sessions and instances were dropped.
        """
        with self._cond:
            if self._closed:
                return {"sessions": 0, "instances": 0}
            self._closed = True
            sessions = sorted(self._sessions, key=lambda s: s.id)
            instances = list(self._instances)
            kept = [inst for inst in instances if inst.kept]
            for inst in kept:
                inst.kept = False
            self._by_uuid.clear()
            self._cond.notify_all()
        for sess in sessions:
            self._discard(sess)
        for inst in kept:
            inst.put()
        with self._lock:  # a TA-to-TA session of a dropped instance, say
            rest = list(self._sessions)
        for sess in rest:
            self._discard(sess)
        return {"sessions": len(sessions) + len(rest), "instances": len(instances)}

    def live(self) -> dict[str, int]:
        """Counts for leak checks: sessions (not yet closed) and TA instances."""
        with self._lock:
            return {"sessions": len(self._sessions), "instances": len(self._instances)}

    def unload(self, uuid: uuidlib.UUID | bytes) -> bool:
        """Let go of a kept (keep-alive or keep-crashed) instance of ``uuid``.

        OP-TEE has no such call (a kept instance lives until reboot); it is here so tests
        and tools can start over.  An instance that is alive and has no session gets its
        destroy entry.  Returns whether an instance was kept.
        """
        raw = _uuid_bytes(uuid)
        with self._lock:
            if self._closed:
                return False
            inst = self._by_uuid.get(raw)
            if inst is None or not inst.kept:
                return False
            del self._by_uuid[raw]
            inst.kept = False
            idle = inst.sessions == 0 and not inst.panicked and inst.created
        if idle:
            try:
                with self._busy(inst):
                    if not inst.panicked and inst.created and inst.ta_sessions == 0:
                        self._run(inst, None, self._destroy_entry, inst)
            except _Deadlock:
                log.warning("%r: unload from inside its own entry, destroy skipped", inst)
            except _Gone:  # shut down meanwhile
                pass
        inst.put()
        return True

    # ------------------------------------------------------------------ IAppLoader
    def load_app(self, cls: type[GpTA]) -> bool:
        """QTEE's IAppLoader loaded the image of the GP TA ``cls``: from now on a session
        to ``cls.UUID`` finds it, as one to a TA the device preloads does.  False (and
        nothing changes) when that UUID is loaded already: preloaded (registered with
        :func:`register_gp_ta`) or loaded before and not unloaded since."""
        raw = cls.UUID.bytes
        if self.world.tas.lookup_gp(raw) is not None:
            return False
        with self._lock:
            if raw in self._app_loaded:
                return False
            self._app_loaded[raw] = cls
        return True

    def unload_app(self, uuid: bytes, *, force: bool = False) -> bool:
        """Undo :meth:`load_app`: new sessions to ``uuid`` no longer find the TA.  False
        (nothing changes) while a session to it is open, unless ``force`` (the load's
        controller went away: open sessions keep their instance until they close).  A
        kept (keep-alive) instance is let go, as :meth:`unload` does."""
        with self._lock:
            if uuid not in self._app_loaded:
                return True
            busy = any(s.uuid == uuid and s._state is not SessState.CLOSED for s in self._sessions)
            if busy and not force:
                return False
            del self._app_loaded[uuid]
        self.unload(uuid)
        with self._lock:  # a single-instance TA's live instance takes no new session
            inst = self._by_uuid.get(uuid)
            if inst is not None and not inst.kept:
                del self._by_uuid[uuid]
        return True

    def app_loaded(self) -> list[uuidlib.UUID]:
        """The UUIDs of the GP TAs IAppLoader loaded (not the preloaded ones)."""
        with self._lock:
            return sorted(uuidlib.UUID(bytes=k) for k in self._app_loaded)

    # ------------------------------------------------------------------ open
    def _open(
        self,
        uuid: bytes,
        login: int,
        client_uuid: bytes,
        types: int,
        params: list[GpParam],
        owner: object,
        cancel_id: int = 0,
        timeout: int = TEE_TIMEOUT_INFINITE,
    ) -> tuple[int, int, int]:
        try:
            ta_params = gp_params(types, params)
        except GpTaError as exc:
            _gp_why.note(exc.code, f"OpenSession: {exc.detail}")
            return 0, exc.code, _TEE
        if self._closed:
            return 0, *self._shut()
        sess = GpSession(self, uuid, login, client_uuid, owner)
        sess.cancel_id = cancel_id
        try:
            sess.id = self.world.export(sess)  # §4.2 step 1
        except DriverError as exc:  # ENOSPC: the id space is full
            _gp_why.note(_OVERFLOW, f"no session id left: {exc}")
            return 0, _OVERFLOW, _TEE
        shut: bool
        with self._lock:
            shut = self.closed
            if not shut:
                self._sessions.add(sess)
        if shut:
            self._discard(sess)
            return 0, *self._shut()
        code, inst = self._attach(uuid)  # steps 2 and 3
        if inst is None:
            self._discard(sess)
            return (0, *self._shut()) if self.closed else (0, code, _TEE)
        with self._cond:
            shut = sess._state is SessState.CLOSED  # shutdown dropped it meanwhile
            if shut:
                inst.sessions -= 1
            else:
                sess._instance = inst
        if shut:
            inst.put()
            return 0, *self._shut()
        try:
            with self._busy(inst):  # step 4
                if inst.panicked:
                    code, origin = _DEAD, _TEE
                    _gp_why.note(_DEAD, f"TA {inst.cls.__name__} panicked meanwhile")
                else:  # step 5
                    code, origin = self._run(
                        inst,
                        sess,
                        self._open_entry,
                        inst,
                        sess,
                        types,
                        ta_params,
                        where=types,
                        timeout=timeout,
                    )
                    _copy_out(params, ta_params)
        except _Deadlock:
            code, origin = _BUSY, _TEE
            _gp_why.note(_BUSY, f"opening a session to TA {inst.cls.__name__} would deadlock")
        except _Gone:  # shut down while waiting for the instance
            code, origin = self._shut()
        with self._cond:
            shut = sess._state is SessState.CLOSED
            if code == _OK and not shut:
                sess._move(SessEvent.OPENED)
                return sess.id, _OK, _TA
        self._discard(sess)
        return (0, *self._shut()) if shut else (0, code, origin)

    def _attach(self, uuid: bytes) -> tuple[int, _Instance | None]:
        """Find or make the instance a new session binds to, with a reference taken."""
        with self._lock:
            bound = self._bind(uuid)
            if bound is not None:
                return bound
        cls = self.world.tas.lookup_gp(uuid)
        if cls is None:
            with self._lock:
                cls = self._app_loaded.get(uuid)
        if cls is None:
            code, cls = self._load(uuid)
            if cls is None:
                return code, None
        with self._lock:
            if cls.FLAGS & _SINGLE:  # another thread may have made it meanwhile
                bound = self._bind(uuid)
                if bound is not None:
                    return bound
            inst = _Instance(self, cls, uuid)  # its first reference is this session's
            inst.sessions = 1
            self._instances.add(inst)
            if inst.single:
                self._by_uuid[uuid] = inst
                if inst.keep_alive:
                    inst.kept = inst.get()
            return _OK, inst

    def _bind(self, uuid: bytes) -> tuple[int, _Instance | None] | None:
        """Under the lock: bind to the single-instance TA's instance, if there is one."""
        inst = self._by_uuid.get(uuid)
        if inst is None:
            return None
        if inst.panicked:  # only a keep-crashed one stays findable
            _gp_why.note(_DEAD, f"TA {inst.cls.__name__} panicked and is kept crashed")
            return _DEAD, None
        if not inst.flags & _MULTI and inst.sessions > 0:
            _gp_why.note(
                _BUSY,
                f"TA {inst.cls.__name__} is single-instance without TA_FLAG_MULTI_SESSION "
                "and has a session already",
            )
            return _BUSY, None
        if not inst.get():  # its last reference is being dropped: make a new one
            del self._by_uuid[uuid]
            return None
        inst.sessions += 1
        return _OK, inst

    def _load(self, uuid: bytes) -> tuple[int, type[GpTA] | None]:
        """The LOAD_TA path (§3.2): the hook names the TA class, or None if not found."""
        hook = self.load_ta
        tas = self.world.tas
        if hook is None:
            why = _gp_why.not_found(tas, uuid, "no tee-supplicant serves this GP runtime")
            _gp_why.note(_NOT_FOUND, why)
            return _NOT_FOUND, None
        try:
            cls = hook(uuid)
        except GpTaError as exc:  # e.g. COMMUNICATION when no supplicant answers
            _gp_why.note(exc.code, _gp_why.load_failed(tas, uuid, exc.code, exc.detail))
            return exc.code, None
        except Exception as exc:
            log.exception("load_ta hook failed for %s", uuid.hex())
            _gp_why.note(_GENERIC, f"LOAD_TA of {uuidlib.UUID(bytes=uuid)} raised {exc!r}")
            return _GENERIC, None
        if cls is None:
            load = "the image tee-supplicant sent names no TA the model has a class for"
            _gp_why.note(_NOT_FOUND, _gp_why.not_found(tas, uuid, load))
            return _NOT_FOUND, None
        if not (isinstance(cls, type) and issubclass(cls, GpTA)) or (
            getattr(cls, "UUID", None) != uuidlib.UUID(bytes=uuid)
        ):
            log.error("load_ta for %s returned %r, not a GpTA with that UUID", uuid.hex(), cls)
            why = f"LOAD_TA of {uuidlib.UUID(bytes=uuid)} gave {cls!r}, not a GpTA of that UUID"
            _gp_why.note(_SECURITY, why)
            return _SECURITY, None
        return _OK, cls

    def _open_entry(
        self, inst: _Instance, sess: GpSession, types: int, params: list[GpParam]
    ) -> None:
        if inst.state is InstState.NEW:
            inst.move(InstEvent.CREATE)  # libutee: set before create runs, even if it fails
            if inst.ta is None:
                inst.ta = inst.cls()
            inst.ta.create()
        ta = inst.ta
        assert ta is not None
        inst.ta_sessions += 1
        try:
            ta.open_session(sess, types, params)
        except GpTaError:
            self._remove_ta_session(inst)
            raise

    def _remove_ta_session(self, inst: _Instance) -> None:
        inst.ta_sessions -= 1
        if inst.ta_sessions == 0 and not inst.keep_alive:
            self._destroy_entry(inst)

    def _destroy_entry(self, inst: _Instance) -> None:
        inst.move(InstEvent.DESTROY)
        ta, inst.ta = inst.ta, None
        if ta is not None:
            with suppress(GpTaError):  # TA_DestroyEntryPoint returns nothing
                ta.destroy()

    def _open_from_ta(
        self, caller: _Instance, uuid: bytes, types: int, params: list[GpParam], timeout: int
    ) -> tuple[TaSession | None, int, int]:
        if not _is_16(uuid):
            return None, _BAD_PARAMETERS, _TEE
        sid, code, origin = self._open(
            uuid, _TRUSTED_APP, caller.uuid, types, params, caller, timeout=timeout
        )
        if not sid:
            return None, code, origin
        with self._lock:
            caller.outbound.add(sid)
        return TaSession(self, sid, caller), code, origin

    # ------------------------------------------------------------------ invoke
    def _invoke(
        self,
        session_id: int,
        cmd: int,
        types: int,
        params: list[GpParam],
        owner: object,
        *,
        from_ta: bool,
        timeout: int = TEE_TIMEOUT_INFINITE,
    ) -> tuple[int, int]:
        try:
            ta_params = gp_params(types, params)
        except GpTaError as exc:
            _gp_why.note(exc.code, f"InvokeCommand {cmd}: {exc.detail}")
            return exc.code, _TEE
        if not _is_u32(cmd):
            _gp_why.note(_BAD_PARAMETERS, f"command {cmd!r} is not a u32")
            return _BAD_PARAMETERS, _TEE
        with self._lock:
            if self._closed:
                return self._shut()
            sess = self._find(session_id)
            if sess is None or not self._may_use(sess, owner, from_ta=from_ta):
                _gp_why.note(_BAD_PARAMETERS, f"no open session {session_id:#x} of this caller")
                return _BAD_PARAMETERS, _TEE
        try:
            with self._exclusive(sess):
                inst = sess._instance
                if inst is None:  # shutdown dropped it under us
                    return self._shut()
                if inst.panicked:
                    _gp_why.note(_DEAD, f"TA {inst.cls.__name__} panicked earlier")
                    return _DEAD, _TEE
                concurrent = bool(inst.flags & _CONCURRENT)
                with self._busy(inst, skip=concurrent):
                    if _dead(inst):  # it panicked while this call waited
                        _gp_why.note(_DEAD, f"TA {inst.cls.__name__} panicked meanwhile")
                        return _DEAD, _TEE
                    ta = inst.ta
                    assert ta is not None
                    result = self._run(
                        inst,
                        sess,
                        ta.invoke,
                        sess,
                        cmd,
                        types,
                        ta_params,
                        where=(cmd, types),
                        timeout=timeout,
                    )
                    _copy_out(params, ta_params)
                    return self._shut() if self.closed else result
        except _Deadlock:
            _gp_why.note(_BUSY, f"invoking TA {sess.uuid.hex()} would deadlock")
            return _BUSY, _TEE
        except _Gone:
            if self.closed:
                return self._shut()
            _gp_why.note(_BAD_PARAMETERS, f"session {session_id:#x} was closed meanwhile")
            return _BAD_PARAMETERS, _TEE

    # ------------------------------------------------------------------ close
    def _close_checked(self, session_id: int, owner: object, *, from_ta: bool) -> int:
        with self._lock:
            if self._closed:
                return _COMMUNICATION
            sess = self._find(session_id)
            if sess is None or sess._state is not SessState.OPEN:
                return _NOT_FOUND
            if not self._may_use(sess, owner, from_ta=from_ta):
                return _BAD_PARAMETERS
        self._close(sess, drop_id=True)
        return _OK

    def _close(self, sess: GpSession, *, drop_id: bool) -> None:
        with self._cond:
            if sess._state is not SessState.OPEN:
                return
            sess._move(SessEvent.CLOSE)  # new invokes are refused from now on
            self._cond.notify_all()
        inst = sess._instance
        if inst is None or self._closed:  # shut down: no entry runs any more
            self._discard(sess, drop_id=drop_id)
            return
        try:
            with self._exclusive(sess, closing=True), self._busy(inst, skip=inst.panicked):
                if not inst.panicked and not self.closed:
                    ta = inst.ta
                    assert ta is not None
                    self._run(inst, sess, self._close_entry, inst, ta, sess)
        except _Deadlock:
            log.warning("%r: closing it would deadlock, its close entry is skipped", sess)
        except _Gone:  # shut down while waiting
            pass
        self._discard(sess, drop_id=drop_id)

    def _close_entry(self, inst: _Instance, ta: GpTA, sess: GpSession) -> None:
        with suppress(GpTaError):  # TA_CloseSessionEntryPoint returns nothing
            ta.close_session(sess)
        self._remove_ta_session(inst)

    def _discard(self, sess: GpSession, *, drop_id: bool = True) -> None:
        """Free a session that is not (or no longer) open: id, instance reference.
        Idempotent (shutdown and a racing close may both get here)."""
        with self._cond:
            if sess._state is SessState.CLOSED:
                return
            sess._move(SessEvent.DISCARD)
            self._sessions.discard(sess)
            inst, sess._instance = sess._instance, None
            owner = sess._owner
            if isinstance(owner, _Instance):
                owner.outbound.discard(sess.id)
            if inst is not None:
                inst.sessions -= 1
            self._cond.notify_all()
        if drop_id:
            self.world._drop(sess.id)  # on_release finds it CLOSED: nothing more
        if inst is not None:
            inst.put()

    def _instance_gone(self, inst: _Instance) -> None:
        """The last reference to an instance is gone: forget it, close what it opened
        (``tee_ta_ctx`` destruction closes the TA's own sessions)."""
        with self._lock:
            self._instances.discard(inst)
            if self._by_uuid.get(inst.uuid) is inst:
                del self._by_uuid[inst.uuid]
            outbound = sorted(inst.outbound)
        for sid in outbound:
            with self._lock:
                sess = self._find(sid)
            if sess is not None and sess._owner is inst:
                self._close(sess, drop_id=True)

    # ------------------------------------------------------------------ entries
    def _run(
        self,
        inst: _Instance,
        sess: GpSession | None,
        fn: Callable[..., object],
        *args: object,
        where: int | tuple[int, int] | None = None,
        timeout: int = TEE_TIMEOUT_INFINITE,
    ) -> tuple[int, int]:
        """Run one TA entry: GpTaError -> its code (origin TA), anything else -> panic.

        ``where`` names the entry in the note of a failure: the open entry's param types,
        or an invoke's ``(command, param types)``.  ``timeout`` (ms) sets the session's
        cancel time once the instance is held, as ``set_invoke_timeout`` does (a close
        entry runs with none)."""
        if sess is not None:
            with self._lock:
                sess._cancel_at = _cancel_time(timeout)
        stack = _entry_stack()
        stack.append(_Entry(self, inst, sess))
        try:
            fn(*args)
            result = (_OK, _TA)
        except GpTaError as exc:
            result = (exc.code, _TA)
            _gp_why.note(
                exc.code, _entry_text(inst, where, exc.detail or "its own result (no reason given)")
            )
        except TaPanic as exc:
            log.warning("TA %s called TEE_Panic(0x%08X)", inst.cls.__name__, exc.code)
            self._panic(inst)
            result = (_DEAD, _TEE)
            _gp_why.note(_DEAD, _entry_text(inst, where, f"panicked: {exc}"))
        except Exception as exc:
            log.warning("TA %s panicked", inst.cls.__name__, exc_info=True)
            self._panic(inst)
            result = (_DEAD, _TEE)
            _gp_why.note(_DEAD, _entry_text(inst, where, f"panicked: it raised {exc!r}"))
        finally:
            stack.pop()
            if sess is not None:
                with self._lock:  # the end of every entry: flag cleared, mask reset
                    sess._cancel = False
                    sess._mask = True
                    sess._cancel_at = None
        return result

    def _shut(self) -> tuple[int, int]:
        """COMMUNICATION, origin COMMS: the runtime is shut down (its VM destroyed)."""
        _gp_why.note(_COMMUNICATION, "the GP runtime is shut down (its partition's VM is gone)")
        return _COMMUNICATION, _COMMS

    def _panic(self, inst: _Instance) -> None:
        """``ctx->panicked``: dead for good; out of the UUID lookup unless keep-crashed."""
        with self._lock:
            inst.move(InstEvent.PANIC)
            unkeep = inst.kept and not inst.keep_crashed
            if not inst.keep_crashed and self._by_uuid.get(inst.uuid) is inst:
                del self._by_uuid[inst.uuid]
            if unkeep:
                inst.kept = False
        if unkeep:
            inst.put()  # a session of this entry still holds one: never the last

    # ------------------------------------------------------------------ waiting
    @contextmanager
    def _busy(self, inst: _Instance, *, skip: bool = False) -> Iterator[None]:
        """``tee_ta_set_busy`` / ``tee_ta_clear_busy``: one entry at a time."""
        if skip:
            yield
            return
        me = threading.get_ident()
        with self._cond:
            self._wait_free(inst, me)
            inst.holder = me
        try:
            yield
        finally:
            with self._cond:
                inst.holder = None
                self._cond.notify_all()

    @contextmanager
    def _exclusive(self, sess: GpSession, *, closing: bool = False) -> Iterator[None]:
        """``tee_ta_get_session(id, exclusive=true)``: invokes on a session serialise."""
        me = threading.get_ident()
        with self._cond:
            if sess._holder != me:
                self._wait_free(sess, me, closing=closing)
            if not closing and sess._state is not SessState.OPEN:
                raise _Gone
            sess._holder = me
            sess._depth += 1
        try:
            yield
        finally:
            with self._cond:
                sess._depth -= 1
                if sess._depth == 0:
                    sess._holder = None
                self._cond.notify_all()

    def _wait_free(self, res: _Instance | GpSession, me: int, *, closing: bool = False) -> None:
        # Under the condition's lock.
        while (res.holder if isinstance(res, _Instance) else res._holder) is not None:
            if self._closed:
                raise _Gone
            if isinstance(res, GpSession) and not closing and res._state is not SessState.OPEN:
                raise _Gone
            if self._closes_cycle(res, me):
                raise _Deadlock
            self._waiting[me] = res
            try:
                self._cond.wait()
            finally:
                del self._waiting[me]

    def _closes_cycle(self, res: _Instance | GpSession, me: int) -> bool:
        seen: set[int] = set()
        cur: _Instance | GpSession | None = res
        while cur is not None:
            holder = cur.holder if isinstance(cur, _Instance) else cur._holder
            if holder is None or holder in seen:
                return False
            if holder == me:
                return True
            seen.add(holder)
            cur = self._waiting.get(holder)
        return False

    # ------------------------------------------------------------------ cancellation
    def _wait(self, sess: GpSession | None, ms: int) -> int:
        """``syscall_wait``: CANCEL as soon as the session reads as cancelled (a cancel,
        or its cancel time reached, while unmasked), else SUCCESS after ``ms``."""
        if not _is_u32(ms):
            raise UsageError(f"TEE_Wait takes a u32 of milliseconds, not {ms!r}")
        deadline = None if ms == TEE_TIMEOUT_INFINITE else time.monotonic() + ms / 1000
        with self._cond:
            while True:
                if self._is_cancelled(sess):
                    return _CANCEL
                wake = deadline
                if sess is not None and not sess._mask and sess._cancel_at is not None:
                    wake = sess._cancel_at if wake is None else min(wake, sess._cancel_at)
                if wake is None:
                    if sess is None:
                        raise UsageError("an infinite TEE_Wait needs a session to cancel it")
                    self._cond.wait()
                    continue
                now = time.monotonic()
                if deadline is not None and deadline <= now:
                    return _OK
                self._cond.wait(max(wake - now, 0.0))

    def _cancelled(self, sess: GpSession | None) -> bool:
        with self._lock:
            return self._is_cancelled(sess)

    def _is_cancelled(self, sess: GpSession | None) -> bool:
        """Under the lock: ``tee_ta_session_is_cancelled`` (always False while masked;
        a shut-down runtime reads cancelled whatever the mask)."""
        if self._closed:
            return True
        if sess is None or sess._mask:
            return False
        if sess._cancel:
            return True
        return sess._cancel_at is not None and time.monotonic() >= sess._cancel_at

    def _set_mask(self, sess: GpSession | None, masked: bool) -> bool:
        if sess is None:
            return True
        with self._cond:
            old, sess._mask = sess._mask, masked
            self._cond.notify_all()
            return old

    # ------------------------------------------------------------------ lookup
    def _find(self, session_id: object) -> GpSession | None:
        if not isinstance(session_id, int) or isinstance(session_id, bool) or session_id <= 0:
            return None
        obj = self.world.lookup(session_id)
        if isinstance(obj, GpSession) and obj._runtime is self:
            return obj
        return None

    @staticmethod
    def _may_use(sess: GpSession, owner: object, *, from_ta: bool) -> bool:
        """The driver's per-context check, and ``check_client``: the normal world never
        uses a session a TA opened; a TA only its own."""
        if (sess.login == _TRUSTED_APP) != from_ta:
            return False
        return _same(sess._owner, owner)


class _Gone(Exception):
    """The session was closed while the caller waited for it."""


def _dead(inst: _Instance) -> bool:
    return inst.panicked


def _same(a: object, b: object) -> bool:
    return a is b or (not isinstance(a, _Instance) and a == b)


def _check_timeout(timeout: object) -> None:
    """A cancellationRequestTimeout is a u32 of milliseconds."""
    if not _is_u32(timeout):
        raise UsageError(
            f"a cancellation timeout is a u32 of milliseconds (or TEE_TIMEOUT_INFINITE), "
            f"not {timeout!r}"
        )


def _cancel_time(timeout: int) -> float | None:
    """``set_invoke_timeout``: the monotonic time the entry reads as cancelled from."""
    if timeout == TEE_TIMEOUT_INFINITE:
        return None
    return time.monotonic() + timeout / 1000


def _is_16(v: object) -> bool:
    return isinstance(v, bytes | bytearray) and len(v) == 16
