"""Python TAs for the unmodified peer C programs (issue 14), registered on import.

``qtee serve --ta-module peer_tas`` (or the bridge's ``--ta-module peer_tas``) with
``tests/`` on ``sys.path``, or ``import tests.peer_tas`` from the repository root, makes:

* :class:`SmciExample` the TA of quic-teec's real ``smcinvoke_skeleton_ta64.mbn``,
  registered by the file's SHA-256 (:data:`SKELETON_SHA256`): ``qcomteetest -l DIR 0 0``
  (loadFromBuffer) and ``-l DIR 1 0`` (loadFromRegion) load it from ``DIR``;
* the optee_examples TAs with the examples' UUIDs and command ids: :class:`HelloWorld`,
  :class:`Random` and :class:`Hotp` are built in (``register_gp_ta``: no tee-supplicant
  needed), and :class:`SecureStorage` exists only as a TA file, loaded through
  tee-supplicant's LOAD_TA from ``<ta-path>/f4e750bb-1437-4fbf-8785-8d3580c34994.ta``
  (any bytes, or a signed image for that UUID: :func:`write_ta_files` writes one); its
  objects live in tee-supplicant's REE FS (``--fs-parent-path``).

The C sources these follow are read for facts only (quic/quic-teec@61f6fab and
linaro-swg/optee_examples@934c7ed, as shipped in ``../shared/peers``); nothing is copied.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import struct
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Final

from objects import op
from qtee import (
    TEE_DATA_FLAG_ACCESS_READ,
    TEE_DATA_FLAG_ACCESS_WRITE,
    TEE_DATA_FLAG_ACCESS_WRITE_META,
    TEE_DATA_FLAG_OVERWRITE,
    TEE_DATA_FLAG_SHARE_READ,
    invoke_supp_plugin,
    trusted_storage,
)
from qtee.gp import TaFlag, TeecResult
from qtee.secure import (
    GpParam,
    GpSession,
    GpTA,
    GpTaError,
    TeeParamType,
    TrustedApp,
    register_gp_ta,
    register_ta_file,
    tee_param_types,
    unregister_gp_ta,
)
from qtee.secure._gp_ta import lookup_gp_ta
from qtee.secure._tafiles import signed_ta_image

__all__ = [
    "SKELETON_MBN",
    "SKELETON_SHA256",
    "TA_FILES",
    "HelloWorld",
    "Hotp",
    "Plugins",
    "Random",
    "SecureStorage",
    "SmciExample",
    "register",
    "syslog_plugin",
    "unregister",
    "write_ta_files",
]

T = TeeParamType
_NONE: Final = tee_param_types()
_BAD_PARAMETERS: Final = int(TeecResult.TEEC_ERROR_BAD_PARAMETERS)
_NOT_SUPPORTED: Final = int(TeecResult.TEEC_ERROR_NOT_SUPPORTED)
_SHORT_BUFFER: Final = int(TeecResult.TEEC_ERROR_SHORT_BUFFER)
_U32: Final = 0xFFFF_FFFF


def _expect(types: int, *want: int) -> None:
    """The examples' ``param_types != exp_param_types`` check: BAD_PARAMETERS."""
    if types != tee_param_types(*want):
        raise GpTaError(_BAD_PARAMETERS, f"param types {types:#06x}")


# ----------------------------------------------------------------------------- QTEE

#: The file qcomteetest ``-l DIR`` reads, and the SHA-256 of the one quic-teec ships
#: (quic/quic-teec:tests/ta/smcinvoke_skeleton_ta/smcinvoke_skeleton_ta64.mbn@61f6fab;
#: tests/bridge/test_peer_tas.py recomputes it from the archive).
SKELETON_MBN: Final = "smcinvoke_skeleton_ta64.mbn"
SKELETON_SHA256: Final = "a225fb554c2abdf8b758a3009e80002f47e7e65245f07c8bf909409bc8fbbd8f"


class SmciExample(TrustedApp):
    """The skeleton TA's app object: ISMCIExample.

    Op table: ISMCIExample op 0 ``add({u32 val1, u32 val2}) -> u32`` (BI 8 bytes, BO 4
    bytes; spec quic-teec.md §5.3; quic/quic-teec:tests/ta_load.c@61f6fab calls op 0 with
    a ``{u32, u32}`` input and a u32 output and prints ``SUCCESS.`` when the sum is
    right).  The sum saturates at UINT32_MAX as ``CSMCIExample_add`` does
    (quic/quic-teec:tests/ta/smcinvoke_skeleton_ta/CSMCIExample.c@61f6fab).  The test
    reaches this object through IAppLoader (UID 3) loadFromBuffer (op 0) or
    loadFromRegion (op 1), then IAppController getAppObject (op 2), and releases the
    controller without calling unload (which unloads it, as a release does in the model).
    """

    @op(0, ib=(8,), ob=(4,))
    def add(self, pair: bytes) -> bytes:
        a, b = struct.unpack("<II", pair)
        return struct.pack("<I", _U32 if a >= _U32 - b else a + b)


# ----------------------------------------------------------------------------- OP-TEE


class HelloWorld(GpTA):
    """optee_examples hello_world: INC_VALUE (0) and DEC_VALUE (1) on value[0].a.

    UUID and command ids: linaro-swg/optee_examples:hello_world/ta/include/
    hello_world_ta.h@934c7ed.  Behaviour (hello_world/ta/hello_world_ta.c): open takes
    no params, each command takes exactly VALUE_INOUT and returns BAD_PARAMETERS for any
    other types or command; the host (hello_world/host/main.c) sends 42 and prints 43.
    ``TA_FLAGS`` 0 (hello_world/ta/user_ta_header_defines.h).
    """

    UUID = uuid.UUID("8aaaf200-2450-11e4-abe2-0002a5d5c51b")
    CMD_INC_VALUE: Final = 0
    CMD_DEC_VALUE: Final = 1

    def open_session(self, session: GpSession, types: int, params: list[GpParam]) -> None:
        _expect(types)

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
        if cmd not in (self.CMD_INC_VALUE, self.CMD_DEC_VALUE):
            raise GpTaError(_BAD_PARAMETERS, f"command {cmd}")
        _expect(types, T.TEE_PARAM_TYPE_VALUE_INOUT)
        step = 1 if cmd == self.CMD_INC_VALUE else -1
        params[0].a = (params[0].a + step) & _U32


class Random(GpTA):
    """optee_examples random: GENERATE (0) fills memref[0] with random bytes.

    UUID and command id: linaro-swg/optee_examples:random/ta/include/random_ta.h@934c7ed.
    Behaviour (random/ta/random_ta.c): open takes no params; GENERATE takes exactly
    MEMREF_OUTPUT and writes ``size`` random bytes (TEE_GenerateRandom); any other
    command is BAD_PARAMETERS.  The host (random/host/main.c) asks for 16 bytes in a
    temporary memref and prints them.  ``TA_FLAGS`` 0.
    """

    UUID = uuid.UUID("b6c53aba-9669-4668-a7f2-205629d00f86")
    CMD_GENERATE: Final = 0

    def open_session(self, session: GpSession, types: int, params: list[GpParam]) -> None:
        _expect(types)

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
        if cmd != self.CMD_GENERATE:
            raise GpTaError(_BAD_PARAMETERS, f"command {cmd}")
        _expect(types, T.TEE_PARAM_TYPE_MEMREF_OUTPUT)
        buf = params[0].buffer
        if buf is not None:
            buf[: params[0].size] = os.urandom(params[0].size)


class SecureStorage(GpTA):
    """optee_examples secure_storage: objects in GP trusted storage, named by the client.

    UUID and command ids: linaro-swg/optee_examples:secure_storage/ta/include/
    secure_storage_ta.h@934c7ed (READ_RAW 0, WRITE_RAW 1, DELETE 2).  Behaviour
    (secure_storage/ta/secure_storage_ta.c): WRITE_RAW (MEMREF_INPUT id, MEMREF_INPUT
    data) creates the object with ACCESS_READ|WRITE|WRITE_META|OVERWRITE and writes the
    data; READ_RAW (MEMREF_INPUT id, MEMREF_OUTPUT data) opens it ACCESS_READ|SHARE_READ
    and answers SHORT_BUFFER with the size needed, else the data and its size; DELETE
    (MEMREF_INPUT id) opens it ACCESS_READ|WRITE_META and deletes it.  A missing object
    is the storage's ITEM_NOT_FOUND; other types are BAD_PARAMETERS, other commands
    NOT_SUPPORTED; open accepts any params.  ``TA_FLAGS`` = TA_FLAG_SINGLE_INSTANCE
    (secure_storage/ta/user_ta_header_defines.h).  The host (secure_storage/host/main.c)
    writes, reads back and deletes 7000 bytes of 0xA1 as ``object#1``, then creates
    ``object#2`` if it is missing or deletes it if present.
    """

    UUID = uuid.UUID("f4e750bb-1437-4fbf-8785-8d3580c34994")
    FLAGS = TaFlag.TA_FLAG_SINGLE_INSTANCE
    CMD_READ_RAW: Final = 0
    CMD_WRITE_RAW: Final = 1
    CMD_DELETE: Final = 2

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
        if cmd == self.CMD_WRITE_RAW:
            self._write(types, params)
        elif cmd == self.CMD_READ_RAW:
            self._read(types, params)
        elif cmd == self.CMD_DELETE:
            _expect(types, T.TEE_PARAM_TYPE_MEMREF_INPUT)
            flags = TEE_DATA_FLAG_ACCESS_READ | TEE_DATA_FLAG_ACCESS_WRITE_META
            trusted_storage(self).open(_memref(params[0]), flags).close_and_delete()
        else:
            raise GpTaError(_NOT_SUPPORTED, f"command {cmd:#x}")

    def _write(self, types: int, params: list[GpParam]) -> None:
        _expect(types, T.TEE_PARAM_TYPE_MEMREF_INPUT, T.TEE_PARAM_TYPE_MEMREF_INPUT)
        flags = (
            TEE_DATA_FLAG_ACCESS_READ
            | TEE_DATA_FLAG_ACCESS_WRITE
            | TEE_DATA_FLAG_ACCESS_WRITE_META
            | TEE_DATA_FLAG_OVERWRITE
        )
        obj = trusted_storage(self).create(_memref(params[0]), flags)
        try:
            obj.write(_memref(params[1]))
        except GpTaError:
            obj.close_and_delete()
            raise
        obj.close()

    def _read(self, types: int, params: list[GpParam]) -> None:
        _expect(types, T.TEE_PARAM_TYPE_MEMREF_INPUT, T.TEE_PARAM_TYPE_MEMREF_OUTPUT)
        flags = TEE_DATA_FLAG_ACCESS_READ | TEE_DATA_FLAG_SHARE_READ
        obj = trusted_storage(self).open(_memref(params[0]), flags)
        try:
            out = params[1]
            if obj.size > out.size:
                out.size = obj.size
                raise GpTaError(_SHORT_BUFFER, f"the object holds {obj.size} bytes")
            data = obj.read(obj.size)
            if out.buffer is not None:
                out.buffer[: len(data)] = data
            out.size = len(data)
        finally:
            obj.close()


def _memref(p: GpParam) -> bytes:
    return b"" if p.buffer is None else bytes(p.buffer[: p.size])


class _HotpKey:
    """``struct hotp_key``: the session's shared key and RFC 4226 counter."""

    __slots__ = ("counter", "key")

    def __init__(self) -> None:
        self.key = b""
        self.counter = 0


class Hotp(GpTA):
    """optee_examples hotp: RFC 4226 one-time passwords from a key the client shares.

    UUID and command ids: linaro-swg/optee_examples:hotp/ta/include/hotp_ta.h@934c7ed
    (REGISTER_SHARED_KEY 0, GET_HOTP 1).  Behaviour (hotp/ta/hotp_ta.c): open takes no
    params and gives the session its own key and counter (zero); REGISTER_SHARED_KEY
    takes exactly MEMREF_INPUT, at most 64 bytes; GET_HOTP takes exactly VALUE_OUTPUT,
    computes HMAC-SHA1(key, 8-byte big-endian counter), increments the counter (even
    when the key is not 10..64 bytes, which is BAD_PARAMETERS), and returns the dynamic
    truncation mod 10^6 in value.a; other commands BAD_PARAMETERS.  The host
    (hotp/host/main.c) registers RFC 4226's key "12345678901234567890" through a
    temporary memref (shared memory) and checks the ten test values 755224 ... 520489.
    """

    UUID = uuid.UUID("484d4143-2d53-4841-3120-4a6f636b6542")
    CMD_REGISTER_SHARED_KEY: Final = 0
    CMD_GET_HOTP: Final = 1
    MIN_KEY_SIZE: Final = 10
    MAX_KEY_SIZE: Final = 64

    def open_session(self, session: GpSession, types: int, params: list[GpParam]) -> None:
        _expect(types)
        session.context = _HotpKey()

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
        state = session.context
        assert isinstance(state, _HotpKey)
        if cmd == self.CMD_REGISTER_SHARED_KEY:
            _expect(types, T.TEE_PARAM_TYPE_MEMREF_INPUT)
            if params[0].size > self.MAX_KEY_SIZE:
                raise GpTaError(_BAD_PARAMETERS, "key longer than 64 bytes")
            state.key = _memref(params[0])
        elif cmd == self.CMD_GET_HOTP:
            _expect(types, T.TEE_PARAM_TYPE_VALUE_OUTPUT)
            counter = state.counter.to_bytes(8, "big")
            state.counter = (state.counter + 1) % (1 << 64)
            if not self.MIN_KEY_SIZE <= len(state.key) <= self.MAX_KEY_SIZE:
                raise GpTaError(_BAD_PARAMETERS, "no key of 10 to 64 bytes registered")
            mac = hmac.new(state.key, counter, hashlib.sha1).digest()
            offset = mac[19] & 0xF
            code = int.from_bytes(mac[offset : offset + 4], "big") & 0x7FFF_FFFF
            params[0].a = code % 1_000_000
        else:
            raise GpTaError(_BAD_PARAMETERS, f"command {cmd}")


class Plugins(GpTA):
    """optee_examples plugins: PING (0) sends "Hello, plugin! value = 0x<n>" (n counting
    from 0 per instance, no NUL) to the syslog plugin with TO_SYSLOG_CMD (0) and LOG_INFO
    (6) as sub-command, and returns what ``tee_invoke_supp_plugin`` returned.

    UUIDs and ids: linaro-swg/optee_examples:plugins/ta/include/plugin_ta.h@934c7ed;
    behaviour: plugins/ta/plugin_ta.c (open and PING take no params, BAD_PARAMETERS
    otherwise; other commands NOT_SUPPORTED).  ``TA_FLAGS`` 0.
    """

    UUID = uuid.UUID("2a287631-de1b-4fdd-a55c-b9312e40769a")
    SYSLOG_PLUGIN: Final = uuid.UUID("96bcf744-4f72-4866-bf1d-8634fd9c65e5")
    CMD_PING: Final = 0

    def create(self) -> None:
        self.count = 0

    def open_session(self, session: GpSession, types: int, params: list[GpParam]) -> None:
        _expect(types)

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
        _expect(types)
        if cmd != self.CMD_PING:
            raise GpTaError(TeecResult.TEEC_ERROR_NOT_SUPPORTED, f"command {cmd}")
        line = f"Hello, plugin! value = {self.count:#x}".encode()
        self.count += 1
        invoke_supp_plugin(self, self.SYSLOG_PLUGIN, 0, 6, bytearray(line))


def syslog_plugin(cmd: int, sub_cmd: int, data: bytes) -> tuple[int, bytes]:
    """optee_examples' syslog plugin (plugins/syslog/syslog_plugin.c@934c7ed) for the
    model's supplicant: TO_SYSLOG (0) logs ``data`` with priority ``sub_cmd``, here as a
    line ``<priority> <text>`` appended to the file ``$QTEE_TEST_SYSLOG``; SUCCESS, no
    output.  Any other cmd is NOT_SUPPORTED."""
    if cmd != 0:
        return int(TeecResult.TEEC_ERROR_NOT_SUPPORTED), b""
    with open(os.environ["QTEE_TEST_SYSLOG"], "a", encoding="utf-8") as f:
        f.write(f"{sub_cmd} {data.decode(errors='replace')}\n")
    return 0, b""


# ----------------------------------------------------------------------------- TA files

#: The GP TAs that exist only as ``<uuid>.ta`` files (found through LOAD_TA).
TA_FILES: Final = (SecureStorage,)


def write_ta_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Write ``<uuid>.ta`` for each of :data:`TA_FILES` into ``directory``
    (tee-supplicant's ``--ta-path``), laid out as OP-TEE signs TAs
    (:func:`~qtee.secure._tafiles.signed_ta_image`); the paths written."""
    paths = []
    for cls in TA_FILES:
        path = Path(directory) / f"{cls.UUID}.ta"
        path.write_bytes(signed_ta_image(cls.UUID))
        paths.append(path)
    return paths


def register() -> Callable[[], None]:
    """Register every TA above (done on import); returns the undo, which puts back what
    was registered for the same UUIDs before (a test process's registry stays as it
    was: ``tests/bridge/test_peer_tas.py`` registers per test)."""
    undo: list[Callable[[], None]] = []
    for cls in (HelloWorld, Random, Hotp, Plugins):
        previous = lookup_gp_ta(cls.UUID)
        register_gp_ta(cls)
        undo.append(functools.partial(_restore_gp, cls, previous))
    regs = [register_ta_file(SmciExample, sha256=SKELETON_SHA256)]
    regs += [register_ta_file(cls) for cls in TA_FILES]
    undo += [reg.unregister for reg in regs]

    def unregister() -> None:
        while undo:
            undo.pop()()

    return unregister


def _restore_gp(cls: type[GpTA], previous: type[GpTA] | None) -> None:
    if lookup_gp_ta(cls.UUID) is not cls:
        return  # replaced since: not ours to undo
    if previous is None:
        unregister_gp_ta(cls.UUID)
    else:
        register_gp_ta(previous)


#: Undoes the registrations made on import (idempotent).
unregister = register()
