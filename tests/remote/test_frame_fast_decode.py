"""The call frames' fast decode: a call frame with its keys in the encoder's order is
decoded in one pass; any other is left to the general path, which decodes the same record
or names the error."""

from __future__ import annotations

from collections.abc import Iterator

import msgpack
import pytest
from hypothesis import given, settings

from qtee._remote.frames import (
    MAX_ERRNO,
    PROTOCOL_VERSION,
    FrameDecoder,
    FrameError,
    Ioctl,
    IoctlReply,
    Region,
    _decode_call,
    _unpack,
    encode,
    encode_call,
    from_map,
)
from tests.remote.test_frames import ioctls, replies

_HEAD = b"\xa1v" + bytes([PROTOCOL_VERSION]) + b"\xa1t\xa5ioctl"
_REST = b"\xa3seq\x01\xa3cmd\x02\xa3arg\xc4\x01x\xa7regions\x91"
_REGION = b"\x83\xa4addr\x10\xa4data\xc4\x02ab\xa8writable\xc3"
_EXPECTED = Ioctl(seq=1, cmd=2, arg=b"x", regions=(Region(addr=16, data=b"ab", writable=True),))


def _decoded(body: bytes) -> object:
    dec = FrameDecoder()
    return dec.feed_next(len(body).to_bytes(4, "big") + body)


@settings(max_examples=200, deadline=None)
@given(msg=ioctls | replies)
def test_the_encoders_frames_take_the_fast_path(msg: Ioctl | IoctlReply) -> None:
    """Every call frame the encoder writes is decoded by the fast path itself, to the record
    it was encoded from (frames docstring: a message has one encoding)."""
    body = encode(msg)[4:]
    assert _decode_call(bytearray(body)) == msg


@pytest.mark.parametrize(
    "body",
    [
        b"\x86" + _HEAD + b"\xa3seq\xce\x00\x00\x00\x01" + _REST[5:] + _REGION,  # u32 for 1
        b"\xde\x00\x06" + _HEAD + _REST + _REGION,  # a map16 header for 6 keys
        b"\x86" + _HEAD + _REST[:-1] + b"\xdc\x00\x01" + _REGION,  # an array16 of 1
        b"\x86" + _HEAD.replace(b"\xa1t", b"\xd9\x01t") + _REST + _REGION,  # a str8 key
    ],
)
def test_longer_encodings_in_the_encoders_order_take_the_fast_path(body: bytes) -> None:
    """The same ioctl map with a longer int, map, array or str encoding is the same record,
    from the fast path as from the general one (msgpack: any encoding of a value)."""
    assert _decode_call(bytearray(body)) == _EXPECTED
    assert from_map(_unpack(bytearray(body))) == _EXPECTED


@pytest.mark.parametrize(
    "body",
    [
        b"\x86" + _HEAD + _REST + b"\x83\xa4data\xc4\x02ab\xa4addr\x10\xa8writable\xc3",
        b"\x86" + _HEAD[3:] + _HEAD[:3] + _REST + _REGION,  # t before v
    ],
)
def test_other_key_orders_are_left_to_the_general_path(body: bytes) -> None:
    """A valid ioctl frame whose keys are not in the encoder's order is not the fast
    path's (None), and the decoder still hands out the same record (frames docstring: a
    map holds its kind's keys, in any order)."""
    assert _decode_call(bytearray(body)) is None
    assert _decoded(body) == _EXPECTED


def test_a_duplicated_key_is_left_to_the_general_path() -> None:
    """A top-level key twice (seven pairs) is not the fast path's; the decoder refuses it
    (frames docstring: a duplicated key is an error)."""
    body = b"\x87" + _HEAD + _REST[:5] + _REST + _REGION
    assert _decode_call(bytearray(body)) is None
    with pytest.raises(FrameError, match="duplicated key"):
        _decoded(body)


@pytest.mark.parametrize(
    ("spans", "overlap"),
    [
        (((0x10, 4), (0x14, 4)), False),  # adjacent
        (((0x14, 4), (0x10, 4)), False),  # adjacent, the higher first
        (((0x10, 4), (0x13, 4)), True),
        (((0x13, 4), (0x10, 4)), True),
        (((0x10, 8), (0x12, 2)), True),  # one inside the other
        (((0x10, 8), (0x12, 0)), False),  # an empty one overlaps nothing
        (((0x12, 0), (0x10, 8)), False),
        (((0x10, 0), (0x10, 0)), False),
        (((0x10, 4), (0x20, 4), (0x13, 2)), True),
        (((0x10, 4), (0x20, 4), (0x14, 12)), False),
    ],
)
def test_overlapping_regions_are_refused_on_both_paths(
    spans: tuple[tuple[int, int], ...], overlap: bool
) -> None:
    """Two or three regions, in any order: the fast path refuses overlapping ones, as the
    general path does (frames docstring: regions are disjoint), and takes the others."""
    regions = [{"addr": a, "data": bytes(n), "writable": True} for a, n in spans]
    m = {"v": PROTOCOL_VERSION, "t": "ioctl", "seq": 1, "cmd": 2, "arg": b"", "regions": regions}
    body = msgpack.packb(m)
    if overlap:
        assert _decode_call(bytearray(body)) is None
        with pytest.raises(FrameError, match="overlap"):
            _decoded(body)
    else:
        assert _decode_call(bytearray(body)) == _decoded(body) == from_map(m)


def _as_array(pairs: bytes, n: int) -> bytes:
    """``n`` key/value pairs written as an array of two-element arrays, not as a map."""
    return bytes([0x90 | n]) + pairs


def _pairs_of(encoded_pairs: list[bytes]) -> bytes:
    return b"".join(b"\x92" + p for p in encoded_pairs)


_HEAD_PAIRS = [b"\xa1v" + bytes([PROTOCOL_VERSION]), b"\xa1t\xa5ioctl"]
_REST_PAIRS = [b"\xa3seq\x01", b"\xa3cmd\x02", b"\xa3arg\xc4\x01x"]
_REGION_PAIRS = [b"\xa4addr\x10", b"\xa4data\xc4\x02ab", b"\xa8writable\xc3"]


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (  # the frame itself an array of [key, value] arrays
            _as_array(_pairs_of([*_HEAD_PAIRS, *_REST_PAIRS, b"\xa7regions\x91" + _REGION]), 6),
            "is a msgpack list, not a map",
        ),
        (  # a region an array of [key, value] arrays
            b"\x86" + _HEAD + _REST + _as_array(_pairs_of(_REGION_PAIRS), 3),
            "region",
        ),
    ],
)
def test_arrays_of_pairs_are_not_maps(body: bytes, error: str) -> None:
    """A frame, or a region, written as an array of ``[key, value]`` pairs is no map: the
    fast path leaves it (None) and the decoder refuses it (frames docstring: a frame body
    is one msgpack map; a region is a map of addr, data, writable)."""
    assert _decode_call(bytearray(body)) is None
    with pytest.raises(FrameError, match=error):
        _decoded(body)


def _outcome(dec: FrameDecoder, chunks: list[bytes | bytearray]) -> list[object]:
    """What a decoder hands out for ``chunks``: each message, or the error that killed it."""
    out: list[object] = []
    for chunk in chunks:
        try:
            msg = dec.feed_next(chunk)
            while msg is not None:
                out.append(msg)
                msg = dec.feed_next()
        except FrameError as exc:
            out.append(("error", str(exc)))
            break
    out.append(("buffered", dec.buffered, dec.last_seq))
    return out


def _frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


@settings(max_examples=100, deadline=None)
@given(first=ioctls, second=ioctls)
def test_a_read_of_one_whole_frame_decodes_as_the_buffered_path(
    first: Ioctl, second: Ioctl
) -> None:
    """A ``bytes`` chunk that is exactly one frame is decoded without the buffer; the
    messages, the seq check and the errors are those of the same bytes fed as a bytearray
    or a byte at a time (which go through the buffer)."""
    frames = [encode(first), encode(second)]
    whole = list(frames)
    for chunks in ([bytearray(f) for f in frames], [bytes([b]) for f in frames for b in f]):
        assert _outcome(FrameDecoder(), whole) == _outcome(FrameDecoder(), chunks)


@pytest.mark.parametrize(
    ("chunk", "max_frame"),
    [
        (_frame(b"\x86" + _HEAD + _REST + _REGION), 16),  # over max_frame, whole
        (_frame(b"\xc1"), 1 << 20),  # not msgpack
        (_frame(b"\x86" + _HEAD + _REST + _REGION) + b"\x00", 1 << 20),  # a byte more
        (_frame(b"\x86" + _HEAD + _REST + _REGION)[:-1], 1 << 20),  # a byte short
        (b"\x00\x00\x00\x00", 1 << 20),  # length 0
        (b"\x00\x00\x00\x00\x90", 1 << 20),  # length 0 and a byte
    ],
)
def test_whole_frame_reads_refuse_as_the_buffered_path(chunk: bytes, max_frame: int) -> None:
    """A frame over ``max_frame``, a bad body, a chunk a byte longer or shorter than its
    frame: the same verdict from one ``bytes`` read as from the buffered path."""
    fast = _outcome(FrameDecoder(max_frame=max_frame), [chunk])
    slow = _outcome(FrameDecoder(max_frame=max_frame), [bytearray(chunk)])
    assert fast == slow


def test_a_whole_frame_read_checks_the_seq_order() -> None:
    """The seq of a request decoded from a whole-frame read is checked and recorded."""
    body = b"\x86" + _HEAD + _REST + _REGION
    dec = FrameDecoder()
    assert dec.feed_next(_frame(body)) == _EXPECTED
    assert dec.last_seq == 1
    with pytest.raises(FrameError, match="out of order"):
        dec.feed_next(_frame(body))


def _general_or_error(body: bytes) -> object:
    """What the general path (dict maps, the records' from_map) makes of a frame body."""
    try:
        return from_map(_unpack(body))
    except FrameError as exc:
        return type(exc)


_OTHERS: list[object] = [None, -1, 2**64 - 1, 1.5, b"", "", [], {}]


def _near(value: object) -> list[object]:
    """Values next to ``value`` that a check must tell apart from it (a bool for an int
    and an int for a bool, a float of the same value, the ends of the ranges, text for
    bytes, an array of [key, value] pairs for a map), then values of every other type."""
    if isinstance(value, bool):
        near: list[object] = [not value, int(value), float(value)]
    elif isinstance(value, int):
        near = [-1, 2**32 - 1, 2**32, MAX_ERRNO, MAX_ERRNO + 1, float(value), value == 1]
        near += [2**63 - 1, 2**63, 2**64 - 2]  # (an addr: the ends of the fast range test)
    elif isinstance(value, bytes):
        near = [value.decode("latin-1"), list(value)]
    elif isinstance(value, str):
        near = [value.encode(), value + "x"]
    elif isinstance(value, dict):
        near = [[[k, v] for k, v in value.items()], dict(reversed(value.items()))]
    else:
        near = [tuple(value) if isinstance(value, list) else value]
    return near + _OTHERS


def _changes(m: object) -> Iterator[object]:
    """``m`` with one value in it, anywhere (a field, a region, a region's field, the map
    itself), replaced by each of its :func:`_near` values in turn."""
    yield from _near(m)
    if isinstance(m, dict):
        for key, value in m.items():
            for new in _changes(value):
                yield {**m, key: new}
    elif isinstance(m, list):
        for k, value in enumerate(m):
            for new in _changes(value):
                yield [*m[:k], new, *m[k + 1 :]]


@settings(max_examples=150, deadline=None)
@given(msg=ioctls | replies)
def test_the_fast_path_gives_the_general_paths_record_or_none(msg: Ioctl | IoctlReply) -> None:
    """For a call frame with any one value in it changed to one next to it (a float
    version, a bool seq, an errno past MAX_ERRNO, a non-bool or false writable, a region
    as an array of pairs ...), the fast path's answer is None or exactly the general
    path's record: never one the general path refuses or builds otherwise (frames
    docstring: the field types and ranges)."""
    for m in _changes(msg.to_map()):
        try:
            body = msgpack.packb(m, use_bin_type=True)
        except (OverflowError, TypeError):
            continue
        fast = _decode_call(body)
        if fast is not None:
            general = _general_or_error(body)
            assert fast == general and type(fast) is type(general), m


def test_fast_records_are_the_records_themselves() -> None:
    """A record from the fast path is of the record's class, frozen, hashed and compared
    as one built by its constructor (the records: frozen, slotted)."""
    body = b"\x86" + _HEAD + _REST + _REGION
    fast = _decode_call(body)
    assert type(fast) is Ioctl and type(fast.regions[0]) is Region
    assert fast == _EXPECTED and hash(fast) == hash(_EXPECTED)
    with pytest.raises(AttributeError):
        fast.seq = 2  # type: ignore[misc]
    with pytest.raises(AttributeError):
        fast.regions[0].addr = 0  # type: ignore[misc]
    reply = _decode_call(encode(IoctlReply(seq=3, arg=b"a"))[4:])
    assert type(reply) is IoctlReply and reply.why is None
    assert reply == IoctlReply(seq=3, arg=b"a")


@pytest.mark.parametrize("region", [(16, b"ab"), (16, b"ab", True, 0)])
def test_encode_call_takes_regions_of_three_fields(region: tuple[object, ...]) -> None:
    """A region of two or four fields is the caller's error (ValueError, as unpacking it
    into addr, data, writable gives), not a frame with a key missing or dropped."""
    with pytest.raises(ValueError):
        encode_call(1, 2, b"", [region])  # type: ignore[list-item]
