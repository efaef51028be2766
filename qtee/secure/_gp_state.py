"""The lifecycles of a GP session and of a GP TA instance, as two tables (optee.md §4).

A session (``tee_ta_session``) is OPENING from the moment its id is exported until the
TA's open entry succeeded (OPEN); a close marks it CLOSING (new invokes are refused) while
the close entry runs; its id and instance reference go at CLOSED, final.  A session the
open entry refused, or one shutdown drops, goes to CLOSED straight away.

An instance (``tee_ta_ctx``) is NEW until its create entry starts (libutee's
``init_done`` is set before create runs, even if it fails: CREATED); its destroy entry
makes it NEW again (a later session creates it anew).  An entry that panics makes it
PANICKED (``ctx->panicked``), dead for good: a second entry running concurrently may
panic too, and a destroy entry that runs anyway leaves it dead.

Every move is in :data:`SESSION_STATES` / :data:`INSTANCE_STATES`;
:meth:`~qtee._statetable.StateTable.move` gives the next state or raises
:class:`~qtee._statetable.IllegalTransition` -- the caller changes nothing then.
"""

from __future__ import annotations

import enum
from typing import Final

from qtee._statetable import StateTable

__all__ = [
    "INSTANCE_STATES",
    "SESSION_STATES",
    "InstEvent",
    "InstState",
    "SessEvent",
    "SessState",
]


class SessState(enum.Enum):
    """A GP session's state (its ``value`` shows in the session's repr)."""

    OPENING = "opening"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class SessEvent(enum.Enum):
    """What moves a session."""

    #: The TA's open entry succeeded and the runtime was not shut down meanwhile.
    OPENED = "opened"
    #: A close (the client's, the owner's going away, the id's release) begins.
    CLOSE = "close"
    #: Its id and instance reference are dropped (closed, refused, or shut down).
    DISCARD = "discard"


SESSION_STATES: Final = StateTable.parse(
    "GP session",
    SessState,
    SessEvent,
    """
    OPENING: OPENED -> OPEN, DISCARD -> CLOSED
    OPEN:    CLOSE -> CLOSING, DISCARD -> CLOSED
    CLOSING: DISCARD -> CLOSED
    """,
)


class InstState(enum.Enum):
    """A GP TA instance's state."""

    NEW = "new"
    CREATED = "created"
    PANICKED = "panicked"


class InstEvent(enum.Enum):
    """What moves an instance."""

    #: Its create entry is about to run (the first open entry of a NEW instance).
    CREATE = "create"
    #: Its destroy entry is about to run (last TA session gone, or an unload).
    DESTROY = "destroy"
    #: An entry called ``TEE_Panic`` or raised.
    PANIC = "panic"


INSTANCE_STATES: Final = StateTable.parse(
    "GP TA instance",
    InstState,
    InstEvent,
    """
    NEW:      CREATE -> CREATED, PANIC -> PANICKED
    CREATED:  DESTROY -> NEW, PANIC -> PANICKED
    PANICKED: PANIC -> PANICKED, DESTROY -> PANICKED
    """,
)
