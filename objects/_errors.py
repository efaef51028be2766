"""One exception hierarchy for both error channels.

The kernel keeps two channels apart and so does qtee:

* the **errno channel** -- the ioctl itself fails and nothing is written back
  (:class:`DriverError`, an :class:`OSError` carrying the kernel's errno);
* the **result channel** -- the ioctl succeeds and ``ret`` carries QTEE's result
  (:class:`QteeError`, carrying the signed result).

Everything else splits into "the caller broke it" (:class:`UsageError`) and "the other
side sent something malformed" (:class:`DecodeError`).
"""

from __future__ import annotations

import errno as _errno
import os

from objects._results import result_name

__all__ = ["DecodeError", "DriverError", "QteeBaseError", "QteeError", "UsageError"]

#: Linux's ENOTSUPP (kernel-internal, 524): what SHM_REGISTER returns on qcomtee.
ENOTSUPP = 524

_ERRNO_NAMES = {ENOTSUPP: "ENOTSUPP", 512: "ERESTARTSYS"}


def errno_name(code: int) -> str:
    """``EINVAL`` for 22, ``ENOTSUPP`` for 524, the number otherwise."""
    return _ERRNO_NAMES.get(code) or _errno.errorcode.get(code, str(code))


class QteeBaseError(Exception):
    """Root of every qtee exception; never raised itself."""


class DriverError(QteeBaseError, OSError):
    """The errno channel: an ioctl (or a driver-model call) failed with ``errno``."""

    def __init__(self, code: int, detail: str = "") -> None:
        if not isinstance(code, int) or code <= 0:
            raise ValueError(f"errno must be a positive int, not {code!r}")
        message = os.strerror(code) if code != ENOTSUPP else "Operation not supported"
        if detail:
            message = f"{message}: {detail}"
        OSError.__init__(self, code, message)
        self.detail = detail

    @property
    def code(self) -> int:
        """The errno (never None, unlike ``OSError.errno``)."""
        return int(self.errno or 0)

    def __reduce__(self) -> tuple[type[DriverError], tuple[int, str]]:
        return (type(self), (self.code, self.detail))

    def __str__(self) -> str:
        return f"[{errno_name(self.code)}] {self.strerror}"


class QteeError(QteeBaseError):
    """The result channel: QTEE (or a callback object) answered with ``result`` != 0."""

    def __init__(self, result: int, detail: str = "") -> None:
        if not isinstance(result, int) or isinstance(result, bool) or result == 0:
            raise ValueError(f"a QteeError needs a non-zero int result, not {result!r}")
        self.result = result
        self.detail = detail
        text = f"QTEE result {result} ({result_name(result)})"
        super().__init__(f"{text}: {detail}" if detail else text)

    def __reduce__(self) -> tuple[type[QteeError], tuple[int, str]]:
        return (type(self), (self.result, self.detail))


class UsageError(QteeBaseError, ValueError):
    """The caller passed something the API cannot accept (names what was wrong)."""


class DecodeError(QteeBaseError, ValueError):
    """Bytes from the other side are malformed (says where and what)."""
