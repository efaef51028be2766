"""pyproject.toml declares nothing that nothing uses (issue 15, "CLI and plugin hygiene":
"Dependencies: nothing declared that nothing uses").

Each declared dependency has a rule saying where the project uses it, and the rule is
checked against the files: a dependency nobody uses any more fails here, and so does a
new one declared without a rule.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("qtee", "objects", "supplicant")


def _texts(*folders: str, suffix: str = ".py") -> str:
    return "\n".join(
        p.read_text() for folder in folders for p in sorted((ROOT / folder).rglob(f"*{suffix}"))
    )


def _imports(module: str, *folders: str) -> bool:
    pattern = rf"^\s*(?:import|from)\s+{re.escape(module)}\b"
    return re.search(pattern, _texts(*folders), re.M) is not None


def _used(name: str) -> bool:
    """Where the project uses the declared distribution ``name``."""
    if name in ("msgpack", "cbor2", "cryptography"):  # runtime: imported by the packages
        return _imports(name, *PACKAGES)
    if name in ("pytest", "hypothesis"):
        return _imports(name, "tests")
    if name in ("mypy", "ruff"):  # run by make lint / make typecheck
        return (
            re.search(rf"^\s*\$\(BIN\)/{name}\b", (ROOT / "Makefile").read_text(), re.M) is not None
        )
    if name == "msgpack-types":  # mypy --strict's stubs for the msgpack the packages import
        return _imports("msgpack", *PACKAGES)
    if name == "pytest-timeout":  # the ini's timeout and per-test timeout marks
        ini = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]
        return "timeout" in ini["ini_options"] and "pytest.mark.timeout(" in _texts("tests")
    if name == "pytest-xdist":  # the plugin's test under `pytest -n 2`
        return re.search(r'"-n",\s*"2"', _texts("tests")) is not None
    raise AssertionError(f"{name} is declared but this test has no rule for how it is used")


def _declared() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    return [re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].lower() for spec in specs]


@pytest.mark.parametrize("name", _declared())
def test_every_declared_dependency_is_used(name: str) -> None:
    assert _used(name), f"{name} is declared in pyproject.toml but nothing uses it"


def test_the_runtime_dependencies_are_msgpack_cbor2_and_cryptography() -> None:
    """The packages import these three and nothing else outside the standard library
    (pytest only in the plugin, which runs inside pytest): cryptography signs and
    verifies model TA images (no hand-written crypto)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = sorted(re.split(r"[<>=!~\[; ]", s, maxsplit=1)[0] for s in project["dependencies"])
    assert names == ["cbor2", "cryptography", "msgpack"]
    assert "pytest-benchmark" not in _declared()  # nothing uses its fixture
