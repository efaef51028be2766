"""Users' code reaches qtee through public names: so do the packages and this suite.

A ``from pkg._module import Name`` is allowed only where ``Name`` is not public: not in
the ``__all__`` of the package the private module belongs to or of any package above it.
Tests of a private module's internals (frames, allocators' helpers) stay as they are.
Between the packages (``objects``, ``qtee``, ``supplicant``) no module imports another
package's private name (``_name``) at all: each package offers the others public seams.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def public_packages(module: str) -> list[str]:
    """``qtee.secure._gp`` -> ``["qtee.secure", "qtee"]``: the packages above it."""
    parts = module.split(".")
    return [".".join(parts[:n]) for n in range(len(parts) - 1, 0, -1)]


def private_imports_of_public_names(path: Path) -> list[str]:
    """``file:line: Name (public in pkg)`` for each such import in ``path``."""
    found = []
    inside = path.relative_to(REPO).parts[0]  # a package's own modules import each other
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or node.module is None or node.level:
            continue
        if not node.module.startswith(("qtee", "objects", "supplicant")):
            continue
        if not any(part.startswith("_") for part in node.module.split(".")):
            continue
        if node.module.split(".")[0] == inside:
            continue
        for alias in node.names:
            for pkg in public_packages(node.module):
                if pkg.split(".")[-1].startswith("_"):
                    continue
                if alias.name in getattr(importlib.import_module(pkg), "__all__", ()):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: {alias.name} ({pkg})")
                    break
    return found


PACKAGES = ("objects", "qtee", "supplicant")

#: Private names a package module may import from another package, with the reason.
ALLOWED_PRIVATE: dict[tuple[str, str], str] = {}


def private_names_across_packages(path: Path) -> list[str]:
    """``file:line: module.name`` for each private name ``path`` imports from another
    package (``from qtee.client import _Block`` in ``supplicant/``)."""
    found = []
    inside = path.relative_to(REPO).parts[0]
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or node.module is None or node.level:
            continue
        top = node.module.split(".")[0]
        if top not in PACKAGES or top == inside:
            continue
        for alias in node.names:
            if alias.name.startswith("_") and (node.module, alias.name) not in ALLOWED_PRIVATE:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.module}.{alias.name}")
    return found


def package_sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def sources() -> list[Path]:
    here = Path(__file__).resolve()
    return [
        p
        for p in sorted([*(REPO / "tests").rglob("*.py"), *(REPO / "supplicant").rglob("*.py")])
        if p != here
    ]


def test_no_private_import_of_a_public_name() -> None:
    """Issue 15: private names are not imported by supplicant/ or tests where a public one
    exists."""
    found = [hit for path in sources() for hit in private_imports_of_public_names(path)]
    assert not found, "import these from their public package:\n" + "\n".join(found)


def test_no_package_imports_another_packages_private_names() -> None:
    """Issue 17 (public seams): the worker pool reaches the client through its public
    export table and argument blocks; no package module imports a ``_name`` of another
    package (the allowed ones, each with its reason, are listed in ALLOWED_PRIVATE)."""
    found = [hit for path in package_sources() for hit in private_names_across_packages(path)]
    assert not found, "offer these as public names:\n" + "\n".join(found)


def test_package_modules_import_public_names_where_they_exist() -> None:
    """Issue 17: the packages' own modules follow the rule this suite follows."""
    found = [hit for path in package_sources() for hit in private_imports_of_public_names(path)]
    assert not found, "import these from their public package:\n" + "\n".join(found)


def test_the_cross_package_check_sees_a_private_name() -> None:
    probe = REPO / "supplicant" / "_probe_private_name.py"
    probe.write_text(
        "from qtee.client import _Root\nfrom qtee._remote.frames import FrameDecoder\n"
    )
    try:
        hits = private_names_across_packages(probe)
    finally:
        probe.unlink()
    assert hits == ["supplicant/_probe_private_name.py:1: qtee.client._Root"]


def test_the_check_sees_a_private_import(tmp_path: Path) -> None:
    probe = REPO / "tests" / "_probe_private_import.py"
    probe.write_text(
        "from qtee._qcomtee.core import Device\nfrom qtee._remote.frames import FrameDecoder\n"
    )
    try:
        hits = private_imports_of_public_names(probe)
    finally:
        probe.unlink()
    assert hits == ["tests/_probe_private_import.py:1: Device (qtee)"]


@pytest.mark.parametrize(
    ("module", "expected"),
    [("qtee.secure._gp", ["qtee.secure", "qtee"]), ("supplicant._fs", ["supplicant"])],
)
def test_public_packages(module: str, expected: list[str]) -> None:
    assert public_packages(module) == expected
