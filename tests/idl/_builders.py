"""Small builders of :mod:`objects.idl.model` records, so tests need no reader.

``method("add", 0, "in uint32 a", "out uint32 b")``: each parameter is written as in
IDL (``in buffer b``, ``out uint16[] xs``, ``in ITest1[3] objs``, ``in interface o``,
``out Collection c``); struct names are looked up in ``structs``.
"""

from __future__ import annotations

from collections.abc import Mapping

from objects.idl.model import (
    Buffer,
    Const,
    Direction,
    Error,
    IdlFile,
    Interface,
    InterfaceType,
    Method,
    Param,
    ParamType,
    Primitive,
    Struct,
    StructField,
)

__all__ = [
    "COLLECTION",
    "OBJ_IN_STRUCT",
    "SINGLE",
    "idl_file",
    "iface",
    "method",
    "param",
    "struct",
]


def _type(name: str, structs: Mapping[str, Struct], interfaces: frozenset[str]) -> ParamType:
    if name == "buffer":
        return Buffer.BUFFER
    if name == "interface":
        return InterfaceType()
    prim = Primitive.from_name(name)
    if prim is not None:
        return prim
    if name in structs:
        return structs[name]
    return InterfaceType(name)


def param(text: str, structs: Mapping[str, Struct] = {}) -> Param:
    """``"in uint32 a"``, ``"out Collection[] cs"``, ``"in ITest1[3] objs"``..."""
    direction, typ, name = text.split()
    bound: int | None = None
    is_array = False
    if typ.endswith("]"):
        typ, _, rest = typ.partition("[")
        is_array = True
        bound = int(rest[:-1]) if rest[:-1] else None
    return Param(name, Direction(direction), _type(typ, structs, frozenset()), is_array, bound)


def method(name: str, ident: int, *params: str, structs: Mapping[str, Struct] = {}) -> Method:
    return Method(name, ident, tuple(param(p, structs) for p in params))


def struct(name: str, *fields: str, structs: Mapping[str, Struct] = {}) -> Struct:
    """``struct("S", "uint32 a", "uint8[2] b", "ITest1 o")``."""
    out = []
    for text in fields:
        typ, fname = text.split()
        count, is_array = 1, False
        if typ.endswith("]"):
            typ, _, rest = typ.partition("[")
            count, is_array = int(rest[:-1]), True
        ftype = _type(typ, structs, frozenset())
        assert not isinstance(ftype, Buffer)
        out.append(StructField(fname, ftype, count, is_array))
    return Struct(name, tuple(out))


def iface(
    name: str,
    *methods: Method,
    errors: tuple[str, ...] = (),
    consts: tuple[Const, ...] = (),
    base: Interface | None = None,
) -> Interface:
    start = 10 + (len(base.all_errors) if base else 0)
    errs = tuple(Error(e, start + k) for k, e in enumerate(errors))
    return Interface(name, base, methods, errs, consts)


def idl_file(
    path: str,
    *interfaces: Interface,
    structs: tuple[Struct, ...] = (),
    consts: tuple[Const, ...] = (),
) -> IdlFile:
    return IdlFile(path, (), consts, structs, interfaces)


# The compiler's test structs (tests/idl/ITest.idl).
SINGLE = struct("SingleEncapsulated", "uint32 inner")
COLLECTION = struct("Collection", "uint64 a", "uint32 b", "uint32 c", "uint64 d")
OBJ_IN_STRUCT = struct(
    "ObjInStruct",
    "uint32[4] p1",
    "ITest1 first_obj",
    "uint32[4] p2",
    "ITest1 should_be_empty",
    "uint32[4] p3",
    "ITest1 second_obj",
)
