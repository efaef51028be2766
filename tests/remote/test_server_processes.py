"""The device server against real client processes (issue 6).

The server runs in the test process (so the plugin's leak check covers its device, and
the TAs registered here are the ones it loads); the clients are subprocesses running
``tests/_server_peer.py``, which only name the TAs they load.

* a supplicant process is killed with SIGKILL while 50 callbacks into it are in flight:
  every TA call waiting on it completes DEFUNCT (-90) within 2 s, other connections are
  served throughout, and the server's tables return to what they were before it came;
* many client processes invoke with callbacks concurrently, every answer is checked, and
  after they disconnect the server holds nothing and its memory is back to its baseline;
* a process sending garbage (random bytes, truncated and oversized frames) has each
  offending connection closed, while another client keeps invoking undisturbed.
"""

from __future__ import annotations

import gc
import logging
import os
import queue
import random
import signal
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import IO

import pytest

import qtee
from objects import QteeError
from qtee import OUT_OBJECT, DeviceServer, Out
from tests._paths import REPO, TESTS
from tests._tas import Caller, Echoer, Keeper, Through

PEER = TESTS / "_server_peer.py"
SOAK = os.environ.get("QTEE_SOAK") == "1"


# ---------------------------------------------------------------------------- TAs
KEEPER = pytest.mark.qtee_ta("procs.keeper", Keeper)
CALLER = pytest.mark.qtee_ta("procs.caller", Caller)
THROUGH = pytest.mark.qtee_ta("procs.through", Through)


# ---------------------------------------------------------------------------- helpers
def _eventually(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def _load(client: qtee.Client, name: str) -> tuple[qtee.ObjRef, ...]:
    env = client.client_env()
    loader = client.open_service(env, 3)
    (ctrl,) = loader.invoke(0, qtee.ta_image(name), OUT_OBJECT)
    (app,) = ctrl.invoke(2, OUT_OBJECT)
    return app, ctrl, loader, env


def _release(refs: tuple[qtee.ObjRef, ...]) -> None:
    for ref in refs:
        ref.release()


def _peer(*args: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(PEER), *(str(a) for a in args)],
        stdout=subprocess.PIPE,
        cwd=REPO,
    )


class _Lines:
    """A subprocess's stdout lines, read by a thread (so waits can time out)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.q: queue.Queue[str | None] = queue.Queue()
        assert proc.stdout is not None
        threading.Thread(target=self._read, args=(proc.stdout,), daemon=True).start()

    def _read(self, out: IO[bytes]) -> None:
        for line in out:
            self.q.put(line.decode().strip())
        self.q.put(None)

    def expect(self, want: str, count: int = 1, timeout: float = 20.0) -> list[str]:
        """Read until ``count`` lines equal to ``want``; the lines read, in order."""
        seen: list[str] = []
        end = time.monotonic() + timeout
        while sum(line == want for line in seen) < count:
            try:
                line = self.q.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"waiting for {count} x {want!r}; got {seen}") from None
            if line is None:
                raise AssertionError(f"peer ended while waiting for {want!r}; got {seen}")
            seen.append(line)
        return seen


def _add(app: qtee.ObjRef, a: int, b: int) -> int:
    (out,) = app.invoke(1, struct.pack("<II", a, b), Out(4))
    return int(struct.unpack("<I", out)[0])


# ---------------------------------------------------------------------------- kill -9
IN_FLIGHT = 50


@KEEPER
@CALLER
@THROUGH
def test_kill_9_supplicant(qtee_server: DeviceServer) -> None:
    """Kill -9 of a supplicant process while 50 callbacks into it are in flight: every
    waiting TA call completes with DEFUNCT (-90) within 2 s, the server keeps serving the
    other connections, and its tables return to their pre-test state (issue 6)."""
    caller = qtee.Client(qtee.connect(qtee_server.path), workers=1)
    other = qtee.Client(qtee.connect(qtee_server.path), workers=1)
    peer: subprocess.Popen[bytes] | None = None
    try:
        refs = _load(caller, "procs.caller")
        orefs = _load(other, "procs.through")
        before = qtee_server.device.leaks()
        conns = qtee_server.connections
        assert conns == 2

        # The supplicant: 50 workers, its blocking object kept by QTEE.
        peer = _peer("supplicant", qtee_server.path, "procs.keeper", IN_FLIGHT)
        lines = _Lines(peer)
        lines.expect("READY")
        assert Keeper.kept is not None and qtee_server.connections == conns + 1

        outcome: list[tuple[BaseException | None, float]] = []
        lock = threading.Lock()

        def call() -> None:
            try:
                refs[0].invoke(0)
                exc: BaseException | None = None
            except BaseException as e:
                exc = e
            with lock:
                outcome.append((exc, time.monotonic()))

        threads = [threading.Thread(target=call, daemon=True) for _ in range(IN_FLIGHT)]
        for t in threads:
            t.start()
        lines.expect("ENTER", IN_FLIGHT)  # every callback is inside the handler
        assert not outcome
        assert _add(orefs[0], 40, 2) == 42  # others are served while 50 calls block

        t0 = time.monotonic()
        os.kill(peer.pid, signal.SIGKILL)
        for t in threads:
            t.join(max(0.0, t0 + 2.0 - time.monotonic()))
        late = sum(t.is_alive() for t in threads)
        assert late == 0, f"{late} of {IN_FLIGHT} TA calls still waiting 2 s after the kill"
        assert peer.wait(5) == -signal.SIGKILL
        assert len(outcome) == IN_FLIGHT
        worst = max(when for _, when in outcome) - t0
        assert worst < 2.0
        results = [exc.result if isinstance(exc, QteeError) else exc for exc, _ in outcome]
        assert results == [qtee.Result.ERROR_DEFUNCT] * IN_FLIGHT
        assert int(qtee.Result.ERROR_DEFUNCT) == -90

        # The server goes on: the other client is served, new connections are accepted.
        assert _add(orefs[0], 1, 2) == 3
        echo = Echoer(b"test")
        assert orefs[0].invoke(0, b"abc", echo, Out(64)) == [b"testcba"]
        with qtee.Client(qtee.connect(qtee_server.path), workers=1) as late_client:
            # The dead process's controller was released with its fd: Keeper is unloaded.
            _release(_load(late_client, "procs.keeper"))

        refs[0].invoke(1)  # QTEE drops the reference it kept to the dead process's object
        assert _eventually(lambda: qtee_server.connections == conns)
        assert _eventually(lambda: qtee_server.device.leaks() == before), (
            qtee_server.device.leaks(),
            before,
        )
        _release(refs)
        _release(orefs)
    finally:
        if peer is not None and peer.poll() is None:
            peer.kill()
            peer.wait(5)
        Keeper.kept = None
        caller.close()
        other.close()
    assert _eventually(lambda: qtee_server.connections == 0)
    assert qtee_server.device.leaks() == {}


# ---------------------------------------------------------------------------- many clients
if SOAK:
    PROCS, INVOKES = 32, 500
else:
    PROCS, INVOKES = 8, 50
#: Traced bytes the server may keep after all clients are gone: tables that grew with the
#: peak number of connections and threads (dicts and sets do not shrink), and the last
#: connection, which the accept loop's frame still names.  A per-invoke leak of 100 bytes
#: would exceed it (measured: 15-25 KB for 8 processes, ~30 KB for 32).
MEMORY_SLACK = 64 * 1024 + 2 * 1024 * PROCS


def _run_echo_peers(path: str, procs: int, invokes: int, timeout: float) -> list[str]:
    peers = [_peer("echo", path, f"procs.through.{k}", invokes, k) for k in range(procs)]
    problems: list[str] = []
    end = time.monotonic() + timeout
    for k, p in enumerate(peers):
        try:
            out, _ = p.communicate(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            problems.append(f"peer {k}: timed out; said {out.decode()!r}")
            continue
        if p.returncode != 0 or out.decode().split() != ["OK", str(invokes)]:
            problems.append(f"peer {k}: exit {p.returncode}, said {out.decode()!r}")
    return problems


@pytest.fixture
def through_per_process() -> Iterator[None]:
    """``procs.through.<k>`` for each peer (a TA is loaded once per world at a time)."""
    names = [f"procs.through.{k}" for k in range(max(PROCS, 2))]
    for name in names:
        qtee.register_ta(name, Through)
    try:
        yield
    finally:
        for name in names:
            qtee.secure.unregister_ta(name)


@pytest.mark.slow
@pytest.mark.timeout(900 if SOAK else 300)
@pytest.mark.usefixtures("through_per_process")
def test_many_client_processes(qtee_server: DeviceServer) -> None:
    """Concurrent client processes x invokes with callbacks against one server: every
    answer correct (checked in each process), and after they disconnect the server holds
    nothing and its traced memory is back to the baseline (issue 6).

    The issue's 32 processes x 500 invokes takes minutes on a small machine, so it runs
    with ``QTEE_SOAK=1`` (``make soak``); otherwise 8 processes x 50 invokes.
    """
    # Warm-up: first-use allocations (imports, caches, thread-local slots) are not growth.
    assert _run_echo_peers(qtee_server.path, 2, 5, 60) == []
    assert _eventually(lambda: qtee_server.connections == 0)
    assert qtee_server.device.leaks() == {}

    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        gc.collect()
        base = tracemalloc.get_traced_memory()[0]
        t0 = time.monotonic()
        problems = _run_echo_peers(qtee_server.path, PROCS, INVOKES, 600 if SOAK else 120)
        elapsed = time.monotonic() - t0
        assert problems == []
        assert _eventually(lambda: qtee_server.connections == 0)
        assert qtee_server.device.leaks() == {}
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        if started:
            tracemalloc.stop()
    logging.getLogger(__name__).info(
        "%d x %d invokes in %.1f s, traced memory %+d B", PROCS, INVOKES, elapsed, grown
    )
    assert grown < MEMORY_SLACK, f"server memory grew by {grown} B after the clients left"


# ---------------------------------------------------------------------------- garbage
@THROUGH
def test_garbage_process(qtee_server: DeviceServer, caplog: pytest.LogCaptureFixture) -> None:
    """A process sending random bytes, truncated and oversized frames: each offending
    connection is closed (with a Bye when the frame is refused), the server stays up,
    and another client invoking all along sees only right answers (issue 6)."""
    good = qtee.Client(qtee.connect(qtee_server.path), workers=2)
    stop = threading.Event()
    done: list[int] = []
    errors: list[BaseException] = []
    try:
        refs = _load(good, "procs.through")
        echo = Echoer(b"test")

        def invoke_forever() -> None:
            rng = random.Random(6)
            try:
                while not stop.is_set():
                    a, b = rng.getrandbits(31), rng.getrandbits(31)
                    assert _add(refs[0], a, b) == a + b
                    data = rng.randbytes(rng.randint(0, 300))
                    assert refs[0].invoke(0, data, echo, Out(400)) == [b"test" + data[::-1]]
                    done.append(1)
            except BaseException as exc:
                errors.append(exc)

        worker = threading.Thread(target=invoke_forever, daemon=True)
        worker.start()
        with caplog.at_level(logging.WARNING, logger="qtee.server"):
            peer = _peer("garbage", qtee_server.path, 6)
            lines = _Lines(peer)
            said = lines.expect("DONE", timeout=60)
            assert peer.wait(10) == 0, said
            during = len(done)
        cases = {c[1]: c[2:] for c in (line.split() for line in said) if c[0] == "CASE"}
        assert len(cases) >= 30
        assert {name: c for name, c in cases.items() if c[0] != "closed"} == {}
        for name, (_, how) in cases.items():
            if name.startswith(("truncated", "length-only")):  # EOF mid-frame: just closed
                assert how == "truncated:eof", name
            elif not name.startswith("random"):  # refused at once, before any EOF
                assert how in ("refused:bye", "refused:reset"), name
        assert sum(how == "refused:bye" for _, how in cases.values()) >= 10
        refused = [r for r in caplog.records if "bad frame" in r.getMessage()]
        assert len(refused) >= 10

        time.sleep(0.2)
        stop.set()
        worker.join(10)
        assert not worker.is_alive()
        assert errors == []
        assert during > 0 and len(done) > during  # invoked while the garbage came, and after
        assert _eventually(lambda: qtee_server.connections == 1)  # only the good client is left
        with qtee.Client(qtee.connect(qtee_server.path), workers=1) as fresh:
            fresh.client_env().release()  # and the server still accepts
        _release(refs)
        assert _eventually(lambda: good.exported() == 0)
    finally:
        stop.set()
        good.close()
    assert _eventually(lambda: qtee_server.connections == 0)
    assert qtee_server.device.leaks() == {}
