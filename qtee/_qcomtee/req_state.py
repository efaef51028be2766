"""The lifecycle of a callback request (``qcomtee/user_obj.c``), as one table.

A request QTEE makes of a user object is QUEUED on the owning context; a supplicant
thread's SUPPL_RECV selects it (PROCESSING); the supplicant's SUPPL_SEND, the invoking
thread giving up, or the context's close complete it (PROCESSED).  A release
notification is completed at its selection, and a request still QUEUED can be
completed directly (a SEND naming it, an abandoned wait, the close).

Every move is in :data:`REQUEST_STATES` (a :class:`qtee._statetable.StateTable`): ``move``
gives the next state or raises :class:`IllegalTransition` -- the caller changes nothing
then.  PROCESSED is final.  ``python -m qtee._diagrams`` puts its diagram in
ARCHITECTURE.md.
"""

from __future__ import annotations

import enum
from typing import Final

from qtee._statetable import IllegalTransition, StateTable

__all__ = [
    "REQUEST_STATES",
    "IllegalTransition",
    "ReqEvent",
    "ReqState",
    "StateTable",
]


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


REQUEST_STATES: Final = StateTable.parse(
    "callback request",
    ReqState,
    ReqEvent,
    """
    QUEUED:     SELECT -> PROCESSING, COMPLETE -> PROCESSED
    PROCESSING: COMPLETE -> PROCESSED
    """,
)
