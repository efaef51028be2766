"""supplicant -- userspace services that QTEE calls back into.

* :class:`WorkerPool`: threads serving a client's callback objects over SUPPL_RECV/SEND.
* :class:`Supplicant`: the listener daemon (time 0xB, file storage 0xA, GPFS 0x7000,
  RPMB 0x2000, TA autoload).
* :class:`ListenerObject` (CListenerCBO) and :class:`TaBufferObject` (CRequestTABuffer).
* :class:`OpteeSupplicant`: tee-supplicant for the OP-TEE device (LOAD_TA, FS RPCs, plugins).
* :class:`TimeService`, :class:`FileStore` and :class:`TaDirectory`: the services behind them.
* :class:`GpfsService` and :class:`RpmbService`: QTEE's GPFS (0x7000) and RPMB (0x2000)
  listeners, on a directory and on an :class:`EmulatedRpmb`.
* :class:`EmulatedRpmb`: tee-supplicant's emulated RPMB partition (JEDEC frames, :func:`frame_mac`).
"""

from objects import publish_errors as _publish_errors
from supplicant import _rpmb
from supplicant._autoload import TaDirectory, format_uuid
from supplicant._fs import FileStore
from supplicant._fs_paths import FsError
from supplicant._gpfs import GpfsService
from supplicant._listener import (
    FS_LISTENER_ID,
    GPFS_BUFFER_SIZE,
    GPFS_LISTENER_ID,
    RPMB_BUFFER_SIZE,
    RPMB_LISTENER_ID,
    TIME_LISTENER_ID,
    ListenerObject,
    Supplicant,
    TaBufferObject,
)
from supplicant._optee import OpteeSupplicant, SuppPlugin, plugin_from_spec
from supplicant._pool import WorkerPool
from supplicant._rpmb import *  # noqa: F403  (the emulated device: every name in _rpmb.__all__)
from supplicant._rpmb_listener import RpmbService
from supplicant._time import TimeService

__all__ = [
    "FS_LISTENER_ID",
    "GPFS_BUFFER_SIZE",
    "GPFS_LISTENER_ID",
    "RPMB_BUFFER_SIZE",
    "RPMB_LISTENER_ID",
    "TIME_LISTENER_ID",
    "FileStore",
    "FsError",
    "GpfsService",
    "RpmbService",
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
__all__ += _rpmb.__all__

_publish_errors("supplicant", globals(), __all__)
