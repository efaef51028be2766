"""``qtee info`` and ``qtee trace``: exact output, exit codes, record -> replay, bad files."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

import qtee
from qtee.__main__ import main
from qtee._cli import trace as _trace
from qtee._cli.trace import Trace, TraceFileError, TraceRecord, format_table


def _header() -> list[str]:
    return [
        f"version: {qtee.__version__}",
        "impl id: 4 (QTEE)",
        "impl caps: 0x0",
        "gen caps: 0x10 (OBJREF)",
    ]


def test_info_on_an_idle_device(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        *_header(),
        "loaded TAs: none",
        "live objects: none",
        "open fds: none",
    ]


def test_info_demo_shows_a_loaded_ta_and_live_objects(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--demo"]) == 0
    out = capsys.readouterr()
    # env, FeatureVersions, the loader, the TA controller and the TA: five QTEE objects in
    # the one context; the credentials callback object held by QTEE is one NS id, and it is
    # that fd's (qtee-kernel.md §4: objects are per context).  Each is named (issue 15:
    # objects visible): the secure world's labels, the callback object's class.
    assert out.out.splitlines() == [
        *_header(),
        "loaded TAs: sample.add",
        "live objects:",
        "  secure objects: 5",
        "  ns ids: 1",
        "  context 0 objects: 5",
        "open fds:",
        "  demo client: qtee objects 5, callback objects 1, shms 0, requests 0",
        "    kind            | id | what",
        "    ----------------+----+---------------------------------",
        "    QTEE object     |  0 | ClientEnv",
        "    QTEE object     |  1 | service 0x7f1 FeatureVersions",
        "    QTEE object     |  2 | service 0x3 AppLoader",
        "    QTEE object     |  3 | AppController of TA 'sample.add'",
        "    QTEE object     |  4 | TA 'sample.add' (SampleTA)",
        "    callback object |  1 | _Credentials",
        "released: tables empty",
    ]
    assert out.err == ""


def _records() -> list[TraceRecord]:
    return [
        TraceRecord(10.0, "NS -> QTEE", 1, 2, 0, 0, 1, 1, "invoke"),
        TraceRecord(10.0005, "QTEE -> NS", 0x8000_0001, 0, 0, 1, 0, 0, "callback"),
        TraceRecord(10.25, "QTEE -> NS", 1, 65535, 0, 0, 0, 0, "OK"),
        TraceRecord(10.5, "QTEE -> NS", None, None, 0, 0, 0, 0, "async RELEASE of 0x80000001"),
    ]


def test_format_table_is_aligned() -> None:
    assert format_table(_records()).splitlines() == [
        "time ms  direction   object         op  IB  OB  IO  OO  result",
        "  0.000  NS -> QTEE  0x00000001      2   0   0   1   1  invoke",
        "  0.500  QTEE -> NS  0x80000001      0   0   1   0   0  callback",
        "250.000  QTEE -> NS  0x00000001  65535   0   0   0   0  OK",
        "500.000  QTEE -> NS  -               -   0   0   0   0  async RELEASE of 0x80000001",
        "4 crossings",
    ]
    assert format_table([]).splitlines() == [
        "time ms  direction  object  op  IB  OB  IO  OO  result",
        "0 crossings",
    ]


def test_save_load_round_trip(tmp_path: Path) -> None:
    rec = Trace()
    for r in _records():
        rec(r)
    path = tmp_path / "t.msgpack"
    rec.save(path)
    top = msgpack.unpackb(path.read_bytes())
    assert top["version"] == 1 and len(top["records"]) == 4
    assert _trace.load(path) == _records()


def test_device_trace_records_match_the_text_trace(capsys: pytest.CaptureFixture[str]) -> None:
    from qtee._cli.demo import run

    rec = Trace()
    device = qtee.Device(qtee.SecureWorld(qtee.QteeRoot()))
    device.trace_records = rec
    assert run(device) == 0  # it prints the text trace
    lines = capsys.readouterr().out.splitlines()
    text = [ln for ln in lines if ln.startswith(("NS -> QTEE", "QTEE -> NS"))]
    records = rec.records
    assert len(records) == len(text) > 0
    for line, r in zip(text, records, strict=True):
        assert line.startswith(r.direction) and line.endswith(r.what)
        if r.obj is not None:
            assert f"obj={r.obj:#010x} op={r.op:<5} IB{r.ib} OB{r.ob} IO{r.io} OO{r.oo}" in line


def test_record_then_replay(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "demo.trace"
    assert main(["trace", "--record", str(path), "--demo"]) == 0
    out = capsys.readouterr().out.splitlines()
    n = len(_trace.load(path))
    assert out == [f"recorded {n} crossings to {path}"]
    assert main(["trace", "--replay", str(path)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == [
        "time",
        "ms",
        "direction",
        "object",
        "op",
        "IB",
        "OB",
        "IO",
        "OO",
        "result",
    ]
    assert table[1].split()[1:] == [
        "NS",
        "->",
        "QTEE",
        "0x00000001",
        "2",
        "0",
        "0",
        "1",
        "1",
        "invoke",
    ]
    rows = [line.split() for line in table[1:-1]]
    assert ["QTEE", "->", "NS", "0x80000000", "0", "0", "1", "1", "1", "callback"] in [
        r[1:] for r in rows
    ]
    assert table[-1] == f"{n} crossings" and len(table) == n + 2
    col = table[0].index("result")  # every row's result starts under the header's
    assert all(line[col - 2 : col] == "  " and line[col] != " " for line in table[1:-1])


def test_trace_demo_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", "--demo"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("time ms  direction")
    assert table[-1].endswith(" crossings")
    assert not any(line.startswith("[ok]") for line in table)  # the demo's lines are not shown


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\xc1",  # never used in msgpack
        b"garbage",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"version": 2, "records": []}),
        msgpack.packb({"version": 1, "records": {}}),
        msgpack.packb({"version": 1, "records": [{"t": 1.0}]}),
        msgpack.packb({"version": 1, "records": [{**_records()[0].to_map(), "dir": "sideways"}]}),
        msgpack.packb({"version": 1, "records": [{**_records()[0].to_map(), "ib": -1}]}),
        msgpack.packb({"version": 1, "records": [{**_records()[0].to_map(), "op": "x"}]}),
        msgpack.packb({"version": 1, "records": [{**_records()[0].to_map(), "what": 3}]}),
    ],
)
def test_malformed_trace_file(
    content: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.trace"
    path.write_bytes(content)
    with pytest.raises(TraceFileError):
        _trace.load(path)
    assert main(["trace", "--replay", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"qtee trace: {path}: not a qtee trace: ") and err.count("\n") == 1


def test_missing_trace_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nope.trace"
    assert main(["trace", "--replay", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"qtee trace: cannot read {path}: No such file or directory\n"
    assert captured.out == ""


def test_record_to_an_unwritable_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "no-dir" / "t.trace"
    assert main(["trace", "--record", str(path)]) == 1
    err = capsys.readouterr().err
    assert err == f"qtee trace: cannot write {path}: No such file or directory\n"


@pytest.mark.parametrize(
    "argv",
    [
        ["trace"],
        ["trace", "--replay", "x", "--demo"],
        ["trace", "--replay", "x", "--record", "y"],
        ["info", "--bogus"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage: qtee" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["info", "trace"])
def test_help(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([verb, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: qtee {verb}") and "--demo" in out
