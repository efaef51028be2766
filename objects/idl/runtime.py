"""Python interfaces from an IDL file at run time: stubs, skeletons, errors, constants.

:func:`load` reads an ``.idl`` file (or takes a read :class:`~objects.idl.model.IdlFile`)
and gives a namespace with, per interface ``IFoo``, a class holding:

* ``IFoo.Stub(obj)``: the caller's side over any object that can be invoked (see
  :func:`invoker_for`); one method per IDL method, named after it, taking the
  in-parameters in declaration order (each output array's capacity, in elements, as the
  keyword ``<name>_len``) and returning the out-parameters (none: None, one: bare,
  several: a tuple in declaration order).  A parameter named as a Python keyword or
  ``self`` is ``_<name>``; one that would take another's name or a ``<name>_len``
  keyword gets a trailing ``_`` (the reader warns of each; ``gen`` names them alike).
  An argument that cannot be packed raises :class:`~objects.UsageError` naming
  ``IFoo.method`` and the parameter before anything is invoked.  A non-zero result
  raises :class:`~objects.QteeError`, an interface error by its name (``IFoo.ERROR_X``
  for ``error ERROR_X;``);
* ``IFoo.Skeleton``: a :class:`~objects.PyObject` base class whose op table is the
  interface's (exact fixed sizes, counts); mix it with the object kind that serves it
  (``class Impl(IFoo.Skeleton, CallbackObject)``, ``(IFoo.Skeleton, TrustedApp)``) and
  override the methods by their IDL names with the same signature as the stub's;
* ``IFoo.Errors``: the interface's errors, an ``IntEnum`` named ``IFoo`` whose members
  are named as the ``error`` lines (the C backend's ``IFoo_<name>``) from 10 (also
  attributes of ``IFoo``), its constants as attributes, and ``IFoo.OP_<method>``
  the op numbers.

Every stub has ``api_version()`` and every skeleton answers it (op ``OP_VERSION``, one
4-byte output buffer), as the compiler's backends generate: the interface's version, the
highest ``#[version]`` of its own methods (1.0 without one), packed by :func:`pack_version`.

Objects of a named interface arrive wrapped in that interface's stub (its ``obj`` is the
raw object); a stub given where an object goes is unwrapped.  Structs are frozen
dataclasses named after them (``ns.Collection``); file-level constants are attributes.
"""

from __future__ import annotations

import enum
import inspect
import os
import struct
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Final, NoReturn, Self

from objects._errors import QteeError, UsageError
from objects._optable import DispatchResult, PyObject, op
from objects._results import ObjectResult
from objects.idl._values import module_name_of, py_params
from objects.idl.model import (
    DEFAULT_VERSION,
    Const,
    IdlFile,
    Interface,
    InterfaceType,
    Param,
    Struct,
    Version,
)
from objects.idl.packing import MethodLayout, layout, py_name, struct_class
from objects.idl.reader import read_idl

__all__ = [
    "OP_VERSION",
    "Namespace",
    "SkeletonBase",
    "StubBase",
    "invoker_for",
    "load",
    "pack_version",
]

#: The op every generated object answers with its interface's version (``Object_OP_version``:
#: one below Mink's local-op bit 0x8000, outside the IDL's method numbers).
OP_VERSION: Final = 0x7FFF


def pack_version(version: Version, patch: int = 0) -> int:
    """The u32 ``api_version`` answers: major in bits 22-31, minor in 12-21, patch in 0-11
    (each cut to its width, as the backends do)."""
    if not isinstance(version, Version):
        raise UsageError(f"pack_version takes a model.Version, not {type(version).__name__}")
    return (version.major & 0x3FF) << 22 | (version.minor & 0x3FF) << 12 | (patch & 0xFFF)


#: (op, input buffers, output capacities, input objects, number of output objects) ->
#: (output buffers, output objects); raises QteeError for a non-zero result.
Invoker = Callable[
    [int, tuple[bytes, ...], tuple[int, ...], tuple[object, ...], int],
    tuple[tuple[bytes, ...], tuple[object, ...]],
]


def _from_dispatch(res: DispatchResult) -> tuple[tuple[bytes, ...], tuple[object, ...]]:
    if res.result:
        raise QteeError(res.result, res.detail)
    return tuple(res.ob), tuple(res.oo)


def invoker_for(obj: object) -> Invoker:
    """How to invoke ``obj``, by its calling convention:

    * a :class:`~objects.PyObject` (a local object): its ``dispatch``;
    * an ``invoke(op, ib, ob, io, n_oo)`` answering a :class:`~objects.DispatchResult`
      (a secure-side reference to a non-secure object);
    * an ``invoke(op, *args)`` taking bytes (input buffers), the module's ``Out(n)``
      (output buffers), objects, and its ``OUT_OBJECT`` (output objects), and answering
      the outputs in order (a client's handle): the markers are looked up in the module
      of ``obj``'s class, so this package needs no transport's import.
    """
    if isinstance(obj, StubBase):
        obj = obj.obj
    if isinstance(obj, PyObject):
        local = obj

        def dispatch(
            op_: int, ib: tuple[bytes, ...], ob: tuple[int, ...], io: tuple[object, ...], n_oo: int
        ) -> tuple[tuple[bytes, ...], tuple[object, ...]]:
            return _from_dispatch(local.dispatch(op_, ib, ob, io, n_oo))

        return dispatch
    invoke = getattr(obj, "invoke", None)
    if not callable(invoke):
        raise UsageError(f"a stub needs an object with invoke(), not {type(obj).__name__}")
    try:
        params = inspect.signature(invoke).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    if "n_oo" in params:

        def mink(
            op_: int, ib: tuple[bytes, ...], ob: tuple[int, ...], io: tuple[object, ...], n_oo: int
        ) -> tuple[tuple[bytes, ...], tuple[object, ...]]:
            res = invoke(op_, ib, ob, io, n_oo)
            if isinstance(res, DispatchResult):
                return _from_dispatch(res)
            raise UsageError(f"{type(obj).__name__}.invoke answered {type(res).__name__}")

        return mink
    module = sys.modules.get(type(obj).__module__)
    out_cls = getattr(module, "Out", None)
    out_object = getattr(module, "OUT_OBJECT", None)
    if out_cls is None or out_object is None:
        raise UsageError(
            f"cannot tell how to invoke a {type(obj).__name__}: its module defines no Out and "
            "OUT_OBJECT, and its invoke takes no (ib, ob, io, n_oo)"
        )

    def args(
        op_: int, ib: tuple[bytes, ...], ob: tuple[int, ...], io: tuple[object, ...], n_oo: int
    ) -> tuple[tuple[bytes, ...], tuple[object, ...]]:
        outs = invoke(op_, *ib, *map(out_cls, ob), *io, *([out_object] * n_oo))
        return tuple(outs[: len(ob)]), tuple(outs[len(ob) :])

    return args


def _unwrap(value: object) -> object:
    return value.obj if isinstance(value, StubBase) else value


def _errors_enum(iface: Interface) -> type[enum.IntEnum]:
    members = {py_name(e.name): e.value for e in iface.all_errors}
    errors: type[enum.IntEnum] = enum.IntEnum(iface.name, members)  # type: ignore[misc]
    return errors


def _named(errors: type[enum.IntEnum] | None, exc: QteeError) -> QteeError:
    if errors is None or exc.result < ObjectResult.ERROR_USERBASE:
        return exc
    try:
        member = errors(exc.result)
    except ValueError:
        return exc
    return QteeError(member, exc.detail)


class StubBase:
    """The caller's side of an interface over an invokable object (see :func:`invoker_for`).

    Subclasses set :attr:`LAYOUTS` (method name -> layout), :attr:`ERRORS` and
    :attr:`STUBS` (interface name -> stub class, to wrap output objects)."""

    LAYOUTS: ClassVar[Mapping[str, MethodLayout]] = {}
    ERRORS: ClassVar[type[enum.IntEnum] | None] = None
    STUBS: ClassVar[Mapping[str, type[StubBase]]] = {}

    __slots__ = ("_invoke", "obj")

    def api_version(self) -> int:
        """The object's interface version (op :data:`OP_VERSION`), packed as
        :func:`pack_version` packs it."""
        try:
            ob, _ = self._invoke(OP_VERSION, (), (4,), (), 0)
        except QteeError as exc:
            raise _named(self.ERRORS, exc) from None
        if len(ob) != 1 or len(ob[0]) != 4:
            raise QteeError(ObjectResult.ERROR_INVALID, f"api_version answered {ob!r}")
        value: int = struct.unpack("<I", ob[0])[0]
        return value

    def __init__(self, obj: object) -> None:
        self.obj = _unwrap(obj)
        self._invoke = invoker_for(self.obj)

    def _call(self, name: str, args: Sequence[object], out_lens: Sequence[int] = ()) -> Any:
        """Pack ``args``, invoke, unpack: the out-parameters (None, bare, or a tuple)."""
        lay = self.LAYOUTS[name]
        try:
            if len(args) == len(lay.inputs):
                _check_objects(lay, args)
            op_, ib, caps, io = lay.pack_inputs(args, out_lens)
        except UsageError as exc:
            raise UsageError(f"{_interface_name(type(self))}.{exc}") from None
        io = tuple(map(_unwrap, io))
        try:
            ob, oo = self._invoke(op_, ib, caps, io, lay.counts[3])
        except QteeError as exc:
            raise _named(self.ERRORS, exc) from None
        values = _wrap_objects(lay.outputs, lay.unpack_outputs(ob, oo), self.STUBS)
        if not values:
            return None
        return values[0] if len(values) == 1 else values

    def release(self) -> None:
        """Release the object this stub invokes."""
        release = getattr(self.obj, "release", None)
        if callable(release):
            release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__} of {self.obj!r}>"


def _interface_name(stub: type) -> str:
    return stub.__qualname__.removesuffix(".Stub")


def _is_object(value: object) -> bool:
    """What can go where the IDL has an object: a stub, a local object, anything with
    ``invoke`` (a client's handle, a secure-side reference), or None (``Object_NULL``)."""
    return (
        value is None
        or isinstance(value, StubBase | PyObject)
        or callable(getattr(value, "invoke", None))
    )


def _check_objects(lay: MethodLayout, args: Sequence[object]) -> None:
    """Refuse, naming the parameter, what cannot go where the IDL has an object (it would
    otherwise be sent and refused by the far side)."""
    for p, v in zip(lay.inputs, args, strict=True):
        if not isinstance(p.type, InterfaceType):
            continue
        items = v if p.is_array and isinstance(v, Sequence) and not isinstance(v, str) else (v,)
        for k, item in enumerate(items):
            if not _is_object(item):
                where = f"{p.name}[{k}]" if p.is_array else p.name
                raise UsageError(
                    f"{lay.method.name}: {where} must be an object (a stub, an invocable "
                    f"handle, a local object) or None, not {type(item).__name__}"
                )


def _wrap_objects(
    params: Sequence[Param], values: Sequence[object], stubs: Mapping[str, type[StubBase]]
) -> tuple[object, ...]:
    """Values with each object of a named interface wrapped in its stub (None stays)."""
    out: list[object] = []
    for p, v in zip(params, values, strict=True):
        stub = stubs.get(p.type.name or "") if isinstance(p.type, InterfaceType) else None
        if stub is not None:
            if p.is_array:
                assert isinstance(v, tuple)
                v = tuple(None if x is None else stub(x) for x in v)
            elif v is not None:
                v = stub(v)
        out.append(v)
    return tuple(out)


def _not_implemented(name: str) -> Callable[..., Any]:
    def method(self: SkeletonBase, *args: object, **kwargs: object) -> Any:
        self._not_implemented(name)

    method.__name__ = name
    return method


def _trampoline(lay: MethodLayout, stubs: Mapping[str, type[StubBase]]) -> Callable[..., Any]:
    """The op-table method of one IDL method: unpack as the C skeleton does, call the
    user's method by its IDL name, pack what it returns."""
    name = lay.method.name
    attr = py_name(name)
    n_ib = len(lay.bi)
    n_out = len(lay.outputs)
    fixed_caps = tuple(s or 0 for s in lay.ob_sizes)
    keys = tuple(f"{p.name}_len" for p in lay.out_arrays)

    def run(self: Any, *args: Any, capacities: tuple[int, ...] = ()) -> Any:
        values, lens = lay.unpack_inputs(
            args[:n_ib], capacities or fixed_caps, args[n_ib:], lay.counts[3]
        )
        values = _wrap_objects(lay.inputs, values, stubs)
        out = getattr(self, attr)(*values, **dict(zip(keys, lens, strict=True)))
        if n_out == 0:
            if out is not None:
                raise TypeError(f"{type(self).__name__}.{name} returns nothing, not {out!r}")
            outs: tuple[object, ...] = ()
        elif n_out == 1:
            outs = (out,)
        elif isinstance(out, tuple) and len(out) == n_out:
            outs = out
        else:
            raise TypeError(f"{type(self).__name__}.{name} returns a tuple of {n_out} values")
        ob, oo = lay.pack_outputs(tuple(map(_unwrap, outs)))
        flat = (*ob, *map(_unwrap, oo))
        if not flat:
            return None
        return flat[0] if len(flat) == 1 else flat

    run.__name__ = run.__qualname__ = f"_op_{name}"
    return op(
        lay.op,
        ib=lay.ib_sizes,
        ob=lay.ob_sizes,
        io=lay.counts[2],
        oo=lay.counts[3],
        capacities=bool(lay.out_arrays),
    )(run)


class SkeletonBase(PyObject):
    """The callee's side of an interface: a subclass that sets :attr:`LAYOUTS` gets one
    op per layout (``_op_<name>``, checked as the C skeleton checks: counts and fixed
    sizes, else ``ERROR_INVALID``) that calls the method of the IDL's name."""

    LAYOUTS: ClassVar[Mapping[str, MethodLayout]] = {}
    STUBS: ClassVar[Mapping[str, type[StubBase]]] = {}
    #: The interface's version (the highest ``#[version]`` of its own methods).
    VERSION: ClassVar[Version] = DEFAULT_VERSION

    @op(OP_VERSION, ob=(4,))
    def _op_api_version(self) -> bytes:
        """The C skeleton's version case: counts (0, 1, 0, 0) and a 4-byte buffer, else
        ERROR_INVALID (the op table's check); the packed :attr:`VERSION`."""
        return struct.pack("<I", pack_version(self.VERSION))

    def _not_implemented(self, name: str) -> NoReturn:
        """What a method the subclass does not override answers: ERROR_INVALID."""
        raise QteeError(
            ObjectResult.ERROR_INVALID, f"{type(self).__name__}.{name} is not implemented"
        )

    def __init_subclass__(cls, **kwargs: Any) -> None:
        layouts = cls.__dict__.get("LAYOUTS")
        if layouts is not None:
            stubs = cls.__dict__.get("STUBS", cls.STUBS)
            for name, lay in layouts.items():
                setattr(cls, f"_op_{name}", _trampoline(lay, stubs))
                if py_name(name) not in cls.__dict__:
                    setattr(cls, py_name(name), _not_implemented(name))
        super().__init_subclass__(**kwargs)


class Namespace:
    """What :func:`load` gives: interfaces, structs and constants as attributes."""

    def __init__(self, file: IdlFile, items: Mapping[str, object]) -> None:
        self.file = file
        self.__dict__.update(items)

    def __repr__(self) -> str:
        names = ", ".join(k for k in self.__dict__ if k != "file")
        return f"<idl {self.file.path}: {names}>"


def _interface_class(
    iface: Interface,
    classes: Mapping[str, Callable[..., Any]],
    stubs: dict[str, type[StubBase]],
    *,
    by_size: bool,
) -> type:
    errors = _errors_enum(iface)
    layouts = {m.name: layout(m, by_size=by_size, classes=classes) for m in iface.all_methods}
    stub_attrs: dict[str, Any] = {
        "__slots__": (),
        "__qualname__": f"{iface.name}.Stub",
        "__doc__": f"Caller's side of {iface.name}.",
        "LAYOUTS": layouts,
        "ERRORS": errors,
        "STUBS": stubs,
    }
    for m in iface.all_methods:
        stub_attrs[py_name(m.name)] = _stub_method(layouts[m.name], iface.name)
    module = module_name_of(iface.file) if iface.file else __name__
    stub_attrs["__module__"] = module
    errors.__module__ = module
    stub = type("Stub", (StubBase,), stub_attrs)
    stubs[iface.name] = stub
    skeleton = type(
        "Skeleton",
        (SkeletonBase,),
        {
            "__qualname__": f"{iface.name}.Skeleton",
            "__module__": module,
            "__doc__": f"Callee's side of {iface.name}: override its methods.",
            "LAYOUTS": layouts,
            "STUBS": stubs,
            "ERRORS": errors,
            "VERSION": iface.version,
        },
    )
    attrs: dict[str, Any] = {
        "__module__": module,
        "__doc__": iface.doc or f"Interface {iface.name}.",
        "interface": iface,
        "Stub": stub,
        "Skeleton": skeleton,
        "Errors": errors,
    }
    for member in errors:
        attrs[member.name] = member
    for c in _all_consts(iface):
        attrs[py_name(c.name)] = c.value
    for m in iface.all_methods:
        attrs[f"OP_{m.name}"] = m.id
    return type(iface.name, (), attrs)


def _all_consts(iface: Interface) -> tuple[Const, ...]:
    return (_all_consts(iface.base) if iface.base else ()) + iface.consts


def _stub_method(lay: MethodLayout, iface: str) -> Callable[..., Any]:
    name = lay.method.name
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)]
    names = py_params(lay.method)
    params += [
        inspect.Parameter(names[p.name][0], inspect.Parameter.POSITIONAL_OR_KEYWORD)
        for p in lay.inputs
    ]
    keys = [f"{p.name}_len" for p in lay.out_arrays]
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in keys]
    sig = inspect.Signature(params)
    n_in = len(lay.inputs)

    def method(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as exc:
            raise UsageError(f"{iface}.{name}{sig}: {_bind_problem(sig, kwargs, exc)}") from None
        values = list(bound.arguments.values())
        self = values[0]
        return self._call(name, values[1 : 1 + n_in], [bound.arguments[k] for k in keys])

    method.__name__ = py_name(name)
    method.__signature__ = sig  # type: ignore[attr-defined]
    method.__doc__ = lay.method.doc
    return method


def _bind_problem(sig: inspect.Signature, kwargs: Mapping[str, object], exc: TypeError) -> str:
    """What is wrong with a call's keywords: the unexpected and the missing ones together
    (``result=`` where ``result_len=`` is meant names both), else what Python says."""
    unexpected = [
        k
        for k in kwargs
        if k not in sig.parameters or sig.parameters[k].kind is inspect.Parameter.POSITIONAL_ONLY
    ]
    missing = [
        k
        for k, p in sig.parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and k not in kwargs
    ]
    if not unexpected:
        return str(exc)
    text = f"unexpected keyword {', '.join(repr(k) for k in unexpected)}"
    if missing:
        text += f"; missing keyword {', '.join(repr(k) for k in missing)}"
    return text


def namespace(file: IdlFile, *, by_size: bool = False) -> Namespace:
    """The Python namespace of an already read file (and what it includes)."""
    if not isinstance(file, IdlFile):
        raise UsageError(f"namespace takes a model.IdlFile, not {type(file).__name__}")
    items: dict[str, object] = {}
    structs: dict[str, Struct] = {}
    interfaces: dict[str, Interface] = {}
    for f in file.files():
        for c in f.consts:
            items[py_name(c.name)] = c.value
        for s in f.structs:
            structs[s.name] = s
        for i in f.interfaces:
            interfaces[i.name] = i
    classes: dict[str, Callable[..., Any]] = {n: struct_class(s) for n, s in structs.items()}
    items.update((py_name(n), c) for n, c in classes.items())
    stubs: dict[str, type[StubBase]] = {}
    for name, iface in interfaces.items():
        items[py_name(name)] = _interface_class(iface, classes, stubs, by_size=by_size)
    return Namespace(file, items)


def load(
    source: str | os.PathLike[str] | IdlFile,
    include_paths: Sequence[str | os.PathLike[str]] = (),
    *,
    by_size: bool = False,
) -> Namespace:
    """Read an ``.idl`` file (or take a read :class:`IdlFile`) and build its namespace;
    an IDL problem raises :class:`objects.idl.IdlError` (file:line:col)."""
    if isinstance(source, IdlFile):
        return namespace(source, by_size=by_size)
    if not isinstance(source, str | os.PathLike):
        raise UsageError(f"load takes a path or a model.IdlFile, not {type(source).__name__}")
    return namespace(read_idl(source, include_paths), by_size=by_size)
