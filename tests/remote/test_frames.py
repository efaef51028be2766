"""The device server's frame protocol (qtee/_remote/frames.py).

Golden frames are derived by hand from the msgpack spec (fixmap 0x8N, fixstr 0xaN,
bin8 0xc4, uint16 0xcd, uint32 0xce, uint64 0xcf, fixarray 0x9N, true 0xc3, false 0xc2),
not from the encoder.  Fuzz invariant, in one sentence: whatever bytes arrive, in
whatever chunks, the decoder returns messages or None or raises FrameError -- never
another exception -- and the outcome does not depend on the chunking.
"""

from __future__ import annotations

import itertools
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from objects import DecodeError, UsageError
from qtee._remote.frames import (
    MAX_ERRNO,
    MAX_FRAME,
    PROTOCOL_VERSION,
    Answer,
    Bye,
    Close,
    Denied,
    FrameDecoder,
    FrameError,
    Hello,
    Ioctl,
    IoctlReply,
    Message,
    Probe,
    Query,
    Ready,
    RecvNowait,
    Region,
    ShmFd,
    ShmFree,
    Status,
    Watch,
    Welcome,
    _unpack,
    check_reply,
    encode,
    encode_call,
    encode_reply,
    from_map,
    refusal,
    refused,
)

U32 = 2**32 - 1
U64 = 2**64 - 1

# --------------------------------------------------------------------------- helpers


def frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def packed(m: object) -> bytes:
    return frame(msgpack.packb(m, use_bin_type=True))


def decode_one(data: bytes, **kw: Any) -> Message | None:
    d = FrameDecoder(**kw)
    d.feed(data)
    return d.next_message()


Outcome = tuple[list[Message], str | None, int]


def run(chunks: list[bytes], **kw: Any) -> Outcome:
    """Feed ``chunks``; every message decoded, the error text if any, bytes left over."""
    d = FrameDecoder(**kw)
    msgs: list[Message] = []
    try:
        for chunk in chunks:
            d.feed(chunk)
            while (m := d.next_message()) is not None:
                msgs.append(m)
    except FrameError as exc:
        assert d.error is exc
        return msgs, str(exc), 0
    return msgs, None, d.buffered


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


# --------------------------------------------------------------------------- golden frames

FIX_V = bytes.fromhex("a17604")  # "v": 4

GOLDEN: list[tuple[Message, bytes]] = [
    (
        Hello(client="cli"),
        bytes.fromhex("00000020")
        + bytes.fromhex("84")
        + FIX_V
        + bytes.fromhex("a174 a5") + b"hello"
        + bytes.fromhex("a6") + b"client" + bytes.fromhex("a3") + b"cli"
        + bytes.fromhex("a4") + b"node" + bytes.fromhex("a3") + b"tee",
    ),
    (
        Hello(client="s", node="teepriv"),
        bytes.fromhex("00000022")
        + bytes.fromhex("84")
        + FIX_V
        + bytes.fromhex("a174 a5") + b"hello"
        + bytes.fromhex("a6") + b"client" + bytes.fromhex("a1") + b"s"
        + bytes.fromhex("a4") + b"node" + bytes.fromhex("a7") + b"teepriv",
    ),
    (
        Denied(errno=16, reason="held"),
        bytes.fromhex("00000020")
        + bytes.fromhex("84")
        + FIX_V
        + bytes.fromhex("a174 a6") + b"denied"
        + bytes.fromhex("a5") + b"errno" + bytes.fromhex("10")
        + bytes.fromhex("a6") + b"reason" + bytes.fromhex("a4") + b"held",
    ),
    (
        RecvNowait(seq=3, arg=b"\x01", regions=(Region(addr=0x1000, data=b"ab", writable=True),)),
        bytes.fromhex("00000043")
        + bytes.fromhex("85")
        + FIX_V
        + bytes.fromhex("a174 ab") + b"recv_nowait"
        + bytes.fromhex("a3") + b"seq" + bytes.fromhex("03")
        + bytes.fromhex("a3") + b"arg" + bytes.fromhex("c4 01 01")
        + bytes.fromhex("a7") + b"regions" + bytes.fromhex("91")
        + bytes.fromhex("83")
        + bytes.fromhex("a4") + b"addr" + bytes.fromhex("cd 1000")
        + bytes.fromhex("a4") + b"data" + bytes.fromhex("c4 02") + b"ab"
        + bytes.fromhex("a8") + b"writable" + bytes.fromhex("c3"),
    ),
    (
        Watch(seq=4),
        bytes.fromhex("00000011")
        + bytes.fromhex("83")
        + FIX_V
        + bytes.fromhex("a174 a5") + b"watch"
        + bytes.fromhex("a3") + b"seq" + bytes.fromhex("04"),
    ),
    (
        Ready(),
        bytes.fromhex("0000000c")
        + bytes.fromhex("82")
        + FIX_V
        + bytes.fromhex("a174 a5") + b"ready",
    ),
    (
        Welcome(impl_id=7, gen_caps=0x8000_0001, server="qs"),
        bytes.fromhex("0000002f")
        + bytes.fromhex("85")
        + FIX_V
        + bytes.fromhex("a174 a7") + b"welcome"
        + bytes.fromhex("a7") + b"impl_id" + bytes.fromhex("07")
        + bytes.fromhex("a8") + b"gen_caps" + bytes.fromhex("ce 80000001")
        + bytes.fromhex("a6") + b"server" + bytes.fromhex("a2") + b"qs",
    ),
    (
        Ioctl(
            seq=1,
            cmd=0xC010A400,
            arg=b"\x01\x02",
            regions=(
                Region(addr=0x1000, data=b"ab", writable=True),
                Region(addr=0x2000, data=b""),
            ),
        ),
        bytes.fromhex("00000061")
        + bytes.fromhex("86")
        + FIX_V
        + bytes.fromhex("a174 a5") + b"ioctl"
        + bytes.fromhex("a3") + b"seq" + bytes.fromhex("01")
        + bytes.fromhex("a3") + b"cmd" + bytes.fromhex("ce c010a400")
        + bytes.fromhex("a3") + b"arg" + bytes.fromhex("c4 02 0102")
        + bytes.fromhex("a7") + b"regions" + bytes.fromhex("92")
        + bytes.fromhex("83")
        + bytes.fromhex("a4") + b"addr" + bytes.fromhex("cd 1000")
        + bytes.fromhex("a4") + b"data" + bytes.fromhex("c4 02") + b"ab"
        + bytes.fromhex("a8") + b"writable" + bytes.fromhex("c3")
        + bytes.fromhex("83")
        + bytes.fromhex("a4") + b"addr" + bytes.fromhex("cd 2000")
        + bytes.fromhex("a4") + b"data" + bytes.fromhex("c4 00")
        + bytes.fromhex("a8") + b"writable" + bytes.fromhex("c2"),
    ),
    (
        IoctlReply(
            seq=1,
            arg=b"\x09",
            written=(Region(addr=0xFFFF_FFFF_FFFF_FFF0, data=b"z", writable=True),),
        ),
        bytes.fromhex("00000049")
        + bytes.fromhex("86")
        + FIX_V
        + bytes.fromhex("a174 a5") + b"reply"
        + bytes.fromhex("a3") + b"seq" + bytes.fromhex("01")
        + bytes.fromhex("a5") + b"errno" + bytes.fromhex("00")
        + bytes.fromhex("a3") + b"arg" + bytes.fromhex("c4 01 09")
        + bytes.fromhex("a7") + b"written" + bytes.fromhex("91")
        + bytes.fromhex("83")
        + bytes.fromhex("a4") + b"addr" + bytes.fromhex("cf fffffffffffffff0")
        + bytes.fromhex("a4") + b"data" + bytes.fromhex("c4 01") + b"z"
        + bytes.fromhex("a8") + b"writable" + bytes.fromhex("c3"),
    ),
    (
        IoctlReply(seq=0x10000, errno=22),
        bytes.fromhex("0000002b")
        + bytes.fromhex("86")
        + FIX_V
        + bytes.fromhex("a174 a5") + b"reply"
        + bytes.fromhex("a3") + b"seq" + bytes.fromhex("ce 00010000")
        + bytes.fromhex("a5") + b"errno" + bytes.fromhex("16")
        + bytes.fromhex("a3") + b"arg" + bytes.fromhex("c4 00")
        + bytes.fromhex("a7") + b"written" + bytes.fromhex("90"),
    ),
    (
        Close(seq=0x1234),
        bytes.fromhex("00000013")
        + bytes.fromhex("83")
        + FIX_V
        + bytes.fromhex("a174 a5") + b"close"
        + bytes.fromhex("a3") + b"seq" + bytes.fromhex("cd 1234"),
    ),
    (
        ShmFd(seq=7, id=1, size=4096),
        bytes.fromhex("0000001b")
        + bytes.fromhex("85")
        + FIX_V
        + bytes.fromhex("a174 a3") + b"shm"
        + bytes.fromhex("a3") + b"seq" + bytes.fromhex("07")
        + bytes.fromhex("a2") + b"id" + bytes.fromhex("01")
        + bytes.fromhex("a4") + b"size" + bytes.fromhex("cd 1000"),
    ),
    (
        ShmFree(seq=8, id=0x7FFFFFFF),
        bytes.fromhex("0000001c")
        + bytes.fromhex("84")
        + FIX_V
        + bytes.fromhex("a174 a8") + b"shm_free"
        + bytes.fromhex("a3") + b"seq" + bytes.fromhex("08")
        + bytes.fromhex("a2") + b"id" + bytes.fromhex("ce 7fffffff"),
    ),
    (
        Query(seq=9, what="info"),
        bytes.fromhex("0000001b")
        + bytes.fromhex("84")
        + FIX_V
        + bytes.fromhex("a174 a5") + b"query"
        + bytes.fromhex("a3") + b"seq" + bytes.fromhex("09")
        + bytes.fromhex("a4") + b"what" + bytes.fromhex("a4") + b"info",
    ),
    (
        Answer(seq=9, data={"impl_id": 4, "tas": ["a"]}),
        bytes.fromhex("00000028")
        + bytes.fromhex("84")
        + FIX_V
        + bytes.fromhex("a174 a6") + b"answer"
        + bytes.fromhex("a3") + b"seq" + bytes.fromhex("09")
        + bytes.fromhex("a4") + b"data" + bytes.fromhex("82")
        + bytes.fromhex("a7") + b"impl_id" + bytes.fromhex("04")
        + bytes.fromhex("a3") + b"tas" + bytes.fromhex("91 a1") + b"a",
    ),
    (
        Probe(seq=10, call=9),
        bytes.fromhex("00000017")
        + bytes.fromhex("84")
        + FIX_V
        + bytes.fromhex("a174 a5") + b"probe"
        + bytes.fromhex("a3") + b"seq" + bytes.fromhex("0a")
        + bytes.fromhex("a4") + b"call" + bytes.fromhex("09"),
    ),
    (
        Status(seq=10, call=9, running=True, callback=False, quiet_ms=300),
        bytes.fromhex("00000037")
        + bytes.fromhex("87")
        + FIX_V
        + bytes.fromhex("a174 a6") + b"status"
        + bytes.fromhex("a3") + b"seq" + bytes.fromhex("0a")
        + bytes.fromhex("a4") + b"call" + bytes.fromhex("09")
        + bytes.fromhex("a7") + b"running" + bytes.fromhex("c3")
        + bytes.fromhex("a8") + b"callback" + bytes.fromhex("c2")
        + bytes.fromhex("a8") + b"quiet_ms" + bytes.fromhex("cd 012c"),
    ),
    (
        Bye(reason="é"),
        bytes.fromhex("00000014")
        + bytes.fromhex("83")
        + FIX_V
        + bytes.fromhex("a174 a3") + b"bye"
        + bytes.fromhex("a6") + b"reason" + bytes.fromhex("a2 c3a9"),
    ),
]  # fmt: skip


@pytest.mark.parametrize(("msg", "wire"), GOLDEN, ids=lambda x: type(x).__name__)
def test_golden(msg: Message, wire: bytes) -> None:
    assert int.from_bytes(wire[:4], "big") == len(wire) - 4
    assert encode(msg) == wire
    assert decode_one(wire) == msg


def test_golden_covers_every_kind() -> None:
    assert {type(m) for m, _ in GOLDEN} == {
        Hello,
        Welcome,
        Denied,
        Ioctl,
        RecvNowait,
        IoctlReply,
        Close,
        ShmFd,
        ShmFree,
        Query,
        Answer,
        Probe,
        Status,
        Watch,
        Ready,
        Bye,
    }


def test_frame_error_is_a_decode_error() -> None:
    assert issubclass(FrameError, DecodeError)
    assert PROTOCOL_VERSION == 4
    assert MAX_FRAME == 8 * 1024 * 1024


# --------------------------------------------------------------------------- strategies

text = st.text(st.characters(codec="utf-8"), max_size=12)
u32 = st.integers(0, U32)
small_bytes = st.binary(max_size=24)


@st.composite
def region_sets(draw: st.DrawFn, *, writable: bool | None = None) -> tuple[Region, ...]:
    """Non-overlapping regions, in any order, anywhere below the top of the space."""
    cur = draw(st.one_of(st.just(0), st.integers(0, 2**64 - 2**20), st.just(2**64 - 2**20)))
    out = []
    for _ in range(draw(st.integers(0, 3))):
        addr = cur + draw(st.integers(0, 4096))
        data = draw(small_bytes)
        w = draw(st.booleans()) if writable is None else writable
        out.append(Region(addr=addr, data=data, writable=w))
        cur = addr + len(data)
    return tuple(draw(st.permutations(out)))


hellos = st.builds(Hello, client=text, node=st.sampled_from(["tee", "teepriv"]))
welcomes = st.builds(Welcome, impl_id=u32, gen_caps=u32, server=text)
denials = st.builds(Denied, errno=st.integers(1, MAX_ERRNO), reason=text)
ioctls = st.builds(Ioctl, seq=u32, cmd=u32, arg=small_bytes, regions=region_sets())
nowaits = st.builds(RecvNowait, seq=u32, arg=small_bytes, regions=region_sets())
watches = st.builds(Watch, seq=u32)
readies = st.just(Ready())
replies = st.one_of(
    st.builds(IoctlReply, seq=u32, arg=small_bytes, written=region_sets(writable=True)),
    st.builds(IoctlReply, seq=u32, errno=st.integers(1, MAX_ERRNO)),
)
closes = st.builds(Close, seq=u32)
shm_fds = st.builds(ShmFd, seq=u32, id=st.integers(1, 0x7FFF_FFFF), size=st.integers(0, 2**64 - 1))
shm_frees = st.builds(ShmFree, seq=u32, id=st.integers(1, 0x7FFF_FFFF))
queries = st.builds(Query, seq=u32, what=st.sampled_from(["info", "trace"]))
answers = st.builds(
    Answer,
    seq=u32,
    data=st.dictionaries(text, st.one_of(st.integers(-(2**63), 2**64 - 1), text), max_size=4),
)
probes = st.builds(Probe, seq=u32, call=u32)
statuses = st.one_of(
    st.builds(Status, seq=u32, call=u32, running=st.just(False)),
    st.builds(
        Status,
        seq=u32,
        call=u32,
        running=st.just(True),
        callback=st.booleans(),
        quiet_ms=st.integers(0, 2**64 - 1),
    ),
)
byes = st.builds(Bye, reason=text)
KINDS: dict[str, st.SearchStrategy[Message]] = {
    "hello": hellos,
    "welcome": welcomes,
    "denied": denials,
    "ioctl": ioctls,
    "recv_nowait": nowaits,
    "watch": watches,
    "ready": readies,
    "reply": replies,
    "close": closes,
    "shm": shm_fds,
    "shm_free": shm_frees,
    "query": queries,
    "answer": answers,
    "probe": probes,
    "status": statuses,
    "bye": byes,
}
messages: st.SearchStrategy[Message] = st.one_of(*KINDS.values())


def renumber(msgs: list[Message]) -> list[Message]:
    """Give client requests strictly increasing seqs, as a well-behaved client does."""
    out: list[Message] = []
    for n, m in enumerate(msgs):
        if isinstance(m, Ioctl):
            m = Ioctl(seq=n, cmd=m.cmd, arg=m.arg, regions=m.regions)
        elif isinstance(m, RecvNowait):
            m = RecvNowait(seq=n, arg=m.arg, regions=m.regions)
        elif isinstance(m, Watch):
            m = Watch(seq=n)
        elif isinstance(m, Close):
            m = Close(seq=n)
        elif isinstance(m, ShmFree):
            m = ShmFree(seq=n, id=m.id)
        elif isinstance(m, Query):
            m = Query(seq=n, what=m.what)
        elif isinstance(m, Probe):
            m = Probe(seq=n, call=m.call)
        out.append(m)
    return out


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("kind", sorted(KINDS))
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_round_trip(kind: str, data: st.DataObject) -> None:
    msg = data.draw(KINDS[kind])
    assert kind == msg.KIND
    wire = encode(msg)
    assert decode_one(wire) == msg
    assert from_map(msgpack.unpackb(wire[4:], raw=False)) == msg
    assert type(msg).from_map(msg.to_map()) == msg
    assert hash(msg) == hash(decode_one(wire))


@settings(max_examples=200, deadline=None)
@given(msgs=st.lists(messages, max_size=6), cuts=st.lists(st.integers(0, 2000), max_size=8))
def test_chunking_invariance(msgs: list[Message], cuts: list[int]) -> None:
    msgs = renumber(msgs)
    stream = b"".join(encode(m) for m in msgs)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    chunks = [stream[a:b] for a, b in itertools.pairwise([0, *points, len(stream)])]
    assert run([stream]) == (msgs, None, 0)
    assert run(chunks) == (msgs, None, 0)
    assert run(bytewise(stream)) == (msgs, None, 0)


def test_iteration_drains_complete_frames() -> None:
    d = FrameDecoder()
    requests = Ioctl | Close | ShmFree | Query  # their seqs would have to increase
    wire = b"".join(w for m, w in GOLDEN if not isinstance(m, requests))
    d.feed(wire + b"\x00\x00")
    assert list(d) == [m for m, _ in GOLDEN if not isinstance(m, requests)]
    assert d.buffered == 2 and d.next_message() is None


# --------------------------------------------------------------------------- partial and oversized


@pytest.mark.parametrize(("msg", "wire"), GOLDEN, ids=lambda x: type(x).__name__)
def test_truncated_frames_need_more_data(msg: Message, wire: bytes) -> None:
    for n in range(len(wire)):
        d = FrameDecoder()
        d.feed(wire[:n])
        assert d.next_message() is None
        assert d.next_message() is None  # asking again changes nothing
        assert d.buffered == n and d.error is None
        d.feed(wire[n:])
        assert d.next_message() == msg
        assert d.buffered == 0


def test_oversized_length_fails_before_the_body() -> None:
    d = FrameDecoder()
    d.feed((MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(FrameError, match=r"frame length 8388609 is outside \[1, 8388608\]"):
        d.next_message()
    d = FrameDecoder(max_frame=16)
    d.feed(b"\x00\x00\x00")
    assert d.next_message() is None
    d.feed(b"\x11")
    with pytest.raises(FrameError, match="frame length 17"):
        d.next_message()
    d = FrameDecoder()
    d.feed(b"\xff\xff\xff\xff")
    with pytest.raises(FrameError, match="frame length 4294967295"):
        d.next_message()


def test_zero_length_frame() -> None:
    with pytest.raises(FrameError, match="frame length 0 is outside"):
        decode_one(b"\x00\x00\x00\x00")


def test_frame_exactly_at_the_limit() -> None:
    wire = encode(Bye(reason="x" * 40))
    limit = len(wire) - 4
    assert decode_one(wire, max_frame=limit) == Bye(reason="x" * 40)
    with pytest.raises(FrameError, match="outside"):
        decode_one(wire, max_frame=limit - 1)
    assert encode(Bye(reason="x" * 40), max_frame=limit) == wire
    with pytest.raises(UsageError, match="limit"):
        encode(Bye(reason="x" * 40), max_frame=limit - 1)


def test_default_limit_holds_an_8_mib_frame() -> None:
    big = Ioctl(seq=0, cmd=1, regions=(Region(addr=0, data=bytes(MAX_FRAME - 200)),))
    wire = encode(big)
    assert decode_one(wire) == big
    with pytest.raises(UsageError):
        encode(Ioctl(seq=0, cmd=1, regions=(Region(addr=0, data=bytes(MAX_FRAME)),)))


@pytest.mark.parametrize("bad", [0, -1, 2**32, True, 1.5])
def test_decoder_limit_is_validated(bad: Any) -> None:
    with pytest.raises(UsageError):
        FrameDecoder(max_frame=bad)


# --------------------------------------------------------------------------- garbage bodies

V = {"v": 4}
GOOD_IOCTL: dict[str, Any] = {"v": 4, "t": "ioctl", "seq": 1, "cmd": 2, "arg": b"", "regions": []}
GOOD_REGION: dict[str, Any] = {"addr": 0, "data": b"x", "writable": False}
GOOD_REPLY: dict[str, Any] = {"v": 4, "t": "reply", "seq": 1, "errno": 0, "arg": b"", "written": []}


def ioctl_with(**kw: Any) -> dict[str, Any]:
    return {**GOOD_IOCTL, **kw}


def region_with(**kw: Any) -> dict[str, Any]:
    return ioctl_with(regions=[{**GOOD_REGION, **kw}])


GARBAGE: list[tuple[str, bytes, str]] = [
    # not a map at all
    ("array", packed([1, 2]), "is a msgpack list, not a map"),
    ("int", packed(5), "is a msgpack int, not a map"),
    ("str", packed("hello"), "is a msgpack str, not a map"),
    ("nil", packed(None), "not a map"),
    ("bin", packed(b"\x83"), "not a map"),
    ("reserved byte", frame(b"\xc1"), "not one msgpack value"),
    ("truncated map", frame(b"\x83\xa1v"), "not one msgpack value"),
    ("trailing data", frame(msgpack.packb({"v": 4, "t": "close", "seq": 1}) + b"\x00"), "one"),
    ("int key", frame(b"\x81\x01\x01"), "not one msgpack value"),
    ("bad utf-8", frame(b"\x81\xa2\xff\xfe\x01"), "not one msgpack value"),
    ("too deep", frame(b"\x91" * 5000), "not one msgpack value"),
    ("duplicate key", frame(b"\x83\xa1v\x01\xa1v\x01\xa1t\xa3bye"), "duplicated key"),
    # version
    ("no version", packed({"t": "close", "seq": 1}), "no protocol version"),
    ("version 1", packed({"v": 1, "t": "close", "seq": 1}), "protocol version 1"),
    ("version 2", packed({"v": 2, "t": "close", "seq": 1}), "protocol version 2"),
    ("version 0", packed({"v": 0, "t": "close", "seq": 1}), "protocol version 0"),
    ("version true", packed({"v": True, "t": "close", "seq": 1}), "protocol version True"),
    ("version str", packed({"v": "1", "t": "close", "seq": 1}), "protocol version '1'"),
    ("version float", packed({"v": 1.0, "t": "close", "seq": 1}), "protocol version 1.0"),
    # type tag
    ("no type", packed({"v": 4, "seq": 1}), "unknown message type None"),
    ("unknown type", packed({"v": 4, "t": "shm_alloc"}), "unknown message type 'shm_alloc'"),
    ("bin type", packed({"v": 4, "t": b"close", "seq": 1}), "unknown message type b'close'"),
    # keys
    ("missing key", packed({"v": 4, "t": "close"}), r"missing keys \['seq'\]"),
    ("unknown key", packed({"v": 4, "t": "close", "seq": 1, "x": 0}), r"unknown keys \["),
    ("bin key", packed({"v": 4, "t": "close", b"seq": 1}), r"unknown keys \[b'seq'\]"),
    ("ioctl extra", packed(ioctl_with(fd=3)), "unknown keys"),
    ("region missing", packed(ioctl_with(regions=[{"addr": 0, "data": b""}])), "missing keys"),
    ("region extra", packed(region_with(len=1)), "unknown keys"),
    # field types and ranges
    ("seq negative", packed(ioctl_with(seq=-1)), "Ioctl.seq"),
    ("seq > u32", packed(ioctl_with(seq=2**32)), "Ioctl.seq"),
    ("seq bool", packed(ioctl_with(seq=True)), "Ioctl.seq"),
    ("seq float", packed(ioctl_with(seq=1.0)), "Ioctl.seq"),
    ("cmd str", packed(ioctl_with(cmd="2")), "Ioctl.cmd"),
    ("cmd > u32", packed(ioctl_with(cmd=2**64 - 1)), "Ioctl.cmd"),
    ("cmd i64 min", packed(ioctl_with(cmd=-(2**63))), "Ioctl.cmd"),
    ("arg str", packed(ioctl_with(arg="abc")), "Ioctl.arg must be bytes, not str"),
    ("arg nil", packed(ioctl_with(arg=None)), "Ioctl.arg"),
    ("arg ext", packed(ioctl_with(arg=msgpack.ExtType(1, b"a"))), "Ioctl.arg"),
    ("regions map", packed(ioctl_with(regions={})), "expected an array"),
    ("regions bin", packed(ioctl_with(regions=b"")), "expected an array"),
    ("region not map", packed(ioctl_with(regions=[1])), "region: expected a map"),
    ("region addr neg", packed(region_with(addr=-1)), "Region.addr"),
    ("region addr str", packed(region_with(addr="0")), "Region.addr"),
    ("region data str", packed(region_with(data="x")), "Region.data"),
    ("region writable int", packed(region_with(writable=1)), "Region.writable"),
    ("region wraps", packed(region_with(addr=U64, data=b"ab")), "wraps"),
    (
        "regions overlap",
        packed(ioctl_with(regions=[{**GOOD_REGION, "data": b"ab"}, {**GOOD_REGION, "addr": 1}])),
        "overlap",
    ),
    (
        "hello client bin",
        packed({"v": 4, "t": "hello", "client": b"c", "node": "tee"}),
        "Hello.client",
    ),
    ("hello no node", packed({"v": 4, "t": "hello", "client": "c"}), r"missing keys \['node'\]"),
    (
        "hello node",
        packed({"v": 4, "t": "hello", "client": "c", "node": "tee1"}),
        "Hello.node must be one of",
    ),
    ("denied errno 0", packed({"v": 4, "t": "denied", "errno": 0, "reason": ""}), "Denied.errno"),
    ("ready extra", packed({"v": 4, "t": "ready", "seq": 1}), r"unknown keys \['seq'\]"),
    (
        "recv_nowait cmd",
        packed({"v": 4, "t": "recv_nowait", "seq": 1, "cmd": 0, "arg": b"", "regions": []}),
        r"unknown keys \['cmd'\]",
    ),
    (
        "welcome impl neg",
        packed({"v": 4, "t": "welcome", "impl_id": -1, "gen_caps": 0, "server": ""}),
        "Welcome.impl_id",
    ),
    ("bye reason int", packed({"v": 4, "t": "bye", "reason": 0}), "Bye.reason"),
    ("reply errno neg", packed({**GOOD_REPLY, "errno": -22}), "IoctlReply.errno"),
    ("reply errno big", packed({**GOOD_REPLY, "errno": MAX_ERRNO + 1}), "IoctlReply.errno"),
    ("reply fail arg", packed({**GOOD_REPLY, "errno": 22, "arg": b"x"}), "must not write"),
    (
        "reply fail written",
        packed({**GOOD_REPLY, "errno": 14, "written": [{**GOOD_REGION, "writable": True}]}),
        "must not write",
    ),
    (
        "reply writes read-only",
        packed({**GOOD_REPLY, "written": [GOOD_REGION]}),
        "is not writable",
    ),
    ("close seq nil", packed({"v": 4, "t": "close", "seq": None}), "Close.seq"),
]


@pytest.mark.parametrize(("body", "match"), [g[1:] for g in GARBAGE], ids=[g[0] for g in GARBAGE])
def test_garbage_bodies(body: bytes, match: str) -> None:
    d = FrameDecoder()
    d.feed(body)
    with pytest.raises(FrameError, match=match) as info:
        d.next_message()
    # Dead: every later call raises the very same error, and the buffer is gone.
    with pytest.raises(FrameError) as again:
        d.next_message()
    assert again.value is info.value
    with pytest.raises(FrameError) as fed:
        d.feed(GOLDEN[0][1])
    assert fed.value is info.value
    assert d.error is info.value and d.buffered == 0


def test_good_fixtures_are_good() -> None:
    assert decode_one(packed(GOOD_IOCTL)) == Ioctl(seq=1, cmd=2)
    assert decode_one(packed(region_with())) == Ioctl(
        seq=1, cmd=2, regions=(Region(addr=0, data=b"x"),)
    )
    assert decode_one(packed(GOOD_REPLY)) == IoctlReply(seq=1)


def test_messages_before_an_error_are_delivered() -> None:
    good = encode(Close(seq=1))
    msgs, err, _ = run([good + packed([1]) + good])
    assert msgs == [Close(seq=1)]
    assert err is not None and "not a map" in err


def test_from_map_checks_the_type_tag() -> None:
    with pytest.raises(FrameError, match="type tag"):
        Close.from_map({"v": 4, "t": "bye", "seq": 1})
    with pytest.raises(FrameError, match="protocol version"):
        Close.from_map({"v": 1, "t": "close", "seq": 1})


# --------------------------------------------------------------------------- sequence rule


def test_seq_strictly_increasing_over_requests() -> None:
    ok: list[Message] = [Hello(client="c"), Ioctl(seq=1, cmd=0), Ioctl(seq=5, cmd=0), Close(seq=6)]
    assert run([b"".join(encode(m) for m in ok)]) == (ok, None, 0)
    for bad_seq in (5, 4, 0):
        stream: list[Message] = [*ok[:3], Ioctl(seq=bad_seq, cmd=0)]
        msgs, err, _ = run([b"".join(encode(m) for m in stream)])
        assert msgs == ok[:3]
        assert err == f"ioctl seq {bad_seq} out of order (last 5)"
    msgs, err, _ = run([encode(Ioctl(seq=3, cmd=0)) + encode(Close(seq=3))])
    assert err == "close seq 3 out of order (last 3)"
    msgs, err, _ = run([encode(Ioctl(seq=3, cmd=0)) + encode(Probe(seq=2, call=3))])
    assert err == "probe seq 2 out of order (last 3)"


def test_seq_rule_can_be_turned_off_and_ignores_replies() -> None:
    stream: list[Message] = [Ioctl(seq=3, cmd=0), Ioctl(seq=3, cmd=0), Close(seq=1)]
    wire = b"".join(encode(m) for m in stream)
    assert run([wire], expect_increasing_seq=False) == (stream, None, 0)
    replies: list[Message] = [IoctlReply(seq=2), IoctlReply(seq=1), IoctlReply(seq=1, errno=5)]
    assert run([b"".join(encode(m) for m in replies)]) == (replies, None, 0)


def test_last_seq() -> None:
    d = FrameDecoder()
    assert d.last_seq is None
    d.feed(encode(Ioctl(seq=9, cmd=0)) + encode(Bye()))
    list(d)
    assert d.last_seq == 9


# --------------------------------------------------------------------------- building records


@pytest.mark.parametrize(
    "build",
    [
        lambda: Hello(client=b"x"),  # type: ignore[arg-type]
        lambda: Hello(client="\ud800"),
        lambda: Hello(client="x", version=1),
        lambda: Welcome(impl_id=2**32, gen_caps=0, server=""),
        lambda: Ioctl(seq=-1, cmd=0),
        lambda: Ioctl(seq=0, cmd=0, arg="x"),  # type: ignore[arg-type]
        lambda: Ioctl(seq=0, cmd=0, regions=(b"x",)),  # type: ignore[arg-type]
        lambda: Ioctl(seq=0, cmd=0, regions=Region(addr=0, data=b"")),  # type: ignore[arg-type]
        lambda: Ioctl(
            seq=0,
            cmd=0,
            regions=(Region(addr=10, data=b"abc"), Region(addr=0, data=b"x" * 11)),
        ),
        lambda: Region(addr=U64, data=b"xy"),
        lambda: Region(addr=0, data=b"", writable=1),  # type: ignore[arg-type]
        lambda: IoctlReply(seq=0, errno=-1),
        lambda: IoctlReply(seq=0, errno=1, arg=b"x"),
        lambda: IoctlReply(seq=0, written=(Region(addr=0, data=b"x"),)),
        lambda: Close(seq=True),
        lambda: Bye(reason=None),  # type: ignore[arg-type]
    ],
)
def test_bad_records_raise_usage_error(build: Any) -> None:
    with pytest.raises(UsageError):
        build()


def test_records_normalise_and_freeze() -> None:
    io = Ioctl(
        seq=0,
        cmd=0,
        arg=bytearray(b"ab"),  # type: ignore[arg-type]
        regions=[Region(addr=0, data=memoryview(b"c"))],  # type: ignore[arg-type]
    )
    assert type(io.arg) is bytes and io.regions == (Region(addr=0, data=b"c"),)
    assert Region(addr=U64, data=b"x").end == 2**64  # the last byte of the space is usable
    assert Ioctl(seq=0, cmd=0, regions=(Region(addr=5, data=b""), Region(addr=4, data=b"ab")))
    with pytest.raises(AttributeError):
        io.seq = 1  # type: ignore[misc]
    with pytest.raises(UsageError, match="not a frame message"):
        encode(Region(addr=0, data=b""))  # type: ignore[arg-type]
    d = FrameDecoder()
    with pytest.raises(UsageError):
        d.feed("text")  # type: ignore[arg-type]
    assert d.error is None  # a caller's mistake does not kill the connection


def test_check_reply() -> None:
    req = Ioctl(
        seq=4,
        cmd=1,
        regions=(Region(addr=0x100, data=bytes(16), writable=True), Region(addr=0x200, data=b"r")),
    )
    check_reply(req, IoctlReply(seq=4, written=(Region(addr=0x108, data=bytes(8), writable=True),)))
    check_reply(req, IoctlReply(seq=4, errno=22))
    with pytest.raises(FrameError, match="expected 4"):
        check_reply(req, IoctlReply(seq=5))
    for addr, size in ((0x10C, 8), (0x200, 1), (0xF0, 1)):
        bad = IoctlReply(seq=4, written=(Region(addr=addr, data=bytes(size), writable=True),))
        with pytest.raises(FrameError, match="outside the writable regions"):
            check_reply(req, bad)
    with pytest.raises(FrameError, match="2-byte arg, the request 0 bytes"):
        check_reply(req, IoctlReply(seq=4, arg=b"ab"))
    req = Ioctl(seq=5, cmd=1, arg=bytes(16))
    check_reply(req, IoctlReply(seq=5, arg=bytes(16)))
    check_reply(req, IoctlReply(seq=5, errno=14))  # a failed call carries nothing back
    with pytest.raises(FrameError, match="15-byte arg, the request 16 bytes"):
        check_reply(req, IoctlReply(seq=5, arg=bytes(15)))


def test_refusals() -> None:
    answer = refusal(3, 13, "introspection is off")
    assert answer == Answer(seq=3, data={"errno": 13, "reason": "introspection is off"})
    assert refused(answer.data) == (13, "introspection is off")
    for data in ({}, {"errno": 13}, {"errno": 0, "reason": ""}, {"errno": "13", "reason": ""}):
        assert refused(data) is None
    assert refused({"streaming": True}) is None
    for code in (0, 4096, True):
        with pytest.raises(UsageError):
            refusal(1, code, "x")


def test_status_rules() -> None:
    with pytest.raises(UsageError, match="waits on no callback"):
        Status(seq=1, call=1, running=False, callback=True)
    with pytest.raises(UsageError, match=r"Status\.running"):
        Status(seq=1, call=1, running=1)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- fuzz

MUTATION = st.tuples(
    st.sampled_from(["flip", "set", "insert", "delete", "truncate", "length"]),
    st.integers(0, 10_000),
    st.integers(0, 255),
    st.binary(min_size=1, max_size=8),
)


def mutate(data: bytes, ops: list[tuple[str, int, int, bytes]]) -> bytes:
    buf = bytearray(data)
    for op, pos, val, blob in ops:
        i = pos % (len(buf) + 1)
        if op == "flip" and buf:
            buf[i % len(buf)] ^= 1 << (val & 7)
        elif op == "set" and buf:
            buf[i % len(buf)] = val
        elif op == "insert":
            buf[i:i] = blob
        elif op == "delete":
            del buf[i : i + 1 + val % 8]
        elif op == "truncate":
            del buf[i:]
        elif op == "length" and len(buf) >= 4:
            # rewrite the first length word to something near the real size
            n = int.from_bytes(buf[:4], "big") + (val - 128)
            buf[:4] = (n % 2**32).to_bytes(4, "big")
    return bytes(buf)


# A fixed pool keeps generation cheap (the round-trip tests cover random messages).
POOL = [
    *(w for _, w in GOLDEN),
    b"".join(w for _, w in GOLDEN),  # every kind, requests in increasing seq order
    encode(Ioctl(seq=2, cmd=3, regions=(Region(addr=2**64 - 3, data=b"abc", writable=True),))),
    encode(IoctlReply(seq=9, written=(Region(addr=0, data=b"", writable=True),))),
]
valid_streams = st.sampled_from(POOL)
fuzz_inputs = st.one_of(
    st.binary(max_size=64),
    st.binary(max_size=64).map(frame),
    st.tuples(valid_streams, st.lists(MUTATION, min_size=1, max_size=4)).map(lambda t: mutate(*t)),
)


@settings(
    max_examples=10_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=fuzz_inputs, max_frame=st.sampled_from([MAX_FRAME, 64]))
def test_fuzz_decoder(data: bytes, max_frame: int) -> None:
    whole = run([data], max_frame=max_frame)  # FrameError is the only exception that may escape
    assert run(bytewise(data), max_frame=max_frame) == whole
    msgs, err, left = whole
    for m in msgs:  # whatever decoded is a valid message that survives a round trip
        assert decode_one(encode(m), expect_increasing_seq=False) == m
    assert err is not None or left < len(data) + 1


# --------------------------------------------------------------------------- the call fast paths


@settings(max_examples=300, deadline=None)
@given(msg=st.one_of(ioctls, replies))
def test_fast_encoders_write_the_same_bytes(msg: Ioctl | IoctlReply) -> None:
    """encode_call/encode_reply (no records built) == encode() of the record."""
    if isinstance(msg, Ioctl):
        regions = [(r.addr, r.data, r.writable) for r in msg.regions]
        assert encode_call(msg.seq, msg.cmd, msg.arg, regions) == encode(msg)
    else:
        written = [(r.addr, r.data) for r in msg.written]
        assert encode_reply(msg.seq, msg.errno, msg.arg, written) == encode(msg)


def _variants(m: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """The map of a call frame with one field or region field replaced by anything."""
    anything = st.one_of(
        st.none(), st.booleans(), st.integers(-(2**64), 2**65), st.binary(max_size=4), text,
        st.lists(st.integers(), max_size=2), st.just([{"addr": 1, "data": b"", "writable": 1}]),
        st.just([{"addr": 2**64, "data": b"", "writable": True}]),
        st.just([{"addr": 2**64 - 1, "data": b"ab", "writable": True}]),
        st.just([{"addr": 0, "data": b"ab", "writable": False}]),
        st.just([{"addr": 0, "data": b"ab", "writable": True},
                 {"addr": 1, "data": b"c", "writable": True}]),
    )  # fmt: skip
    keys = sorted(m)
    return st.tuples(st.sampled_from(keys), anything).map(lambda kv: {**m, kv[0]: kv[1]})


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_the_fast_decoder_agrees_with_the_general_one(data: st.DataObject) -> None:
    """For call frames, mangled or not, the fast path decodes exactly what the general
    path decodes and refuses (falls back on) everything it refuses."""
    msg = data.draw(st.one_of(ioctls, replies))
    m = msg.to_map()
    if data.draw(st.booleans()):
        m = data.draw(_variants(m))
    cls = Ioctl if m["t"] == "ioctl" else IoctlReply
    try:
        expected: object = cls.from_map(dict(m))
    except FrameError as exc:
        expected = type(exc)
    try:
        got: object = from_map(dict(m))
    except FrameError as exc:
        got = type(exc)
    assert got == expected


def _general(body: bytes) -> object:
    """What the general path (dict maps, records' from_map) makes of a frame body."""
    try:
        return from_map(_unpack(memoryview(body)))
    except FrameError as exc:
        return type(exc)


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_the_pairs_decoder_agrees_with_the_general_one(data: st.DataObject) -> None:
    """The decoder's first try (maps as msgpack pairs, keys in the encoder's order) gives
    exactly the record the general path gives, for call frames mangled or not, with their
    keys in the encoder's order or shuffled, and refuses what the general path refuses
    (the protocol: a map holds exactly its kind's keys, in any order)."""
    msg = data.draw(st.one_of(ioctls, replies))
    m = msg.to_map()
    if data.draw(st.booleans()):
        m = data.draw(_variants(m))
    if data.draw(st.booleans()):
        m = dict(data.draw(st.permutations(list(m.items()))))
    try:
        body = msgpack.packb(m, use_bin_type=True)
    except OverflowError:  # an int msgpack cannot carry: no frame to decode
        return
    dec = FrameDecoder(expect_increasing_seq=False)
    dec.feed(len(body).to_bytes(4, "big") + body)
    try:
        got: object = dec.next_message()
    except FrameError as exc:
        got = type(exc)
    assert got == _general(body)


def test_the_pairs_decoder_leaves_duplicated_keys_to_the_general_path() -> None:
    """A region map with a key twice is an error, whatever the order (frames docstring:
    a duplicated key is an error)."""
    region = b"\x84\xa4addr\x00\xa4data\xc4\x00\xa8writable\xc3\xa4addr\x00"
    body = (
        b"\x86\xa1v" + bytes([PROTOCOL_VERSION]) + b"\xa1t\xa5ioctl\xa3seq\x01\xa3cmd\x02"
        b"\xa3arg\xc4\x00\xa7regions\x91" + region
    )
    dec = FrameDecoder()
    dec.feed(len(body).to_bytes(4, "big") + body)
    with pytest.raises(FrameError, match="duplicated key"):
        dec.next_message()


@settings(max_examples=100, deadline=None)
@given(msgs=st.lists(messages, max_size=6), cuts=st.lists(st.integers(0, 2000), max_size=8))
def test_feed_next_is_feed_then_next_message(msgs: list[Message], cuts: list[int]) -> None:
    """feed_next(chunk) (the readers' one call per read) hands out the same messages, in
    any chunking, as feed then next_message; feed_next() with no bytes is next_message."""
    msgs = renumber(msgs)
    stream = b"".join(encode(m) for m in msgs)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    dec = FrameDecoder()
    got: list[Message] = []
    for a, b in itertools.pairwise([0, *points, len(stream)]):
        msg = dec.feed_next(stream[a:b])
        while msg is not None:
            got.append(msg)
            msg = dec.feed_next()
    assert got == msgs and dec.buffered == 0
    with pytest.raises(UsageError, match="feed takes bytes"):
        dec.feed_next("ab")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "change",
    [
        {"regions": [{"addr": 0, "data": b"ab", "writable": True},
                     {"addr": 1, "data": b"c", "writable": False}]},
        {"seq": True},
        {"cmd": -1},
        {"arg": "text"},
        {"regions": [{"addr": 2**64 - 1, "data": b"ab", "writable": True}]},
        {"regions": [{"addr": 0, "data": b"", "writable": 1}]},
        {"v": PROTOCOL_VERSION + 1},
    ],
)  # fmt: skip
def test_the_pairs_decoder_refuses_what_the_general_path_refuses(change: dict[str, Any]) -> None:
    """An ioctl frame in the encoder's key order with one bad field (overlapping regions,
    a bool seq, a negative cmd, a str arg, a region past 2**64, a non-bool writable, another
    version) is a FrameError, as the general path says (frames docstring: the field
    types and ranges; regions are disjoint)."""
    m = {**Ioctl(seq=1, cmd=2).to_map(), **change}
    body = msgpack.packb(m, use_bin_type=True)
    dec = FrameDecoder()
    dec.feed(len(body).to_bytes(4, "big") + body)
    with pytest.raises(FrameError):
        dec.next_message()
