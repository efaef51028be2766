"""One exception hierarchy for both error channels.

The kernel keeps two channels apart and so does qtee:

* the **errno channel** -- the ioctl itself fails and nothing is written back
  (:class:`DriverError`, an :class:`OSError` carrying the kernel's errno);
* the **result channel** -- the ioctl succeeds and ``ret`` carries the callee's result
  (:class:`QteeError`, carrying the signed result).

Everything else splits into "the caller broke it" (:class:`UsageError`) and "the other
side sent something malformed" (:class:`DecodeError`).

A :class:`QteeError` names its result the way the interface that answered does: a member
of an interface's error enum (``IAppLoader.ERROR_INVALID_BUFFER``, an ``IntEnum`` named
after the interface) is named ``IAppLoader.ERROR_INVALID_BUFFER``; a generic result by its
registered result name (:func:`objects.register_results`).  The name and the ``detail``
are the model's own: they never cross the wire (only the number does).
"""

from __future__ import annotations

import enum
import errno as _errno
import os
from typing import Any

from objects._results import is_result_member, result_name

__all__ = ["DecodeError", "DriverError", "QteeBaseError", "QteeError", "UsageError"]

#: Linux's ENOTSUPP (kernel-internal, 524): what a driver returns for a call it lacks.
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


def interface_error_name(result: int) -> str | None:
    """``IAppLoader.ERROR_INVALID_BUFFER`` for a member of an interface's error enum (any
    ``IntEnum`` but a registered result table), None for anything else."""
    if isinstance(result, enum.IntEnum) and not is_result_member(result):
        return f"{type(result).__name__}.{result.name}"
    return None


class QteeError(QteeBaseError):
    """The result channel: the callee (a TEE or a callback object) answered with ``result`` != 0.

    ``name`` says what the result means: given, or taken from ``result`` when it is a
    member of an interface's error enum (``IAppLoader.ERROR_INVALID_BUFFER``), else the
    generic :func:`result_name`.  ``detail`` is why, when the side that answered said so.
    Both are the model's: the answer on the wire is the number alone."""

    def __init__(self, result: int, detail: str = "", *, name: str = "") -> None:
        if not isinstance(result, int) or isinstance(result, bool) or result == 0:
            raise ValueError(f"a QteeError needs a non-zero int result, not {result!r}")
        if not isinstance(detail, str) or not isinstance(name, str):
            raise TypeError("a QteeError's detail and name are str")
        self.result = result
        self.detail = detail
        #: ``IAppLoader.ERROR_INVALID_BUFFER``, ``ERROR_INVALID``, ``USERBASE+3``...
        self.name = name or interface_error_name(result) or result_name(result)
        text = f"QTEE result {int(result)} ({self.name})"
        super().__init__(f"{text}: {detail}" if detail else text)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), int(self.result), self.detail, self.name))


def _rebuild(cls: type[QteeError], result: int, detail: str, name: str) -> QteeError:
    return cls(result, detail, name=name)


class UsageError(QteeBaseError, ValueError):
    """The caller passed something the API cannot accept (names what was wrong)."""


class DecodeError(QteeBaseError, ValueError):
    """Bytes from the other side are malformed (says where and what)."""


def publish_errors(package: str, namespace: dict[str, object], names: list[str]) -> None:
    """Name ``package`` as the home of the exception classes it exports that live in a
    private module, so tracebacks and reprs say ``objects.QteeError``, not
    ``objects._errors.QteeError`` (an exported class keeps the first public home it gets;
    pickling by reference still finds it there)."""
    for name in names:
        obj = namespace.get(name)
        if (
            isinstance(obj, type)
            and issubclass(obj, BaseException)
            and any(part.startswith("_") for part in obj.__module__.split("."))
        ):
            obj.__module__ = package
