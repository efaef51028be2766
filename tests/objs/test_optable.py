"""Declarative op tables checked like a Mink IDL skeleton (quic-teec.md §5.2, §5.3)."""

from __future__ import annotations

import struct

import pytest

from objects import DispatchResult, OpSpec, PyObject, QteeError, UsageError, op
from qtee import Result


class Example(PyObject):
    """ISMCIExample-like: op 0 add({u32,u32} -> u32) (quic-teec.md §5.3)."""

    def __init__(self) -> None:
        self.calls = 0

    @op(0, ib=(8,), ob=(4,))
    def add(self, pair: bytes) -> bytes:
        self.calls += 1
        a, b = struct.unpack("<II", pair)
        return struct.pack("<I", (a + b) & 0xFFFFFFFF)

    @op(1, ib=(None,), ob=(None,))
    def echo(self, data: bytes) -> bytes:
        return data

    @op(2, io=1, oo=2)
    def twice(self, obj: object) -> tuple[object, object]:
        return obj, obj

    @op(3)
    def fail(self) -> None:
        raise QteeError(12, "user error")

    @op(4)
    def crash(self) -> None:
        raise RuntimeError("bug in a TA")

    @op(5, ob=(4,))
    def wrong_arity(self) -> tuple[bytes, bytes]:
        return b"1234", b"5678"


def test_add_dispatches_and_packs_output() -> None:
    obj = Example()
    res = obj.dispatch(0, (struct.pack("<II", 1, 2),), (4,), (), 0)
    assert res == DispatchResult(Result.OK, (b"\x03\x00\x00\x00",), ())
    assert obj.calls == 1


@pytest.mark.parametrize(
    ("ib", "ob", "io", "n_oo"),
    [
        ((b"\x00" * 7,), (4,), (), 0),  # fixed IB size mismatch
        ((b"\x00" * 8,), (8,), (), 0),  # fixed OB size mismatch
        ((), (4,), (), 0),  # missing IB
        ((b"\x00" * 8,), (4,), (None,), 0),  # extra IO
        ((b"\x00" * 8,), (4,), (), 1),  # extra OO
    ],
)
def test_wrong_shape_is_invalid_without_dispatch(
    ib: tuple[bytes, ...], ob: tuple[int, ...], io: tuple[object, ...], n_oo: int
) -> None:
    obj = Example()
    assert obj.dispatch(0, ib, ob, io, n_oo).result == Result.ERROR_INVALID
    assert obj.calls == 0


def test_unknown_op_is_invalid() -> None:
    res = Example().dispatch(99, (), (), (), 0)
    assert res[:3] == (Result.ERROR_INVALID, (), ())
    assert (res.name, res.detail) == (
        "ERROR_INVALID",
        "op 99 not in Example's table (ops: 0, 1, 2, 3, 4, 5)",
    )
    assert not Example().supports(99)
    assert Example().supports(0)


def test_any_size_buffers_and_size_out() -> None:
    obj = Example()
    assert obj.dispatch(1, (b"hello",), (5,), (), 0).ob == (b"hello",)
    # The method wrote more than the caller's capacity: SIZE_OUT, nothing returned.
    res = obj.dispatch(1, (b"hello",), (4,), (), 0)
    assert res[:3] == (Result.ERROR_SIZE_OUT, (), ())
    assert res.detail == "ob[0]: Example.echo returned 5 bytes, capacity 4"


def test_objects_in_and_out() -> None:
    token = object()
    res = Example().dispatch(2, (), (), (token,), 2)
    assert res.result == Result.OK
    assert res.oo == (token, token)


def test_qtee_error_result_passes_through_and_exceptions_become_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    obj = Example()
    assert obj.dispatch(3, (), (), (), 0) == DispatchResult(12, (), (), "USERBASE+2", "user error")
    crash = obj.dispatch(4, (), (), (), 0)
    assert crash == DispatchResult(
        Result.ERROR, (), (), "ERROR", "Example.crash raised RuntimeError: bug in a TA"
    )
    assert "crash (op 4) raised" in caplog.text
    arity = obj.dispatch(5, (), (4,), (), 0)
    assert arity == DispatchResult(
        Result.ERROR, (), (), "ERROR", "Example.wrong_arity: output buffer 0 is a tuple, not bytes"
    )


def test_op_table_is_inherited_and_extended() -> None:
    class Derived(Example):
        @op(6)
        def extra(self) -> None:
            return None

    assert set(Derived.__ops__) == {0, 1, 2, 3, 4, 5, 6}
    assert set(Example.__ops__) == {0, 1, 2, 3, 4, 5}
    assert Derived().dispatch(6, (), (), (), 0) == DispatchResult(Result.OK)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"op": 0xFFFF, "name": "release"},
        {"op": 0xFFFE, "name": "retain"},
        {"op": 0x10000, "name": "big"},
        {"op": 0, "name": "x", "ib": (-1,)},
        {"op": 0, "name": "x", "io": 16},
        {"op": 0, "name": "x", "ob": (None,) * 16},
    ],
)
def test_bad_specs_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        OpSpec(**kwargs)  # type: ignore[arg-type]
