"""The README's "Running C programs" commands, run as written (issue 14 acceptance).

The section's two ``sh`` blocks are read from README.md.  The set-up block runs in bash
from the repository (its folder ``/tmp/qtee-c`` replaced by this test's own), and the
environment it exports is kept.  Then each line of the second block runs in that folder:
a line ending in ``&`` runs in the background until the end (servers and supplicants);
every other line must exit 0 and report ``tables empty`` or the server's tables.  The two
secure_storage runs share ``tee/``: the first (the model's supplicant) creates object#2,
the second (the real tee-supplicant's REE FS) finds it there and deletes it, as the
example does.
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
from tests._paths import REPO, TESTS

pytestmark = pytest.mark.timeout(300)


def readme_blocks() -> tuple[str, list[str]]:
    """The set-up block (a script) and the command lines of README.md's "Running C
    programs" section."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Running C programs", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert len(blocks) == 2, "the section has a set-up block and a block of commands"
    lines = [line.split("  #")[0].strip() for line in blocks[1].splitlines() if line.strip()]
    return blocks[0], lines


def setup_env(script: str, folder: Path) -> dict[str, str]:
    """Run the set-up block from the repository (into ``folder``); its environment."""
    script = script.replace("/tmp/qtee-c", str(folder))
    run = subprocess.run(
        ["bash", "-ec", f"{script}\nenv -0"],
        cwd=REPO,
        env=os.environ.copy(),
        capture_output=True,
        check=False,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr.decode()
    pairs = (item.split(b"=", 1) for item in run.stdout.split(b"\0") if b"=" in item)
    return {k.decode(): v.decode() for k, v in pairs}


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
    _peers.quic_teec(), _peers.optee_client(), _peers.optee_examples()  # built first
    sys.path.insert(0, str(TESTS))
    try:
        import peer_tas
    finally:
        sys.path.remove(str(TESTS))
    work = Path(os.path.realpath(tmp_path)) / "qtee-c"
    setup, commands = readme_blocks()
    env = setup_env(setup, work)
    assert sorted(p.name for p in (work / "tas").iterdir()) == [
        f"{peer_tas.SecureStorage.UUID}.ta",
        "smcinvoke_skeleton_ta64.mbn",
    ]
    background: list[subprocess.Popen[str]] = []
    storage_runs: list[str] = []
    try:
        for line in commands:
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
