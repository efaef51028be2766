"""The codec's no-args fast paths (qtee/wire.py) give exactly what its general paths give.

A null call, a RELEASE and a bare callback skip the layout and the parse; each case here
runs the same call once on the fast path (the empty tuple, a zero counts word, no outputs)
and once on the general one (an empty list, or the general function called directly),
and requires the same bytes, the same result, or the same exception and message.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest

from objects import DecodeError
from qtee import wire
from qtee.wire import (
    MAX_OUTBOUND_BUFFER_SIZE,
    CallbackMsg,
    InvokeMsg,
    decode_callback,
    decode_callback_response,
    decode_invoke,
    encode_callback_msg,
    encode_invoke,
    write_callback_response,
)

_IDS = [0, 1, 2, 0x8000_0001, 0xFFFF_FFFF, -1, 1 << 32, "x", None, 1.0]
_N_OO = [0, False, 0.0, None, -0.0, 1]


def _outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return "ok", fn()
    except Exception as exc:  # the verdict: its type and message
        return type(exc).__name__, str(exc)


@pytest.mark.parametrize("cxt", _IDS)
@pytest.mark.parametrize("op", [0, 3, 0xFFFF, -1, "op"])
@pytest.mark.parametrize("n_oo", _N_OO)
def test_encode_invoke_no_args(cxt: Any, op: Any, n_oo: Any) -> None:
    fast = _outcome(lambda: encode_invoke(cxt, op, (), (), (), n_oo))
    general = _outcome(lambda: encode_invoke(cxt, op, [], [], [], n_oo))
    assert fast == general
    wrapped = _outcome(lambda: wire._encode_inbound(cxt, op, (), (), (), n_oo))
    assert wrapped == _outcome(lambda: wire._encode_inbound(cxt, op, [], [], [], n_oo))


@pytest.mark.parametrize("cxt", _IDS)
@pytest.mark.parametrize("op", [0, 7, -1, "op"])
@pytest.mark.parametrize("n_oo", _N_OO)
def test_encode_callback_no_args(cxt: Any, op: Any, n_oo: Any) -> None:
    fast_buf, general_buf = bytearray(MAX_OUTBOUND_BUFFER_SIZE), bytearray(MAX_OUTBOUND_BUFFER_SIZE)
    fast = _outcome(lambda: encode_callback_msg(fast_buf, cxt, op, (), (), (), n_oo))
    general = _outcome(lambda: encode_callback_msg(general_buf, cxt, op, [], [], [], n_oo))
    assert fast == general
    assert fast_buf == general_buf
    if fast[0] == "ok":
        assert fast[1] == decode_callback(fast_buf)


@pytest.mark.parametrize("buf", [bytearray(100), memoryview(bytearray(8)), b"x", 5])
def test_encode_callback_no_args_bad_buffer(buf: Any) -> None:
    assert _outcome(lambda: encode_callback_msg(buf, 1, 0)) == _outcome(
        lambda: encode_callback_msg(buf, 1, 0, [], [], [], 0)
    )


@pytest.mark.parametrize("length", range(12, 25))
@pytest.mark.parametrize("counts", [0, 1 << 16, 0x10])
def test_decode_invoke_no_args(length: int, counts: int) -> None:
    buf = bytearray(length)
    struct.pack_into("<3I", buf, 0, 0x1234, 9, counts)
    fast = _outcome(lambda: decode_invoke(buf))
    general = _outcome(lambda: wire._decode(buf, 12, InvokeMsg, 0x1234, 9, counts, "inbound"))
    assert fast == general


@pytest.mark.parametrize("counts", [0, 1 << 16])
def test_decode_callback_no_args(counts: int) -> None:
    buf = bytearray(MAX_OUTBOUND_BUFFER_SIZE)
    struct.pack_into("<4I", buf, 0, 0, 0x8000_0002, 3, counts)
    fast = _outcome(lambda: decode_callback(buf))
    general = _outcome(
        lambda: wire._decode(buf, 16, CallbackMsg, 0x8000_0002, 3, counts, "callback")
    )
    assert fast == general


@pytest.mark.parametrize("result", [0, 0xFFFF_FFA0, 5])
@pytest.mark.parametrize("counts", [0, 1 << 16, 0x1000])
def test_decode_callback_response_no_outputs(result: int, counts: int) -> None:
    buf = bytearray(MAX_OUTBOUND_BUFFER_SIZE)
    struct.pack_into("<4I", buf, 0, result, 0x8000_0002, 3, counts)
    msg = wire._new(CallbackMsg, (0x8000_0002, 3, counts, (), (), (), 0, 16))
    fast = _outcome(lambda: decode_callback_response(buf, msg))
    signed = result - (1 << 32) if result & 0x8000_0000 else result
    if signed:
        general: tuple[str, Any] = ("ok", (signed, (), ()))
    else:
        general = _outcome(lambda: (0, *wire._read_outputs(buf, 16, "callback response")))
    assert fast == general


@pytest.mark.parametrize(
    ("counts", "ob", "ob_data", "oo_ids"),
    [
        (0, (), (), ()),
        (0, (), [], []),
        (0, (), [b"x"], ()),
        (0, (), (), [5]),
        (0, (wire.BufRef(16, 8),), (), ()),
        (1 << 4, (wire.BufRef(24, 8),), [b"ab"], ()),
        (1 << 12, (), (), [0x8000_0003]),
        (1 << 12, (), (), ()),
        (1 << 16, (), (), ()),
    ],
)
def test_write_callback_response_no_outputs(
    counts: int, ob: tuple[wire.BufRef, ...], ob_data: Any, oo_ids: Any
) -> None:
    msg = wire._new(CallbackMsg, (0x8000_0002, 3, counts, (), ob, (), 0, 32))
    fast_buf, general_buf = bytearray(MAX_OUTBOUND_BUFFER_SIZE), bytearray(MAX_OUTBOUND_BUFFER_SIZE)
    fast = _outcome(lambda: write_callback_response(fast_buf, msg, 0, ob_data, oo_ids))

    def general() -> None:
        wire._write_outputs(
            general_buf, 16, msg.counts, msg.ob, ob_data, oo_ids, "callback response"
        )
        struct.pack_into("<I", general_buf, 0, 0)

    assert fast == _outcome(general)
    assert fast_buf == general_buf


def test_decode_error_is_the_general_one() -> None:
    """A short header-only message still fails as the general path says."""
    with pytest.raises(DecodeError, match="1 args need 24 bytes"):
        decode_invoke(struct.pack("<3I4x", 1, 0, 1 << 8))
