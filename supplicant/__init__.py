"""supplicant -- userspace services that QTEE calls back into.

* :class:`WorkerPool`: threads serving a client's callback objects over SUPPL_RECV/SEND.
* :class:`Supplicant`: the listener daemon (time 0xB, file storage 0xA, TA autoload).
* :class:`ListenerObject` (CListenerCBO) and :class:`TaBufferObject` (CRequestTABuffer).
* :class:`OpteeSupplicant`: tee-supplicant for the OP-TEE device (LOAD_TA, FS RPCs, plugins).
* :class:`TimeService`, :class:`FileStore` and :class:`TaDirectory`: the services behind them.
"""

from objects import publish_errors as _publish_errors
from supplicant._autoload import TaDirectory, format_uuid
from supplicant._fs import FileStore, FsError
from supplicant._listener import (
    FS_LISTENER_ID,
    TIME_LISTENER_ID,
    ListenerObject,
    Supplicant,
    TaBufferObject,
)
from supplicant._optee import OpteeSupplicant, SuppPlugin, plugin_from_spec
from supplicant._pool import WorkerPool
from supplicant._time import TimeService

__all__ = [
    "FS_LISTENER_ID",
    "TIME_LISTENER_ID",
    "FileStore",
    "FsError",
    "ListenerObject",
    "OpteeSupplicant",
    "SuppPlugin",
    "Supplicant",
    "TaBufferObject",
    "TaDirectory",
    "TimeService",
    "WorkerPool",
    "format_uuid",
    "plugin_from_spec",
]

_publish_errors("supplicant", globals(), __all__)
