"""The FS store's confinement: a request's path as components under the root, and
directories walked one component at a time.

**Confinement.**  Paths are relative to the root and are normalised lexically: empty
and ``.`` components are dropped, and ``..`` pops one component.  The store refuses
these with **EACCES**:

* an absolute path;
* a ``..`` that would climb above the root;
* a component that starts with the temp prefix ``.qtee-tmp-``;
* a symlink anywhere in the path, even one pointing back inside the root.

The store never creates symlinks, so any symlink was put there by someone else.
Directories are walked one component at a time from a root fd, with
``O_DIRECTORY | O_NOFOLLOW``.  Files are opened with ``O_NOFOLLOW``.  A symlink swapped
in mid-walk therefore fails the walk and is never followed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from typing import Final

from supplicant._errno import ErrnoFailure
from supplicant.fs_msg import MAX_PATH_BYTES, FsUsageError

__all__ = ["TEMP_PREFIX", "FsError"]

TEMP_PREFIX: Final = ".qtee-tmp-"
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class FsError(ErrnoFailure):
    """An FS operation failed with ``errno`` (the listener answers -1 and keeps it)."""


def _fail(code: int, what: str) -> FsError:
    return FsError(code, what)


def _check_int(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise FsUsageError(f"{what} must be an int, not {type(value).__name__}")
    return value


def _parts(path: object) -> tuple[str, ...]:
    """The confined, normalised components of ``path`` (``()`` is the root)."""
    if not isinstance(path, str):
        raise FsUsageError(f"path must be a str, not {type(path).__name__}")
    if path == "":
        raise _fail(errno.ENOENT, "empty path")
    try:
        raw = os.fsencode(path)
    except UnicodeEncodeError:
        raise _fail(errno.EINVAL, f"path {path!r} cannot be encoded") from None
    if b"\0" in raw:
        raise _fail(errno.EINVAL, f"path {path!r} contains a NUL byte")
    if len(raw) > MAX_PATH_BYTES:
        raise _fail(errno.ENAMETOOLONG, f"path is {len(raw)} bytes; at most {MAX_PATH_BYTES}")
    if path.startswith("/"):
        raise _fail(errno.EACCES, f"absolute path {path!r} is outside the store")
    out: list[str] = []
    for comp in path.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if not out:
                raise _fail(errno.EACCES, f"path {path!r} climbs above the store's root")
            out.pop()
        elif comp.startswith(TEMP_PREFIX):
            raise _fail(errno.EACCES, f"path {path!r} names a reserved temp file")
        else:
            out.append(comp)
    return tuple(out)


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def _reraise(exc: OSError, what: str) -> FsError:
    return FsError(exc.errno or errno.EIO, f"{what}: {exc.strerror}")


def _step(fd: int, comp: str, where: str, create: bool, mode: int) -> int:
    """Open directory ``comp`` under ``fd`` without following a symlink."""
    try:
        return os.open(comp, _DIR_FLAGS, dir_fd=fd)
    except FileNotFoundError:
        if not create:
            raise _fail(errno.ENOENT, f"no directory {where!r}") from None
    except OSError as exc:
        if _is_link(comp, fd):
            raise _fail(errno.EACCES, f"{where!r} is a symlink") from None
        raise _reraise(exc, f"directory {where!r}") from None
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(comp, mode, dir_fd=fd)
        os.fsync(fd)
        return os.open(comp, _DIR_FLAGS, dir_fd=fd)
    except OSError as exc:
        if _is_link(comp, fd):
            raise _fail(errno.EACCES, f"{where!r} is a symlink") from None
        raise _reraise(exc, f"directory {where!r}") from None


def _is_under(path: str, top: str) -> bool:
    return path == top or path.startswith(top + "/")
