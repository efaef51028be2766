"""The reader loads the Mink IDL compiler's own test IDLs with the compiler's numbers.

Issue 19, "Acceptance": the compiler's test IDLs (``tests/idl/ITest.idl``, ``ITest3.idl``)
load; the numbers come from the compiler's lowering (``idlc_mir/src/mir.rs``: ops in
declaration order base first, errors from 10 across inheritance) and its own checks
(``tests/c/invoke.c`` and ``tests/src/implementation/mod.rs`` expect ITest1's version 2.0).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from objects import UsageError
from objects.idl import (
    Buffer,
    Direction,
    IdlError,
    IdlWarning,
    InterfaceType,
    Primitive,
    Struct,
    Version,
    parse_idl,
    read_idl,
)

DATA = Path(__file__).parent / "data"


def _read(path: Path) -> object:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IdlWarning)
        return read_idl(path)


def test_itest_loads_with_the_compilers_op_numbers() -> None:
    """mir.rs: methods numbered 0.. in declaration order; ITest1 has 27 methods."""
    f = _read(DATA / "ITest.idl")
    itest1 = f.interface("ITest1")
    names = [m.name for m in itest1.methods]
    assert names[:3] == ["add_1000", "in_struct", "out_struct"]
    assert [m.id for m in itest1.methods] == list(range(27))
    assert itest1.method("delete").id == 21
    assert itest1.method("derive_v2p2").id == 26
    assert itest1.base is None
    assert f.interface("ITest2").method("entrypoint").id == 0


def test_itest_errors_number_from_ten() -> None:
    """mir.rs ERROR_CODE_START = 10, per interface."""
    f = _read(DATA / "ITest.idl")
    assert [(e.name, e.value) for e in f.interface("ITest1").errors] == [
        ("CUSTOM_1", 10),
        ("CUSTOM_ME_ARE_TWO", 11),
        ("MISMATCH", 12),
    ]
    assert [(e.name, e.value) for e in f.interface("ITest2").errors] == [("my_custom_error", 10)]


def test_itest1_version_is_two_point_zero() -> None:
    """tests/c/invoke.c asserts ITest1_api_version gives major 2, minor 0."""
    itest1 = _read(DATA / "ITest.idl").interface("ITest1")
    assert itest1.version == Version(2, 0)
    assert itest1.method("derive_v255").version == Version(1, 255)
    assert itest1.method("add_1000").version is None
    assert _read(DATA / "ITest.idl").interface("ITest2").version == Version(1, 0)


def test_itest_struct_sizes() -> None:
    """Sizes as the C backend lays them out (back to back, objects two words)."""
    f = _read(DATA / "ITest.idl")
    sizes = {s.name: (s.size, s.align, s.is_small) for s in f.structs}
    assert sizes == {
        "ObjInStruct": (96, 8, False),
        "break": (4, 4, True),
        "SingleEncapsulated": (4, 4, True),
        "Collection": (24, 8, False),
        "F2": (2, 1, True),
        "ArrInStruct": (8, 2, True),
    }
    obj = f.struct("ObjInStruct")
    assert obj.object_paths() == (("first_obj",), ("should_be_empty",), ("second_obj",))
    arr = f.struct("ArrInStruct")
    assert arr.fields[1].type == f.struct("F2") and arr.fields[1].count == 2
    assert arr.fields[1].is_array


def test_itest_params() -> None:
    """Param kinds: buffer, interface, named interface arrays, struct arrays."""
    itest1 = _read(DATA / "ITest.idl").interface("ITest1")
    multi = itest1.method("multiple_primitive")
    kinds = [(p.name, p.direction, p.type) for p in multi.params]
    assert kinds[0] == ("unused", Direction.IN, Buffer.BUFFER)
    assert kinds[4] == ("unused3", Direction.IN, InterfaceType(None))
    assert kinds[7] == ("output2", Direction.OUT, Primitive.UINT64)
    arr = itest1.method("test_obj_array_in").params[0]
    assert (arr.type, arr.is_array, arr.bound) == (InterfaceType("ITest1"), True, 3)
    s_in = itest1.method("struct_array_in").params[0]
    assert isinstance(s_in.type, Struct) and s_in.is_array and s_in.bound is None
    assert itest1.method("well_documented_method").doc == (
        "This documentation serves the purpose of ensuring codegen doesn't break when "
        "documentation exists."
    )


def test_itest3_inherits_ops_and_errors() -> None:
    """ITest3 : ITest1 continues at op 27, ITest4 : ITest3 at 28; errors inherited."""
    f = _read(DATA / "ITest3.idl")
    assert [i.path for i in f.includes] == [str(DATA / "ITest.idl")]
    itest3 = f.interface("ITest3")
    itest4 = f.interface("ITest4")
    assert itest3.base is f.interface("ITest1")
    assert itest3.method("extra_test3").id == 27
    assert itest4.method("extra_test4").id == 28
    assert itest4.method("add_1000").id == 0
    assert [e.value for e in itest4.all_errors] == [10, 11, 12]
    assert itest3.doc is not None and itest3.doc.startswith("ITest3/ITest4 is for checking")


def test_reserved_words_warn_with_the_place() -> None:
    """idlc_codegen_c/src/lib.rs renames C keywords with a warning (``struct break``)."""
    with pytest.warns(IdlWarning, match=r"ITest\.idl:11:8: struct `break` is a reserved word"):
        read_idl(DATA / "ITest.idl")


def test_idl_error_is_a_usage_error_with_a_location() -> None:
    """IdlError names FILE:LINE:COL and is a UsageError."""
    with pytest.raises(IdlError) as info:
        parse_idl("interface A {\n  method f(in nothing x);\n};", name="t.idl")
    assert isinstance(info.value, UsageError)
    assert str(info.value).startswith("t.idl:2:15: ")
    assert (info.value.location.line, info.value.location.column) == (2, 15)
