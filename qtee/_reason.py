"""Why the secure side answered an invocation with an error: a per-thread side channel.

QTEE answers a failed invocation with a number alone, and so does the model on the wire.
The model also knows *why* (the op table's check that failed, the reason a service or TA
gave when it raised :class:`objects.QteeError`) and what the number means for the
interface that answered (``IAppLoader.ERROR_INVALID_BUFFER``).  The secure world notes
that here, on the thread it answers on; the client takes it when ``ret`` is not 0 and
puts it in the :class:`~objects.QteeError` it raises.  Nothing here changes a byte, an
errno or a result: it is a note next to the call, never part of it.

An in-process or guest invocation runs the secure world on the caller's thread, so the
note is there when the ioctl returns.  A device server takes the note on its thread after
the ioctl and sends it in the reply (``IoctlReply.why``); the remote client notes it on
its caller's thread.  The client clears the note before each invocation and uses it only
when the noted result is the one ``ret`` carries, so a note from another call never
names this one.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Final

from objects import QteeError, UsageError, result_from_u32

__all__ = ["MAX_DETAIL", "MAX_NAME", "Reason", "clear", "error_for", "note", "put", "take"]

#: Longest detail kept (characters); a longer one is cut, with "...".
MAX_DETAIL: Final = 1000
#: Longest interface error name kept (characters).
MAX_NAME: Final = 200


@dataclass(frozen=True, slots=True)
class Reason:
    """The secure side's answer to one call: ``result`` (signed, not 0), what it is called
    (``name``, may be empty) and why (``detail``, may be empty)."""

    result: int
    name: str = ""
    detail: str = ""

    def __post_init__(self) -> None:
        r = self.result
        if not isinstance(r, int) or isinstance(r, bool):
            raise UsageError(f"Reason.result must be an int, not {type(r).__name__}")
        if r == 0 or not -0x8000_0000 <= r <= 0x7FFF_FFFF:
            raise UsageError(f"Reason.result must be a non-zero signed 32-bit int, not {r}")
        if not isinstance(self.name, str) or not isinstance(self.detail, str):
            raise UsageError("Reason.name and Reason.detail must be str")
        object.__setattr__(self, "result", int(r))
        object.__setattr__(self, "name", self.name[:MAX_NAME])
        if len(self.detail) > MAX_DETAIL:
            object.__setattr__(self, "detail", self.detail[: MAX_DETAIL - 3] + "...")


_local = threading.local()


def note(result: int, name: str = "", detail: str = "") -> None:
    """The secure side answers this thread's call with ``result``: remember why (the last
    note of a call wins, so an outer answer overrides what an inner call noted)."""
    _local.reason = Reason(result, name, detail)


def put(reason: Reason | None) -> None:
    """Set this thread's note as it is (a remote client, from the server's reply)."""
    _local.reason = reason


#: Forget this thread's note (before a call): ``clear()``.  A partial of ``setattr``, so the
#: invoke path clears the note without a Python frame.
clear: Final = functools.partial(setattr, _local, "reason", None)


def take() -> Reason | None:
    """This thread's note, now forgotten."""
    reason: Reason | None = getattr(_local, "reason", None)
    _local.reason = None
    return reason


def error_for(ret: int) -> QteeError:
    """The :class:`QteeError` for an invocation's non-zero ``ret`` (the u32 of the ioctl
    struct): with this thread's note when it is for that result, else the number alone."""
    result = result_from_u32(ret)
    reason = take()
    if reason is None or reason.result != result:
        return QteeError(result)
    return QteeError(result, reason.detail, name=reason.name)
