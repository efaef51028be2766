"""Objects written in Python, with a declarative op table (an IDL skeleton).

An interface method is declared once with :func:`op`: its op number and the shape of
its arguments (fixed sizes of input and output buffers, or ``None`` for "any size";
numbers of input and output objects).  :meth:`PyObject.dispatch` checks a call against
the table exactly as a Mink IDL skeleton does -- unknown op, wrong counts or a fixed
size that does not match -> ``ERROR_INVALID`` without calling the method -- then calls
the method with the input buffers and objects and packs what it returns.

A method returns its outputs in order: one ``bytes`` per output buffer, then one object
per output object (a single value may be returned bare, ``None`` when there are none).
An output buffer longer than the caller's capacity is ``ERROR_SIZE_OUT`` (Mink's answer
for an output that does not fit) and nothing is returned.  A method that wants to fill
an output buffer up to its capacity (as a Mink skeleton's implementation writes into
the BO it is given) declares ``capacities=True``: it is then called with the keyword
``capacities``, the capacity of each output buffer in order.

A method fails by raising :class:`QteeError` with the result to report.  An interface's
errors are an ``IntEnum`` named after it (members ``ERROR_...``, values from 10): raise
its members, or declare it as the class's ``ERRORS`` so that plain numbers get its names
too.  A failed dispatch says why in :attr:`DispatchResult.name` and
:attr:`DispatchResult.detail` (the reason the method gave, or which check failed: "op 7
not in Adder's table", "ib[0] is 5 bytes, op 0 (add) takes 8"); both are the model's
own and never reach the wire.
"""

from __future__ import annotations

import enum
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Final, NamedTuple, TypeVar

from objects._errors import QteeError, UsageError
from objects._results import Result, result_name

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
    #: The method is called with ``capacities=`` (each output buffer's capacity).
    capacities: bool = False

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
        if not isinstance(self.capacities, bool):
            raise UsageError(f"{self.name}: capacities must be a bool")
        if self.capacities and not self.ob:
            raise UsageError(f"{self.name}: capacities=True needs output buffers (ob=...)")

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

    def mismatch(
        self, ib: tuple[bytes, ...], ob: tuple[int, ...], n_io: int, n_oo: int
    ) -> str | None:
        """Why the call does not have this shape (None: it has); the first difference."""
        this = f"op {self.op} ({self.name})"
        for what, want, got in (
            ("input buffer", len(self.ib), len(ib)),
            ("output buffer", len(self.ob), len(ob)),
            ("input object", self.io, n_io),
            ("output object", self.oo, n_oo),
        ):
            if want != got:
                return f"{this} takes {_count(want, what)}, not {got}"
        for k, (data, size) in enumerate(zip(ib, self.ib, strict=True)):
            if size is not None and len(data) != size:
                return f"ib[{k}] is {_count(len(data), 'byte')}, {this} takes {size}"
        for k, (cap, size) in enumerate(zip(ob, self.ob, strict=True)):
            if size is not None and cap != size:
                return f"ob[{k}] has room for {_count(cap, 'byte')}, {this} gives {size}"
        return None


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def op(
    number: int,
    *,
    ib: tuple[int | None, ...] = (),
    ob: tuple[int | None, ...] = (),
    io: int = 0,
    oo: int = 0,
    capacities: bool = False,
) -> Callable[[F], F]:
    """Declare a method as interface op ``number`` with the given argument shape.

    ``capacities=True``: the method is also called with the keyword ``capacities``, a
    tuple of each output buffer's capacity (what the caller's ``Out(n)`` offers), so it
    can fill a buffer up to its size; returning more is still ``ERROR_SIZE_OUT``."""

    def mark(fn: F) -> F:
        spec = OpSpec(number, fn.__name__, tuple(ib), tuple(ob), io, oo, capacities)
        if capacities and not _takes_keyword(fn, "capacities"):
            raise UsageError(f"{fn.__name__}: capacities=True needs a 'capacities' parameter")
        setattr(fn, _OP_ATTR, spec)
        return fn

    return mark


def _takes_keyword(fn: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature to read: trust the declaration
        return True
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return True
    p = params.get(name)
    return p is not None and p.kind is not inspect.Parameter.POSITIONAL_ONLY


class DispatchResult(NamedTuple):
    """What a dispatch produced: the result and, on OK, the outputs (immutable).

    On failure ``name`` names the result (``IAppLoader.ERROR_INVALID_BUFFER``,
    ``ERROR_INVALID``) and ``detail`` says why, when known: model-only, never on the wire.
    """

    result: int
    ob: tuple[bytes, ...] = ()
    oo: tuple[object, ...] = ()
    name: str = ""
    detail: str = ""


_OK = DispatchResult(0)


def _failed(result: int, detail: str, name: str = "") -> DispatchResult:
    return DispatchResult(result, (), (), name or result_name(result), detail)


class PyObject:
    """Base class of objects written in Python; subclasses declare ops with :func:`op`."""

    __ops__: ClassVar[dict[int, OpSpec]] = {}
    #: The interface's errors (an ``IntEnum``, values from 10), or None: names what a
    #: method raises as a plain number.
    ERRORS: ClassVar[type[enum.IntEnum] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "ERRORS" in cls.__dict__:
            _check_errors(cls.__name__, cls.__dict__["ERRORS"])
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
        if spec is None:
            return _failed(Result.ERROR_INVALID, self._not_in_table(number))
        if not spec.accepts(ib, ob, len(io), n_oo):
            return _failed(Result.ERROR_INVALID, spec.mismatch(ib, ob, len(io), n_oo) or "")
        try:
            if spec.capacities:
                out = getattr(self, spec.name)(*ib, *io, capacities=ob)
            else:
                out = getattr(self, spec.name)(*ib, *io)
        except QteeError as exc:
            return _failed(exc.result, exc.detail, self._error_name(exc))
        except Exception as exc:
            log.exception("%s.%s (op %d) raised", type(self).__name__, spec.name, number)
            return _failed(Result.ERROR, f"{self._method(spec)} raised {_exc_text(exc)}")
        if not ob and not n_oo and out is None:
            return _OK
        values = _as_tuple(out, len(ob) + n_oo)
        if values is None:
            outputs = _count(len(ob) + n_oo, "output")
            why = f"{self._method(spec)} returned {_shape(out)}, op {number} has {outputs}"
            log.error("%s", why)
            return _failed(Result.ERROR, why)
        data = values[: len(ob)]
        for k, (chunk, cap) in enumerate(zip(data, ob, strict=True)):
            if not isinstance(chunk, _BYTES_LIKE):
                kind = type(chunk).__name__
                why = f"{self._method(spec)}: output buffer {k} is a {kind}, not bytes"
                log.error("%s", why)
                return _failed(Result.ERROR, why)
            if len(chunk) > cap:
                return _failed(
                    Result.ERROR_SIZE_OUT,
                    f"ob[{k}]: {self._method(spec)} returned {_count(len(chunk), 'byte')}, "
                    f"capacity {cap}",
                )
        return DispatchResult(Result.OK, tuple(bytes(c) for c in data), tuple(values[len(ob) :]))

    def _method(self, spec: OpSpec) -> str:
        return f"{type(self).__name__}.{spec.name}"

    def _not_in_table(self, number: int) -> str:
        ops = ", ".join(str(n) for n in sorted(self.__ops__)) or "none"
        return f"op {number} not in {type(self).__name__}'s table (ops: {ops})"

    def _error_name(self, exc: QteeError) -> str:
        """The raised error's name; a plain number the class's ``ERRORS`` has, by it."""
        errors = type(self).ERRORS
        if errors is not None and exc.name == result_name(exc.result):  # a plain number
            try:
                member = errors(exc.result)
            except ValueError:
                pass
            else:
                return f"{errors.__name__}.{member.name}"
        return exc.name


def _check_errors(owner: str, errors: object) -> None:
    """``ERRORS`` must be an ``IntEnum`` of interface errors (10 .. 2**31 - 1)."""
    if errors is None:
        return
    if not (isinstance(errors, type) and issubclass(errors, enum.IntEnum)):
        raise UsageError(f"{owner}.ERRORS must be an IntEnum, not {errors!r}")
    for member in errors:
        if not Result.ERROR_USERBASE <= member.value <= 0x7FFF_FFFF:
            raise UsageError(
                f"{owner}.ERRORS: {member.name} = {member.value} is not an interface error "
                "(10 and up)"
            )


def _exc_text(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _shape(out: object) -> str:
    if isinstance(out, tuple):
        return f"{_count(len(out), 'value')}"
    return "None" if out is None else f"a {type(out).__name__}"


def _as_tuple(out: object, n: int) -> tuple[Any, ...] | None:
    if n == 0:
        return () if out is None else None
    if n == 1:
        return (out,)
    if isinstance(out, tuple) and len(out) == n:
        return out
    return None
