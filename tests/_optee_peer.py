"""tee-supplicant in its own process, for tests/remote/test_server_optee.py.

``python tests/_optee_peer.py SOCKET TA_DIR STORAGE [register]`` connects to a ``qtee serve
--tee optee`` server's privileged node and serves LOAD_TA from ``TA_DIR`` and the REE FS
in ``STORAGE`` (:class:`supplicant.OpteeSupplicant`).  With ``register`` its RPC payloads
are SHM_REGISTERed buffers of its own (:class:`RegisteringSupplicant`), as the real
tee-supplicant allocates them when the device reports ``TEE_GEN_CAP_REG_MEM``.  Prints
``READY`` once attached, then serves until its stdin closes (or SIGTERM), stops (what it
had received fails COMMUNICATION), prints ``STOPPED`` and exits 0.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

if __name__ == "__main__":  # run as a script: the repository's packages first
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qtee
from objects import DriverError
from qtee import uapi
from qtee.gp import TeecResult
from supplicant import OpteeSupplicant

_OK = int(TeecResult.TEEC_SUCCESS)
_BAD = int(TeecResult.TEEC_ERROR_BAD_PARAMETERS)
_NO_MEMORY = int(TeecResult.TEEC_ERROR_OUT_OF_MEMORY)


class RegisteringSupplicant(OpteeSupplicant):
    """tee-supplicant's ``register_local_shm``: each RPC payload is a buffer of this
    process registered with SHM_REGISTER (the bytes cross the socket in windows, as
    ``qtee._remote.server_optee`` says), not a SHM_ALLOC shm."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self._bufs: dict[int, tuple[bytearray, int]] = {}  # shm id -> (buffer, address)
        self.registered = 0  # payloads served so far
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def _shm_alloc(self, args: list[list[int]]) -> int:
        value = self._value(args, 0)
        if len(args) != 1 or value is None:
            return _BAD
        buf = bytearray(max(value[2], 1))
        mem = self.device.memory
        addr = mem.pin(buf)
        data = bytearray(uapi.ShmRegisterData(addr, len(buf)).pack())
        try:
            self.ctx.ioctl(uapi.TEE_IOC_SHM_REGISTER, data)
        except DriverError:
            mem.unpin(addr)
            return _NO_MEMORY
        shm_id = uapi.ShmRegisterData.unpack(data).id
        with self._lock:
            self._shms.add(shm_id)
            self._bufs[shm_id] = (buf, addr)
            self.registered += 1
        value[3] = shm_id
        return _OK

    def _shm_free(self, args: list[list[int]]) -> int:
        value = self._value(args, 0)
        ret = super()._shm_free(args)
        if ret == _OK and value is not None:
            with self._lock:
                _buf, addr = self._bufs.pop(value[2])
            self.device.memory.unpin(addr)
        return ret

    def _memref(self, args: list[list[int]], i: int) -> tuple[memoryview | None, list[int]] | None:
        p = args[i] if i < len(args) else None
        with self._lock:
            mine = self._bufs.get(p[3]) if p is not None else None
        if p is None or mine is None or p[0] & 0xFF not in (5, 6, 7):
            return super()._memref(args, i)
        view = memoryview(mine[0])
        if p[1] + p[2] > len(view):
            return None
        return view[p[1] : p[1] + p[2]], p


def main(argv: list[str]) -> int:
    sock, ta_dir, storage = argv[:3]
    cls = RegisteringSupplicant if argv[3:] == ["register"] else OpteeSupplicant
    supp = cls(qtee.connect(sock), ta_dir, storage)  # type: ignore[arg-type]
    return _serve(supp)


def _serve(supp: OpteeSupplicant) -> int:
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    os.write(1, b"READY\n")
    done.wait()
    supp.stop()
    os.write(1, b"STOPPED\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
