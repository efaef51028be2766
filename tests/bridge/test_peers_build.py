"""The C peers build from their unmodified archives, and what they build is real.

``tests/_peers.py`` unpacks and builds quic-teec, optee_client and optee_examples under
``build/peers/`` once; these tests prove each binary runs far enough to be the real
program (its usage text, or libteec/libqcomtee failing to open a device that is not
there), with timeouts so nothing can hang, and that the cache, the lock and the
skip-or-fail rule behave.  Nothing here needs qtee's bridge: the programs run bare.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests import _peers

TIMEOUT = 20  # seconds for one peer program: none of them should take more than a blink
NO_TEE = not any(Path(f"/dev/{n}{i}").exists() for n in ("tee", "teepriv") for i in range(16))
needs_no_tee = pytest.mark.skipif(not NO_TEE, reason="a real TEE device exists here")


def run(argv: Sequence[str | Path], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a peer program bare (no LD_PRELOAD), stdin closed, in ``cwd``, with a timeout."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    return subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


# -- finding the peers: skip, or fail in CI ----------------------------------------------


def test_peers_source_follows_qtee_peers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QTEE_PEERS", str(tmp_path))
    assert _peers.peers_source() == tmp_path.resolve()
    monkeypatch.setenv("QTEE_PEERS", str(tmp_path / "absent"))
    assert _peers.peers_source() is None


def test_absent_peers_skip_with_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QTEE_PEERS", str(tmp_path / "absent"))
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("QTEE_REQUIRE_PEERS", raising=False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        _peers.require_peers()
    message = str(skipped.value)
    assert message == f"peer sources not found at {tmp_path / 'absent'}; set QTEE_PEERS"
    assert "\n" not in message


@pytest.mark.parametrize("env", [("CI", "true"), ("CI", "1"), ("QTEE_REQUIRE_PEERS", "1")])
def test_absent_peers_fail_in_ci(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: tuple[str, str]
) -> None:
    monkeypatch.setenv("QTEE_PEERS", str(tmp_path / "absent"))
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("QTEE_REQUIRE_PEERS", raising=False)
    monkeypatch.setenv(*env)
    with pytest.raises(
        pytest.fail.Exception, match=r"peer sources not found at .*; set QTEE_PEERS"
    ):
        _peers.require_peers()


def test_missing_tool_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("QTEE_REQUIRE_PEERS", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"^no-such-cmake not found on PATH"):
        _peers.tool("no-such-cmake")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"^no-such-cmake not found on PATH"):
        _peers.tool("no-such-cmake")


def test_missing_libcbor_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("QTEE_REQUIRE_PEERS", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"apt-get install libcbor-dev$"):
        _peers._require_libcbor("false")  # a "compiler" that finds no header


# -- the cache: once per key, under a lock, atomically ------------------------------------


def test_cached_build_runs_once_per_key(tmp_path: Path) -> None:
    calls: list[Path] = []

    def build(tmp: Path, final: Path, log: object) -> None:
        calls.append(tmp)
        assert tmp.parent == final.parent and tmp != final
        (tmp / "out").write_text("one")

    first = _peers.cached_build(tmp_path, "peer", "k1", build)
    assert first == tmp_path / "peer" and (first / "out").read_text() == "one"
    assert _peers.cached_build(tmp_path, "peer", "k1", build) == first
    assert len(calls) == 1
    _peers.cached_build(tmp_path, "peer", "k2", build)  # new key: rebuilt, replaced
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".peer.lock", "peer", "peer.log"]


def test_cached_build_failure_carries_the_log_tail(tmp_path: Path) -> None:
    def build(tmp: Path, final: Path, log: object) -> None:
        assert hasattr(log, "write")
        for i in range(100):
            log.write(f"line {i}\n")
        raise subprocess.CalledProcessError(2, ["make"])

    with pytest.raises(_peers.PeerBuildError) as failed:
        _peers.cached_build(tmp_path, "peer", "k", build)
    message = str(failed.value)
    assert str(tmp_path / "peer.log") in message
    assert "line 99" in message and "line 70" in message and "line 69" not in message
    assert not (tmp_path / "peer").exists()
    assert not list(tmp_path.glob(".peer.tmp-*"))  # the half-built tree is gone


def test_a_skip_inside_a_build_leaves_nothing_half_built(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("QTEE_REQUIRE_PEERS", raising=False)

    def build(tmp: Path, final: Path, log: object) -> None:
        (tmp / "half").write_text("")
        _peers.tool("no-such-cmake")

    with pytest.raises(pytest.skip.Exception):
        _peers.cached_build(tmp_path, "peer", "k", build)
    assert not (tmp_path / "peer").exists() and not list(tmp_path.glob(".peer.tmp-*"))


def test_cached_build_lock_makes_concurrent_callers_wait(tmp_path: Path) -> None:
    calls = 0

    def build(tmp: Path, final: Path, log: object) -> None:
        nonlocal calls
        calls += 1
        time.sleep(0.3)
        (tmp / "out").write_text("done")

    # flock locks belong to the open file, so threads exclude each other like processes.
    results: list[Path] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(_peers.cached_build(tmp_path, "p", "k", build))
        )
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert calls == 1
    assert len(results) == 4 and all((r / "out").read_text() == "done" for r in results)


# -- the peers build and run -------------------------------------------------------------


@pytest.mark.slow  # the first run builds quic-teec (cmake), about a second
def test_quic_teec_builds_and_qcomteetest_is_real(tmp_path: Path) -> None:
    peer = _peers.quic_teec()
    assert sorted(p.name for p in peer.lib_dir.glob("libqcomtee.so*")) == [
        "libqcomtee.so",
        "libqcomtee.so.0",
        "libqcomtee.so.0.1.0",
    ]
    assert executable(peer.qcomteetest)
    assert peer.skeleton_ta.name == "smcinvoke_skeleton_ta64.mbn"
    assert peer.skeleton_ta.stat().st_size > 0
    assert (peer.include_dirs[0] / "qcomtee_object_types.h").is_file()
    assert "TEE_IOC_OBJECT_INVOKE" in (peer.include_dirs[1] / "linux" / "tee.h").read_text()
    for args in (["-h"], []):
        usage = run([peer.qcomteetest, *args], tmp_path)
        assert usage.returncode == 1
        assert usage.stdout.startswith(f"Usage: {peer.qcomteetest} [OPTION][ARGS]")
        assert "-l <path to TA binary> <buffer vs. memory object> <command>" in usage.stdout


@needs_no_tee
def test_qcomteetest_without_a_tee_fails_to_open_it(tmp_path: Path) -> None:
    peer = _peers.quic_teec()
    diag = run([peer.qcomteetest, "-d"], tmp_path)
    # libqcomtee's perror of open("/dev/tee0"), then the test's own message.
    assert "qcomtee_object_root_init: No such file or directory" in diag.stderr + diag.stdout
    assert "Unable to initialize the root object" in diag.stdout


@pytest.mark.slow  # the first run builds optee_client (cmake), about two seconds
def test_optee_client_builds_and_tee_supplicant_is_real(tmp_path: Path) -> None:
    client = _peers.optee_client()
    assert {p.name for p in client.lib_dir.glob("libteec.so*")} == {
        "libteec.so",
        "libteec.so.2",
        "libteec.so.2.0.0",
    }
    assert executable(client.tee_supplicant)
    assert (client.include_dirs[0] / "tee_client_api.h").is_file()
    helped = run([client.tee_supplicant, "--help"], tmp_path)
    assert helped.returncode == 0
    assert helped.stderr.startswith("Usage: tee-supplicant [options] [<device-name>]")
    assert "--fs-parent-path" in helped.stderr and "--ta-path" in helped.stderr


@needs_no_tee
def test_tee_supplicant_without_a_tee_exits(tmp_path: Path) -> None:
    bare = run([_peers.optee_client().tee_supplicant], tmp_path)
    assert bare.returncode == 1
    assert "TSUP:main:" in bare.stdout  # its ERR lines go to stdout
    assert "failed to find an OP-TEE supplicant device" in bare.stdout


# Arguments that get each host program past its own usage check to TEEC_InitializeContext.
HOST_ARGS = {"acipher": ["2048", "text"], "sha": ["text"]}


@pytest.mark.slow  # the first run builds optee_client and the examples' hosts
def test_optee_examples_build(tmp_path: Path) -> None:
    examples = _peers.optee_examples()
    assert set(_peers.EXAMPLES) <= set(examples.names)
    for name in examples.names:
        assert executable(examples.host(name)), name
    assert (examples.ta_include("hello_world") / "hello_world_ta.h").is_file()
    with pytest.raises(ValueError, match="no optee_examples host 'nope'"):
        examples.host("nope")


@needs_no_tee
@pytest.mark.parametrize("name", ["hello_world", "random", "secure_storage", "aes", "hotp"])
def test_optee_example_without_a_tee_gets_libteecs_error(name: str, tmp_path: Path) -> None:
    host = _peers.optee_example(name)
    assert executable(host)
    ran = run([host, *HOST_ARGS.get(name, [])], tmp_path)
    assert ran.returncode != 0
    # TEEC_ERROR_ITEM_NOT_FOUND: libteec probed /dev/tee0..15 and found none.
    assert f"optee_example_{name}: TEEC_InitializeContext failed" in ran.stderr
    assert "0xffff0008" in ran.stderr


@needs_no_tee
def test_every_example_host_reaches_libteec(tmp_path: Path) -> None:
    examples = _peers.optee_examples()
    for name in examples.names:
        ran = run([examples.host(name), *HOST_ARGS.get(name, [])], tmp_path)
        assert ran.returncode != 0, name
        assert re.match(rf"optee_example_{name}: TEEC_InitializeContext.*0xffff0008", ran.stderr)


def test_a_cached_rerun_is_cheap() -> None:
    _peers.quic_teec(), _peers.optee_client(), _peers.optee_examples()  # built (or skipped)
    for built in (_peers.quic_teec, _peers.optee_client, _peers.optee_examples):
        built.cache_clear()
    started = time.monotonic()
    _peers.quic_teec(), _peers.optee_client(), _peers.optee_examples()
    assert time.monotonic() - started < 0.5


# -- the project's own C against the built libraries -------------------------------------

QCOMTEE_PROBE = r"""
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/tee.h>
#include <qcomtee_object_types.h>

#ifndef TEE_IOC_OBJECT_INVOKE
#error "not quic-teec's <linux/tee.h>"
#endif

int main(int argc, char *argv[])
{
    struct qcomtee_object *root;

    (void)argc;
    root = qcomtee_object_root_init(argv[1], ioctl, NULL, NULL);
    printf("root=%s errno=%s\n", root == QCOMTEE_OBJECT_NULL ? "NULL" : "obj",
           strerror(errno));
    return root == QCOMTEE_OBJECT_NULL ? 3 : 0;
}
"""

TEEC_PROBE = r"""
#include <stdio.h>
#include <tee_client_api.h>

int main(void)
{
    TEEC_Context ctx;
    TEEC_Result res = TEEC_InitializeContext(NULL, &ctx);

    printf("TEEC_InitializeContext: 0x%x\n", res);
    if (res == TEEC_SUCCESS)
        TEEC_FinalizeContext(&ctx);
    return res == TEEC_SUCCESS ? 0 : 3;
}
"""


def test_compile_c_against_libqcomtee(tmp_path: Path) -> None:
    source = tmp_path / "probe.c"
    source.write_text(QCOMTEE_PROBE)
    probe = _peers.compile_c([source], tmp_path / "bin" / "probe", against="libqcomtee")
    assert probe == tmp_path / "bin" / "probe" and executable(probe)
    ran = run([probe, tmp_path / "no-such-tee"], tmp_path)
    assert ran.returncode == 3
    # libqcomtee reports the failed open on stdout itself, then the probe's own line.
    assert ran.stdout == (
        "qcomtee_object_root_init: No such file or directory\n"
        "root=NULL errno=No such file or directory\n"
    )


@needs_no_tee
def test_compile_c_against_libteec(tmp_path: Path) -> None:
    source = tmp_path / "probe.c"
    source.write_text(TEEC_PROBE)
    probe = _peers.compile_c([source], tmp_path / "probe", against="libteec")
    ran = run([probe], tmp_path)
    assert (ran.returncode, ran.stdout) == (3, "TEEC_InitializeContext: 0xffff0008\n")


def test_compile_c_caches_by_content(tmp_path: Path) -> None:
    header = tmp_path / "answer.h"
    header.write_text("#define ANSWER 42\n")
    source = tmp_path / "answer.c"
    source.write_text('#include <stdio.h>\n#include "answer.h"\n'
                      'int main(void) { printf("%d\\n", ANSWER); return 0; }\n')  # fmt: skip
    cached = _peers.compile_c([source, header], None, against="libteec")
    again = _peers.compile_c([source, header], tmp_path / "copy", against="libteec")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for f in (source, header):
        (elsewhere / f.name).write_text(f.read_text())
    moved = _peers.compile_c(
        [elsewhere / "answer.c", elsewhere / "answer.h"], None, against="libteec"
    )
    assert moved == cached  # the same names and contents, found in the cache
    assert run([again], tmp_path).stdout == "42\n"
    header.write_text("#define ANSWER 43\n")  # a header edit is a new key
    assert run([_peers.compile_c([source, header], None, against="libteec")], tmp_path).stdout == (
        "43\n"
    )
