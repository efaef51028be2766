"""The lifecycle of a callback request (``qcomtee/user_obj.c``), as one table.

A request QTEE makes of a user object is QUEUED on the owning context; a supplicant
thread's SUPPL_RECV selects it (PROCESSING); the supplicant's SUPPL_SEND, the invoking
thread giving up, or the context's close complete it (PROCESSED).  A release
notification is completed at its selection, and a request still QUEUED can be
completed directly (a SEND naming it, an abandoned wait, the close).

Every move is in :data:`REQUEST_STATES`; :meth:`StateTable.move` gives the next state or
raises :class:`IllegalTransition` -- the caller changes nothing then.  PROCESSED is
final.  :meth:`StateTable.mermaid` renders the table as a Mermaid ``stateDiagram-v2``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from objects import UsageError

__all__ = [
    "REQUEST_STATES",
    "IllegalTransition",
    "ReqEvent",
    "ReqState",
    "StateTable",
]

_S = TypeVar("_S", bound=enum.Enum)
_E = TypeVar("_E", bound=enum.Enum)


class IllegalTransition(UsageError):
    """A state machine was asked for a move its table does not have."""


@dataclass(frozen=True, slots=True)
class StateTable(Generic[_S, _E]):
    """A state machine's every transition: ``(state, event) -> next state``."""

    name: str
    initial: _S
    transitions: Mapping[tuple[_S, _E], _S]

    def move(self, state: _S, event: _E) -> _S:
        """The state ``event`` leads to from ``state``; :class:`IllegalTransition` if the
        table has no such move."""
        try:
            return self.transitions[state, event]
        except KeyError:
            raise IllegalTransition(
                f"{self.name}: no move {event.name} from {state.name}"
            ) from None

    def mermaid(self) -> str:
        """The table as a Mermaid ``stateDiagram-v2`` (one line per transition, in the
        table's order; the initial state marked from ``[*]``)."""
        lines = ["stateDiagram-v2", f"    [*] --> {self.initial.name}"]
        for (state, event), nxt in self.transitions.items():
            lines.append(f"    {state.name} --> {nxt.name}: {event.name}")
        return "\n".join(lines) + "\n"


class ReqState(enum.IntEnum):
    """A callback request's state (the kernel's ``QCOMTEE_REQ_*``)."""

    QUEUED = 1
    PROCESSING = 2
    PROCESSED = 3


class ReqEvent(enum.Enum):
    """What moves a request."""

    #: SUPPL_RECV takes it from the FIFO and hands it to a supplicant thread.
    SELECT = "select"
    #: Its answer is in (SUPPL_SEND), or it ends without one (a failed selection, a
    #: release notification delivered, the invoking thread gone, the context closed).
    COMPLETE = "complete"


REQUEST_STATES: Final[StateTable[ReqState, ReqEvent]] = StateTable(
    "callback request",
    ReqState.QUEUED,
    {
        (ReqState.QUEUED, ReqEvent.SELECT): ReqState.PROCESSING,
        (ReqState.QUEUED, ReqEvent.COMPLETE): ReqState.PROCESSED,
        (ReqState.PROCESSING, ReqEvent.COMPLETE): ReqState.PROCESSED,
    },
)
