"""A client process of the device server, for tests/remote/test_server_processes.py.

``python tests/_server_peer.py MODE SOCKET ...``; every line it prints is written
unbuffered (``os.write``), so what the parent reads after a SIGKILL is a true prefix.

``supplicant SOCKET TA WORKERS``
    Connects with ``WORKERS`` supplicant workers, loads TA ``TA`` and hands its op 0 a
    callback object whose op 1 prints ``ENTER`` and then blocks for ten minutes.  Prints
    ``READY`` and waits to be killed.

``echo SOCKET TA N SEED``
    Loads TA ``TA`` and makes ``N`` calls of its op 0 (``through(data, cb)``: QTEE calls
    ``cb`` op 0 with ``data`` and returns what it answered), with a callback object of
    this process that answers ``tag || reversed(data)``.  Checks every answer, releases
    everything, closes, prints ``OK N`` and exits 0 (1 on the first wrong answer).

``garbage SOCKET SEED``
    Opens one raw connection per case (random bytes, truncated frames, oversized
    frames, bad frames after a good hello) and checks that the server closes each one.
    Prints ``CASE <name> <outcome> <how>`` per case, then ``DONE``; exits 0 if the server
    closed every connection, 1 otherwise.

``hostile SOCKET CONNS SECONDS SEED``
    ``CONNS`` threads, each keeping one hostile connection open at a time for ``SECONDS``
    (the server soak, tests/remote/test_server_soak.py): SUPPL_RECV floods, partial frames,
    hang-ups mid-call (in a TA's code, in a callback, while loading) and failing
    SHM_ALLOCs (flags, short arg, huge sizes; a good one never freed).  Thread ``k``
    loads TA ``soak.hostile.<k>``.  Prints ``HOSTILE kind=count ...`` and exits 0; the
    server's answers are not checked here (a hostile peer gets what it asks for), only
    that the server keeps answering: ``unanswered`` counts floods whose VERSION got no
    reply within 10 s.
"""

from __future__ import annotations

import collections
import errno
import os
import random
import socket
import struct
import sys
import threading
import time
from pathlib import Path

if __name__ == "__main__":  # run as a script: the repository's packages first
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qtee
from objects import QteeBaseError, QteeError
from qtee import OUT_OBJECT, CallbackObject, Out, op, uapi
from qtee._remote.frames import (
    MAX_FRAME,
    Bye,
    FrameDecoder,
    FrameError,
    Hello,
    Ioctl,
    IoctlReply,
    Region,
    encode,
)
from tests._tas import Echoer, Sleeper


def say(*words: object) -> None:
    os.write(1, (" ".join(str(w) for w in words) + "\n").encode())


def load(client: qtee.Client, name: str) -> tuple[qtee.ObjRef, ...]:
    env = client.client_env()
    loader = client.open_service(env, 3)
    (ctrl,) = loader.invoke(0, qtee.ta_image(name), OUT_OBJECT)
    (app,) = ctrl.invoke(2, OUT_OBJECT)
    return app, ctrl, loader, env


# ---------------------------------------------------------------------------- supplicant
class Blocker(CallbackObject):
    @op(1)
    def block(self) -> None:
        say("ENTER")
        time.sleep(600)


def supplicant(path: str, ta: str, workers: int) -> int:
    client = qtee.Client(qtee.connect(path), workers=workers)
    refs = load(client, ta)
    refs[0].invoke(0, Blocker())
    say("READY")
    time.sleep(3600)  # until SIGKILL
    return 1


# ---------------------------------------------------------------------------- echo
def echo(path: str, ta: str, n: int, seed: int) -> int:
    rng = random.Random(seed)
    tag = f"<{os.getpid()}>".encode()
    cb = Echoer(tag)
    with qtee.Client(qtee.connect(path), workers=2) as client:
        refs = load(client, ta)
        app = refs[0]
        for i in range(n):
            data = rng.randbytes(rng.randint(0, 1500))
            (got,) = app.invoke(0, data, cb, Out(len(data) + 64))
            if got != tag + data[::-1]:
                say("WRONG", i, len(data), got[:32].hex())
                return 1
        for ref in refs:
            ref.release()
        end = time.monotonic() + 5  # QTEE's releases of our objects arrive asynchronously
        while client.exported() and time.monotonic() < end:
            time.sleep(0.01)
        if client.exported():
            say("EXPORTED", client.exported())
            return 1
    say("OK", n)
    return 0


# ---------------------------------------------------------------------------- garbage
def _server_view(data: bytes, hello_sent: bool) -> bool:
    """Whether the server's decoder refuses ``data`` (else it waits for more bytes)."""
    dec = FrameDecoder(max_frame=MAX_FRAME)
    try:
        dec.feed(data)
        while (msg := dec.next_message()) is not None:
            if not hello_sent and not isinstance(msg, Hello):
                return True
            hello_sent = True
            if not isinstance(msg, Ioctl):
                return True
    except FrameError:
        return True
    return False


def _cases(rng: random.Random) -> list[tuple[str, bytes, bool]]:
    """``(name, bytes, after_hello)``."""
    hello = encode(Hello(client="garbage"))
    good = encode(Ioctl(seq=1, cmd=qtee.uapi.TEE_IOC_VERSION, arg=bytes(12)))
    cases: list[tuple[str, bytes, bool]] = []
    for k in range(8):
        cases.append((f"random-{k}", rng.randbytes(rng.randint(1, 4096)), False))
        cases.append((f"random-after-hello-{k}", rng.randbytes(rng.randint(1, 4096)), True))
    for k in range(4):
        cut = rng.randint(1, len(hello) - 1)
        cases.append((f"truncated-hello-{k}", hello[:cut], False))
        cut = rng.randint(1, len(good) - 1)
        cases.append((f"truncated-ioctl-{k}", good[:cut], True))
    cases.append(("truncated-header", b"\x00\x00", False))
    cases.append(("length-only", struct.pack(">I", 100), False))
    cases.append(("oversized-header", struct.pack(">I", MAX_FRAME + 1), False))
    cases.append(("oversized-max-u32", b"\xff\xff\xff\xff" + rng.randbytes(1000), True))
    cases.append(("oversized-with-body", struct.pack(">I", MAX_FRAME + 1) + bytes(1 << 20), False))
    cases.append(("max-frame-of-junk", struct.pack(">I", MAX_FRAME) + b"\xc1" * MAX_FRAME, True))
    cases.append(("zero-length", bytes(4), True))
    cases.append(("second-hello", hello, True))
    return cases


def _run_case(path: str, data: bytes, after_hello: bool) -> tuple[str, str]:
    """``(outcome, how)``: ``closed`` and ``refused:bye``, ``refused:reset`` (the server
    closed with our bytes unread, and the kernel dropped its Bye) or ``truncated:eof``."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    try:
        if after_hello:
            s.sendall(encode(Hello(client="garbage")))
        refused = _server_view(data, after_hello)
        try:
            s.sendall(data)
            if not refused:  # the server waits for the rest of the frame: end the stream
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed on us while we were still sending: refused from the header
        got = b""
        reset = False
        try:
            while chunk := s.recv(65536):
                got += chunk
        except ConnectionResetError:
            reset = True  # closed with our bytes unread: a close too, the Bye may be lost
        except TimeoutError:
            return "still-open", "-"
        dec = FrameDecoder(expect_increasing_seq=False)
        dec.feed(got)
        kinds = [type(m).__name__ for m in dec]
        if after_hello:
            if not kinds or kinds[0] != "Welcome":
                return "no-welcome", ",".join(kinds) or "-"
            kinds = kinds[1:]
        if kinds == [Bye.__name__]:
            how = "bye"
        elif not kinds:
            how = "reset" if reset else "eof"
        else:
            return "unexpected", ",".join(kinds)
        return "closed", f"{'refused' if refused else 'truncated'}:{how}"
    finally:
        s.close()


def garbage(path: str, seed: int) -> int:
    rng = random.Random(seed)
    bad = 0
    for name, data, after_hello in _cases(rng):
        outcome, how = _run_case(path, data, after_hello)
        bad += outcome != "closed"
        say("CASE", name, outcome, how)
    say("DONE")
    return 1 if bad else 0


# ---------------------------------------------------------------------------- hostile
_BUF = struct.Struct("<QQ")
_PARAM = struct.Struct("<4Q")
_META_IN = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_INOUT | uapi.TEE_IOCTL_PARAM_ATTR_META


def _raw(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    s.sendall(encode(Hello(client="hostile")))
    return s


def _recv_frame(seq: int) -> bytes:
    block_addr, scratch_addr, size = 0x10_0000, 0x10_1000, 256
    block = struct.pack("<II", 0, 2) + _PARAM.pack(_META_IN, scratch_addr, size, 0) + bytes(32)
    return encode(
        Ioctl(
            seq=seq,
            cmd=uapi.TEE_IOC_SUPPL_RECV,
            arg=_BUF.pack(block_addr, len(block)),
            regions=(
                Region(addr=block_addr, data=block, writable=True),
                Region(addr=scratch_addr, data=bytes(size), writable=True),
            ),
        )
    )


def _replies(s: socket.socket, want: int, timeout: float) -> list[IoctlReply]:
    """Replies read within ``timeout`` (up to ``want``); fds that come are dropped."""
    dec = FrameDecoder(expect_increasing_seq=False)
    got: list[IoctlReply] = []
    end = time.monotonic() + timeout
    while len(got) < want and (left := end - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            data = s.recv(1 << 16)
        except (TimeoutError, OSError):
            break
        if not data:
            break
        dec.feed(data)
        got += [m for m in dec if isinstance(m, IoctlReply)]
    return got


def _flood(path: str, rng: random.Random, counts: collections.Counter[str]) -> None:
    """More SUPPL_RECVs than the server lets one connection have waiting, then VERSION:
    the surplus is EBUSY and VERSION is still answered; then hang up."""
    with _raw(path) as s:
        n = rng.randint(70, 140)
        s.sendall(b"".join(_recv_frame(seq) for seq in range(1, n + 1)))
        s.sendall(encode(Ioctl(seq=n + 1, cmd=uapi.TEE_IOC_VERSION, arg=bytes(12))))
        got = _replies(s, n + 1, 10.0)
        counts["ebusy"] += sum(r.errno == errno.EBUSY for r in got)
        if not any(r.seq == n + 1 for r in got):
            counts["unanswered"] += 1
        time.sleep(rng.uniform(0, 0.3))


def _partial(path: str, rng: random.Random, counts: collections.Counter[str]) -> None:
    """Part of a frame (of an ioctl, or a header promising a large body), held, dropped."""
    with _raw(path) as s:
        if rng.random() < 0.5:
            frame = _recv_frame(1)
            s.sendall(frame[: rng.randint(1, len(frame) - 1)])
        else:
            s.sendall(struct.pack(">I", rng.randint(1000, 1 << 20)) + rng.randbytes(100))
        time.sleep(rng.uniform(0, 0.5))


def _shm(path: str, rng: random.Random, counts: collections.Counter[str]) -> None:
    """SHM_ALLOCs that fail (flags, a short arg, huge sizes) and one that succeeds and is
    never freed; the fds the server sends are dropped unread (the kernel closes them)."""
    with _raw(path) as s:
        args = [
            uapi.ShmAllocData(4096, 1).pack(),
            bytes(8),
            uapi.ShmAllocData(1 << 62).pack(),
            uapi.ShmAllocData(1 << 47).pack(),
            uapi.ShmAllocData(rng.randint(1, 65536)).pack(),
        ]
        rng.shuffle(args)
        s.sendall(
            b"".join(
                encode(Ioctl(seq=k, cmd=uapi.TEE_IOC_SHM_ALLOC, arg=a))
                for k, a in enumerate(args, 1)
            )
        )
        got = _replies(s, len(args), 10.0)
        counts["shm_failed"] += sum(r.errno != 0 for r in got)
        counts["shm_ok"] += sum(r.errno == 0 for r in got)


def _hangup(path: str, k: int, rng: random.Random, counts: collections.Counter[str]) -> None:
    """A client that drops its connection in the middle of a call: in the TA's code, in a
    callback to it, or while loading (calls that return new objects)."""
    client = qtee.Client(qtee.connect(path), workers=1)
    try:
        where = rng.choice(["ta", "callback", "loading"])
        refs: list[qtee.ObjRef] = []

        def calls() -> None:
            try:
                refs.extend(load(client, f"soak.hostile.{k}"))
                if where == "ta":
                    refs[0].invoke(0, struct.pack("<I", rng.randint(20, 200)))
                elif where == "callback":
                    refs[0].invoke(1, Sleeper(rng.uniform(0.02, 0.2)))
            except (QteeBaseError, OSError):
                pass

        t = threading.Thread(target=calls, daemon=True)
        t.start()
        time.sleep(rng.uniform(0, 0.05) if where == "loading" else rng.uniform(0.01, 0.15))
        assert isinstance(client.ctx, qtee.RemoteContext)
        client.ctx.sock.shutdown(socket.SHUT_RDWR)
        t.join(30)
        counts[f"hangup_{where}"] += 1
    finally:
        client.close()


def hostile(path: str, conns: int, seconds: float, seed: int) -> int:
    end = time.monotonic() + seconds
    counts: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def worker(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        mine: collections.Counter[str] = collections.Counter()
        while time.monotonic() < end:
            kind = rng.choice(["flood", "partial", "shm", "hangup"])
            try:
                if kind == "flood":
                    _flood(path, rng, mine)
                elif kind == "partial":
                    _partial(path, rng, mine)
                elif kind == "shm":
                    _shm(path, rng, mine)
                else:
                    _hangup(path, k, rng, mine)
                mine[kind] += 1
            except (QteeBaseError, OSError) as exc:
                mine[f"error_{kind}"] += 1
                if mine[f"error_{kind}"] == 1:
                    say("ERROR", kind, type(exc).__name__, str(exc)[:120])
        with lock:
            counts.update(mine)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    say("HOSTILE", *(f"{kind}={n}" for kind, n in sorted(counts.items())))
    return 0


def main(argv: list[str]) -> int:
    mode, path, *rest = argv
    try:
        if mode == "supplicant":
            return supplicant(path, rest[0], int(rest[1]))
        if mode == "echo":
            return echo(path, rest[0], int(rest[1]), int(rest[2]))
        if mode == "garbage":
            return garbage(path, int(rest[0]))
        if mode == "hostile":
            return hostile(path, int(rest[0]), float(rest[1]), int(rest[2]))
    except QteeError as exc:
        say("QTEE-ERROR", exc.result)
        return 2
    say("USAGE", mode)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
