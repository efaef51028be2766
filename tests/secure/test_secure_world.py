"""The secure world fed byte-exact messages (qtee-kernel.md §3.2-§3.6, §2.3)."""

from __future__ import annotations

import struct

import pytest

from objects import op
from qtee import Result, wire
from qtee.secure import NsObject, SecureObject, SecureWorld


class Counter(SecureObject):
    def __init__(self) -> None:
        self.value = 0
        self.released = 0

    @op(0, ib=(4,), ob=(4,))
    def add(self, amount: bytes) -> bytes:
        self.value += struct.unpack("<I", amount)[0]
        return struct.pack("<I", self.value)

    @op(1, io=1, ob=(None,))
    def ping(self, cb: NsObject) -> bytes:
        res = cb.invoke(7, [b"ping"], [8])
        assert res.result == Result.OK
        return res.ob[0]

    @op(2, io=1)
    def keep(self, cb: NsObject) -> None:
        self.kept = cb.retain()

    @op(3)
    def drop(self) -> None:
        self.kept.release()

    def on_release(self) -> None:
        self.released += 1


class Root(SecureObject):
    def __init__(self) -> None:
        self.counter = Counter()

    @op(0, oo=1)
    def open(self) -> SecureObject:
        return self.counter


def no_callbacks(out: bytearray) -> None:
    raise AssertionError("unexpected callback")


def call(world: SecureWorld, cxt: int, op_: int, **kw: object) -> tuple[int, bytearray, bytearray]:
    inbound = wire.encode_invoke(cxt, op_, **kw)  # type: ignore[arg-type]
    outbound = bytearray(wire.MAX_OUTBOUND_BUFFER_SIZE)
    return world.invoke(inbound, outbound, no_callbacks), inbound, outbound


def test_open_invoke_release_lowest_free_ids() -> None:
    root = Root()
    world = SecureWorld(root)
    result, inbound, _ = call(world, wire.QCOMTEE_MSG_OBJECT_ROOT, 0, n_oo=1)
    assert result == Result.OK
    (cid,) = wire.decode_invoke_response(inbound).oo
    assert cid == 2  # ids 0 and 1 are NULL and root
    result, inbound, _ = call(world, cid, 0, ib=[struct.pack("<I", 5)], ob=[4])
    assert result == Result.OK
    assert wire.decode_invoke_response(inbound).ob == (struct.pack("<I", 5),)
    # A second export of the same object is a second id (one reference each).
    _, inbound, _ = call(world, 1, 0, n_oo=1)
    assert wire.decode_invoke_response(inbound).oo == (3,)
    assert call(world, cid, wire.QCOMTEE_MSG_OBJECT_OP_RELEASE)[0] == Result.OK
    assert call(world, 3, wire.QCOMTEE_MSG_OBJECT_OP_RELEASE)[0] == Result.OK
    assert world.live_ids() == []
    assert root.counter.released == 2


def test_bad_targets_and_shapes() -> None:
    world = SecureWorld(Root())
    assert call(world, 0, 0)[0] == Result.ERROR_BADOBJ  # NULL
    assert call(world, 42, 0)[0] == Result.ERROR_BADOBJ  # never exported
    assert call(world, 0x80000001, 0)[0] == Result.ERROR_BADOBJ  # NS ids are not QTEE's
    assert call(world, 1, 9)[0] == Result.ERROR_INVALID  # unknown op
    assert call(world, 1, 0, n_oo=2)[0] == Result.ERROR_INVALID  # wrong shape


def test_callback_round_trip_and_async_release_of_io() -> None:
    root = Root()
    world = SecureWorld(root)
    _, inbound, _ = call(world, 1, 0, n_oo=1)
    (cid,) = wire.decode_invoke_response(inbound).oo
    seen: list[wire.CallbackMsg] = []

    def serve(out: bytearray) -> None:
        msg = wire.decode_callback(out)
        seen.append(msg)
        wire.write_callback_response(out, msg, 0, [b"pong"], [])

    inbound = wire.encode_invoke(cid, 1, io=[0x80000005], ob=[16])
    outbound = bytearray(wire.MAX_OUTBOUND_BUFFER_SIZE)
    assert world.invoke(inbound, outbound, serve) == Result.OK
    assert wire.decode_invoke_response(inbound).ob == (b"pong",)
    assert [(m.cxt, m.op, m.ib) for m in seen] == [(0x80000005, 7, (b"ping",))]
    # QTEE did not keep the callback object: its reference comes back as an async RELEASE.
    assert wire.decode_async(outbound, 0).releases == ((0x80000005,),)
    assert world.pending_releases() == []


def test_retained_ns_object_is_released_later() -> None:
    root = Root()
    world = SecureWorld(root)
    _, inbound, _ = call(world, 1, 0, n_oo=1)
    (cid,) = wire.decode_invoke_response(inbound).oo
    result, _, outbound = call(world, cid, 2, io=[0x80000009])
    assert result == Result.OK
    assert wire.decode_async(outbound, 0).releases == ()  # kept
    result, _, outbound = call(world, cid, 3)
    assert wire.decode_async(outbound, 0).releases == ((0x80000009,),)


def test_callback_result_passes_through() -> None:
    world = SecureWorld(Root())
    _, inbound, _ = call(world, 1, 0, n_oo=1)
    (cid,) = wire.decode_invoke_response(inbound).oo

    def refuse(out: bytearray) -> None:
        msg = wire.decode_callback(out)
        wire.write_callback_response(out, msg, wire.result_from_errno(-19))

    inbound = wire.encode_invoke(cid, 1, io=[0x80000005], ob=[16])
    outbound = bytearray(wire.MAX_OUTBOUND_BUFFER_SIZE)
    # Counter.ping asserts OK; the failure inside the method becomes ERROR (1).
    assert world.invoke(inbound, outbound, refuse) == Result.ERROR


def test_callback_outside_an_invocation_is_refused() -> None:
    world = SecureWorld(Root())
    with pytest.raises(Exception, match="direct invocation"):
        NsObject(world, 0x80000001).invoke(0)


def test_flush_releases_keeps_what_does_not_fit_first_in_line() -> None:
    """The async tail takes the ids that fit; the rest wait, in order, ahead of later ones."""
    world = SecureWorld(SecureObject())
    ids = [0x8000_0000 + i for i in range(1, 11)]
    world._pending_release.extend(ids)
    out = bytearray(wire.MAX_OUTBOUND_BUFFER_SIZE)
    world._flush_releases(out, len(out) - 24)  # room for 3 ids
    assert wire.decode_async(out, len(out) - 24).releases == (tuple(ids[:3]),)
    assert world.pending_releases() == ids[3:]
    world._flush_releases(out, len(out) - 8)  # no room: nothing written, nothing lost
    assert world.pending_releases() == ids[3:]
    world._pending_release.append(0x8000_0100)
    out = bytearray(wire.MAX_OUTBOUND_BUFFER_SIZE)
    world._flush_releases(out, 0)
    assert wire.decode_async(out).releases == ((*ids[3:], 0x8000_0100),)
    assert world.pending_releases() == []
