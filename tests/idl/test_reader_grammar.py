"""The reader's grammar is the compiler's PEG grammar: each case of the compiler's parser
tests (``idlc_ast/src/tests/parser.rs``) is accepted or rejected the same way.

The compiler's tests parse one rule at a time; here each snippet is put where the rule
sits in a file (a field in a struct, a method or an error in an interface) and the whole
text is parsed by :func:`objects.idl._grammar.parse_text` (syntax only: names and ranges
are the later passes' business, see ``test_reader_checks.py``).
"""

from __future__ import annotations

import pytest

from objects.idl import IdlError, parse_idl
from objects.idl._grammar import SyntaxFailure, parse_text

WRAP = {
    "file": "{}",
    "struct_field": "struct S {{ {} }};",
    "function": "interface I {{ {} }};",
    "error": "interface I {{ {} }};",
}

VALID = [
    # parser.rs valid_includes
    ("file", 'include "header.idl"'),
    ("file", 'include "header\U0001f170.idl"'),
    ("file", 'include           "header.idl"'),
    ("file", 'include   "/path/to/header.idl"'),
    ("file", 'include   "/path/to/.header.idl"'),
    ("file", 'include   "/path/to/.header with space.idl"'),
    ("file", 'include   "/.path/to/.header.idl"'),
    ("file", 'include "../path/to/header.idl"'),
    ("file", 'include\t"header.idl"'),
    ("file", 'include\n"header.idl"'),
    # parser.rs struct_fields
    ("struct_field", "uint8 test;"),
    ("struct_field", "int8 test123;"),
    ("struct_field", "int8 test_123;"),
    ("struct_field", "int8[64] test_123;"),
    # parser.rs struct
    ("file", "struct test {uint8 test;};"),
    ("file", "struct test { uint8[64] test; };"),
    ("file", "struct test { uint8[64] test; uint64 test2; };"),
    ("file", "struct test { uint8[64] test\n;\n\n\n\n uint64 test2;\n\n\n\n\n };"),
    ("file", "struct multiple_fields {\n uint64 a;\n uint64 b;\n uint64 c;\n uint64 d;\n};"),
    ("file", "struct\ttest {uint8 test;};"),
    ("file", "struct\ntest {uint8 test;};"),
    # parser.rs consts (syntax only: the range check is a later pass)
    ("file", "const uint8 foo = 123;"),
    ("file", "const uint8 bar = 0x123abf;"),
    ("file", "const int8 foo = -5;"),
    ("file", "const float32 foo = -5.123213;"),
    ("file", "const float32 bar = 5.123213;"),
    ("file", "const uint8 bar = -0xabc;"),
    ("file", "const               uint8 foo = 123;"),
    ("file", "const\tuint8 bar = -0xabc;"),
    ("file", "const\n\nuint8 bar = -0xabc;"),
    # parser.rs function
    ("function", "method foo(in buffer req, out buffer rsp);"),
    ("function", "method bar(in uint32 req, out float64 rsp);"),
    ("function", "method bar(in uint32[] req, out float64 rsp);"),
    ("function", "method bar(in interface[3] req, out float64 rsp);"),
    ("function", "method bar(in IHWKey[] req, out float64 rsp);"),
    ("function", "method bar();"),
    ("function", "method bar(in interface x,    out interface y);"),
    ("function", "method bar(in IHWKey x,    out IHWKeyFactory2 y);"),
    ("function", "method bar(in uint32 req,\n                          out uint32 rsp);"),
    ("function", "method\tfoo(in buffer req, out buffer rsp);"),
    ("function", "method\nfoo(in buffer req, out buffer rsp);"),
    ("function", "#[version = 1.1] method foo(in buffer req, out buffer rsp);"),
    ("function", "#[version=1.1] method foo(in buffer req, out buffer rsp);"),
    ("function", "#[version = 1.1]\n  method foo(in buffer req, out buffer rsp);"),
    ("function", "#[version = 1.0]\n  #[version = 1.0]\n  method foo(in buffer req);"),
    ("function", "#[version = 1.1000]\n  method foo(in buffer req, out buffer rsp);"),
    ("function", "#[version = 0.0]\n  method foo(in buffer req, out buffer rsp);"),
    # parser.rs comments and documentation
    ("file", "// foo\n"),
    ("file", "// foo"),
    ("file", "/// foo\n"),
    ("file", "// foo\n//bar\n"),
    ("file", "//** foo */"),
    ("file", "/** foo */"),
    ("file", "/**foo \n bar */"),
    ("file", "/* foo \n bar */\n\n\n"),
    ("file", "/** @} */"),
    # parser.rs interface
    ("file", "interface ITest {};"),
    ("file", "interface ITest: IBase { error tmp; };"),
    ("file", "interface\tITest: IBase { error tmp; };"),
    ("file", "interface\nITest: IBase { error tmp; };"),
    # parser.rs errors
    ("error", "error ERROR_FOO;"),
    ("error", "error ERROR_BAR ; "),
    ("error", "error axybs;"),
    ("error", "error\naxybs;"),
    ("error", "error\taxybs;"),
]

INVALID = [
    # parser.rs invalid_includes
    ("file", 'include "header.h"'),
    ("file", 'include "header.hidl"'),
    ("file", 'include "header.idls"'),
    ("file", 'include "header.idl.xyz"'),
    ("file", 'include "header.idl.idl"'),
    ("file", 'include"header.idl"'),
    # parser.rs struct_fields
    ("struct_field", "int8[64a] test_123;"),
    ("struct_field", "int8[] test_123;"),
    # parser.rs struct
    ("file", "struct test { uint81[32] test; };"),
    ("file", "struct interface {uint8 test;};"),
    ("file", "struct test { uint8[32] 123test; };"),
    ("file", "struct test { buffer untyped_buffer };"),
    ("file", "structtest {uint8 test;};"),
    # parser.rs consts
    ("file", "const uint8 foo = 0x123azf;"),
    ("file", "const uint8 bar = 123abf;"),
    ("file", "const uint8 bar = abc;"),
    ("file", "const uint8 bar = -abc;"),
    ("file", "const float32 bar = 5.;"),
    ("file", "constuint8 foo = 123;"),
    # parser.rs function
    ("function", "method foo(,);"),
    ("function", "methods foo();"),
    ("function", "method 123foo();"),
    ("function", "method foo(int buffer req);"),
    ("function", "method foo(in interface[] req);"),
    ("function", "method foo(in buffer req in buffer rsp);"),
    ("function", "method foo(buffer req);"),
    ("function", "method foo(in req);"),
    ("function", "method foo(in, in);"),
    ("function", "method foo(in uint32 123req);"),
    ("function", "method foo()"),
    ("function", "method bar(in 2IHWKey x,    out IHWKeyFactory2 y);"),
    ("function", "methodfoo();"),
    ("function", "#[unsupported_attribute] method foo(in buffer req, out buffer rsp);"),
    ("function", "#[version = 1.1]method foo(in buffer req, out buffer rsp);"),
    ("function", "#[version = 1]\n  method foo(in buffer req, out buffer rsp);"),
    ("function", "#[version = a.i]\n  method foo(in buffer req, out buffer rsp);"),
    # parser.rs interface
    ("file", "interface 12ITest {};"),
    ("file", "interface 12ITest {abc};"),
    ("file", "interface ITest: IBase IBase2 {};"),
    ("file", "interfaceITest {};"),
    # parser.rs errors
    ("error", "error 12ERROR;"),
    ("error", "errorERROR;"),
]


@pytest.mark.parametrize(("where", "snippet"), VALID)
def test_the_compilers_valid_snippets_parse(where: str, snippet: str) -> None:
    """idlc_ast/src/tests/parser.rs: every ``valid!`` case."""
    parse_text(WRAP[where].format(snippet))


@pytest.mark.parametrize(("where", "snippet"), INVALID)
def test_the_compilers_invalid_snippets_fail_with_a_place(where: str, snippet: str) -> None:
    """idlc_ast/src/tests/parser.rs: every ``invalid!`` case, rejected by the reader with
    FILE:LINE:COL."""
    with pytest.raises(IdlError, match=r"^snippet\.idl:\d+:\d+: syntax error: expected "):
        parse_idl(WRAP[where].format(snippet), name="snippet.idl")


DOC_VALID = ["/**\nfoo\nbar */", "/**\n foo \n bar */", "/**\n foo\n\n\n bar */\n"]
DOC_INVALID = ["/** foo */", "/**    \n   foo \n bar \n*/\n\n\n"]


@pytest.mark.parametrize("comment", DOC_VALID)
def test_documentation_comments_document_the_next_method(comment: str) -> None:
    """parser.rs ``documentation``: ``/**`` then a newline is documentation (pst.rs keeps it
    on the method that follows)."""
    f = parse_idl(f"interface I {{\n{comment}\nmethod f();\n}};")
    doc = f.interface("I").method("f").doc
    assert doc is not None and "foo" in doc and "bar" in doc


@pytest.mark.parametrize("comment", DOC_INVALID)
def test_other_comments_document_nothing(comment: str) -> None:
    """parser.rs ``documentation`` invalid cases are plain comments: no doc."""
    f = parse_idl(f"interface I {{\n{comment}\nmethod f();\n}};")
    assert f.interface("I").method("f").doc is None


def test_a_plain_comment_after_documentation_cancels_it() -> None:
    """pst.rs parse_interface: the last comment before a node decides its documentation."""
    f = parse_idl("interface I {\n/**\n doc\n */\n// note\nmethod f();\n};")
    assert f.interface("I").method("f").doc is None


def test_documentation_before_the_brace_documents_the_first_method() -> None:
    """pst.rs parse_interface walks every comment of the interface rule, those between
    its name and ``{`` included."""
    f = parse_idl("interface I\n/**\n first */\n{\n  method f();\n  method g();\n};")
    assert f.interface("I").method("f").doc == "first"
    assert f.interface("I").method("g").doc is None


def test_peg_choice_commits_to_the_primitive_prefix() -> None:
    """idl_grammar.pest struct_field: ``(primitive_type | ident)`` takes ``uint8`` out of
    ``uint8x`` and never retries it as a name (PEG ordered choice)."""
    with pytest.raises(SyntaxFailure):
        parse_text("struct uint8x { uint8 a; }; struct S { uint8x b; };")


def test_a_leading_comma_in_a_parameter_list_is_accepted() -> None:
    """idl_grammar.pest function: ``"(" ~ param? ~ ("," ~ param)* ~ ");"`` accepts
    ``(, in uint32 a)`` (the compiler's grammar does too)."""
    f = parse_idl("interface I { method f(, in uint32 a); };")
    assert [p.name for p in f.interface("I").method("f").params] == ["a"]


def test_unclosed_comment_is_named() -> None:
    """An unterminated ``/*`` is a syntax error at the comment."""
    with pytest.raises(IdlError, match=r"^t\.idl:2:3: syntax error: comment '/\*' is never"):
        parse_idl("struct S { uint8 a; };\n  /* open", name="t.idl")


def test_syntax_error_names_line_and_column() -> None:
    """Every error names FILE:LINE:COL of the furthest token the grammar reached."""
    with pytest.raises(IdlError) as info:
        parse_idl("interface I {\n  method f(in uint32 a)\n};", name="x.idl")
    assert str(info.value).startswith("x.idl:2:23: syntax error: expected ")
    assert "`);`" in str(info.value)


def test_syntax_errors_say_what_ends_a_declaration() -> None:
    """A missing ``;`` after a method's ``)`` is named in the IDL's words at the ``)``:
    a method ends with the single token ``);`` (idl_grammar.pest ``function``)."""
    with pytest.raises(IdlError) as info:
        parse_idl("interface IFoo {\n  method foo(in uint32 a)\n};\n", name="x.idl")
    assert str(info.value) == (
        "x.idl:2:25: syntax error: expected `);` (a method ends with `);`, no space inside) "
        "or `,` and another parameter; found ')'"
    )
    with pytest.raises(IdlError) as info:
        parse_idl("struct S {\n  uint32 a\n}", name="s.idl")
    assert str(info.value) == (
        "s.idl:3:1: syntax error: expected `;` (a field, constant or error ends with `;`); "
        "found '}'"
    )


def test_crlf_line_ends_count_as_one_line() -> None:
    """pest's NEWLINE takes ``\\r\\n`` as one line end: places stay right in such files."""
    with pytest.raises(IdlError, match=r"^w\.idl:3:10: "):
        parse_idl("struct S {\r\n  uint8 a;\r\n  uint32 b;\r\n};\r\n", name="w.idl")
