"""How the GP runtime finds or makes the instance a session binds to (single-instance
lookup by UUID, the world's and the process's TAs, IAppLoader's, the LOAD_TA hook) and
runs TA entries in it: create before the first open, destroy after the last TA session,
an entry's error or panic (``ctx->panicked``) turned into the call's result.

:class:`GpInstances` is a part of :class:`~qtee.secure._gp.GpRuntime`, under its lock.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid as uuidlib
from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING, Final, cast

from qtee.gp import _codes as teec
from qtee.gp._defs import TaFlag
from qtee.secure import _gp_why
from qtee.secure._gp_params import GpParam, GpTaError, TaPanic
from qtee.secure._gp_session import GpSession, _Entry, _entry_stack, _Instance
from qtee.secure._gp_state import InstEvent, InstState
from qtee.secure._gp_ta import TEE_TIMEOUT_INFINITE, GpTA
from qtee.secure._world import SecureWorld

if TYPE_CHECKING:
    from qtee.secure._gp import GpRuntime

__all__ = ["GpInstances"]

log = logging.getLogger("qtee.gp")

_SINGLE: Final = TaFlag.TA_FLAG_SINGLE_INSTANCE
_MULTI: Final = TaFlag.TA_FLAG_MULTI_SESSION


def _entry_text(inst: _Instance, where: int | tuple[int, int] | None, what: str) -> str:
    """A failed entry for people: ``TA Acc, command 1 (param types ...): what``."""
    if isinstance(where, tuple):
        entry = f", command {where[0]} (param types {_gp_why.types_text(where[1])})"
    elif where is not None:
        entry = f", OpenSession (param types {_gp_why.types_text(where)})"
    else:
        entry = ""
    return f"TA {inst.cls.__name__}{entry}: {what}"


class GpInstances:
    """Instances and entries of a :class:`~qtee.secure._gp.GpRuntime`."""

    world: SecureWorld
    load_ta: Callable[[bytes], type[GpTA] | None] | None
    _lock: threading.Lock
    _by_uuid: dict[bytes, _Instance]
    _instances: set[_Instance]
    _app_loaded: dict[bytes, type[GpTA]]

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
            # its first reference is this session's
            inst = _Instance(cast("GpRuntime", self), cls, uuid)
            inst.sessions = 1
            self._instances.add(inst)
            if inst.single:
                self._by_uuid[uuid] = inst
                if inst.keep_alive:
                    inst.kept = inst.get()
            return teec.SUCCESS, inst

    def _bind(self, uuid: bytes) -> tuple[int, _Instance | None] | None:
        """Under the lock: bind to the single-instance TA's instance, if there is one."""
        inst = self._by_uuid.get(uuid)
        if inst is None:
            return None
        if inst.panicked:  # only a keep-crashed one stays findable
            _gp_why.note(teec.TARGET_DEAD, f"TA {inst.cls.__name__} panicked and is kept crashed")
            return teec.TARGET_DEAD, None
        if not inst.flags & _MULTI and inst.sessions > 0:
            _gp_why.note(
                teec.BUSY,
                f"TA {inst.cls.__name__} is single-instance without TA_FLAG_MULTI_SESSION "
                "and has a session already",
            )
            return teec.BUSY, None
        if not inst.get():  # its last reference is being dropped: make a new one
            del self._by_uuid[uuid]
            return None
        inst.sessions += 1
        return teec.SUCCESS, inst

    def _load(self, uuid: bytes) -> tuple[int, type[GpTA] | None]:
        """The LOAD_TA path (§3.2): the hook names the TA class, or None if not found."""
        hook = self.load_ta
        tas = self.world.tas
        if hook is None:
            why = _gp_why.not_found(tas, uuid, "no tee-supplicant serves this GP runtime")
            _gp_why.note(teec.ITEM_NOT_FOUND, why)
            return teec.ITEM_NOT_FOUND, None
        try:
            cls = hook(uuid)
        except GpTaError as exc:  # e.g. COMMUNICATION when no supplicant answers
            _gp_why.note(exc.code, _gp_why.load_failed(tas, uuid, exc.code, exc.detail))
            return exc.code, None
        except Exception as exc:
            log.exception("load_ta hook failed for %s", uuid.hex())
            _gp_why.note(teec.GENERIC, f"LOAD_TA of {uuidlib.UUID(bytes=uuid)} raised {exc!r}")
            return teec.GENERIC, None
        if cls is None:
            load = "the image tee-supplicant sent names no TA the model has a class for"
            _gp_why.note(teec.ITEM_NOT_FOUND, _gp_why.not_found(tas, uuid, load))
            return teec.ITEM_NOT_FOUND, None
        if not (isinstance(cls, type) and issubclass(cls, GpTA)) or (
            getattr(cls, "UUID", None) != uuidlib.UUID(bytes=uuid)
        ):
            log.error("load_ta for %s returned %r, not a GpTA with that UUID", uuid.hex(), cls)
            why = f"LOAD_TA of {uuidlib.UUID(bytes=uuid)} gave {cls!r}, not a GpTA of that UUID"
            _gp_why.note(teec.SECURITY, why)
            return teec.SECURITY, None
        return teec.SUCCESS, cls

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

    def _close_entry(self, inst: _Instance, ta: GpTA, sess: GpSession) -> None:
        with suppress(GpTaError):  # TA_CloseSessionEntryPoint returns nothing
            ta.close_session(sess)
        self._remove_ta_session(inst)

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
        stack.append(_Entry(cast("GpRuntime", self), inst, sess))
        try:
            fn(*args)
            result = (teec.SUCCESS, teec.ORIGIN_TRUSTED_APP)
        except GpTaError as exc:
            result = (exc.code, teec.ORIGIN_TRUSTED_APP)
            _gp_why.note(
                exc.code, _entry_text(inst, where, exc.detail or "its own result (no reason given)")
            )
        except TaPanic as exc:
            log.warning("TA %s called TEE_Panic(0x%08X)", inst.cls.__name__, exc.code)
            self._panic(inst)
            result = (teec.TARGET_DEAD, teec.ORIGIN_TEE)
            _gp_why.note(teec.TARGET_DEAD, _entry_text(inst, where, f"panicked: {exc}"))
        except Exception as exc:
            log.warning("TA %s panicked", inst.cls.__name__, exc_info=True)
            self._panic(inst)
            result = (teec.TARGET_DEAD, teec.ORIGIN_TEE)
            _gp_why.note(teec.TARGET_DEAD, _entry_text(inst, where, f"panicked: it raised {exc!r}"))
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
        _gp_why.note(teec.COMMUNICATION, "the GP runtime is shut down (its partition's VM is gone)")
        return teec.COMMUNICATION, teec.ORIGIN_COMMS

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


def _cancel_time(timeout: int) -> float | None:
    """``set_invoke_timeout``: the monotonic time the entry reads as cancelled from."""
    if timeout == TEE_TIMEOUT_INFINITE:
        return None
    return time.monotonic() + timeout / 1000
