"""The callback request's lifecycle as one table (issue 17 "each lifecycle in one table";
qtee-kernel.md §4.3-§4.4: QUEUED -> PROCESSING at SUPPL_RECV, PROCESSED at SUPPL_SEND,
an abandoned wait or the context's close)."""

from __future__ import annotations

import errno

import pytest

from qtee._qcomtee.req_state import (
    REQUEST_STATES,
    IllegalTransition,
    ReqEvent,
    ReqState,
)
from qtee._qcomtee.user_obj import Request, RequestQueue


def test_the_table_holds_exactly_the_kernel_moves() -> None:
    """§4.3/§4.4: select takes a QUEUED request; completion ends a QUEUED or PROCESSING
    one; PROCESSED is final."""
    assert REQUEST_STATES.initial is ReqState.QUEUED
    assert dict(REQUEST_STATES.transitions) == {
        (ReqState.QUEUED, ReqEvent.SELECT): ReqState.PROCESSING,
        (ReqState.QUEUED, ReqEvent.COMPLETE): ReqState.PROCESSED,
        (ReqState.PROCESSING, ReqEvent.COMPLETE): ReqState.PROCESSED,
    }
    assert [int(s) for s in ReqState] == [1, 2, 3]


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (ReqState.PROCESSING, ReqEvent.SELECT),
        (ReqState.PROCESSED, ReqEvent.SELECT),
        (ReqState.PROCESSED, ReqEvent.COMPLETE),
    ],
)
def test_an_illegal_move_raises_and_changes_nothing(state: ReqState, event: ReqEvent) -> None:
    """Issue 17 (h11's rule): a move not in the table raises, naming it, and the request
    keeps its state."""
    req = Request(7, 1)
    req.state = state
    with pytest.raises(IllegalTransition, match=f"no move {event.name} from {state.name}"):
        req.move(event)
    assert req.state is state


def test_queue_moves_requests_through_the_table() -> None:
    """§4.3: a submitted request is QUEUED; the close completes it with -ENODEV
    (PROCESSED); finishing it again changes nothing."""
    q = RequestQueue()
    req = Request(7, 1)
    assert q.submit(req) and req.state is ReqState.QUEUED
    with q.cond:
        q.fifo.popleft()
        req.move(ReqEvent.SELECT)
    assert req.state is ReqState.PROCESSING
    q.close()
    assert (req.state, req.status) == (ReqState.PROCESSED, -errno.ENODEV)
    with q.cond:
        q.finish(req, 0)
    assert (req.state, req.status, len(q)) == (ReqState.PROCESSED, -errno.ENODEV, 0)


def test_mermaid_diagram() -> None:
    """Issue 17: the state diagram is generated from the table."""
    assert REQUEST_STATES.mermaid() == (
        "stateDiagram-v2\n"
        "    [*] --> QUEUED\n"
        "    QUEUED --> PROCESSING: SELECT\n"
        "    QUEUED --> PROCESSED: COMPLETE\n"
        "    PROCESSING --> PROCESSED: COMPLETE\n"
    )
