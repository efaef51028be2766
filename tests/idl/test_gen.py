"""objects.idl.gen and ``qtee idl gen``: typed modules written from an IDL file.

Issue 19 point 4: ``qtee idl gen FILE.idl -o DIR`` writes typed modules that pass
``mypy --strict``; each interface gives a stub and a skeleton, its errors as named
constants.  The CLI is run as a subprocess, as a user runs it.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from objects import QteeError, UsageError
from objects.idl import IdlFile, IdlWarning, parse_idl
from objects.idl.gen import generate, module_text
from qtee import CallbackObject, TrustedApp
from qtee._pytest_fixtures import AppLoaderHelper

ROOT = Path(__file__).resolve().parents[2]

IDL = textwrap.dedent(
    """\
    const uint32 MAGIC = 0xdead;

    struct Pair {
      uint32 left;
      uint32 right;
    };

    struct Wide {
      uint64 a;
      Pair[2] pairs;
      uint8[8] tag;
    };

    struct class {
      uint32 from;
    };

    /** A counter. */
    interface ICounter {
      error ERROR_OVERFLOW;
      const uint32 LIMIT = 100;

      method add(in uint32 a, in uint32 b, out uint32 sum);
      method swap(in Pair p, out Pair q);
      method wide(in Wide w, out Wide v);
      method echo(in buffer data, out buffer back);
      method squares(in uint16[] xs, out uint32[] ys);
      method keyword(in class c, out uint32 lambda);
    };

    interface IFactory : ICounter {
      error ERROR_EMPTY;

      method make(out ICounter c);
      method use(in ICounter c, out uint32 sum);
      method many(in ICounter[2] cs);
    };
    """
)


class _Counter:
    """ICounter's methods, shared by the implementations below."""

    def add(self, a: int, b: int) -> int:
        if a + b > 100:
            raise QteeError(10, "over the limit")
        return a + b

    def swap(self, p: Any) -> Any:
        return type(p)(left=p.right, right=p.left)

    def wide(self, w: Any) -> Any:
        return w

    def echo(self, data: bytes, *, back_len: int) -> bytes:
        return data[::-1][:back_len]

    def squares(self, xs: tuple[int, ...], *, ys_len: int) -> tuple[int, ...]:
        return tuple(x * x for x in xs)[:ys_len]

    def keyword(self, c: Any) -> int:
        return int(c._from) + 1


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gen")
    (out / "counter.idl").write_text(IDL)
    path = generate(_parse(out / "counter.idl"), out)
    assert path == out / "counter.py"
    return out


def _parse(path: Path) -> IdlFile:
    """The test IDL, read; the reader warns of each keyword it renames, once."""
    with pytest.warns(IdlWarning) as caught:
        idl = parse_idl(IDL, str(path))
    renamed = sorted(str(w.message).rsplit("rename it ", 1)[1] for w in caught)
    assert renamed == ["`_class`", "`_from`", "`_lambda`"]
    return idl


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_gen_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_generated_module_passes_mypy_strict(generated: Path) -> None:
    """Issue 19 point 4: the module passes ``mypy --strict``, and so does code that
    subclasses its skeleton with the IDL's types and calls its stub."""
    user = generated / "user.py"
    user.write_text(
        textwrap.dedent(
            """\
            from __future__ import annotations

            from counter import ICounter, IFactory, Pair, _class


            class Impl(ICounter.Skeleton):
                def add(self, a: int, b: int) -> int:
                    return a + b

                def swap(self, p: Pair) -> Pair:
                    return Pair(p.right, p.left)

                def keyword(self, c: _class) -> int:
                    return c._from


            stub = ICounter.Stub(Impl())
            total: int = stub.add(1, 2)
            pair: Pair = stub.swap(Pair(1, 2))
            back: bytes = stub.echo(b"x", back_len=4)
            ys: tuple[int, ...] = stub.squares([1, 2], ys_len=2)
            made: ICounter.Stub | None = IFactory.Stub(Impl()).make()
            code: int = ICounter.ERROR_OVERFLOW + IFactory.ERROR_EMPTY + ICounter.LIMIT
            """
        )
    )
    env = dict(os.environ, MYPYPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "counter.py", "user.py"],
        check=False,
        cwd=generated,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_generated_module_round_trip(generated: Path) -> None:
    """The written stub and skeleton agree (bundles, structs with arrays, buffers,
    arrays with their lengths, keywords renamed with a leading ``_``), errors by name
    across inheritance (ICounter 10, IFactory 11), consts."""
    mod = _import(generated / "counter.py")

    class Impl(_Counter, mod.ICounter.Skeleton):  # type: ignore[misc, name-defined]
        pass

    stub = mod.ICounter.Stub(Impl())
    assert stub.add(2, 3) == 5
    assert stub.swap(mod.Pair(1, 2)) == mod.Pair(2, 1)
    wide = mod.Wide(a=2**63, pairs=(mod.Pair(1, 2), mod.Pair(3, 4)), tag=tuple(range(8)))
    assert stub.wide(wide) == wide
    assert stub.echo(b"abc", back_len=2) == b"cb"
    assert stub.squares([1, 2, 3], ys_len=5) == (1, 4, 9)
    assert stub.keyword(mod._class(_from=6)) == 7
    with pytest.raises(QteeError) as exc:
        stub.add(99, 2)
    assert exc.value.name == "ICounter.ERROR_OVERFLOW"
    assert (mod.IFactory.ERROR_OVERFLOW, mod.IFactory.ERROR_EMPTY) == (10, 11)
    assert (mod.MAGIC, mod.ICounter.LIMIT, mod.IFactory.OP_make) == (0xDEAD, 100, 6)
    assert mod.ICounter.Stub.__qualname__ == "ICounter.Stub"
    assert mod.ICounter.Errors.__name__ == "ICounter"


def test_generated_module_text_matches_generate(generated: Path) -> None:
    """``generate`` writes exactly ``module_text``; it is deterministic."""
    text = (generated / "counter.py").read_text()
    file = _parse(generated / "counter.idl")
    assert module_text(file) == text == module_text(file)


def test_generate_refuses_what_is_not_a_file() -> None:
    """Every public function validates its input."""
    with pytest.raises(UsageError, match=r"path or a model\.IdlFile"):
        generate(42, "/tmp")  # type: ignore[arg-type]


@pytest.mark.qtee_modes("in-process", "server")
def test_generated_skeletons_across_the_model(
    generated: Path, qtee_app: AppLoaderHelper, request: pytest.FixtureRequest
) -> None:
    """A TA made from the generated IFactory skeleton hands out a counter, takes the
    client's own counter (a callback object from the generated ICounter skeleton) and
    drives it; every reference is released (the plugin's leak check)."""
    from qtee.secure import register_ta, unregister_ta

    mod = _import(generated / "counter.py")

    class Counter(_Counter, mod.ICounter.Skeleton, TrustedApp):  # type: ignore[misc, name-defined]
        pass

    class Factory(Counter, mod.IFactory.Skeleton):  # type: ignore[misc, name-defined]
        def make(self) -> object:
            return Counter()

        def use(self, c: Any) -> int:
            assert type(c).__qualname__ == "ICounter.Stub"
            return c.add(20, 22) + c.swap(mod.Pair(0, 1)).left  # type: ignore[no-any-return]

        def many(self, cs: tuple[Any, ...]) -> None:
            assert [c.add(1, 1) for c in cs] == [2, 2]

    class ClientCounter(_Counter, mod.ICounter.Skeleton, CallbackObject):  # type: ignore[misc, name-defined]
        pass

    register_ta("factory", Factory)
    request.addfinalizer(lambda: unregister_ta("factory"))
    factory = mod.IFactory.Stub(qtee_app("factory"))
    with factory.make() as counter:
        assert counter.add(40, 2) == 42
    assert factory.use(ClientCounter()) == 43
    factory.many([ClientCounter(), ClientCounter()])


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qtee", "idl", *args],
        check=False,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_gen_writes_the_module(tmp_path: Path) -> None:
    """``qtee idl gen FILE.idl -o DIR -I PATH``: includes found through ``-I``; the
    module written is the one ``generate`` writes; its path printed; exit 0."""
    inc = tmp_path / "inc"
    inc.mkdir()
    (inc / "base.idl").write_text("struct Pair {\n  uint32 left;\n  uint32 right;\n};\n")
    (tmp_path / "top.idl").write_text(
        'include "base.idl"\n\ninterface ITop {\n  method get(out Pair p);\n};\n'
    )
    done = _cli("gen", "top.idl", "-o", "out", "-I", str(inc), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == os.path.join("out", "top.py")
    text = (tmp_path / "out" / "top.py").read_text()
    assert "class Pair:" in text and "class ITop:" in text


def test_cli_gen_error_is_one_line_with_the_place(tmp_path: Path) -> None:
    """An IDL problem: one line ``qtee idl: FILE:LINE:COL: message``, exit 2, nothing
    written."""
    (tmp_path / "bad.idl").write_text(
        "interface IBad {\n  method f(in uint32 a, in uint32 a);\n};\n"
    )
    done = _cli("gen", "bad.idl", "-o", "out", cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("qtee idl: bad.idl:2:"), lines[0]
    assert not (tmp_path / "out").exists()
    missing = _cli("gen", "missing.idl", "-o", "out", cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr == "qtee idl: missing.idl: no such file\n"
    assert _cli(cwd=tmp_path).returncode == 2  # no verb: a usage error


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["nope.idl", "-o", "out"], "qtee idl: nope.idl: no such file"),
        (["folder", "-o", "out"], "qtee idl: folder: is a folder, not an .idl file"),
        (["IFoo.idl", "-o", "IFoo.idl"], "qtee idl: -o must be a folder: IFoo.idl is a file"),
    ],
)
def test_cli_gen_wrong_paths_get_no_fake_position(
    tmp_path: Path, argv: list[str], message: str
) -> None:
    """A path that is not what it should be is named as such (it read
    ``nope.idl:1:1: cannot read the file``): one line, exit 2, nothing written."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "IFoo.idl").write_text("interface IFoo {\n  method f();\n};\n")
    done = _cli("gen", *argv, cwd=tmp_path)
    assert (done.returncode, done.stderr, done.stdout) == (2, message + "\n", "")
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "IFoo.idl").read_text().startswith("interface")


def test_cli_gen_interrupted_while_reading_exits_130(tmp_path: Path) -> None:
    """^C while the file is being read (a FIFO nobody writes): one line, status 130, no
    traceback, as the other verbs end on ^C."""
    fifo = tmp_path / "IFoo.idl"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [sys.executable, "-m", "qtee", "idl", "gen", "IFoo.idl", "-o", "out"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # wait until it blocks opening the FIFO: it is then among the FIFO's openers
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _opening(proc.pid, fifo):
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert (proc.returncode, err, out) == (130, "qtee idl: interrupted\n", "")


def _opening(pid: int, fifo: Path) -> bool:
    """Whether process ``pid`` waits in the open of a FIFO for a writer (``fifo_open``
    sleeps in ``wait_for_partner``)."""
    try:
        return Path(f"/proc/{pid}/wchan").read_text() == "wait_for_partner"
    except OSError:
        return False


def test_mypy_finds_qtee_from_a_users_folder(tmp_path: Path) -> None:
    """``mypy --strict`` run in a folder of the user's (no MYPYPATH) type-checks code
    using a generated module: the virtualenv's editable install is one mypy can follow
    (a path, not setuptools' import-hook finder, which mypy cannot see through)."""
    (tmp_path / "IFoo.idl").write_text(
        "struct IFoo_Point { uint32 x; uint32 y; };\n"
        "interface IFoo {\n  method move(in IFoo_Point p, out IFoo_Point q);\n};\n"
    )
    assert _cli("gen", "IFoo.idl", "-o", ".", cwd=tmp_path).returncode == 0
    (tmp_path / "use.py").write_text(
        textwrap.dedent(
            """\
            from __future__ import annotations

            from IFoo import IFoo, IFoo_Point
            from objects.idl import IdlError
            from qtee import CallbackObject


            class Local(IFoo.Skeleton, CallbackObject):
                def move(self, p: IFoo_Point) -> IFoo_Point:
                    return IFoo_Point(p.y, p.x)


            moved: IFoo_Point = IFoo.Stub(Local()).move(IFoo_Point(1, 2))
            problem: type[Exception] = IdlError
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k not in {"MYPYPATH", "PYTHONPATH"}}
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "IFoo.py", "use.py"],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
