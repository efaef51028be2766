"""A stub refuses a wrong argument itself, naming the interface, method and parameter.

Issue 19 point 4 (stubs): what cannot be packed raises :class:`objects.UsageError`
before anything is invoked, saying which parameter and what it got: a non-object where
the IDL has an object (it was sent as an extra buffer and refused by the far side), a
wrong primitive, struct or buffer, and a mistyped keyword (naming both the unexpected
and the missing keyword).
"""

from __future__ import annotations

import textwrap
from typing import Any

import pytest

from objects import UsageError
from objects.idl import load, parse_idl

IDL = textwrap.dedent(
    """\
    struct IFoo_Point { uint32 x; uint32 y; uint64 tag; };
    interface IBar { method ping(in buffer msg, out buffer reply); };
    interface IFoo {
      method move(in IFoo_Point p, in uint32 dx, out IFoo_Point moved);
      method echo(in buffer data, out buffer result);
      method callBar(in IBar bar, in buffer msg, out buffer reply);
      method many(in IBar[2] bars);
    };
    """
)
NS = load(parse_idl(IDL, "IFoo.idl"))


class _Recorder:
    """An invocable handle that records what reaches it (nothing should)."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def invoke(self, op: int, ib: Any, ob: Any, io: Any, n_oo: int) -> Any:
        self.calls.append(op)
        raise AssertionError("invoked")


CASES = [
    (
        lambda s: s.callBar(b"nope", b"hi", reply_len=8),
        "IFoo.callBar: bar must be an object (a stub, an invocable handle, a local object) "
        "or None, not bytes",
    ),
    (
        lambda s: s.many([None, 3]),
        "IFoo.many: bars[1] must be an object (a stub, an invocable handle, a local object) "
        "or None, not int",
    ),
    (lambda s: s.move(5, 1), "IFoo.move: p: a IFoo_Point value needs a field 'x'; int has none"),
    (
        lambda s: s.move({"x": 1, "y": 2}, 1),
        "IFoo.move: p: a IFoo_Point value has no field 'tag'",
    ),
    (lambda s: s.move(NS.IFoo_Point(1, 2, 3), "x"), "IFoo.move: dx is a uint32: an int, not 'x'"),
    (lambda s: s.echo(5, result_len=4), "IFoo.echo: data is a buffer: bytes, not int"),
    (
        lambda s: s.echo(b"x", result=8),
        "IFoo.echo(self, /, data, *, result_len): unexpected keyword 'result'; "
        "missing keyword 'result_len'",
    ),
]


@pytest.mark.parametrize(("call", "message"), CASES)
def test_stub_refuses_before_invoking(call: Any, message: str) -> None:
    """The message names the interface, method, parameter and what was given; the
    object is never invoked."""
    handle = _Recorder()
    with pytest.raises(UsageError) as exc:
        call(NS.IFoo.Stub(handle))
    assert str(exc.value) == message
    assert handle.calls == []


def test_objects_of_every_kind_are_accepted() -> None:
    """None, a stub, a local object and an invocable handle go where an object goes."""
    seen: list[object] = []

    class Foo(NS.IFoo.Skeleton):  # type: ignore[misc, name-defined]
        def many(self, bars: tuple[object, ...]) -> None:
            seen.extend(bars)

    class Bar(NS.IBar.Skeleton):  # type: ignore[misc, name-defined]
        pass

    bar = Bar()
    stub = NS.IFoo.Stub(Foo())
    stub.many([None, bar])
    stub.many([NS.IBar.Stub(bar), None])
    assert [type(x).__qualname__ for x in seen] == [
        "NoneType",
        "IBar.Stub",
        "IBar.Stub",
        "NoneType",
    ]
