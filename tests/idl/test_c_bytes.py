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
from typing import Any

import pytest

from objects.idl import packing, read_idl
from objects.idl.model import Buffer, IdlFile, InterfaceType, Method, Primitive, Struct
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
    return value


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
            n = p.bound if p.is_array else 1
            assert n is not None
            call.decls.append(f"Object {v}[{n}];")
            call.args.append(f"&{v}" if p.is_array else v)
            call.shows += [f'show_obj("{p.name}.{k}", {v}[{k}]);' for k in range(n)]
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
