"""QTEE's root object, the client environment and the built-in services.

* Root (wire id 1): ``register`` (op 2) and ``registerWithCredentials`` (op 5) take a
  credentials object, read it through its IIO ops (0 ``getLength``, 1 ``readAtOffset``)
  as a CBOR map, keep it, and return a client environment.
* Client env: ``open`` (op 0) takes a u32 service UID and returns the service; an
  unknown UID answers ``IOpener.ERROR_NOT_FOUND`` (10).

Each interface's errors are an ``IntEnum`` named after it (:class:`IOpener`,
:class:`IIO`, :class:`IDiagnostics`), so a failed call names them.
* FeatureVersions (UID 2033): op 0, feature 10 -> the QTEE version word
  (major << 22 | minor << 12 | patch).
* Diagnostics (UID 143): op 0 ``queryHeapInfo`` -> six u32 heap figures.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Final

from objects import QteeError, op
from qtee import _idl
from qtee._idl import idl_op
from qtee._qcomtee_msg import Result
from qtee.credentials import Credentials
from qtee.secure._world import NsObject, SecureObject, SecureWorld

__all__ = [
    "CDIAGNOSTICS_UID",
    "FEATURE_VERSIONS_UID",
    "IOPENER_ERROR_NOT_FOUND",
    "ClientEnv",
    "IDiagnostics",
    "IIO",
    "IOpener",
    "Diagnostics",
    "FeatureVersions",
    "QteeRoot",
]

FEATURE_VERSIONS_UID: Final = 2033
FEATURE_VER_OP_GET_QTEE_ID: Final = 10
CDIAGNOSTICS_UID: Final = _idl.const("CDiagnostics", "CDiagnostics_UID")
#: IIO's ops, as QTEE calls them on a credentials object.
_IIO_GET_LENGTH: Final = _idl.op_number("IIO", "getLength")
_IIO_READ_AT_OFFSET: Final = _idl.op_number("IIO", "readAtOffset")


#: Each interface's errors, from its shipped ``.idl`` (quic-teec.md §5.3).
IOpener = _idl.errors("IOpener", __name__)
IIO = _idl.errors("IIO", __name__)
IDiagnostics = _idl.errors("IDiagnostics", __name__)

#: IOpener's NOT_FOUND under its name from before the enum.
IOPENER_ERROR_NOT_FOUND: Final = IOpener.ERROR_NOT_FOUND
_MAX_CREDENTIALS: Final = 64 * 1024

ServiceFactory = Callable[["ClientEnv"], SecureObject]


def _iio(result: int) -> int:
    """A credentials object's answer, by its IIO name when it has one."""
    try:
        named: int = IIO(result)
    except ValueError:
        return result
    return named


def read_credentials(cred: NsObject) -> Credentials:
    """Read a credentials object through IIO getLength/readAtOffset and parse its CBOR."""
    res = cred.invoke(_IIO_GET_LENGTH, ob=[8])
    if res.result != Result.OK or len(res.ob[0]) != 8:
        raise QteeError(_iio(res.result) or Result.ERROR_INVALID, "credentials getLength failed")
    (length,) = struct.unpack("<Q", res.ob[0])
    if length > _MAX_CREDENTIALS:
        raise QteeError(Result.ERROR_SIZE_IN, f"credentials of {length} bytes")
    data = b""
    while len(data) < length:
        res = cred.invoke(
            _IIO_READ_AT_OFFSET, ib=[struct.pack("<Q", len(data))], ob=[length - len(data)]
        )
        if res.result != Result.OK or not res.ob[0]:
            raise QteeError(
                _iio(res.result) or Result.ERROR_INVALID, "credentials readAtOffset failed"
            )
        data += res.ob[0]
    try:
        return Credentials.decode(data)
    except Exception:
        raise QteeError(Result.ERROR_INVALID, "credentials are not a CBOR map") from None


class ClientEnv(SecureObject):
    """A registered client's environment; keeps its credentials object until released."""

    ERRORS = IOpener

    def __init__(
        self,
        services: dict[int, ServiceFactory],
        credentials: Credentials | None,
        cred_obj: NsObject | None,
    ) -> None:
        self.services = services
        self.credentials = credentials
        self._cred_obj = cred_obj

    @idl_op("IClientEnv", "open")
    def open(self, uid: bytes) -> SecureObject:
        (number,) = struct.unpack("<I", uid)
        factory = self.services.get(number)
        if factory is None:
            raise QteeError(IOpener.ERROR_NOT_FOUND, f"no service with UID {number}")
        return factory(self)

    def on_release(self) -> None:
        if self._cred_obj is not None:
            self._cred_obj.release()
            self._cred_obj = None


class QteeRoot(SecureObject):
    """The root object (wire id 1)."""

    def __init__(self, services: dict[int, ServiceFactory] | None = None) -> None:
        versions, diagnostics = FeatureVersions(), Diagnostics()  # stateless: one instance
        self.services: dict[int, ServiceFactory] = {
            FEATURE_VERSIONS_UID: lambda env: versions,
            CDIAGNOSTICS_UID: lambda env: diagnostics,
        }
        self.services.update(services or {})
        self.loaded_apps: set[str] = set()

    def attach(self, world: SecureWorld) -> None:
        """Services that need the world (the app loader) are added here."""
        from qtee.secure._apps import APP_LOADER_UID, AppLoader
        from qtee.secure._listeners import (
            REGISTER_LISTENER_UID,
            REGISTER_TA_BUF_UID,
            RegisterListener,
            RegisterTABuffer,
        )

        self.services.setdefault(APP_LOADER_UID, lambda env: AppLoader(world, self.loaded_apps))
        # A fresh object per open: registrations belong to the object made through.
        self.services.setdefault(REGISTER_LISTENER_UID, lambda env: RegisterListener(world))
        self.services.setdefault(REGISTER_TA_BUF_UID, lambda env: RegisterTABuffer(world))

    def _register(self, cred: NsObject | None) -> ClientEnv:
        if cred is None:  # NULL credentials: the kernel's own privileged client
            return ClientEnv(self.services, None, None)
        credentials = read_credentials(cred)
        return ClientEnv(self.services, credentials, cred.retain())

    @idl_op("IClientEnv", "register")
    def register(self, cred: NsObject | None) -> ClientEnv:
        """IClientEnv_OP_register: credentials object -> client env."""
        return self._register(cred)

    @op(5, io=1, oo=1)
    def register_with_credentials(self, cred: NsObject | None) -> ClientEnv:
        """QCOMTEE_ROOT_OP_REG_WITH_CREDENTIALS."""
        return self._register(cred)


class FeatureVersions(SecureObject):
    """UID 2033: feature id -> version."""

    VERSION: Final = (2 << 22) | (1 << 12) | 0  # QTEE 2.1.0

    @op(0, ib=(4,), ob=(4,))
    def get(self, feature: bytes) -> bytes:
        (fid,) = struct.unpack("<I", feature)
        if fid != FEATURE_VER_OP_GET_QTEE_ID:
            raise QteeError(Result.ERROR_INVALID, f"unknown feature {fid}")
        return struct.pack("<I", self.VERSION)


class Diagnostics(SecureObject):
    """UID 143: IDiagnostics.queryHeapInfo -> six u32 figures."""

    ERRORS = IDiagnostics

    HEAP: Final = (1 << 20, 256 << 10, 768 << 10, 4096, 37, 128 << 10)

    @idl_op("IDiagnostics", "queryHeapInfo")
    def query_heap_info(self) -> bytes:
        return struct.pack("<6I", *self.HEAP)
