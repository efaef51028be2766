"""Objects written in Python, with a declarative op table (an IDL skeleton).

An interface method is declared once with :func:`op`: its op number and the shape of
its arguments (fixed sizes of input and output buffers, or ``None`` for "any size";
numbers of input and output objects).  :meth:`PyObject.dispatch` checks a call against
the table exactly as a Mink IDL skeleton does -- unknown op, wrong counts or a fixed
size that does not match -> ``ERROR_INVALID`` without calling the method -- then calls
the method with the input buffers and objects and packs what it returns.

A method returns its outputs in order: one ``bytes`` per output buffer, then one object
per output object (a single value may be returned bare, ``None`` when there are none).
It fails by raising :class:`QteeError` with the result to report.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Final, NamedTuple, TypeVar

from objects._errors import QteeError, UsageError
from objects._results import Result

__all__ = ["DispatchResult", "OpSpec", "PyObject", "op"]

_BYTES_LIKE: Final = (bytes, bytearray, memoryview)  # (a tuple: a union is built per call)

log = logging.getLogger("qtee.objects")

_OP_ATTR = "__qtee_op__"
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class OpSpec:
    """One method of an interface: op number, name and argument shape."""

    op: int
    name: str
    ib: tuple[int | None, ...] = ()
    ob: tuple[int | None, ...] = ()
    io: int = 0
    oo: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.op, int) or not 0 <= self.op <= 0xFFFF:
            raise UsageError(f"op {self.op!r} of {self.name} must be in 0..0xFFFF")
        if self.op in (0xFFFE, 0xFFFF):
            raise UsageError(f"op {self.op:#x} is reserved for retain/release")
        for kind, sizes in (("ib", self.ib), ("ob", self.ob)):
            if len(sizes) > 15:
                raise UsageError(f"{self.name}: at most 15 {kind} arguments")
            for s in sizes:
                if s is not None and (not isinstance(s, int) or s < 0):
                    raise UsageError(f"{self.name}: {kind} size {s!r} must be None or >= 0")
        for kind, n in (("io", self.io), ("oo", self.oo)):
            if not isinstance(n, int) or not 0 <= n <= 15:
                raise UsageError(f"{self.name}: {kind} count {n!r} must be in 0..15")

    def accepts(self, ib: tuple[bytes, ...], ob: tuple[int, ...], n_io: int, n_oo: int) -> bool:
        """True when the call has exactly this shape (fixed sizes must match)."""
        if n_io != self.io or n_oo != self.oo or len(ib) != len(self.ib) or len(ob) != len(self.ob):
            return False
        if ib:
            for data, size in zip(ib, self.ib, strict=True):
                if size is not None and len(data) != size:
                    return False
        if ob:
            for cap, size in zip(ob, self.ob, strict=True):
                if size is not None and cap != size:
                    return False
        return True


def op(
    number: int,
    *,
    ib: tuple[int | None, ...] = (),
    ob: tuple[int | None, ...] = (),
    io: int = 0,
    oo: int = 0,
) -> Callable[[F], F]:
    """Declare a method as interface op ``number`` with the given argument shape."""

    def mark(fn: F) -> F:
        setattr(fn, _OP_ATTR, OpSpec(number, fn.__name__, tuple(ib), tuple(ob), io, oo))
        return fn

    return mark


class DispatchResult(NamedTuple):
    """What a dispatch produced: the result and, on OK, the outputs (immutable)."""

    result: int
    ob: tuple[bytes, ...] = ()
    oo: tuple[object, ...] = ()


_OK = DispatchResult(0)
_INVALID = DispatchResult(Result.ERROR_INVALID)
_ERROR = DispatchResult(Result.ERROR)


class PyObject:
    """Base class of objects written in Python; subclasses declare ops with :func:`op`."""

    __ops__: ClassVar[dict[int, OpSpec]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        table: dict[int, OpSpec] = {}
        for klass in reversed(cls.__mro__):
            for attr in vars(klass).values():
                spec = getattr(attr, _OP_ATTR, None)
                if isinstance(spec, OpSpec):
                    table[spec.op] = spec
        names: dict[int, str] = {}
        for spec in table.values():
            if spec.op in names and names[spec.op] != spec.name:
                raise UsageError(f"{cls.__name__}: op {spec.op} declared twice")
            names[spec.op] = spec.name
        cls.__ops__ = table

    def supports(self, number: int) -> bool:
        """True when the op table has ``number`` (the ``supported()`` pre-filter)."""
        return number in self.__ops__

    def dispatch(
        self,
        number: int,
        ib: tuple[bytes, ...],
        ob: tuple[int, ...],
        io: tuple[object, ...],
        n_oo: int,
    ) -> DispatchResult:
        """Check the call against the op table, run the method, pack its outputs."""
        spec = self.__ops__.get(number)
        if spec is None or not spec.accepts(ib, ob, len(io), n_oo):
            return _INVALID
        try:
            out = getattr(self, spec.name)(*ib, *io)
        except QteeError as exc:
            return DispatchResult(exc.result)
        except Exception:
            log.exception("%s.%s (op %d) raised", type(self).__name__, spec.name, number)
            return _ERROR
        if not ob and not n_oo and out is None:
            return _OK
        values = _as_tuple(out, len(ob) + n_oo)
        if values is None:
            log.error(
                "%s.%s returned %r, expected %d outputs",
                type(self).__name__,
                spec.name,
                out,
                len(ob) + n_oo,
            )
            return _ERROR
        data = values[: len(ob)]
        for k, (chunk, cap) in enumerate(zip(data, ob, strict=True)):
            if not isinstance(chunk, _BYTES_LIKE):
                log.error(
                    "%s.%s: output buffer %d is a %s",
                    type(self).__name__,
                    spec.name,
                    k,
                    type(chunk).__name__,
                )
                return DispatchResult(Result.ERROR)
            if len(chunk) > cap:
                return DispatchResult(Result.ERROR_SIZE_OUT)
        return DispatchResult(Result.OK, tuple(bytes(c) for c in data), tuple(values[len(ob) :]))


def _as_tuple(out: object, n: int) -> tuple[Any, ...] | None:
    if n == 0:
        return () if out is None else None
    if n == 1:
        return (out,)
    if isinstance(out, tuple) and len(out) == n:
        return out
    return None
