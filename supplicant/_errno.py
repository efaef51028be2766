"""The supplicant's errno-carrying failures: a service call that failed with an errno.

The FS store (:class:`supplicant.FsError`) and the TA directory (``TaImageError``) answer
their callers with an errno; each subclasses :class:`ErrnoFailure`, which keeps the errno
and a model-only ``detail`` and pickles back to the same class.
"""

from __future__ import annotations

import os
from typing import Self

from objects import QteeBaseError

__all__ = ["ErrnoFailure"]


class ErrnoFailure(QteeBaseError, OSError):
    """A call failed with ``errno``; the message is ``strerror(errno): detail``."""

    def __init__(self, code: int, detail: str) -> None:
        OSError.__init__(self, code, f"{os.strerror(code)}: {detail}")
        self.detail = detail

    @property
    def code(self) -> int:
        """The errno (never None)."""
        return int(self.errno or 0)

    def __reduce__(self) -> tuple[type[Self], tuple[int, str]]:
        return (type(self), (self.code, self.detail))
