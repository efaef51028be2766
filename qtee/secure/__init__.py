"""The secure world model: QTEE's object table, root, client env and services.

It consumes byte-exact inbound messages, writes responses in place, piggybacks async
RELEASE messages on the outbound buffer, and calls back into non-secure objects through
an outbound callback message that the driver serves in the same thread.  The
:class:`SecureMonitor` is its SMC entry: it routes each call to the partition (one
:class:`SecureWorld` per client id) that ``a7`` names.

TAs written in Python: QTEE TAs (:class:`TrustedApp`, ops declared with
:func:`objects.op`) and GP TAs (:class:`GpTA`, the ``TA_*EntryPoint`` methods, with
:class:`GpParam`, :class:`GpTaError` and :func:`panic`).  Which class a load finds is
registered per world (``world.tas``, a :class:`TaRegistry`) or process-wide
(:func:`register_ta`, :func:`register_gp_ta`, :func:`register_loadable_ta`,
:func:`register_ta_file`).
"""

from objects import publish_errors as _publish_errors
from qtee.secure import _gp, _interface_errors
from qtee.secure._apps import (
    APP_LOADER_UID,
    AppController,
    AppLoader,
    TrustedApp,
    register_ta,
    ta_image,
    unregister_ta,
)
from qtee.secure._gp import *  # noqa: F403  (the GP TA author's API: its __all__)
from qtee.secure._gpclient import CGPAPPCLIENT_UID, install_gp_app_client
from qtee.secure._interface_errors import *  # noqa: F403  (each interface's errors)
from qtee.secure._listeners import REGISTER_LISTENER_UID, REGISTER_TA_BUF_UID
from qtee.secure._monitor import SecureMonitor
from qtee.secure._registry import TaRegistry
from qtee.secure._rpmb_fs import rpmb_huk, set_rpmb_huk
from qtee.secure._services import (
    CDIAGNOSTICS_UID,
    FEATURE_VERSIONS_UID,
    IOPENER_ERROR_NOT_FOUND,
    ClientEnv,
    Diagnostics,
    FeatureVersions,
    QteeRoot,
)
from qtee.secure._signing import (
    TEE_ALG_ECDSA_SHA256,
    TEE_ALG_RSASSA_PKCS1_PSS_MGF1_SHA256,
    TEE_ALG_RSASSA_PKCS1_V1_5_SHA256,
    default_model_key,
)
from qtee.secure._storage_listeners import GpfsClient, GpfsError, RpmbClient, RpmbError
from qtee.secure._tafiles import TaFileRegistration, register_ta_file
from qtee.secure._world import Mapping, NsObject, SecureObject, SecureWorld, ServeCallback

__all__ = [
    "TEE_ALG_ECDSA_SHA256",
    "TEE_ALG_RSASSA_PKCS1_PSS_MGF1_SHA256",
    "TEE_ALG_RSASSA_PKCS1_V1_5_SHA256",
    "default_model_key",
    "rpmb_huk",
    "set_rpmb_huk",
    "APP_LOADER_UID",
    "AppController",
    "AppLoader",
    "TrustedApp",
    "register_ta",
    "ta_image",
    "unregister_ta",
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
    "TaRegistry",
    "GpfsClient",
    "GpfsError",
    "RpmbClient",
    "RpmbError",
    "CGPAPPCLIENT_UID",
    "REGISTER_LISTENER_UID",
    "REGISTER_TA_BUF_UID",
    "install_gp_app_client",
]
__all__ += _gp.__all__
__all__ += _interface_errors.__all__

_publish_errors("qtee.secure", globals(), __all__)
