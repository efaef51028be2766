"""Properties of the QTEE transport codec (qtee/wire.py; spec §3.2-§3.5).

Round trips build messages from random shapes and check every header word against a
layout computed here from the spec (not from the codec): payloads start at
``align8(header + 8n)``, each IB then each OB takes ``align8(size)`` bytes.  The fuzz
tests feed the decoders random and mutated bytes: they may only return a well-formed
result or raise :class:`objects.DecodeError`.
"""

from __future__ import annotations

import array
import itertools
import random
import struct
from typing import NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from objects import DecodeError, UsageError
from qtee.wire import (
    ASYNC_STOP_END,
    ASYNC_STOP_OP,
    ASYNC_STOP_VERSION,
    MAX_INBOUND_BUFFER_SIZE,
    MAX_OUTBOUND_BUFFER_SIZE,
    QCOMTEE_ASYNC_VERSION_1_0,
    QCOMTEE_ASYNC_VERSION_1_1,
    QCOMTEE_ASYNC_VERSION_1_2,
    AsyncBatch,
    BufRef,
    CallbackMsg,
    CallbackResponse,
    InvokeMsg,
    InvokeResponse,
    MessageTooLarge,
    async_offset,
    callback_size,
    clear_async,
    decode_async,
    decode_callback,
    decode_callback_response,
    decode_invoke,
    decode_invoke_response,
    encode_async_release,
    encode_callback,
    encode_callback_msg,
    encode_invoke,
    invoke_size,
    write_async,
    write_callback_response,
    write_invoke_response,
)

U32 = 2**32 - 1
u32 = st.integers(0, U32)
FUZZ = settings(
    max_examples=5000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def up8(x: int) -> int:
    return -(-x // 8) * 8


class Shape(NamedTuple):
    cxt: int
    op: int
    ib: list[bytes]
    ob: list[int]
    io: list[int]
    n_oo: int

    @property
    def n(self) -> int:
        return len(self.ib) + len(self.ob) + len(self.io) + self.n_oo

    @property
    def counts(self) -> int:
        return len(self.ib) | len(self.ob) << 4 | len(self.io) << 8 | self.n_oo << 12

    def layout(self, hdr: int) -> tuple[int, list[tuple[int, int]], int]:
        """Payload start, (offset, size) of every IB then OB, and the message end."""
        start = up8(hdr + 8 * self.n)
        refs, off = [], start
        for size in [*map(len, self.ib), *self.ob]:
            refs.append((off, size))
            off += up8(size)
        return start, refs, off


def shapes(max_buf: int = 64) -> st.SearchStrategy[Shape]:
    ib_item = st.one_of(
        st.binary(max_size=max_buf),
        st.binary(max_size=max_buf).map(bytearray),
        st.binary(max_size=max_buf).map(memoryview),
    )
    return st.builds(
        Shape,
        u32,
        u32,
        st.lists(ib_item, max_size=15),
        st.lists(st.integers(0, max_buf), max_size=15),
        st.lists(u32, max_size=15),
        st.integers(0, 15),
    )


def raw_pairs(buf: bytes | bytearray, hdr: int, n: int) -> list[tuple[int, int]]:
    return [struct.unpack_from("<II", buf, hdr + 8 * k) for k in range(n)]


def check_layout(buf: bytearray, s: Shape, hdr: int) -> None:
    """Every header word and payload byte where the spec puts it; everything else zero."""
    start, refs, end = s.layout(hdr)
    nb = len(s.ib) + len(s.ob)
    pairs = raw_pairs(buf, hdr, s.n)
    assert pairs[:nb] == refs
    assert pairs[nb : nb + len(s.io)] == [(ident, 0) for ident in s.io]
    assert pairs[nb + len(s.io) :] == [(0, 0)] * s.n_oo
    expected = bytearray(end - start)
    for (off, _), data in zip(refs, s.ib, strict=False):
        expected[off - start : off - start + len(data)] = data
    assert buf[hdr + 8 * s.n : start] == bytes(start - hdr - 8 * s.n)  # header padding
    assert buf[start:end] == expected
    # buffer refs are 8-aligned, in order and non-overlapping
    assert all(o % 8 == 0 and start <= o and o + z <= end for o, z in refs)
    for (o1, z1), (o2, _) in itertools.pairwise(refs):
        assert o1 + z1 <= o2


# --------------------------------------------------------------------------- invoke


@settings(max_examples=400, deadline=None)
@given(shapes())
def test_invoke_round_trip(s: Shape) -> None:
    buf = encode_invoke(s.cxt, s.op, s.ib, s.ob, s.io, s.n_oo)
    assert type(buf) is bytearray
    start, refs, end = s.layout(12)
    assert len(buf) == end == invoke_size([len(b) for b in s.ib], s.ob, len(s.io) + s.n_oo)
    assert struct.unpack_from("<3I", buf, 0) == (s.cxt, s.op, s.counts)
    check_layout(buf, s, 12)
    expected = InvokeMsg(
        s.cxt,
        s.op,
        s.counts,
        tuple(bytes(b) for b in s.ib),
        tuple(BufRef(o, z) for o, z in refs[len(s.ib) :]),
        tuple(s.io),
        s.n_oo,
        end,
    )
    for form in (buf, bytes(buf), memoryview(buf)):
        msg = decode_invoke(form)
        assert msg == expected
        assert all(type(b) is bytes for b in msg.ib)
    for ref in expected.ob:
        assert ref.offset % 8 == 0
        assert start <= ref.offset and ref.offset + ref.size <= end


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_invoke_response_round_trip(data: st.DataObject) -> None:
    s = data.draw(shapes())
    buf = encode_invoke(s.cxt, s.op, s.ib, s.ob, s.io, s.n_oo)
    msg = decode_invoke(buf)
    ob_data = [data.draw(st.binary(max_size=cap)) for cap in s.ob]
    oo_ids = data.draw(st.lists(u32, min_size=s.n_oo, max_size=s.n_oo))
    write_invoke_response(buf, msg, ob_data, oo_ids)
    assert decode_invoke_response(buf) == InvokeResponse(tuple(ob_data), tuple(oo_ids))
    # QTEE writes only OB sizes/payloads and OO ids: the rest of the request is intact
    after = decode_invoke(buf)
    assert (after.cxt, after.op, after.counts, after.ib, after.io) == (
        msg.cxt,
        msg.op,
        msg.counts,
        msg.ib,
        msg.io,
    )
    assert after.ob == tuple(BufRef(r.offset, len(d)) for r, d in zip(msg.ob, ob_data, strict=True))
    nb = len(s.ib) + len(s.ob)
    oo_pairs = raw_pairs(buf, 12, s.n)[nb + len(s.io) :]
    assert oo_pairs == [(ident, 0) for ident in oo_ids]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_invoke_response_refuses_without_writing(data: st.DataObject) -> None:
    """An OB above its capacity or an OO id that is not a u32: UsageError, buffer untouched."""
    s = data.draw(shapes().filter(lambda s: s.ob or s.n_oo))
    buf = encode_invoke(s.cxt, s.op, s.ib, s.ob, s.io, s.n_oo)
    msg = decode_invoke(buf)
    ob_data = [data.draw(st.binary(max_size=cap)) for cap in s.ob]
    oo_ids = data.draw(st.lists(u32, min_size=s.n_oo, max_size=s.n_oo))
    if s.ob and data.draw(st.booleans()):
        k = data.draw(st.integers(0, len(s.ob) - 1))
        ob_data[k] = bytes(s.ob[k] + data.draw(st.integers(1, 9)))
    elif s.n_oo:
        oo_ids[data.draw(st.integers(0, s.n_oo - 1))] = data.draw(
            st.sampled_from([-1, 2**32, 2**40])
        )
    else:
        ob_data[0] = bytes(s.ob[0] + 1)
    before = bytes(buf)
    with pytest.raises(UsageError):
        write_invoke_response(buf, msg, ob_data, oo_ids)
    assert bytes(buf) == before


def test_wide_memoryviews_count_bytes_not_items() -> None:
    """A memoryview of 4-byte items is 4 bytes per item on the wire, in and out."""
    ib = memoryview(array.array("I", [1, 2]))
    assert len(ib) == 2 and ib.nbytes == 8
    buf = encode_invoke(1, 2, [ib], [8])
    assert len(buf) == 48  # align8(12 + 16) + 8 + 8
    msg = decode_invoke(buf)
    assert msg.ib == (struct.pack("<2I", 1, 2),)
    assert msg.ob == (BufRef(40, 8),)
    write_invoke_response(buf, msg, [memoryview(array.array("H", [7, 8, 9]))], [])
    assert decode_invoke_response(buf).ob == (struct.pack("<3H", 7, 8, 9),)
    with pytest.raises(UsageError):
        write_invoke_response(buf, msg, [memoryview(array.array("I", [1, 2, 3]))], [])
    out = bytearray(MAX_OUTBOUND_BUFFER_SIZE)
    assert encode_callback(out, 1, 2, [ib]) == 32
    assert decode_callback(out).ib == (struct.pack("<2I", 1, 2),)


def test_invoke_response_wrong_arity() -> None:
    buf = encode_invoke(5, 1, [b"x"], [8], [7], 1)
    msg = decode_invoke(buf)
    with pytest.raises(UsageError):
        write_invoke_response(buf, msg, [], [1])
    with pytest.raises(UsageError):
        write_invoke_response(buf, msg, [b""], [])
    with pytest.raises(UsageError):
        write_invoke_response(buf, msg, [b"", b""], [1])


def test_encode_invoke_rejects() -> None:
    with pytest.raises(UsageError):
        encode_invoke(0, 0, [b""] * 16)
    with pytest.raises(UsageError):
        encode_invoke(0, 0, ob=[0] * 16)
    with pytest.raises(UsageError):
        encode_invoke(0, 0, io=[0] * 16)
    with pytest.raises(UsageError):
        encode_invoke(0, 0, n_oo=16)
    with pytest.raises(UsageError):
        encode_invoke(0, 0, n_oo=-1)
    with pytest.raises(UsageError):
        encode_invoke(2**32, 0)
    with pytest.raises(UsageError):
        encode_invoke(0, -1)
    with pytest.raises(UsageError):
        encode_invoke(0, 0, io=[2**32])
    with pytest.raises(UsageError):
        encode_invoke(0, 0, ob=[-8])
    with pytest.raises(TypeError):
        encode_invoke(0, 0, ["text"])  # type: ignore[list-item]
    with pytest.raises(MessageTooLarge):
        encode_invoke(0, 0, ob=[MAX_INBOUND_BUFFER_SIZE])
    # exactly at the limit is fine: 24 bytes of header (align8(12 + 8)) + the OB
    assert len(encode_invoke(0, 0, ob=[MAX_INBOUND_BUFFER_SIZE - 24])) == MAX_INBOUND_BUFFER_SIZE
    with pytest.raises(MessageTooLarge):
        encode_invoke(0, 0, ob=[MAX_INBOUND_BUFFER_SIZE - 23])


# --------------------------------------------------------------------------- callback

callback_shapes = st.one_of(shapes(64), shapes(320))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_callback_round_trip(data: st.DataObject) -> None:
    s = data.draw(callback_shapes)
    buf = bytearray(MAX_OUTBOUND_BUFFER_SIZE)
    _, refs, end = s.layout(16)
    need = callback_size([len(b) for b in s.ib], s.ob, len(s.io) + s.n_oo)
    assert need == end
    if end > MAX_OUTBOUND_BUFFER_SIZE:
        with pytest.raises(MessageTooLarge):
            encode_callback(buf, s.cxt, s.op, s.ib, s.ob, s.io, s.n_oo)
        assert not any(buf)
        return
    assert encode_callback(buf, s.cxt, s.op, s.ib, s.ob, s.io, s.n_oo) == end
    assert struct.unpack_from("<4I", buf, 0) == (0, s.cxt, s.op, s.counts)
    check_layout(buf, s, 16)
    assert not any(buf[end:])
    msg = decode_callback(buf)
    assert msg == CallbackMsg(
        s.cxt,
        s.op,
        s.counts,
        tuple(bytes(b) for b in s.ib),
        tuple(BufRef(o, z) for o, z in refs[len(s.ib) :]),
        tuple(s.io),
        s.n_oo,
        end,
    )
    assert async_offset(msg) == end
    assert async_offset(None) == 0
    again = bytearray(MAX_OUTBOUND_BUFFER_SIZE)  # the encoder's own account of it, unparsed
    assert encode_callback_msg(again, s.cxt, s.op, s.ib, s.ob, s.io, s.n_oo) == msg
    assert again == buf

    result = data.draw(st.one_of(st.just(0), st.integers(-(2**31), 2**31 - 1)))
    if result:
        before = bytes(buf)
        write_callback_response(buf, msg, result)
        assert struct.unpack_from("<I", buf, 0)[0] == result % 2**32
        assert buf[4:] == before[4:]
        assert decode_callback_response(buf, msg) == CallbackResponse(result, (), ())
        return
    ob_data = [data.draw(st.binary(max_size=cap)) for cap in s.ob]
    oo_ids = data.draw(st.lists(u32, min_size=s.n_oo, max_size=s.n_oo))
    write_callback_response(buf, msg, 0, ob_data, oo_ids)
    assert decode_callback_response(buf, msg) == CallbackResponse(0, tuple(ob_data), tuple(oo_ids))
    nb = len(s.ib) + len(s.ob)
    assert raw_pairs(buf, 16, s.n)[len(s.ib) : nb] == [
        (r.offset, len(d)) for r, d in zip(msg.ob, ob_data, strict=True)
    ]
    # QTEE's side refuses a response whose OB grew past what it asked for
    if s.ob and refs[len(s.ib)][0] + s.ob[0] + 1 <= MAX_OUTBOUND_BUFFER_SIZE:
        struct.pack_into("<I", buf, 16 + 8 * len(s.ib) + 4, s.ob[0] + 1)
        with pytest.raises(DecodeError):
            decode_callback_response(buf, msg)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_callback_response_refuses_growth_without_writing(data: st.DataObject) -> None:
    """The kernel may only shrink OBs: a longer one is UsageError and nothing is written."""
    s = data.draw(shapes().filter(lambda s: bool(s.ob)))
    buf = bytearray(MAX_OUTBOUND_BUFFER_SIZE)
    encode_callback(buf, s.cxt, s.op, s.ib, s.ob, s.io, s.n_oo)
    msg = decode_callback(buf)
    ob_data = [data.draw(st.binary(max_size=cap)) for cap in s.ob]
    k = data.draw(st.integers(0, len(s.ob) - 1))
    ob_data[k] = b"\xaa" * (s.ob[k] + 1)
    before = bytes(buf)
    with pytest.raises(UsageError):
        write_callback_response(buf, msg, 0, ob_data, [0] * s.n_oo)
    assert bytes(buf) == before


def test_callback_exact_fit_and_one_over() -> None:
    buf = bytearray(MAX_OUTBOUND_BUFFER_SIZE)
    # one OB: header align8(16 + 8) = 24, so 4072 bytes fill the buffer exactly
    assert encode_callback(buf, 1, 2, ob=[4072]) == 4096
    assert decode_callback(buf).ob == (BufRef(24, 4072),)
    with pytest.raises(MessageTooLarge):
        encode_callback(bytearray(4096), 1, 2, ob=[4073])
    with pytest.raises(UsageError):
        encode_callback(bytearray(4095), 1, 2)
    with pytest.raises(UsageError):
        encode_callback(bytes(4096), 1, 2)  # type: ignore[arg-type]


def test_write_callback_response_result_range() -> None:
    buf = bytearray(MAX_OUTBOUND_BUFFER_SIZE)
    encode_callback(buf, 1, 2)
    msg = decode_callback(buf)
    with pytest.raises(UsageError):
        write_callback_response(buf, msg, 2**31)
    with pytest.raises(TypeError):
        write_callback_response(buf, msg, True)
    write_callback_response(buf, msg, -96)
    assert buf[:4] == b"\xa0\xff\xff\xff"


# --------------------------------------------------------------------------- async

async_ids = st.lists(st.lists(u32, max_size=24), max_size=8)
versions = st.sampled_from(
    [QCOMTEE_ASYNC_VERSION_1_0, QCOMTEE_ASYNC_VERSION_1_1, QCOMTEE_ASYNC_VERSION_1_2, 0x0001_FFFF]
)


@settings(max_examples=300, deadline=None)
@given(async_ids, versions, st.integers(0, 512))
def test_async_round_trip(batches: list[list[int]], version: int, slot: int) -> None:
    messages = [encode_async_release(ids, version) for ids in batches]
    for ids, m in zip(batches, messages, strict=True):
        assert m == struct.pack("<3I", version, 0xFFFF, len(ids)) + b"".join(
            struct.pack("<I", i) for i in ids
        )
    buf = bytearray(MAX_OUTBOUND_BUFFER_SIZE)
    offset = 8 * slot
    used = offset
    fits = True
    for m in messages:
        if used + len(m) > MAX_OUTBOUND_BUFFER_SIZE:
            fits = False
            break
        used += up8(len(m))
    if not fits:
        with pytest.raises(MessageTooLarge):
            write_async(buf, offset, messages)
        return
    assert write_async(buf, offset, messages) == min(used, MAX_OUTBOUND_BUFFER_SIZE)
    assert not any(buf[:offset])
    batch = decode_async(buf, offset)
    assert batch == AsyncBatch(tuple(tuple(ids) for ids in batches), ASYNC_STOP_END)
    assert decode_async(bytes(buf), offset) == batch
    clear_async(buf, offset)
    assert not any(buf)
    assert len(buf) == MAX_OUTBOUND_BUFFER_SIZE


@pytest.mark.parametrize(
    ("trailer", "stop"),
    [
        (struct.pack("<2I", 0, 0xFFFF), ASYNC_STOP_END),
        (struct.pack("<2I", 0x0002_0000, 0xFFFF), ASYNC_STOP_VERSION),
        (struct.pack("<2I", 0x0000_0001, 0xFFFF), ASYNC_STOP_VERSION),
        (struct.pack("<2I", QCOMTEE_ASYNC_VERSION_1_2, 0xFFFE), ASYNC_STOP_OP),
        (struct.pack("<2I", QCOMTEE_ASYNC_VERSION_1_2, 0), ASYNC_STOP_OP),
    ],
)
def test_async_stops(trailer: bytes, stop: str) -> None:
    buf = bytearray(MAX_OUTBOUND_BUFFER_SIZE)
    end = write_async(buf, 40, [encode_async_release([0x8000_0001, 0x8000_0002])])
    assert end == 40 + 24
    buf[end : end + len(trailer)] = trailer
    # a release after the stop is never read
    buf[end + 16 : end + 32] = encode_async_release([0x8000_0003])
    assert decode_async(buf, 40) == AsyncBatch(((0x8000_0001, 0x8000_0002),), stop)


def test_async_ids_past_end_and_bad_inputs() -> None:
    buf = bytearray(MAX_OUTBOUND_BUFFER_SIZE)
    buf[4080:4092] = struct.pack("<3I", QCOMTEE_ASYNC_VERSION_1_2, 0xFFFF, 2)
    with pytest.raises(DecodeError):
        decode_async(buf, 4080)
    # exactly 8 bytes (or fewer) left: no message is read
    assert decode_async(buf, 4088) == AsyncBatch((), ASYNC_STOP_END)
    for bad in (-8, 4097, None, "0"):
        with pytest.raises(DecodeError):
            decode_async(buf, bad)  # type: ignore[arg-type]
    for bad_offset in (3, -8, 4104):
        with pytest.raises(UsageError):
            write_async(buf, bad_offset, [])
    with pytest.raises(UsageError):
        encode_async_release([2**32])
    with pytest.raises(UsageError):
        encode_async_release([1], version=0)


# --------------------------------------------------------------------------- fuzzing
#
# One Hypothesis draw (a byte string) drives a whole case: ``Reader`` turns it into
# choices, so each example costs one draw however much structure it builds.  That keeps
# 5,000 examples per decoder within a few seconds.

INTERESTING = (0, 1, 7, 8, 12, 16, 24, 4088, 4095, 4096, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFF8, U32)


class Reader:
    """Reads choices from fuzz bytes; reads past the end give zeros."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk.ljust(n, b"\0")

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "little")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "little")

    def below(self, n: int) -> int:
        return (self.u16() if n > 256 else self.u8()) % n

    def word(self) -> int:
        """A u32 that is often a plausible offset or size."""
        kind = self.below(5)
        if kind == 0:
            return self.u32()
        if kind == 1:
            return self.below(700)
        if kind == 2:
            return 8 * self.below(90)
        if kind == 3:
            return INTERESTING[self.below(len(INTERESTING))]
        return self.u8()

    def rest(self) -> bytes:
        chunk = self.data[self.pos :]
        self.pos = len(self.data)
        return chunk


def fit(blob: bytes, cut: tuple[int, int], size: int | None, hot: int = 0) -> bytes:
    """Cut or pad ``blob`` as ``cut = (mode, amount)`` says.

    Without ``size``: keep, cut anywhere, pad with zeros, or cut just before ``hot`` (where
    the args array ends: the interesting cuts).  With ``size``: pad or cut to it, with
    zeros or with random bytes seeded by ``amount``.
    """
    mode, amount = cut
    if size is None:
        if mode == 1:
            return blob[: amount % (len(blob) + 1)]
        if mode == 2:
            return blob + bytes(amount % 600)
        if mode >= 3:
            return blob[: max(0, hot - 1 - amount % 16)]
        return blob
    blob = blob[:size]
    if mode & 1:
        return blob + random.Random(amount).randbytes(size - len(blob))
    return blob + bytes(size - len(blob))


def structured(data: bytes, cut: tuple[int, int], hdr_words: int, size: int | None) -> bytes:
    """A header whose last word is ``counts``, arg words that look like offsets, a tail."""
    r = Reader(data)
    head = [r.u32() for _ in range(hdr_words - 1)]
    mode = r.below(3)
    if mode == 0:
        counts = r.below(5) | r.below(5) << 4 | r.below(5) << 8 | r.below(5) << 12
    elif mode == 1:
        counts = r.u16()
    else:
        counts = r.u32()
    n_args = sum(counts >> s & 0xF for s in (0, 4, 8, 12)) if counts < 0x10000 else r.below(21)
    words = [r.word() for _ in range(2 * n_args)]
    blob = struct.pack(f"<{hdr_words + len(words)}I", *head, counts, *words) + r.rest()
    return fit(blob, cut, size, 4 * hdr_words + 8 * n_args)


def mutated(data: bytes, cut: tuple[int, int], outbound: bool) -> bytes:
    """A valid message (shape chosen by the fuzz bytes) with a few bytes or words overwritten."""
    r = Reader(data)
    ib = [bytes([r.u8()]) * r.below(49) for _ in range(r.below(5))]
    ob = [r.below(49) for _ in range(r.below(5))]
    io = [r.word() for _ in range(r.below(5))]
    n_oo = r.below(5)
    if outbound:
        buf = bytearray(MAX_OUTBOUND_BUFFER_SIZE)
        encode_callback(buf, r.u32(), r.u32(), ib, ob, io, n_oo)
        hdr = 16
    else:
        buf = encode_invoke(r.u32(), r.u32(), ib, ob, io, n_oo)
        hdr = 12
    args_end = hdr + 8 * (len(ib) + len(ob) + len(io) + n_oo)
    hot = min(len(buf), args_end + 8)  # header and arg words
    for _ in range(1 + r.below(6)):
        if r.below(2):
            buf[r.below(hot)] = r.u8()
        else:
            struct.pack_into("<I", buf, 4 * r.below(hot // 4), r.word())
    if outbound:
        return bytes(buf)
    return fit(bytes(buf), cut, None, args_end)


fuzz_bytes = st.binary(min_size=8, max_size=256)
cuts = st.integers(0, 5 * 2**16 - 1).map(lambda v: divmod(v, 2**16))  # (mode, amount)
inbound_cases = st.one_of(
    st.binary(max_size=160),
    st.tuples(fuzz_bytes, cuts).map(lambda t: structured(*t, 3, None)),
    st.tuples(fuzz_bytes, cuts).map(lambda t: mutated(*t, outbound=False)),
)
outbound_cases = st.one_of(
    st.tuples(st.binary(max_size=160), cuts).map(lambda t: fit(*t, MAX_OUTBOUND_BUFFER_SIZE)),
    st.tuples(fuzz_bytes, cuts).map(lambda t: structured(*t, 4, MAX_OUTBOUND_BUFFER_SIZE)),
    st.tuples(fuzz_bytes, cuts).map(lambda t: mutated(*t, outbound=True)),
)


def check_msg(msg: InvokeMsg | CallbackMsg, buf: bytes, hdr: int) -> None:
    counts = msg.counts
    assert counts < 0x10000
    assert len(msg.ib) == counts & 0xF
    assert len(msg.ob) == counts >> 4 & 0xF
    assert len(msg.io) == counts >> 8 & 0xF
    assert msg.n_oo == counts >> 12
    start = up8(hdr + 8 * (len(msg.ib) + len(msg.ob) + len(msg.io) + msg.n_oo))
    assert start <= len(buf)
    for ref in msg.ob:
        assert ref.offset % 8 == 0 and start <= ref.offset and ref.offset + ref.size <= len(buf)
    assert all(type(b) is bytes for b in msg.ib)
    assert all(0 <= i <= U32 for i in msg.io)
    assert msg.size >= start


@FUZZ
@given(inbound_cases)
def test_fuzz_decode_invoke(buf: bytes) -> None:
    """decode_invoke returns a message whose buffers lie inside the input or raises DecodeError."""
    try:
        msg = decode_invoke(buf)
    except DecodeError:
        return
    check_msg(msg, buf, 12)


@FUZZ
@given(outbound_cases)
def test_fuzz_decode_callback(buf: bytes) -> None:
    """decode_callback on any 4096 bytes returns an in-bounds message or raises DecodeError."""
    assert len(buf) == MAX_OUTBOUND_BUFFER_SIZE
    try:
        msg = decode_callback(buf)
    except DecodeError:
        return
    check_msg(msg, buf, 16)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=5000).filter(lambda b: len(b) != 4096))
def test_decode_callback_wrong_size(buf: bytes) -> None:
    """decode_callback raises DecodeError for every buffer that is not 4096 bytes."""
    with pytest.raises(DecodeError):
        decode_callback(buf)


@FUZZ
@given(inbound_cases)
def test_fuzz_decode_invoke_response(buf: bytes) -> None:
    """decode_invoke_response returns outputs read from inside the input or raises DecodeError."""
    try:
        resp = decode_invoke_response(buf)
    except DecodeError:
        return
    counts = struct.unpack_from("<I", buf, 8)[0]
    assert len(resp.ob) == counts >> 4 & 0xF
    assert len(resp.oo) == counts >> 12 & 0xF
    assert all(len(b) <= len(buf) for b in resp.ob)
    assert all(type(b) is bytes for b in resp.ob)


def _prebuilt_callbacks() -> list[CallbackMsg]:
    out = []
    for ib, ob, io, n_oo in [
        ((), (), (), 0),
        ((b"abc",), (16,), (0x8000_0001,), 1),
        ((), (8, 0, 64), (), 3),
        ((b"x" * 40,) * 3, (100,) * 4, (5, 6), 15),
    ]:
        buf = bytearray(MAX_OUTBOUND_BUFFER_SIZE)
        encode_callback(buf, 9, 3, ib, ob, io, n_oo)
        out.append(decode_callback(buf))
    return out


PREBUILT_CALLBACKS = _prebuilt_callbacks()


@FUZZ
@given(outbound_cases, st.sampled_from(PREBUILT_CALLBACKS), st.booleans())
def test_fuzz_decode_callback_response(buf: bytes, msg: CallbackMsg, ok: bool) -> None:
    """decode_callback_response returns a result (outputs only when 0) or raises DecodeError."""
    if ok:  # result 0 is where the parsing happens
        buf = bytes(4) + buf[4:]
    try:
        resp = decode_callback_response(buf, msg)
    except DecodeError:
        return
    raw = struct.unpack_from("<I", buf, 0)[0]
    assert resp.result == (raw - 2**32 if raw >= 2**31 else raw)
    if resp.result:
        assert resp == CallbackResponse(resp.result, (), ())
    else:
        for data, ref in zip(resp.ob, msg.ob, strict=False):
            assert len(data) <= ref.size


def async_case(data: bytes) -> tuple[bytes, int]:
    """Async headers with plausible and implausible versions, ops and counts, and an offset.

    Zero fuzz bytes mean a well-formed RELEASE, so exhausted input still builds messages.
    """
    ctl = Reader(data[:8])
    r = Reader(data[8:])
    junk = r.take(8 * r.below(3)) if ctl.below(3) == 2 else b""
    blob = bytearray(junk)
    for _ in range(1 + ctl.below(6)):
        good = r.below(8) != 7  # mostly well-formed, so later messages get parsed too
        version = (0x1_0002, 0x1_0000, 0x1_00FF)[r.below(3)] if good else 0
        op = 0xFFFF if good else (0xFFFE, 0xFFFF, 0)[r.below(3)]
        n_ids = r.below(13)
        count = n_ids if good else (n_ids + 1, r.u32(), n_ids)[r.below(3)]
        if not good and r.below(2):
            version = (0x2_0000, 1, r.u32())[r.below(3)]
        blob += struct.pack(f"<3I{n_ids}I", version, op, count, *(r.u32() for _ in range(n_ids)))
        blob += bytes(-len(blob) % 8 if r.below(4) else r.below(8))
    if ctl.below(3) == 1:
        blob = blob[: ctl.below(len(blob) + 1)]
    mode = ctl.below(3)
    offset = (len(junk), 0, ctl.below(len(blob) + 9) - 4)[mode]
    return bytes(blob), offset


@FUZZ
@given(
    st.one_of(
        st.tuples(st.binary(max_size=200), st.integers(-4, 210)),
        fuzz_bytes.map(async_case),
    )
)
def test_fuzz_decode_async(case: tuple[bytes, int]) -> None:
    """decode_async returns releases found inside the input, with a known stop, or DecodeError."""
    buf, offset = case
    try:
        batch = decode_async(buf, offset)
    except DecodeError:
        return
    assert batch.stop in (ASYNC_STOP_END, ASYNC_STOP_VERSION, ASYNC_STOP_OP)
    assert sum(12 + 4 * len(ids) for ids in batch.releases) <= len(buf) - offset
    assert all(0 <= i <= U32 for ids in batch.releases for i in ids)


@settings(max_examples=60, deadline=None)
@given(shapes())
def test_every_prefix_of_an_invoke(s: Shape) -> None:
    """Each prefix of a valid message decodes to the same message, or raises DecodeError.

    It decodes exactly when it holds the args array and every buffer's bytes.
    """
    buf = bytes(encode_invoke(s.cxt, s.op, s.ib, s.ob, s.io, s.n_oo))
    full = decode_invoke(buf)
    start, refs, _ = s.layout(12)
    needed = max([start, *(o + z for o, z in refs)])
    for k in range(len(buf) + 1):
        try:
            msg = decode_invoke(buf[:k])
        except DecodeError:
            assert k < needed
            continue
        assert k >= needed
        assert msg == full


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_every_prefix_of_an_invoke_response(data: st.DataObject) -> None:
    """Each prefix of a response decodes to the same outputs, or raises DecodeError.

    It decodes exactly when it holds the args array and every OB's reported bytes.
    """
    s = data.draw(shapes())
    buf = encode_invoke(s.cxt, s.op, s.ib, s.ob, s.io, s.n_oo)
    msg = decode_invoke(buf)
    ob_data = [data.draw(st.binary(max_size=cap)) for cap in s.ob]
    oo_ids = data.draw(st.lists(u32, min_size=s.n_oo, max_size=s.n_oo))
    write_invoke_response(buf, msg, ob_data, oo_ids)
    full = decode_invoke_response(buf)
    needed = max([12 + 8 * s.n, *(r.offset + len(d) for r, d in zip(msg.ob, ob_data, strict=True))])
    raw = bytes(buf)
    for k in range(len(raw) + 1):
        try:
            resp = decode_invoke_response(raw[:k])
        except DecodeError:
            assert k < needed
            continue
        assert k >= needed
        assert resp == full


def test_decode_invoke_size_limits() -> None:
    with pytest.raises(DecodeError):
        decode_invoke(bytes(MAX_INBOUND_BUFFER_SIZE + 8))
    assert decode_invoke(bytes(16)) == InvokeMsg(0, 0, 0, (), (), (), 0, 16)
    with pytest.raises(DecodeError):
        decode_invoke(bytes(11))
    with pytest.raises(DecodeError):
        decode_invoke(bytes(12))  # align8(12) = 16 bytes needed even with no args
    with pytest.raises(DecodeError):
        decode_invoke_response(bytes(11))


@settings(max_examples=200, deadline=None)
@given(st.lists(u32, max_size=24), st.integers(0, 400))
def test_a_partition_release_tail_is_the_encoded_message(ids: list[int], slot: int) -> None:
    """§3.5: the secure world's own RELEASE tail (``wire._write_async_release``, no checks)
    writes exactly what ``write_async(encode_async_release(ids))`` writes, and nothing else
    (issue 18: a lean release-notification path, the same bytes)."""
    from qtee.wire import _write_async_release

    want = bytearray(MAX_OUTBOUND_BUFFER_SIZE)
    got = bytearray(MAX_OUTBOUND_BUFFER_SIZE)
    write_async(want, 8 * slot, [encode_async_release(ids)])
    _write_async_release(got, 8 * slot, ids)
    assert got == want


@pytest.mark.parametrize("what", [None, "str", "x" * 5000, [1, 2], 7], ids=repr)
def test_every_decoder_refuses_what_is_no_buffer_by_name(what: object) -> None:
    """A decoder reads bytes: anything else is a TypeError naming the decoder and the
    type (a str is not counted as bytes; a DecodeError is for bad bytes only)."""
    msg = decode_callback(_fresh_callback())
    calls = {
        "decode_invoke": lambda: decode_invoke(what),  # type: ignore[arg-type]
        "decode_callback": lambda: decode_callback(what),  # type: ignore[arg-type]
        "decode_invoke_response": lambda: decode_invoke_response(what),  # type: ignore[arg-type]
        "decode_callback_response": lambda: decode_callback_response(what, msg),  # type: ignore[arg-type]
        "decode_async": lambda: decode_async(what),  # type: ignore[arg-type]
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=rf"^{name} takes a bytes-like buffer, not "):
            call()


def _fresh_callback() -> bytearray:
    buf = bytearray(MAX_OUTBOUND_BUFFER_SIZE)
    encode_callback(buf, 1, 2)
    return buf
