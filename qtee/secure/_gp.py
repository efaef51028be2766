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

The pieces, by concern: ``_gp_params`` (params, :class:`GpTaError`, :func:`panic`),
``_gp_ta`` (:class:`GpTA`, its TEE internal API, registration), ``_gp_session`` (the
per-instance and per-session records), ``_gp_state`` (their lifecycle tables),
``_gp_instance`` (finding instances, running entries), ``_gp_wait`` (busy, exclusive,
cancellation); this module keeps :class:`GpRuntime`'s entry points, and its ``__all__``
is the GP TA author's API, which :mod:`qtee.secure` and :mod:`qtee` re-export.
"""

from __future__ import annotations

import logging
import threading
import uuid as uuidlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from objects import DriverError
from qtee.gp import _codes as teec
from qtee.gp._defs import TaFlag
from qtee.secure import _gp_why
from qtee.secure._gp_instance import GpInstances
from qtee.secure._gp_params import (
    GpParam,
    GpTaError,
    TaPanic,
    TeeParamType,
    _copy_out,
    _is_u32,
    gp_params,
    panic,
    tee_param_types,
)
from qtee.secure._gp_session import GpSession, _Deadlock, _Gone, _Instance
from qtee.secure._gp_state import SessEvent, SessState
from qtee.secure._gp_ta import (
    TEE_TIMEOUT_INFINITE,
    GpTA,
    TaSession,
    _check_timeout,
    gp_ta_image,
    register_gp_ta,
    register_loadable_ta,
    unregister_gp_ta,
    unregister_loadable_ta,
)
from qtee.secure._gp_wait import GpWaiting
from qtee.secure._registry import uuid_bytes
from qtee.secure._world import SecureWorld

if TYPE_CHECKING:
    from qtee.secure._signing import SigningKey

#: What a GP TA author imports (``qtee.secure`` and ``qtee`` re-export this list).
__all__ = [
    "TEE_TIMEOUT_INFINITE",
    "GpParam",
    "GpSession",
    "GpTA",
    "GpTaError",
    "TaPanic",
    "TaSession",
    "TeeParamType",
    "gp_ta_image",
    "panic",
    "register_gp_ta",
    "register_loadable_ta",
    "tee_param_types",
    "unregister_gp_ta",
    "unregister_loadable_ta",
]

log = logging.getLogger("qtee.gp")

_CONCURRENT: Final = TaFlag.TA_FLAG_CONCURRENT


# ----------------------------------------------------------------------------- runtime


class GpRuntime(GpInstances, GpWaiting):
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
            or login == teec.LOGIN_TRUSTED_APP  # the normal world cannot claim to be a TA
        ):
            return 0, teec.BAD_PARAMETERS, teec.ORIGIN_TEE
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
                return teec.COMMUNICATION
            sess = self._find(session_id)
            if (
                sess is None
                or sess._state is SessState.CLOSED
                or not self._may_use(sess, owner, from_ta=False)
            ):
                return teec.BAD_PARAMETERS
            sess._cancel = True
            self._cond.notify_all()
        return teec.SUCCESS

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
                if s._state is SessState.OPEN
                and s.login != teec.LOGIN_TRUSTED_APP
                and _same(s._owner, owner)
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
        raw = uuid_bytes(uuid)
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
            return 0, exc.code, teec.ORIGIN_TEE
        if self._closed:
            return 0, *self._shut()
        sess = GpSession(self, uuid, login, client_uuid, owner)
        sess.cancel_id = cancel_id
        try:
            sess.id = self.world.export(sess)  # §4.2 step 1
        except DriverError as exc:  # ENOSPC: the id space is full
            _gp_why.note(teec.OVERFLOW, f"no session id left: {exc}")
            return 0, teec.OVERFLOW, teec.ORIGIN_TEE
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
            return (0, *self._shut()) if self.closed else (0, code, teec.ORIGIN_TEE)
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
                    code, origin = teec.TARGET_DEAD, teec.ORIGIN_TEE
                    _gp_why.note(teec.TARGET_DEAD, f"TA {inst.cls.__name__} panicked meanwhile")
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
            code, origin = teec.BUSY, teec.ORIGIN_TEE
            _gp_why.note(teec.BUSY, f"opening a session to TA {inst.cls.__name__} would deadlock")
        except _Gone:  # shut down while waiting for the instance
            code, origin = self._shut()
        with self._cond:
            shut = sess._state is SessState.CLOSED
            if code == teec.SUCCESS and not shut:
                sess._move(SessEvent.OPENED)
                return sess.id, teec.SUCCESS, teec.ORIGIN_TRUSTED_APP
        self._discard(sess)
        return (0, *self._shut()) if shut else (0, code, origin)

    def _open_from_ta(
        self, caller: _Instance, uuid: bytes, types: int, params: list[GpParam], timeout: int
    ) -> tuple[TaSession | None, int, int]:
        if not _is_16(uuid):
            return None, teec.BAD_PARAMETERS, teec.ORIGIN_TEE
        sid, code, origin = self._open(
            uuid, teec.LOGIN_TRUSTED_APP, caller.uuid, types, params, caller, timeout=timeout
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
            return exc.code, teec.ORIGIN_TEE
        if not _is_u32(cmd):
            _gp_why.note(teec.BAD_PARAMETERS, f"command {cmd!r} is not a u32")
            return teec.BAD_PARAMETERS, teec.ORIGIN_TEE
        with self._lock:
            if self._closed:
                return self._shut()
            sess = self._find(session_id)
            if sess is None or not self._may_use(sess, owner, from_ta=from_ta):
                _gp_why.note(teec.BAD_PARAMETERS, f"no open session {session_id:#x} of this caller")
                return teec.BAD_PARAMETERS, teec.ORIGIN_TEE
        try:
            with self._exclusive(sess):
                inst = sess._instance
                if inst is None:  # shutdown dropped it under us
                    return self._shut()
                if inst.panicked:
                    _gp_why.note(teec.TARGET_DEAD, f"TA {inst.cls.__name__} panicked earlier")
                    return teec.TARGET_DEAD, teec.ORIGIN_TEE
                concurrent = bool(inst.flags & _CONCURRENT)
                with self._busy(inst, skip=concurrent):
                    if _dead(inst):  # it panicked while this call waited
                        _gp_why.note(teec.TARGET_DEAD, f"TA {inst.cls.__name__} panicked meanwhile")
                        return teec.TARGET_DEAD, teec.ORIGIN_TEE
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
            _gp_why.note(teec.BUSY, f"invoking TA {sess.uuid.hex()} would deadlock")
            return teec.BUSY, teec.ORIGIN_TEE
        except _Gone:
            if self.closed:
                return self._shut()
            _gp_why.note(teec.BAD_PARAMETERS, f"session {session_id:#x} was closed meanwhile")
            return teec.BAD_PARAMETERS, teec.ORIGIN_TEE

    # ------------------------------------------------------------------ close
    def _close_checked(self, session_id: int, owner: object, *, from_ta: bool) -> int:
        with self._lock:
            if self._closed:
                return teec.COMMUNICATION
            sess = self._find(session_id)
            if sess is None or sess._state is not SessState.OPEN:
                return teec.ITEM_NOT_FOUND
            if not self._may_use(sess, owner, from_ta=from_ta):
                return teec.BAD_PARAMETERS
        self._close(sess, drop_id=True)
        return teec.SUCCESS

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
        if (sess.login == teec.LOGIN_TRUSTED_APP) != from_ta:
            return False
        return _same(sess._owner, owner)


def _dead(inst: _Instance) -> bool:
    return inst.panicked


def _same(a: object, b: object) -> bool:
    return a is b or (not isinstance(a, _Instance) and a == b)


def _is_16(v: object) -> bool:
    return isinstance(v, bytes | bytearray) and len(v) == 16
