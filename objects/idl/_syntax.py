"""The syntax records the grammar produces (:mod:`objects.idl._grammar`): names and text
as written, each with its character offset in the file (the reader turns offsets into
line and column).  Types are names here; :mod:`objects.idl._checks` resolves them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ConstSyntax",
    "ErrorSyntax",
    "FieldSyntax",
    "FileSyntax",
    "IncludeSyntax",
    "InterfaceSyntax",
    "MethodSyntax",
    "ParamSyntax",
    "StructSyntax",
    "SyntaxFailure",
    "clean_doc",
]


@dataclass(frozen=True, slots=True)
class IncludeSyntax:
    path: str
    offset: int


@dataclass(frozen=True, slots=True)
class ConstSyntax:
    type_name: str
    type_offset: int
    name: str
    name_offset: int
    value: str
    value_offset: int
    offset: int


@dataclass(frozen=True, slots=True)
class FieldSyntax:
    type_name: str
    type_offset: int
    #: The ``[N]`` text (digits) when the field is an array, else None.
    count: str | None
    count_offset: int
    name: str
    name_offset: int


@dataclass(frozen=True, slots=True)
class StructSyntax:
    name: str
    name_offset: int
    fields: tuple[FieldSyntax, ...]
    doc: str | None
    offset: int


@dataclass(frozen=True, slots=True)
class ParamSyntax:
    direction: str
    type_name: str
    type_offset: int
    #: None: a value; "" an unbounded array ``[]``; digits: a bounded array ``[N]``.
    array: str | None
    array_offset: int
    name: str
    name_offset: int
    offset: int


@dataclass(frozen=True, slots=True)
class MethodSyntax:
    name: str
    name_offset: int
    params: tuple[ParamSyntax, ...]
    #: Each ``#[version = X.Y]``: the ``X.Y`` text and where the attribute starts.
    versions: tuple[tuple[str, int], ...]
    doc: str | None
    offset: int


@dataclass(frozen=True, slots=True)
class ErrorSyntax:
    name: str
    name_offset: int


@dataclass(frozen=True, slots=True)
class InterfaceSyntax:
    name: str
    name_offset: int
    base: str | None
    base_offset: int
    items: tuple[MethodSyntax | ConstSyntax | ErrorSyntax, ...]
    doc: str | None
    offset: int


@dataclass(frozen=True, slots=True)
class FileSyntax:
    includes: tuple[IncludeSyntax, ...] = ()
    decls: tuple[ConstSyntax | StructSyntax | InterfaceSyntax, ...] = ()


class SyntaxFailure(Exception):
    """The text does not match the grammar: ``offset`` and a plain-words ``reason``."""

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(reason)
        self.offset = offset
        self.reason = reason


def clean_doc(raw: str) -> str:
    """The text of a ``/** ... */`` comment without the markers and leading ``*``s."""
    body = raw[3:-2]
    lines = []
    for line in body.splitlines():
        stripped = line.strip()
        if stripped.startswith("*"):
            stripped = stripped[1:]
            if stripped.startswith(" "):
                stripped = stripped[1:]
        lines.append(stripped.rstrip())
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)
