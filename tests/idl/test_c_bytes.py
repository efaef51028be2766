"""Byte for byte against the C backend: what the generated C stubs hand ``Object_invoke``.

Issue 19 acceptance "Byte for byte against the C backend": each generated header of the
minkipc archive is compiled with a recording ``Object_invoke`` (tests/idl/_c_harness.py,
tests/idl/c/recorder.c) and its stubs called with fixed arguments.  The first tests here
check the harness itself on calls whose bytes can be read off the headers.
"""

from __future__ import annotations

import importlib.resources
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

from objects.idl import packing, read_idl
from objects.idl.model import Buffer, IdlFile, Interface, InterfaceType, Method, Primitive, Struct
from tests.idl import _c_harness as harness
from tests.idl._c_harness import Record, RecordError

IDL_DIR = Path(str(importlib.resources.files("qtee") / "idl"))


def _load(name: str) -> IdlFile:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reserved-word notes test_interfaces checks
        return read_idl(IDL_DIR / name)


def _headered() -> list[str]:
    """The shipped files with interfaces whose generated header the archive has."""
    no_header = {"IListenerCBO.idl", "IRegisterListenerCBO.idl"}
    return sorted(p.name for p in IDL_DIR.glob("I*.idl") if p.name not in no_header)


# -- the record format (no compiler needed) ----------------------------------------------


def test_record_parse_reads_every_field() -> None:
    """The recorder's line format (recorder.h): op and counts in hex, each input buffer's
    bytes, each output capacity, input object tags (null for Object_NULL), output slots."""
    rec = Record.parse("REC op=1 k=1211 bi=0a0b bo=8 oi=7 oi=null oo ret=-2")
    assert rec == Record(1, 0x1211, (b"\x0a\x0b",), (8,), (7, None), 1, -2)
    assert rec.count_tuple == (1, 1, 2, 1)
    assert Record.parse("REC op=ffff k=0 ret=0") == Record(0xFFFF, 0)
    assert Record.parse("REC op=3 k=1 bi= ret=0").bi == (b"",)


@pytest.mark.parametrize(
    "line",
    [
        "REC op=1 k=2 bi=00 ret=0",  # two input buffers counted, one given
        "REC op=1 k=0 ret=0 extra=1",
        "REC op=1 ret=0",
        "REC op=1 k=1 bi=0 ret=0",  # odd hex digits
        "REC op=1 k=1 bi=!null ret=0",
        "RECORD op=1 k=0 ret=0",
    ],
)
def test_record_parse_rejects_what_the_recorder_never_writes(line: str) -> None:
    """A malformed line fails loudly rather than giving a record that could pass a test."""
    with pytest.raises(RecordError):
        Record.parse(line)


def test_output_lines_split_into_records_and_values() -> None:
    """OUT lines are the C code's own values, kept in order beside the records."""
    run = harness.parse_output("REC op=0 k=10 bo=8 ret=0\nOUT len=5\nOUT len=6\n")
    assert run.records == (Record(0, 0x10, (), (8,)),)
    assert run.value("len") == "6"
    with pytest.raises(RecordError):
        harness.parse_output("garbage\n")


# -- the harness against real generated headers -------------------------------------------


def test_iio_stubs_recorded() -> None:
    """IIO.h (minkipc libminkadaptor/tests/smcinvoke_client/idl): getLength is op 0 with
    one 8-byte output, readAtOffset op 1 with the u64 offset as its one input buffer,
    writeAtOffset op 2 with the offset and the data as two input buffers."""
    run = harness.run_c(
        ["IIO.h"],
        """
    uint64_t len = 0;
    uint8_t data[5] = {0};
    size_t lenout = 99;
    IIO_getLength(REC, &len);
    show_u64("len", len);
    recorder_shrink = 2;
    IIO_readAtOffset(REC, 0x0102030405060708ull, data, sizeof data, &lenout);
    show_hex("data", data, sizeof data);
    show_u64("lenout", lenout);
    recorder_result = 12;
    show_i64("ret", IIO_writeAtOffset(REC, 7, "abc", 3));
""",
    )
    assert run.records == (
        Record(0, 0x0010, (), (8,)),
        Record(1, 0x0011, (struct.pack("<Q", 0x0102030405060708),), (5,)),
        Record(2, 0x0002, (struct.pack("<Q", 7), b"abc"), (), result=12),
    )
    assert run.value("len") == str(int.from_bytes(harness.fill(0, 8), "little"))
    assert run.value("data") == harness.fill(0, 5).hex()
    assert run.value("lenout") == "3"  # the 5-byte capacity less recorder_shrink
    assert run.value("ret") == "12"


def test_objects_in_and_out_recorded() -> None:
    """IAppLoader.h loadFromRegion (0,0,1,1): the input object's tag is recorded, and the
    stub hands back the object the recorder put in the output slot."""
    run = harness.run_c(
        ["IAppLoader.h"],
        """
    Object ctrl = Object_NULL;
    IAppLoader_loadFromRegion(REC, tagged(42), &ctrl);
    show_obj("ctrl", ctrl);
    IAppLoader_loadFromRegion(REC, Object_NULL, &ctrl);
""",
    )
    assert run.records == (
        Record(1, 0x1100, oi=(42,), oo=1),
        Record(1, 0x1100, oi=(None,), oo=1),
    )
    assert run.value("ctrl") == str(harness.OO_TAG)


def test_struct_sizes_from_the_c_compiler() -> None:
    """IDiagnostics.h's structs as the C compiler lays them out (the sizes the model's
    structs must have)."""
    sizes = harness.sizeof(
        "IDiagnostics.h",
        ["IDiagnostics_HeapInfo", "IDiagnostics_AppRegionInfo", "IDiagnostics_RegisterInfo"],
    )
    assert sizes == {
        "IDiagnostics_HeapInfo": 24,
        "IDiagnostics_AppRegionInfo": 24,
        "IDiagnostics_RegisterInfo": 42 * 8,
    }


def test_header_facts() -> None:
    """What test_interfaces compares: a header's ops, errors, consts, structs, includes."""
    facts = harness.header_facts(harness.find_header("IAppLoader.h"))
    assert facts.includes == ("IAppController.h",)
    assert facts.interfaces == ("IAppLoader",)
    assert facts.defines["IAppLoader_OP_loadEmbedded"].value == 2
    err = facts.defines["IAppLoader_ERROR_APP_UNTRUSTED_CLIENT"]
    assert (err.macro, err.value) == ("INT32_C", 21)
    wait = harness.header_facts(harness.find_header("IWait.h"))
    assert wait.defines["IWait_WAIT_INFINITE"].value == 0xFFFFFFFF
    assert harness.header_facts(harness.find_header("IGPSession.h")).structs == (
        "IGPSession_MemoryObjectParameters",
    )


# -- every method of every interface with a generated header -------------------------------
#
# For each method: fixed argument values from the model (byte k of the i-th input is
# (7*k + op + 31*i) & 0xff), the C call of the header's stub with them, and the same call
# packed by objects.idl.packing.  Then the outputs: the recorder fills output buffer j
# with fill(j, capacity) and output object j with tagged(OO_TAG + j); what the C stub hands
# back is printed and compared with what unpack_outputs reads from the same buffers.


def _pattern(seed: int, n: int) -> bytes:
    return bytes((7 * k + seed) & 0xFF for k in range(n))


def _c_type(t: Primitive | Struct) -> str:
    if isinstance(t, Struct):
        return t.name
    return {"float32": "float", "float64": "double"}.get(t.idl_name, f"{t.idl_name}_t")


def _prim_value(p: Primitive, raw: bytes) -> int | float:
    (value,) = struct.unpack("<" + p.code, raw)
    return float(value) if p.is_float else int(value)


def _struct_value(st: Struct, seed: int) -> dict[str, Any]:
    """A struct value (a mapping, which the packing reads by field name)."""
    out: dict[str, Any] = {}
    for i, f in enumerate(st.fields):
        items: list[Any] = []
        for k in range(f.count):
            s = seed + 13 * i + 5 * k
            if isinstance(f.type, Primitive):
                items.append(_prim_value(f.type, _pattern(s, f.type.size)))
            elif isinstance(f.type, Struct):
                items.append(_struct_value(f.type, s))
            else:
                raise NotImplementedError("objects in structs: no generated header has one")
        out[f.name] = tuple(items) if f.is_array else items[0]
    return out


def _value_bytes(t: Primitive | Struct, value: Any) -> bytes:
    """A value's bytes as C lays it out (a struct read by field name or attribute)."""
    if isinstance(t, Primitive):
        return struct.pack("<" + t.code, value)
    out = b""
    for f in t.fields:
        v = value[f.name] if isinstance(value, dict) else getattr(value, f.name)
        for item in v if f.is_array else (v,):
            assert isinstance(f.type, Primitive | Struct)
            out += _value_bytes(f.type, item)
    return out


def _c_bytes(data: bytes) -> str:
    return "{" + ", ".join(f"0x{b:02x}" for b in data) + "}" if data else "{0}"


@dataclass
class _Call:
    """One method's call: Python's arguments, and the C statements making the same call."""

    method: Method
    inputs: list[Any] = field(default_factory=list)
    out_lens: list[int] = field(default_factory=list)
    decls: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    shows: list[str] = field(default_factory=list)


def _call_for(iface: str, method: Method) -> _Call:
    """The fixed arguments of ``method`` and its C call (``<iface>_<method>`` on REC)."""
    call = _Call(method)
    tag = 1
    for i, p in enumerate(method.params):
        seed = method.id + 31 * i
        v = f"v{i}"
        t = p.type
        if p.is_input:
            if isinstance(t, InterfaceType):
                if p.is_array:
                    assert p.bound is not None
                    tags = list(range(tag, tag + p.bound))
                    tag += p.bound
                    call.inputs.append(tags)
                    objs = ", ".join(f"tagged({n})" for n in tags)
                    call.decls.append(f"Object {v}[{p.bound}] = {{{objs}}};")
                    call.args.append(f"&{v}")
                else:
                    call.inputs.append(tag)
                    call.args.append(f"tagged({tag})")
                    tag += 1
            elif isinstance(t, Buffer):
                data = _pattern(seed, 3 + i)
                call.inputs.append(data)
                call.decls.append(f"static const uint8_t {v}[] = {_c_bytes(data)};")
                call.args += [v, f"sizeof {v}"]
            elif p.is_array:
                assert isinstance(t, Primitive | Struct)
                n = 2
                items = [
                    _prim_value(t, _pattern(seed + k, t.size))
                    if isinstance(t, Primitive)
                    else _struct_value(t, seed + k)
                    for k in range(n)
                ]
                call.inputs.append(bytes(_value_bytes(t, items[0]) + _value_bytes(t, items[1]))
                                   if t is Primitive.UINT8 else items)  # fmt: skip
                raw = b"".join(_value_bytes(t, x) for x in items)
                call.decls.append(f"{_c_type(t)} {v}[{n}];")
                call.decls.append(f"memcpy({v}, (const uint8_t[]){_c_bytes(raw)}, {len(raw)});")
                call.args += [v, str(n)]
            elif isinstance(t, Primitive):
                raw = _pattern(seed, t.size)
                call.inputs.append(_prim_value(t, raw))
                call.decls.append(f"{_c_type(t)} {v};")
                call.decls.append(f"memcpy(&{v}, (const uint8_t[]){_c_bytes(raw)}, {t.size});")
                call.args.append(v)
            else:
                assert isinstance(t, Struct)
                value = _struct_value(t, seed)
                raw = _value_bytes(t, value)
                call.inputs.append(value)
                call.decls.append(f"{t.name} {v};")
                call.decls.append(f"memcpy(&{v}, (const uint8_t[]){_c_bytes(raw)}, {len(raw)});")
                call.args.append(f"&{v}")
        elif isinstance(t, InterfaceType):
            count = p.bound if p.is_array else 1
            assert count is not None
            call.decls.append(f"Object {v}[{count}];")
            call.args.append(f"&{v}" if p.is_array else v)
            call.shows += [f'show_obj("{p.name}.{k}", {v}[{k}]);' for k in range(count)]
        elif isinstance(t, Buffer) or p.is_array:
            elem = 1 if isinstance(t, Buffer) else t.size
            ctype = "uint8_t" if isinstance(t, Buffer) else _c_type(t)
            n = 4 + i
            call.out_lens.append(n)
            call.decls.append(f"{ctype} {v}[{n}]; size_t {v}_out = 0;")
            call.args += [v, str(n), f"&{v}_out"]
            call.shows.append(f'show_u64("{p.name}#", {v}_out);')
            call.shows.append(f'show_hex("{p.name}", {v}, {v}_out * {elem});')
        else:
            assert isinstance(t, Primitive | Struct)
            call.decls.append(f"{_c_type(t)} {v};")
            call.args.append(f"&{v}")
            call.shows.append(f'show_hex("{p.name}", &{v}, sizeof {v});')
    return call


def _c_block(iface: str, call: _Call) -> str:
    args = "".join(f", {a}" for a in call.args)
    lines = [
        *call.decls,
        f'show_i64("ret", {iface}_{call.method.name}(REC{args}));',
        *call.shows,
    ]
    return "    {\n" + "".join(f"        {x}\n" for x in lines) + "    }"


def _python_outputs(call: _Call, values: tuple[Any, ...]) -> dict[str, str]:
    """What the C program should print for the outputs Python unpacked."""
    out: dict[str, str] = {}
    params = [p for p in call.method.params if not p.is_input]
    for p, value in zip(params, values, strict=True):
        t = p.type
        if isinstance(t, InterfaceType):
            for k, obj in enumerate(value if p.is_array else [value]):
                out[f"{p.name}.{k}"] = str(obj)
        elif isinstance(t, Buffer):
            out[f"{p.name}#"] = str(len(value))
            out[p.name] = bytes(value).hex()
        elif p.is_array:
            assert isinstance(t, Primitive | Struct)
            items = list(value)
            out[f"{p.name}#"] = str(len(items))
            out[p.name] = b"".join(_value_bytes(t, x) for x in items).hex()
        else:
            assert isinstance(t, Primitive | Struct)
            out[p.name] = _value_bytes(t, value).hex()
    return out


@pytest.mark.parametrize("name", _headered())
def test_python_packs_as_the_c_stubs(name: str) -> None:
    """Issue 19 Acceptance "Byte for byte against the C backend": for every method of
    every interface of the header generated from ``name``, the C stub called with fixed
    arguments and objects.idl.packing given the same ones agree on the op, the counts, every
    input buffer's bytes, every output capacity and the input objects; and the outputs the
    C stub hands back (from the recorder's known fill) are what ``unpack_outputs`` reads."""
    idl = _load(name)
    calls = [(i.name, _call_for(i.name, m)) for i in idl.interfaces for m in i.methods]
    body = "\n".join(_c_block(iface, c) for iface, c in calls)
    run = harness.run_c([Path(name).stem + ".h"], body)
    assert len(run.records) == len(calls)
    printed = iter(run.out)
    for (iface, call), rec in zip(calls, run.records, strict=True):
        where = f"{iface}.{call.method.name}"
        lay = packing.layout(call.method)
        op, ib, caps, io = lay.pack_inputs(call.inputs, call.out_lens)
        assert (rec.op, rec.counts) == (op, lay.k), where
        assert rec.bi == ib, where
        assert rec.bo == caps, where
        assert rec.oi == io, where
        assert rec.oo == lay.counts[3], where
        ob = [harness.fill(j, cap) for j, cap in enumerate(caps)]
        oo = [harness.OO_TAG + j for j in range(rec.oo)]
        want = _python_outputs(call, lay.unpack_outputs(ob, oo))
        got = dict(next(printed) for _ in range(1 + len(want)))
        assert got.pop("ret") == "0", where
        assert got == want, where


# -- the C skeletons (*_invoke.h) serving what Python packs --------------------------------
#
# A small C implementation of each interface, generated from the model (each method prints
# its inputs and fills its outputs with impl_fill's pattern), is put behind the header's
# <Iface>_DEFINE_INVOKE skeleton; the invocations objects.idl.packing builds are handed to
# it, and what comes back is read with unpack_outputs.  Broken invocations (an extra
# buffer, a fixed-size buffer one byte off, a missing object, release/retain with
# arguments) must be refused with Object_ERROR_INVALID exactly when MethodLayout.check /
# check_lifecycle say so, without calling the implementation.

SKELETONS = {
    "IIO": ("IIO.idl", "IIO_invoke.h"),
    "IWait": ("IWait.idl", "IWait_invoke.h"),
    "ITestCallable": ("ITestCBack.idl", "ITestCBack_invoke.h"),
    "ITestCBack": ("ITestCBack.idl", "ITestCBack_invoke.h"),
}
IMPL_OO_TAG = 0x200
ERROR_INVALID = 2


def _impl_fill(j: int, n: int) -> bytes:
    return bytes((0x40 + 16 * j + k) & 0xFF for k in range(n))


_IMPL_PRELUDE = """
struct impl { int unused; };
static void impl_fill(void *p, size_t j, size_t n)
{
    uint8_t *b = p;
    for (size_t k = 0; k < n; k++)
        b[k] = (uint8_t)(0x40 + 16 * j + k);
}
"""


def _c_impl(iface: Interface) -> str:
    """C functions ``impl_<Iface>_<method>`` with the skeleton's calling convention."""
    out = []
    for name in ("release", "retain"):
        out.append(
            f"static int32_t impl_{iface.name}_{name}(struct impl *me)\n"
            f'{{ (void)me; printf("OUT called={name}\\n"); return 0; }}\n'
        )
    for m in iface.all_methods:
        params, body = ["struct impl *me"], ["(void)me;", f'printf("OUT called={m.name}\\n");']
        j = 0
        for i, p in enumerate(m.params):
            v, t = f"p{i}", p.type
            if p.is_array and isinstance(t, InterfaceType):
                raise NotImplementedError("object arrays: no skeleton header has one")
            if p.is_input:
                if isinstance(t, InterfaceType):
                    params.append(f"Object {v}")
                    body.append(f'show_obj("{p.name}", {v});')
                elif isinstance(t, Buffer) or p.is_array:
                    ctype = "void" if isinstance(t, Buffer) else _c_type(t)
                    elem = "1" if isinstance(t, Buffer) else f"sizeof *{v}"
                    params += [f"const {ctype} *{v}", f"size_t {v}_len"]
                    body.append(f'show_hex("{p.name}", {v}, {v}_len * {elem});')
                elif isinstance(t, Primitive):
                    params.append(f"{_c_type(t)} {v}")
                    body.append(f'show_hex("{p.name}", &{v}, sizeof {v});')
                else:
                    assert isinstance(t, Struct)
                    params.append(f"const {t.name} *{v}")
                    body.append(f'show_hex("{p.name}", {v}, sizeof *{v});')
                continue
            if isinstance(t, InterfaceType):
                params.append(f"Object *{v}")
                body.append(f"*{v} = tagged({IMPL_OO_TAG + j});")
            elif isinstance(t, Buffer) or p.is_array:
                ctype = "void" if isinstance(t, Buffer) else _c_type(t)
                elem = "1" if isinstance(t, Buffer) else f"sizeof *{v}"
                params += [f"{ctype} *{v}", f"size_t {v}_len", f"size_t *{v}_lenout"]
                body.append(f"size_t {v}_n = {v}_len > 0 ? {v}_len - 1 : 0;")
                body.append(f"impl_fill({v}, {j}, {v}_n * {elem});")
                body.append(f"*{v}_lenout = {v}_n;")
            else:
                assert isinstance(t, Primitive | Struct)
                params.append(f"{_c_type(t)} *{v}")
                body.append(f"impl_fill({v}, {j}, sizeof *{v});")
            j += 1
        body.append("return 0;")
        out.append(
            f"static int32_t impl_{iface.name}_{m.name}({', '.join(params)})\n{{\n"
            + "".join(f"    {line}\n" for line in body)
            + "}\n"
        )
    out.append(
        f"static {iface.name}_DEFINE_INVOKE(invoke_{iface.name}, impl_{iface.name}_, "
        "struct impl *)\n"
    )
    return "\n".join(out)


@dataclass(frozen=True)
class _Invocation:
    """What a caller hands a skeleton: op, input buffers, output capacities, input
    objects (tags, None for Object_NULL) and how many output objects."""

    op: int
    ib: tuple[bytes, ...]
    caps: tuple[int, ...]
    io: tuple[int | None, ...]
    n_oo: int

    @property
    def k(self) -> int:
        return packing.counts_pack(len(self.ib), len(self.caps), len(self.io), self.n_oo)


def _c_invocation(iface: str, index: int, inv: _Invocation) -> str:
    total = len(inv.ib) + len(inv.caps) + len(inv.io) + inv.n_oo
    lines = [f"ObjectArg a[{max(total, 1)}];", f'show_u64("call", {index});']
    at = 0
    for n, data in enumerate(inv.ib):
        lines.append(f"static const uint8_t bi{n}[] = {_c_bytes(data)};")
        lines.append(f"a[{at}].bi = (ObjectBufIn){{bi{n}, {len(data)}}};")
        at += 1
    for n, cap in enumerate(inv.caps):
        lines.append(f"uint8_t bo{n}[{max(cap, 1)}]; memset(bo{n}, 0, sizeof bo{n});")
        lines.append(f"a[{at}].b = (ObjectBuf){{bo{n}, {cap}}};")
        at += 1
    for tag in inv.io:
        lines.append(f"a[{at}].o = " + ("Object_NULL;" if tag is None else f"tagged({tag});"))
        at += 1
    oo_at = at
    for _ in range(inv.n_oo):
        lines.append(f"a[{at}].o = Object_NULL;")
        at += 1
    lines.append(f'show_i64("ret", invoke_{iface}(&impl_ctx, 0x{inv.op:x}, a, 0x{inv.k:x}));')
    bo_at = len(inv.ib)
    lines += [f'show_hex("bo", a[{bo_at + n}].b.ptr, a[{bo_at + n}].b.size);'
              for n in range(len(inv.caps))]  # fmt: skip
    lines += [f'show_obj("oo", a[{oo_at + n}].o);' for n in range(inv.n_oo)]
    return "    {\n" + "".join(f"        {x}\n" for x in lines) + "    }"


def _invocations(lay: packing.MethodLayout, call: _Call) -> list[tuple[str, _Invocation]]:
    """The method's right invocation first, then broken ones."""
    op, ib, caps, io = lay.pack_inputs(call.inputs, call.out_lens)
    n_oo = lay.counts[3]
    # The inputs' objects are the tags _call_for chose (ints).
    good = _Invocation(op, ib, caps, cast("tuple[int | None, ...]", io), n_oo)
    out = [("good", good)]
    if len(ib) < 15:
        out.append(("extra input buffer", _Invocation(op, (*ib, b""), caps, good.io, n_oo)))
    for n, size in enumerate(lay.ib_sizes):
        if size is not None:
            longer = (*ib[:n], ib[n] + b"\0", *ib[n + 1 :])
            out.append((f"ib[{n}] one byte long", _Invocation(op, longer, caps, good.io, n_oo)))
    for n, size in enumerate(lay.ob_sizes):
        if size is not None:
            bigger = (*caps[:n], caps[n] + 1, *caps[n + 1 :])
            out.append((f"ob[{n}] one byte big", _Invocation(op, ib, bigger, good.io, n_oo)))
    if good.io:
        out.append(("an input object short", _Invocation(op, ib, caps, good.io[:-1], n_oo)))
    if n_oo:
        out.append(("an output object short", _Invocation(op, ib, caps, good.io, n_oo - 1)))
    return out


def _results(run: harness.Run) -> list[dict[str, list[str]]]:
    """The program's OUT lines, one dict (name -> values in order) per ``call``."""
    calls: list[dict[str, list[str]]] = []
    for name, value in run.out:
        if name == "call":
            calls.append({})
        else:
            calls[-1].setdefault(name, []).append(value)
    return calls


@pytest.mark.parametrize("iface_name", sorted(SKELETONS))
def test_c_skeleton_serves_python_invocations(iface_name: str) -> None:
    """Issue 19 Acceptance: the C ``*_invoke.h`` skeleton (IIO, IWait, ITestCBack's two
    interfaces; minkipc) dispatches the invocations objects.idl.packing builds for every
    method to the C implementation with the values Python packed, its outputs read back
    by ``unpack_outputs``; and refuses (Object_ERROR_INVALID, implementation not called)
    exactly the broken invocations ``MethodLayout.check`` refuses; release and retain only
    with counts 0 (``check_lifecycle``)."""
    idl_name, header = SKELETONS[iface_name]
    iface = _load(idl_name).interface(iface_name)
    cases: list[tuple[str, Method | None, _Call | None, _Invocation]] = []
    for m in iface.all_methods:
        call = _call_for(iface.name, m)
        lay = packing.layout(m)
        cases += [(what, m, call, inv) for what, inv in _invocations(lay, call)]
    for op in (packing.OP_RELEASE, packing.OP_RETAIN):
        cases.append(("lifecycle", None, None, _Invocation(op, (), (), (), 0)))
        cases.append(("lifecycle with a buffer", None, None, _Invocation(op, (b"x",), (), (), 0)))
    body = "\n".join(_c_invocation(iface.name, n, c[3]) for n, c in enumerate(cases))
    prelude = _IMPL_PRELUDE + "static struct impl impl_ctx;\n" + _c_impl(iface)
    run = harness.run_c([header], "    (void)impl_ctx;\n" + body, prelude=prelude)
    results = _results(run)
    assert len(results) == len(cases)
    for (what, meth, c_call, inv), got in zip(cases, results, strict=True):
        where = f"{iface.name}.{meth.name if meth else hex(inv.op)}: {what}"
        if meth is None or c_call is None:
            expect = packing.check_lifecycle(inv.op, inv.k)
            assert got["ret"] == [str(expect)], where
            assert ("called" in got) == (expect == 0), where
            continue
        lay = packing.layout(meth)
        refused = lay.check([len(b) for b in inv.ib], inv.caps, len(inv.io), inv.n_oo)
        if refused is not None:
            assert got == {"ret": [str(ERROR_INVALID)]} | _untouched(inv), (where, refused)
            continue
        assert got.pop("ret") == ["0"], where
        assert got.pop("called") == [meth.name], where
        _check_served(meth, c_call, got, where)


def _untouched(inv: _Invocation) -> dict[str, list[str]]:
    """What a refused call's outputs print: capacities unchanged, zeros, no objects."""
    out: dict[str, list[str]] = {}
    if inv.caps:
        out["bo"] = [bytes(c).hex() for c in inv.caps]
    if inv.n_oo:
        out["oo"] = ["null"] * inv.n_oo
    return out


def _check_served(m: Method, call: _Call, got: dict[str, list[str]], where: str) -> None:
    """The implementation saw Python's inputs; Python reads back what it wrote."""
    for p, value in zip([p for p in m.params if p.is_input], call.inputs, strict=True):
        t = p.type
        if isinstance(t, InterfaceType):
            want = str(value)
        elif isinstance(t, Buffer) or (p.is_array and t is Primitive.UINT8):
            want = bytes(value).hex()
        elif p.is_array:
            assert isinstance(t, Primitive | Struct)
            want = b"".join(_value_bytes(t, x) for x in value).hex()
        else:
            assert isinstance(t, Primitive | Struct)
            want = _value_bytes(t, value).hex()
        assert got.pop(p.name) == [want], f"{where}: {p.name}"
    ob = [bytes.fromhex(h) for h in got.pop("bo", [])]
    oo = [int(x) for x in got.pop("oo", [])]
    assert not got, f"{where}: unexpected output {got}"
    values = packing.layout(m).unpack_outputs(ob, oo)
    outs = [p for p in m.params if not p.is_input]
    lens = iter(call.out_lens)
    for j, (p, value) in enumerate(zip(outs, values, strict=True)):
        t = p.type
        if isinstance(t, InterfaceType):
            assert value == IMPL_OO_TAG + j, f"{where}: {p.name}"
        elif isinstance(t, Buffer):
            assert bytes(value) == _impl_fill(j, max(next(lens) - 1, 0)), f"{where}: {p.name}"
        elif p.is_array:
            assert isinstance(t, Primitive | Struct)
            n = max(next(lens) - 1, 0)
            raw = (
                bytes(value)
                if isinstance(value, bytes)
                else b"".join(_value_bytes(t, x) for x in value)
            )
            assert raw == _impl_fill(j, n * t.size), f"{where}: {p.name}"
        else:
            assert isinstance(t, Primitive | Struct)
            assert _value_bytes(t, value) == _impl_fill(j, t.size), f"{where}: {p.name}"
