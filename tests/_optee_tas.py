"""GP TAs for the OP-TEE device server tests (tests/remote/test_server_optee.py), in process and
in a ``qtee serve --tee optee`` subprocess (``--ta-module tests._optee_tas_serve``).

``Sample`` is registered with ``register_gp_ta`` (the runtime finds it); ``Loadable`` is
the same code under another UUID, registered with ``register_loadable_ta``: it exists
only as an image, so a session to it goes through tee-supplicant's LOAD_TA.  Commands:

* ``ADD`` (0): value[0] in ``(a, b)`` -> value[1] out ``a = a + b``;
* ``REVERSE`` (1): memref[0] in -> memref[1] out reversed (SHORT_BUFFER with the size
  needed when it does not fit);
* ``BUMP`` (2): memref[0] in/out: every byte + 1, in place;
* ``WHO`` (3): memref[0] out <- the session's client UUID (16 bytes);
* ``STORE`` (4): memref[0] in is written to the TA's persistent object ``b"obj"`` (trusted
  storage, through tee-supplicant's FS RPCs), then read back into memref[1] out.
"""

from __future__ import annotations

import uuid

from qtee import (
    TEE_DATA_FLAG_ACCESS_READ,
    TEE_DATA_FLAG_ACCESS_WRITE,
    TEE_DATA_FLAG_OVERWRITE,
    register_loadable_ta,
    trusted_storage,
    unregister_loadable_ta,
)
from qtee.gp import TeecResult
from qtee.secure import GpParam, GpSession, GpTA, GpTaError, register_gp_ta, unregister_gp_ta

SAMPLE_UUID = uuid.UUID("0fcb6b5c-3f2d-4a77-8e0c-1b1b6a3c0001")
LOADABLE_UUID = uuid.UUID("0fcb6b5c-3f2d-4a77-8e0c-1b1b6a3c0002")
ADD, REVERSE, BUMP, WHO, STORE = 0, 1, 2, 3, 4


class Sample(GpTA):
    UUID = SAMPLE_UUID

    def open_session(self, session: GpSession, types: int, params: list[GpParam]) -> None:
        session.context = session.client_uuid

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
        if cmd == ADD:
            params[1].a = (params[0].a + params[0].b) & 0xFFFF_FFFF
        elif cmd == REVERSE:
            data = bytes(params[0].buffer or b"")
            out = params[1]
            if out.buffer is None or out.size < len(data):
                out.size = len(data)
                raise GpTaError(TeecResult.TEEC_ERROR_SHORT_BUFFER)
            out.buffer[: len(data)] = data[::-1]
            out.size = len(data)
        elif cmd == BUMP:
            buf = params[0].buffer
            assert buf is not None
            buf[:] = bytes((x + 1) & 0xFF for x in buf)
        elif cmd == WHO:
            raw = session.context
            assert isinstance(raw, bytes) and params[0].buffer is not None
            params[0].buffer[:16] = raw
            params[0].size = 16
        elif cmd == STORE:
            data = bytes(params[0].buffer or b"")
            store = trusted_storage(self)
            flags = TEE_DATA_FLAG_ACCESS_READ | TEE_DATA_FLAG_ACCESS_WRITE
            store.create(b"obj", flags | TEE_DATA_FLAG_OVERWRITE, data).close()
            handle = store.open(b"obj", TEE_DATA_FLAG_ACCESS_READ)
            try:
                back = handle.read(len(data) + 16)
            finally:
                handle.close()
            out = params[1]
            assert out.buffer is not None and out.size >= len(back)
            out.buffer[: len(back)] = back
            out.size = len(back)
        else:
            raise GpTaError(TeecResult.TEEC_ERROR_NOT_SUPPORTED)


class Loadable(Sample):
    UUID = LOADABLE_UUID


def install() -> None:
    """Register both TAs (``Loadable`` only as an image tee-supplicant loads)."""
    register_gp_ta(Sample)
    register_loadable_ta(Loadable)


def uninstall() -> None:
    unregister_gp_ta(SAMPLE_UUID)
    unregister_loadable_ta(LOADABLE_UUID)
