"""Read Mink IDL files as the Mink IDL compiler does: text in, :mod:`.model` records out.

:func:`read_idl` reads a file and everything it includes; :func:`parse_idl` reads text.
An ``include "x.idl"`` is looked for next to the including file, then in each of
``include_paths`` in order, then next to the first file read (the compiler's command
line adds that folder); a file included twice is read once, an include cycle is
rejected at the include that closes it.

Every problem raises :class:`IdlError` (a :class:`objects.UsageError`) whose message
starts ``FILE:LINE:COLUMN: `` at the offending token; what the compiler only warns
about (a reserved word it renames, an object array of size 1, an include found in two
places) goes through :func:`warnings.warn` as an :class:`IdlWarning` naming the place.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from pathlib import Path

from objects._errors import UsageError
from objects.idl import model
from objects.idl._checks import CheckFailure, Unit
from objects.idl._grammar import parse_text
from objects.idl._lower import lower
from objects.idl._syntax import SyntaxFailure
from objects.idl._values import py_params

__all__ = ["IdlError", "IdlWarning", "parse_idl", "read_idl"]


class IdlError(UsageError):
    """An IDL file the compiler would reject; ``location`` is where, the message says what
    (it starts ``FILE:LINE:COLUMN: ``)."""

    def __init__(self, location: model.Location, reason: str) -> None:
        super().__init__(f"{location}: {reason}")
        self.location = location
        self.reason = reason

    def __reduce__(self) -> tuple[type[IdlError], tuple[model.Location, str]]:
        return (type(self), (self.location, self.reason))


class IdlWarning(UserWarning):
    """What the compiler accepts but warns about; the message starts ``FILE:LINE:COLUMN: ``."""


def _paths(include_paths: Iterable[str | os.PathLike[str]]) -> tuple[Path, ...]:
    if isinstance(include_paths, (str, bytes, os.PathLike)):
        raise UsageError(
            f"include_paths must be a sequence of folders, not one path {include_paths!r}"
        )
    out = []
    for p in include_paths:
        if not isinstance(p, (str, os.PathLike)):
            raise UsageError(f"include_paths holds {p!r}, which is not a path")
        out.append(Path(p))
    return tuple(out)


class _Reader:
    def __init__(self, include_paths: tuple[Path, ...], root_dir: Path | None) -> None:
        self.include_paths = include_paths
        self.root_dir = root_dir
        self.done: dict[Path, Unit] = {}
        self.order: list[Unit] = []
        self.found: dict[int, model.IdlFile] = {}

    def unit(self, label: str, text: str) -> Unit:
        try:
            syntax = parse_text(text)
        except SyntaxFailure as e:
            probe = Unit(label, text, parse_text(""))
            raise IdlError(probe.loc(e.offset), e.reason) from None
        return Unit(label, text, syntax)

    def resolve(self, unit: Unit, folder: Path | None, offset: int, name: str) -> Path:
        raw = Path(name)
        places: list[Path] = []
        if raw.is_absolute():
            places.append(raw)
        else:
            if folder is not None:
                places.append(folder / raw)
            places.extend(p / raw for p in self.include_paths)
            if self.root_dir is not None:
                places.append(self.root_dir / raw)
        hits: list[Path] = []
        for place in places:
            if place.is_file() and place.resolve() not in [h.resolve() for h in hits]:
                hits.append(place)
        if not hits:
            folders: dict[Path, str] = {}
            for p in places:
                folders.setdefault(p.parent.resolve(), str(p.parent))
            looked = ", ".join(folders.values()) or "no folder"
            raise IdlError(
                unit.loc(offset), f'include "{name}": file not found (looked in {looked})'
            )
        if len(hits) > 1:
            warnings.warn(
                IdlWarning(
                    f'{unit.loc(offset)}: include "{name}" is found in several places '
                    f"({', '.join(str(h) for h in hits)}); reading {hits[0]}"
                ),
                stacklevel=4,
            )
        return hits[0]

    def walk(self, unit: Unit, folder: Path | None, stack: list[tuple[Path, str]]) -> None:
        for inc in unit.syntax.includes:
            found = self.resolve(unit, folder, inc.offset, inc.path)
            key = found.resolve()
            chain = [label for _, label in stack]
            if key in [k for k, _ in stack]:
                start = [k for k, _ in stack].index(key)
                cycle = [*chain[start:], os.path.normpath(found)]
                raise IdlError(
                    unit.loc(inc.offset), "include cycle: " + " -> ".join(str(c) for c in cycle)
                )
            child = self.done.get(key)
            if child is None:
                label = os.path.normpath(found)
                try:
                    text = found.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as e:
                    raise IdlError(unit.loc(inc.offset), f'include "{inc.path}": {e}') from None
                child = self.unit(label, text)
                self.done[key] = child
                self.walk(child, found.parent, [*stack, (key, label)])
            unit.includes.append(child)
        self.order.append(unit)

    def finish(self, root: Unit) -> model.IdlFile:
        try:
            lowered, found_warnings = lower(self.order)
        except CheckFailure as e:
            raise IdlError(e.location, e.reason) from None
        for where, message in found_warnings:
            warnings.warn(IdlWarning(f"{where}: {message}"), stacklevel=3)
        for unit in self.order:
            for iface in lowered[id(unit)][2]:
                for m in iface.methods:
                    _warn_collisions(m)
        files: dict[int, model.IdlFile] = {}
        for unit in self.order:
            consts, structs, interfaces = lowered[id(unit)]
            files[id(unit)] = model.IdlFile(
                unit.label,
                tuple(files[id(u)] for u in unit.includes),
                consts,
                structs,
                interfaces,
            )
        return files[id(root)]


def _warn_collisions(m: model.Method) -> None:
    """Warn of each parameter the Python backend renames so its names stay distinct."""
    names = py_params(m)
    for p in m.params:
        name, why = names.get(p.name, (p.name, None))
        if why is not None:
            warnings.warn(
                IdlWarning(
                    f"{p.location or m.location}: parameter `{p.name}` of method `{m.name}`: "
                    f"{why}; the Python backend names it `{name}`"
                ),
                stacklevel=5,
            )


def read_idl(
    path: str | os.PathLike[str], include_paths: Iterable[str | os.PathLike[str]] = ()
) -> model.IdlFile:
    """Read the ``.idl`` file at ``path`` and what it includes, checked as the compiler
    checks them; the record names files as ``path`` was given."""
    if not isinstance(path, (str, os.PathLike)):
        raise UsageError(f"path must be a str or os.PathLike, not {type(path).__name__}")
    paths = _paths(include_paths)
    file = Path(path)
    label = os.fspath(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise IdlError(model.Location(label, 1, 1), f"cannot read the file: {e}") from None
    reader = _Reader(paths, file.parent)
    root = reader.unit(label, text)
    key = file.resolve()
    reader.done[key] = root
    reader.walk(root, file.parent, [(key, label)])
    return reader.finish(root)


def parse_idl(
    text: str, name: str = "<string>", include_paths: Iterable[str | os.PathLike[str]] = ()
) -> model.IdlFile:
    """Read IDL ``text`` (messages call it ``name``); includes are looked for in
    ``include_paths`` (and next to ``name`` when it names a file's place)."""
    if not isinstance(text, str):
        raise UsageError(f"text must be a str, not {type(text).__name__}")
    if not isinstance(name, str):
        raise UsageError(f"name must be a str, not {type(name).__name__}")
    paths = _paths(include_paths)
    folder = None if name.startswith("<") else Path(name).parent
    reader = _Reader(paths, folder)
    root = reader.unit(name, text)
    key = Path(name).resolve() if folder is not None else Path("<" + str(id(root)) + ">")
    reader.walk(root, folder, [(key, name)])
    return reader.finish(root)
