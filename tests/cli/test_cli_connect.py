"""``qtee info``, ``qtee trace`` and ``qtee supplicant`` with ``--connect PATH``: the CLI as a
client of a device server started in the test (exact lines, exit codes, stderr lines).

The CLI runs in process (``main([...])``), in the main thread when it needs a clock or a
signal to end and in a thread when the test must act while it runs.  Socket paths come
from ``tempfile.mkdtemp`` (AF_UNIX paths are limited to 108 bytes; pytest's tmp_path is
often longer).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import pytest

import qtee
from objects import QteeError
from qtee import OUT_OBJECT, DeviceServer, Out, op
from qtee.__main__ import main
from qtee._cli import trace as _trace
from supplicant import time_msg
from tests._tas import Adder

ADDER = "cli.adder"
TIME_ASKER = "cli.time_asker"


class TimeAsker(qtee.TrustedApp):
    """Asks the time listener (0xB) for the UTC seconds, as a TA does (quic-teec.md §5.4)."""

    @op(0, ob=(None,))
    def utc(self) -> bytes:
        req = time_msg.encode_request(time_msg.GetUtcSecRequest())
        return self.world.listeners.get(0xB).request(req)[:64]


@pytest.fixture(autouse=True)
def _tas() -> Iterator[None]:
    qtee.register_ta(ADDER, Adder)
    qtee.register_ta(TIME_ASKER, TimeAsker)
    yield
    qtee.secure.unregister_ta(TIME_ASKER)
    qtee.secure.unregister_ta(ADDER)


@pytest.fixture
def sockdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="qtee-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def server(sockdir: str) -> Iterator[DeviceServer]:
    srv = DeviceServer(os.path.join(sockdir, "s"), introspect=True).start()
    try:
        yield srv
    finally:
        srv.stop()
    assert srv.connections == 0
    assert srv.device.leaks() == {}


def _eventually(cond: Callable[[], object], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


def _header() -> list[str]:
    return [
        f"version: {qtee.__version__}",
        "impl id: 4 (QTEE)",
        "impl caps: 0x0",
        "gen caps: 0x10 (OBJREF)",
    ]


def _fd(n: int, objects: int = 0, callbacks: int = 0, shms: int = 0) -> str:
    """The ``open fds:`` line of the ``n``-th connection of this process."""
    return (
        f"  conn-{n} (qtee pid {os.getpid()}): qtee objects {objects}, "
        f"callback objects {callbacks}, shms {shms}, requests 0"
    )


def _load(client: qtee.Client, name: str) -> list[qtee.ObjRef]:
    """env, loader, controller, app (release in reverse)."""
    env = client.client_env()
    loader = client.open_service(env, 3)  # IAppLoader
    (ctrl,) = loader.invoke(0, qtee.ta_image(name), OUT_OBJECT)
    (app,) = ctrl.invoke(2, OUT_OBJECT)
    return [env, loader, ctrl, app]


def _release(refs: list[qtee.ObjRef]) -> None:
    for ref in reversed(refs):
        ref.release()


class _InThread:
    """``main(argv)`` in a thread; ``rc`` once it returned."""

    def __init__(self, argv: list[str]) -> None:
        self.rc: int | None = None
        self.thread = threading.Thread(target=self._run, args=(argv,), daemon=True)
        self.thread.start()

    def _run(self, argv: list[str]) -> None:
        self.rc = main(argv)

    def join(self, timeout: float = 10.0) -> int | None:
        self.thread.join(timeout)
        assert not self.thread.is_alive()
        return self.rc


# --------------------------------------------------------------------------- info


def test_info_connect_on_an_idle_server(
    server: DeviceServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """TEE_IOC_VERSION of the served device: impl id 4, impl caps 0, gen caps OBJREF only
    (qtee-kernel.md §1.3); the info connection itself is the one open fd."""
    assert main(["info", "--connect", server.path]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines() == [
        *_header(),
        "loaded TAs: none",
        "live objects: none",
        "open fds:",
        _fd(1),
    ]
    assert out.err == ""


def test_info_connect_shows_what_a_client_holds(
    server: DeviceServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A client that loaded a TA: the TA is listed; its fd holds env, loader, controller
    and app (four QTEE objects in its IDR, qtee-kernel.md §2.2), the credentials callback
    object QTEE keeps (one NS id, §2.3) and one shm (a memory object, §2.2); each named in
    the fd's table (issue 15, objects visible)."""
    client = qtee.Client(qtee.connect(server.path), workers=1)
    refs = _load(client, ADDER)
    mem = client.memory(4096)
    try:
        assert refs[-1].invoke(0, struct.pack("<II", 40, 2), Out(4)) == [struct.pack("<I", 42)]
        assert main(["info", "--connect", server.path]) == 0
        lines = capsys.readouterr().out.splitlines()
    finally:
        mem.release()
        _release(refs)
        client.close()
    assert lines == [
        *_header(),
        f"loaded TAs: {ADDER}",
        "live objects:",
        "  secure objects: 4",
        "  ns ids: 1",
        "  shm ids: 1",
        "  physical regions: 1",
        "  context 0 objects: 4",  # contexts are numbered in the order of opening
        "open fds:",
        _fd(1, objects=4, callbacks=1, shms=1),
        "    kind            | id | what",
        "    ----------------+----+--------------------------------",
        "    QTEE object     |  0 | ClientEnv",
        "    QTEE object     |  1 | service 0x3 AppLoader",
        f"    QTEE object     |  2 | AppController of TA '{ADDER}'",
        f"    QTEE object     |  3 | TA '{ADDER}' (Adder)",
        "    callback object |  1 | ?",  # its class is the client's: not the server's to know
        "    memory object   |  1 | 4096 bytes",
        _fd(2),
    ]
    assert main(["info", "--connect", server.path]) == 0  # all released: nothing held
    assert capsys.readouterr().out.splitlines()[-4:] == [
        "loaded TAs: none",
        "live objects: none",
        "open fds:",
        _fd(3),
    ]


def test_info_in_process_and_connected_print_the_same_shape(
    server: DeviceServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both describe a device with qtee._cli.info: same lines, only the fds differ."""
    assert main(["info"]) == 0
    local = capsys.readouterr().out.splitlines()
    assert main(["info", "--connect", server.path]) == 0
    remote = capsys.readouterr().out.splitlines()
    assert local == [*remote[:-2], "open fds: none"]
    assert remote[-2:] == ["open fds:", _fd(1)]


def test_info_connect_malformed_description(
    server: DeviceServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A description without the fields format_info needs: exit 1, one line, no output."""
    import qtee._remote.server

    monkeypatch.setattr(qtee._remote.server, "describe", lambda device: {"version": "0"})
    assert main(["info", "--connect", server.path]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == (
        f"qtee info: the server at {server.path} sent a malformed description "
        "(KeyError 'gen_caps')\n"
    )


# --------------------------------------------------------------------------- trace


def _stop_the_cli(sig: signal.Signals = signal.SIGTERM) -> None:
    """Send ``sig`` to this process if the CLI (running in the main thread) handles it now;
    never when the default handler is back (it would stop the test run)."""
    handler = signal.getsignal(sig)
    if getattr(handler, "__module__", None) in ("qtee._cli.verbs", "supplicant._cli"):
        os.kill(os.getpid(), sig)


def _client_work(server: DeviceServer, errors: list[BaseException]) -> Callable[[], None]:
    """Once the server streams its trace: load the adder, add twice, release, close; then
    give the stream a moment and stop the CLI with SIGTERM (which it handles)."""

    def work() -> None:
        try:
            assert _eventually(lambda: server.device.trace_records is not None)
            with qtee.Client(qtee.connect(server.path), workers=1) as client:
                refs = _load(client, ADDER)
                try:
                    for a in (1, 40):
                        (got,) = refs[-1].invoke(0, struct.pack("<II", a, 2), Out(4))
                        assert got == struct.pack("<I", a + 2)
                finally:
                    _release(refs)
        except BaseException as exc:
            errors.append(exc)
        finally:
            time.sleep(0.3)  # the last crossings reach the CLI
            _stop_the_cli()

    return work


def _invoke_rows(rows: list[list[str]]) -> list[list[str]]:
    """The adder's op 0 (IB1 OB1), request and answer: direction, op, counts, result."""
    return [
        [*r[1:4], *r[5:]]
        for r in rows
        if r[1:4] in (["NS", "->", "QTEE"], ["QTEE", "->", "NS"])
        and r[5:10] == ["0", "1", "1", "0", "0"]
    ]


def test_trace_connect_record_then_replay(
    server: DeviceServer, sockdir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Crossings of another client, streamed while it works, saved as msgpack (until
    SIGTERM) and replayed: the root invoke for the client env (op 2, OO1: qtee-kernel.md
    §2.5) and both adds, request and answer."""
    path = os.path.join(sockdir, "live.trace")
    errors: list[BaseException] = []
    worker = threading.Thread(target=_client_work(server, errors))
    worker.start()
    try:
        rc = main(["trace", "--connect", server.path, "--record", path, "--duration", "30"])
    finally:
        worker.join(10)
    assert errors == [] and rc == 0
    n = len(_trace.load(path))
    assert capsys.readouterr().out.splitlines() == [f"recorded {n} crossings to {path}"]
    assert main(["trace", "--replay", path]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == [
        "time", "ms", "direction", "object", "op", "IB", "OB", "IO", "OO", "result"
    ]  # fmt: skip
    assert table[-1] == f"{n} crossings" and len(table) == n + 2
    rows = [line.split() for line in table[1:-1]]
    assert rows[0][1:] == ["NS", "->", "QTEE", "0x00000001", "2", "0", "0", "1", "1", "invoke"]
    assert (
        _invoke_rows(rows)
        == [
            ["NS", "->", "QTEE", "0", "1", "1", "0", "0", "invoke"],
            ["QTEE", "->", "NS", "0", "1", "1", "0", "0", "OK"],
        ]
        * 2
    )


def test_trace_connect_prints_rows_as_they_arrive(
    server: DeviceServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --record: the live table's header, one row per crossing, the count; SIGTERM
    ends it cleanly (exit 0)."""
    errors: list[BaseException] = []
    worker = threading.Thread(target=_client_work(server, errors))
    worker.start()
    try:
        rc = main(["trace", "--connect", server.path, "--duration", "30"])
    finally:
        worker.join(10)
    assert errors == [] and rc == 0
    out = capsys.readouterr()
    assert out.err == ""
    lines = out.out.splitlines()
    assert lines[0] == _trace.format_header()
    assert lines[0] == "   time ms  direction   object         op  IB  OB  IO  OO  result"
    n = len(lines) - 2
    assert lines[-1] == f"{n} crossings" and n > 6
    rows = [line.split() for line in lines[1:-1]]
    assert rows[0][:1] == ["0.000"]
    assert rows[0][1:] == ["NS", "->", "QTEE", "0x00000001", "2", "0", "0", "1", "1", "invoke"]
    assert len(_invoke_rows(rows)) == 4
    col = lines[0].index("result")  # every row's result starts under the header's
    assert all(line[col - 2 : col] == "  " and line[col] != " " for line in lines[1:-1])


def test_trace_connect_says_how_many_crossings_the_server_dropped(
    server: DeviceServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader that falls behind: the server keeps at most LIMIT crossings queued for it
    and drops the rest; once its queue drains the CLI says how many, on stderr, and goes
    on (exit 0).  The server's sender is held until 10 crossings were made, LIMIT is 2."""
    from qtee._remote.server import _TraceStream

    go = threading.Event()
    run = _TraceStream._run

    def held(stream: _TraceStream) -> None:
        assert go.wait(10)
        run(stream)

    monkeypatch.setattr(_TraceStream, "LIMIT", 2)
    monkeypatch.setattr(_TraceStream, "_run", held)
    made = [
        _trace.TraceRecord(float(n), "NS -> QTEE", 1, n, 0, 0, 0, 0, "invoke") for n in range(10)
    ]

    def burst() -> None:
        assert _eventually(lambda: server.device.trace_records is not None)
        hook = server.device.trace_records
        assert hook is not None
        for record in made:
            hook(record)
        go.set()

    t = threading.Thread(target=burst)
    t.start()
    try:
        rc = main(["trace", "--connect", server.path, "--duration", "2"])
    finally:
        go.set()
        t.join(10)
    assert rc == 0
    out = capsys.readouterr()
    assert out.err == "qtee trace: the server dropped 8 crossings (this reader fell behind)\n"
    lines = out.out.splitlines()
    assert lines[0] == _trace.format_header() and lines[-1] == "2 crossings"
    assert [line.split()[5] for line in lines[1:-1]] == ["0", "1"]  # the ops of the first two


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"dir": "sideways"}, "record 0: unknown direction 'sideways'"),
        ({"ib": -1}, "record 0: 'ib' is not a u32"),
    ],
)
def test_trace_connect_malformed_record_fails(
    fields: dict[str, object],
    why: str,
    server: DeviceServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A record from the server is checked as a trace file's is: a bad one ends the trace
    with exit 1 and one line."""
    good = _trace.TraceRecord(1.0, "NS -> QTEE", 1, 2, 0, 0, 1, 1, "invoke")

    def inject() -> None:
        assert _eventually(lambda: server.device.trace_records is not None)
        hook = server.device.trace_records
        assert hook is not None
        hook(_trace.TraceRecord(**{**_fields(good), **_renamed(fields)}))  # type: ignore[arg-type]

    t = threading.Thread(target=inject)
    t.start()
    try:
        rc = main(["trace", "--connect", server.path, "--duration", "10"])
    finally:
        t.join(10)
    assert rc == 1
    out = capsys.readouterr()
    assert out.err == f"qtee trace: the server at {server.path} sent a malformed {why}\n"
    assert out.out.splitlines() == [_trace.format_header(), "0 crossings"]


def _fields(r: _trace.TraceRecord) -> dict[str, object]:
    return {k: getattr(r, k) for k in r.__slots__}


def _renamed(fields: dict[str, object]) -> dict[str, object]:
    """Map keys (``dir``) -> TraceRecord fields (``direction``)."""
    return {
        {"dir": "direction", "t": "time", "what": "what"}.get(k, k): v for k, v in fields.items()
    }


def test_trace_connect_server_goes_away(
    server: DeviceServer, sockdir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The server stops while the trace is recorded: what came is saved, exit 1, one line."""
    path = os.path.join(sockdir, "cut.trace")

    def stop() -> None:
        assert _eventually(lambda: server.device.trace_records is not None)
        server.stop()

    t = threading.Thread(target=stop)
    t.start()
    try:
        rc = main(["trace", "--connect", server.path, "--record", path, "--duration", "10"])
    finally:
        t.join(10)
    assert rc == 1
    out = capsys.readouterr()
    assert out.out == f"recorded 0 crossings to {path}\n"
    assert out.err == f"qtee trace: lost the connection to the server at {server.path}\n"
    assert _trace.load(path) == []


def test_trace_connect_stops_on_sigint(server: DeviceServer) -> None:
    """SIGINT ends a live trace cleanly: the table's count line, exit 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "qtee", "trace", "--connect", server.path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert _eventually(lambda: server.device.trace_records is not None, timeout=20)
        with qtee.Client(qtee.connect(server.path), workers=1) as client:
            client.client_env().release()
        time.sleep(0.3)  # the stream's rows reach the trace process
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == _trace.format_header()
    # Root op 2 (client env) with its credentials callbacks (getLength, readAtOffset:
    # quic-teec.md §1.6), then, once the env is released, QTEE's async RELEASE of the
    # credentials object (qtee-kernel.md §3.5).
    assert [r.split()[1:] for r in lines[1:-1]] == [
        ["NS", "->", "QTEE", "0x00000001", "2", "0", "0", "1", "1", "invoke"],
        ["QTEE", "->", "NS", "0x80000001", "0", "0", "1", "0", "0", "callback"],
        ["NS", "->", "QTEE", "0x80000001", "0", "0", "1", "0", "0", "OK"],
        ["QTEE", "->", "NS", "0x80000001", "1", "1", "1", "0", "0", "callback"],
        ["NS", "->", "QTEE", "0x80000001", "1", "1", "1", "0", "0", "OK"],
        ["QTEE", "->", "NS", "0x00000001", "2", "0", "0", "1", "1", "OK"],
        ["QTEE", "->", "NS", "-", "-", "0", "0", "0", "0", "async", "RELEASE", "of", "0x80000001"],
    ]
    assert lines[-1] == "7 crossings"


# --------------------------------------------------------------------------- supplicant


def test_supplicant_connect_registers_the_time_listener_in_the_server(
    server: DeviceServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """The time listener (0xB, quic-teec.md §5.4) is registered in the server's QTEE while
    the supplicant runs and unregistered when it stops; no tables line (they are the
    server's)."""
    run = _InThread(["supplicant", "--connect", server.path, "--duration", "0.5"])
    assert _eventually(lambda: server.device.world.listeners.ids() == [0xB])
    assert run.join() == 0
    assert server.device.world.listeners.ids() == []
    out = capsys.readouterr()
    assert out.out.splitlines() == [
        "listeners registered: 0xb; TA autoload: off",
        "requests served: {'0xb': 0}",
    ]
    assert out.err == ""


def test_supplicant_connect_serves_a_tas_time_request(
    server: DeviceServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A TA in the server asks listener 0xB; the supplicant (this CLI) answers it through
    the socket: TimeSpecResponse with ret 0 (quic-teec.md §5.4), one request served; then
    SIGTERM stops the supplicant cleanly (exit 0)."""
    answers: list[object] = []

    def ask() -> None:
        try:
            assert _eventually(lambda: server.device.world.listeners.ids() == [0xB])
            with qtee.Client(qtee.connect(server.path), workers=1) as client:
                refs = _load(client, TIME_ASKER)
                try:
                    (raw,) = refs[-1].invoke(0, Out(64))
                finally:
                    _release(refs)
            answers.append(time_msg.decode_response(raw))
        except BaseException as exc:
            answers.append(exc)
        finally:
            _stop_the_cli()

    t = threading.Thread(target=ask)
    t.start()
    try:
        rc = main(["supplicant", "--connect", server.path, "--duration", "30"])
    finally:
        t.join(10)
    (answer,) = answers
    assert isinstance(answer, time_msg.TimeSpecResponse) and answer.ret == 0
    assert abs(answer.tv_sec - time.time()) < 60
    assert rc == 0
    assert server.device.world.listeners.ids() == []
    assert capsys.readouterr().out.splitlines() == [
        "listeners registered: 0xb; TA autoload: off",
        "requests served: {'0xb': 1}",
    ]


def test_supplicant_connect_server_goes_away(
    server: DeviceServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """The server stops under a running supplicant: its workers' SUPPL_RECV fail, and the
    supplicant exits 1 with one line."""
    run = _InThread(["supplicant", "--connect", server.path])
    assert _eventually(lambda: server.device.world.listeners.ids() == [0xB])
    server.stop()
    assert run.join() == 1
    out = capsys.readouterr()
    assert out.out.splitlines() == ["listeners registered: 0xb; TA autoload: off"]
    assert out.err == f"qtee supplicant: lost the connection to the server at {server.path}\n"
    # The server closed the supplicant's context, which released its QTEE objects: the
    # registration ended with them (issue 13 point 5).  Served again, a TA that calls the
    # listener finds none: DEFUNCT.
    assert _eventually(lambda: server.device.world.listeners.ids() == [])
    with DeviceServer(server.path, server.device) as again:
        with qtee.Client(qtee.connect(again.path), workers=1) as client:
            refs = _load(client, TIME_ASKER)
            try:
                with pytest.raises(QteeError) as exc:
                    refs[-1].invoke(0, Out(64))
            finally:
                _release(refs)
        assert exc.value.result == qtee.Result.ERROR_DEFUNCT
        assert server.device.world.listeners.ids() == []
        assert _eventually(lambda: again.connections == 0)


def test_supplicant_takes_a_connected_device(server: DeviceServer) -> None:
    """Supplicant accepts what qtee.Client accepts, and nothing else."""
    from supplicant import Supplicant

    with Supplicant(qtee.connect(server.path), workers=1) as sup:
        assert sorted(sup.listeners) == [0xB]
        assert server.device.world.listeners.ids() == [0xB]
    assert server.device.world.listeners.ids() == []
    with pytest.raises(TypeError, match=r"qtee\.Device or a connected device"):
        Supplicant(server.path)


# --------------------------------------------------------------------------- failures


def _stale_socket(sockdir: str) -> str:
    """A socket file nobody listens on (connect: ECONNREFUSED)."""
    path = os.path.join(sockdir, "stale")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()
    return path


@pytest.mark.parametrize("verb", ["info", "trace", "supplicant"])
@pytest.mark.parametrize(
    ("where", "why"),
    [
        ("missing", "no such socket (is `qtee serve` running there?)"),
        ("stale", "nothing listens on it (its server has gone)"),
    ],
)
def test_no_server_is_exit_1_with_one_line(
    verb: str, where: str, why: str, sockdir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _stale_socket(sockdir) if where == "stale" else os.path.join(sockdir, "none")
    assert main([verb, "--connect", path]) == 1
    out = capsys.readouterr()
    prefix = "cannot start: " if verb == "supplicant" else ""
    assert out.err == f"qtee {verb}: {prefix}cannot connect to {path}: {why}\n"
    assert out.out == ""


def test_a_peer_that_is_not_a_server_is_exit_1(
    sockdir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Something listens at PATH but closes instead of answering the hello."""
    path = os.path.join(sockdir, "mute")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()

    def hang_up() -> None:
        while not (conn := listener.accept()[0]).recv(1 << 16):
            conn.close()  # qtee.connect trying the path: closed unused
        conn.close()

    t = threading.Thread(target=hang_up)
    t.start()
    try:
        assert main(["info", "--connect", path]) == 1
    finally:
        t.join(5)
        listener.close()
    out = capsys.readouterr()
    assert out.err == f"qtee info: cannot connect to {path}: server closed the connection\n"
    assert out.out == ""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["info", "--connect", "P", "--demo"],
            "argument --demo: not allowed with argument --connect",
        ),
        (
            ["info", "--demo", "--connect", "P"],
            "argument --connect: not allowed with argument --demo",
        ),
        (
            ["trace", "--connect", "P", "--replay", "F"],
            "--connect cannot be combined with --replay",
        ),
        (["trace", "--connect", "P", "--demo"], "--connect cannot be combined with --demo"),
        (
            ["trace", "--connect", "P", "--demo", "--record", "F"],
            "--connect cannot be combined with --demo",
        ),
        (["trace", "--demo", "--duration", "1"], "--duration needs --connect"),
        (["trace", "--connect"], "argument --connect: expected one argument"),
        (
            ["supplicant", "--connect", "P", "--check"],
            "--check loads a TA in this process's secure world; it cannot be combined with "
            "--connect",
        ),
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: qtee {argv[0]} ")
    assert err.endswith(f"\nqtee {argv[0]}: error: {message}\n")


@pytest.mark.parametrize("verb", ["info", "trace", "supplicant"])
def test_help_documents_connect(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([verb, "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith(f"usage: qtee {verb}") and "--connect PATH" in out
    if verb == "supplicant":
        assert "the server owns the tables, so no tables line is printed" in out
    if verb == "trace":
        assert "--duration SECONDS with --connect: stop after this long" in out
