"""A lifecycle as one table: every ``(state, event) -> next state`` of a state machine.

Each object with a lifecycle (a GP session or TA instance, a VM partition, a server
connection, a callback request) keeps its state as an enum member and changes it only
through its table's :meth:`StateTable.move`: a move the table does not list raises
:class:`IllegalTransition`, and the caller then changes nothing.  The tables render
themselves as Mermaid ``stateDiagram-v2`` text; ``python -m qtee._diagrams`` writes them
into ARCHITECTURE.md.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from objects import UsageError

__all__ = ["IllegalTransition", "StateTable"]

_S = TypeVar("_S", bound=enum.Enum)
_E = TypeVar("_E", bound=enum.Enum)


class IllegalTransition(UsageError):
    """A state machine was asked for a move its table does not have."""


@dataclass(frozen=True, slots=True)
class StateTable(Generic[_S, _E]):
    """A state machine's every transition: ``(state, event) -> next state``.

    ``name`` says whose lifecycle it is (in errors and diagrams); ``initial`` is the state
    a new object starts in.
    """

    name: str
    initial: _S
    transitions: Mapping[tuple[_S, _E], _S]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise UsageError(f"a state table needs a non-empty name, not {self.name!r}")
        if not isinstance(self.initial, enum.Enum):
            raise UsageError(f"{self.name}: the initial state must be an enum member")
        kind = type(self.initial)
        for (state, event), nxt in self.transitions.items():
            if type(state) is not kind or type(nxt) is not kind:
                raise UsageError(f"{self.name}: {state!r} -> {nxt!r} is not of {kind.__name__}")
            if not isinstance(event, enum.Enum):
                raise UsageError(f"{self.name}: event {event!r} is not an enum member")

    @classmethod
    def parse(cls, name: str, states: type[_S], events: type[_E], spec: str) -> StateTable[_S, _E]:
        """A table written one line per state, by member names: ``STATE: EVENT -> NEXT,
        EVENT -> NEXT`` (the state's every move on its line).  The first line's state is
        the initial one; the moves keep the order written.  An empty or malformed line, a
        move written twice, or a name ``states``/``events`` lack raises
        :class:`~objects.UsageError`."""
        transitions: dict[tuple[_S, _E], _S] = {}
        initial: _S | None = None
        for line in filter(None, map(str.strip, spec.splitlines())):
            state, _, moves = line.partition(":")
            try:
                source = states[state.strip()]
                for move in moves.split(","):
                    event, arrow, nxt = (part.strip() for part in move.partition("->"))
                    key = (source, events[event])
                    if not arrow or key in transitions:
                        raise KeyError(move.strip())
                    transitions[key] = states[nxt]
            except KeyError as exc:
                raise UsageError(f"{name}: cannot read {exc} in {line!r}") from None
            if initial is None:
                initial = source
        if initial is None:
            raise UsageError(f"{name}: the table lists no state")
        return cls(name, initial, transitions)

    def move(self, state: _S, event: _E) -> _S:
        """The state ``event`` leads to from ``state``; :class:`IllegalTransition` if the
        table has no such move."""
        try:
            return self.transitions[state, event]
        except KeyError:
            raise IllegalTransition(
                f"{self.name}: no move {event.name} from {state.name}"
            ) from None

    def allows(self, state: _S, event: _E) -> bool:
        """Whether the table has a move ``event`` from ``state``."""
        return (state, event) in self.transitions

    def mermaid(self) -> str:
        """The table as a Mermaid ``stateDiagram-v2`` (one line per transition, in the
        table's order; the initial state marked from ``[*]``)."""
        lines = ["stateDiagram-v2", f"    [*] --> {self.initial.name}"]
        for (state, event), nxt in self.transitions.items():
            lines.append(f"    {state.name} --> {nxt.name}: {event.name}")
        return "\n".join(lines) + "\n"
