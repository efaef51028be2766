"""Typed Python modules from an IDL file: what :mod:`objects.idl.runtime` builds, written out.

:func:`generate` writes one module per ``.idl`` file (named after it: ``ITest.idl`` ->
``ITest.py``) holding what the file declares and what it includes: a frozen dataclass per
struct, the constants, and per interface ``IFoo`` a class with ``Stub``, ``Skeleton``,
``Errors`` (an ``IntEnum`` named ``IFoo``, each member the
``error`` as written (the C backend's ``IFoo_<name>``) from 10, also
attributes of ``IFoo``), the interface's constants and ``OP_<method>`` numbers.  Stub and
skeleton methods carry the IDL's types, so the module passes ``mypy --strict``; the
argument layouts are the packing's, built from the records the module spells out.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from objects._errors import UsageError
from objects.idl._values import module_name_of, py_params
from objects.idl.model import (
    Buffer,
    Const,
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
from objects.idl.packing import layout, py_name
from objects.idl.reader import read_idl

__all__ = ["generate", "module_name", "module_text"]

_HEADER = '''"""{doc}

Generated from {source} by ``qtee idl gen``: edit the IDL, not this file.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, cast

from objects.idl import model as _m
from objects.idl.packing import MethodLayout, layout
from objects.idl.runtime import SkeletonBase, StubBase

_STUBS: dict[str, type[StubBase]] = {{}}
'''


def module_name(file: IdlFile) -> str:
    """The module's name: the file's stem, as a Python identifier."""
    return module_name_of(file.path)


class _Writer:
    def __init__(self, file: IdlFile, by_size: bool) -> None:
        self.file = file
        self.by_size = by_size
        self.lines: list[str] = []
        self.structs: dict[str, Struct] = {}
        self.interfaces: dict[str, Interface] = {}
        self.consts: list[Const] = []
        for f in file.files():
            self.consts.extend(f.consts)
            for s in f.structs:
                self.structs.setdefault(s.name, s)
            for i in f.interfaces:
                self.interfaces.setdefault(i.name, i)
        self.done: set[str] = set()

    # ---------------------------------------------------------------- records
    def type_expr(self, t: ParamType) -> str:
        if isinstance(t, Primitive):
            return f"_m.Primitive.{t.name}"
        if isinstance(t, InterfaceType):
            return "_m.InterfaceType()" if t.name is None else f"_m.InterfaceType({t.name!r})"
        if isinstance(t, Buffer):
            return "_m.Buffer.BUFFER"
        return f"_S_{t.name}"

    def field_expr(self, f: StructField) -> str:
        return f"_m.StructField({f.name!r}, {self.type_expr(f.type)}, {f.count}, {f.is_array})"

    def param_expr(self, p: Param) -> str:
        return (
            f"_m.Param({p.name!r}, _m.Direction.{p.direction.name}, {self.type_expr(p.type)}, "
            f"{p.is_array}, {p.bound})"
        )

    def method_expr(self, m: Method) -> str:
        params = "".join(f"{self.param_expr(p)}, " for p in m.params)
        return f"_m.Method({m.name!r}, {m.id}, ({params}))"

    # ---------------------------------------------------------------- python types
    def value_type(self, t: ParamType, *, out: bool) -> str:
        if isinstance(t, Primitive):
            return "float" if t.is_float else "int"
        if isinstance(t, Buffer):
            return "bytes"
        if isinstance(t, Struct):
            return py_name(t.name)
        if t.name is not None and t.name in self.interfaces:
            stub = f"{py_name(t.name)}.Stub"
            return f"{stub} | None" if out else "object"
        return "Any" if out else "object"

    def param_type(self, p: Param, *, out: bool) -> str:
        one = self.value_type(p.type, out=out)
        if not p.is_array:
            return one
        if isinstance(p.type, InterfaceType):
            return f"tuple[{one}, ...]" if out else f"Sequence[{one}]"
        if p.type is Primitive.UINT8:
            return "bytes"
        return f"tuple[{one}, ...]" if out else f"Sequence[{one}]"

    def field_type(self, f: StructField) -> str:
        if isinstance(f.type, Primitive):
            one = "float" if f.type.is_float else "int"
        elif isinstance(f.type, Struct):
            one = py_name(f.type.name)
        else:
            one = "object"
        return f"tuple[{one}, ...]" if f.is_array else one

    # ---------------------------------------------------------------- writing
    def emit(self, text: str = "") -> None:
        self.lines.append(text)

    def struct(self, s: Struct) -> None:
        if s.name in self.done:
            return
        self.done.add(s.name)
        for f in s.fields:
            if isinstance(f.type, Struct):
                self.struct(f.type)
        fields = "".join(f"{self.field_expr(f)}, " for f in s.fields)
        self.emit(f"_S_{s.name}: Final = _m.Struct({s.name!r}, ({fields}))")
        self.emit()
        self.emit()
        self.emit("@dataclass(frozen=True, slots=True)")
        self.emit(f"class {py_name(s.name)}:")
        self.emit(f'    """IDL struct {s.name} ({s.size} bytes)."""')
        self.emit()
        for f in s.fields:
            self.emit(f"    {py_name(f.name)}: {self.field_type(f)}")
        self.emit()
        self.emit()

    def interface(self, iface: Interface) -> None:
        name = iface.name
        methods = iface.all_methods
        self.emit(f"class _{name}Errors(enum.IntEnum):")
        self.emit(f'    """{name}\'s errors."""')
        self.emit()
        for e in iface.all_errors:
            self.emit(f"    {py_name(e.name)} = {e.value}")
        if not iface.all_errors:
            self.emit("    pass")
        self.emit()
        self.emit()
        self.emit(f'_{name}Errors.__name__ = _{name}Errors.__qualname__ = "{name}"')
        self.emit(f"_{name}_LAYOUTS: Final[Mapping[str, MethodLayout]] = {{")
        for m in methods:
            by = ", by_size=True" if self.by_size else ""
            self.emit(f"    {m.name!r}: layout({self.method_expr(m)}, classes=_CLASSES{by}),")
        self.emit("}")
        self.emit()
        self.emit()
        self.emit(f"class {py_name(name)}:")
        self.emit(_docstring(iface.doc or f"Interface {name}.", "    "))
        self.emit()
        self.emit(f"    Errors = _{name}Errors")
        for e in iface.all_errors:
            self.emit(f"    {py_name(e.name)}: Final = _{name}Errors.{py_name(e.name)}")
        for c in _consts(iface):
            self.emit(f"    {py_name(c.name)}: Final = {c.value!r}")
        for m in methods:
            self.emit(f"    OP_{m.name}: Final = {m.id}")
        self.emit()
        self.stub(iface)
        self.skeleton(iface)
        self.emit()
        self.emit(f'_STUBS["{name}"] = {py_name(name)}.Stub')
        self.emit()
        self.emit()

    def signature(self, m: Method, *, skeleton: bool) -> tuple[str, str, list[str], list[str]]:
        """(parameters text, return type, input names, output array length names)."""
        lay = layout(m)
        names = py_params(m)
        ins = [names[p.name][0] for p in lay.inputs]
        args = ["self"] + [
            f"{names[p.name][0]}: {self.param_type(p, out=skeleton)}" for p in lay.inputs
        ]
        lens = [f"{p.name}_len" for p in lay.out_arrays]
        if lens:
            args += ["*"] + [f"{k}: int" for k in lens]
        outs = [self.param_type(p, out=not skeleton) for p in lay.outputs]
        if skeleton:  # the skeleton's outputs may be any object (a stub is unwrapped)
            outs = [
                ("object" if isinstance(p.type, InterfaceType) and not p.is_array else t)
                for p, t in zip(lay.outputs, outs, strict=True)
            ]
        if not outs:
            ret = "None"
        elif len(outs) == 1:
            ret = outs[0]
        else:
            ret = f"tuple[{', '.join(outs)}]"
        return ", ".join(args), ret, ins, lens

    def stub(self, iface: Interface) -> None:
        name = iface.name
        self.emit("    class Stub(StubBase):")
        self.emit(f'        """Caller\'s side of {name}: one method per IDL method."""')
        self.emit()
        self.emit("        __slots__ = ()")
        self.emit(f"        LAYOUTS: ClassVar[Mapping[str, MethodLayout]] = _{name}_LAYOUTS")
        self.emit(f"        ERRORS: ClassVar[type[enum.IntEnum] | None] = _{name}Errors")
        self.emit("        STUBS: ClassVar[Mapping[str, type[StubBase]]] = _STUBS")
        for m in iface.all_methods:
            args, ret, ins, lens = self.signature(m, skeleton=False)
            call_args = "".join(f"{n}, " for n in ins)
            call_lens = "".join(f"{n}, " for n in lens)
            call = f"self._call({m.name!r}, ({call_args}), ({call_lens}))"
            self.emit()
            self.emit(f"        def {py_name(m.name)}({args}) -> {ret}:")
            if m.doc:
                self.emit(_docstring(m.doc, "            "))
            if ret == "None":
                self.emit(f"            {call}")
            else:
                self.emit(f'            return cast("{ret}", {call})')
        self.emit()

    def skeleton(self, iface: Interface) -> None:
        name = iface.name
        self.emit("    class Skeleton(SkeletonBase):")
        self.emit(f'        """Callee\'s side of {name}: override its methods."""')
        self.emit()
        self.emit(f"        LAYOUTS: ClassVar[Mapping[str, MethodLayout]] = _{name}_LAYOUTS")
        self.emit("        STUBS: ClassVar[Mapping[str, type[StubBase]]] = _STUBS")
        self.emit(f"        ERRORS: ClassVar[type[enum.IntEnum] | None] = _{name}Errors")
        v = iface.version
        self.emit(f"        VERSION: ClassVar[_m.Version] = _m.Version({v.major}, {v.minor})")
        for m in iface.all_methods:
            args, ret, _, _ = self.signature(m, skeleton=True)
            self.emit()
            self.emit(f"        def {py_name(m.name)}({args}) -> {ret}:")
            self.emit(f"            self._not_implemented({m.name!r})")
        self.emit()

    def module(self, source: str) -> str:
        doc = f"Python interfaces of {Path(self.file.path).name}"
        self.lines = [_HEADER.format(doc=doc, source=source)]
        for c in self.consts:
            self.emit(f"{py_name(c.name)}: Final = {c.value!r}")
        self.emit()
        for s in self.structs.values():
            self.struct(s)
        classes = ", ".join(f"{s!r}: {py_name(s)}" for s in self.structs)
        self.emit(f"_CLASSES: Final[Mapping[str, Any]] = {{{classes}}}")
        self.emit()
        self.emit()
        for i in self.interfaces.values():
            self.interface(i)
        names = sorted(
            [py_name(n) for n in self.interfaces]
            + [py_name(n) for n in self.structs]
            + [py_name(c.name) for c in self.consts]
        )
        self.emit(f"__all__ = {names!r}")
        return "\n".join(self.lines).rstrip() + "\n"


def _consts(iface: Interface) -> tuple[Const, ...]:
    return (_consts(iface.base) if iface.base else ()) + iface.consts


def module_text(file: IdlFile, *, by_size: bool = False) -> str:
    """The Python module for ``file`` (and what it includes), as text."""
    if not isinstance(file, IdlFile):
        raise UsageError(f"module_text takes a model.IdlFile, not {type(file).__name__}")
    for f in file.files():
        for i in f.interfaces:
            for m in i.all_methods:
                layout(m)  # refuse what cannot be packed before writing anything
    return _Writer(file, by_size).module(Path(file.path).name)


def generate(
    source: str | os.PathLike[str] | IdlFile,
    out_dir: str | os.PathLike[str],
    include_paths: Iterable[str | os.PathLike[str]] = (),
    *,
    by_size: bool = False,
) -> Path:
    """Write the module of ``source`` (a path, read with the reader, or a read
    :class:`IdlFile`) into ``out_dir`` (made if missing); the written file's path."""
    if isinstance(source, IdlFile):
        file = source
    elif isinstance(source, str | os.PathLike):
        file = read_idl(source, tuple(include_paths))
    else:
        raise UsageError(f"generate takes a path or a model.IdlFile, not {type(source).__name__}")
    if not isinstance(out_dir, str | os.PathLike):
        raise UsageError(f"out_dir is a path, not {type(out_dir).__name__}")
    text = module_text(file, by_size=by_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{module_name(file)}.py"
    target.write_text(text, encoding="utf-8")
    return target


def _docstring(text: str, indent: str) -> str:
    """A docstring of IDL documentation (backslashes and triple quotes made harmless)."""
    body = text.strip().replace("\\", "\\\\").replace('"' * 3, "'" * 3)
    lines = [line.strip() for line in body.splitlines()] or [""]
    quotes = '"' * 3
    if len(lines) == 1:
        return f"{indent}{quotes}{lines[0]}{quotes}"
    rest = "".join(f"\n{indent}{line}" if line else "\n" for line in lines[1:])
    return f"{indent}{quotes}{lines[0]}{rest}\n{indent}{quotes}"
