"""Lowering checked syntax records to :mod:`.model` records, and the interface verifier.

Passes 6 and 7 of :mod:`objects.idl._checks`' list: parameter types resolved, methods
numbered from the root base (at most ``MAX_OP``), errors from ``ERROR_CODE_START`` across
inheritance (``idlc_mir/src/mir.rs``); then each interface checked as
``idlc_mir_passes/src/interface_verifier.rs`` does.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from objects.idl import model
from objects.idl._checks import CheckFailure, Checks, Unit, check
from objects.idl._syntax import (
    ConstSyntax,
    ErrorSyntax,
    InterfaceSyntax,
    MethodSyntax,
    ParamSyntax,
    StructSyntax,
)

__all__ = ["lower"]

_VERSION_FUNC_NAME = "api_version"

#: Per file read (by ``id`` of its unit): its own constants, structs and interfaces.
Lowered = dict[
    int, tuple[tuple[model.Const, ...], tuple[model.Struct, ...], tuple[model.Interface, ...]]
]


@dataclass(slots=True)
class _Builder:
    checks: Checks
    structs: dict[str, model.Struct] = field(default_factory=dict)
    interfaces: dict[str, model.Interface] = field(default_factory=dict)

    # -- 6: lowering -----------------------------------------------------------------------

    def field_type(self, name: str) -> model.FieldType:
        prim = model.Primitive.from_name(name)
        if prim is not None:
            return prim
        if name == "interface":
            return model.InterfaceType(None)
        decl = self.checks.types[name]
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
            decl = self.checks.types.get(name)
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
            decl = self.checks.types[s.base]
            assert isinstance(decl.node, InterfaceSyntax)
            base = self.interface(decl.unit, decl.node)
        op = len(base.all_methods) if base else 0
        code = model.ERROR_CODE_START + (len(base.all_errors) if base else 0)
        methods: list[model.Method] = []
        errors: list[model.Error] = []
        consts: list[model.Const] = []
        for item in s.items:
            if isinstance(item, ConstSyntax):
                consts.append(self.checks.const_values[id(item)])
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
                versions = self.checks.versions[id(item)]
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
                    self.checks.warn(
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


def lower(units: list[Unit]) -> tuple[Lowered, list[tuple[model.Location, str]]]:
    """Check ``units`` (every file read, each after the files it includes) and lower them:
    per unit its own constants, structs and interfaces; and the warnings."""
    run = _Builder(check(units))
    out: Lowered = {}
    for unit in units:
        decls = unit.syntax.decls
        consts = tuple(run.checks.const_values[id(d)] for d in decls if isinstance(d, ConstSyntax))
        structs = tuple(run.struct(unit, d) for d in decls if isinstance(d, StructSyntax))
        interfaces = tuple(run.interface(unit, d) for d in decls if isinstance(d, InterfaceSyntax))
        out[id(unit)] = (consts, structs, interfaces)
    for unit in units:
        for iface in out[id(unit)][2]:
            run.verify(iface)
    return out, run.checks.warnings
