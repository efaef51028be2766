"""Each QTEE interface's errors, gathered: an ``IntEnum`` per interface, named after it,
defined beside the interface's service (``_apps``, ``_gpclient``, ``_listeners``,
``_services``).  A client matches a failed call's result against them, so :mod:`qtee`
and :mod:`qtee.secure` both re-export this list."""

from qtee.secure._apps import IAppController, IAppLoader
from qtee.secure._gpclient import IGPAppClient, IGPSession
from qtee.secure._listeners import IRegisterListenerCBO, IRegisterTABufCBO
from qtee.secure._services import IIO, IDiagnostics, IOpener

__all__ = [
    "IAppController",
    "IAppLoader",
    "IDiagnostics",
    "IGPAppClient",
    "IGPSession",
    "IIO",
    "IOpener",
    "IRegisterListenerCBO",
    "IRegisterTABufCBO",
]
