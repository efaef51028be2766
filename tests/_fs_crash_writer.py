"""Crash-test writer: rewrites and patches files in a FileStore until it is killed.

``python tests/_fs_crash_writer.py ROOT SEED`` runs one writer.  Each step prints
``BEGIN <path> <sha256 of the contents the file will hold>`` before it starts and
``ACK <path> <sha256>`` once the final ``close`` has returned.  Both lines are written
unbuffered, so whatever the parent reads after a SIGKILL is a true prefix of what
happened.  ``READY`` is printed once the FileStore is open.

With no arguments the script is a fork server, so a kill does not cost a Python start.
For each ``RUN ROOT SEED`` line on stdin it forks a writer and prints ``PID <pid>``.  The
writer shares the server's stdout.  For the next line, ``REAP``, it waits for that writer
and prints ``DONE <wait status>``.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
import traceback

from supplicant import FileStore, FsError

PATHS = ("f0", "f1", "d/f2", "d/e/f3")
RD, WR, RW, CREAT, TRUNC = 0, 1, 2, 0o100, 0o1000
CHUNK = 20000  # what one WRITE request carries


def say(*words: str) -> None:
    os.write(1, (" ".join(words) + "\n").encode())


def read_all(fs: FileStore, path: str) -> bytes:
    try:
        fd = fs.open(path, RD)
    except FsError:
        return b""
    out = bytearray()
    while chunk := fs.read(fd, CHUNK):
        out += chunk
    fs.close(fd)
    return bytes(out)


def write_forever(root: str, seed: int) -> None:
    rng = random.Random(seed)
    fs = FileStore(root)
    say("READY")
    while True:
        path = rng.choice(PATHS)
        rewrite = rng.random() < 0.6
        if rewrite:
            off, patch = 0, rng.randbytes(rng.randint(0, 3 * CHUNK))
            new = patch
        else:
            cur = read_all(fs, path)
            off = rng.randint(0, len(cur))
            patch = rng.randbytes(rng.randint(1, 2 * CHUNK))
            new = cur[:off] + patch + cur[off + len(patch) :]
        say("BEGIN", path, hashlib.sha256(new).hexdigest())
        fd = fs.open(path, (WR | CREAT | TRUNC) if rewrite else (RW | CREAT))
        fs.lseek(fd, off, 0)
        for i in range(0, len(patch), CHUNK):
            fs.write(fd, patch[i : i + CHUNK])
        fs.close(fd)
        say("ACK", path, hashlib.sha256(new).hexdigest())


def serve() -> None:
    pid = 0
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "RUN":
            go_r, go_w = os.pipe()  # the writer waits until its PID line is out
            pid = os.fork()
            if pid == 0:
                try:
                    os.read(go_r, 1)
                    write_forever(cmd[1], int(cmd[2]))
                except BaseException:
                    traceback.print_exc()
                os._exit(1)
            say("PID", str(pid))
            os.write(go_w, b"g")
            os.close(go_r)
            os.close(go_w)
        elif cmd[0] == "REAP":
            _, status = os.waitpid(pid, 0)
            say("DONE", str(status))


if __name__ == "__main__":
    if len(sys.argv) == 3:
        write_forever(sys.argv[1], int(sys.argv[2]))
    else:
        serve()
