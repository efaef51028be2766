"""The lifecycle of one device-server connection, as one table.

A connection is ACCEPTED until its first frame: a ``hello`` of this protocol version that
opens a node makes it SERVING (``welcome`` sent; ioctls run from now on).  The end of
its stream -- the client's ``close`` or end of stream, a bad frame, a refused open, a
socket error -- makes it ENDING: threads that get the lead leave, the parked SUPPL_RECVs
are answered.  The thread that saw the end closes the fd's context and the socket and
joins the others: CLOSED, final.  A ``bye`` (the server stopping, or a bad frame) is a
frame, not a state: it goes in any state but CLOSED (the socket is gone then).

Every move is in :data:`CONNECTION_STATES`;
:meth:`~qtee._statetable.StateTable.move` gives the next state or raises
:class:`~qtee._statetable.IllegalTransition` -- the caller changes nothing then.
"""

from __future__ import annotations

import enum
from typing import Final

from qtee._statetable import StateTable

__all__ = ["CONNECTION_STATES", "ConnEvent", "ConnState"]


class ConnState(enum.IntEnum):
    """A server connection's state, in the order a connection goes through them."""

    ACCEPTED = 1
    SERVING = 2
    ENDING = 3
    CLOSED = 4


class ConnEvent(enum.Enum):
    """What moves a connection."""

    #: The hello was of this version and its node opened: ``welcome`` sent.
    WELCOME = "welcome"
    #: A ``bye`` frame goes to the client (the state does not change).
    BYE = "bye"
    #: The stream ended (close frame, end of stream, bad frame, refused open, socket error).
    END = "end"
    #: The fd's context and socket are closed and its threads joined.
    CLOSE = "close"


CONNECTION_STATES: Final = StateTable.parse(
    "server connection",
    ConnState,
    ConnEvent,
    """
    ACCEPTED: WELCOME -> SERVING, BYE -> ACCEPTED, END -> ENDING
    SERVING:  BYE -> SERVING, END -> ENDING
    ENDING:   BYE -> ENDING, CLOSE -> CLOSED
    """,
)
