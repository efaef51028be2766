"""supplicant -- userspace services that QTEE calls back into.

* :class:`WorkerPool`: threads serving a client's callback objects over SUPPL_RECV/SEND.
* :class:`FileStore`: the file-storage listener's backend (listener 0xA), confined to a
  directory, with atomic replace.
"""

from supplicant._fs import FileStore, FsError
from supplicant._pool import WorkerPool

__all__ = ["FileStore", "FsError", "WorkerPool"]
