"""How GP entries wait: an instance runs one entry at a time (``tee_ta_set_busy``), a
session one invoke at a time (exclusive ``tee_ta_get_session``), a wait that would close
a cycle of waiting threads fails instead (``_Deadlock``: BUSY), and ``TEE_Wait`` and the
cancellation flag and mask (``syscall_wait``, ``tee_ta_session_is_cancelled``).

:class:`GpWaiting` is a part of :class:`~qtee.secure._gp.GpRuntime`: the runtime's one
lock and condition guard all of it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from objects import UsageError
from qtee.gp import _codes as teec
from qtee.secure._gp_params import _is_u32
from qtee.secure._gp_session import GpSession, _Deadlock, _Gone, _Instance
from qtee.secure._gp_state import SessState
from qtee.secure._gp_ta import TEE_TIMEOUT_INFINITE

__all__ = ["GpWaiting"]


class GpWaiting:
    """The busy/exclusive waits and the cancellation of a :class:`~qtee.secure._gp.GpRuntime`."""

    _lock: threading.Lock
    _cond: threading.Condition
    _closed: bool
    _waiting: dict[int, _Instance | GpSession]  # thread -> what it waits for

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
                    return teec.CANCEL
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
                    return teec.SUCCESS
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
