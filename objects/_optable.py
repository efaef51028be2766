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
for an output that does not fit) and nothing is returned.  What the declaration does
not allow -- a fixed-size output buffer of another length (a skeleton's fixed output is
always its size), an output object of a kind the caller cannot send -- is the method's
bug: ``ERROR``, logged once, with a detail ("T.f returned 1 byte for ob[0]; op 0
declares 4").  The declaration itself is checked when the class is defined: ``op``'s
arguments, one method per op number, and a signature that can take the inputs.  A
method that wants to fill
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
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, NamedTuple, TypeVar

from objects._errors import QteeError, UsageError
from objects._results import ObjectResult as Result
from objects._results import canonical_result, result_name

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
    #: ``(len(ib), len(ob), io, oo)``: the counts of a call with this shape (set from the
    #: fields, once: a dispatch compares one tuple).
    shape: tuple[int, int, int, int] = field(init=False, repr=False, compare=False)
    #: Some buffer has a fixed size: a call's sizes are checked too (:meth:`fits`).
    sized: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_number(self.op, f"op {self.op!r} of {self.name}")
        for kind, sizes in (("ib", self.ib), ("ob", self.ob)):
            _check_sizes(self.name, kind, sizes)
        for kind, n in (("io", self.io), ("oo", self.oo)):
            _check_count(self.name, kind, n)
        if not isinstance(self.capacities, bool):
            raise UsageError(f"{self.name}: capacities must be a bool")
        if self.capacities and not self.ob:
            raise UsageError(f"{self.name}: capacities=True needs output buffers (ob=...)")
        object.__setattr__(self, "shape", (len(self.ib), len(self.ob), self.io, self.oo))
        object.__setattr__(self, "sized", any(s is not None for s in (*self.ib, *self.ob)))

    def accepts(self, ib: tuple[bytes, ...], ob: tuple[int, ...], n_io: int, n_oo: int) -> bool:
        """True when the call has exactly this shape (fixed sizes must match)."""
        return (len(ib), len(ob), n_io, n_oo) == self.shape and (
            not self.sized or self.fits(ib, ob)  # most ops have no fixed size to check
        )

    def fits(self, ib: tuple[bytes, ...], ob: tuple[int, ...]) -> bool:
        """Each buffer of a call with this shape's counts has its fixed size, if any."""
        for data, size in zip(ib, self.ib, strict=True):
            if size is not None and len(data) != size:
                return False
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


#: Most arguments of one kind a call can carry (Mink's ``OBJECT_COUNTS_MAX_*``: a kind's
#: count is four bits).
_MAX_PER_KIND: Final = 15
#: The largest op number an interface can declare: ops are 16 bits (userspace ops with a
#: bit above 15 are refused) and 0xFFFE/0xFFFF are Mink's RETAIN/RELEASE.
_MAX_OP: Final = 0xFFFD
_MAX_SIZE: Final = 0xFFFF_FFFF  # a buffer size is a u32 on the wire


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_number(number: object, what: str) -> None:
    if not _is_int(number) or not 0 <= number <= 0xFFFF:  # type: ignore[operator]
        raise UsageError(
            f"{what}: an op number is an int in 0..{_MAX_OP:#x} (ops are 16 bits), not {number!r}"
        )
    if number in (0xFFFE, 0xFFFF):
        raise UsageError(f"{what}: op {number:#x} is reserved for retain/release")


def _check_sizes(owner: str, kind: str, sizes: object) -> None:
    """``ib``/``ob``: a tuple (or list) of at most 15 sizes, each an int >= 0 or None."""
    example = f"e.g. {kind}=(4,) or {kind}=(None, 8)"
    if not isinstance(sizes, tuple | list):
        raise UsageError(
            f"{owner}: {kind} is a tuple of sizes (int or None), {example}; not {sizes!r}"
        )
    if len(sizes) > _MAX_PER_KIND:
        raise UsageError(
            f"{owner}: at most {_MAX_PER_KIND} {kind} arguments (a call's count per kind is "
            f"4 bits), not {len(sizes)}"
        )
    for k, size in enumerate(sizes):
        if size is not None and (not _is_int(size) or not 0 <= size <= _MAX_SIZE):
            raise UsageError(
                f"{owner}: {kind}[{k}] is {size!r}; a size is an int in 0..{_MAX_SIZE:#x} "
                f"or None (any length), {example}"
            )


def _check_count(owner: str, kind: str, n: object) -> None:
    """``io``/``oo``: a number of objects, 0..15."""
    if not _is_int(n) or not 0 <= n <= _MAX_PER_KIND:  # type: ignore[operator]
        raise UsageError(
            f"{owner}: {kind} is a number of objects, an int in 0..{_MAX_PER_KIND} (a call's "
            f"count per kind is 4 bits), not {n!r}"
        )


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

    ``ib``/``ob``: a tuple with one size per input/output buffer (an int, or ``None`` for
    any length); ``io``/``oo``: how many input/output objects; at most 15 of each kind.
    The method is called with the input buffers, then the input objects, in order; a
    signature that cannot take them is refused here, when the class is defined.

    ``capacities=True``: the method is also called with the keyword ``capacities``, a
    tuple of each output buffer's capacity (what the caller's ``Out(n)`` offers), so it
    can fill a buffer up to its size; returning more is still ``ERROR_SIZE_OUT``."""
    where = f"@op({number!r})"
    _check_number(number, where)
    _check_sizes(where, "ib", ib)
    _check_sizes(where, "ob", ob)
    _check_count(where, "io", io)
    _check_count(where, "oo", oo)

    def mark(fn: F) -> F:
        name = getattr(fn, "__name__", None)
        if not isinstance(name, str) or not callable(fn):
            raise UsageError(f"{where} decorates a method, not {fn!r}")
        spec = OpSpec(number, name, tuple(ib), tuple(ob), io, oo, capacities)
        if capacities and not _takes_keyword(fn, "capacities"):
            raise UsageError(f"{name}: capacities=True needs a 'capacities' parameter")
        why = _cannot_take(fn, spec)
        if why is not None:
            raise UsageError(why)
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


def _cannot_take(fn: Callable[..., Any], spec: OpSpec) -> str | None:
    """Why a plain function (a method: ``self`` first) cannot be called the way dispatch
    calls it (None: it can, or its signature cannot be read)."""
    if not inspect.isfunction(fn):  # a staticmethod, a callable object...: not checked
        return None
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    args = ["self"] + [f"ib[{k}]" for k in range(len(spec.ib))]
    args += [f"io[{k}]" for k in range(spec.io)]
    kwargs = {"capacities": ()} if spec.capacities else {}
    try:
        sig.bind(*args, **kwargs)
    except TypeError as exc:
        passed = ", ".join(args[1:] + [f"{k}=..." for k in kwargs]) or "no arguments"
        return (
            f"{fn.__qualname__}{sig} cannot be op {spec.op}'s method: dispatch calls it "
            f"with self and {passed} ({exc})"
        )
    return None


class DispatchResult(NamedTuple):
    """What a dispatch produced: the result and, on OK, the outputs (immutable).

    On failure ``name`` names the result (``IAppLoader.ERROR_INVALID_BUFFER``,
    ``ERROR_INVALID``) and ``detail`` says why, when known: model-only, never on the wire.
    ``ob`` is empty; ``oo`` holds the objects a method returned before its outputs were
    refused (nothing was sent: the caller disposes of them by its own rules).
    """

    result: int
    ob: tuple[bytes, ...] = ()
    oo: tuple[object, ...] = ()
    name: str = ""
    detail: str = ""


_OK = DispatchResult(0)


def _failed(
    result: int, detail: str, name: str = "", oo: tuple[object, ...] = ()
) -> DispatchResult:
    result = canonical_result(result)
    return DispatchResult(result, (), oo, name or result_name(result), detail)


class PyObject:
    """Base class of objects written in Python; subclasses declare ops with :func:`op`.

    The op table is built when the class is defined, from the ``@op`` methods of the
    class and its bases.  One op number has one method: two methods declaring the same
    number are refused (``UsageError``), in one class or across a class and its base.
    A subclass changes an inherited op by overriding the method of the same name: with
    its own ``@op`` it replaces the declaration (number and shape), without one it keeps
    the inherited declaration and only the implementation changes.
    """

    __ops__: ClassVar[dict[int, OpSpec]] = {}
    #: The interface's errors (an ``IntEnum``, values from 10), or None: names what a
    #: method raises as a plain number.
    ERRORS: ClassVar[type[enum.IntEnum] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "ERRORS" in cls.__dict__:
            _check_errors(cls.__name__, cls.__dict__["ERRORS"])
        # Method name -> (its declaration, the class that declared it); a subclass's
        # method of the same name replaces its base's.
        methods: dict[str, tuple[OpSpec, type]] = {}
        for klass in reversed(cls.__mro__):
            for attr in vars(klass).values():
                spec = getattr(attr, _OP_ATTR, None)
                if isinstance(spec, OpSpec):
                    methods[spec.name] = (spec, klass)
        table: dict[int, OpSpec] = {}
        owners: dict[int, type] = {}
        for spec, klass in methods.values():
            first = table.get(spec.op)
            if first is not None:
                one = f"{owners[spec.op].__name__}.{first.name}"
                other = f"{klass.__name__}.{spec.name}"
                raise UsageError(
                    f"{cls.__name__}: op {spec.op} is declared by both {one} and {other}; "
                    "an op number has one method (a subclass replaces an inherited op by "
                    "overriding the method of the same name)"
                )
            table[spec.op] = spec
            owners[spec.op] = klass
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
        *,
        oo_kinds: tuple[type, ...] | None = None,
    ) -> DispatchResult:
        """Check the call against the op table, run the method, pack its outputs.

        What the method returns is checked against the declaration, first problem first:
        each output buffer must be bytes, each output object ``None`` or one of
        ``oo_kinds`` (the kinds the caller can send on; None: not checked), then each
        buffer must fit the caller's capacity (else ``ERROR_SIZE_OUT``) and have a fixed
        size's exact length.  A failure is ``ERROR`` (a bug of the method's, logged once)
        whose ``oo`` holds the objects the method did return, for the caller to dispose
        of by its own rules (nothing went out)."""
        spec = self.__ops__.get(number)
        if spec is None:
            return _failed(Result.ERROR_INVALID, self._not_in_table(number))
        if (len(ib), len(ob), len(io), n_oo) != spec.shape or (  # (spec.accepts inline)
            spec.sized and not spec.fits(ib, ob)
        ):
            return _failed(Result.ERROR_INVALID, spec.mismatch(ib, ob, len(io), n_oo) or "")
        try:
            method = getattr(self, spec.name)
            if spec.capacities:
                out = method(*ib, *io, capacities=ob)
            elif ib or io:
                out = method(*ib, *io)
            else:  # no arguments: a plain call, no tuple built
                out = method()
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
            return self._bug(why, _objects_in(out))
        data = values[: len(ob)]
        objs = values[len(ob) :]
        for k, chunk in enumerate(data):
            if not isinstance(chunk, _BYTES_LIKE):
                kind = type(chunk).__name__
                why = f"{self._method(spec)}: output buffer {k} is a {kind}, not bytes"
                return self._bug(why, _objects_in(out))
        if oo_kinds is not None:
            for k, obj in enumerate(objs):
                if obj is not None and not isinstance(obj, oo_kinds):
                    kinds = ", ".join(t.__name__ for t in oo_kinds)
                    why = (
                        f"{self._method(spec)} returned {_a(type(obj).__name__)} for oo[{k}]; "
                        f"op {number} takes {kinds} or None there"
                    )
                    return self._bug(why, _objects_in(out))
        for k, (chunk, cap, size) in enumerate(zip(data, ob, spec.ob, strict=True)):
            if len(chunk) > cap:
                return _failed(
                    Result.ERROR_SIZE_OUT,
                    f"ob[{k}]: {self._method(spec)} returned {_count(len(chunk), 'byte')}, "
                    f"capacity {cap}",
                    oo=_objects_in(out),
                )
            if size is not None and len(chunk) != size:
                why = (
                    f"{self._method(spec)} returned {_count(len(chunk), 'byte')} for ob[{k}]; "
                    f"op {number} declares {size}"
                )
                return self._bug(why, _objects_in(out))
        ok = canonical_result(Result.OK)
        return DispatchResult(ok, tuple(bytes(c) for c in data), tuple(objs))

    def _bug(self, why: str, oo: tuple[object, ...]) -> DispatchResult:
        """The method returned what its declaration does not allow: ERROR, logged once."""
        log.error("%s", why)
        return _failed(Result.ERROR, why, oo=oo)

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


def _a(noun: str) -> str:
    return f"an {noun}" if noun[:1].lower() in "aeiou" else f"a {noun}"


def _objects_in(out: object) -> tuple[object, ...]:
    """What a method returned that is neither None nor bytes (its objects, and junk)."""
    values = out if isinstance(out, tuple) else (out,)
    return tuple(v for v in values if v is not None and not isinstance(v, _BYTES_LIKE))


def _as_tuple(out: object, n: int) -> tuple[Any, ...] | None:
    if n == 0:
        return () if out is None else None
    if n == 1:
        return (out,)
    if isinstance(out, tuple) and len(out) == n:
        return out
    return None
