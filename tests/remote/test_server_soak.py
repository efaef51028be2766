"""The server soak (issue 13): hostile connections beside well-behaved clients.

A ``qtee serve --introspect`` process serves the TAs of ``tests/_soak_tas.py``.  A
``tests/_server_peer.py hostile`` process keeps ``HOSTILE`` hostile connections open at
once (SUPPL_RECV floods past the server's limit, partial frames, hang-ups mid-call in a
TA, in a callback and while loading, failing SHM_ALLOCs and a shm never freed), while
``GOOD`` clients in this process invoke with callbacks, add, and allocate shared memory.

Invariants: every call of a good client completes with the right answer; the server's
threads and fds (``/proc/<pid>/task``, ``/proc/<pid>/fd``, sampled every 50 ms) stay
under a bound set by its per-connection limits and come back to their idle figures once
the clients are gone; its tables are empty at the end (``qtee info --connect`` sees only
itself, and the server prints ``tables: empty`` when it stops); and it logged no
traceback.  The figures are printed.

``QTEE_SOAK=1`` (``make soak``): 64 hostile connections and 8 good clients for 60 s;
otherwise 8 and 2 for 4 s.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import qtee
from qtee import OUT_OBJECT, Out
from qtee._remote.server import THREAD_LIMIT
from tests._paths import REPO, TESTS
from tests._tas import Echoer

PEER = TESTS / "_server_peer.py"
SOAK = os.environ.get("QTEE_SOAK") == "1"
HOSTILE, GOOD, SECONDS = (64, 8, 60.0) if SOAK else (8, 2, 4.0)


class _Sampler:
    """Threads and fds of process ``pid`` every 50 ms: the peaks and the last figures."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_threads = self.peak_fds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> tuple[int, int]:
        threads = len(os.listdir(f"/proc/{self.pid}/task"))
        fds = len(os.listdir(f"/proc/{self.pid}/fd"))
        return threads, fds

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                threads, fds = self.now()
            except FileNotFoundError:  # a task or fd went between listdir and its entries
                continue
            self.peak_threads = max(self.peak_threads, threads)
            self.peak_fds = max(self.peak_fds, fds)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def served() -> Iterator[tuple[str, subprocess.Popen[str], Path]]:
    """``(socket path, the qtee serve process, its stderr file)``."""
    tmp = tempfile.mkdtemp(prefix="qtee-")
    path = os.path.join(tmp, "s")
    err = Path(tmp) / "server.err"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with err.open("w") as stderr:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "qtee",
                "serve",
                "--socket",
                path,
                "--introspect",
                "--ta-module",
                "tests._soak_tas",
            ],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
            cwd=REPO,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("serving on"), (line, err.read_text())
        yield path, proc, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


def _good(path: str, k: int, end: float, done: list[int], errors: list[str]) -> None:
    """Load ``soak.good.<k>``; until ``end``: add, echo through a callback, and every tenth
    round allocate, write and free shared memory; every answer checked."""
    rng = random.Random(k)
    tag = f"<{k}>".encode()
    calls = 0
    try:
        with qtee.Client(qtee.connect(path), workers=2) as client:
            env = client.client_env()
            loader = client.open_service(env, 3)
            (ctrl,) = loader.invoke(0, qtee.ta_image(f"soak.good.{k}"), OUT_OBJECT)
            (app,) = ctrl.invoke(2, OUT_OBJECT)
            calls += 4
            cb = Echoer(tag)
            rounds = 0
            while time.monotonic() < end:
                a, b = rng.getrandbits(31), rng.getrandbits(31)
                (out,) = app.invoke(1, struct.pack("<II", a, b), Out(4))
                assert struct.unpack("<I", out)[0] == (a + b) & 0xFFFF_FFFF
                data = rng.randbytes(rng.randint(0, 600))
                assert app.invoke(0, data, cb, Out(len(data) + 64)) == [tag + data[::-1]]
                calls += 2
                rounds += 1
                if rounds % 10 == 0:
                    mem = client.memory(4096)
                    mem.view[:4] = b"soak"
                    assert bytes(mem.view[:4]) == b"soak"
                    mem.view.release()
                    mem.release()
                    calls += 1
            for ref in (app, ctrl, loader, env):
                ref.release()
            calls += 4
            deadline = time.monotonic() + 10  # QTEE's releases of our objects come async
            while client.exported() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert client.exported() == 0, client.exported()
    except BaseException as exc:
        errors.append(f"good client {k} after {calls} calls: {type(exc).__name__}: {exc}")
    done.append(calls)


def _info(path: str) -> dict[str, object]:
    ctx = qtee.connect(path).open()
    try:
        return ctx.info()
    finally:
        ctx.close()


def _idle(path: str, timeout: float = 30.0) -> dict[str, object]:
    """The server's description once only the asking connection is open and nothing is
    held (or the last one seen, after ``timeout``)."""
    end = time.monotonic() + timeout
    while True:
        info = _info(path)
        if (len(info["contexts"]) == 1 and not info["tables"]) or time.monotonic() > end:  # type: ignore[arg-type]
            return info
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.timeout(600 if SOAK else 180)
def test_server_soak(
    served: tuple[str, subprocess.Popen[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path, proc, err = served
    sampler = _Sampler(proc.pid)
    idle_threads, idle_fds = sampler.now()
    with sampler:
        end = time.monotonic() + SECONDS
        hostile = subprocess.Popen(
            [sys.executable, str(PEER), "hostile", path, str(HOSTILE), str(SECONDS), "13"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,  # its supplicant workers' warnings as it hangs up
            text=True,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            cwd=REPO,
        )
        done: list[int] = []
        errors: list[str] = []
        good = [
            threading.Thread(target=_good, args=(path, k, end, done, errors), daemon=True)
            for k in range(GOOD)
        ]
        t0 = time.monotonic()
        for t in good:
            t.start()
        for t in good:
            t.join(SECONDS + 120)
        good_s = time.monotonic() - t0
        said, hostile_err = hostile.communicate(timeout=SECONDS + 120)
        info = _idle(path)
        settle = time.monotonic() + 10  # the last connections' threads are leaving
        while (after := sampler.now())[0] > idle_threads or after[1] > idle_fds:
            if time.monotonic() > settle:
                break
            time.sleep(0.05)
        after_threads, after_fds = after
    stopped = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    log = err.read_text()

    hostile_line = next((line for line in said.splitlines() if line.startswith("HOSTILE")), said)
    # One connection per hostile thread and good client at a time, plus the sampler's
    # `qtee info` ones: each has at most THREAD_LIMIT request threads (its receiver among
    # them; parked RECVs hold none) and a trace sender.
    conns = HOSTILE + GOOD + 1
    thread_bound = conns * (THREAD_LIMIT + 1) + 8
    fd_bound = idle_fds + conns * 4 + 16
    with capsys.disabled():
        print(
            f"\nserver soak ({SECONDS:.0f} s, {HOSTILE} hostile connections, {GOOD} good "
            f"clients): good calls completed {sum(done)} in {good_s:.1f} s; "
            f"server threads idle {idle_threads}, peak {sampler.peak_threads} "
            f"(bound {thread_bound}), after {after_threads}; fds idle {idle_fds}, peak "
            f"{sampler.peak_fds} (bound {fd_bound}), after {after_fds}; "
            f"tables at the end {info['tables'] or 'empty'}; "
            f"stopped in {time.monotonic() - stopped:.1f} s\n{hostile_line}"
        )
    assert errors == []
    assert len(done) == GOOD and all(n > 0 for n in done)
    assert hostile.returncode == 0, (said, hostile_err[-3000:])
    assert "unanswered=" not in hostile_line, hostile_line  # floods never wedged a reader
    assert sampler.peak_threads <= thread_bound
    assert sampler.peak_fds <= fd_bound
    # Idle again: no thread or fd left behind by any connection.
    assert after_threads <= idle_threads, (idle_threads, after_threads)
    assert after_fds <= idle_fds, (idle_fds, after_fds)
    assert len(info["contexts"]) == 1, info["contexts"]  # type: ignore[arg-type]
    assert info["tables"] == {}, info["tables"]
    assert "tables: empty" in out, out
    assert "Traceback" not in log and "Exception in thread" not in log, log[-3000:]
