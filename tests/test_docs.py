"""Every example in the guides under ``docs/`` runs, as written, in a fresh folder.

A page is read top to bottom and its fenced blocks are steps in one temporary folder:

* ```` ```python file=NAME ```` writes the block to ``NAME`` (a TA module, a test file),
  and so does any other language with ``file=`` (```` ```idl file=IFoo.idl ````);
* ```` ```python ```` runs the block as a script there (``python -`` with the folder as its
  working directory), which must exit 0;
* ```` ```text output ```` right after a script is what that script prints, exactly;
* ```` ```sh ```` runs the block with ``bash -e`` there, the virtualenv's ``bin`` first on
  ``PATH`` (``pytest`` and ``qtee`` are the installed ones), which must exit 0.

Other blocks (``text`` without ``output``, ``c``) are prose.  A page with no runnable block
fails: a guide whose examples are not run is not a guide this suite keeps true.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*$", re.S | re.M)

pytestmark = pytest.mark.timeout(240)


@dataclass(frozen=True, slots=True)
class Step:
    """One fenced block of a page: its kind, argument, text and line."""

    kind: str  # "file", "script", "output", "sh"
    arg: str
    text: str
    line: int


def steps(page: Path) -> list[Step]:
    """The runnable blocks of ``page`` in order."""
    text = page.read_text()
    found: list[Step] = []
    for match in FENCE.finditer(text):
        info, body = match.group(1).split(), match.group(2)
        line = text.count("\n", 0, match.start()) + 1
        lang = info[0] if info else ""
        extra = dict(item.split("=", 1) for item in info[1:] if "=" in item)
        if "file" in extra:
            found.append(Step("file", extra["file"], body, line))
        elif lang == "python":
            found.append(Step("script", "", body, line))
        elif lang == "text" and "output" in info[1:]:
            found.append(Step("output", "", body, line))
        elif lang == "sh":
            found.append(Step("sh", "", body, line))
    return found


def pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def _env(folder: Path) -> dict[str, str]:
    env = os.environ.copy()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(folder)
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("PYTEST_XDIST_WORKER", None)
    return env


def run_page(page: Path, folder: Path) -> int:
    """Run ``page``'s steps in ``folder``; the number of runnable steps."""
    env = _env(folder)
    last: subprocess.CompletedProcess[str] | None = None
    ran = 0
    for step in steps(page):
        where = f"{page.name}:{step.line}"
        if step.kind == "file":
            target = folder / step.arg
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(step.text)
            continue
        if step.kind == "output":
            assert last is not None, f"{where}: an output block must follow a python block"
            assert last.stdout == step.text, f"{where}: the script printed\n{last.stdout}"
            last = None
            continue
        argv = [sys.executable, "-"] if step.kind == "script" else ["bash", "-e", "-s"]
        last = subprocess.run(
            argv,
            input=step.text,
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        ran += 1
        assert last.returncode == 0, (
            f"{where}: exit status {last.returncode}\n--- stdout\n{last.stdout}"
            f"\n--- stderr\n{last.stderr}"
        )
    return ran


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.name)
def test_every_example_of_the_guide_runs(page: Path, tmp_path: Path) -> None:
    """Issue 15 "Guides": every example is run by a test."""
    assert run_page(page, tmp_path) > 0, f"{page.name} has no runnable example"


def test_the_readme_links_every_guide() -> None:
    readme = (REPO / "README.md").read_text()
    assert pages(), "docs/ has the guides"
    for page in pages():
        assert f"docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"


def test_the_readmes_idl_example_runs(tmp_path: Path) -> None:
    """Issue 19 "Acceptance": an "Interfaces from IDL" section whose examples are run by a
    test: the README's section is run as a page (its IDL file, script and output)."""
    readme = (REPO / "README.md").read_text()
    start = readme.index("## Interfaces from IDL\n")
    section = readme[start : readme.index("\n## ", start + 1)]
    page = tmp_path / "readme-idl.md"
    page.write_text(section)
    work = tmp_path / "work"
    work.mkdir()
    assert run_page(page, work) == 1  # one script, its output checked


def test_a_failing_example_fails_with_its_line(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# t\n\n```python\nprint('hi')\n```\n\n```text output\nho\n```\n")
    with pytest.raises(AssertionError, match=r"page\.md:7: the script printed") as caught:
        run_page(page, tmp_path)
    assert "hi" in str(caught.value)


def test_readme_storage_commands_are_run_by_the_guide() -> None:
    """Issue 16 (new-user trial, points 1-3): the README's ``qtee ta sign``, ``qtee
    supplicant --tee optee`` and ``--gpfs`` command lines are lines of the storage guide's
    ``sh`` blocks, which ``test_every_example_of_the_guide_runs`` runs."""
    readme = (REPO / "README.md").read_text()
    guide = DOCS / "storage-and-tee-supplicant.md"
    run = {
        line.strip()
        for step in steps(guide)
        if step.kind == "sh"
        for line in step.text.splitlines()
    }
    shown = [
        line.split("  #")[0].strip()
        for block in re.findall(r"^```sh\n(.*?)^```", readme, re.S | re.M)
        for line in block.splitlines()
    ]
    wanted = [
        line
        for line in shown
        if line.startswith("qtee ta sign")
        or line.startswith("qtee supplicant --tee optee")
        or (line.startswith("qtee supplicant") and "--gpfs" in line)
    ]
    assert len(wanted) >= 3, wanted
    for line in wanted:
        assert line in run or any(r.startswith(line + " ") for r in run), line
