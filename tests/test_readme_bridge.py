"""The README's "Running C programs" commands, run as written (issue 14 acceptance).

The ``sh`` block of that section is read from README.md and each line run with bash in
a folder holding ``my_tas.py`` (the TA module the README's "Real TA files" shows, here
the peers' TAs) and ``tas/`` (the skeleton TA's real ``.mbn`` and secure_storage's
``<uuid>.ta``), with ``qtee`` and the built peer programs on ``PATH``.  A line ending in
``&`` runs in the background until the end (servers and supplicants); every other line
must exit 0 and report ``tables empty`` or the server's tables.  The two secure_storage
runs share ``tee/``: the first (the model's supplicant) creates object#2, the second (the
real tee-supplicant's REE FS) finds it there and deletes it, as the example does.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qtee.bridge import LIBRARY
from tests import _peers

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"

pytestmark = pytest.mark.timeout(300)


def readme_commands() -> list[str]:
    """The lines of the ``sh`` block in README.md's "Running C programs" section."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Running C programs", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None, "no sh block in the Running C programs section"
    return [line.split("  #")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def _sockets(pid: int) -> int:
    """Sockets open in ``pid`` and its children (tee-supplicant's connection)."""
    n = 0
    for proc in [pid, *map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]:
        fd_dir = Path(f"/proc/{proc}/fd")
        for fd in fd_dir.iterdir() if fd_dir.exists() else []:
            try:
                n += os.readlink(fd).startswith("socket:")
            except OSError:
                continue
    return n


def test_readme_running_c_programs(tmp_path: Path) -> None:
    if not LIBRARY.is_file():
        _peers.unavailable(f"the preload bridge is not built ({LIBRARY}): run `make bridge`")
    quic, client = _peers.quic_teec(), _peers.optee_client()
    examples = _peers.optee_examples()
    sys.path.insert(0, str(TESTS))
    try:
        import peer_tas
    finally:
        sys.path.remove(str(TESTS))
    work = Path(os.path.realpath(tmp_path))
    (work / "my_tas.py").write_text("from peer_tas import *  # noqa: F403\n")
    tas = work / "tas"
    tas.mkdir()
    (tas / quic.skeleton_ta.name).write_bytes(quic.skeleton_ta.read_bytes())
    peer_tas.write_ta_files(tas)
    path = [
        str(Path(sys.executable).parent),
        str(quic.qcomteetest.parent),
        str(client.tee_supplicant.parent),
        str(examples.bin_dir),
        os.environ.get("PATH", ""),
    ]
    env = {
        **os.environ,
        "PATH": os.pathsep.join(path),
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "LD_LIBRARY_PATH": str(client.lib_dir),
    }
    background: list[subprocess.Popen[str]] = []
    storage_runs: list[str] = []
    try:
        for line in readme_commands():
            argv = shlex.split(line.rstrip("&").strip())
            if line.endswith("&"):
                proc = subprocess.Popen(
                    argv,
                    cwd=work,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    start_new_session=True,
                )
                background.append(proc)
                _ready(argv, proc, work)
                continue
            run = subprocess.run(
                argv, cwd=work, env=env, capture_output=True, text=True, timeout=60, check=False
            )
            assert run.returncode == 0, (line, run.stdout, run.stderr)
            last = run.stderr.splitlines()[-1] if run.stderr else ""
            assert last == "qtee run: tables empty" or "the device was the server's" in last, (
                line,
                run.stderr,
            )
            if "qcomteetest" in line:
                assert "    SUCCESS." in run.stdout.splitlines(), (line, run.stdout)
            if "secure_storage" in line:
                storage_runs.append(run.stdout)
    finally:
        for proc in reversed(background):
            proc.send_signal(signal.SIGINT if "serve" in proc.args else signal.SIGTERM)
            try:
                out, _ = proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate()
            if "serve" in proc.args:
                assert out.splitlines()[-1] == "tables: empty", out
    assert len(storage_runs) == 2
    assert "- Object not found in TA secure storage, create it." in storage_runs[0]
    assert "- Object found in TA secure storage, delete it." in storage_runs[1]
    assert not list((work / "tee").glob(f"{peer_tas.SecureStorage.UUID}/*"))  # deleted


def _ready(argv: list[str], proc: subprocess.Popen[str], work: Path) -> None:
    """Wait until a background command serves: a server's socket exists, a supplicant
    has connected to it."""
    end = time.monotonic() + 20
    if "serve" in argv:
        sock = work / argv[argv.index("--socket") + 1]
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < end, "the server did not start"
            time.sleep(0.05)
        return
    while _sockets(proc.pid) == 0:
        assert proc.poll() is None and time.monotonic() < end, "the supplicant did not start"
        time.sleep(0.05)
    time.sleep(0.5)  # its RECV is waiting
