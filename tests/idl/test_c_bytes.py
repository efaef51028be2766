"""Byte for byte against the C backend: what the generated C stubs hand ``Object_invoke``.

Issue 19 acceptance "Byte for byte against the C backend": each generated header of the
minkipc archive is compiled with a recording ``Object_invoke`` (tests/idl/_c_harness.py,
tests/idl/c/recorder.c) and its stubs called with fixed arguments.  The first tests here
check the harness itself on calls whose bytes can be read off the headers.
"""

from __future__ import annotations

import struct

import pytest

from tests.idl import _c_harness as harness
from tests.idl._c_harness import Record, RecordError

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
