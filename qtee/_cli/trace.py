"""Structured traces of crossings (``qtee trace``): record, save as msgpack, load, show.

A :class:`Trace` installed as ``device.trace_records`` receives one :class:`TraceRecord`
per crossing, the same data as the text lines of ``device.trace``.  :meth:`Trace.save`
writes a msgpack map ``{"version": 1, "records": [{...}, ...]}``; :func:`load` reads one
back, validating every field (:class:`TraceFileError` when it is not a trace file), and
:func:`format_table` renders records as aligned columns.  A live trace (records that
arrive one by one from a device server, ``qtee trace --connect``) is checked record by
record with :func:`record_from_map` and printed with :func:`format_header` and
:func:`format_row`, in the same columns at fixed widths.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgpack

__all__ = [
    "DIRECTIONS",
    "LIVE_WIDTHS",
    "TRACE_VERSION",
    "Trace",
    "TraceFileError",
    "TraceRecord",
    "format_count",
    "format_header",
    "format_row",
    "format_table",
    "load",
    "record_from_map",
]

TRACE_VERSION: Final = 1
DIRECTIONS: Final = ("NS -> QTEE", "QTEE -> NS")
#: Bigger files are refused before parsing (a trace of the demo is a few KiB).
MAX_FILE_SIZE: Final = 64 << 20
_U32_MAX: Final = 0xFFFF_FFFF
_KEYS: Final = ("t", "dir", "obj", "op", "ib", "ob", "io", "oo", "what")


@dataclass(frozen=True, slots=True)
class TraceRecord:
    """One crossing: wall-clock ``time``, ``direction``, object id and op (None for an
    async RELEASE batch), the IB/OB/IO/OO counts, and what it was (``invoke``,
    ``callback``, a result name, or ``async RELEASE of ...``)."""

    time: float
    direction: str
    obj: int | None
    op: int | None
    ib: int
    ob: int
    io: int
    oo: int
    what: str

    def to_map(self) -> dict[str, Any]:
        return {
            "t": self.time,
            "dir": self.direction,
            "obj": self.obj,
            "op": self.op,
            "ib": self.ib,
            "ob": self.ob,
            "io": self.io,
            "oo": self.oo,
            "what": self.what,
        }


class TraceFileError(ValueError):
    """The file is not a qtee trace (not msgpack, wrong version, or a malformed record)."""


class Trace:
    """A recorder: call it with records (install as ``device.trace_records``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[TraceRecord] = []

    def __call__(self, record: TraceRecord) -> None:
        with self._lock:
            self._records.append(record)

    @property
    def records(self) -> list[TraceRecord]:
        """A copy of what was recorded so far, in arrival order."""
        with self._lock:
            return list(self._records)

    def save(self, path: str | Path) -> None:
        """Write the records to ``path`` as msgpack."""
        data = msgpack.packb(
            {"version": TRACE_VERSION, "records": [r.to_map() for r in self.records]},
            use_bin_type=True,
        )
        Path(path).write_bytes(data)


def _int(m: dict[Any, Any], key: str, n: int, *, nullable: bool = False) -> int | None:
    v = m[key]
    if v is None and nullable:
        return None
    if type(v) is not int or not 0 <= v <= _U32_MAX:
        raise TraceFileError(f"record {n}: {key!r} is not a u32")
    return v


def record_from_map(m: object, n: int = 0) -> TraceRecord:
    """The record of a :meth:`TraceRecord.to_map` map, every field checked as :func:`load`
    checks a file's; :class:`TraceFileError` (naming record ``n``) when it is malformed."""
    if not isinstance(m, dict):
        raise TraceFileError(f"record {n} is not a map")
    if set(m) != set(_KEYS):
        raise TraceFileError(f"record {n} has keys {sorted(map(str, m))}, not {sorted(_KEYS)}")
    t, direction, what = m["t"], m["dir"], m["what"]
    if type(t) not in (int, float):
        raise TraceFileError(f"record {n}: 't' is not a number")
    if direction not in DIRECTIONS:
        raise TraceFileError(f"record {n}: unknown direction {direction!r}")
    if not isinstance(what, str):
        raise TraceFileError(f"record {n}: 'what' is not a string")
    ib, ob, io, oo = (_int(m, k, n) for k in ("ib", "ob", "io", "oo"))
    assert ib is not None and ob is not None and io is not None and oo is not None
    return TraceRecord(
        float(t),
        direction,
        _int(m, "obj", n, nullable=True),
        _int(m, "op", n, nullable=True),
        ib,
        ob,
        io,
        oo,
        what,
    )


def load(path: str | Path) -> list[TraceRecord]:
    """Read a trace saved by :meth:`Trace.save`.

    Raises :class:`OSError` when the file cannot be read and :class:`TraceFileError` when
    it is not a trace of this version.
    """
    p = Path(path)
    with p.open("rb") as f:
        data = f.read(MAX_FILE_SIZE + 1)
    if len(data) > MAX_FILE_SIZE:
        raise TraceFileError(f"larger than {MAX_FILE_SIZE} bytes")
    try:
        top = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise TraceFileError(f"not msgpack ({exc})") from None
    if not isinstance(top, dict) or "version" not in top or "records" not in top:
        raise TraceFileError("not a trace (no version and records)")
    if top["version"] != TRACE_VERSION or type(top["version"]) is not int:
        raise TraceFileError(f"unsupported trace version {top['version']!r}")
    records = top["records"]
    if not isinstance(records, list):
        raise TraceFileError("'records' is not a list")
    return [record_from_map(m, n) for n, m in enumerate(records)]


_HEADER: Final = ("time ms", "direction", "object", "op", "IB", "OB", "IO", "OO", "result")
_RIGHT: Final = frozenset({0, 3, 4, 5, 6, 7})
#: Column widths of a live table, whose rows are printed before the widest is known: room
#: for 16 minutes of milliseconds, a direction, an object id, a u16 op and two-digit counts.
LIVE_WIDTHS: Final = (10, 10, 10, 5, 2, 2, 2, 2, 0)


def _cells(r: TraceRecord, t0: float) -> tuple[str, ...]:
    return (
        f"{(r.time - t0) * 1000:.3f}",
        r.direction,
        "-" if r.obj is None else f"{r.obj:#010x}",
        "-" if r.op is None else str(r.op),
        str(r.ib),
        str(r.ob),
        str(r.io),
        str(r.oo),
        r.what,
    )


def _line(cells: Sequence[str], widths: Sequence[int]) -> str:
    """One table line: numbers right-aligned, text left-aligned, two spaces apart (a cell
    wider than its column pushes the rest of the line to the right)."""
    padded = [
        cell.rjust(w) if i in _RIGHT else cell.ljust(w)
        for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
    ]
    return "  ".join(padded).rstrip()


def _at_least_header(widths: Sequence[int]) -> list[int]:
    return [max(w, len(h)) for w, h in zip(widths, _HEADER, strict=True)]


def format_header(widths: Sequence[int] = LIVE_WIDTHS) -> str:
    """The header line of a table with these column widths (default: a live table's)."""
    return _line(_HEADER, _at_least_header(widths))


def format_row(record: TraceRecord, t0: float, widths: Sequence[int] = LIVE_WIDTHS) -> str:
    """One record as a table row (time in ms from ``t0``), under :func:`format_header`."""
    return _line(_cells(record, t0), _at_least_header(widths))


def format_count(n: int) -> str:
    """The last line of a table: how many crossings it showed."""
    return f"{n} crossing{'' if n == 1 else 's'}"


def format_table(records: Sequence[TraceRecord] | Iterable[TraceRecord]) -> str:
    """Records as a table: a header, one aligned row per crossing (times in ms from the
    first record), and a count line.  No trailing newline."""
    rs = list(records)
    t0 = rs[0].time if rs else 0.0
    rows = [_HEADER, *(_cells(r, t0) for r in rs)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER))]
    return "\n".join([*(_line(row, widths) for row in rows), format_count(len(rs))])
