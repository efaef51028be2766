"""What the GP runtime keeps per TA instance (``tee_ta_ctx``: :class:`_Instance`) and per
session (``tee_ta_session``: :class:`GpSession`), each moving through its table in
``_gp_state``, and the per-thread stack of the TA entries running (the TEE internal API
finds its instance and session there).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from objects import Refcounted
from qtee.gp._defs import TaFlag
from qtee.secure._gp_state import (
    INSTANCE_STATES,
    SESSION_STATES,
    InstEvent,
    InstState,
    SessEvent,
    SessState,
)
from qtee.secure._world import SecureObject

if TYPE_CHECKING:
    from qtee.secure._gp import GpRuntime
    from qtee.secure._gp_ta import GpTA

__all__ = ["GpSession"]

_SINGLE: Final = TaFlag.TA_FLAG_SINGLE_INSTANCE
_KEEP_ALIVE: Final = TaFlag.TA_FLAG_INSTANCE_KEEP_ALIVE
_KEEP_CRASHED: Final = TaFlag.TA_FLAG_INSTANCE_KEEP_CRASHED


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


class _Gone(Exception):
    """The session was closed while the caller waited for it."""
