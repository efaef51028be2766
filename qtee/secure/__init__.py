"""The secure world model: QTEE's object table, root, client env and services.

It consumes byte-exact inbound messages, writes responses in place, piggybacks async
RELEASE messages on the outbound buffer, and calls back into non-secure objects through
an outbound callback message that the driver serves in the same thread.  The
:class:`SecureMonitor` is its SMC entry: it routes each call to the partition (one
:class:`SecureWorld` per client id) that ``a7`` names.
"""

from qtee.secure._apps import (
    APP_LOADER_UID,
    AppController,
    AppLoader,
    IAppController,
    IAppLoader,
    TrustedApp,
    register_ta,
    ta_image,
    unregister_ta,
)
from qtee.secure._gpclient import IGPAppClient, IGPSession
from qtee.secure._listeners import IRegisterListenerCBO, IRegisterTABufCBO
from qtee.secure._monitor import SecureMonitor
from qtee.secure._services import (
    CDIAGNOSTICS_UID,
    FEATURE_VERSIONS_UID,
    IIO,
    IOPENER_ERROR_NOT_FOUND,
    ClientEnv,
    Diagnostics,
    FeatureVersions,
    IDiagnostics,
    IOpener,
    QteeRoot,
)
from qtee.secure._tafiles import TaFileRegistration, register_ta_file
from qtee.secure._world import Mapping, NsObject, SecureObject, SecureWorld, ServeCallback

__all__ = [
    "APP_LOADER_UID",
    "AppController",
    "AppLoader",
    "TrustedApp",
    "register_ta",
    "ta_image",
    "unregister_ta",
    "IAppController",
    "IAppLoader",
    "IDiagnostics",
    "IGPAppClient",
    "IGPSession",
    "IIO",
    "IOpener",
    "IRegisterListenerCBO",
    "IRegisterTABufCBO",
    "TaFileRegistration",
    "register_ta_file",
    "CDIAGNOSTICS_UID",
    "FEATURE_VERSIONS_UID",
    "IOPENER_ERROR_NOT_FOUND",
    "ClientEnv",
    "Diagnostics",
    "FeatureVersions",
    "Mapping",
    "NsObject",
    "QteeRoot",
    "SecureMonitor",
    "SecureObject",
    "SecureWorld",
    "ServeCallback",
]
