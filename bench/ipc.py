"""Round trips over the device server's socket, against bare msgpack ping-pongs of the
same frames, with the floor prototype of each (bench/_floors.py) beside it.

All processes run on the one CPU this bench pins itself to (children inherit the
affinity, so every round trip pays the same cross-process context switches):

* baselines: this process and an echo child (``ipc.py --echo FD``) joined by a
  ``socket.socketpair()``.  One thread on each side, blocking calls, no checks: this side
  packs a map shaped like an ``Ioctl`` frame (same keys, its 16-byte arg, its regions),
  writes it length-prefixed, reads the answer and unpacks it; the child unpacks the
  frame, packs an ``IoctlReply``-shaped map (its first region written back) and writes it.
  The null invoke's baseline is one such pair (the null invoke's frame); the callback's is
  the four pairs its exchange is made of (INVOKE, the worker's RECV, its SEND, its next RECV,
  which gets the RELEASE notification of the callback object; the RECV the worker posts
  after that waits into the next exchange and is not counted).
* floors: ``_floors.SocketFloor``, a child serving one socketpair with a lean codec (the
  frames' real encoding, read as plain maps), answering on its reading thread; here the
  caller reads its own reply and hands the worker its replies through a bare lock.  Each
  figure has a second floor, the driver floor (``SocketFloor(driver=True)``): the same,
  but its child runs the ioctls through qtee's own driver and secure world.
* qtee: ``python -m qtee serve`` in a child (the TA is ``bench/_ipc_tas.py``), and here a
  ``Client(qtee.connect(path), workers=1)``: a null invoke, and an invoke with one callback
  run by the client's one worker.
* the same null invoke with 32 more connections open and idle (each a context on the
  server, each with a reader thread on both sides), against the same invoke without them,
  the runs alternated (the 32 opened before each run with them, closed after it).  Its
  floor: the floor's null invoke with 32 idle socketpairs here, a thread blocked on each end.

Run ``python bench/ipc.py`` from anywhere; the server child runs from the repository root
so that ``bench._ipc_tas`` imports.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

# bench/supplicant.py shares its name with the supplicant package: bench/ goes last.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
import supplicant  # noqa: F401 - the package is cached before bench/ can shadow it

sys.path.append(str(_HERE))

import _floors
import msgpack
from _timing import alternated_ops_per_sec, pin_to_one_cpu, report, rotated_ops_per_sec

import qtee
from qtee import OUT_OBJECT, CallbackObject, op, uapi
from qtee._remote.frames import PROTOCOL_VERSION

_ROOT = _HERE.parent
_TA_MODULE = "bench._ipc_tas"
_TA_NAME = "bench.ipc"  # bench/_ipc_tas.py registers its TA under this name
_LEN = struct.Struct(">I")
IDLE = 32


class Nop(CallbackObject):
    @op(0)
    def nop(self) -> None:
        return None


# --------------------------------------------------------------------------- baseline


def _region(addr: int, size: int) -> dict[str, object]:
    return {"addr": addr, "data": bytes(size), "writable": True}


def _request(seq: int, cmd: int, regions: list[dict[str, object]]) -> dict[str, object]:
    """The shape of an ``Ioctl`` frame (a null invoke's is 113 bytes on the wire)."""
    return {
        "v": PROTOCOL_VERSION,
        "t": "ioctl",
        "seq": seq,
        "cmd": cmd,
        "arg": bytes(16),
        "regions": regions,
    }


def _reply(seq: int, written: list[object]) -> dict[str, object]:
    """The shape of an ``IoctlReply`` (a null invoke's is 111 bytes on the wire)."""
    return {
        "v": PROTOCOL_VERSION,
        "t": "reply",
        "seq": seq,
        "errno": 0,
        "arg": bytes(16),
        "written": written,
    }


_BLOCK = 0x7F00_0000_1000
#: (cmd, regions) of each frame: a null invoke's; then the four of an invoke + 1 callback.
_NULL = (uapi.TEE_IOC_OBJECT_INVOKE, [_region(_BLOCK, 24)])
_EXCHANGE = (
    (uapi.TEE_IOC_OBJECT_INVOKE, [_region(_BLOCK, 24 + 32)]),
    (uapi.TEE_IOC_SUPPL_RECV, [_region(_BLOCK, 8 + 32 * 11), _region(_BLOCK + 4096, 4096)]),
    (uapi.TEE_IOC_SUPPL_SEND, [_region(_BLOCK, 8 + 32)]),
    (uapi.TEE_IOC_SUPPL_RECV, [_region(_BLOCK, 8 + 32 * 11), _region(_BLOCK + 4096, 4096)]),
)


def _frame(obj: object) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return _LEN.pack(len(body)) + body


def _read_frame(sock: socket.socket) -> object | None:
    """One length-prefixed msgpack value; ``None`` at end of stream."""
    data = sock.recv(1 << 16)
    if not data:
        return None
    while len(data) < 4 or len(data) < 4 + _LEN.unpack_from(data)[0]:
        more = sock.recv(1 << 16)
        if not more:
            return None
        data += more
    return msgpack.unpackb(memoryview(data)[4:], raw=False)


def _echo(fd: int) -> None:
    """The baselines' child: answer each request map with a reply map, until EOF."""
    sock = socket.socket(fileno=fd)
    while (msg := _read_frame(sock)) is not None:
        assert isinstance(msg, dict)
        sock.sendall(_frame(_reply(msg["seq"], msg["regions"][:1])))


class PingPong:
    """The baselines: msgpack request/reply pairs with the echo child."""

    def __init__(self) -> None:
        self.here, there = socket.socketpair()
        self.child = subprocess.Popen(
            [sys.executable, __file__, "--echo", str(there.fileno())], pass_fds=[there.fileno()]
        )
        there.close()
        self.seq = 0

    def __enter__(self) -> PingPong:
        self.null()  # the child has started and answers
        return self

    def __exit__(self, *exc: object) -> None:
        self.here.close()
        self.child.wait(10)

    def _pair(self, cmd: int, regions: list[dict[str, object]]) -> None:
        self.seq += 1
        self.here.sendall(_frame(_request(self.seq, cmd, regions)))
        msg = _read_frame(self.here)
        assert isinstance(msg, dict)

    def null(self) -> None:
        self._pair(*_NULL)

    def exchange(self) -> None:
        for cmd, regions in _EXCHANGE:
            self._pair(cmd, regions)


class IdlePairs:
    """The idle floor's state: ``n`` socketpairs, a thread blocked reading each end."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.socks: list[socket.socket] = []
        self.threads: list[threading.Thread] = []

    def open(self) -> None:
        for _ in range(self.n):
            for sock in socket.socketpair():
                self.socks.append(sock)
                t = threading.Thread(target=sock.recv, args=(1,), daemon=True)
                t.start()
                self.threads.append(t)

    def close(self) -> None:
        for sock in self.socks:
            sock.shutdown(socket.SHUT_RDWR)
        for t in self.threads:
            t.join(10)
        for sock in self.socks:
            sock.close()
        self.socks.clear()
        self.threads.clear()


# --------------------------------------------------------------------------- server


def _start_server(path: str) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "qtee", "serve", "--socket", path, "--ta-module", _TA_MODULE]
    proc = subprocess.Popen(cmd, cwd=_ROOT, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("serving on"):
        proc.kill()
        raise SystemExit(f"qtee serve did not start: {line!r}")
    return proc


def _stop_server(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    if "tables: empty" not in out:
        print(f"server tables at exit: {out.strip()!r}")


def main() -> None:
    print(pin_to_one_cpu())
    with tempfile.TemporaryDirectory(prefix="qtee-bench-") as tmp:
        proc = _start_server(os.path.join(tmp, "qtee.sock"))
        try:
            affinity = sorted(os.sched_getaffinity(proc.pid))
            print(f"server process {proc.pid} on cpus {affinity}")
            device = qtee.connect(os.path.join(tmp, "qtee.sock"))
            with (
                qtee.Client(device, workers=1) as client,
                PingPong() as pp,
                _floors.SocketFloor() as floor,
                _floors.SocketFloor(driver=True) as driver_floor,
            ):
                env = client.client_env()
                loader = client.open_service(env, 3)
                (ctrl,) = loader.invoke(0, qtee.ta_image(_TA_NAME), OUT_OBJECT)
                (app,) = ctrl.invoke(2, OUT_OBJECT)
                nop = Nop()

                def null() -> None:
                    app.invoke(0)

                def callback() -> None:
                    app.invoke(1, nop)

                base, floor_null, driver_null, alone = rotated_ops_per_sec(
                    pp.null, floor.null, driver_floor.null, null
                )
                report("bare msgpack ping-pong, 2 processes, socketpair", base)
                report("floor: null invoke, lean frames", floor_null, base)
                report("driver floor: null invoke, qtee's driver", driver_null, base)
                report("null invoke over the socket", alone, base, 3.0, floor=base / floor_null)
                base4, floor_cb, driver_cb, cb = rotated_ops_per_sec(
                    pp.exchange,
                    floor.callback,
                    driver_floor.callback,
                    callback,
                    min_time=0.5,
                    repeats=5,
                )
                report("bare msgpack exchange, 4 pairs", base4)
                report("floor: invoke + 1 callback, lean frames", floor_cb, base4)
                report("driver floor: invoke + 1 callback, qtee's driver", driver_cb, base4)
                report(
                    "invoke + 1 callback over the socket", cb, base4, 4.0, floor=base4 / floor_cb
                )

                idle: list[qtee.RemoteContext] = []

                def open_idle() -> None:
                    idle.extend(device.open() for _ in range(IDLE))

                def close_idle() -> None:
                    for ctx in idle:
                        ctx.close()
                    idle.clear()

                alone, busy = alternated_ops_per_sec(null, open_idle, close_idle)
                pairs = IdlePairs(IDLE)
                floor_alone, floor_busy = alternated_ops_per_sec(
                    floor.null, pairs.open, pairs.close
                )
                report("null invoke, no other connection", alone)
                report(
                    f"null invoke, {IDLE} idle connections (alternated)",
                    busy,
                    alone,
                    1.1,
                    floor=floor_alone / floor_busy,
                )
                for ref in (app, ctrl, loader, env):
                    ref.release()
        finally:
            _stop_server(proc)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--echo"]:
        _echo(int(sys.argv[2]))
    else:
        main()
