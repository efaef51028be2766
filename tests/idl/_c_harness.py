"""Compile C calls against the Mink IDL compiler's generated headers, with a recording object.

The generated headers come from the minkipc peer archive (``minkipc-*.tar.gz`` in the
peers folder, see ``tests/_peers.py``), unpacked once under ``build/peers/`` (git-ignored)
and never copied into the project.  A test gives the body of a C ``main`` as text; it
calls the header's stubs on ``REC``, the recording object of ``tests/idl/c/recorder.c``,
which prints one ``REC`` line per invoke (op, counts, each input buffer's bytes, each
output buffer's capacity, each input object's identity) and fills the outputs with a
known pattern.  The program is compiled with the system C compiler (cached by content
under ``build/peers/idl-c/``) and run; its lines come back as :class:`Record` and
``OUT`` values.  Without the peer archive or a C compiler the calling test is skipped
(failed in CI), as every peer test is.

API::

    minkipc_tree() -> Path                 the unpacked archive
    find_header("IIO.h") -> Path           one generated header (copies must agree)
    run_c(headers, body) -> Run            records and OUT lines of one program
    record(header, c_calls) -> list[Record]
    sizeof(header, names) -> dict[str, int]
    header_facts(path) -> HeaderFacts      its defines, struct typedefs, includes
    stub_params(path, iface, method)       a stub's parameters (C type, name)
"""

from __future__ import annotations

import functools
import re
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tests import _peers

C_DIR = Path(__file__).resolve().parent / "c"
RECORDER_SOURCES = (C_DIR / "recorder.c", C_DIR / "recorder.h")
BUILD = _peers.BUILD_ROOT / "idl-c"
CFLAGS = ("-std=gnu11", "-O1", "-g", "-Wall", "-Werror=implicit-function-declaration")
#: Where the archive keeps the generated headers (relative to its top folder).
IDL_DIRS = (
    "libminkadaptor/tests/smcinvoke_client/idl",
    "libminkteec/idl",
    "libminkteec/tests/gp_test_client/idl",
)
#: Where ``object.h`` (the Mink ABI the headers include) is.
OBJECT_H_DIR = "libminkadaptor/include"
#: Output object slot j is filled with ``tagged(OO_TAG + j)``.
OO_TAG = 0x100


def fill(j: int, n: int) -> bytes:
    """The ``n`` bytes the recorder writes into output buffer ``j`` (recorder_fill)."""
    return bytes((0xB0 + 16 * j + i) & 0xFF for i in range(n))


# -- records -----------------------------------------------------------------------------


class RecordError(ValueError):
    """A line the recorder could not have written."""


@dataclass(frozen=True, slots=True)
class Record:
    """One ``Object_invoke`` on the recording object, as the C stub made it.

    ``bi``: each input buffer's bytes; ``bo``: each output buffer's capacity; ``oi``:
    each input object's tag (``None`` for ``Object_NULL``, ``-1`` for an object the
    recorder did not make); ``oo``: how many output objects; ``result``: what the
    recorder returned.
    """

    op: int
    counts: int
    bi: tuple[bytes, ...] = ()
    bo: tuple[int, ...] = ()
    oi: tuple[int | None, ...] = ()
    oo: int = 0
    result: int = 0

    @property
    def count_tuple(self) -> tuple[int, int, int, int]:
        """``(BI, BO, OI, OO)`` as the counts word packs them (a nibble each)."""
        k = self.counts
        return (k & 0xF, (k >> 4) & 0xF, (k >> 8) & 0xF, (k >> 12) & 0xF)

    @classmethod
    def parse(cls, line: str) -> Record:
        """Read one ``REC op=.. k=.. [bi=..] [bo=..] [oi=..] [oo] ret=..`` line."""
        words = line.split()
        if not words or words[0] != "REC":
            raise RecordError(f"not a record: {line!r}")
        op: int | None = None
        counts: int | None = None
        result: int | None = None
        bi: list[bytes] = []
        bo: list[int] = []
        oi: list[int | None] = []
        oo = 0
        for word in words[1:]:
            key, eq, value = word.partition("=")
            try:
                if key == "oo" and not eq:
                    oo += 1
                elif not eq:
                    raise RecordError(f"{word!r} has no value in {line!r}")
                elif key == "op":
                    op = int(value, 16)
                elif key == "k":
                    counts = int(value, 16)
                elif key == "bi":
                    if value == "!null":
                        raise RecordError(f"an input buffer with a NULL pointer: {line!r}")
                    bi.append(bytes.fromhex(value))
                elif key == "bo":
                    bo.append(int(value))
                elif key == "oi":
                    oi.append(None if value == "null" else -1 if value == "foreign" else int(value))
                elif key == "ret":
                    result = int(value)
                else:
                    raise RecordError(f"unknown field {key!r} in {line!r}")
            except ValueError as exc:
                if isinstance(exc, RecordError):
                    raise
                raise RecordError(f"bad {key} value {value!r} in {line!r}") from None
        if op is None or counts is None or result is None:
            raise RecordError(f"op, k and ret are required: {line!r}")
        rec = cls(op, counts, tuple(bi), tuple(bo), tuple(oi), oo, result)
        if rec.count_tuple != (len(bi), len(bo), len(oi), oo):
            raise RecordError(f"counts {counts:#x} disagree with the fields of {line!r}")
        return rec


@dataclass(frozen=True, slots=True)
class Run:
    """One program's output: its records and its ``OUT name=value`` lines, in order."""

    records: tuple[Record, ...]
    out: tuple[tuple[str, str], ...]
    returncode: int

    def value(self, name: str) -> str:
        """The last ``OUT`` value printed under ``name``; KeyError if none."""
        for key, val in reversed(self.out):
            if key == name:
                return val
        raise KeyError(f"the program printed no OUT {name}")


def parse_output(text: str, returncode: int = 0) -> Run:
    """Split a recorder program's stdout into records and ``OUT`` values."""
    records: list[Record] = []
    out: list[tuple[str, str]] = []
    for line in text.splitlines():
        if line.startswith("REC "):
            records.append(Record.parse(line))
        elif line.startswith("OUT "):
            name, eq, value = line[4:].partition("=")
            if not eq:
                raise RecordError(f"OUT line without '=': {line!r}")
            out.append((name, value))
        elif line.strip():
            raise RecordError(f"unexpected line from the program: {line!r}")
    return Run(tuple(records), tuple(out), returncode)


# -- the headers -------------------------------------------------------------------------


@functools.cache
def minkipc_tree() -> Path:
    """The minkipc archive unpacked (once, cached under build/peers/); skips without it."""
    archive = _peers._archive("minkipc")
    stem = archive.name.removesuffix(".tar.gz")
    key = _peers._key("minkipc-headers", _peers._sha256(archive))

    def unpack(tmp: Path, _final: Path, log: IO[str]) -> None:
        log.write(f"unpacking {archive}\n")
        _peers._unpack(archive, tmp / "src")

    return _peers.cached_build(_peers.BUILD_ROOT, stem, key, unpack) / "src"


def find_header(name: str) -> Path:
    """The generated header ``name`` (e.g. ``"IIO.h"``); copies in several folders must
    be identical (they are in the archive)."""
    tree = minkipc_tree()
    found = [tree / d / name for d in IDL_DIRS if (tree / d / name).is_file()]
    if not found:
        raise FileNotFoundError(f"no generated header {name} in {tree}")
    first = found[0].read_bytes()
    for other in found[1:]:
        if other.read_bytes() != first:
            raise AssertionError(f"{found[0]} and {other} differ")
    return found[0]


def header_names() -> list[str]:
    """Every generated header of an interface (``I*.h``, not the ``*_invoke.h`` skeletons)."""
    tree = minkipc_tree()
    names = {p.name for d in IDL_DIRS for p in (tree / d).glob("I*.h")}
    return sorted(n for n in names if not n.endswith("_invoke.h"))


# -- compiling and running ---------------------------------------------------------------


def _program(headers: Sequence[str], body: str, prelude: str) -> str:
    includes = "\n".join(f'#include "{h}"' for h in headers)
    return (
        "#include <stdio.h>\n#include <string.h>\n"
        f'#include "recorder.h"\n{includes}\n\n{prelude}\n\n'
        f"int main(void)\n{{\n{body}\n    return 0;\n}}\n"
    )


def build(
    headers: Sequence[str], body: str, extra_sources: Sequence[Path] = (), prelude: str = ""
) -> Path:
    """Compile ``body`` (a C ``main``'s statements) with the recorder and ``headers``;
    ``prelude`` is C at file scope after the includes."""
    paths = [find_header(h) for h in headers]
    include_dirs = list(dict.fromkeys([C_DIR, *(p.parent for p in paths)]))
    include_dirs.append(minkipc_tree() / OBJECT_H_DIR)
    source = _program(headers, body, prelude)
    cc = _peers.c_compiler()
    own = [*RECORDER_SOURCES, *extra_sources, *paths]
    key = _peers._key("idl-c", cc, CFLAGS, source, [(p.name, _peers._sha256(p)) for p in own])

    def compile_it(tmp: Path, _final: Path, log: IO[str]) -> None:
        main = tmp / "main.c"
        main.write_text(source)
        c_files = [main, C_DIR / "recorder.c", *(p for p in extra_sources if p.suffix == ".c")]
        argv = [
            cc, *CFLAGS, *(f"-I{d}" for d in include_dirs),
            *map(str, c_files), "-o", str(tmp / "prog"),
        ]  # fmt: skip
        _peers._run(argv, log)

    return _peers.cached_build(BUILD, f"prog-{key[:16]}", key, compile_it) / "prog"


def run_c(
    headers: Sequence[str], body: str, extra_sources: Sequence[Path] = (), prelude: str = ""
) -> Run:
    """Build and run a program; its stdout parsed.  A crash or non-zero exit fails."""
    binary = build(headers, body, extra_sources, prelude)
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.run(
            [str(binary)], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
        )
    if proc.returncode != 0:
        raise AssertionError(f"{binary} exited {proc.returncode}: {proc.stderr.strip()}")
    return parse_output(proc.stdout, proc.returncode)


def record(header: str, c_calls: str) -> list[Record]:
    """The invokes the stub calls in ``c_calls`` make on ``REC`` (``header`` included)."""
    return list(run_c([header], c_calls).records)


def sizeof(header: str, names: Iterable[str]) -> dict[str, int]:
    """``sizeof`` of each C type in ``names``, as the compiler lays ``header``'s types out."""
    names = list(names)
    body = "\n".join(f'    show_u64("{n}", (uint64_t)sizeof({n}));' for n in names)
    run = run_c([header], body)
    return {n: int(run.value(n)) for n in names}


# -- what a header defines ---------------------------------------------------------------

_DEFINE = re.compile(
    r"^#define\s+(?P<name>\w+)\s+(?:(?P<macro>U?INT(?:8|16|32|64)_C)\((?P<arg>[^)]*)\)"
    r"|(?P<plain>-?\d+))\s*$",
    re.MULTILINE,
)
_TYPEDEF = re.compile(r"typedef\s+struct\s*\{[^}]*\}\s*(\w+)\s*;", re.DOTALL)
_INCLUDE = re.compile(r'^#include\s+"([^"]+)"', re.MULTILINE)
_INTERFACE = re.compile(r"^(\w+)_release\(Object self\)", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class Define:
    """A ``#define NAME MACRO(value)`` (``macro`` ``UINT32_C``...) or ``#define NAME n``."""

    name: str
    macro: str | None
    text: str

    @property
    def value(self) -> int:
        return int(self.text, 0)


@dataclass(frozen=True, slots=True)
class HeaderFacts:
    """What one generated header declares, read from its text."""

    defines: dict[str, Define]
    structs: tuple[str, ...]
    includes: tuple[str, ...]
    interfaces: tuple[str, ...]


def header_facts(path: Path) -> HeaderFacts:
    """Defines with an integer value, struct typedefs, quoted includes (``object.h``
    aside) and the interfaces (by their ``_release`` stub) of a generated header."""
    text = path.read_text()
    defines: dict[str, Define] = {}
    for m in _DEFINE.finditer(text):
        if m["plain"] is not None:
            defines[m["name"]] = Define(m["name"], None, m["plain"])
        else:
            defines[m["name"]] = Define(m["name"], m["macro"], m["arg"].strip())
    includes = tuple(i for i in _INCLUDE.findall(text) if i != "object.h")
    return HeaderFacts(
        defines, tuple(_TYPEDEF.findall(text)), includes, tuple(_INTERFACE.findall(text))
    )


def stub_params(path: Path, iface: str, method: str) -> list[tuple[str, str]]:
    """The parameters of the stub ``<iface>_<method>`` after ``self``, as (C type, name)
    with spaces removed from the type (``const void*``); read from the header's text."""
    text = path.read_text()
    m = re.search(rf"int32_t\s+{iface}_{method}\(Object self([^)]*)\)", text)
    if m is None:
        raise KeyError(f"no stub {iface}_{method} in {path.name}")
    out = []
    for arg in filter(None, (a.strip() for a in m[1].split(","))):
        parts = re.fullmatch(r"(.*?)([*\s]+)(\w+)", arg)
        if parts is None:
            raise ValueError(f"cannot read parameter {arg!r} of {iface}_{method}")
        ctype = (parts[1] + parts[2]).replace(" ", "")
        out.append((ctype, parts[3]))
    return out
