"""The FS listener's side of the store: one request in, one response out.

:meth:`FileStore.handle <supplicant.FileStore.handle>` decodes a request
(:mod:`supplicant.fs_msg`); :func:`respond` runs it on the store's methods and answers
the way the real service does: ``ret`` = -1 and the errno remembered for GET_ERRNO.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Final

from supplicant._fs_paths import FsError, _fail

if TYPE_CHECKING:
    from supplicant._fs import FileStore
from supplicant.fs_msg import (
    MAX_DATA_LEN,
    CloseRequest,
    CreatRequest,
    DirCloseRequest,
    DirOpenRequest,
    DirOpenResponse,
    DirReadRequest,
    DirReadResponse,
    EndRequest,
    FsCmd,
    FsOpenFlag,
    FsRequest,
    FsResponse,
    FsResult,
    GetErrnoRequest,
    LseekRequest,
    MkdirRequest,
    OpenRequest,
    ReadRequest,
    ReadResponse,
    RemoveRequest,
    RenameRequest,
    StatusResponse,
    SyncRequest,
    UnlinkRequest,
    UnsupportedRequest,
    WriteRequest,
)

__all__ = ["respond"]

_KNOWN_IDS: Final = frozenset(int(c) for c in FsCmd)
_F = FsOpenFlag


def _cmd_of(req: FsRequest) -> int:
    return req.cmd_id if isinstance(req, UnsupportedRequest) else req.CMD


def respond(store: FileStore, req: FsRequest) -> FsResponse:
    """Run ``req`` on ``store``; a failure is the response the real service sends, its errno
    remembered for GET_ERRNO.  (Under the store's lock.)"""
    try:
        return _run(store, req)
    except FsError as exc:
        store._errno = exc.code
        return _failure(req, exc.code)


def _failure(req: FsRequest, code: int) -> FsResponse:
    match req:
        case ReadRequest():
            return ReadResponse(data=b"", ret=-1)
        case DirOpenRequest():
            return DirOpenResponse(pdir=0, ret=FsResult.DIR_NOT_EXIST)
        case DirReadRequest():
            return DirReadResponse(entry=None, ret=FsResult.INVALID_ARG)
        case DirCloseRequest():
            return StatusResponse(cmd_id=FsCmd.DIR_CLOSE, ret=FsResult.INVALID_ARG)
        case _:
            return StatusResponse(cmd_id=_cmd_of(req), ret=-1)


def _run(store: FileStore, req: FsRequest) -> FsResponse:
    def ok(cmd: int, ret: int = 0) -> StatusResponse:
        return StatusResponse(cmd_id=cmd, ret=ret)

    match req:
        case OpenRequest(path=path, flags=flags):
            return ok(req.CMD, store.open(path, flags))
        case CreatRequest(path=path, mode=mode):
            creat = _F.O_WRONLY | _F.O_CREAT | _F.O_TRUNC
            return ok(req.CMD, store.open(path, creat, mode & 0o7777))
        case ReadRequest(fd=fd, count=count):
            data = store.read(fd, min(count, MAX_DATA_LEN))
            return ReadResponse(data=data, ret=len(data))
        case WriteRequest(fd=fd, data=data):
            return ok(req.CMD, store.write(fd, data))
        case CloseRequest(fd=fd):
            store.close(fd)
        case SyncRequest(fd=fd):
            store.fsync(fd)
        case LseekRequest(fd=fd, offset=offset, whence=whence):
            return ok(req.CMD, store.lseek(fd, offset, whence))
        case UnlinkRequest(path=path):
            store.unlink(path)
        case RemoveRequest(path=path):
            store.remove(path)
        case MkdirRequest(path=path, mode=mode):
            store.mkdir(path, mode & 0o777)
        case RenameRequest(old=old, new=new):
            store.rename(old, new)
        case DirOpenRequest(path=path):
            return DirOpenResponse(pdir=store.opendir(path), ret=0)
        case DirReadRequest(pdir=pdir):
            return DirReadResponse(entry=store.readdir(_open_stream(store, pdir)), ret=0)
        case DirCloseRequest(pdir=pdir):
            store.closedir(_open_stream(store, pdir))
        case GetErrnoRequest():
            return ok(req.CMD, store._errno)
        case EndRequest():
            pass
        case UnsupportedRequest(cmd_id=cmd_id):
            if cmd_id in _KNOWN_IDS:
                raise _fail(errno.ENOSYS, f"command {FsCmd(cmd_id).name} is not implemented")
            return ok(cmd_id, -1)
    return ok(_cmd_of(req))


def _open_stream(store: FileStore, pdir: int) -> int:
    """``pdir`` if it names an open directory stream (EINVAL for NULL, EBADF otherwise)."""
    if pdir == 0:
        raise _fail(errno.EINVAL, "directory stream 0 (NULL)")
    if pdir not in store._dirs:
        raise _fail(errno.EBADF, f"directory stream {pdir} is not open")
    return pdir
