"""Properties of the uAPI records (qtee/uapi.py; spec §1.4).

The field layouts below are written out from the spec, independently of the structs in
qtee/uapi.py: every packed field is read back at its spec offset.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from objects import DecodeError, UsageError
from qtee import uapi
from qtee.uapi import (
    BufData,
    CancelArg,
    CloseSessionArg,
    InvokeArg,
    ObjectInvokeArg,
    OpenSessionArg,
    Param,
    ShmAllocData,
    ShmRegisterData,
    ShmRegisterFdData,
    SuppRecvArg,
    SuppSendArg,
    VersionData,
    pack_arg,
    pack_params,
    unpack_arg,
    unpack_params,
)

# (field, struct code at that offset, offset); codes: Q/I unsigned, q/i signed, 16s uuid
LAYOUTS: dict[type, tuple[int, list[tuple[str, str, int]]]] = {
    BufData: (16, [("buf_ptr", "Q", 0), ("buf_len", "Q", 8)]),
    Param: (32, [("attr", "Q", 0), ("a", "Q", 8), ("b", "Q", 16), ("c", "Q", 24)]),
    VersionData: (12, [("impl_id", "I", 0), ("impl_caps", "I", 4), ("gen_caps", "I", 8)]),
    ShmAllocData: (16, [("size", "Q", 0), ("flags", "I", 8), ("id", "i", 12)]),
    ShmRegisterData: (
        24,
        [("addr", "Q", 0), ("length", "Q", 8), ("flags", "I", 16), ("id", "i", 20)],
    ),
    ShmRegisterFdData: (
        24,
        [("fd", "q", 0), ("size", "Q", 8), ("flags", "I", 16), ("id", "i", 20)],
    ),
    CancelArg: (8, [("cancel_id", "I", 0), ("session", "I", 4)]),
    CloseSessionArg: (4, [("session", "I", 0)]),
    ObjectInvokeArg: (
        24,
        [("id", "Q", 0), ("op", "I", 8), ("ret", "I", 12), ("num_params", "I", 16)],
    ),
    SuppRecvArg: (8, [("func", "I", 0), ("num_params", "I", 4)]),
    SuppSendArg: (8, [("ret", "I", 0), ("num_params", "I", 4)]),
    OpenSessionArg: (
        56,
        [
            ("uuid", "16s", 0),
            ("clnt_uuid", "16s", 16),
            ("clnt_login", "I", 32),
            ("cancel_id", "I", 36),
            ("session", "I", 40),
            ("ret", "I", 44),
            ("ret_origin", "I", 48),
            ("num_params", "I", 52),
        ],
    ),
    InvokeArg: (
        24,
        [
            ("func", "I", 0),
            ("session", "I", 4),
            ("cancel_id", "I", 8),
            ("ret", "I", 12),
            ("ret_origin", "I", 16),
            ("num_params", "I", 20),
        ],
    ),
}
RECORDS = list(LAYOUTS)
HEADERS = [ObjectInvokeArg, SuppRecvArg, SuppSendArg, OpenSessionArg, InvokeArg]

RANGES = {
    "Q": (0, 2**64 - 1),
    "q": (-(2**63), 2**63 - 1),
    "I": (0, 2**32 - 1),
    "i": (-(2**31), 2**31 - 1),
}


def field_strategy(code: str) -> st.SearchStrategy[object]:
    if code == "16s":
        return st.binary(min_size=16, max_size=16)
    lo, hi = RANGES[code]
    return st.one_of(st.integers(lo, hi), st.sampled_from([lo, hi, 0]))


def record_strategy(cls: type) -> st.SearchStrategy[object]:
    _, fields = LAYOUTS[cls]
    return st.fixed_dictionaries({name: field_strategy(code) for name, code, _ in fields}).map(
        lambda kw: cls(**kw)
    )


def test_every_record_is_covered() -> None:
    """Each record class in qtee/uapi.py has a layout here (a new one must be added)."""
    defined = {
        v
        for v in vars(uapi).values()
        if isinstance(v, type) and issubclass(v, uapi._Record) and v is not uapi._Record
    }
    assert defined == set(RECORDS)
    for cls, (size, _) in LAYOUTS.items():
        assert size == cls.SIZE, cls.__name__


@pytest.mark.parametrize("cls", RECORDS, ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_record_round_trip(cls: type, data: st.DataObject) -> None:
    size, fields = LAYOUTS[cls]
    rec = data.draw(record_strategy(cls))
    packed = rec.pack()
    assert type(packed) is bytes
    assert len(packed) == size
    covered = bytearray(size)
    for name, code, off in fields:
        assert struct.unpack_from("<" + code, packed, off)[0] == getattr(rec, name), name
        covered[off : off + struct.calcsize("<" + code)] = b"\xff" * struct.calcsize("<" + code)
    # bytes no field covers (the padding of object_invoke_arg) are zero
    assert all(b == 0 for b, c in zip(packed, covered, strict=True) if not c)
    assert cls.unpack(packed) == rec
    # at an offset inside a bigger buffer
    pad = data.draw(st.integers(0, 16))
    buf = bytearray(b"\xaa" * (pad + size + 3))
    rec.pack_into(buf, pad)
    assert buf[pad : pad + size] == packed
    assert buf[:pad] == b"\xaa" * pad and buf[pad + size :] == b"\xaa\xaa\xaa"
    assert cls.unpack(bytes(buf), pad) == rec
    assert cls.unpack(memoryview(buf), pad) == rec
    with pytest.raises(UsageError):
        rec.pack_into(bytearray(size - 1))
    with pytest.raises(UsageError):
        rec.pack_into(bytearray(size + 4), 5)
    with pytest.raises(UsageError):
        rec.pack_into(bytearray(size), -1)


@pytest.mark.parametrize("cls", RECORDS, ids=lambda c: c.__name__)
def test_record_field_ranges(cls: type) -> None:
    _, fields = LAYOUTS[cls]
    good = {name: (b"\0" * 16 if code == "16s" else 0) for name, code, _ in fields}
    cls(**good)
    for name, code, _ in fields:
        if code == "16s":
            for bad_uuid in (b"\0" * 15, b"\0" * 17, "x" * 16, bytearray(16)):
                with pytest.raises(UsageError):
                    cls(**{**good, name: bad_uuid})
            continue
        lo, hi = RANGES[code]
        for bad in (lo - 1, hi + 1):
            with pytest.raises(UsageError):
                cls(**{**good, name: bad})
        for bad_type in (True, 1.0, "1", None):
            with pytest.raises(TypeError):
                cls(**{**good, name: bad_type})


param_strategy = record_strategy(Param)


@pytest.mark.parametrize("cls", HEADERS, ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_arg_block_round_trip(cls: type, data: st.DataObject) -> None:
    params = data.draw(st.lists(param_strategy, max_size=10))
    header = data.draw(record_strategy(cls))
    header = type(header)(**{**_fields_of(header), "num_params": len(params)})
    blob = pack_arg(header, params)
    assert len(blob) == cls.SIZE + 32 * len(params)
    assert blob[: cls.SIZE] == header.pack()
    assert blob[cls.SIZE :] == pack_params(params)
    assert unpack_arg(cls, blob) == (header, tuple(params))
    # trailing bytes are ignored (SUPPL_SEND accepts a larger buffer)
    assert unpack_arg(cls, blob + b"\x01" * 40) == (header, tuple(params))
    if params:
        with pytest.raises(DecodeError):
            unpack_arg(cls, blob[:-1])
    with pytest.raises(UsageError):
        pack_arg(header, [*params, Param(1)])


def _fields_of(rec: object) -> dict[str, object]:
    return {name: getattr(rec, name) for name, _, _ in LAYOUTS[type(rec)][1]}


def test_pack_params_rejects_non_params() -> None:
    with pytest.raises(TypeError):
        pack_params([Param(1), (1, 2, 3, 4)])  # type: ignore[list-item]
    assert pack_params([]) == b""


def test_param_type_property() -> None:
    assert Param(0x10B).type == 11
    assert Param(uapi.TEE_IOCTL_PARAM_ATTR_META | 9).type == 9


# --------------------------------------------------------------------------- fuzzing

FUZZ = settings(max_examples=5000, deadline=None)


@FUZZ
@given(st.sampled_from(RECORDS), st.binary(max_size=80), st.integers(-4, 84))
def test_fuzz_unpack(cls: type, buf: bytes, offset: int) -> None:
    """unpack of any bytes at any offset gives a record that packs back to them, or DecodeError."""
    try:
        rec = cls.unpack(buf, offset)
    except DecodeError:
        assert offset < 0 or len(buf) - offset < cls.SIZE
        return
    packed = rec.pack()
    if cls is ObjectInvokeArg:  # the 4 padding bytes are not kept
        assert packed == buf[offset : offset + 20] + bytes(4)
    else:
        assert packed == buf[offset : offset + cls.SIZE]


@FUZZ
@given(
    st.sampled_from(HEADERS),
    st.binary(max_size=24 + 32 * 5),
    st.one_of(st.none(), st.integers(0, 6)),
)
def test_fuzz_unpack_arg(cls: type, buf: bytes, num_params: int | None) -> None:
    """unpack_arg of any bytes gives a header and num_params params, or DecodeError."""
    if num_params is not None and len(buf) >= cls.SIZE:  # a plausible count
        off = next(o for n, _, o in LAYOUTS[cls][1] if n == "num_params")
        buf = buf[:off] + struct.pack("<I", num_params) + buf[off + 4 :]
    try:
        header, params = unpack_arg(cls, buf)
    except DecodeError:
        return
    assert len(params) == header.num_params
    assert len(buf) >= cls.SIZE + 32 * len(params)
    assert pack_params(params) == buf[cls.SIZE : cls.SIZE + 32 * len(params)]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=100), st.integers(-40, 100), st.integers(-2, 2**32))
def test_fuzz_unpack_params(buf: bytes, offset: int, count: int) -> None:
    """unpack_params reads exactly count in-bounds params or raises DecodeError."""
    try:
        params = unpack_params(buf, offset, count)
    except DecodeError:
        assert count < 0 or offset < 0 or len(buf) - offset < 32 * count
        return
    assert len(params) == count
    assert b"".join(p.pack() for p in params) == buf[offset : offset + 32 * count]
