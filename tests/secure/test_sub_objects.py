"""A TA's sub-objects know their secure world without being told.

A TA hands out more objects than itself -- a session, an iterator -- as output objects
(QK §2.3: each is one more QTEE object the client holds).  Those objects call back into
the client's objects (``NsObject.invoke``, QK §4.2) and map its memory objects through the
primordial object's MAP_REGION (QK §2.4) exactly as the TA does: both need the partition
they live in (``SecureObject.world``).  issue 15 ("Secure objects"): an object made while a
call runs takes that call's world; one exported without a world takes the exporting one.
"""

from __future__ import annotations

import pytest

from objects import QteeError, UsageError, op
from qtee import (
    OUT_OBJECT,
    CallbackObject,
    Client,
    NsObject,
    ObjRef,
    Out,
    SecureObject,
    SecureWorld,
    TrustedApp,
)
from qtee.pytest_plugin import AppLoaderHelper
from tests._helpers import wait_until


class Session(SecureObject):
    """What the TA returns: calls the client back, then maps the client's memory."""

    def __init__(self, tag: bytes) -> None:
        self.tag = tag

    @op(0, io=2, ob=(8,))
    def mirror(self, cb: NsObject, mem: NsObject) -> bytes:
        """Ask ``cb`` for its answer to the tag; write it at the start of ``mem``; return
        the 8 bytes ``mem`` held before."""
        res = cb.invoke(0, ib=[self.tag], ob=[16])
        if res.result:
            raise QteeError(res.result)
        m = self.world.map_region(mem)
        try:
            seen = bytes(m.view[:8])
            m.view[: len(res.ob[0])] = res.ob[0]
        finally:
            m.unmap()
        return seen


class Peeker(SecureObject):
    """Made and used inside a handler, never exported."""

    def peek(self, mem: NsObject) -> bytes:
        m = self.world.map_region(mem)
        try:
            return bytes(m.view[:8])
        finally:
            m.unmap()


#: Made at import time, outside any call: it gets its world when a TA first returns it.
SHARED = Session(b"shared")


class Opener(TrustedApp):
    @op(0, ib=(None,), oo=1)
    def open(self, tag: bytes) -> Session:
        return Session(tag)

    @op(1, io=1, ob=(8,))
    def peek(self, mem: NsObject) -> bytes:
        return Peeker().peek(mem)

    @op(2, oo=1)
    def shared(self) -> Session:
        return SHARED


class Tagger(CallbackObject):
    """The client's object the session calls back."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []

    @op(0, ib=(None,), ob=(None,))  # up to the 16 bytes the session offers
    def answer(self, tag: bytes) -> bytes:
        self.seen.append(tag)
        return b"seen " + tag


@pytest.mark.qtee_ta("subobj.opener", Opener)
@pytest.mark.qtee_modes("in-process", "server", "guest")
def test_a_returned_session_calls_back_and_maps_memory(
    qtee_client: Client, qtee_app: AppLoaderHelper
) -> None:
    """QK §4.2 (a callback from the sub-object) and §2.4 (MAP_REGION from it), in every
    place the device can live: the session uses the world of the TA that made it."""
    app = qtee_app("subobj.opener")
    (session,) = app.invoke(0, b"abc", OUT_OBJECT)
    assert isinstance(session, ObjRef)
    tagger = Tagger()
    before = qtee_client.exported()  # the env's credentials object
    with qtee_client.memory(64) as mem:
        mem.view[:8] = b"client!!"
        try:
            assert session.invoke(0, tagger, mem, Out(8)) == [b"client!!"]
        finally:
            session.release()
        assert bytes(mem.view[:9]) == b"seen abc\0"
    assert tagger.seen == [b"abc"]
    assert wait_until(lambda: qtee_client.exported() == before)  # QTEE let go of the tagger


@pytest.mark.qtee_ta("subobj.opener", Opener)
def test_an_object_made_inside_a_handler_has_the_world(
    qtee_client: Client, qtee_app: AppLoaderHelper
) -> None:
    """An object a handler makes and uses at once (never an output) maps memory too."""
    app = qtee_app("subobj.opener")
    with qtee_client.memory(16) as mem:
        mem.view[:8] = b"peek me!"
        assert app.invoke(1, mem, Out(8)) == [b"peek me!"]


@pytest.mark.qtee_ta("subobj.opener", Opener)
def test_an_object_made_outside_any_call_takes_the_world_that_exports_it(
    qtee_client: Client, qtee_app: AppLoaderHelper
) -> None:
    """Made at import time, it has no world until the TA returns it; then it has the
    TA's, and keeps it."""
    app = qtee_app("subobj.opener")
    (session,) = app.invoke(2, OUT_OBJECT)
    try:
        device_world = qtee_client.device.world  # type: ignore[union-attr]
        assert SHARED.world is device_world
        with qtee_client.memory(16) as mem:
            assert session.invoke(0, Tagger(), mem, Out(8)) == [bytes(8)]
            assert bytes(mem.view[:11]) == b"seen shared"
    finally:
        session.release()


def test_an_object_in_no_world_says_so() -> None:
    """Outside any call and never exported, ``world`` is a UsageError that says how an
    object gets one; setting it by hand still works and export does not override it."""
    lone = Session(b"x")
    with pytest.raises(UsageError, match=r"Session is in no secure world yet.*set \.world"):
        _ = lone.world
    world = SecureWorld(Opener())
    other = SecureWorld(Opener())
    lone.world = world
    assert lone.world is world
    ident = other.export(lone)  # another world exporting it does not move it
    assert lone.world is world
    assert other._drop(ident) == 0
    with pytest.raises(TypeError, match="world must be a SecureWorld"):
        lone.world = "qtee"  # type: ignore[assignment]


def test_the_root_and_services_have_their_world(qtee_client: Client) -> None:
    """The root belongs to the world built around it; a service opened through the client
    env (made inside the call) belongs to that world."""
    device_world = qtee_client.device.world  # type: ignore[union-attr]
    assert device_world.root.world is device_world
    env = qtee_client.client_env()
    try:
        (loader,) = env.invoke(0, (3).to_bytes(4, "little"), OUT_OBJECT)
        live = [device_world.lookup(i) for i in device_world.live_ids()]
        loader.release()
    finally:
        env.release()
    assert len(live) == 2  # the client env and the app loader
    assert all(o is not None and o.world is device_world for o in live)
