"""Includes: where they are looked for, cycles, files read once, names across files.

Cases from the compiler's ``idlc_ast_passes/tests/idl_store.rs`` (its ``test_data``
folders are copied to ``tests/idl/data/includes``) and ``idlc/tests/cli_negative.rs``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from objects import UsageError
from objects.idl import IdlError, IdlWarning, parse_idl, read_idl

DATA = Path(__file__).parent / "data" / "includes"


def test_cycle_without_include_paths() -> None:
    """idl_store.rs cycle_without_include_paths: a -> b -> c -> a, at c's include line."""
    root = DATA / "cycle_without_include_paths"
    with pytest.raises(IdlError) as info:
        read_idl(root / "a.idl")
    c = str(root / "c.idl")
    assert str(info.value).startswith(f"{c}:1:1: include cycle: ")
    assert str(info.value).endswith(
        f"{root / 'a.idl'} -> {root / 'b.idl'} -> {c} -> {root / 'a.idl'}"
    )


def test_no_cycle_without_include_paths() -> None:
    """idl_store.rs no_cycle_without_include_paths (``include "./c.idl"``)."""
    f = read_idl(DATA / "no_cycle_without_include_paths" / "a.idl")
    (b,) = f.includes
    (c,) = b.includes
    assert c.path.endswith("c.idl") and not c.includes


def test_cycle_with_include_paths() -> None:
    """idl_store.rs cycle_with_include_paths: b's "d.idl" is found in an include path,
    d's "a.idl" next to the first file read."""
    root = DATA / "cycle_with_include_paths"
    with pytest.raises(IdlError, match=r"d\.idl:1:1: include cycle: .*a\.idl$"):
        read_idl(root / "a.idl", include_paths=[root / "test_inner"])


def test_missing_include_path_folder_is_a_missing_file() -> None:
    """idl_store.rs: without the include path, "d.idl" is not found (at b's include)."""
    root = DATA / "cycle_with_include_paths"
    with pytest.raises(IdlError, match=r'b\.idl:1:1: include "d\.idl": file not found'):
        read_idl(root / "a.idl")


def test_cycle_with_duplicate_file_with_include_paths() -> None:
    """idl_store.rs cycle_with_duplicate_file_with_include_paths: c's "a.idl" is the one
    next to c (the first file), not test_inner/a.idl."""
    root = DATA / "cycle_with_duplicate_file_with_include_paths"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IdlWarning)
        with pytest.raises(IdlError, match=r"c\.idl:1:1: include cycle"):
            read_idl(root / "a.idl", include_paths=[root / "test_inner"])


def test_no_cycle_with_duplicate_file_read_once() -> None:
    """idl_store.rs no_cycle_with_duplicate_file_with_include_paths: c.idl, included by a
    and by b, is read once (one record shared); the copy in test_inner is not read, and
    the compiler's warning about the second candidate is given with the place."""
    root = DATA / "no_cycle_with_duplicate_file_with_include_paths"
    with pytest.warns(IdlWarning) as record:
        f = read_idl(root / "a.idl", include_paths=[root / "test_inner"])
    places = sorted(str(w.message).split(": include")[0] for w in record)
    assert places == [f"{root / 'a.idl'}:2:1", f"{root / 'b.idl'}:1:1"]
    assert all('"c.idl" is found in several places' in str(w.message) for w in record)
    b, c = f.includes
    assert b.includes[0] is c
    assert c.path == str(root / "c.idl")


def test_cycle_in_memory(tmp_path: Path) -> None:
    """idl_store.rs cycle_in_memory: test_1 -> test_2 -> test_3 -> test_1."""
    for i, j in ((1, 2), (2, 3), (3, 1)):
        (tmp_path / f"test_{i}.idl").write_text(f'\n        include "test_{j}.idl"')
    with pytest.raises(IdlError, match=r"test_3\.idl:2:9: include cycle: .*test_1\.idl$"):
        read_idl(tmp_path / "test_1.idl")


def test_file_including_itself(tmp_path: Path) -> None:
    """The shortest cycle: a file including itself."""
    (tmp_path / "x.idl").write_text('include "x.idl"\n')
    with pytest.raises(IdlError, match=r"x\.idl:1:1: include cycle: (.*x\.idl -> .*x\.idl)$"):
        read_idl(tmp_path / "x.idl")


def test_invalid_file() -> None:
    """idl_store.rs invalid_file: "File not found" (cli_negative.rs: names the include)."""
    with pytest.raises(IdlError, match=r'invalid_file\.idl:1:1: include "invalid\.idl": file not'):
        read_idl(DATA / "invalid_file.idl")


def test_invalid_trailing_path() -> None:
    """idl_store.rs invalid_trailing_path: "../invalid.idl" cannot be found."""
    with pytest.raises(IdlError, match=r'include "\.\./invalid\.idl": file not found'):
        read_idl(DATA / "invalid_trailing_path.idl")


def test_include_paths_are_searched_in_order(tmp_path: Path) -> None:
    """The first include path holding the file wins; the included file's names are used."""
    for folder, value in (("one", 1), ("two", 2)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "k.idl").write_text(f"const uint8 K{value} = {value};\n")
    with pytest.warns(IdlWarning, match="found in several places"):
        f = parse_idl(
            'include "k.idl"\ninterface I { method f(); };',
            include_paths=[tmp_path / "one", tmp_path / "two"],
        )
    assert f.includes[0].consts[0].name == "K1"


def test_included_names_resolve_and_duplicates_across_files_fail(tmp_path: Path) -> None:
    """idl_store.rs gather_symbols_from_ast: one namespace across every file read."""
    (tmp_path / "base.idl").write_text(
        "struct Pair { uint32 a; uint32 b; };\ninterface IBase { error E1; method m(); };\n"
    )
    f = parse_idl(
        'include "base.idl"\ninterface IDerived : IBase {\n  error E2;\n'
        "  method n(in Pair p, out IBase o);\n};",
        include_paths=[tmp_path],
    )
    d = f.interface("IDerived")
    assert d.base is f.includes[0].interface("IBase")
    assert [(m.name, m.id) for m in d.all_methods] == [("m", 0), ("n", 1)]
    assert [(e.name, e.value) for e in d.all_errors] == [("E1", 10), ("E2", 11)]
    assert d.method("n").params[0].type is f.struct("Pair")
    assert f.struct("Pair").file == str(tmp_path / "base.idl")
    with pytest.raises(IdlError, match=r"^main\.idl:2:8: duplicate symbol: `Pair` is already"):
        parse_idl(
            'include "base.idl"\nstruct Pair { uint64 x; };',
            name="main.idl",
            include_paths=[tmp_path],
        )


def test_errors_in_an_included_file_name_that_file(tmp_path: Path) -> None:
    """The place is in the included file, not the including one."""
    (tmp_path / "bad.idl").write_text("struct S {\n  uint8 a;\n  uint32 b;\n};\n")
    with pytest.raises(IdlError, match=r"bad\.idl:3:10: struct member `b`"):
        parse_idl('include "bad.idl"', include_paths=[tmp_path])
    (tmp_path / "syntax.idl").write_text("interface I {\n  method f(\n};\n")
    with pytest.raises(IdlError, match=r"syntax\.idl:3:1: syntax error"):
        parse_idl('include "syntax.idl"', include_paths=[tmp_path])


def test_bad_arguments_are_usage_errors(tmp_path: Path) -> None:
    """Every public function validates its input (the project charter)."""
    with pytest.raises(UsageError, match="path must be"):
        read_idl(3)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="include_paths must be a sequence"):
        read_idl(DATA / "invalid_file.idl", include_paths=str(tmp_path))
    with pytest.raises(UsageError, match="text must be a str"):
        parse_idl(b"struct")  # type: ignore[arg-type]
    with pytest.raises(IdlError, match=r"nope\.idl:1:1: cannot read the file"):
        read_idl(tmp_path / "nope.idl")


def test_missing_include_lists_each_folder_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file read by a relative name: the folder next to it and the first file's folder
    are the same one, named once ("looked in ., ." before); an include path that is that
    folder again is not repeated either."""
    (tmp_path / "IFoo.idl").write_text('include "IBar.idl"\n')
    (tmp_path / "inc").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(IdlError) as info:
        read_idl("IFoo.idl", include_paths=["inc", "."])
    assert str(info.value) == 'IFoo.idl:1:1: include "IBar.idl": file not found (looked in ., inc)'
