"""Struct and primitive values as the C backend lays them out: little-endian, fields
back to back, an object field as ``Object_NULL`` (16 zero bytes) with the object itself
travelling as an object argument (breadth first, as the compiler lists a struct's
objects)."""

from __future__ import annotations

import functools
import keyword
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import make_dataclass
from pathlib import PurePath
from typing import Any, Final

from objects._errors import UsageError
from objects.idl.model import Buffer, InterfaceType, Method, Primitive, Struct

__all__ = [
    "module_name_of",
    "object_paths",
    "pack_primitive",
    "pack_struct",
    "py_name",
    "py_params",
    "struct_class",
    "unpack_struct",
    "with_objects",
]

_OBJECT_NULL: Final = bytes(16)  # an ``Object`` field as the C struct holds it when NULL


def py_name(name: str) -> str:
    """An IDL identifier as a Python name: a Python keyword gets a leading ``_``
    (``break`` -> ``_break``), as the compiler's backends rename their languages' keywords
    (a field, parameter, method or class name)."""
    return "_" + name if keyword.iskeyword(name) else name


def out_length_keywords(method: Method) -> tuple[str, ...]:
    """The keyword giving each output array's (and ``out buffer``'s) capacity, in
    declaration order: ``<name>_len``."""
    return tuple(
        f"{p.name}_len"
        for p in method.params
        if not p.is_input and not p.is_object and (p.is_array or isinstance(p.type, Buffer))
    )


@functools.cache
def py_params(method: Method) -> Mapping[str, tuple[str, str | None]]:
    """The Python name of each in-parameter of ``method`` (IDL name -> (name, the
    collision that renamed it or None)), unique among the method's Python names: a
    keyword or ``self`` gets a leading ``_`` (the reader warns of those as reserved
    words); a name that an earlier parameter or an output length keyword already takes
    gets a trailing ``_`` until it is free."""
    taken = {
        k: f"the keyword `{k}` (the length of output `{k[:-4]}`)"
        for k in out_length_keywords(method)
    }
    taken["self"] = "the method's `self`"
    out: dict[str, tuple[str, str | None]] = {}
    for p in method.params:
        if not p.is_input:
            continue
        name = "_self" if p.name == "self" else py_name(p.name)
        why = None
        if name in taken:
            why = f"`{name}` would collide with {taken[name]}"
            while name in taken:
                name += "_"
        taken[name] = f"parameter `{p.name}`"
        out[p.name] = (name, why)
    return out


@functools.cache
def struct_class(st: Struct) -> type:
    """The Python class of a struct's values: a frozen dataclass with its fields, in order
    (one per struct, made once).  A field declared as an array holds a tuple."""
    fields = [(py_name(f.name), Any) for f in st.fields]
    cls = make_dataclass(py_name(st.name), fields, frozen=True, slots=True)
    if st.file:
        cls.__module__ = module_name_of(st.file)
    return cls


def module_name_of(path: str) -> str:
    """The Python module named after an IDL file: its stem, as a Python identifier
    (``ICounter.idl`` -> ``ICounter``)."""
    stem = PurePath(path).stem
    name = "".join(c if c.isalnum() or c == "_" else "_" for c in stem) or "idl"
    return py_name("_" + name if name[0].isdigit() else name)


def object_paths(st: Struct) -> tuple[tuple[str, ...], ...]:
    """The objects inside a struct, in the compiler's order: breadth first (a struct's own
    object fields before those of the structs nested in it)."""
    out: list[tuple[str, ...]] = []
    queue: list[tuple[tuple[str, ...], Struct]] = [((), st)]
    while queue:
        prefix, node = queue.pop(0)
        for f in node.fields:
            if isinstance(f.type, Struct):
                queue.append(((*prefix, f.name), f.type))
            elif isinstance(f.type, InterfaceType):
                if f.is_array:
                    raise UsageError(
                        f"struct {node.name}: field {f.name} is an array of objects, which "
                        "the C backend cannot pass"
                    )
                out.append((*prefix, f.name))
    return tuple(out)


def _get(value: object, name: str, owner: str, what: str = "") -> Any:
    name = py_name(name)
    at = f"{what}: " if what else ""
    if isinstance(value, Mapping):
        try:
            return value[name]
        except KeyError:
            raise UsageError(f"{at}a {owner} value has no field {name!r}") from None
    try:
        return getattr(value, name)
    except AttributeError:
        raise UsageError(
            f"{at}a {owner} value needs a field {name!r}; {type(value).__name__} has none"
        ) from None


def pack_primitive(p: Primitive, value: object, what: str) -> bytes:
    if p.is_float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise UsageError(f"{what} is a {p.idl_name}: a float, not {value!r}")
    elif not isinstance(value, int) or isinstance(value, bool):
        raise UsageError(f"{what} is a {p.idl_name}: an int, not {value!r}")
    try:
        return struct.pack("<" + p.code, value)
    except (struct.error, OverflowError):
        raise UsageError(f"{what}: {value!r} does not fit a {p.idl_name}") from None


def pack_struct(st: Struct, value: object, objects: list[object], what: str) -> bytes:
    """The struct's bytes, object fields zeroed; its objects appended breadth first."""
    parts: list[bytes] = []
    for f in st.fields:
        v = _get(value, f.name, st.name, what)
        where = f"{what}.{f.name}"
        items: Sequence[object]
        if f.is_array:
            if isinstance(v, str) or not isinstance(v, Sequence | bytes | bytearray):
                raise UsageError(f"{where} is an array of {f.count}: a sequence, not {v!r}")
            if len(v) != f.count:
                raise UsageError(f"{where} has {f.count} elements, not {len(v)}")
            items = v
        else:
            items = (v,)
        for k, item in enumerate(items):
            here = f"{where}[{k}]" if f.is_array else where
            if isinstance(f.type, Primitive):
                parts.append(pack_primitive(f.type, item, here))
            elif isinstance(f.type, Struct):
                parts.append(pack_struct(f.type, item, [], here))
            else:
                parts.append(_OBJECT_NULL)
    if objects is not None:
        for path in object_paths(st):
            node: object = value
            for name in path:
                node = _get(node, name, st.name, what)
            objects.append(node)
    return b"".join(parts)


def unpack_struct(
    st: Struct, data: bytes | memoryview, offset: int, make: Callable[[Struct], Callable[..., Any]]
) -> tuple[Any, int]:
    """A struct value read at ``offset`` (object fields None), and the offset after it."""
    values: dict[str, Any] = {}
    for f in st.fields:
        items: list[Any] = []
        for _ in range(f.count):
            if isinstance(f.type, Primitive):
                (v,) = struct.unpack_from("<" + f.type.code, data, offset)
                offset += f.type.size
            elif isinstance(f.type, Struct):
                v, offset = unpack_struct(f.type, data, offset, make)
            else:
                v = None
                offset += f.type.size
            items.append(v)
        values[py_name(f.name)] = tuple(items) if f.is_array else items[0]
    return make(st)(**values), offset


def with_objects(
    st: Struct, value: Any, objects: Sequence[object], make: Callable[[Struct], Callable[..., Any]]
) -> Any:
    """``value`` with its object fields set from ``objects`` (breadth-first order)."""
    if not objects:
        return value
    fill: dict[tuple[str, ...], object] = dict(zip(object_paths(st), objects, strict=True))

    def rebuild(node_st: Struct, node: Any, prefix: tuple[str, ...]) -> Any:
        values = {py_name(f.name): _get(node, f.name, node_st.name) for f in node_st.fields}
        for f in node_st.fields:
            path = (*prefix, f.name)
            key = py_name(f.name)
            if isinstance(f.type, InterfaceType) and path in fill:
                values[key] = fill[path]
            elif isinstance(f.type, Struct) and not f.is_array:
                values[key] = rebuild(f.type, values[key], path)
        return make(node_st)(**values)

    return rebuild(st, value, ())
