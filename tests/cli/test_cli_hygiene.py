"""The ``qtee`` command line as a user runs it: a subprocess, as the console script does
(issue 15, "CLI and plugin hygiene").

* ``qtee serve --socket PATH`` never deletes a file that is not a socket, nor a socket a
  live server answers on: one line naming PATH and why, exit status 2; a stale socket
  (nobody answers) is replaced.
* ``--ta-module`` takes a module importable from the current directory or a path to a
  ``.py`` file; a typo is one line, exit 2.
* ``qtee supplicant --storage DIR`` makes DIR and its parents; an unusable DIR is one
  line, exit 2.
* A closed pipe ends a command quietly: no traceback, no "Exception ignored" line, exit
  status 1 (Python's own tools on EPIPE).
* ``--help`` texts carry no reST markup.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import qtee
from qtee import DeviceServer

#: The console script's own code: no current directory on sys.path (PYTHONSAFEPATH).
_SCRIPT = "import sys; from qtee.__main__ import main; sys.exit(main())"
_ENV = {**os.environ, "PYTHONSAFEPATH": "1"}


def qtee_cli(
    *argv: str, cwd: str | Path | None = None, stdout: int | None = subprocess.PIPE
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _SCRIPT, *argv],
        cwd=cwd,
        env=_ENV,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
        check=False,
    )


def one_line(err: str) -> str:
    """The one stderr line of a refused command (and that there is only one)."""
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    return err[:-1]


@pytest.fixture
def sockdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="qtee-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------ serve --socket PATH


def test_serve_never_replaces_a_file_that_is_not_a_socket(sockdir: str) -> None:
    """issue 15: a regular file at PATH stays, byte for byte; exit 2, one line."""
    path = Path(sockdir, "notes.txt")
    path.write_text("precious data")
    run = qtee_cli("serve", "--socket", str(path), "--duration", "0")
    assert run.returncode == 2
    assert (
        one_line(run.stderr) == f"qtee serve: {path} exists and is not a socket: not replacing it"
    )
    assert path.read_text() == "precious data"


def test_serve_never_replaces_a_live_servers_socket(sockdir: str) -> None:
    """issue 15: a second ``qtee serve`` on a live server's PATH is refused (exit 2), and
    the first server still answers there."""
    path = os.path.join(sockdir, "s")
    with DeviceServer(path):
        run = qtee_cli("serve", "--socket", path, "--duration", "0")
        assert run.returncode == 2
        assert one_line(run.stderr) == (
            f"qtee serve: a server is already listening on {path}: not replacing it"
        )
        qtee.connect(path).open().close()


def test_serve_never_replaces_a_socket_in_use_that_it_cannot_probe(sockdir: str) -> None:
    """A datagram socket someone holds is not a stale stream socket: it stays (exit 2)."""
    path = os.path.join(sockdir, "dgram")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as held:
        held.bind(path)
        run = qtee_cli("serve", "--socket", path, "--duration", "0")
        assert run.returncode == 2
        assert one_line(run.stderr).startswith(
            f"qtee serve: {path} is a socket that cannot be probed ("
        )
        assert os.path.exists(path)


def test_serve_replaces_a_stale_socket(sockdir: str) -> None:
    """A socket whose server is gone (nobody answers: ECONNREFUSED) is replaced."""
    path = os.path.join(sockdir, "s")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(path)
    run = qtee_cli("serve", "--socket", path, "--duration", "0")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        f"serving on {path}",
        "TAs: none registered",
        "tables: empty",
    ]
    assert not os.path.exists(path)  # removed again at the end


@pytest.mark.parametrize(
    ("where", "why"),
    [
        ("missing", "cannot listen on {path}: No such file or directory"),
        ("long", "{path}: a Unix socket path is at most 108 bytes, this one is {size}"),
    ],
)
def test_serve_on_an_unusable_path_is_exit_2(sockdir: str, where: str, why: str) -> None:
    path = os.path.join(sockdir, "no-such-dir", "s")
    if where == "long":
        path = os.path.join(sockdir, "s" * (109 - len(sockdir)))
    run = qtee_cli("serve", "--socket", path, "--duration", "0")
    assert run.returncode == 2
    size = len(path.encode())
    assert one_line(run.stderr) == "qtee serve: " + why.format(path=path, size=size)


# ------------------------------------------------------------------ --ta-module

_ADDER_TAS = """\
import struct

import qtee
from adder_op import add  # a neighbour of this file

class Adder(qtee.TrustedApp):
    @qtee.op(0, ib=(8,), ob=(4,))
    def add(self, pair):
        return struct.pack("<I", add(*struct.unpack("<II", pair)))

qtee.register_ta("hygiene.adder", Adder)
"""


def _serve_and_add(cwd: Path, sockdir: str, ta_module: str) -> int:
    """``qtee serve --ta-module ...`` in ``cwd``; load hygiene.adder over the socket and
    add 40 + 2 with it."""
    path = os.path.join(sockdir, "s")
    server = subprocess.Popen(
        [sys.executable, "-c", _SCRIPT, "serve", "--socket", path, "--ta-module", ta_module],
        cwd=cwd,
        env=_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline() == f"serving on {path}\n", server.stderr
        assert server.stdout.readline() == "TAs: 'hygiene.adder' (Adder)\n"
        with (
            qtee.Client(qtee.connect(path), workers=1) as client,
            client.client_env() as env,
            client.open_service(env, 3) as loader,
        ):
            (ctrl,) = loader.invoke(0, qtee.ta_image("hygiene.adder"), qtee.OUT_OBJECT)
            with ctrl:
                (app,) = ctrl.invoke(2, qtee.OUT_OBJECT)
                with app:
                    (out,) = app.invoke(0, struct.pack("<II", 40, 2), qtee.Out(4))
                ctrl.invoke(1)
        (total,) = struct.unpack("<I", out)
        return int(total)
    finally:
        server.terminate()
        server.communicate(timeout=30)


def test_ta_module_by_name_from_the_current_directory(tmp_path: Path, sockdir: str) -> None:
    """issue 15: ``--ta-module adder_tas`` where adder_tas.py is, as ``python -m`` finds
    a module (the console script itself has no current directory on sys.path)."""
    (tmp_path / "adder_tas.py").write_text(_ADDER_TAS)
    (tmp_path / "adder_op.py").write_text("def add(a, b):\n    return a + b\n")
    assert _serve_and_add(tmp_path, sockdir, "adder_tas") == 42


def test_ta_module_as_a_path_to_a_py_file(tmp_path: Path, sockdir: str) -> None:
    """issue 15: ``--ta-module tas/adder_tas.py`` from elsewhere: the file is loaded, and
    its directory is searched for its own imports (as ``python FILE`` does)."""
    (tmp_path / "tas").mkdir()
    (tmp_path / "tas" / "adder_tas.py").write_text(_ADDER_TAS)
    (tmp_path / "tas" / "adder_op.py").write_text("def add(a, b):\n    return a + b\n")
    assert _serve_and_add(tmp_path, sockdir, "tas/adder_tas.py") == 42


def test_a_ta_module_that_registers_nothing_is_warned_about(tmp_path: Path, sockdir: str) -> None:
    """A ``--ta-module`` whose import registers no TA (a module of helpers, a forgotten
    ``register_ta``) still serves, with one warning line saying what a TA module does."""
    (tmp_path / "helpers.py").write_text("X = 1\n")
    path = os.path.join(sockdir, "s")
    run = qtee_cli(
        "serve", "--socket", path, "--ta-module", "helpers", "--duration", "0", cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr
    assert run.stderr.splitlines() == [
        "qtee serve: warning: --ta-module helpers registered no TA (a TA module calls "
        "register_ta, register_gp_ta or register_ta_file when imported)"
    ]
    assert run.stdout.splitlines()[1] == "TAs: none registered"


@pytest.mark.parametrize(
    ("given", "why"),
    [
        ("adder_tsa", "adder_tsa: no such module (looked in {cwd} first, then on sys.path)"),
        ("pkg_nope.tas", "pkg_nope.tas: no such module (looked in {cwd} first, then on sys.path)"),
        ("adder_tsa.py", "adder_tsa.py: no such file"),
        ("./tas", "./tas: not a .py file"),
        ("adder-tas", "adder-tas: not a module name, nor a path to a .py file"),
    ],
)
def test_a_ta_module_typo_is_one_line_exit_2(
    tmp_path: Path, sockdir: str, given: str, why: str
) -> None:
    (tmp_path / "tas").mkdir()
    path = os.path.join(sockdir, "s")
    run = qtee_cli("serve", "--socket", path, "--ta-module", given, cwd=tmp_path)
    assert run.returncode == 2
    assert one_line(run.stderr) == "qtee serve: --ta-module " + why.format(cwd=tmp_path)
    assert not os.path.exists(path)  # nothing was served


def test_a_ta_module_whose_code_fails_shows_its_own_traceback(tmp_path: Path, sockdir: str) -> None:
    """The module exists but raises: its traceback from its own first frame (no importlib
    or qtee frames), exit 1."""
    (tmp_path / "bad_tas.py").write_text("\n\nraise RuntimeError('no TAs today')\n")
    run = qtee_cli("serve", "--socket", os.path.join(sockdir, "s"), "--ta-module", "bad_tas",
                   cwd=tmp_path)  # fmt: skip
    assert run.returncode == 1
    lines = run.stderr.splitlines()
    assert lines[0] == "qtee serve: --ta-module bad_tas: importing it failed:"
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[2] == f'  File "{tmp_path / "bad_tas.py"}", line 3, in <module>'
    assert lines[-1] == "RuntimeError: no TAs today"
    assert "importlib" not in run.stderr and "__main__" not in run.stderr


# ------------------------------------------------------------------ supplicant --storage


def test_supplicant_storage_is_made_with_its_parents(tmp_path: Path) -> None:
    """issue 15: ``--storage DIR`` makes DIR and the directories above it."""
    storage = tmp_path / "a" / "b" / "tzstorage"
    run = qtee_cli("supplicant", "--storage", str(storage), "--no-time", "--duration", "0")
    assert run.returncode == 0, run.stderr
    assert storage.is_dir()
    assert run.stdout.splitlines()[-1] == "tables: empty"


@pytest.mark.parametrize(
    ("storage", "why"),
    [
        ("{file}", "not a directory"),
        ("{file}/sub", "cannot create it: Not a directory"),
        ("/proc/self", "not writable (the storage listener writes its files there)"),
    ],
)
def test_an_unusable_storage_directory_is_one_line_exit_2(
    tmp_path: Path, storage: str, why: str
) -> None:
    (tmp_path / "file").write_text("not a directory")
    storage = storage.format(file=tmp_path / "file")
    run = qtee_cli("supplicant", "--storage", storage, "--no-time", "--duration", "0")
    assert run.returncode == 2
    assert one_line(run.stderr) == f"qtee supplicant: --storage {storage}: {why}"
    assert run.stdout == ""


# ------------------------------------------------------------------ a closed pipe


@pytest.mark.parametrize(
    "argv",
    [
        ["version"],
        ["info"],
        ["info", "--demo"],
        ["trace", "--demo"],
        ["demo"],
        ["supplicant", "--no-time", "--duration", "0"],
    ],
    ids=" ".join,
)
def test_a_closed_pipe_ends_quietly(argv: list[str]) -> None:
    """issue 15: stdout's reader is gone before the first write (``qtee info | head -0``):
    nothing on stderr, exit 1, and promptly."""
    r, w = os.pipe()
    os.close(r)
    try:
        start = time.monotonic()
        run = qtee_cli(*argv, stdout=w)
    finally:
        os.close(w)
    assert (run.returncode, run.stderr) == (1, "")
    assert time.monotonic() - start < 30


def test_trace_replay_into_head_ends_quietly(tmp_path: Path) -> None:
    """``qtee trace --replay FILE | head -1`` of a trace longer than a pipe holds: the
    reader takes one line and goes; qtee ends with status 1 and says nothing."""
    from qtee._cli import trace as _trace

    recorded = tmp_path / "demo.trace"
    assert qtee_cli("trace", "--record", str(recorded)).returncode == 0
    records = _trace.load(recorded)
    long = _trace.Trace()
    for _ in range(5000 // len(records) + 1):
        for record in records:
            long(record)
    long.save(tmp_path / "long.trace")
    proc = subprocess.Popen(
        [sys.executable, "-c", _SCRIPT, "trace", "--replay", str(tmp_path / "long.trace")],
        env=_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b"time ms")
    proc.stdout.close()  # head -1 exits
    assert proc.wait(timeout=60) == 1
    assert proc.stderr.read() == b""
    proc.stderr.close()


def test_help_into_a_closed_pipe_is_quiet() -> None:
    r, w = os.pipe()
    os.close(r)
    try:
        run = qtee_cli("serve", "--help", stdout=w)
    finally:
        os.close(w)
    assert run.stderr == ""


# ------------------------------------------------------------------ --help


def _verbs() -> list[str]:
    run = qtee_cli("--help")
    match = re.search(r"\{([a-z,]+)\}", run.stdout)
    assert match is not None, run.stdout
    return match.group(1).split(",")


_MARKUP = re.compile(r"``|:[a-z]+:`|`")


def test_every_verb_has_help_without_rest_markup() -> None:
    """issue 15: ``qtee --help`` and ``qtee VERB --help`` for every verb the parser has:
    exit 0, and no reST (double backquotes, roles like :class:`x`, any backquote)."""
    verbs = _verbs()
    assert {"serve", "supplicant", "run", "info", "trace", "vm", "demo", "version"} <= set(verbs)
    for argv in [[], *([verb] for verb in verbs)]:
        run = qtee_cli(*argv, "--help")
        assert run.returncode == 0, (argv, run.stderr)
        assert run.stdout.startswith("usage: qtee"), argv
        found = _MARKUP.findall(run.stdout)
        assert not found, f"qtee {' '.join(argv)} --help has reST markup {found}:\n{run.stdout}"


def test_ctrl_c_in_qtee_vm_ends_the_rounds_and_exits_130() -> None:
    """^C during ``qtee vm`` (its loops, or its setup on a busy machine): every loop ends
    after its round, the VMs are destroyed as at a normal end, one line says so, no
    traceback, status 130."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "qtee", "vm", "--iterations", "1000000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(3)  # the loops are running by now (or, on a busy machine, still starting)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and "qtee vm: interrupted" in err, err
