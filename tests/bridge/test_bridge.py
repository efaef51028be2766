"""Unmodified C programs against the model through the preload bridge (issue 14).

``qtee run -- PROG`` runs PROG with ``libqtee_preload.so``: its opens of the device
nodes, and the ioctls, closes and dups of the fds they return, reach the model in its
own process.  Checked here with this suite's own probe (``tests/c/bridge_probe.c``) and
with the unmodified peers (``tests/_peers.py``): quic-teec's ``qcomteetest`` against the
QTEE device, optee_examples' host programs through libteec against the OP-TEE device.

The kernel facts each probe step checks: an fd with no read/write op answers EINVAL;
an unknown ioctl is EINVAL from the TEE core's switch before any copy; an unmapped
struct is EFAULT; SHM_ALLOC returns a new fd to mmap, whose mapping outlives its close
(qtee-kernel.md §1.3-§1.5); dup'ed numbers name the same open file, released with the
last of them; qcomtee registers one device (no /dev/tee1, no privileged node).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest

from qtee.bridge import LIBRARY
from tests import _peers
from tests._paths import TESTS

PROBE_SRC = TESTS / "c" / "bridge_probe.c"
SOAK = os.environ.get("QTEE_SOAK") == "1"

pytestmark = pytest.mark.timeout(600 if SOAK else 300)
_QTEE_RUN = (sys.executable, "-m", "qtee", "run")


def _library() -> Path:
    if not LIBRARY.is_file():
        _peers.unavailable(f"the preload bridge is not built ({LIBRARY}): run `make bridge`")
    return LIBRARY


def probe() -> Path:
    """The probe, compiled once per content (no library: it speaks the raw uAPI)."""
    _library()
    cc = _peers.c_compiler()
    key = hashlib.sha256(PROBE_SRC.read_bytes() + cc.encode()).hexdigest()

    def build(tmp: Path, _final: Path, log: IO[str]) -> None:
        subprocess.run(
            [cc, "-O2", "-Wall", "-Wextra", "-o", str(tmp / "bridge_probe"), str(PROBE_SRC)],
            stdout=log,
            stderr=subprocess.STDOUT,
            check=True,
        )

    return _peers.cached_build(_peers.BUILD_ROOT / "cc", f"probe-{key[:16]}", key, build) / (
        "bridge_probe"
    )


def qtee_run(
    *argv: str | Path,
    options: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """``qtee run [options] -- argv`` from the tests folder (TA modules import from it)."""
    _library()
    cmd = [sys.executable, "-m", "qtee", "run", *options, "--", *map(str, argv)]
    return subprocess.run(
        cmd,
        cwd=TESTS,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def steps(out: str) -> dict[str, tuple[int, int]]:
    """The probe's "name ret errno" lines."""
    found: dict[str, tuple[int, int]] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1].lstrip("-").isdigit():
            found[parts[0]] = (int(parts[1]), int(parts[2]))
    return found


# ---------------------------------------------------------------- the probe


def test_the_fd_calls_of_a_c_program_behave_as_on_the_kernel() -> None:
    run = qtee_run(probe(), "basic")
    assert run.returncode == 0, run.stderr
    got = steps(run.stdout)
    ok = (0, 0)
    assert got["open"][0] >= 3 and got["open"][1] == 0
    assert got["version"] == ok and "impl 4 0 0x10" in run.stdout  # QTEE, OBJREF
    assert got["shm_alloc_is_fd"] == ok and "shm 1 8192" in run.stdout
    assert got["mmap"] == ok
    assert got["read_device"] == (-1, errno.EINVAL)
    assert got["write_device"] == (-1, errno.EINVAL)
    assert got["unknown_ioctl"] == (-1, errno.EINVAL)
    assert got["version_efault"] == (-1, errno.EFAULT)
    assert got["version_readonly"] == (-1, errno.EFAULT)
    assert got["shm_ioctl"] == (-1, errno.ENOTTY)  # a shm fd is a dma-buf, not the device
    for name in ("dup_ge_100", "dup2", "close_original", "version_on_dup", "close_dup"):
        assert got[name] == ok, name
    for name in ("close_dup2", "version_on_last", "close_shm", "shm_still_mapped"):
        assert got[name] == ok, name
    assert got["close_last"] == ok
    assert got["version_closed"] == (-1, errno.EBADF)
    assert got["openat"] == ok
    assert got["open_tee1"] == (-1, errno.ENOENT)
    assert got["open_teepriv0"] == (-1, errno.ENOENT)
    assert run.stderr.splitlines()[-1] == "qtee run: tables empty"


def test_a_child_forked_without_exec_gets_enodev_not_a_copy_of_the_model() -> None:
    """Documented: the model lives in the process that opened the device; a forked
    child's inherited device fd and its own opens answer ENODEV, its close works."""
    run = qtee_run(probe(), "fork")
    assert run.returncode == 0, run.stderr
    got = steps(run.stdout)
    assert got["child_version"] == (-1, errno.ENODEV)
    assert got["child_open"] == (-1, errno.ENODEV)
    assert got["child_close"] == (0, 0)
    assert got["parent_version"] == (0, 0) and got["close"] == (0, 0)
    assert run.stderr.splitlines() == ["qtee run: tables empty"]


def test_a_program_killed_by_a_signal_exits_128_plus_n_with_its_tables_reported() -> None:
    run = qtee_run(probe(), "kill")
    assert run.returncode == 128 + signal.SIGKILL
    assert run.stderr.splitlines() == [
        "qtee run: left in the model at the last snapshot (the program was killed by "
        "SIGKILL): shm ids 1, physical regions 1"
    ]


def test_a_missing_program_exits_127_with_one_line() -> None:
    run = qtee_run("no-such-program-qtee")
    assert run.returncode == 127
    assert run.stderr == "qtee run: no-such-program-qtee: command not found\n"


def test_a_file_that_is_not_a_program_exits_126(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    run = qtee_run(text)
    assert run.returncode == 126
    assert run.stderr == f"qtee run: {text}: cannot run it (not an executable file)\n"


def test_no_program_is_a_usage_error() -> None:
    run = qtee_run()
    assert run.returncode == 2 and run.stderr.startswith("qtee run: no program given")


def test_a_model_that_cannot_start_fails_open_with_enoent_and_says_why(tmp_path: Path) -> None:
    """A --ta-module whose own code fails: the device is missing as far as the program can
    tell (ENOENT), one stderr line says why (the bridge's, when it happens; qtee run says
    it again no more), and the program's own status is qtee run's."""
    broken = tmp_path / "broken_tas.py"
    broken.write_text('raise RuntimeError("no TAs today")\n')
    run = qtee_run(probe(), "open", options=("--ta-module", str(broken)))
    assert run.returncode == 0
    assert steps(run.stdout)["open"] == (-1, errno.ENOENT)
    assert run.stderr == "qtee bridge: cannot start the model: RuntimeError: no TAs today\n"


def test_a_ta_module_given_as_a_file_is_loaded_in_the_model(tmp_path: Path) -> None:
    """issue 15 (CLI hygiene): ``--ta-module path/to/file.py`` is imported by the model in
    the program (here it says so on stderr before the program's first open)."""
    tas = tmp_path / "file_tas.py"
    tas.write_text('import sys\nprint("file_tas imported", file=sys.stderr)\n')
    run = qtee_run(probe(), "open", options=("--ta-module", str(tas)))
    assert run.returncode == 0, run.stderr
    assert steps(run.stdout)["open"][1] == 0
    assert run.stderr.splitlines()[0] == "file_tas imported"


def test_a_program_that_opens_no_device_is_told() -> None:
    """A static program (or one opening the node otherwise than through libc) is not
    reached by the preload library: qtee run says the program opened no TEE device."""
    run = qtee_run("true")
    assert run.returncode == 0
    assert run.stderr == (
        "qtee run: true opened no TEE device (a static program, or one that does not "
        "open /dev/teeN through libc, is not reached by the bridge)\n"
    )


@pytest.mark.parametrize(
    ("options", "why"),
    [
        (("--ta-module", "no_such_ta_module"), "--ta-module no_such_ta_module: no such module"),
        (("--ta-module", "my_tas.py"), "--ta-module my_tas.py: no such file"),
        (("--ta-module", "./c"), "--ta-module ./c: not a .py file"),
        (("--ta-module", "my-tas"), "--ta-module my-tas: not a module name"),
        (("--connect", "x.sock", "--storage", "tee"), "--storage: the device of --connect"),
        (("--connect", "x.sock", "--tee", "optee", "--trace"), "--tee, --trace: the device of"),
        (("--connect", "x.sock", "--plugin", "u=m:f"), "--plugin: the device of --connect"),
        (("--plugin", f"{uuid.UUID(int=1)}=peer_tas:f"), "plugins are tee-supplicant's"),
        (("--tee", "optee", "--plugin", "peer_tas:f"), "not UUID=MODULE:FUNCTION"),
        (("--tee", "optee", "--plugin", "xyz=peer_tas:f"), "'xyz' is not a UUID"),
        (("--tee", "optee", "--plugin", f"{uuid.UUID(int=1)}=no_such_mod:f"), "no such module"),
    ],
)
def test_bad_options_are_usage_errors(options: tuple[str, ...], why: str) -> None:
    run = qtee_run("true", options=options)
    assert run.returncode == 2 and why in run.stderr, run.stderr
    assert run.stderr.count("\n") == 1, run.stderr


def test_connect_to_no_server_says_why_once(tmp_path: Path) -> None:
    """--connect to a path with no server: each open fails as for a missing device
    (ENOENT) and one line says why."""
    run = qtee_run(probe(), "open", options=("--connect", str(tmp_path / "none.sock")))
    assert steps(run.stdout)["open"] == (-1, errno.ENOENT)
    assert run.stderr.splitlines() == [
        f"qtee bridge: /dev/tee0: cannot connect to {tmp_path / 'none.sock'}: "
        "no such socket (is `qtee serve` running there?)",
        "qtee run: no device could be opened (see above)",
    ]


def test_trace_prints_the_crossings_and_the_tables() -> None:
    run = qtee_run(_peers.quic_teec().qcomteetest, "-d", options=("--trace",))
    assert run.returncode == 0, run.stderr
    crossings = [line for line in run.stderr.splitlines() if line.startswith("qtee: ")]
    assert any("NS -> QTEE" in line and "invoke" in line for line in crossings)
    assert any("QTEE -> NS" in line and "callback" in line for line in crossings)
    assert run.stderr.splitlines()[-1] == "qtee run: tables empty"


# ---------------------------------------------------------------- quic-teec


def test_qcomteetest_diagnostics() -> None:
    """``qcomteetest -d``: credentials served by its supplicant thread (callbacks through
    SUPPL_RECV/SEND), Diagnostics (UID 143), the thread cancelled at the end."""
    run = qtee_run(_peers.quic_teec().qcomteetest, "-d")
    assert run.returncode == 0, run.stderr
    assert "Obtained object (UID = 143)" in run.stdout
    assert "    SUCCESS." in run.stdout.splitlines()
    assert run.stderr.splitlines() == ["qtee run: tables empty"]


@pytest.mark.parametrize("use_mo", ["0", "1"], ids=["from a buffer", "from a memory object"])
def test_qcomteetest_loads_the_real_skeleton_ta(use_mo: str, tmp_path: Path) -> None:
    """``qcomteetest -l DIR USE_MO 0``: the real smcinvoke_skeleton_ta64.mbn selects the
    Python TA registered for its SHA-256 (tests/peer_tas.py), which adds two random u32."""
    peer = _peers.quic_teec()
    (tmp_path / peer.skeleton_ta.name).write_bytes(peer.skeleton_ta.read_bytes())
    run = qtee_run(peer.qcomteetest, "-l", tmp_path, use_mo, "0", options=_TAS)
    assert run.returncode == 0, run.stderr
    assert "Obtained ta object" in run.stdout
    assert "    SUCCESS." in run.stdout.splitlines()
    assert run.stderr.splitlines() == ["qtee run: tables empty"]


def test_an_image_that_matches_no_ta_gets_the_loaders_error(tmp_path: Path) -> None:
    """Without the module that registers the skeleton TA, IAppLoader answers
    ERROR_INVALID_BUFFER (10) for the unknown image, and qcomteetest says so."""
    peer = _peers.quic_teec()
    (tmp_path / peer.skeleton_ta.name).write_bytes(peer.skeleton_ta.read_bytes())
    run = qtee_run(peer.qcomteetest, "-l", tmp_path, "0", "0")
    assert "Unable to obtain ta_controller, result 10" in run.stdout
    assert run.stderr.splitlines() == ["qtee run: tables empty"]


_TAS = ("--ta-module", "peer_tas")


@pytest.mark.slow
def test_qcomteetest_cancel_teardown_never_hangs(tmp_path: Path) -> None:
    """libqcomtee cancels its supplicant thread (asynchronously) while it waits in
    SUPPL_RECV: that wait is in C, so it never hangs the model.  200 runs of
    ``qcomteetest -l DIR 1 0`` under make soak, 15 in make test (each run is ~2 s)."""
    peer = _peers.quic_teec()
    (tmp_path / peer.skeleton_ta.name).write_bytes(peer.skeleton_ta.read_bytes())
    for i in range(200 if SOAK else 15):
        run = qtee_run(peer.qcomteetest, "-l", tmp_path, "1", "0", options=_TAS, timeout=30)
        assert run.returncode == 0 and "    SUCCESS." in run.stdout.splitlines(), (i, run)
        assert run.stderr.splitlines() == ["qtee run: tables empty"], (i, run.stderr)


# ---------------------------------------------------------------- optee_examples


def _examples_env() -> dict[str, str]:
    client = _peers.optee_client()
    return {"LD_LIBRARY_PATH": str(client.lib_dir)}


@pytest.mark.parametrize(
    ("example", "expect"),
    [
        ("hello_world", ["Invoking TA to increment 42", "TA incremented value to 43"]),
        ("random", ["Invoking TA to generate random UUID... ", "TA generated UUID value = 0x"]),
        ("hotp", ["HOTP: 755224", "HOTP: 287082", "HOTP: 520489"]),  # RFC 4226 appendix D
    ],
)
def test_optee_example_hosts(example: str, expect: list[str]) -> None:
    run = qtee_run(
        _peers.optee_example(example), options=("--tee", "optee", *_TAS), env=_examples_env()
    )
    assert run.returncode == 0, run.stderr
    for line in expect:
        assert any(out.startswith(line) for out in run.stdout.splitlines()), (line, run.stdout)
    assert run.stderr.splitlines() == ["qtee run: tables empty"]


def test_optee_secure_storage_with_the_models_supplicant(tmp_path: Path) -> None:
    """secure_storage through the model's own supplicant (``--storage``), its TA loaded
    through LOAD_TA from a ``<uuid>.ta`` file (``--ta-dir``): object#2 stays in the
    REE FS under the TA's UUID."""
    sys.path.insert(0, str(TESTS))
    try:
        import peer_tas
    finally:
        sys.path.remove(str(TESTS))
    tas, storage = tmp_path / "tas", tmp_path / "storage"
    tas.mkdir()
    peer_tas.write_ta_files(tas)
    run = qtee_run(
        _peers.optee_example("secure_storage"),
        options=("--tee", "optee", *_TAS, "--storage", str(storage), "--ta-dir", str(tas)),
        env=_examples_env(),
    )
    assert run.returncode == 0, run.stderr
    assert "- Object not found in TA secure storage, create it." in run.stdout
    assert "We're done, close and release TEE resources" in run.stdout
    kept = list((storage / str(peer_tas.SecureStorage.UUID)).iterdir())
    assert [p.name for p in kept] == [b"object#2".hex()]
    assert run.stderr.splitlines() == ["qtee run: tables empty"]


def test_optee_plugins_example_through_a_plugin_of_the_models_supplicant(
    tmp_path: Path,
) -> None:
    """optee_examples plugins (host, TA as ``peer_tas.Plugins``) with the syslog plugin
    given as ``--plugin UUID=peer_tas:syslog_plugin``: five PINGs succeed and the plugin
    gets each line with LOG_INFO (linaro-swg/optee_examples:plugins/host/main.c@934c7ed;
    OP-TEE/optee_os:core/tee/tee_supp_plugin_rpc.c@11f5b73143c239af59f8a7d05353fea2d9822c91;
    OP-TEE/optee_client:tee-supplicant/src/plugin.c@0fc6ef70a70d38628ded06590aefb7bc23364d99)."""
    log = tmp_path / "syslog"
    plugin = "96bcf744-4f72-4866-bf1d-8634fd9c65e5=peer_tas:syslog_plugin"
    run = qtee_run(
        _peers.optee_example("plugins"),
        options=("--tee", "optee", *_TAS, "--plugin", plugin),
        env={**_examples_env(), "QTEE_TEST_SYSLOG": str(log)},
    )
    assert run.returncode == 0, run.stderr
    for i in range(1, 6):
        assert f"Attempt #{i}: TEEC_InvokeCommand() success; res=0 orig=0x4" in run.stdout
    assert log.read_text().splitlines() == [f"6 Hello, plugin! value = {i:#x}" for i in range(5)]
    assert run.stderr.splitlines() == ["qtee run: tables empty"]


@pytest.mark.parametrize(
    ("sig", "group"),
    [(signal.SIGINT, True), (signal.SIGTERM, False)],
    ids=["^C to the process group", "SIGTERM to qtee run"],
)
def test_signals_reach_the_program_and_its_status_is_passed_through(
    sig: signal.Signals, group: bool
) -> None:
    """^C (the terminal signals the whole group): qtee run ignores it and the program
    dies of it; SIGTERM sent to qtee run alone is passed on.  Exit 128+N either way."""
    import time

    _library()
    proc = subprocess.Popen(
        [sys.executable, "-m", "qtee", "run", "--", "sleep", "30"],
        cwd=TESTS,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30  # until qtee run has started sleep (slow when busy)
        while not _children(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # past the fork: qtee run is waiting for its program
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        assert proc.wait(timeout=10) == 128 + sig
        assert proc.stderr is not None
        assert proc.stderr.read().startswith(
            f"qtee run: sleep opened no TEE device before it was killed by {sig.name} "
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


# ---------------------------------------------------------------- across processes


class Served:
    """``qtee serve`` in its own process (TA modules from tests/); ``stop()`` returns
    its last line (``tables: empty`` when nothing is left)."""

    def __init__(self, sock: Path, *options: str) -> None:
        self.sock = sock
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qtee", "serve", "--socket", str(sock), *options],
            cwd=TESTS,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        assert first.startswith("serving on"), first

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=30)
        return out.splitlines()[-1] if out else ""


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short folder for sockets (a socket path is at most 108 bytes)."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="qtee-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_qcomteetest_against_a_server_in_another_process(sockdir: Path, tmp_path: Path) -> None:
    """``qtee run --connect``: the program's device is a running server's."""
    peer = _peers.quic_teec()
    (tmp_path / peer.skeleton_ta.name).write_bytes(peer.skeleton_ta.read_bytes())
    server = Served(sockdir / "q.sock", "--ta-module", "peer_tas")
    try:
        connect = ("--connect", str(server.sock))
        for args in (["-d"], ["-l", str(tmp_path), "0", "0"], ["-l", str(tmp_path), "1", "0"]):
            run = qtee_run(peer.qcomteetest, *args, options=connect)
            assert run.returncode == 0, run
            assert "    SUCCESS." in run.stdout.splitlines(), run.stdout
            assert run.stderr.splitlines() == [
                f"qtee run: the device was the server's at {server.sock} (its tables are "
                "the server's: qtee serve prints them when it stops)"
            ]
    finally:
        assert server.stop() == "tables: empty"


def test_sigkill_of_a_c_supplicant_mid_callback_gives_defunct(
    sockdir: Path, tmp_path: Path
) -> None:
    """A libqcomtee supplicant (tests/c/cb_supplicant.c) in its own process parks a
    callback object in a Python TA; a Python client in this process calls it through
    the TA (echo), then calls the op that never returns and the supplicant is killed
    mid-callback: the TA's caller gets DEFUNCT (-90, qtee-kernel.md §4.5) and, once the
    client lets go, the server holds nothing."""
    import threading
    import time

    sys.path.insert(0, str(TESTS))
    try:
        import bridge_tas  # noqa: F401 - registers tests.park and tests.call here too
    finally:
        sys.path.remove(str(TESTS))
    import qtee
    from objects import QteeError
    from qtee import Result

    supplicant = _peers.compile_c([TESTS / "c" / "cb_supplicant.c"], against="libqcomtee")
    image = tmp_path / "park.img"
    image.write_bytes(qtee.ta_image("tests.park"))
    server = Served(sockdir / "q.sock", "--ta-module", "bridge_tas")
    sup = subprocess.Popen(
        [*_QTEE_RUN, "--connect", str(server.sock), "--", str(supplicant), str(image)],
        cwd=TESTS,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert sup.stdout is not None and sup.stdout.readline() == "PARKED\n"
        with qtee.Client(qtee.connect(server.sock), workers=1) as client:
            env = client.client_env()
            loader = client.open_service(env, 3)
            (ctrl,) = loader.invoke(0, qtee.ta_image("tests.call"), qtee.OUT_OBJECT)
            (app,) = ctrl.invoke(2, qtee.OUT_OBJECT)
            assert app.invoke(0, b"ping", qtee.Out(64)) == [b"echo:ping"]
            failed: list[BaseException] = []

            def stall() -> None:
                try:
                    app.invoke(1)
                except BaseException as exc:
                    failed.append(exc)

            caller = threading.Thread(target=stall)
            started = time.monotonic()
            caller.start()
            assert sup.stdout.readline() == "IN CALLBACK\n"
            program = _child_of(sup.pid)
            os.kill(program, signal.SIGKILL)
            caller.join(10)
            assert time.monotonic() - started < 10
            assert len(failed) == 1 and isinstance(failed[0], QteeError)
            assert failed[0].result == Result.ERROR_DEFUNCT
            assert sup.wait(10) == 128 + signal.SIGKILL
            app.invoke(2)  # the TA lets the dead object go
            for ref in (app, ctrl, loader, env):
                ref.release()
    finally:
        if sup.poll() is None:
            sup.kill()
        assert server.stop() == "tables: empty"


def _contexts(sock: Path) -> int:
    """Open fds of the server at ``sock`` (the asking one included)."""
    import qtee

    ctx = qtee.connect(sock).open()
    try:
        return len(ctx.info()["contexts"])
    finally:
        ctx.close()


def _eventually(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def _child_of(pid: int) -> int:
    """The one child of ``pid`` (qtee run's program)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def test_a_libteec_client_and_the_real_tee_supplicant_in_two_processes(
    sockdir: Path, tmp_path: Path
) -> None:
    """``qtee serve --tee optee``: the unmodified tee-supplicant on the privileged node
    serves LOAD_TA (the secure_storage TA from its ``<uuid>.ta`` under --ta-path) and
    the REE FS (the TA's objects appear under --fs-parent-path), while the unmodified
    secure_storage host runs in another process."""
    sys.path.insert(0, str(TESTS))
    try:
        import peer_tas
    finally:
        sys.path.remove(str(TESTS))
    client = _peers.optee_client()
    fs, tas = tmp_path / "fs", tmp_path / "tas"
    fs.mkdir()
    tas.mkdir()
    peer_tas.write_ta_files(tas)
    server = Served(sockdir / "o.sock", "--tee", "optee", "--ta-module", "peer_tas", "--introspect")
    connect = ["--connect", str(server.sock)]
    supp_args = ["--fs-parent-path", str(fs), "--ta-path", str(tas)]
    supp = subprocess.Popen(
        [*_QTEE_RUN, *connect, "--", str(client.tee_supplicant), *supp_args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert _eventually(lambda: _contexts(server.sock) >= 2)  # tee-supplicant's and ours
        run = qtee_run(
            _peers.optee_example("secure_storage"),
            options=tuple(connect),
            env=_examples_env(),
        )
        assert run.returncode == 0, run
        assert "- Object not found in TA secure storage, create it." in run.stdout
        assert "We're done, close and release TEE resources" in run.stdout
        kept = list((fs / str(peer_tas.SecureStorage.UUID)).iterdir())
        assert [p.name for p in kept] == [b"object#2".hex()]
    finally:
        supp.terminate()
        supp.wait(10)
        assert server.stop() == "tables: empty"


def test_no_snapshot_replaces_the_final_report(tmp_path: Path) -> None:
    """The snapshot thread may wake while ``report()`` releases the program's fds (which
    marks the tables changed): its write must not replace the final report, or ``qtee
    run`` says the program "ended without exit" (seen once in CI with a 10 s program)."""
    import json

    from qtee.bridge import BridgeConfig
    from qtee.bridge._runtime import Bridge

    bridge = Bridge(BridgeConfig(report_dir=str(tmp_path)))
    bridge.report()
    bridge._write_report(final=False)  # what a late snapshot does
    data = json.loads((tmp_path / f"{os.getpid()}.json").read_text())
    assert data["final"] is True and data["leaks"] == {}


def _children(pid: int) -> list[int]:
    """The pids of ``pid``'s children (Linux's /proc/PID/task/*/children)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found
