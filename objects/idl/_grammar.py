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

Each rule reads like its grammar line: a part that is not there ends the rule with no
match, which puts the position back where the rule started (the PEG's backtracking).
Failures report the furthest position any rule reached, with what was expected there.
Nothing here knows about types or names: :mod:`objects.idl._checks` does the semantics.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Concatenate, Final, ParamSpec, TypeVar

from objects.idl._syntax import (
    ConstSyntax,
    ErrorSyntax,
    FieldSyntax,
    FileSyntax,
    IncludeSyntax,
    InterfaceSyntax,
    MethodSyntax,
    ParamSyntax,
    StructSyntax,
    SyntaxFailure,
    clean_doc,
)

__all__ = ["SyntaxFailure", "parse_text"]

_WS: Final = " \t\r\n"
_ALPHA: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_DIGITS: Final = frozenset("0123456789")
_ALNUM_: Final = _ALPHA | _DIGITS | {"_"}
_HEX: Final = _DIGITS | frozenset("abcdefABCDEF")


_T = TypeVar("_T")
_P = ParamSpec("_P")


class _NoMatch(Exception):
    """A rule does not match here; what it wanted is in the parser's failure record."""


def _rule(
    method: Callable[Concatenate[_Parser, _P], _T],
) -> Callable[Concatenate[_Parser, _P], _T | None]:
    """A rule that either matches or returns None with the position where it started."""

    @functools.wraps(method)
    def attempt(parser: _Parser, /, *args: _P.args, **kwargs: _P.kwargs) -> _T | None:
        start = parser.pos
        try:
            return method(parser, *args, **kwargs)
        except _NoMatch:
            parser.pos = start
            return None

    return attempt


@dataclass(slots=True)
class _Comment:
    is_doc: bool
    text: str


#: What an expected token means, in the IDL's words (the others are shown as they are).
_IN_WORDS: Final = {
    "`);`": "`);` (a method ends with `);`, no space inside)",
    "`};`": "`};` (an interface or a struct ends with `};`, no space inside)",
    "`,`": "`,` and another parameter",
    "`;`": "`;` (a field, constant or error ends with `;`)",
}


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
        wanted = " or ".join(_IN_WORDS.get(w, w) for w in sorted(self.expected)) or "nothing more"
        return SyntaxFailure(at, f"syntax error: expected {wanted}; {got}")

    # -- terminals -----------------------------------------------------------------------

    def lit(self, token: str) -> bool:
        if self.text.startswith(token, self.pos):
            self.pos += len(token)
            return True
        self._miss(f"`{token}`")
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
            return clean_doc(comments[-1].text)
        return None

    # -- combinators --------------------------------------------------------------------------

    @staticmethod
    def need(got: _T | None) -> _T:
        """``got``, or no match (a terminal's miss is already recorded)."""
        if got is None or got is False:
            raise _NoMatch
        return got

    def token(self, token: str) -> None:
        """``token`` right here (atomic), or no match."""
        self.need(self.lit(token))

    def part(self, read: Callable[[], _T | None]) -> tuple[_T, int]:
        """The next part of a non-atomic rule: ``read`` after whitespace and comments, with
        the offset it starts at; or no match."""
        self.skip()
        at = self.pos
        return self.need(read()), at

    def expect(self, token: str) -> None:
        """``token`` as the next part of a non-atomic rule, or no match."""
        self.skip()
        self.token(token)

    @staticmethod
    def choice(*alternatives: Callable[[], _T | None]) -> _T | None:
        """PEG ordered choice: the first alternative that matches (each restores on a miss)."""
        for alternative in alternatives:
            got = alternative()
            if got is not None:
                return got
        return None

    def optional(self, rule: Callable[[], _T | None]) -> _T | None:
        """``rule?`` in a non-atomic rule: ``rule`` after whitespace and comments; on a miss
        the position stays before them."""
        mark = self.pos
        self.skip()
        got = rule()
        if got is None:
            self.pos = mark
        return got

    @staticmethod
    def many(rule: Callable[[], _T | None]) -> list[_T]:
        """``rule*``: as many matches as there are in a row."""
        items: list[_T] = []
        while (item := rule()) is not None:
            items.append(item)
        return items

    def repeat(self, rule: Callable[[], _T | None]) -> list[_T]:
        """``rule*`` in a non-atomic rule (each after whitespace and comments)."""
        return self.many(lambda: self.optional(rule))

    def documented(
        self,
        *alternatives: Callable[[str | None], _T | None],
        before: Sequence[_Comment] = (),
    ) -> list[_T]:
        """``(a | b | ...)*`` where each item is given the documentation comment before it
        (``before``: comments already skipped ahead of the first item)."""
        items: list[_T] = []
        comments = list(before)
        while True:
            mark = self.pos
            doc = self.doc_of(comments + self.skip())
            comments = []
            item = self.choice(*(functools.partial(alt, doc) for alt in alternatives))
            if item is None:
                self.pos = mark
                return items
            items.append(item)

    # -- rules ------------------------------------------------------------------------------

    @_rule
    def include(self) -> IncludeSyntax:
        """``include = ${ "include" ~ WHITESPACE+ ~ "\\"" ~ path ~ "\\"" }``"""
        start = self.pos
        self.token("include")
        self.need(self.one_ws())
        self.many_ws()
        self.token('"')
        path = self.need(self.path())
        self.token('"')
        return IncludeSyntax(path, start)

    def path(self) -> str | None:
        """``path = @{ (!".idl" ~ ANY)+ ~ ".idl" }``"""
        start = self.pos
        end = self.text.find(".idl", start)
        if end <= start:
            self._miss("a path ending in `.idl`")
            return None
        self.pos = end + 4
        return self.text[start : self.pos]

    @_rule
    def keyword(self, word: str) -> bool:
        """``@{ word ~ WHITESPACE }``: the keyword then exactly one whitespace character."""
        self.token(word)
        return self.need(self.one_ws())

    @_rule
    def const(self) -> ConstSyntax:
        """``const_keyword ~ primitive_type ~ ident ~ "=" ~ value ~ ";"``"""
        start = self.pos
        self.need(self.keyword("const"))
        type_name, type_offset = self.part(self.primitive_type)
        name, name_offset = self.part(self.ident)
        self.expect("=")
        value, value_offset = self.part(self.value)
        self.expect(";")
        return ConstSyntax(type_name, type_offset, name, name_offset, value, value_offset, start)

    def array_size(self) -> str | None:
        return self.digits("an array size")

    @_rule
    def bounded_array(self) -> tuple[str, int]:
        """``"[" ~ array_size ~ "]"``: the size's digits and their offset."""
        self.token("[")
        size = self.part(self.array_size)
        self.expect("]")
        return size

    @_rule
    def unbounded_array(self) -> bool:
        """``"[" ~ "]"``"""
        self.token("[")
        self.expect("]")
        return True

    @_rule
    def struct_field(self) -> FieldSyntax:
        """``(primitive_type | ident) ~ bounded_array? ~ ident ~ ";"``"""
        start = self.pos
        type_name = self.need(self.choice(self.primitive_type, self.ident))
        count, count_offset = self.optional(self.bounded_array) or (None, start)
        name, name_offset = self.part(self.ident)
        self.expect(";")
        return FieldSyntax(type_name, start, count, count_offset, name, name_offset)

    @_rule
    def struct(self, doc: str | None) -> StructSyntax:
        """``struct_keyword ~ (!"interface" ~ ident) ~ "{" ~ (struct_field)+ ~ "};"``"""
        start = self.pos
        self.need(self.keyword("struct"))
        self.skip()
        if self.ahead("interface"):
            self._miss("a struct name (not starting with `interface`)")
            raise _NoMatch
        name, name_offset = self.part(self.ident)
        self.expect("{")
        fields = self.repeat(self.struct_field)
        if not fields:  # (struct_field)+
            raise _NoMatch
        self.expect("};")
        return StructSyntax(name, name_offset, tuple(fields), doc, start)

    @_rule
    def attribute(self) -> tuple[str, int]:
        """``${ "#[" ~ "version" ~ WHITESPACE* ~ "=" ~ WHITESPACE* ~ version ~ "]" }``: the
        version's ``X.Y`` text and where the attribute starts."""
        start = self.pos
        self.token("#[")
        self.token("version")
        self.many_ws()
        self.token("=")
        self.many_ws()
        v0 = self.pos
        self.need(self.digits())
        self.token(".")
        self.need(self.digits())
        version = self.text[v0 : self.pos]
        self.token("]")
        return version, start

    @_rule
    def spaced_attribute(self) -> tuple[str, int]:
        """``WHITESPACE* ~ attribute ~ WHITESPACE``"""
        self.many_ws()
        attr = self.need(self.attribute())
        self.need(self.one_ws())
        return attr

    @_rule
    def function_keyword(self) -> list[tuple[str, int]]:
        """``@{ (WHITESPACE* ~ attribute ~ WHITESPACE)* ~ WHITESPACE* ~ "method" ~
        WHITESPACE }``: the versions its attributes give."""
        versions = self.many(self.spaced_attribute)
        self.many_ws()
        self.need(self.keyword("method"))
        return versions

    @_rule
    def bounded_param_type(self) -> tuple[str, int, str | None, int]:
        """``(ident | "interface") ~ bounded_array``"""
        start = self.pos
        name = self.need(self.ident())
        self.skip()
        size, size_offset = self.need(self.bounded_array())
        return name, start, size, size_offset

    @_rule
    def unbounded_param_type(self) -> tuple[str, int, str | None, int]:
        """``(primitive_type | !"interface" ~ ident) ~ unbounded_array``"""
        start = self.pos
        name = self.primitive_type()
        if name is None and not self.ahead("interface"):
            name = self.ident()
        name = self.need(name)
        _, array_offset = self.part(self.unbounded_array)
        return name, start, "", array_offset

    def plain_param_type(self) -> tuple[str, int, str | None, int] | None:
        """``primitive_type | ident | "interface" | "buffer"`` (both words are idents)."""
        start = self.pos
        name = self.choice(self.primitive_type, self.ident)
        return None if name is None else (name, start, None, start)

    def param_type(self) -> tuple[str, int, str | None, int] | None:
        """``(name, offset, array, array_offset)``; array None, "" (``[]``) or digits."""
        return self.choice(
            self.bounded_param_type, self.unbounded_param_type, self.plain_param_type
        )

    def direction(self) -> str | None:
        """``mutability = @{ ("in" | "out") }``"""
        for word in ("in", "out"):
            if self.ahead(word):
                self.pos += len(word)
                return word
        self._miss("`in` or `out`")
        return None

    @_rule
    def param(self) -> ParamSyntax:
        """``mutability ~ param_type ~ ident``"""
        start = self.pos
        direction = self.need(self.direction())
        (type_name, type_offset, array, array_offset), _ = self.part(self.param_type)
        name, name_offset = self.part(self.ident)
        return ParamSyntax(
            direction, type_name, type_offset, array, array_offset, name, name_offset, start
        )

    @_rule
    def next_param(self) -> ParamSyntax:
        """``"," ~ param``"""
        self.token(",")
        return self.part(self.param)[0]

    @_rule
    def function(self, doc: str | None) -> MethodSyntax:
        """``function_keyword ~ ident ~ "(" ~ param? ~ ("," ~ param)* ~ ");"``"""
        start = self.pos
        versions = self.need(self.function_keyword())
        name, name_offset = self.part(self.ident)
        self.expect("(")
        first = self.optional(self.param)
        params = ([] if first is None else [first]) + self.repeat(self.next_param)
        self.expect(");")
        return MethodSyntax(name, name_offset, tuple(params), tuple(versions), doc, start)

    @_rule
    def error(self) -> ErrorSyntax:
        """``error_keyword ~ ident ~ ";"``"""
        self.need(self.keyword("error"))
        name, name_offset = self.part(self.ident)
        self.expect(";")
        return ErrorSyntax(name, name_offset)

    @_rule
    def base(self) -> tuple[str, int]:
        """``":" ~ ident``: the base interface's name and offset."""
        self.token(":")
        return self.part(self.ident)

    @_rule
    def interface(self, doc: str | None) -> InterfaceSyntax:
        """``interface_keyword ~ ident ~ (":" ~ ident)? ~ "{" ~ (function | const | error)*
        ~ "};"``"""
        start = self.pos
        self.need(self.keyword("interface"))
        name, name_offset = self.part(self.ident)
        base, base_offset = self.optional(self.base) or (None, name_offset)
        # comments before the "{" are the interface's too: the first item may take one
        before = self.skip()
        self.token("{")
        items: list[MethodSyntax | ConstSyntax | ErrorSyntax] = self.documented(
            self.function, lambda _: self.const(), lambda _: self.error(), before=before
        )
        self.expect("};")
        return InterfaceSyntax(name, name_offset, base, base_offset, tuple(items), doc, start)

    def idl(self) -> FileSyntax:
        """``SOI ~ include* ~ (const | struct | interface)* ~ EOI``"""
        includes = self.repeat(self.include)
        decls: list[ConstSyntax | StructSyntax | InterfaceSyntax] = self.documented(
            lambda _: self.const(), self.struct, self.interface
        )
        self.skip()
        if self.pos != len(self.text):
            self._miss("the end of the file")
            raise self.failure()
        return FileSyntax(tuple(includes), tuple(decls))


def parse_text(text: str) -> FileSyntax:
    """The syntax records of one file; :class:`SyntaxFailure` where it stops matching."""
    return _Parser(text).idl()
