"""``IdlFile.files``: a read file and what it includes, each once, includes first; the
lookups by name (``IdlFile.interface``, ``IdlFile.struct``) over all of them."""

from __future__ import annotations

from pathlib import Path

import pytest

from objects.idl import read_idl


def _diamond(tmp_path: Path) -> Path:
    (tmp_path / "base.idl").write_text("struct Pair { uint32 a; uint32 b; };\n")
    (tmp_path / "left.idl").write_text('include "base.idl"\ninterface ILeft { };\n')
    (tmp_path / "right.idl").write_text('include "base.idl"\ninterface IRight { };\n')
    top = tmp_path / "top.idl"
    top.write_text('include "left.idl"\ninclude "right.idl"\ninterface ITop { };\n')
    return top


def test_files_in_include_order_each_once(tmp_path: Path) -> None:
    """Every file after the files it includes (the order names come into scope); a file
    included twice (base.idl, by left and right) is listed once."""
    f = read_idl(_diamond(tmp_path))
    assert [Path(x.path).name for x in f.files()] == [
        "base.idl",
        "left.idl",
        "right.idl",
        "top.idl",
    ]


def test_lookups_reach_every_included_file(tmp_path: Path) -> None:
    """interface()/struct() find names declared here or in any included file; a missing
    name is a KeyError naming the file looked in."""
    top = _diamond(tmp_path)
    f = read_idl(top)
    assert f.interface("ITop").name == "ITop" and f.interface("IRight").name == "IRight"
    assert [fl.name for fl in f.struct("Pair").fields] == ["a", "b"]
    with pytest.raises(KeyError, match=f"no struct 'ILeft' in {top}"):
        f.struct("ILeft")
    with pytest.raises(KeyError, match="no interface 'Pair'"):
        f.interface("Pair")
