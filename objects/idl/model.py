"""The lowered form of a Mink IDL file: what every backend reads.

The reader (:mod:`objects.idl.reader`) turns ``.idl`` text into these records after the
compiler's checks have passed; the packing (:mod:`objects.idl.packing`) and the Python
backends read nothing else.  The records follow the Mink IDL compiler's lowered form:

* methods are numbered in declaration order, the base interface's first (op 0 is the
  first method of the root interface; at most ``MAX_OP`` = 0x3FFF);
* an interface's errors are numbered from ``ERROR_CODE_START`` (10) across inheritance:
  a derived interface's first error follows its base's last;
* a struct of at most ``BUNDLED_SIZE_MAX`` (16) bytes is *small*: as a method argument
  it may travel in the method's bundle rather than as its own buffer;
* sizes and alignments are the C backend's: fields laid out back to back (the compiler
  rejects layouts that would need padding), a struct's alignment is its largest field's,
  an interface field is two 64-bit words.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final, TypeVar

__all__ = [
    "BUNDLED_SIZE_MAX",
    "DEFAULT_VERSION",
    "ERROR_CODE_START",
    "MAX_OP",
    "Buffer",
    "Const",
    "Direction",
    "Error",
    "IdlFile",
    "Interface",
    "InterfaceType",
    "Location",
    "Method",
    "Param",
    "ParamType",
    "Primitive",
    "Struct",
    "StructField",
    "FieldType",
    "Version",
]

#: Error codes 0..9 are Mink's generic results; an interface's own start here.
ERROR_CODE_START: Final = 10
#: The highest op number a method may have (``ObjectOp_METHOD_USERMAX``).
MAX_OP: Final = 0x3FFF
#: A struct (or primitive) of at most this many bytes may travel in a bundle.
BUNDLED_SIZE_MAX: Final = 16

#: What :meth:`IdlFile.interface` and :meth:`IdlFile.struct` look up by name.
_Named = TypeVar("_Named", "Interface", "Struct")


@dataclass(frozen=True, slots=True, order=True)
class Version:
    """A ``#[version = major.minor]`` attribute (the compiler's ``APIVersion``)."""

    major: int
    minor: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"


#: An interface whose methods carry no version attribute is version 1.0.
DEFAULT_VERSION: Final = Version(1, 0)


@dataclass(frozen=True, slots=True)
class Location:
    """Where a declaration starts: file (as given or resolved), 1-based line and column."""

    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


class Primitive(enum.Enum):
    """The IDL's primitive types: value is (IDL name, size in bytes, ``struct`` code)."""

    UINT8 = ("uint8", 1, "B")
    UINT16 = ("uint16", 2, "H")
    UINT32 = ("uint32", 4, "I")
    UINT64 = ("uint64", 8, "Q")
    INT8 = ("int8", 1, "b")
    INT16 = ("int16", 2, "h")
    INT32 = ("int32", 4, "i")
    INT64 = ("int64", 8, "q")
    FLOAT32 = ("float32", 4, "f")
    FLOAT64 = ("float64", 8, "d")

    def __init__(self, idl_name: str, size: int, code: str) -> None:
        self.idl_name = idl_name
        self.size = size
        #: The :mod:`struct` format character (little-endian use: ``"<" + code``).
        self.code = code

    @property
    def align(self) -> int:
        """A primitive is aligned to its size."""
        return self.size

    @property
    def is_float(self) -> bool:
        return self.code in "fd"

    @classmethod
    def from_name(cls, name: str) -> Primitive | None:
        """The primitive spelled ``name`` in IDL (``"uint32"``), else None."""
        return _PRIMITIVES.get(name)


_PRIMITIVES: Final = {p.idl_name: p for p in Primitive}


@dataclass(frozen=True, slots=True)
class InterfaceType:
    """An object: ``interface`` (``name`` None: any interface) or a named one."""

    name: str | None = None

    @property
    def size(self) -> int:
        """As a struct field, an object takes two 64-bit words (C's ``Object``)."""
        return 16

    @property
    def align(self) -> int:
        return 8


class Buffer(enum.Enum):
    """The untyped ``buffer`` parameter type (a byte array of any length)."""

    BUFFER = "buffer"


@dataclass(frozen=True, slots=True)
class StructField:
    """One field: its type and its element count (1, or N for ``type name[N]``)."""

    name: str
    type: FieldType
    count: int = 1
    #: True when declared as an array (``[N]``), even ``[1]``.
    is_array: bool = False

    @property
    def size(self) -> int:
        return self.type.size * self.count

    @property
    def align(self) -> int:
        return self.type.align


@dataclass(frozen=True, slots=True)
class Struct:
    """A struct; ``file`` is where it was declared (an included file's structs keep theirs)."""

    name: str
    fields: tuple[StructField, ...]
    file: str = ""
    location: Location | None = field(default=None, compare=False)
    doc: str | None = field(default=None, compare=False)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.fields)

    @property
    def align(self) -> int:
        return max((f.align for f in self.fields), default=1)

    @property
    def has_objects(self) -> bool:
        """True when a field (or a nested struct's field) is an interface."""
        return bool(self.object_paths())

    @property
    def is_small(self) -> bool:
        """Small per the lowered form: at most 16 bytes, whatever its fields (the C
        backend then treats a small struct holding objects apart from one without)."""
        return self.size <= BUNDLED_SIZE_MAX

    def object_paths(self) -> tuple[tuple[str, ...], ...]:
        """The field paths of every object inside, nested structs included, in order."""
        out: list[tuple[str, ...]] = []
        for f in self.fields:
            if isinstance(f.type, InterfaceType):
                out.append((f.name,))
            elif isinstance(f.type, Struct):
                out.extend((f.name, *path) for path in f.type.object_paths())
        return tuple(out)


#: What a struct field may be.
FieldType = Primitive | Struct | InterfaceType
#: What a method parameter may be.
ParamType = Primitive | Struct | InterfaceType | Buffer


class Direction(enum.Enum):
    """A parameter's direction: ``in`` (caller to callee) or ``out`` (back to the caller)."""

    IN = "in"
    OUT = "out"


@dataclass(frozen=True, slots=True)
class Param:
    """One method parameter.

    ``is_array`` with ``bound`` None is an unbounded array (``type name[]``, a buffer of
    any length in whole elements); with ``bound`` N a bounded one (only interfaces may be
    bounded arrays: ``interface objs[N]``).  ``buffer`` is ``Buffer.BUFFER``, not an array.
    """

    name: str
    direction: Direction
    type: ParamType
    is_array: bool = False
    bound: int | None = None
    location: Location | None = field(default=None, compare=False)

    @property
    def is_input(self) -> bool:
        return self.direction is Direction.IN

    @property
    def is_object(self) -> bool:
        return isinstance(self.type, InterfaceType)


@dataclass(frozen=True, slots=True)
class Method:
    """A method: its op number (``id``), parameters in declaration order, version."""

    name: str
    id: int
    params: tuple[Param, ...]
    version: Version | None = None
    doc: str | None = field(default=None, compare=False)
    location: Location | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Const:
    """``const type NAME = value;`` at file level or inside an interface."""

    name: str
    type: Primitive
    value: int | float
    #: The value as written (the C backend prints it back, e.g. ``0x10``).
    text: str = ""
    location: Location | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Error:
    """``error NAME;``: its number from 10, counted across the base interfaces."""

    name: str
    value: int
    location: Location | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Interface:
    """An interface; ``methods``/``errors``/``consts`` are its own, in declaration order."""

    name: str
    base: Interface | None
    methods: tuple[Method, ...]
    errors: tuple[Error, ...] = ()
    consts: tuple[Const, ...] = ()
    file: str = ""
    doc: str | None = field(default=None, compare=False)
    location: Location | None = field(default=None, compare=False)

    @property
    def all_methods(self) -> tuple[Method, ...]:
        """Every method callable on it, the root interface's first (op order)."""
        return (self.base.all_methods if self.base else ()) + self.methods

    @property
    def all_errors(self) -> tuple[Error, ...]:
        return (self.base.all_errors if self.base else ()) + self.errors

    @property
    def version(self) -> Version:
        """The highest version among its own methods' attributes (1.0 when none)."""
        versions = [m.version for m in self.methods if m.version is not None]
        return max(versions, default=DEFAULT_VERSION)

    def method(self, name: str) -> Method:
        """The method called ``name`` (own or inherited); KeyError names what is missing."""
        for m in self.all_methods:
            if m.name == name:
                return m
        raise KeyError(f"{self.name} has no method {name!r}")


@dataclass(frozen=True, slots=True)
class IdlFile:
    """One read file: what it declares itself, and the files it includes (already read)."""

    path: str
    includes: tuple[IdlFile, ...] = ()
    consts: tuple[Const, ...] = ()
    structs: tuple[Struct, ...] = ()
    interfaces: tuple[Interface, ...] = ()

    def files(self) -> tuple[IdlFile, ...]:
        """This file and every file it includes, each once, every file after the files it
        includes (the order in which their declarations come into scope)."""
        order: list[IdlFile] = []
        seen: set[int] = set()

        def visit(file: IdlFile) -> None:
            if id(file) not in seen:
                seen.add(id(file))
                for inc in file.includes:
                    visit(inc)
                order.append(file)

        visit(self)
        return tuple(order)

    def interface(self, name: str) -> Interface:
        """The interface called ``name``, here or in an included file."""
        return self._named("interface", name, [i for f in self.files() for i in f.interfaces])

    def struct(self, name: str) -> Struct:
        """The struct called ``name``, here or in an included file."""
        return self._named("struct", name, [s for f in self.files() for s in f.structs])

    def _named(self, what: str, name: str, decls: list[_Named]) -> _Named:
        # the reader lets no name be declared twice across a file and its includes
        for decl in decls:
            if decl.name == name:
                return decl
        raise KeyError(f"no {what} {name!r} in {self.path} or its includes")
