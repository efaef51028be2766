"""The reader rejects what the Mink IDL compiler rejects, naming the place.

Each case cites the compiler file it comes from: its negative tests
(``idlc_ast_passes/tests/*.rs``, ``idlc_mir_passes/tests/interface_verifier.rs``) and the
checks in its sources without a test of their own (``idlc_ast/src/ast.rs``, ``pst.rs``,
``idlc_mir/src/mir.rs``, ``idlc_mir_passes/src/interface_verifier.rs``).
"""

from __future__ import annotations

import warnings

import pytest

from objects.idl import IdlError, IdlWarning, Primitive, parse_idl


def reject(text: str, where: str, *words: str) -> IdlError:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IdlWarning)
        with pytest.raises(IdlError) as info:
            parse_idl(text, name="t.idl")
    message = str(info.value)
    assert message.startswith(f"t.idl:{where}: "), message
    for word in words:
        assert word in message, message
    line, col = (int(x) for x in where.split(":"))
    assert (info.value.location.line, info.value.location.column) == (line, col)
    return info.value


def accept(text: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IdlWarning)
        parse_idl(text, name="t.idl")


# -- idlc_ast_passes/tests/consts.rs and ast.rs Primitive::new ----------------------------


def test_const_out_of_range_for_int32() -> None:
    """consts.rs out_of_bound_disallow_undefined_behavior."""
    reject("const int32 FOO = 0x80000000;", "1:19", "'0x80000000' isn't in range for type 'int32'")


def test_negative_const_for_unsigned_type() -> None:
    """ast.rs Primitive::new: an unsigned type takes no sign (parser.rs ``-0xabc``)."""
    reject("const uint8 bar = -0xabc;", "1:19", "isn't in range for type 'uint8'")


def test_const_just_outside_uint8() -> None:
    """ast.rs Primitive::new: 256 does not fit uint8; 255 and -128 for int8 do."""
    reject("const uint8 A = 256;", "1:17", "isn't in range")
    f = parse_idl("const uint8 A = 0xff; const int8 B = -0x80; const float64 C = -1.5;")
    assert [(c.value, c.text) for c in f.consts] == [(255, "0xff"), (-128, "-0x80"), (-1.5, "-1.5")]
    assert f.consts[0].type is Primitive.UINT8


def test_fraction_for_integer_const() -> None:
    """ast.rs Primitive::new: an integer type parses no fraction."""
    reject("interface I { const uint32 A = 1.5; };", "1:32", "isn't in range for type 'uint32'")


def test_infinite_float_const() -> None:
    """ast.rs Primitive::new: FloatIsInfinite."""
    digits = "9" * 40
    reject(f"const float32 BIG = {digits};", "1:21", "float32")
    accept(f"const float64 BIG = {digits};")


# -- pst.rs / ast.rs: attributes --------------------------------------------------------


def test_version_minor_above_1023() -> None:
    """ast.rs APIVersion::from_str: BadMinor above 1023 (``1.1000``, parser.rs, is fine)."""
    accept("interface I { #[version = 1.1000] method foo(); };")
    reject(
        "interface I {\n  #[version = 1.1024]\n  method foo();\n};",
        "2:3",
        "minor version must be an integer in 0..=1023",
    )


def test_version_major_above_1023() -> None:
    """ast.rs APIVersion::from_str: BadMajor."""
    reject("interface I { #[version = 1024.0] method foo(); };", "1:15", "major version")


def test_repeated_identical_attribute() -> None:
    """pst.rs InterfaceNode::new: "Duplicate attribute" (parser.rs ``1.0`` twice)."""
    reject(
        "interface I {\n  #[version = 1.0]\n  #[version = 1.0]\n  method foo();\n};",
        "3:3",
        "repeats the attribute version = 1.0",
    )


# -- idlc_ast_passes/tests/functions.rs -----------------------------------------------------


def test_duplicate_params() -> None:
    """functions.rs duplicate_params."""
    reject(
        "interface Duplicates {\n"
        "  method foo(out uint8 param1, in uint32 param2, out interface param1);\n};",
        "2:64",
        "`Duplicates::foo` has duplicate parameter `param1`",
    )


def test_multiple_version_attr() -> None:
    """functions.rs multiple_version_attr."""
    reject(
        "interface Duplicates {\n  #[version = 1.1]\n  #[version = 1.2]\n  method foo();\n};",
        "3:3",
        "`Duplicates::foo` has multiple 'version' attributes: 1.1, 1.2",
    )


def test_version_attr_not_monotonic() -> None:
    """functions.rs version_attr_not_monotonic."""
    reject(
        "interface Duplicates {\n  #[version = 1.2]\n  method foo();\n"
        "  #[version = 1.1]\n  method bar();\n};",
        "4:3",
        "`Duplicates::bar` version `1.1` cannot be less than the previous method `1.2`",
    )


def test_version_below_the_default() -> None:
    """functions.rs: the floor is DEFAULT_VERSION 1.0, so ``0.0`` (parser.rs) is refused."""
    reject("interface I { #[version = 0.0] method foo(); };", "1:15", "cannot be less")


def test_versions_restart_per_interface() -> None:
    """functions.rs: ``current_version`` restarts at 1.0 for each interface, a derived one
    included (the compiler compares no version with the base's)."""
    f = parse_idl(
        "interface A { #[version = 3.0] method a(); };\n"
        "interface B : A { #[version = 1.1] method b(); method c(); };"
    )
    b = f.interface("B")
    assert str(b.version) == "1.1" and str(f.interface("A").version) == "3.0"
    assert b.method("c").version is None and b.method("c").id == 2


# -- idlc_ast_passes/tests/cycles.rs and cycles.rs sources -------------------------------


def test_cyclic_struct() -> None:
    """cycles.rs cyclic_struct."""
    reject(
        "struct A {\n  B b;\n};\nstruct B {\n  C c;\n};\nstruct C {\n  A a;\n};",
        "8:3",
        "recursive struct: A -> B -> C -> A",
    )


def test_struct_containing_itself() -> None:
    """cycles.rs: a struct field of its own type is a cycle."""
    reject("struct A { uint32 x; A a; };", "1:22", "recursive struct: A -> A")


def test_cyclic_iface() -> None:
    """cycles.rs cyclic_iface."""
    reject(
        "interface A : B {\n};\ninterface B : C {\n};\ninterface C : A{\n};",
        "1:15",
        "cyclic inheritance: A -> B -> C -> A",
    )


def test_unknown_base_interface() -> None:
    """cycles.rs visit_iface_recurse: the base must be declared."""
    reject("interface A : Nope { };", "1:15", "`Nope`, which is not declared")


def test_base_that_is_a_struct() -> None:
    """cycles.rs: iface_lookup finds interfaces only."""
    reject("struct S { uint8 a; };\ninterface A : S { };", "2:15", "which is a struct")


def test_ordering_struct_accepts_out_of_order_declarations() -> None:
    """cycles.rs ordering_struct (and structs.rs structs_out_of_order)."""
    f = parse_idl(
        "struct A { B b; C c; D d; };\nstruct D { B b; C c; };\nstruct C { B b; };\n"
        "struct B { uint32 test; };\nstruct s2 { s1 s; uint8 a; };\nstruct s1 { uint8 a; };"
    )
    assert f.struct("A").size == 4 * 4 and f.struct("s2").size == 2


# -- idlc_ast_passes/tests/structs.rs --------------------------------------------------------


def test_unaligned_no_custom() -> None:
    """structs.rs unaligned_no_custom."""
    reject(
        "struct Unaligned {\n  uint8 start;\n  uint16 unaligned;\n  float32 still_works;\n};",
        "3:10",
        "member `unaligned` in `Unaligned` is not aligned to its required alignment 2; "
        "its offset is 1",
    )


def test_unaligned() -> None:
    """structs.rs unaligned."""
    reject(
        "struct Custom { uint16 aligned; };\n"
        "struct Unaligned { uint8 start; Custom aligned; float32 still_works; };",
        "2:40",
        "`aligned` in `Unaligned`",
    )


def test_unaligned_arrays() -> None:
    """structs.rs unaligned_arrays."""
    reject(
        "struct Custom { uint16 aligned; };\n"
        "struct Unaligned { uint8 start; Custom[2] aligned; float32 still_works; };",
        "2:43",
        "alignment 2",
    )


def test_struct_size_not_a_multiple_of_its_alignment() -> None:
    """struct_verifier.rs StructNotAligned: no tail padding is added."""
    reject("struct T {\n  uint32 a;\n  uint8 b;\n};", "1:8", "natural alignment 4; its size is 5")


def test_aligned_cases_accepted() -> None:
    """structs.rs aligned_no_custom, aligned, aligned_arr, embedded_object(_custom)."""
    accept("struct A { uint8 start; uint8 padding; uint16 aligned; float32 still_works; };")
    accept(
        "struct Custom { uint16 aligned; };\n"
        "struct U { uint8 start; uint8 padding; Custom aligned; float32 still_works; };"
    )
    accept(
        "struct Custom { uint16 aligned; };\n"
        "struct U { uint8[40] start; uint8[2] padding; Custom[35] aligned; float32 w; };"
    )
    accept("interface Foo {};\nstruct A { Foo f; };")
    accept(
        "interface Foo {};\nstruct Custom { uint16 aligned; };\n"
        "struct A { Foo f; Custom[2] aligned; uint32 n; };"
    )


def test_embedded_object_arr() -> None:
    """structs.rs embedded_object_arr: no object arrays in structs."""
    reject(
        "interface Foo {};\nstruct A {\n  Foo[4] f;\n};",
        "3:3",
        "object array `f`; object arrays are not allowed as struct fields",
    )
    reject("struct A { interface[2] f; };", "1:12", "object array `f`")


def test_plain_interface_field_is_checked_at_sixteen() -> None:
    """struct_verifier.rs: a plain ``interface`` field counts as aligned to 16
    (``Type::interface_align``), a named one as the two-word struct (8)."""
    reject("struct A { uint64 a; interface o; };", "1:32", "required alignment 16; its offset is 8")
    accept("interface Foo {};\nstruct A { uint64 a; Foo o; };")


def test_unknown_struct_def() -> None:
    """structs.rs unknown_struct_def."""
    reject("struct s2 {\n  s1 s;\n  uint8 a;\n};", "2:3", "unknown type `s1`")


def test_field_same_name() -> None:
    """structs.rs field_same_name."""
    reject("struct s2 {\n  uint8 a;\n  uint8 a;\n};", "3:9", "duplicate field `a`")


def test_struct_interface_same_name() -> None:
    """structs.rs struct_interface_same_name."""
    reject("interface IFoo {};\nstruct IFoo {\n  int64 a;\n};", "2:8", "duplicate symbol")


def test_struct_interface_same_name_ordered() -> None:
    """structs.rs struct_interface_same_name_ordered."""
    reject(
        "struct IFoo {\n  int64 a;\n};\ninterface IFoo {};", "4:11", "already declared as a struct"
    )


def test_duplicate_consts() -> None:
    """structs.rs duplicate_consts."""
    reject("const uint8 FOO = 10;\nconst uint32 FOO = 32;", "2:14", "constant `FOO` is already")


def test_const_and_struct_names_are_separate() -> None:
    """idl_store.rs: constants have their own namespace."""
    accept("const uint8 FOO = 1;\nstruct FOO { uint8 a; };")


def test_array_size_zero_or_above_u16() -> None:
    """ast.rs Count = NonZeroU16: ``[0]`` and ``[65536]`` do not parse."""
    reject("struct A { uint8[0] a; };", "1:18", "array size 0")
    reject("interface I { method f(in interface[65536] o); };", "1:37", "array size 65536")


# -- idlc_mir_passes/tests/interface_verifier.rs -------------------------------------------


def test_duplicated_const() -> None:
    """interface_verifier.rs duplicated_const."""
    reject(
        "interface IFoo {\n  const int32 A = 32;\n  const int32 A = 42;\n};", "3:15", "the name `A`"
    )


def test_duplicated_method() -> None:
    """interface_verifier.rs duplicated_method."""
    reject(
        "interface IFoo {\n method num();\n method num2();\n method num();\n};",
        "4:9",
        "the name `num`",
    )


def test_duplicated_method_with_different_arg() -> None:
    """interface_verifier.rs duplicated_method_with_different_arg."""
    reject(
        "interface IFoo {\n method num();\n method num(in int32 ai, out int32 ao);\n};",
        "3:9",
        "`num`",
    )


def test_duplicated_base_method() -> None:
    """interface_verifier.rs duplicated_base_method."""
    reject(
        "interface Foo {\n method num();\n};\ninterface IFoo : Foo {\n method num();\n"
        " method num2();\n};",
        "5:9",
        "interface `IFoo`: the name `num` of `IFoo` is already used in `Foo` at t.idl:2:9",
    )


def test_duplicated_error() -> None:
    """interface_verifier.rs duplicated_error."""
    reject("interface IFoo {\n error ERROR_FOO;\n error ERROR_FOO;\n};", "3:8", "`ERROR_FOO`")


def test_duplicated_base_error() -> None:
    """interface_verifier.rs duplicated_base_error."""
    reject(
        "interface Foo {\n error ERROR_FOO;\n};\n"
        "interface IFoo : Foo {\n error ERROR_FOO;\n error ERROR_IFOO;\n};",
        "5:8",
        "already used in `Foo`",
    )


def test_duplicated_base_const() -> None:
    """interface_verifier.rs duplicated_base_const: errors and constants share names."""
    reject("interface Foo {\n error FOO;\n const uint8 FOO = 10;\n};", "3:14", "`FOO`")


def test_method_and_const_may_share_a_name() -> None:
    """interface_verifier.rs: methods and constants are checked apart."""
    accept("interface Foo { const uint8 num = 1; method num(); };")


def test_obj_with_obj_array_input() -> None:
    """interface_verifier.rs obj_with_obj_array_input."""
    reject(
        "interface Foo { method num(); };\n"
        "interface IFoo {\n  method num(in Foo[] a, in Foo b);\n};",
        "3:23",
        "unbounded array of Foo",
    )
    reject(
        "interface Foo { method num(); };\n"
        "interface IFoo {\n  method num(in Foo[2] a, in Foo b);\n};",
        "3:10",
        "both an object array and single object input parameters",
    )


def test_obj_with_obj_array_output() -> None:
    """interface_verifier.rs obj_with_obj_array_output."""
    reject(
        "interface Foo { method num(); };\n"
        "interface IFoo {\n  method num(out Foo a, out Foo[3] b);\n};",
        "3:10",
        "both an object array and single object output parameters",
    )


def test_object_arrays_in_both_directions_are_fine() -> None:
    """interface_verifier.rs: the rule is per direction."""
    accept("interface I { method f(in interface[2] a, out interface b); };")


def test_method_named_api_version() -> None:
    """interface_verifier.rs method_named_api_version."""
    reject(
        "interface IFoo {\n  method api_version();\n};",
        "2:10",
        "conflicts with a Mink IDL reserved word",
    )


def test_bounded_array_of_primitives() -> None:
    """interface_verifier.rs: "should not have bounded array of primitive/struct"."""
    reject("interface I {\n  method f(in uint32[4] a);\n};", "2:25", "bounded array of data")
    reject(
        "struct S { uint8 a; };\ninterface I { method f(out S[2] a); };", "2:33", "bounded array"
    )


def test_array_of_struct_with_objects() -> None:
    """interface_verifier.rs: "Struct with Object inside cannot be used as an array" -- an
    output array of any such struct, an input array of a big one (the compiler checks
    only big structs on input)."""
    small = "struct O { interface o; };\n"
    big = "struct B { interface o; uint64[2] pad; };\n"
    reject(small + "interface I { method f(out O[] a); };", "2:32", "holds objects")
    reject(big + "interface I { method f(in B[] a); };", "2:31", "holds objects")
    accept(small + "interface I { method f(in O[] a); };")


def test_object_array_of_size_one_warns() -> None:
    """interface_verifier.rs: an object array of size 1 is a warning, with the place."""
    with pytest.warns(IdlWarning, match=r"^t\.idl:1:40: .*object array of size 1"):
        parse_idl("interface I { method f(in interface[1] o); };", name="t.idl")


def test_unknown_param_type() -> None:
    """mir.rs Type::new: "Couldn't find any references of symbol"."""
    reject("interface I {\n  method f(out Nothing n);\n};", "2:16", "unknown type `Nothing`")


def test_buffer_arrays_are_buffers() -> None:
    """pst.rs ParamTypeIn::from: a ``buffer`` with array brackets is still a buffer."""
    f = parse_idl("interface I { method f(in buffer[] a, out buffer[3] b); };")
    params = f.interface("I").method("f").params
    assert [(p.is_array, p.bound) for p in params] == [(False, None), (False, None)]


def test_too_many_methods() -> None:
    """mir.rs: ops run 0..0x3FFF (ObjectOp_METHOD_USERMAX) across inheritance."""
    body = "\n".join(f" method m{i}();" for i in range(0x3FFF))
    f = parse_idl(f"interface A {{\n{body}\n}};\ninterface B : A {{ method last(); }};")
    assert f.interface("B").method("last").id == 0x3FFF
    reject(
        f"interface A {{\n{body}\n}};\ninterface B : A {{ method last(); method over(); }};",
        f"{0x3FFF + 3}:{len('interface B : A { method last(); method ') + 1}",
        "op 0x4000",
    )


def test_reserved_python_word_warns_and_names_the_languages() -> None:
    """keywords.rs: backends rename reserved words with a warning; Python's are added."""
    with pytest.warns(IdlWarning) as record:
        parse_idl("interface I { method f(in uint32 lambda); };", name="t.idl")
    messages = [str(w.message) for w in record]
    assert messages == [
        "t.idl:1:34: parameter `lambda` is a reserved word in Python; "
        "backends for those languages rename it `_lambda`"
    ]


def test_reserved_words_warn_only_where_a_backend_renames() -> None:
    """idlc_codegen_cpp/java interface/mod.rs rename method names (C++ ``register``; C
    writes ``I_register``, no rename); no backend renames a parameter named ``this``."""
    with pytest.warns(IdlWarning) as record:
        parse_idl("interface I {\n  method register(in uint32 this);\n};", name="t.idl")
    assert [str(w.message) for w in record] == [
        "t.idl:2:10: method `register` is a reserved word in C++; "
        "backends for those languages rename it `_register`"
    ]
