"""What a device server's path can fail with: :class:`ConnectError` (sans-IO but ``stat``).

A path longer than a socket address takes is ENAMETOOLONG before any socket is made; a
failed ``connect`` is read as the kernel's errno says, and a refused one is told apart
from a path that is no socket at all (ENOTSOCK).
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any, Final

from objects import DriverError, errno_name

__all__ = ["ConnectError"]


class ConnectError(DriverError):
    """No device server can be reached at ``path``.  ``errno`` says why: ENOENT (nothing
    there), ENOTSOCK (not a socket), ECONNREFUSED (a socket nobody listens on), EACCES (no
    permission), ENAMETOOLONG (longer than a socket address takes)..."""

    def __init__(self, code: int, path: str, why: str) -> None:
        super().__init__(code, f"cannot connect to {path}: {why}")
        #: The path that was tried.
        self.path = path
        #: Why, in words.
        self.why = why

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.code, self.path, self.why))

    def __str__(self) -> str:
        return f"[{errno_name(self.code)}] {self.detail}"


#: The longest socket path (``sun_path``: 108 bytes, no NUL needed; as ``qtee serve``'s).
_SUN_PATH_MAX: Final = 108


def _connect_error(path: str, exc: OSError) -> ConnectError:
    """What a failed ``connect(path)`` means, in one line."""
    code = exc.errno or errno.ECONNREFUSED
    if code in (errno.ECONNREFUSED, errno.EPROTOTYPE):
        try:  # connecting to a file that is not a socket is refused as well
            mode = os.stat(path).st_mode
        except OSError:
            mode = stat.S_IFSOCK
        if not stat.S_ISSOCK(mode):
            what = "a directory" if stat.S_ISDIR(mode) else "a file"
            return ConnectError(errno.ENOTSOCK, path, f"it is {what}, not a socket")
        return ConnectError(errno.ECONNREFUSED, path, "nothing listens on it (its server has gone)")
    if code == errno.ENOENT:
        return ConnectError(code, path, "no such socket (is `qtee serve` running there?)")
    if code in (errno.EACCES, errno.EPERM):
        return ConnectError(errno.EACCES, path, "permission denied")
    return ConnectError(code, path, os.strerror(code))


def _check_path(path: str) -> None:
    """A path a socket address can hold (ENAMETOOLONG otherwise, as the kernel says)."""
    size = len(os.fsencode(path))
    if not size:
        raise ConnectError(errno.ENOENT, path, "the path is empty")
    if size > _SUN_PATH_MAX:
        raise ConnectError(
            errno.ENAMETOOLONG,
            path,
            f"the path is {size} bytes, a socket path takes at most {_SUN_PATH_MAX}",
        )
