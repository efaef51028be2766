"""Which handles each client holds, for the pytest plugin's leak check (model-only).

While an :class:`ObjectTracker` is installed (:func:`track_objects`), every
:class:`~qtee.client.Client` made remembers where each of its handles and exported
callback objects was made, and its close records what it released on the user's behalf
(:class:`Leftover`).  Not public API: the pytest plugin uses it through ``qtee.client``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from qtee.client import Client, MemoryObject, ObjRef

__all__ = ["Leftover", "ObjectTracker", "current", "track_objects"]


@dataclass(frozen=True, slots=True)
class Leftover:
    """An object a client held when it was closed (close released it on the user's
    behalf), or still holds: what the pytest plugin's leak check names."""

    #: ``"ObjRef"``, ``"MemoryObject"`` or ``"callback object"``.
    kind: str
    #: The fd's object id, shm id or callback (user) id.
    ident: int
    #: What it refers to: the model's label, the size, the callback object's class.
    what: str
    #: ``file:line`` where it was made (or kept, or first sent to QTEE).
    where: str


_KIND_ORDER: Final = {"ObjRef": 0, "MemoryObject": 1, "callback object": 2}


class _ClientTrack:
    """One tracked client: its live handles and exports, and what its close released."""

    __slots__ = ("closed", "exports", "left", "live", "tracker", "where")

    def __init__(self, tracker: ObjectTracker, where: str) -> None:
        self.tracker = tracker
        self.where = where  # where the client was made
        self.live: dict[int, tuple[ObjRef | MemoryObject, str]] = {}  # by id() of the handle
        self.exports: dict[int, str] = {}  # callback id -> where first sent
        self.closed = False
        self.left: list[Leftover] = []  # what close released

    def made(self, obj: ObjRef | MemoryObject, frame: FrameType | None) -> None:
        self.live[id(obj)] = (obj, self.tracker.where(frame))

    def gone(self, obj: ObjRef | MemoryObject) -> None:
        self.live.pop(id(obj), None)

    def leftovers(self, client: Client) -> list[Leftover]:
        """What the fd holds of the handles and exports not released (the model says
        what it holds: an ObjRef naming an id the fd does not hold is no leftover)."""
        if getattr(client.ctx, "closed", False):  # closed under it (a VM destroyed): gone
            return []
        held = client._held()
        if held is None:  # the connection is gone: nothing is left for close to release
            return []
        try:
            labels = {int(i): str(label) for i, label, *_ in held.get("objects", ())}
            callbacks = {int(uid) for uid, *_ in held.get("callbacks", ())}
            if held.get("secure_world") is False:  # a destroyed VM's: nobody holds them
                callbacks.clear()
            owned = {int(shm) for shm, *rest in held.get("memory", ()) if rest and rest[-1]}
        except (TypeError, ValueError):  # a server that sent something else
            return []
        from qtee.client import ObjRef, _Credentials  # the handles this table tracks

        left: list[Leftover] = []
        seen: set[int] = set()
        for obj, where in list(self.live.values()):
            if isinstance(obj, ObjRef):
                if obj.released or obj.id not in labels or obj.id in seen:
                    continue
                seen.add(obj.id)
                obj._named(labels[obj.id])
                left.append(Leftover("ObjRef", obj.id, obj.label, where))
            elif obj.id >= 0 and obj.id in owned:
                left.append(Leftover("MemoryObject", obj.id, f"{obj.size} bytes", where))
        for uid, cb in client.exports.items():
            if uid in callbacks and not isinstance(cb, _Credentials):  # that goes with its env
                where = self.exports.get(uid, "?")
                left.append(Leftover("callback object", uid, type(cb).__name__, where))
        left.sort(key=lambda x: (_KIND_ORDER[x.kind], x.ident))
        return left


class ObjectTracker:
    """Model-only bookkeeping of what clients hold, for the pytest plugin's leak check.

    While installed (:func:`track_objects`), every :class:`Client` made remembers where each
    of its :class:`ObjRef` and :class:`MemoryObject` handles and exported callback objects
    was made (``where(frame)`` names the place), and its :meth:`Client.close` records what
    it released on the user's behalf.  Clients made while no tracker is installed pay one
    ``None`` check per handle.
    """

    def __init__(self, where: Callable[[FrameType | None], str]) -> None:
        self.where = where
        self._lock = threading.Lock()
        self._clients: list[tuple[Client, _ClientTrack]] = []

    def _attach(self, client: Client, frame: FrameType | None) -> _ClientTrack:
        track = _ClientTrack(self, self.where(frame))
        with self._lock:
            self._clients.append((client, track))
        return track

    def name(self, client: Client, where: str) -> None:
        """Say where ``client`` comes from in reports (e.g. ``fixture qtee_client``)."""
        if client._track is not None:
            client._track.where = where

    def report(self) -> list[tuple[str, bool, list[Leftover]]]:
        """Per client with leftovers: where it was made, whether it was closed, and what its
        close released (closed) or what it still holds (never closed)."""
        with self._lock:
            clients = list(self._clients)
        found = []
        for client, track in clients:
            left = track.left if track.closed else track.leftovers(client)
            if left:
                found.append((track.where, track.closed, left))
        return found


_installed: ObjectTracker | None = None


def track_objects(tracker: ObjectTracker | None) -> ObjectTracker | None:
    """Install ``tracker`` for the clients made from now on (None: stop); returns the one
    installed before."""
    global _installed
    previous, _installed = _installed, tracker
    return previous


def current() -> ObjectTracker | None:
    """The tracker installed now (what a new :class:`~qtee.client.Client` attaches to)."""
    return _installed
