"""Golden byte vectors for the QTEE transport message (qtee/wire.py).

Every expected byte string below was derived by hand from qtee-kernel.md §3 (headers §3.2,
counts §3.3, payload placement §3.4, async messages §3.5, result codes §3.6); none of them
is produced by the code under test.  All words are little-endian u32.
"""

from __future__ import annotations

import pytest

from objects import DecodeError, UsageError
from qtee import wire
from qtee.wire import BufRef

OUT = 4096  # qtee-kernel.md §3.1: the outbound buffer is exactly 4 KiB


def h(text: str) -> bytes:
    """Hex (spaces and newlines allowed) to bytes."""
    return bytes.fromhex(text)


def outbound(prefix: bytes) -> bytes:
    """A 4096-byte outbound buffer: ``prefix`` then zeros (§3.1: buffers are zero-filled)."""
    assert len(prefix) <= OUT
    return prefix + bytes(OUT - len(prefix))


# --------------------------------------------------------------------------- inbound vectors

# §3.2/§3.4: cxt=5, op=3, counts=0; payload start align8(12 + 0) = 16 -> 4 zero pad bytes.
EMPTY_INVOKE = h("05000000 03000000 00000000 00000000")

# §3.4: one IB "abc": n=1, start align8(12+8)=24; arg {24, 3}; payload padded to 8 -> 32 bytes.
ONE_IB_INVOKE = h(
    "10000000 07000000 01000000"  # cxt 0x10, op 7, counts 0x0001
    "18000000 03000000"  # IB0: offset 24, size 3
    "00000000"  # header pad 20..24
    "61626300 00000000"  # "abc" + 5 zero bytes
)

# §3.3/§3.4: 2 IB + 1 OB + 1 IO + 1 OO -> counts 0x1112, n=5, start align8(12+40)=56.
# IB0 9 bytes @56 (takes 16), IB1 8 bytes @72, OB cap 5 @80 (takes 8) -> 88 bytes total.
MIXED_INVOKE = h(
    "02000000 0a000000 12110000"  # cxt 2, op 10, counts 0x1112
    "38000000 09000000"  # IB0 {56, 9}
    "48000000 08000000"  # IB1 {72, 8}
    "50000000 05000000"  # OB0 {80, 5}
    "01000080 00000000"  # IO0 id 0x80000001 (object form: first 4 bytes)
    "00000000 00000000"  # OO0 slot left zero for QTEE
    "00000000"  # pad 52..56
    "01020304 05060708 09000000 00000000"  # IB0 payload + 7 pad
    "41424344 45464748"  # IB1 "ABCDEFGH" (no pad needed)
    "00000000 00000000"  # OB0 reserved space (5 + 3 pad), not copied
)
MIXED_IB0 = h("010203040506070809")

# §3.3: objects only: 2 IO + 2 OO -> counts 0x2200, n=4, start align8(12+32)=48.
OBJECTS_ONLY_INVOKE = h(
    "11000000 04000000 00220000"
    "02000080 00000000"  # IO0 0x80000002
    "07000000 00000000"  # IO1 7 (a QTEE id)
    "00000000 00000000"  # OO0
    "00000000 00000000"  # OO1
    "00000000"  # pad 44..48
)

# §3.4: zero-length IB and OB: n=2, start align8(12+16)=32, both at 32 with size 0.
ZERO_LEN_INVOKE = h(
    "01000000 00000000 11000000"  # cxt ROOT(1), op 0, counts 0x0011
    "20000000 00000000"  # IB0 {32, 0}
    "20000000 00000000"  # OB0 {32, 0}
    "00000000"  # pad 28..32
)

# §3.3/§7: 15 OO (the real per-type maximum): counts 0xF000, start align8(12+120)=136.
MAX_OO_INVOKE = h("03000000 01000000 00f00000") + bytes(120) + bytes(4)


def test_empty_invoke_is_16_bytes() -> None:
    """qtee-kernel.md §3.2, §3.4: a 0-arg inbound message is align8(12) = 16 bytes."""
    msg = wire.encode_invoke(5, 3)
    assert bytes(msg) == EMPTY_INVOKE
    assert wire.invoke_size([], [], 0) == 16
    dec = wire.decode_invoke(EMPTY_INVOKE)
    assert dec == wire.InvokeMsg(5, 3, 0, (), (), (), 0, 16)


def test_one_ib_invoke() -> None:
    """qtee-kernel.md §3.4: IB payload at align8(12+8)=24, padded to a multiple of 8."""
    assert bytes(wire.encode_invoke(0x10, 7, ib=[b"abc"])) == ONE_IB_INVOKE
    dec = wire.decode_invoke(ONE_IB_INVOKE)
    assert (dec.cxt, dec.op, dec.counts) == (0x10, 7, 1)
    assert dec.ib == (b"abc",)
    assert dec.ob == ()
    assert dec.io == ()
    assert dec.n_oo == 0
    assert dec.size == 32


def test_mixed_invoke_counts_0x1112() -> None:
    """qtee-kernel.md §3.3 (nibbles IB|OB<<4|IO<<8|OO<<12, args grouped by type), §3.4."""
    msg = wire.encode_invoke(2, 10, ib=[MIXED_IB0, b"ABCDEFGH"], ob=[5], io=[0x80000001], n_oo=1)
    assert bytes(msg) == MIXED_INVOKE
    assert len(MIXED_INVOKE) == 88
    assert wire.invoke_size([9, 8], [5], 2) == 88
    dec = wire.decode_invoke(MIXED_INVOKE)
    assert dec == wire.InvokeMsg(
        cxt=2,
        op=10,
        counts=0x1112,
        ib=(MIXED_IB0, b"ABCDEFGH"),
        ob=(BufRef(80, 5),),
        io=(0x80000001,),
        n_oo=1,
        size=88,
    )


def test_objects_only_invoke_oo_slots_zero() -> None:
    """qtee-kernel.md §3.2 (object form u32 in first 4 bytes), §3.3: OO slots left zero."""
    msg = wire.encode_invoke(0x11, 4, io=[0x80000002, 7], n_oo=2)
    assert bytes(msg) == OBJECTS_ONLY_INVOKE
    dec = wire.decode_invoke(OBJECTS_ONLY_INVOKE)
    assert dec == wire.InvokeMsg(0x11, 4, 0x2200, (), (), (0x80000002, 7), 2, 48)


def test_zero_length_buffers() -> None:
    """qtee-kernel.md §3.4: offset += align8(0) = 0, both buffers sit at the payload start."""
    assert bytes(wire.encode_invoke(1, 0, ib=[b""], ob=[0])) == ZERO_LEN_INVOKE
    dec = wire.decode_invoke(ZERO_LEN_INVOKE)
    assert dec.ib == (b"",)
    assert dec.ob == (BufRef(32, 0),)
    assert dec.size == 32


def test_fifteen_output_objects() -> None:
    """qtee-kernel.md §3.3, §7: 15 per type is the encodable maximum; 16 is refused."""
    assert bytes(wire.encode_invoke(3, 1, n_oo=15)) == MAX_OO_INVOKE
    assert len(MAX_OO_INVOKE) == 136
    assert wire.decode_invoke(MAX_OO_INVOKE).n_oo == 15
    with pytest.raises(UsageError):
        wire.encode_invoke(3, 1, n_oo=16)
    with pytest.raises(UsageError):
        wire.encode_invoke(3, 1, ib=[b"x"] * 16)


def test_payload_start_examples() -> None:
    """qtee-kernel.md §3.4: payload start n=0->16, 1->24, 2->32 for both message kinds."""
    for n, start in ((0, 16), (1, 24), (2, 32), (3, 40), (4, 48)):
        assert wire.invoke_size([], [], n) == start
    for n, start in ((0, 16), (1, 24), (2, 32), (3, 40), (4, 48)):
        assert wire.callback_size([], [], n) == start
    # 64 args: align8(12 + 512) = 528 and align8(16 + 512) = 528.
    assert wire.invoke_size([], [], 64) == 528
    assert wire.callback_size([], [], 64) == 528
    assert wire.invoke_size([1, 8, 9], [17], 0) == 48 + 8 + 8 + 16 + 24
    assert wire.align8(0) == 0
    assert wire.align8(1) == 8
    assert wire.align8(8) == 8
    assert wire.align8(9) == 16


# --------------------------------------------------------------------------- callback vectors

# §3.2: callback {result, cxt, op, counts, args}; IB "hello" + OB cap 16 + 1 OO -> counts
# 0x1011, n=3, start align8(16+24)=40; IB @40 (8), OB @48 (16) -> message ends at 64.
CALLBACK_HEAD = h(
    "00000000"  # result (left 0 for the kernel)
    "03000080"  # cxt 0x80000003 (NS object)
    "01000000"  # op 1
    "11100000"  # counts 0x1011
    "28000000 05000000"  # IB0 {40, 5}
    "30000000 10000000"  # OB0 {48, 16}
    "00000000 00000000"  # OO0
    "68656c6c 6f000000"  # "hello" + 3 pad
    "00000000 00000000 00000000 00000000"  # OB0 space
)
CALLBACK = outbound(CALLBACK_HEAD)

# §3.4: kernel response: OB shrunk to 3 ("xyz"), OO id 0x80000005, result 0.
CALLBACK_RESPONSE_OK = outbound(
    h(
        "00000000 03000080 01000000 11100000"
        "28000000 05000000"
        "30000000 03000000"  # OB0 size shrunk 16 -> 3
        "05000080 00000000"  # OO0 = 0x80000005
        "68656c6c 6f000000"
        "78797a00 00000000 00000000 00000000"  # "xyz" written in place
    )
)

# §3.6: result -96 (UNAVAIL) as u32 two's complement; outputs NOT written when result != 0.
CALLBACK_RESPONSE_UNAVAIL = outbound(h("a0ffffff") + CALLBACK_HEAD[4:])


def fresh_callback() -> tuple[bytearray, wire.CallbackMsg]:
    buf = bytearray(OUT)
    end = wire.encode_callback(buf, 0x80000003, 1, ib=[b"hello"], ob=[16], n_oo=1)
    assert end == 64
    return buf, wire.decode_callback(buf)


def test_callback_message() -> None:
    """qtee-kernel.md §3.2 (16-byte callback header), §3.4 (start align8(16+8n))."""
    buf = bytearray(OUT)
    end = wire.encode_callback(buf, 0x80000003, 1, ib=[b"hello"], ob=[16], n_oo=1)
    assert bytes(buf) == CALLBACK
    assert end == 64
    assert wire.callback_size([5], [16], 1) == 64
    dec = wire.decode_callback(CALLBACK)
    assert dec == wire.CallbackMsg(
        cxt=0x80000003,
        op=1,
        counts=0x1011,
        ib=(b"hello",),
        ob=(BufRef(48, 16),),
        io=(),
        n_oo=1,
        size=64,
    )


def test_callback_one_io() -> None:
    """qtee-kernel.md §3.2, §3.4: callback with one IO, n=1 -> start align8(24)=24."""
    buf = bytearray(OUT)
    assert wire.encode_callback(buf, 0x80000010, 0xFFFF, io=[0x12345678]) == 24
    expected = outbound(h("00000000 10000080 ffff0000 00010000 78563412 00000000"))
    assert bytes(buf) == expected
    dec = wire.decode_callback(expected)
    assert (dec.cxt, dec.op, dec.counts, dec.io, dec.size) == (
        0x80000010,
        0xFFFF,
        0x100,
        (0x12345678,),
        24,
    )


def test_callback_response_ok() -> None:
    """qtee-kernel.md §3.4: kernel shrinks OB size, writes OB data, OO id, then result 0."""
    buf, msg = fresh_callback()
    wire.write_callback_response(buf, msg, 0, ob_data=[b"xyz"], oo_ids=[0x80000005])
    assert bytes(buf) == CALLBACK_RESPONSE_OK
    resp = wire.decode_callback_response(CALLBACK_RESPONSE_OK, msg)
    assert resp == wire.CallbackResponse(0, (b"xyz",), (0x80000005,))


def test_callback_response_negative_result_writes_no_outputs() -> None:
    """qtee-kernel.md §3.6 (u32 two's complement), §3.4 (outputs only when result == 0)."""
    buf, msg = fresh_callback()
    wire.write_callback_response(buf, msg, -96, ob_data=[b"xyz"], oo_ids=[0x80000005])
    assert bytes(buf) == CALLBACK_RESPONSE_UNAVAIL
    assert bytes(buf[:4]) == h("a0ffffff")
    resp = wire.decode_callback_response(CALLBACK_RESPONSE_UNAVAIL, msg)
    assert resp == wire.CallbackResponse(-96, (), ())

    buf, msg = fresh_callback()
    wire.write_callback_response(buf, msg, -90)  # DEFUNCT
    assert bytes(buf) == outbound(h("a6ffffff") + CALLBACK_HEAD[4:])

    buf, msg = fresh_callback()
    wire.write_callback_response(buf, msg, 10)  # ERROR_USERBASE, positive
    assert bytes(buf) == outbound(h("0a000000") + CALLBACK_HEAD[4:])
    assert wire.decode_callback_response(buf, msg) == wire.CallbackResponse(10, (), ())


def test_callback_response_may_not_grow_ob() -> None:
    """qtee-kernel.md §3.4: kernel may only shrink OB sizes (new > requested -> EINVAL)."""
    buf, msg = fresh_callback()
    with pytest.raises(UsageError):
        wire.write_callback_response(buf, msg, 0, ob_data=[bytes(17)], oo_ids=[1])
    assert bytes(buf) == CALLBACK  # nothing written, result still 0
    grown = bytearray(CALLBACK)
    grown[28:32] = h("11000000")  # OB0 size 17 > 16
    with pytest.raises(DecodeError):
        wire.decode_callback_response(grown, msg)


# --------------------------------------------------------------------------- invoke response


# §3.4: QTEE writes OB0 size 2 (shrunk from 5), payload aa bb, and OO0 id 9 into MIXED_INVOKE.
MIXED_RESPONSE = (
    MIXED_INVOKE[:28]
    + h("50000000 02000000")  # OB0 {80, 2}
    + MIXED_INVOKE[36:44]
    + h("09000000 00000000")  # OO0 = 9
    + MIXED_INVOKE[52:80]
    + h("aabb0000 00000000")
)


def test_invoke_response() -> None:
    """qtee-kernel.md §3.4: QTEE writes OB size + data and OO ids in the inbound buffer."""
    buf = bytearray(MIXED_INVOKE)
    msg = wire.decode_invoke(buf)
    wire.write_invoke_response(buf, msg, [h("aabb")], [9])
    assert bytes(buf) == MIXED_RESPONSE
    resp = wire.decode_invoke_response(MIXED_RESPONSE)
    assert resp == wire.InvokeResponse((h("aabb"),), (9,))


def test_invoke_response_ob_size_trusted() -> None:
    """qtee-kernel.md §3.4, §7: the driver trusts QTEE's OB size (may exceed the capacity)."""
    grown = bytearray(MIXED_INVOKE)
    grown[32:36] = h("08000000")  # OB0 size 8 > capacity 5, still inside the buffer
    grown[80:88] = h("0102030405060708")
    resp = wire.decode_invoke_response(grown)
    assert resp.ob == (h("0102030405060708"),)
    assert resp.oo == (0,)
    grown[32:36] = h("09000000")  # 80 + 9 > 88: past the buffer
    with pytest.raises(DecodeError):
        wire.decode_invoke_response(grown)


# --------------------------------------------------------------------------- async messages

# §3.5: RELEASE = {version 0x00010002, op 0xFFFF, counts, ids[counts]}, 12 + 4*counts bytes.
RELEASE_2 = h("02000100 ffff0000 02000000 01000080 02000080")
RELEASE_1 = h("02000100 ffff0000 01000000 05000080")
RELEASE_0 = h("02000100 ffff0000 00000000")


def test_async_release_bytes() -> None:
    """qtee-kernel.md §3.5: async RELEASE message layout, version 1.2 = 0x00010002."""
    assert wire.encode_async_release([0x80000001, 0x80000002]) == RELEASE_2
    assert wire.encode_async_release([0x80000005]) == RELEASE_1
    assert wire.encode_async_release([]) == RELEASE_0
    assert wire.encode_async_release([7], version=0x00010000) == h(
        "00000100 ffff0000 01000000 07000000"
    )
    with pytest.raises(UsageError):
        wire.encode_async_release([1], version=0)


def test_async_after_callback() -> None:
    """qtee-kernel.md §3.5: async region = tail after the callback; next msg at align8."""
    buf, msg = fresh_callback()
    assert wire.async_offset(msg) == 64
    assert wire.async_offset(None) == 0
    end = wire.write_async(buf, 64, [RELEASE_2, RELEASE_1])
    # RELEASE_2 is 20 bytes -> next message at 64 + align8(20) = 88; RELEASE_1 ends at 104.
    assert end == 104
    expected = outbound(
        CALLBACK_HEAD
        + h("02000100 ffff0000 02000000 01000080 02000080 00000000")
        + h("02000100 ffff0000 01000000 05000080")
    )
    assert bytes(buf) == expected
    batch = wire.decode_async(expected, 64)
    assert batch == wire.AsyncBatch(((0x80000001, 0x80000002), (0x80000005,)), "end")
    # The callback message itself is unchanged by the async tail.
    assert wire.decode_callback(expected) == msg
    wire.clear_async(buf, 64)
    assert bytes(buf) == CALLBACK


def test_async_direct_return_region() -> None:
    """qtee-kernel.md §3.5: after a direct return the async region is the whole buffer."""
    buf = outbound(RELEASE_0 + bytes(4) + RELEASE_1)  # 12 -> next at align8(12) = 16
    assert wire.decode_async(buf) == wire.AsyncBatch(((), (0x80000005,)), "end")


def test_async_stop_version() -> None:
    """qtee-kernel.md §3.5: minor version ignored; major != 1 stops parsing."""
    buf = outbound(
        h("07000100 ffff0000 01000000 09000080")  # v1.7: minor ignored
        + h("00000200 ffff0000 01000000 0a000080")  # v2.0: stop
        + RELEASE_1
    )
    assert wire.decode_async(buf) == wire.AsyncBatch(((0x80000009,),), "version")
    buf = outbound(h("02000000 ffff0000 01000000 0a000080"))  # version 0x00000002: major 0
    assert wire.decode_async(buf) == wire.AsyncBatch((), "version")


def test_async_stop_op() -> None:
    """qtee-kernel.md §3.5: only RELEASE (0xFFFF) is supported; another op stops parsing."""
    buf = outbound(RELEASE_1 + h("02000100 feff0000 01000000 0b000080") + RELEASE_1)
    assert wire.decode_async(buf) == wire.AsyncBatch(((0x80000005,),), "op")


def test_async_stop_end() -> None:
    """qtee-kernel.md §3.5: version 0 means no more messages; loop while > 8 bytes remain."""
    assert wire.decode_async(bytes(OUT)) == wire.AsyncBatch((), "end")
    buf = outbound(RELEASE_1 + bytes(8) + RELEASE_1)  # a zero version at 16 hides the rest
    assert wire.decode_async(buf) == wire.AsyncBatch(((0x80000005,),), "end")
    # Exactly 8 bytes left at 4088: no message is read, even with a valid header there.
    tail = bytearray(OUT)
    tail[4088:] = h("02000100 ffff0000")
    assert wire.decode_async(tail, 4088) == wire.AsyncBatch((), "end")
    # 16 bytes left at 4080: a 1-id RELEASE fits exactly.
    tail = bytearray(OUT)
    tail[4080:] = RELEASE_1
    assert wire.decode_async(tail, 4080) == wire.AsyncBatch(((0x80000005,),), "end")
    # ids running past the buffer are malformed.
    tail = bytearray(OUT)
    tail[4080:] = h("02000100 ffff0000 02000000 05000080")
    with pytest.raises(DecodeError):
        wire.decode_async(tail, 4080)


# --------------------------------------------------------------------------- result codes


def test_result_from_errno_table() -> None:
    """qtee-kernel.md §3.6: qcomtee_msg_set_result mapping."""
    table = {
        0: 0,
        1: 1,
        10: 10,
        0x7FFFFFFF: 0x7FFFFFFF,
        -12: -97,  # ENOMEM -> KMEM
        -19: -90,  # ENODEV -> DEFUNCT
        -28: -99,  # ENOSPC -> BUSY
        -16: -99,  # EBUSY -> BUSY
        -9: -96,  # EBADF -> UNAVAIL
        -22: -96,  # EINVAL -> UNAVAIL
        -5: 1,  # EIO -> ERROR
        -1: 1,
        -96: 1,  # a supplicant's (u32)-96 is just another negative -> ERROR
        -90: 1,
    }
    for err, result in table.items():
        assert wire.result_from_errno(err) == result, err
    with pytest.raises(TypeError):
        wire.result_from_errno(True)


def test_protocol_constants() -> None:
    """qtee-kernel.md §8 MSG line, §3.1, §3.5."""
    assert wire.QCOMTEE_MSG_OBJECT_NULL == 0
    assert wire.QCOMTEE_MSG_OBJECT_ROOT == 1
    assert wire.QCOMTEE_MSG_OBJECT_NS_BIT == 0x80000000
    assert wire.QCOMTEE_MSG_OBJECT_PRIMORDIAL == 0x80000000
    assert wire.QCOMTEE_MSG_OBJECT_OP_MASK == 0xFFFF
    assert wire.QCOMTEE_MSG_OBJECT_OP_RELEASE == 0xFFFF
    assert wire.QCOMTEE_MSG_OBJECT_OP_RETAIN == 0xFFFE
    assert wire.QCOMTEE_RESULT_INBOUND_REQ_NEEDED == 3
    assert wire.MAX_INBOUND_BUFFER_SIZE == 4194304
    assert wire.MAX_OUTBOUND_BUFFER_SIZE == 4096
    assert wire.QCOMTEE_ASYNC_VERSION_1_0 == 0x00010000
    assert wire.QCOMTEE_ASYNC_VERSION_1_1 == 0x00010001
    assert wire.QCOMTEE_ASYNC_VERSION_1_2 == 0x00010002
    assert wire.QCOMTEE_ASYNC_VERSION_CURRENT == 0x00010002


# --------------------------------------------------------------------------- malformed input


def test_decode_rejects_counts_above_bit_15() -> None:
    """qtee-kernel.md §3.3: counts bits 16-31 must be 0."""
    bad = bytearray(EMPTY_INVOKE)
    bad[8:12] = h("00000100")  # counts 0x00010000
    with pytest.raises(DecodeError):
        wire.decode_invoke(bad)
    cb = bytearray(OUT)
    cb[12:16] = h("00008000")  # counts 0x00800000
    with pytest.raises(DecodeError):
        wire.decode_callback(cb)
    resp = bytearray(MIXED_INVOKE)
    resp[8:12] = h("12111100")
    with pytest.raises(DecodeError):
        wire.decode_invoke_response(resp)


def test_decode_rejects_bad_offsets() -> None:
    """qtee-kernel.md §3.4: IB/OB live 8-aligned inside [payload start, end of message)."""
    past = bytearray(ONE_IB_INVOKE)
    past[12:16] = h("20000000")  # IB0 offset 32 = end, size 3 -> past the end
    with pytest.raises(DecodeError):
        wire.decode_invoke(past)
    too_big = bytearray(ONE_IB_INVOKE)
    too_big[16:20] = h("09000000")  # IB0 {24, 9}: 33 > 32
    with pytest.raises(DecodeError):
        wire.decode_invoke(too_big)
    misaligned = bytearray(ONE_IB_INVOKE)
    misaligned[12:16] = h("19000000")  # offset 25
    with pytest.raises(DecodeError):
        wire.decode_invoke(misaligned)
    in_header = bytearray(ONE_IB_INVOKE)
    in_header[12:16] = h("10000000")  # offset 16 < payload start 24
    with pytest.raises(DecodeError):
        wire.decode_invoke(in_header)
    ob_past = bytearray(CALLBACK)
    ob_past[24:28] = h("f80f0000")  # OB0 offset 4088, size 16 -> past 4096
    with pytest.raises(DecodeError):
        wire.decode_callback(ob_past)


def test_decode_rejects_short_or_wrong_sized_buffers() -> None:
    """qtee-kernel.md §3.1 (outbound is exactly 4096 B), §3.2 (12-byte inbound header)."""
    with pytest.raises(DecodeError):
        wire.decode_invoke(EMPTY_INVOKE[:11])
    # counts says 1 IB but the message stops after the header: args do not fit.
    with pytest.raises(DecodeError):
        wire.decode_invoke(ONE_IB_INVOKE[:16])
    with pytest.raises(DecodeError):
        wire.decode_callback(CALLBACK[:4095])
    with pytest.raises(DecodeError):
        wire.decode_callback(CALLBACK + bytes(8))
    with pytest.raises(DecodeError):
        wire.decode_callback(b"")
    _, msg = fresh_callback()
    with pytest.raises(DecodeError):
        wire.decode_callback_response(CALLBACK_RESPONSE_OK[:2048], msg)
    with pytest.raises(DecodeError):
        wire.decode_invoke_response(b"\x00" * 8)


def test_encode_rejects_bad_outbound_buffer() -> None:
    """qtee-kernel.md §3.1: callbacks and async messages live in a 4096-byte buffer."""
    with pytest.raises(UsageError):
        wire.encode_callback(bytearray(4095), 0x80000001, 0)
    with pytest.raises(UsageError):
        wire.encode_callback(bytes(OUT), 0x80000001, 0)  # type: ignore[arg-type]
    with pytest.raises(wire.MessageTooLarge):
        wire.encode_callback(bytearray(OUT), 0x80000001, 0, ib=[bytes(4081)])
    with pytest.raises(UsageError):
        wire.encode_invoke(2**32, 0)
