"""The GPFS listener's backend: GP trusted-storage files in two partitions of one directory.

:class:`GpfsService` serves the GPFS listener (0x7000, :mod:`supplicant.gpfs_msg`) on a
directory the user names: ``data/`` holds the data partition (the real service's
``/var/tmp/qtee_supplicant/vendor/tzstorage/``) and ``persist/`` the persist partition
(``/var/lib/tee/qtee_supplicant/``).  Each partition is a :class:`~supplicant.FileStore`,
so paths get its confinement (a ``..`` above the partition, a symlink or a temp name:
EACCES) and every write its atomic replace: a WRITE that answered ``err`` = 0 is on disk
and survives a crash of the supplicant; one cut short leaves the previous contents whole.

What each command does, as ``gpfs.c`` does it (cited in :mod:`supplicant.gpfs_msg`):

* The dispatch refuses a shared buffer shorter than 504 KiB (non-zero: the listener's
  callback fails with ``Object_ERROR``).
* An empty path answers EINVAL.  The real service appends the path to the partition's
  directory, so a leading ``/`` is one more separator: here it is dropped.
* READ opens the file read-only (a missing one: ENOENT), seeks to ``offset`` (negative:
  EINVAL) and reads at most ``count`` (clamped to 500 KiB) bytes.
* WRITE opens with O_CREAT | O_RDWR | O_SYNC, making missing parent directories; with
  ``backup`` it first copies a non-empty file to ``<path>.bak``; then it writes at
  ``offset`` without truncating (bytes past the written range stay; a gap reads as
  zeros) and answers the bytes written.
* REMOVE unlinks a file; a directory is EINVAL.  RENAME is ``rename(2)`` (a missing
  source or destination directory: ENOENT).
* GPFS_VERSION answers version 2, err 0; an unknown id answers err -1.

**Differences, chosen on purpose.**  The real read loop never ends when the file is
shorter than ``offset + count`` (``read`` returns 0 and the loop retries); here the read
stops at the end of the file and answers the bytes it got, the least surprising reading.
The real service answers EAGAIN to every command but VERSION while the persist
partition is not mounted; here both partitions are always there.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import Final

from objects import QteeError
from qtee import Result
from supplicant._fs import FileStore
from supplicant._fs_paths import FsError
from supplicant.fs_msg import FsOpenFlag
from supplicant.gpfs_msg import (
    GPFS_ERROR_NO_CMD,
    GPFS_FILE_SIZE,
    GPFS_SERVICE_BUF_LEN,
    GPFS_VERSION,
    GpfsRequest,
    GpfsResponse,
    GpfsUsageError,
    Partition,
    ReadRequest,
    ReadResponse,
    RemoveRequest,
    RenameRequest,
    StatusResponse,
    UnsupportedRequest,
    VersionRequest,
    VersionResponse,
    WriteRequest,
    WriteResponse,
    decode_request,
    encode_response,
)

__all__ = ["BACKUP_SUFFIX", "GpfsService"]

#: What a backup copy's name adds to the file's (``BAK`` in cmn.h).
BACKUP_SUFFIX: Final = ".bak"
_F = FsOpenFlag


class GpfsService:
    """GP file storage on ``root``: ``root/data`` and ``root/persist`` (made if missing)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        if not isinstance(root, str | os.PathLike):
            raise GpfsUsageError(f"root must be a path, not {type(root).__name__}")
        self.root = os.path.abspath(os.fspath(root))
        self.stores = {p: FileStore(os.path.join(self.root, p.value)) for p in Partition}
        self._lock = threading.Lock()

    def handle(self, request: bytes | bytearray | memoryview) -> bytes:
        """Serve one request from the whole shared buffer; the response bytes to write back.

        A buffer shorter than 504 KiB fails the callback (``QteeError`` ERROR), as the real
        dispatch does; a malformed request raises :class:`GpfsDecodeError`."""
        if len(request) < GPFS_SERVICE_BUF_LEN:
            raise QteeError(
                Result.ERROR,
                f"GPFS buffer is {len(request)} bytes; it needs {GPFS_SERVICE_BUF_LEN}",
            )
        req = decode_request(request)
        with self._lock:
            return encode_response(self.serve(req))

    def serve(self, req: GpfsRequest) -> GpfsResponse:
        """The response to one decoded request."""
        match req:
            case VersionRequest():
                return VersionResponse(version=GPFS_VERSION, err=0)
            case UnsupportedRequest():
                return StatusResponse(cmd_id=req.cmd_id, err=GPFS_ERROR_NO_CMD)
            case ReadRequest():
                try:
                    data = self.read(req.partition, req.path, req.offset, req.count)
                except FsError as exc:
                    return ReadResponse(cmd_id=req.cmd_id, err=exc.code, data=b"")
                return ReadResponse(cmd_id=req.cmd_id, err=0, data=data)
            case WriteRequest():
                try:
                    n = self.write(req.partition, req.path, req.offset, req.data, req.backup)
                except FsError as exc:
                    return WriteResponse(cmd_id=req.cmd_id, err=exc.code, written=0)
                return WriteResponse(cmd_id=req.cmd_id, err=0, written=n)
            case RemoveRequest() | RenameRequest():
                try:
                    if isinstance(req, RemoveRequest):
                        self.remove(req.partition, req.path)
                    else:
                        self.rename(req.partition, req.old, req.new)
                except FsError as exc:
                    return StatusResponse(cmd_id=req.cmd_id, err=exc.code)
                return StatusResponse(cmd_id=req.cmd_id, err=0)
            case _:
                raise GpfsUsageError(f"not a GPFS request record: {type(req).__name__}")

    # ------------------------------------------------------------------ operations

    def _store(self, partition: Partition) -> FileStore:
        if not isinstance(partition, Partition):
            raise GpfsUsageError(f"partition must be a Partition, not {type(partition).__name__}")
        return self.stores[partition]

    @staticmethod
    def _rel(path: str) -> str:
        if not isinstance(path, str):
            raise GpfsUsageError(f"path must be a str, not {type(path).__name__}")
        if path == "":
            raise FsError(errno.EINVAL, "empty path")
        rel = path.lstrip("/")
        if rel == "":
            raise FsError(errno.EISDIR, "the partition is a directory")
        return rel

    def read(self, partition: Partition, path: str, offset: int, count: int) -> bytes:
        """Up to ``count`` bytes (at most 500 KiB) of ``path`` from ``offset``."""
        store = self._store(partition)
        rel = self._rel(path)
        fd = store.open(rel, _F.O_RDONLY)
        try:
            if offset < 0:
                raise FsError(errno.EINVAL, f"offset {offset} is negative")
            store.lseek(fd, offset, os.SEEK_SET)
            return store.read(fd, min(count, GPFS_FILE_SIZE))
        finally:
            store.close(fd)

    def write(
        self, partition: Partition, path: str, offset: int, data: bytes, backup: bool = False
    ) -> int:
        """Write ``data`` at ``offset`` of ``path`` (created with its parents); bytes written."""
        store = self._store(partition)
        rel = self._rel(path)
        if backup:
            self._backup(store, rel)
        fd = store.open(rel, _F.O_CREAT | _F.O_RDWR)
        try:
            if offset < 0:
                raise FsError(errno.EINVAL, f"offset {offset} is negative")
            store.lseek(fd, offset, os.SEEK_SET)
            return store.write(fd, data[:GPFS_FILE_SIZE])
        finally:  # commits what was written: fsync, rename over the file, fsync the dir
            store.close(fd)

    def _backup(self, store: FileStore, rel: str) -> None:
        try:
            src = store.open(rel, _F.O_RDONLY)
        except FsError as exc:
            if exc.code == errno.ENOENT:
                return  # the real service creates the file first: an empty one has no backup
            raise
        try:
            chunks = []
            while chunk := store.read(src, 1 << 20):
                chunks.append(chunk)
        finally:
            store.close(src)
        content = b"".join(chunks)
        if not content:
            return
        dst = store.open(rel + BACKUP_SUFFIX, _F.O_CREAT | _F.O_WRONLY | _F.O_TRUNC)
        try:
            store.write(dst, content)
        finally:
            store.close(dst)

    def remove(self, partition: Partition, path: str) -> None:
        """Unlink the file ``path``; a directory is EINVAL."""
        store = self._store(partition)
        try:
            store.unlink(self._rel(path))
        except FsError as exc:
            if exc.code == errno.EISDIR:
                raise FsError(errno.EINVAL, f"{path!r} is a directory") from None
            raise

    def rename(self, partition: Partition, old: str, new: str) -> None:
        """``rename(old, new)`` inside the partition."""
        store = self._store(partition)
        store.rename(self._rel(old), self._rel(new))

    def close_all(self) -> None:
        """Drop any pending contents of both partitions (the supplicant is stopping)."""
        for store in self.stores.values():
            store.close_all()
