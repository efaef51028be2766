"""Round trips over the device server's socket, against a bare msgpack ping-pong.

Three processes, all on the one CPU this bench pins itself to (children inherit the
affinity, so every round trip pays the same two cross-process context switches):

* baseline: this process and an echo child (``ipc.py --echo FD``) joined by a
  ``socket.socketpair()``.  One thread on each side, blocking calls, no checks: this side
  packs a map shaped like the ``Ioctl`` frame of a null invoke (same keys, a 16-byte arg,
  one 24-byte region), writes it length-prefixed, reads the answer and unpacks it; the
  child reads the frame, unpacks it, packs a map shaped like the ``IoctlReply`` and writes
  it back.  That is the least a request/reply over a socket between two Python
  processes costs.
* qtee: ``python -m qtee serve`` in a child (the TA is ``bench/_ipc_tas.py``), and here a
  ``Client(qtee.connect(path), workers=1)``.  A null invoke is one Ioctl/IoctlReply pair:
  the client's reader thread hands the reply to the calling thread; the server's reader
  thread starts a thread per request.  An invoke with one callback is three pairs (the
  invoke; the pending SUPPL_RECV answered with the callback, then the next RECV posted;
  the SUPPL_SEND of its result), with the callback run by the client's one worker.
* the same null invoke with 32 more connections open and idle (each a context on the
  server, each with a reader thread on both sides), against the same invoke without them,
  measured before opening them and again after closing them (the better of the two).

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
from pathlib import Path

# bench/supplicant.py shares its name with the supplicant package: bench/ goes last.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
import supplicant  # noqa: F401 - the package is cached before bench/ can shadow it

sys.path.append(str(_HERE))

import msgpack
from _timing import ops_per_sec, pin_to_one_cpu, report

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


def _region() -> dict[str, object]:
    return {"addr": 0x7F00_0000_1000, "data": bytes(24), "writable": True}


def _request(seq: int) -> dict[str, object]:
    """The shape of a null invoke's Ioctl frame (113 bytes on the wire)."""
    return {
        "v": PROTOCOL_VERSION,
        "t": "ioctl",
        "seq": seq,
        "cmd": uapi.TEE_IOC_OBJECT_INVOKE,
        "arg": bytes(16),
        "regions": [_region()],
    }


def _reply(seq: int) -> dict[str, object]:
    """The shape of its IoctlReply (111 bytes on the wire)."""
    return {
        "v": PROTOCOL_VERSION,
        "t": "reply",
        "seq": seq,
        "errno": 0,
        "arg": bytes(16),
        "written": [_region()],
    }


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
    """The baseline's child: answer each request map with a reply map, until EOF."""
    sock = socket.socket(fileno=fd)
    while (msg := _read_frame(sock)) is not None:
        assert isinstance(msg, dict)
        sock.sendall(_frame(_reply(msg["seq"])))


def ping_pong() -> float:
    here, there = socket.socketpair()
    child = subprocess.Popen(
        [sys.executable, __file__, "--echo", str(there.fileno())], pass_fds=[there.fileno()]
    )
    there.close()
    seq = 0

    def one() -> None:
        nonlocal seq
        seq += 1
        here.sendall(_frame(_request(seq)))
        msg = _read_frame(here)
        assert isinstance(msg, dict)

    try:
        return ops_per_sec(one)
    finally:
        here.close()
        child.wait(10)


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
    base = ping_pong()
    report("bare msgpack ping-pong, 2 processes, socketpair", base)

    with tempfile.TemporaryDirectory(prefix="qtee-bench-") as tmp:
        proc = _start_server(os.path.join(tmp, "qtee.sock"))
        try:
            affinity = sorted(os.sched_getaffinity(proc.pid))
            print(f"server process {proc.pid} on cpus {affinity}")
            device = qtee.connect(os.path.join(tmp, "qtee.sock"))
            with qtee.Client(device, workers=1) as client:
                env = client.client_env()
                loader = client.open_service(env, 3)
                (ctrl,) = loader.invoke(0, qtee.ta_image(_TA_NAME), OUT_OBJECT)
                (app,) = ctrl.invoke(2, OUT_OBJECT)
                nop = Nop()

                def null() -> None:
                    app.invoke(0)

                def callback() -> None:
                    app.invoke(1, nop)

                alone = ops_per_sec(null)
                report("null invoke over the socket", alone, base, target=1.5)
                cb = ops_per_sec(callback, min_time=0.5, repeats=3)
                report("invoke + 1 callback over the socket", cb, base, target=1.5)

                idle = [device.open() for _ in range(IDLE)]
                busy = ops_per_sec(null)
                for ctx in idle:
                    ctx.close()
                alone = max(alone, ops_per_sec(null))
                report("null invoke, no other connection", alone)
                report(f"null invoke, {IDLE} idle connections open", busy, alone, target=1.1)
                for ref in (app, ctrl, loader, env):
                    ref.release()
        finally:
            _stop_server(proc)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--echo"]:
        _echo(int(sys.argv[2]))
    else:
        main()
