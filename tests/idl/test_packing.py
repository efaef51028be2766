"""objects.idl.packing: the argument layout of the Mink IDL compiler's C backend.

The byte-exact examples are read off the headers that backend generated (minkipc:
``libminkteec/idl/*.h``, ``libminkadaptor/tests/smcinvoke_client/idl/*.h``); each test
cites the lines it follows.  The rules are the compiler's ``idlc_codegen/src/
{serialization.rs,functions.rs,counts.rs}`` and ``idlc_codegen_c/src/interface/functions/
{implementation.rs,invoke.rs}`` (issue 19, "Packing identical to the C backend").
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from objects import QteeError, UsageError
from objects.idl.model import (
    Direction,
    InterfaceType,
    Method,
    Param,
    Primitive,
    Struct,
    StructField,
)
from objects.idl.packing import (
    OP_RELEASE,
    OP_RETAIN,
    check_lifecycle,
    counts_pack,
    counts_unpack,
    layout,
    struct_class,
)
from tests.idl._builders import COLLECTION, OBJ_IN_STRUCT, SINGLE, method
from tests.idl._builders import struct as idl_struct

U32 = struct.Struct("<I")
S = {"SingleEncapsulated": SINGLE, "Collection": COLLECTION, "ObjInStruct": OBJ_IN_STRUCT}

HEAP_INFO = idl_struct(
    "IDiagnostics_HeapInfo",
    *(f"uint32 {n}" for n in ("totalSize", "usedSize", "freeSize", "overheadSize")),
    "uint32 wastedSize",
    "uint32 largestFreeBlockSize",
)
REGION = idl_struct("IDiagnostics_AppRegionInfo", "uint64 totalSize", "uint64 totalFree",
                "uint64 largestContigFree")  # fmt: skip


def test_counts_word_is_four_nibbles_bi_lowest() -> None:
    """object.h:107 ``ObjectCounts_pack(nBI, nBO, nOI, nOO)``: BI in bits 0-3, BO 4-7,
    OI 8-11, OO 12-15 (object.h:141-159 read them back)."""
    assert counts_pack(6, 5, 5, 1) == 0x1556
    assert counts_unpack(0x1556) == (6, 5, 5, 1)
    with pytest.raises(UsageError, match=r"0\.\.15"):
        counts_pack(16, 0, 0, 0)


def test_iwait_wait_bundles_three_inputs_and_sends_one_output_alone() -> None:
    """IWait.h:47-63: ``struct bi {msec; code; events}`` is a[0] (12 bytes, in declaration
    order: all uint32), the lone output ``result`` is its own 4-byte buffer a[1];
    ObjectCounts_pack(1, 1, 0, 0)."""
    m = method("wait", 0, "in uint32 msec", "in uint32 code", "in uint32 events",
               "out uint32 result")  # fmt: skip
    lay = layout(m)
    op, ib, caps, io = lay.pack_inputs([100, 0xC0DE, 3])
    assert (op, ib, caps, io) == (0, (U32.pack(100) + U32.pack(0xC0DE) + U32.pack(3),), (4,), ())
    assert lay.k == counts_pack(1, 1, 0, 0)
    assert lay.unpack_outputs([U32.pack(7)]) == (7,)


def test_iwait_signal_bundle_is_eight_bytes() -> None:
    """IWait.h:79-92: ``signal(code, events)``: one 8-byte bundle, counts (1, 0, 0, 0)."""
    lay = layout(method("signal", 1, "in uint32 code", "in uint32 events"))
    assert lay.pack_inputs([1, 2]) == (1, (U32.pack(1) + U32.pack(2),), (), ())
    assert lay.k == 0x1


def test_lone_small_input_travels_alone_output_bundle_first() -> None:
    """IAppController.h:36-66 (openSession): the single input primitive ``paramTypes`` is
    its own buffer a[0] before the ``i1..i4`` buffers a[1..4]; the two output primitives
    ``retValue, retOrigin`` form the 8-byte bundle a[5], before ``o1..o4`` a[6..9]; the
    object ``cancellationFlag`` a[10], ``session`` a[11]; counts (5, 5, 1, 1)."""
    m = method(
        "openSession", 0, "in interface cancellationFlag", "in uint32 paramTypes",
        *(f"in buffer i{n}" for n in range(1, 5)),
        *(f"out buffer o{n}" for n in range(1, 5)),
        "out interface session", "out uint32 retValue", "out uint32 retOrigin",
    )  # fmt: skip
    lay = layout(m)
    flag = object()
    _, ib, caps, io = lay.pack_inputs([flag, 0x55, b"1", b"22", b"", b"4444"], [8, 0, 16, 1])
    assert ib == (U32.pack(0x55), b"1", b"22", b"", b"4444")
    assert caps == (8, 8, 0, 16, 1)
    assert io == (flag,)
    assert lay.counts == (5, 5, 1, 1)
    session = object()
    out = lay.unpack_outputs([U32.pack(0) + U32.pack(3), b"ab", b"", b"x" * 16, b"y"], [session])
    assert out == (b"ab", b"", b"x" * 16, b"y", session, 0, 3)


def test_igpappclient_open_session_layout() -> None:
    """IGPAppClient.h:74-131: a[0] the 20-byte bundle {cancelCode, connectionMethod,
    connectionData, paramTypes, exParamTypes}, a[1] uuid, a[2..5] i1..i4; a[6] the 24-byte
    output bundle {memrefOutSz1..4, retValue, retOrigin}, a[7..10] o1..o4 (lenout in
    uint8 elements); a[11] waitCBO, a[12..15] imem1..4; a[16] session;
    ObjectCounts_pack(6, 5, 5, 1)."""
    m = method(
        "openSession", 0, "in buffer uuid", "in IWait waitCBO", "in uint32 cancelCode",
        "in uint32 connectionMethod", "in uint32 connectionData", "in uint32 paramTypes",
        "in uint32 exParamTypes", *(f"in buffer i{n}" for n in range(1, 5)),
        *(f"out buffer o{n}" for n in range(1, 5)),
        *(f"in interface imem{n}" for n in range(1, 5)),
        *(f"out uint32 memrefOutSz{n}" for n in range(1, 5)),
        "out interface session", "out uint32 retValue", "out uint32 retOrigin",
    )  # fmt: skip
    lay = layout(m)
    assert lay.k == counts_pack(6, 5, 5, 1)
    assert lay.ib_sizes == (20, None, None, None, None, None)
    assert lay.ob_sizes == (24, None, None, None, None)
    wait, mems = object(), [object() for _ in range(4)]
    uuid = bytes(range(16))
    _, ib, caps, io = lay.pack_inputs(
        [uuid, wait, 1, 2, 3, 4, 5, b"a", b"b", b"c", b"d", *mems], [10, 20, 30, 40]
    )
    assert ib[0] == b"".join(U32.pack(v) for v in (1, 2, 3, 4, 5))
    assert ib[1:] == (uuid, b"a", b"b", b"c", b"d")
    assert caps == (24, 10, 20, 30, 40)
    assert io == (wait, *mems)
    session = object()
    bundle = b"".join(U32.pack(v) for v in (11, 12, 13, 14, 0xFFFF0006, 4))
    out = lay.unpack_outputs([bundle, b"1", b"22", b"333", b""], [session])
    assert out == (b"1", b"22", b"333", b"", 11, 12, 13, 14, session, 0xFFFF0006, 4)


def test_itestcback_call_add_int_objects_after_buffers() -> None:
    """ITestCBack.h:333-347 (callAddInt(callee, inVal1, inVal2, out outVal)): bundle
    {inVal1, inVal2} a[0], outVal a[1], the callee a[2] though declared first; counts
    (1, 1, 1, 0)."""
    m = method("callAddInt", 8, "in ITestCallable callee", "in uint32 inVal1",
               "in uint32 inVal2", "out uint32 outVal")  # fmt: skip
    lay = layout(m)
    callee = object()
    assert lay.pack_inputs([callee, 5, 6]) == (8, (U32.pack(5) + U32.pack(6),), (4,), (callee,))
    assert lay.k == counts_pack(1, 1, 1, 0)


def test_iio_single_uint64_and_buffer_lenout() -> None:
    """IIO.h:65-73: readAtOffset(offset, out buffer data): ``&offset_val, sizeof(uint64_t)``
    a[0], ``data_len * sizeof(uint8_t)`` a[1]; ``*data_lenout = a[1].b.size``;
    IIO_invoke.h checks ``a[0].b.size != 8`` and counts (1, 1, 0, 0)."""
    lay = layout(method("readAtOffset", 1, "in uint64 offset", "out buffer data"))
    assert lay.pack_inputs([2**40 + 1], [64]) == (1, (struct.pack("<Q", 2**40 + 1),), (64,), ())
    assert lay.unpack_outputs([b"abc"]) == (b"abc",)
    assert lay.check([8], [64], 0, 0) is None
    assert "takes 8" in (lay.check([4], [64], 0, 0) or "")
    assert "counts" in (lay.check([8], [64, 1], 0, 0) or "")


def test_idiagnostics_structs_travel_as_their_own_buffers() -> None:
    """IDiagnostics.h:148-156 (queryAppRegion): two 24-byte structs and one uint32 out:
    three buffers ``sizeof(IDiagnostics_AppRegionInfo)``, ..., ``sizeof(uint32_t)`` in
    declaration order, no bundle (only one small output); counts (0, 3, 0, 0)."""
    m = Method("queryAppRegion", 4, (
        Param("pimemInfo", Direction.OUT, REGION),
        Param("ddrInfo", Direction.OUT, REGION),
        Param("scatteredAllocatorSupport", Direction.OUT, Primitive.UINT32),
    ))  # fmt: skip
    lay = layout(m)
    assert lay.ob_sizes == (24, 24, 4)
    assert lay.k == counts_pack(0, 3, 0, 0)
    region = struct_class(REGION)
    data = struct.pack("<QQQ", 1, 2, 3), struct.pack("<QQQ", 4, 5, 6), U32.pack(1)
    assert lay.unpack_outputs(data) == (region(1, 2, 3), region(4, 5, 6), 1)
    assert lay.pack_outputs((region(1, 2, 3), region(4, 5, 6), 1)) == (data, ())


def test_idiagnostics_heap_info_struct_bytes() -> None:
    """IDiagnostics.h:15-22 and 89-95: HeapInfo is six uint32 back to back (24 bytes), one
    output buffer ``sizeof(IDiagnostics_HeapInfo)``."""
    lay = layout(Method("queryHeapInfo", 0, (Param("heapInfo", Direction.OUT, HEAP_INFO),)))
    heap = struct_class(HEAP_INFO)(1, 2, 3, 4, 5, 6)
    assert lay.pack_outputs([heap]) == ((struct.pack("<6I", 1, 2, 3, 4, 5, 6),), ())


def test_bundle_orders_by_alignment_or_legacy_size() -> None:
    """serialization.rs PackedPrimitives::new: members sorted by alignment, largest first,
    stable; with the legacy option by size.  A 12-byte struct of uint32 (align 4) and a
    uint64: alignment puts the uint64 first, size puts the struct first."""
    twelve = idl_struct("Twelve", "uint32 a", "uint32 b", "uint32 c")
    m = Method("f", 0, (
        Param("t", Direction.IN, twelve),
        Param("q", Direction.IN, Primitive.UINT64),
        Param("h", Direction.IN, Primitive.UINT16),
        Param("w", Direction.IN, Primitive.UINT32),
    ))  # fmt: skip
    value = struct_class(twelve)(1, 2, 3)
    by_align = layout(m).pack_inputs([value, 9, 7, 5])[1][0]
    assert by_align == struct.pack("<Q3IIH", 9, 1, 2, 3, 5, 7)
    by_size = layout(m, by_size=True).pack_inputs([value, 9, 7, 5])[1][0]
    assert by_size == struct.pack("<3IQIH", 1, 2, 3, 9, 5, 7)


def test_multiple_primitive_from_the_compilers_test() -> None:
    """ITest.idl multiple_primitive: BI = [bundle {input2 u32, input u16} (6), unused];
    BO = [bundle {output2 u64, output u16} (10), unused2, unused5]; one object each way."""
    m = method(
        "multiple_primitive", 9, "in buffer unused", "out buffer unused2",
        "in uint16 input", "out uint16 output", "in interface unused3",
        "out interface unused4", "in uint32 input2", "out uint64 output2",
        "out buffer unused5",
    )  # fmt: skip
    lay = layout(m)
    _, ib, caps, _ = lay.pack_inputs([b"u", 0x1234, None, 0xAABBCCDD], [3, 4])
    assert ib == (struct.pack("<IH", 0xAABBCCDD, 0x1234), b"u")
    assert caps == (10, 3, 4)
    assert lay.k == counts_pack(2, 3, 1, 1)


def test_struct_with_objects_sends_zeroed_fields_and_objects_in_order() -> None:
    """implementation.rs visit_input_big_struct: a struct holding objects is sent with
    each object field set to Object_NULL (16 zero bytes) and each object as an input
    object; ITest.idl ObjInStruct is 96 bytes with three objects."""
    lay = layout(method("objects_in_struct", 1, "in ObjInStruct input",
                        "out ObjInStruct output", structs=S))  # fmt: skip
    assert lay.counts == (1, 1, 3, 3)
    assert lay.ib_sizes == (96,) and lay.ob_sizes == (96,)
    cls = struct_class(OBJ_IN_STRUCT)
    a, b = object(), object()
    v = cls((1, 2, 3, 4), a, (5, 6, 7, 8), None, (9, 10, 11, 12), b)
    _, ib, _, io = lay.pack_inputs([v])
    zero = bytes(16)
    assert ib[0] == b"".join(
        [struct.pack("<4I", 1, 2, 3, 4), zero, struct.pack("<4I", 5, 6, 7, 8), zero,
         struct.pack("<4I", 9, 10, 11, 12), zero]
    )  # fmt: skip
    assert io == (a, None, b)
    assert lay.unpack_inputs(ib, (96,), io) == ((v,), ())


def test_skeleton_refuses_wrong_counts_and_sizes() -> None:
    """invoke.rs emit: ``if (k != ObjectCounts_pack(...) || a[i].b.size != N) break;`` ->
    Object_ERROR_INVALID (IWait_invoke.h); arrays are not size-checked."""
    lay = layout(method("wait", 0, "in uint32 msec", "in uint32 code", "in uint32 events",
                        "out uint32 result"))  # fmt: skip
    with pytest.raises(QteeError) as exc:
        lay.unpack_inputs([bytes(11)], [4])
    assert exc.value.result == 2
    with pytest.raises(QteeError):
        lay.unpack_inputs([bytes(12)], [8])
    with pytest.raises(QteeError):
        lay.unpack_inputs([bytes(12)], [4], [object()])
    assert lay.unpack_inputs([bytes(12)], [4]) == ((0, 0, 0), ())
    arr = layout(method("copy", 0, "in uint16[] xs", "out uint16[] ys"))
    assert arr.unpack_inputs([struct.pack("<3H", 1, 2, 3)], [7]) == (((1, 2, 3),), (3,))


def test_release_and_retain_only_with_counts_zero() -> None:
    """IIO_invoke.h:31-42: Object_OP_release / Object_OP_retain are answered only when
    ``k == ObjectCounts_pack(0, 0, 0, 0)``; otherwise Object_ERROR_INVALID (2)."""
    assert check_lifecycle(OP_RELEASE, 0) == 0
    assert check_lifecycle(OP_RETAIN, 0) == 0
    assert check_lifecycle(OP_RELEASE, counts_pack(1, 0, 0, 0)) == 2
    assert check_lifecycle(OP_RETAIN, counts_pack(0, 0, 0, 1)) == 2
    assert check_lifecycle(3, 0) is None


def test_output_array_lenout_in_elements() -> None:
    """implementation.rs visit_output_struct_buffer: ``*lenout = a[i].b.size /
    sizeof(T)``: a Collection[] output of 50 bytes holds two whole elements."""
    lay = layout(method("struct_array_out", 15, "out Collection[] s_out", structs=S))
    assert lay.pack_inputs([], [3])[2] == (72,)
    coll = struct_class(COLLECTION)
    data = struct.pack("<QIIQ", 1, 2, 3, 4) * 2 + b"xx"
    assert lay.unpack_outputs([data]) == ((coll(1, 2, 3, 4), coll(1, 2, 3, 4)),)


def test_bad_values_are_named() -> None:
    """Every public function validates its input (charter): a value that does not fit
    names the parameter."""
    lay = layout(method("wait", 0, "in uint32 msec", "in uint32 code", "in uint32 events"))
    with pytest.raises(UsageError, match="code"):
        lay.pack_inputs([1, -1, 2])
    with pytest.raises(UsageError, match="3 input"):
        lay.pack_inputs([1, 2])


# ------------------------------------------------------------------ Hypothesis
# Invariant: for any method the compiler accepts and any values of its parameters, the
# skeleton's unpack_inputs gives back what pack_inputs packed, and unpack_outputs what
# pack_outputs packed.

_PRIMS = list(Primitive)


def _prim_value(p: Primitive) -> st.SearchStrategy[Any]:
    if p is Primitive.FLOAT32:
        return st.floats(width=32, allow_nan=False)
    if p is Primitive.FLOAT64:
        return st.floats(allow_nan=False)
    bits = p.size * 8
    if p.code.isupper():
        return st.integers(0, 2**bits - 1)
    return st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


@st.composite
def _structs(draw: st.DrawFn, objects: bool) -> Struct:
    n = draw(st.integers(1, 4))
    fields = []
    for k in range(n):
        kind = draw(st.sampled_from(["prim", "prim", "arr", "obj"] if objects else ["prim", "arr"]))
        if kind == "obj":
            fields.append(StructField(f"f{k}", InterfaceType()))
        else:
            prim = Primitive.UINT64 if kind == "arr" else draw(st.sampled_from(_PRIMS))
            count = 2 if kind == "arr" else 1
            fields.append(StructField(f"f{k}", prim, count, kind == "arr"))
    return Struct(f"S{draw(st.integers(0, 10**6))}", tuple(fields))


def _struct_value(s: Struct) -> st.SearchStrategy[Any]:
    parts = {}
    for f in s.fields:
        if isinstance(f.type, InterfaceType):
            one: st.SearchStrategy[Any] = st.builds(object) | st.none()
        else:
            assert isinstance(f.type, Primitive)
            one = _prim_value(f.type)
        parts[f.name] = st.tuples(*[one] * f.count) if f.is_array else one
    return st.fixed_dictionaries(parts).map(lambda d: struct_class(s)(**d))


@st.composite
def _methods(draw: st.DrawFn) -> Method:
    params = []
    arrays = {Direction.IN: draw(st.booleans()), Direction.OUT: draw(st.booleans())}
    for k in range(draw(st.integers(0, 8))):
        d = draw(st.sampled_from(list(Direction)))
        kind = draw(st.sampled_from(["prim", "small", "big", "buffer", "array", "sarray", "obj"]))
        name = f"p{k}"
        if kind == "prim":
            params.append(Param(name, d, draw(st.sampled_from(_PRIMS))))
        elif kind in ("small", "big", "sarray"):
            s = draw(_structs(objects=kind == "big"))
            if (kind == "small") != (s.size <= 16) or (kind == "sarray" and s.has_objects):
                continue
            params.append(Param(name, d, s, is_array=kind == "sarray"))
        elif kind == "buffer":
            from objects.idl.model import Buffer

            params.append(Param(name, d, Buffer.BUFFER))
        elif kind == "array":
            params.append(Param(name, d, draw(st.sampled_from(_PRIMS)), is_array=True))
        elif arrays[d]:
            params.append(Param(name, d, InterfaceType(), True, draw(st.integers(1, 3))))
        else:
            params.append(Param(name, d, InterfaceType()))
    m = Method("m", draw(st.integers(0, 0x3FFF)), tuple(params))
    try:
        layout(m)
    except UsageError:  # more than 15 of a kind: the compiler refuses it too
        from hypothesis import assume

        assume(False)
    return m


def _value(p: Param) -> st.SearchStrategy[Any]:
    from objects.idl.model import Buffer

    if isinstance(p.type, Buffer):
        return st.binary(max_size=20)
    if isinstance(p.type, InterfaceType):
        one = st.builds(object) | st.none()
        return st.tuples(*[one] * (p.bound or 1)) if p.is_array else one
    if isinstance(p.type, Primitive):
        if p.is_array:
            if p.type is Primitive.UINT8:
                return st.binary(max_size=8)
            return st.lists(_prim_value(p.type), max_size=5).map(tuple)
        return _prim_value(p.type)
    assert isinstance(p.type, Struct)
    if p.is_array:
        return st.lists(_struct_value(p.type), max_size=3).map(tuple)
    return _struct_value(p.type)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_pack_then_unpack_gives_the_values_back(data: st.DataObject) -> None:
    """Issue 19 point 3: the stub's packing and the skeleton's unpacking agree, both ways,
    for random methods and values (by alignment and by size)."""
    m = data.draw(_methods())
    lay = layout(m, by_size=data.draw(st.booleans()))
    ins = [data.draw(_value(p)) for p in lay.inputs]
    outs = [data.draw(_value(p)) for p in lay.outputs]
    lens = [len(outs[lay.outputs.index(p)]) for p in lay.out_arrays]
    op, ib, caps, io = lay.pack_inputs(ins, lens)
    assert op == m.id
    assert lay.check([len(b) for b in ib], caps, len(io), lay.counts[3]) is None
    got, got_lens = lay.unpack_inputs(ib, caps, io)
    assert got == tuple(ins)
    assert got_lens == tuple(lens)
    ob, oo = lay.pack_outputs(outs)
    assert all(len(b) <= c for b, c in zip(ob, caps, strict=True))
    assert lay.unpack_outputs(ob, oo) == tuple(outs)
