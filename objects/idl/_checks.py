"""The Mink IDL compiler's checks and lowering, from syntax records to :mod:`.model` records.

The passes run in the compiler's order, over every file read (the file and its
includes):

1. what its syntax-tree builder rejects: constants out of their type's range, malformed
   or repeated ``#[version]`` attributes, array sizes outside 1..65535;
2. one namespace for structs and interfaces and one for constants, across all files;
3. per method: no repeated parameter, at most one version, versions never decreasing
   within an interface (the first method's floor is 1.0);
4. cycles: an interface's base must exist and be an interface, inheritance must not loop,
   a struct field's type must exist and structs must not contain themselves;
5. struct layout: no repeated field, no array of objects, every field at an offset its
   alignment divides, the size a multiple of the struct's alignment (the compiler aligns
   a plain ``interface`` field to 16 here, a named interface to 8);
6. lowering: parameter types resolved, methods numbered from the root base (at most
   0x3FFF), errors numbered from 10 across inheritance;
7. interfaces: no name given twice to methods, nor to constants and errors, across the
   inheritance chain; no method ``api_version``; object arrays bounded and not mixed with
   single objects in one direction; no bounded array of data; no array of structs holding
   objects (inputs: big structs only, as the compiler checks).

A failure is a :class:`CheckFailure` (where and what); warnings are collected, the
reader turns both into its public exception and :mod:`warnings` calls.
"""

from __future__ import annotations

import struct as _struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from objects.idl import model
from objects.idl._grammar import (
    ConstSyntax,
    ErrorSyntax,
    FileSyntax,
    InterfaceSyntax,
    MethodSyntax,
    ParamSyntax,
    StructSyntax,
)
from objects.idl._keywords import reserved_in

__all__ = ["CheckFailure", "Unit", "lower"]

_VERSION_FUNC_NAME = "api_version"
_VERSION_PART_MAX = 0x3FF
_COUNT_MAX = 0xFFFF
#: The struct verifier's alignment for a plain ``interface`` field (a named interface
#: field is checked as the two-word struct it stands for: alignment 8).
_INTERFACE_KEYWORD_ALIGN = 16

_INT_RANGES = {
    model.Primitive.UINT8: (0, 0xFF),
    model.Primitive.UINT16: (0, 0xFFFF),
    model.Primitive.UINT32: (0, 0xFFFF_FFFF),
    model.Primitive.UINT64: (0, 0xFFFF_FFFF_FFFF_FFFF),
    model.Primitive.INT8: (-0x80, 0x7F),
    model.Primitive.INT16: (-0x8000, 0x7FFF),
    model.Primitive.INT32: (-0x8000_0000, 0x7FFF_FFFF),
    model.Primitive.INT64: (-0x8000_0000_0000_0000, 0x7FFF_FFFF_FFFF_FFFF),
}


class CheckFailure(Exception):
    """A rejected file: where (``location``) and what (``reason``, plain words)."""

    def __init__(self, location: model.Location, reason: str) -> None:
        super().__init__(f"{location}: {reason}")
        self.location = location
        self.reason = reason


@dataclass(eq=False, slots=True)
class Unit:
    """One read file: its label (the path as shown in messages), text and syntax."""

    label: str
    text: str
    syntax: FileSyntax
    includes: list[Unit] = field(default_factory=list)
    _lines: list[int] = field(default_factory=list)

    def loc(self, offset: int) -> model.Location:
        if not self._lines:
            self._lines.append(0)
            self._lines.extend(i + 1 for i, ch in enumerate(self.text) if ch == "\n")
        lo, hi = 0, len(self._lines) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._lines[mid] <= offset:
                lo = mid
            else:
                hi = mid - 1
        return model.Location(self.label, lo + 1, offset - self._lines[lo] + 1)


# -- 1: what the syntax-tree builder rejects ------------------------------------------------


def const_value(unit: Unit, c: ConstSyntax) -> tuple[model.Primitive, int | float]:
    """The constant's type and value; out of range is rejected as the compiler does
    (Rust's integer parsing: no sign on unsigned types; floats must stay finite)."""
    prim = model.Primitive.from_name(c.type_name)
    assert prim is not None  # the grammar only accepts primitive names here
    text = c.value
    hexa = text.startswith(("0x", "-0x"))
    digits = text.replace("0x", "")
    where = unit.loc(c.value_offset)
    if prim.is_float:
        try:
            checked = float(digits)
            _struct.pack("<" + prim.code, checked)
        except (ValueError, OverflowError):
            raise CheckFailure(
                where, f"'{text}' isn't in range for type '{c.type_name}' (not a finite value)"
            ) from None
        return prim, float(int(text, 16)) if hexa else float(text)
    lo, hi = _INT_RANGES[prim]
    try:
        if digits.startswith("-") and lo == 0:
            raise ValueError("unsigned")
        value = int(digits, 16 if hexa else 10)
    except ValueError:
        raise CheckFailure(
            where, f"'{text}' isn't in range for type '{c.type_name}' (not an integer of it)"
        ) from None
    if not lo <= value <= hi:
        raise CheckFailure(where, f"'{text}' isn't in range for type '{c.type_name}'")
    return prim, value


def parse_version(unit: Unit, text: str, offset: int) -> model.Version:
    """``X.Y`` with each part in 0..1023 (the compiler's ``APIVersion``)."""
    major, minor = text.split(".", 1)
    for part, what in ((major, "major"), (minor, "minor")):
        if int(part) > _VERSION_PART_MAX:
            raise CheckFailure(
                unit.loc(offset),
                f"version {text}: {what} version must be an integer in 0..=1023",
            )
    return model.Version(int(major), int(minor))


def array_count(unit: Unit, digits: str, offset: int) -> int:
    count = int(digits)
    if not 1 <= count <= _COUNT_MAX:
        raise CheckFailure(
            unit.loc(offset), f"array size {digits} is outside 1..{_COUNT_MAX} (a u16, not zero)"
        )
    return count


# -- the whole run ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Decl:
    unit: Unit
    node: StructSyntax | InterfaceSyntax


@dataclass(slots=True)
class _Lowering:
    units: list[Unit]
    warnings: list[tuple[model.Location, str]] = field(default_factory=list)
    types: dict[str, _Decl] = field(default_factory=dict)
    consts: dict[str, model.Location] = field(default_factory=dict)
    versions: dict[int, tuple[model.Version | None, ...]] = field(default_factory=dict)
    layout: dict[str, tuple[int, int]] = field(default_factory=dict)
    structs: dict[str, model.Struct] = field(default_factory=dict)
    interfaces: dict[str, model.Interface] = field(default_factory=dict)
    const_values: dict[int, model.Const] = field(default_factory=dict)

    def warn(self, where: model.Location, message: str) -> None:
        self.warnings.append((where, message))

    def reserved(self, unit: Unit, name: str, offset: int, what: str) -> None:
        langs = reserved_in(name)
        if langs:
            self.warn(
                unit.loc(offset),
                f"{what} `{name}` is a reserved word in {', '.join(langs)}; "
                f"backends for those languages rename it `_{name}`",
            )

    # -- 1 ----------------------------------------------------------------------------------

    def syntax_tree(self, unit: Unit) -> None:
        for decl in unit.syntax.decls:
            if isinstance(decl, ConstSyntax):
                self.const(unit, decl)
            elif isinstance(decl, StructSyntax):
                self.reserved(unit, decl.name, decl.name_offset, "struct")
                for f in decl.fields:
                    self.reserved(unit, f.name, f.name_offset, "field")
                    if f.count is not None:
                        array_count(unit, f.count, f.count_offset)
            else:
                self.reserved(unit, decl.name, decl.name_offset, "interface")
                for item in decl.items:
                    if isinstance(item, ConstSyntax):
                        self.const(unit, item)
                    elif isinstance(item, ErrorSyntax):
                        self.reserved(unit, item.name, item.name_offset, "error")
                    else:
                        self.method_syntax(unit, item)

    def const(self, unit: Unit, c: ConstSyntax) -> None:
        prim, value = const_value(unit, c)
        self.reserved(unit, c.name, c.name_offset, "constant")
        self.const_values[id(c)] = model.Const(
            c.name, prim, value, c.value, location=unit.loc(c.name_offset)
        )

    def method_syntax(self, unit: Unit, m: MethodSyntax) -> None:
        self.reserved(unit, m.name, m.name_offset, "method")
        seen: list[model.Version] = []
        for text, offset in m.versions:
            version = parse_version(unit, text, offset)
            if version in seen:
                raise CheckFailure(
                    unit.loc(offset), f"method `{m.name}` repeats the attribute version = {text}"
                )
            seen.append(version)
        for p in m.params:
            self.reserved(unit, p.name, p.name_offset, "parameter")
            if p.array:
                array_count(unit, p.array, p.array_offset)
        self.versions[id(m)] = tuple(seen)

    # -- 2 ----------------------------------------------------------------------------------

    def symbols(self, unit: Unit) -> None:
        for decl in unit.syntax.decls:
            if isinstance(decl, ConstSyntax):
                first = self.consts.get(decl.name)
                if first is not None:
                    raise CheckFailure(
                        unit.loc(decl.name_offset),
                        f"duplicate symbol: constant `{decl.name}` is already declared at {first}",
                    )
                self.consts[decl.name] = unit.loc(decl.name_offset)
                continue
            prior = self.types.get(decl.name)
            if prior is not None:
                kind = "struct" if isinstance(prior.node, StructSyntax) else "interface"
                raise CheckFailure(
                    unit.loc(decl.name_offset),
                    f"duplicate symbol: `{decl.name}` is already declared as a {kind} at "
                    f"{prior.unit.loc(prior.node.name_offset)} (structs and interfaces share "
                    "one namespace)",
                )
            self.types[decl.name] = _Decl(unit, decl)

    # -- 3 ----------------------------------------------------------------------------------

    def functions(self, unit: Unit, iface: InterfaceSyntax) -> None:
        current = model.DEFAULT_VERSION
        for m in iface.items:
            if not isinstance(m, MethodSyntax):
                continue
            names: dict[str, ParamSyntax] = {}
            for p in m.params:
                if p.name in names:
                    raise CheckFailure(
                        unit.loc(p.name_offset),
                        f"method `{iface.name}::{m.name}` has duplicate parameter `{p.name}`",
                    )
                names[p.name] = p
            versions = self.versions[id(m)]
            if len(versions) > 1:
                raise CheckFailure(
                    unit.loc(m.versions[1][1]),
                    f"method `{iface.name}::{m.name}` has multiple 'version' attributes: "
                    + ", ".join(str(v) for v in versions),
                )
            for v, (_, offset) in zip(versions, m.versions, strict=True):
                if v is not None and v < current:
                    raise CheckFailure(
                        unit.loc(offset),
                        f"method `{iface.name}::{m.name}` version `{v}` cannot be less than "
                        f"the previous method `{current}`",
                    )
                if v is not None:
                    current = max(current, v)

    # -- 4 ----------------------------------------------------------------------------------

    def inheritance(self, unit: Unit, iface: InterfaceSyntax) -> None:
        chain = [iface.name]
        here: tuple[Unit, InterfaceSyntax] = (unit, iface)
        while here[1].base is not None:
            u, node = here
            base = self.types.get(node.base or "")
            if base is None:
                raise CheckFailure(
                    u.loc(node.base_offset),
                    f"interface `{node.name}` inherits from `{node.base}`, which is not declared",
                )
            if not isinstance(base.node, InterfaceSyntax):
                raise CheckFailure(
                    u.loc(node.base_offset),
                    f"interface `{node.name}` inherits from `{node.base}`, which is a struct",
                )
            if base.node.name in chain:
                raise CheckFailure(
                    unit.loc(iface.base_offset),
                    "cyclic inheritance: " + " -> ".join([*chain, base.node.name]),
                )
            chain.append(base.node.name)
            here = (base.unit, base.node)

    def struct_graph(self, unit: Unit, s: StructSyntax, branch: list[str]) -> None:
        if s.name in self.layout:
            return
        branch = [*branch, s.name]
        for f in s.fields:
            if model.Primitive.from_name(f.type_name) or f.type_name == "interface":
                continue
            target = self.types.get(f.type_name)
            if target is None:
                raise CheckFailure(
                    unit.loc(f.type_offset),
                    f"field `{s.name}.{f.name}` has the unknown type `{f.type_name}`",
                )
            if isinstance(target.node, StructSyntax):
                if target.node.name in branch:
                    raise CheckFailure(
                        unit.loc(f.type_offset),
                        "recursive struct: " + " -> ".join([*branch, target.node.name]),
                    )
                self.struct_graph(target.unit, target.node, branch)
        # -- 5: the layout, once every field type has one -----------------------------------
        self.layout[s.name] = self.struct_layout(unit, s)

    def struct_layout(self, unit: Unit, s: StructSyntax) -> tuple[int, int]:
        size = 0
        align = 0
        seen: set[str] = set()
        for f in s.fields:
            where = unit.loc(f.name_offset)
            if f.name in seen:
                raise CheckFailure(where, f"struct `{s.name}` has duplicate field `{f.name}`")
            seen.add(f.name)
            count = int(f.count) if f.count is not None else 1
            prim = model.Primitive.from_name(f.type_name)
            target = self.types.get(f.type_name)
            is_object = f.type_name == "interface" or (
                prim is None and target is not None and isinstance(target.node, InterfaceSyntax)
            )
            if count > 1 and is_object:
                raise CheckFailure(
                    unit.loc(f.type_offset),
                    f"struct `{s.name}` contains the object array `{f.name}`; object arrays "
                    "are not allowed as struct fields",
                )
            if prim is not None:
                f_size, f_align = prim.size, prim.align
            elif f.type_name == "interface":
                f_size, f_align = 16, _INTERFACE_KEYWORD_ALIGN
            elif is_object:
                f_size, f_align = 16, 8
            else:
                f_size, f_align = self.layout[f.type_name]
            if size % f_align:
                raise CheckFailure(
                    where,
                    f"struct member `{f.name}` in `{s.name}` is not aligned to its required "
                    f"alignment {f_align}; its offset is {size} (add explicit padding fields)",
                )
            size += f_size * count
            align = max(align, f_align)
        if size % align:
            raise CheckFailure(
                unit.loc(s.name_offset),
                f"struct `{s.name}` is not a multiple of its natural alignment {align}; its "
                f"size is {size} (add explicit padding fields at the end)",
            )
        return size, align

    # -- 6: lowering -----------------------------------------------------------------------

    def field_type(self, name: str) -> model.FieldType:
        prim = model.Primitive.from_name(name)
        if prim is not None:
            return prim
        if name == "interface":
            return model.InterfaceType(None)
        decl = self.types[name]
        if isinstance(decl.node, InterfaceSyntax):
            return model.InterfaceType(name)
        return self.struct(decl.unit, decl.node)

    def struct(self, unit: Unit, s: StructSyntax) -> model.Struct:
        done = self.structs.get(s.name)
        if done is not None:
            return done
        fields = tuple(
            model.StructField(
                f.name,
                self.field_type(f.type_name),
                int(f.count) if f.count is not None else 1,
                f.count is not None,
            )
            for f in s.fields
        )
        out = model.Struct(s.name, fields, unit.label, unit.loc(s.name_offset), s.doc)
        self.structs[s.name] = out
        return out

    def param(self, unit: Unit, iface: str, m: MethodSyntax, p: ParamSyntax) -> model.Param:
        direction = model.Direction.IN if p.direction == "in" else model.Direction.OUT
        where = unit.loc(p.name_offset)
        name = p.type_name
        ptype: model.ParamType
        if name == "buffer":  # the compiler makes any ``buffer`` (even ``buffer[]``) untyped
            return model.Param(p.name, direction, model.Buffer.BUFFER, location=where)
        prim = model.Primitive.from_name(name)
        if prim is not None:
            ptype = prim
        elif name == "interface":
            ptype = model.InterfaceType(None)
        else:
            decl = self.types.get(name)
            if decl is None:
                raise CheckFailure(
                    unit.loc(p.type_offset),
                    f"parameter `{p.name}` of `{iface}::{m.name}` has the unknown type `{name}`",
                )
            if isinstance(decl.node, InterfaceSyntax):
                ptype = model.InterfaceType(name)
            else:
                ptype = self.struct(decl.unit, decl.node)
        bound = int(p.array) if p.array else None
        return model.Param(p.name, direction, ptype, p.array is not None, bound, location=where)

    def interface(self, unit: Unit, s: InterfaceSyntax) -> model.Interface:
        done = self.interfaces.get(s.name)
        if done is not None:
            return done
        base: model.Interface | None = None
        if s.base is not None:
            decl = self.types[s.base]
            assert isinstance(decl.node, InterfaceSyntax)
            base = self.interface(decl.unit, decl.node)
        op = len(base.all_methods) if base else 0
        code = model.ERROR_CODE_START + (len(base.all_errors) if base else 0)
        methods: list[model.Method] = []
        errors: list[model.Error] = []
        consts: list[model.Const] = []
        for item in s.items:
            if isinstance(item, ConstSyntax):
                consts.append(self.const_values[id(item)])
            elif isinstance(item, ErrorSyntax):
                errors.append(model.Error(item.name, code, unit.loc(item.name_offset)))
                code += 1
            else:
                if op > model.MAX_OP:
                    raise CheckFailure(
                        unit.loc(item.name_offset),
                        f"method `{s.name}::{item.name}` would be op {op:#x}: an interface "
                        f"(with its bases) has at most {model.MAX_OP + 1} methods",
                    )
                params = tuple(self.param(unit, s.name, item, p) for p in item.params)
                versions = self.versions[id(item)]
                methods.append(
                    model.Method(
                        item.name,
                        op,
                        params,
                        versions[0] if versions else None,
                        item.doc,
                        unit.loc(item.name_offset),
                    )
                )
                op += 1
        out = model.Interface(
            s.name,
            base,
            tuple(methods),
            tuple(errors),
            tuple(consts),
            unit.label,
            s.doc,
            unit.loc(s.name_offset),
        )
        self.interfaces[s.name] = out
        return out

    # -- 7 ----------------------------------------------------------------------------------

    def verify(self, iface: model.Interface) -> None:
        chain: list[model.Interface] = []
        here: model.Interface | None = iface
        while here is not None:
            chain.insert(0, here)
            here = here.base
        values: dict[str, tuple[str, model.Location | None]] = {}
        methods: dict[str, tuple[str, model.Location | None]] = {}
        for level in chain:
            named: Iterable[model.Const | model.Error] = (*level.consts, *level.errors)
            for item in sorted(named, key=lambda x: _order(x.location)):
                _collide(values, item.name, level.name, item.location, iface.name)
            for m in level.methods:
                _collide(methods, m.name, level.name, m.location, iface.name)
        for m in iface.methods:
            self.verify_method(iface, m)

    def verify_method(self, iface: model.Interface, m: model.Method) -> None:
        where = m.location or model.Location(iface.file, 0, 0)
        if m.name == _VERSION_FUNC_NAME:
            raise CheckFailure(
                where,
                f"method `{iface.name}::{m.name}` conflicts with a Mink IDL reserved word "
                "(every generated interface has an api_version method)",
            )
        arrays = {model.Direction.IN: False, model.Direction.OUT: False}
        singles = {model.Direction.IN: False, model.Direction.OUT: False}
        for p in m.params:
            at = p.location or where
            if isinstance(p.type, model.InterfaceType):
                if not p.is_array:
                    singles[p.direction] = True
                    continue
                shown = p.type.name or "interface"
                if p.bound is None:
                    raise CheckFailure(
                        at,
                        f"method `{iface.name}::{m.name}`: `{p.name}` is an unbounded array "
                        f"of {shown}; object arrays must be bounded (`{shown}[N]`)",
                    )
                if p.bound == 1:
                    self.warn(
                        at,
                        f"method `{iface.name}::{m.name}`: `{p.name}` is an object array of "
                        "size 1; a single object parameter is better",
                    )
                arrays[p.direction] = True
                continue
            if not p.is_array:
                continue
            if (
                isinstance(p.type, model.Struct)
                and p.type.has_objects
                and (p.direction is model.Direction.OUT or not p.type.is_small)
            ):
                raise CheckFailure(
                    at,
                    f"method `{iface.name}::{m.name}`: `{p.name}` is an array of struct "
                    f"`{p.type.name}`, which holds objects; such structs cannot be arrays",
                )
            if p.bound is not None:
                raise CheckFailure(
                    at,
                    f"method `{iface.name}::{m.name}`: `{p.name}` is a bounded array of "
                    "data; only objects may be bounded arrays (use `type name[]`)",
                )
        for direction in model.Direction:
            if arrays[direction] and singles[direction]:
                raise CheckFailure(
                    where,
                    f"method `{iface.name}::{m.name}` has both an object array and single "
                    f"object {direction.value}put parameters; use one or the other",
                )


def _order(location: model.Location | None) -> tuple[int, int]:
    return (location.line, location.column) if location else (0, 0)


def _collide(
    seen: dict[str, tuple[str, model.Location | None]],
    name: str,
    owner: str,
    where: model.Location | None,
    checked: str,
) -> None:
    first = seen.get(name)
    if first is not None:
        place = where or model.Location("", 0, 0)
        raise CheckFailure(
            place,
            f"interface `{checked}`: the name `{name}` of `{owner}` is already used in "
            f"`{first[0]}` at {first[1]}",
        )
    seen[name] = (owner, where)


def lower(
    units: list[Unit],
) -> tuple[
    dict[
        int, tuple[tuple[model.Const, ...], tuple[model.Struct, ...], tuple[model.Interface, ...]]
    ],
    list[tuple[model.Location, str]],
]:
    """Check ``units`` (every file read, each after the files it includes) and lower them:
    per unit (by ``id``) its own constants, structs and interfaces; and the warnings."""
    run = _Lowering(units)
    for unit in units:
        run.syntax_tree(unit)
    for unit in units:
        run.symbols(unit)
    for unit in units:
        for decl in unit.syntax.decls:
            if isinstance(decl, InterfaceSyntax):
                run.functions(unit, decl)
    for unit in units:
        for decl in unit.syntax.decls:
            if isinstance(decl, InterfaceSyntax):
                run.inheritance(unit, decl)
            elif isinstance(decl, StructSyntax):
                run.struct_graph(unit, decl, [])
    out = {}
    for unit in units:
        consts = tuple(
            run.const_values[id(d)] for d in unit.syntax.decls if isinstance(d, ConstSyntax)
        )
        structs = tuple(
            run.struct(unit, d) for d in unit.syntax.decls if isinstance(d, StructSyntax)
        )
        interfaces = tuple(
            run.interface(unit, d) for d in unit.syntax.decls if isinstance(d, InterfaceSyntax)
        )
        out[id(unit)] = (consts, structs, interfaces)
    for unit in units:
        for iface in out[id(unit)][2]:
            run.verify(iface)
    return out, run.warnings
