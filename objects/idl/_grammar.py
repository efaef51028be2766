"""The Mink IDL grammar as a packrat-free PEG parser: text in, syntax records out.

The compiler's grammar is a PEG (``idl_grammar.pest``); this module follows it rule for
rule, with the PEG's behaviour kept where it differs from a tokenizer's:

* ordered choice commits to the first alternative that matches (``uint8x a;`` reads the
  type ``uint8`` and then fails, it never tries ``uint8x`` as a name);
* atomic rules (``include``, ``struct ``/``const ``/``error ``/``interface `` keywords, a
  method's attributes and ``method `` keyword) allow no comments and need the exact
  whitespace the grammar spells (``struct`` then one whitespace character);
* every other rule skips whitespace and comments between its parts;
* ``};`` and ``);`` are single tokens (no space between the two characters).

Failures report the furthest position any rule reached, with what was expected there.
Nothing here knows about types or names: :mod:`objects.idl._checks` does the semantics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

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
    "parse_text",
]

_WS: Final = " \t\r\n"
_ALPHA: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_DIGITS: Final = frozenset("0123456789")
_ALNUM_: Final = _ALPHA | _DIGITS | {"_"}
_HEX: Final = _DIGITS | frozenset("abcdefABCDEF")


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


@dataclass(slots=True)
class _Comment:
    is_doc: bool
    text: str


def _clean_doc(raw: str) -> str:
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


@dataclass(slots=True)
class _Parser:
    text: str
    pos: int = 0
    far: int = 0
    expected: set[str] = field(default_factory=set)

    # -- failure bookkeeping -------------------------------------------------------------

    def _miss(self, what: str, at: int | None = None) -> None:
        where = self.pos if at is None else at
        if where > self.far:
            self.far = where
            self.expected = {what}
        elif where == self.far:
            self.expected.add(what)

    def failure(self) -> SyntaxFailure:
        at = self.far
        found = self.text[at : at + 12].split("\n", 1)[0]
        got = f"found {found!r}" if at < len(self.text) else "found the end of the file"
        wanted = ", ".join(sorted(self.expected)) or "nothing more"
        return SyntaxFailure(at, f"syntax error: expected {wanted}; {got}")

    # -- terminals -----------------------------------------------------------------------

    def lit(self, token: str) -> bool:
        if self.text.startswith(token, self.pos):
            self.pos += len(token)
            return True
        self._miss(f"'{token}'")
        return False

    def ahead(self, token: str) -> bool:
        return self.text.startswith(token, self.pos)

    def one_ws(self) -> bool:
        """One ``WHITESPACE`` (a space, a tab or one newline, ``\\r\\n`` counting as one)."""
        if self.text.startswith("\r\n", self.pos):
            self.pos += 2
            return True
        if self.pos < len(self.text) and self.text[self.pos] in _WS:
            self.pos += 1
            return True
        self._miss("whitespace")
        return False

    def many_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in _WS:
            self.pos += 1

    def digits(self, what: str = "a digit") -> str | None:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in _DIGITS:
            self.pos += 1
        if self.pos == start:
            self._miss(what)
            return None
        return self.text[start : self.pos]

    def ident(self) -> str | None:
        start = self.pos
        if start >= len(self.text) or self.text[start] not in _ALPHA:
            self._miss("a name")
            return None
        self.pos += 1
        while self.pos < len(self.text) and self.text[self.pos] in _ALNUM_:
            self.pos += 1
        return self.text[start : self.pos]

    def primitive_type(self) -> str | None:
        start = self.pos
        for head, widths in (("uint", ("8", "16", "32", "64")), ("int", ("8", "16", "32", "64"))):
            if self.text.startswith(head, start):
                for width in widths:
                    if self.text.startswith(width, start + len(head)):
                        self.pos = start + len(head) + len(width)
                        return self.text[start : self.pos]
        if self.text.startswith("float", start):
            for width in ("32", "64"):
                if self.text.startswith(width, start + 5):
                    self.pos = start + 5 + len(width)
                    return self.text[start : self.pos]
        self._miss("a primitive type")
        return None

    def value(self) -> str | None:
        start = self.pos
        neg = 1 if self.ahead("-") else 0
        if self.text.startswith("0x", start + neg):
            self.pos = start + neg + 2
            n = self.pos
            while self.pos < len(self.text) and self.text[self.pos] in _HEX:
                self.pos += 1
            if self.pos > n:
                return self.text[start : self.pos]
        self.pos = start + neg
        if self.digits("a number") is None:
            self.pos = start
            return None
        mark = self.pos
        if self.ahead(".") and (self.pos + 1 < len(self.text)) and self.text[mark + 1] in _DIGITS:
            self.pos += 1
            self.digits()
        return self.text[start : self.pos]

    # -- implicit whitespace and comments ---------------------------------------------------

    def skip(self) -> list[_Comment]:
        """``(WHITESPACE | COMMENT)*`` between the parts of a non-atomic rule."""
        comments: list[_Comment] = []
        text = self.text
        while self.pos < len(text):
            ch = text[self.pos]
            if ch in _WS:
                self.pos += 1
            elif text.startswith("/*", self.pos):
                end = text.find("*/", self.pos + 2)
                if end < 0:
                    raise SyntaxFailure(self.pos, "syntax error: comment '/*' is never closed")
                raw = text[self.pos : end + 2]
                is_doc = raw.startswith("/**") and (
                    raw.startswith("/**\n") or raw.startswith("/**\r")
                )
                comments.append(_Comment(is_doc, raw))
                self.pos = end + 2
            elif text.startswith("//", self.pos):
                end = self.pos
                while end < len(text) and text[end] not in "\r\n":
                    end += 1
                comments.append(_Comment(False, text[self.pos : end]))
                self.pos = end
            else:
                break
        return comments

    @staticmethod
    def doc_of(comments: list[_Comment]) -> str | None:
        """The compiler's rule: the last comment before a node is its documentation when
        it is a ``/**``-newline comment; any later plain comment cancels it."""
        if comments and comments[-1].is_doc:
            return _clean_doc(comments[-1].text)
        return None

    # -- rules ------------------------------------------------------------------------------

    def include(self) -> IncludeSyntax | None:
        start = self.pos
        if not self.lit("include"):
            return None
        if not self.one_ws():
            self.pos = start
            return None
        self.many_ws()
        if not self.lit('"'):
            self.pos = start
            return None
        end = self.text.find(".idl", self.pos)
        if end <= self.pos:
            self._miss("a path ending in '.idl'")
            self.pos = start
            return None
        path = self.text[self.pos : end + 4]
        self.pos = end + 4
        if not self.lit('"'):
            self.pos = start
            return None
        return IncludeSyntax(path, start)

    def keyword(self, word: str) -> bool:
        """``@{ word ~ WHITESPACE }``: the keyword then exactly one whitespace character."""
        start = self.pos
        if self.lit(word) and self.one_ws():
            return True
        self.pos = start
        return False

    def const(self) -> ConstSyntax | None:
        start = self.pos
        if not self.keyword("const"):
            return None
        self.skip()
        type_offset = self.pos
        type_name = self.primitive_type()
        if type_name is None:
            self.pos = start
            return None
        self.skip()
        name_offset = self.pos
        name = self.ident()
        if name is None:
            self.pos = start
            return None
        self.skip()
        if not self.lit("="):
            self.pos = start
            return None
        self.skip()
        value_offset = self.pos
        value = self.value()
        if value is None:
            self.pos = start
            return None
        self.skip()
        if not self.lit(";"):
            self.pos = start
            return None
        return ConstSyntax(type_name, type_offset, name, name_offset, value, value_offset, start)

    def bounded_array(self) -> tuple[str, int] | None:
        start = self.pos
        if not self.lit("["):
            return None
        self.skip()
        at = self.pos
        size = self.digits("an array size")
        if size is None:
            self.pos = start
            return None
        self.skip()
        if not self.lit("]"):
            self.pos = start
            return None
        return size, at

    def unbounded_array(self) -> bool:
        start = self.pos
        if not self.lit("["):
            return False
        self.skip()
        if not self.lit("]"):
            self.pos = start
            return False
        return True

    def struct_field(self) -> FieldSyntax | None:
        start = self.pos
        type_name = self.primitive_type()
        if type_name is None:
            type_name = self.ident()
        if type_name is None:
            return None
        mark = self.pos
        self.skip()
        count: tuple[str, int] | None = self.bounded_array()
        if count is None:
            self.pos = mark
        self.skip()
        name_offset = self.pos
        name = self.ident()
        if name is None:
            self.pos = start
            return None
        self.skip()
        if not self.lit(";"):
            self.pos = start
            return None
        return FieldSyntax(
            type_name,
            start,
            count[0] if count else None,
            count[1] if count else start,
            name,
            name_offset,
        )

    def struct(self, doc: str | None) -> StructSyntax | None:
        start = self.pos
        if not self.keyword("struct"):
            return None
        self.skip()
        if self.ahead("interface"):
            self._miss("a struct name (not starting with 'interface')")
            self.pos = start
            return None
        name_offset = self.pos
        name = self.ident()
        if name is None:
            self.pos = start
            return None
        self.skip()
        if not self.lit("{"):
            self.pos = start
            return None
        fields: list[FieldSyntax] = []
        while True:
            mark = self.pos
            self.skip()
            f = self.struct_field()
            if f is None:
                self.pos = mark
                break
            fields.append(f)
        if not fields:
            self.pos = start
            return None
        self.skip()
        if not self.lit("};"):
            self.pos = start
            return None
        return StructSyntax(name, name_offset, tuple(fields), doc, start)

    def attribute(self) -> tuple[str, int] | None:
        """``#[version = X.Y]`` (atomic: only the spaces the grammar spells)."""
        start = self.pos
        if not self.lit("#["):
            return None
        if not self.lit("version"):
            self.pos = start
            return None
        self.many_ws()
        if not self.lit("="):
            self.pos = start
            return None
        self.many_ws()
        v0 = self.pos
        if self.digits() is None or not self.lit(".") or self.digits() is None:
            self.pos = start
            return None
        version = self.text[v0 : self.pos]
        if not self.lit("]"):
            self.pos = start
            return None
        return version, start

    def function_keyword(self) -> list[tuple[str, int]] | None:
        start = self.pos
        versions: list[tuple[str, int]] = []
        while True:
            mark = self.pos
            self.many_ws()
            attr = self.attribute()
            if attr is None or not self.one_ws():
                self.pos = mark
                break
            versions.append(attr)
        self.many_ws()
        if not self.keyword("method"):
            self.pos = start
            return None
        return versions

    def param_type(self) -> tuple[str, int, str | None, int] | None:
        """``(name, offset, array, array_offset)``; array None, "" (``[]``) or digits."""
        start = self.pos
        # ((ident | "interface") ~ bounded_array)
        name = self.ident()
        if name is not None:
            self.skip()
            bounded = self.bounded_array()
            if bounded is not None:
                return name, start, bounded[0], bounded[1]
        self.pos = start
        # ((primitive_type | !"interface" ~ ident) ~ unbounded_array)
        name = self.primitive_type()
        if name is None and not self.ahead("interface"):
            name = self.ident()
        if name is not None:
            at = self.pos
            self.skip()
            arr_at = self.pos
            if self.unbounded_array():
                return name, start, "", arr_at
            del at
        self.pos = start
        # primitive_type | ident | "interface" | "buffer"
        name = self.primitive_type()
        if name is None:
            name = self.ident()
        if name is None:
            return None
        return name, start, None, start

    def param(self) -> ParamSyntax | None:
        start = self.pos
        if self.ahead("in"):
            direction = "in"
        elif self.ahead("out"):
            direction = "out"
        else:
            self._miss("'in' or 'out'")
            return None
        self.pos += len(direction)
        self.skip()
        ptype = self.param_type()
        if ptype is None:
            self.pos = start
            return None
        self.skip()
        name_offset = self.pos
        name = self.ident()
        if name is None:
            self.pos = start
            return None
        type_name, type_offset, array, array_offset = ptype
        return ParamSyntax(
            direction, type_name, type_offset, array, array_offset, name, name_offset, start
        )

    def function(self, doc: str | None) -> MethodSyntax | None:
        start = self.pos
        versions = self.function_keyword()
        if versions is None:
            return None
        self.skip()
        name_offset = self.pos
        name = self.ident()
        if name is None:
            self.pos = start
            return None
        self.skip()
        if not self.lit("("):
            self.pos = start
            return None
        params: list[ParamSyntax] = []
        mark = self.pos
        self.skip()
        first = self.param()
        if first is None:
            self.pos = mark
        else:
            params.append(first)
        while True:
            mark = self.pos
            self.skip()
            if not self.lit(","):
                self.pos = mark
                break
            self.skip()
            p = self.param()
            if p is None:
                self.pos = mark
                break
            params.append(p)
        self.skip()
        if not self.lit(");"):
            self.pos = start
            return None
        return MethodSyntax(name, name_offset, tuple(params), tuple(versions), doc, start)

    def error(self) -> ErrorSyntax | None:
        start = self.pos
        if not self.keyword("error"):
            return None
        self.skip()
        name_offset = self.pos
        name = self.ident()
        if name is None:
            self.pos = start
            return None
        self.skip()
        if not self.lit(";"):
            self.pos = start
            return None
        return ErrorSyntax(name, name_offset)

    def interface(self, doc: str | None) -> InterfaceSyntax | None:
        start = self.pos
        if not self.keyword("interface"):
            return None
        self.skip()
        name_offset = self.pos
        name = self.ident()
        if name is None:
            self.pos = start
            return None
        base: str | None = None
        base_offset = name_offset
        mark = self.pos
        self.skip()
        if self.lit(":"):
            self.skip()
            base_offset = self.pos
            base = self.ident()
            if base is None:
                self.pos = mark
        else:
            self.pos = mark
        self.skip()
        if not self.lit("{"):
            self.pos = start
            return None
        items: list[MethodSyntax | ConstSyntax | ErrorSyntax] = []
        while True:
            mark = self.pos
            item_doc = self.doc_of(self.skip())
            item: MethodSyntax | ConstSyntax | ErrorSyntax | None = self.function(item_doc)
            if item is None:
                item = self.const()
            if item is None:
                item = self.error()
            if item is None:
                self.pos = mark
                break
            items.append(item)
        self.skip()
        if not self.lit("};"):
            self.pos = start
            return None
        return InterfaceSyntax(name, name_offset, base, base_offset, tuple(items), doc, start)

    def idl(self) -> FileSyntax:
        includes: list[IncludeSyntax] = []
        decls: list[ConstSyntax | StructSyntax | InterfaceSyntax] = []
        while True:
            mark = self.pos
            self.skip()
            inc = self.include()
            if inc is None:
                self.pos = mark
                break
            includes.append(inc)
        while True:
            mark = self.pos
            doc = self.doc_of(self.skip())
            decl: ConstSyntax | StructSyntax | InterfaceSyntax | None = self.const()
            if decl is None:
                decl = self.struct(doc)
            if decl is None:
                decl = self.interface(doc)
            if decl is None:
                self.pos = mark
                break
            decls.append(decl)
        self.skip()
        if self.pos != len(self.text):
            self._miss("the end of the file")
            raise self.failure()
        return FileSyntax(tuple(includes), tuple(decls))


def parse_text(text: str) -> FileSyntax:
    """The syntax records of one file; :class:`SyntaxFailure` where it stops matching."""
    return _Parser(text).idl()
