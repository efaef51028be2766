"""The Mink IDL compiler's checks on syntax records, in its order (passes 1-5 here; the
lowering and the interface checks, 6-7, are :mod:`objects.idl._lower`).

The passes run over every file read (the file and its includes):

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
from dataclasses import dataclass, field

from objects.idl import model
from objects.idl._keywords import reserved_in
from objects.idl._syntax import (
    ConstSyntax,
    ErrorSyntax,
    FileSyntax,
    InterfaceSyntax,
    MethodSyntax,
    ParamSyntax,
    StructSyntax,
)

__all__ = ["CheckFailure", "Checks", "Decl", "Unit", "check"]

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
class Decl:
    unit: Unit
    node: StructSyntax | InterfaceSyntax


@dataclass(slots=True)
class Checks:
    """What passes 1-5 learnt: the declarations by name, constants, versions, layouts."""

    warnings: list[tuple[model.Location, str]] = field(default_factory=list)
    types: dict[str, Decl] = field(default_factory=dict)
    consts: dict[str, model.Location] = field(default_factory=dict)
    versions: dict[int, tuple[model.Version | None, ...]] = field(default_factory=dict)
    layout: dict[str, tuple[int, int]] = field(default_factory=dict)
    const_values: dict[int, model.Const] = field(default_factory=dict)

    def warn(self, where: model.Location, message: str) -> None:
        self.warnings.append((where, message))

    def reserved(self, unit: Unit, name: str, offset: int, what: str) -> None:
        langs = reserved_in(name, what)
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
            self.types[decl.name] = Decl(unit, decl)

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


def check(units: list[Unit]) -> Checks:
    """Passes 1-5 over ``units`` (every file read, each after the files it includes)."""
    run = Checks()
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
    return run
