"""The FS listener's backend: QTEE's persistent files, kept in one directory the user names.

:class:`FileStore` serves the FS listener's operations (:mod:`supplicant.fs_msg`) on a
real directory.  Its Python methods raise :class:`FsError`, an :class:`OSError` that
carries the errno.  :meth:`FileStore.handle` turns requests into responses the way the
real service does (:mod:`supplicant._fs_handler`): ``ret`` = -1 and the errno remembered
for GET_ERRNO.

**Confinement** (:mod:`supplicant._fs_paths`): a path is relative to the root, normalised
lexically and refused (EACCES) if it is absolute, climbs above the root, names a temp
file or crosses a symlink; directories are walked one component at a time.

**Atomic replace.**  Opening a file for writing copies its contents (none with O_TRUNC)
into a temp file ``.qtee-tmp-<hex>`` in the same directory.  Every fd open on that path
reads and writes this pending copy, so a read sees the pending contents.  When a
writable fd is closed or SYNCed and there are pending changes, the store commits them:

1. fsync the temp file;
2. ``rename`` it over the target;
3. fsync the directory.

If writers remain open, the next write or writable open starts a fresh temp file.  Data is
never written to the target in place.  A call that creates a file with
O_CREAT commits the empty file (and any missing parent directories) before it returns.

Errno conventions: a refused path is EACCES; a missing file or parent is ENOENT; an
unknown fd or stream is EBADF; bad flags, whence or offsets are EINVAL; a path with open
fds is EBUSY.  Wrong argument *types* raise :class:`~supplicant.fs_msg.FsUsageError`.

**"Acknowledged".**  A write is acknowledged when a later ``close`` or ``fsync`` of a
writable fd on the same path returns without error (``ret`` = 0 on the wire).  From then
on, those contents are on disk and survive a crash of this process; step 3 makes them
survive power loss as well, provided the disk honours fsync.  If the process dies before
that point, the file keeps its previous acknowledged contents in full.  It never holds a
mix of old and new, or a truncated copy.  :meth:`FileStore.close_all` discards pending
contents.

**Temp files.**  :meth:`FileStore.listdir` and directory streams never show temp files.
Creating a :class:`FileStore` deletes the ones a crash left behind, unless
``sweep=False``.  One root is owned by one FileStore at a time.

**Differences from the real service**, each chosen on purpose:

* Files are created with mode ``mode | 0600``, so the store can always read them back.
* O_TRUNC without write access is refused with EINVAL.
* MKDIR always adds the owner's rwx bits to the mode.  Like the real service, it creates
  any missing parents and succeeds if the directory already exists.
* REMOVE deletes a file or an *empty* directory, not a whole tree.
* While an fd is open on a path (or on anything under it), removing or renaming that path
  fails with EBUSY.
* O_SYNC and O_DSYNC add nothing, because every close is already durable.
* fds are small integers, allocated lowest-free from 1.  The real service returns the
  daemon's own host fds, which are never 0.
* Directory streams are snapshots: ``.`` and ``..``, then the entries sorted by name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

from supplicant._fs_handler import respond
from supplicant._fs_paths import (
    _DIR_FLAGS,
    TEMP_PREFIX,
    FsError,
    _check_int,
    _fail,
    _is_link,
    _is_under,
    _parts,
    _reraise,
    _step,
)
from supplicant.fs_msg import (
    Dirent,
    FsOpenFlag,
    FsUsageError,
    decode_request,
    encode_response,
)

__all__ = [
    "MAX_DIR_STREAMS",
    "MAX_FILE_SIZE",
    "MAX_OPEN_FILES",
    "FileStore",
]

MAX_OPEN_FILES: Final = 1024
MAX_DIR_STREAMS: Final = 64
#: Offsets travel as i32 on the wire; a file may not grow past what LSEEK can answer.
MAX_FILE_SIZE: Final = (1 << 31) - 1

_F = FsOpenFlag
_IGNORED_FLAGS: Final = (
    _F.O_NOCTTY | _F.O_NONBLOCK | _F.O_DSYNC | _F.O_SYNC | _F.O_LARGEFILE | _F.O_CLOEXEC
)
_KNOWN_FLAGS: Final = _F.O_ACCMODE | _F.O_CREAT | _F.O_EXCL | _F.O_TRUNC | _F.O_APPEND
_ALL_FLAGS: Final = int(_IGNORED_FLAGS | _KNOWN_FLAGS)
_DT: Final = {
    stat.S_IFIFO: 1,
    stat.S_IFCHR: 2,
    stat.S_IFDIR: 4,
    stat.S_IFBLK: 6,
    stat.S_IFREG: 8,
    stat.S_IFLNK: 10,
    stat.S_IFSOCK: 12,
}


@dataclass(slots=True, eq=False)
class _Node:
    """One path with fds open on it: where its contents live right now."""

    path: str
    dir_fd: int  # the parent directory (owned)
    name: str
    data_fd: int  # the temp file while writers exist, else the target (owned)
    tmp_name: str | None = None
    writers: int = 0
    refs: int = 0
    dirty: bool = False


@dataclass(slots=True, eq=False)
class _OpenFile:
    node: _Node
    readable: bool
    writable: bool
    append: bool
    pos: int = 0


@dataclass(slots=True, eq=False)
class _DirStream:
    entries: list[Dirent] = field(default_factory=list)
    next: int = 0


class FileStore:
    """The FS listener's files, kept under ``root`` (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str], *, sweep: bool = True) -> None:
        if not isinstance(root, str | os.PathLike):
            raise FsUsageError(f"root must be a str or PathLike, not {type(root).__name__}")
        if not isinstance(sweep, bool):
            raise FsUsageError(f"sweep must be a bool, not {type(sweep).__name__}")
        self._root = os.path.abspath(os.fspath(root))
        if not os.path.exists(self._root):
            try:  # as tee-supplicant makes its file-system root (mkpath)
                os.makedirs(self._root)
            except OSError as exc:
                raise _fail(exc.errno or errno.EIO, f"cannot create root {self._root!r}") from None
        if not os.path.isdir(self._root):
            raise _fail(errno.ENOTDIR, f"root {self._root!r} is not a directory")
        self._lock = threading.RLock()
        self._files: dict[int, _OpenFile] = {}
        self._nodes: dict[str, _Node] = {}
        self._dirs: dict[int, _DirStream] = {}
        self._errno = 0
        if sweep:
            self._sweep()

    @property
    def root(self) -> str:
        """The absolute path of the store's directory."""
        return self._root

    @property
    def last_errno(self) -> int:
        """What GET_ERRNO answers: the errno of the last failed request (sticky; 0 at first)."""
        return self._errno

    # ------------------------------------------------------------------ path walking

    def _walk(self, parts: tuple[str, ...], *, create: bool = False, mode: int = 0o770) -> int:
        """An fd on the directory ``parts``, creating missing ones if ``create``."""
        try:
            fd = os.open(self._root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise _reraise(exc, f"root {self._root!r}") from None
        try:
            for i, comp in enumerate(parts):
                nxt = _step(fd, comp, "/".join(parts[: i + 1]), create, mode)
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _sweep(self) -> None:
        """Delete the temp files a crash left behind (no fd can be using them yet)."""
        try:
            for _top, _dirs, files, dfd in os.fwalk(self._root, follow_symlinks=False):
                stale = [n for n in files if n.startswith(TEMP_PREFIX)]
                for name in stale:
                    os.unlink(name, dir_fd=dfd)
                if stale:
                    os.fsync(dfd)
        except OSError as exc:
            raise _reraise(exc, f"sweeping {self._root!r}") from None

    def _busy(self, path: str) -> bool:
        return any(_is_under(p, path) for p in self._nodes)

    # ------------------------------------------------------------------ pending contents

    def _begin_pending(self, node: _Node) -> None:
        """Move ``node`` onto a fresh temp file holding a copy of its contents."""
        tmp = TEMP_PREFIX + secrets.token_hex(8)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        tfd = os.open(tmp, flags, 0o600, dir_fd=node.dir_fd)
        try:
            os.fchmod(tfd, stat.S_IMODE(os.fstat(node.data_fd).st_mode) | 0o600)
            off = 0
            while chunk := os.pread(node.data_fd, 1 << 16, off):
                os.pwrite(tfd, chunk, off)
                off += len(chunk)
        except BaseException:
            os.close(tfd)
            os.unlink(tmp, dir_fd=node.dir_fd)
            raise
        os.close(node.data_fd)
        node.data_fd, node.tmp_name = tfd, tmp

    def _commit(self, node: _Node) -> None:
        """fsync the temp file, rename it over the target, fsync the directory."""
        assert node.tmp_name is not None
        os.fsync(node.data_fd)
        os.replace(node.tmp_name, node.name, src_dir_fd=node.dir_fd, dst_dir_fd=node.dir_fd)
        node.tmp_name, node.dirty = None, False
        os.fsync(node.dir_fd)

    def _drop_pending(self, node: _Node) -> None:
        """Forget the temp file's name; its fd stays valid (its contents are not kept)."""
        if node.tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(node.tmp_name, dir_fd=node.dir_fd)
            node.tmp_name, node.dirty = None, False

    def _release(self, node: _Node) -> None:
        node.refs -= 1
        if node.refs == 0:
            self._drop_pending(node)
            os.close(node.data_fd)
            os.close(node.dir_fd)
            del self._nodes[node.path]

    # ------------------------------------------------------------------ file operations

    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        """Open ``path`` with wire ``flags`` (:class:`FsOpenFlag`); the lowest free fd >= 1."""
        flags = _check_int(flags, "flags")
        mode = _check_int(mode, "mode")
        with self._lock:
            parts = _parts(path)
            acc = flags & _F.O_ACCMODE
            if flags & ~_ALL_FLAGS or acc == _F.O_ACCMODE:
                raise _fail(errno.EINVAL, f"open flags {flags:#o} are not supported")
            if not 0 <= mode <= 0o7777:
                raise _fail(errno.EINVAL, f"mode {mode:#o} is not a permission mode")
            writable = acc in (_F.O_WRONLY, _F.O_RDWR)
            if flags & _F.O_TRUNC and not writable:
                raise _fail(errno.EINVAL, "O_TRUNC needs write access")
            if not parts:
                raise _fail(errno.EISDIR, "the root is a directory")
            fd = next(i for i in range(1, MAX_OPEN_FILES + 2) if i not in self._files)
            if fd > MAX_OPEN_FILES:
                raise _fail(errno.EMFILE, f"{MAX_OPEN_FILES} files are already open")
            key = "/".join(parts)
            excl = flags & _F.O_CREAT and flags & _F.O_EXCL
            node = self._nodes.get(key)
            if node is not None and excl:
                raise _fail(errno.EEXIST, f"{key!r} exists")
            if node is None:
                node = self._open_node(key, parts, flags, mode)
            try:
                if writable and node.tmp_name is None:
                    self._begin_pending(node)
                if flags & _F.O_TRUNC:
                    os.ftruncate(node.data_fd, 0)
                    node.dirty = True
            except OSError as exc:
                if node.refs == 0:
                    node.refs = 1
                    self._release(node)
                raise _reraise(exc, f"open {key!r}") from None
            node.refs += 1
            node.writers += writable
            self._files[fd] = _OpenFile(
                node, acc != _F.O_WRONLY, writable, bool(flags & _F.O_APPEND)
            )
            return fd

    def _open_node(self, key: str, parts: tuple[str, ...], flags: int, mode: int) -> _Node:
        create = bool(flags & _F.O_CREAT)
        dfd = self._walk(parts[:-1], create=create)
        name = parts[-1]
        try:
            try:
                st = os.lstat(name, dir_fd=dfd)
            except FileNotFoundError:
                if not create:
                    raise _fail(errno.ENOENT, f"no file {key!r}") from None
                data_fd = self._create_empty(dfd, name, mode)
            else:
                if stat.S_ISLNK(st.st_mode):
                    raise _fail(errno.EACCES, f"{key!r} is a symlink")
                if stat.S_ISDIR(st.st_mode):
                    raise _fail(errno.EISDIR, f"{key!r} is a directory")
                if not stat.S_ISREG(st.st_mode):
                    raise _fail(errno.EACCES, f"{key!r} is not a regular file")
                if flags & _F.O_CREAT and flags & _F.O_EXCL:
                    raise _fail(errno.EEXIST, f"{key!r} exists")
                rflags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
                try:
                    data_fd = os.open(name, rflags, dir_fd=dfd)
                except OSError as exc:
                    if _is_link(name, dfd):
                        raise _fail(errno.EACCES, f"{key!r} is a symlink") from None
                    raise _reraise(exc, f"open {key!r}") from None
                if not stat.S_ISREG(os.fstat(data_fd).st_mode):
                    os.close(data_fd)
                    raise _fail(errno.EACCES, f"{key!r} is not a regular file")
        except OSError as exc:
            os.close(dfd)
            if isinstance(exc, FsError):
                raise
            raise _reraise(exc, f"open {key!r}") from None
        node = _Node(path=key, dir_fd=dfd, name=name, data_fd=data_fd)
        self._nodes[key] = node
        return node

    def _create_empty(self, dfd: int, name: str, mode: int) -> int:
        """Create ``name`` empty and durable; an fd on it."""
        tmp = TEMP_PREFIX + secrets.token_hex(8)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        tfd = os.open(tmp, flags, 0o600, dir_fd=dfd)
        try:
            os.fchmod(tfd, (mode & 0o777) | 0o600)
            os.fsync(tfd)
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            os.close(tfd)
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
        os.fsync(dfd)
        return tfd

    def _file(self, fd: object) -> _OpenFile:
        fd = _check_int(fd, "fd")
        of = self._files.get(fd)
        if of is None:
            raise _fail(errno.EBADF, f"fd {fd} is not open")
        return of

    def read(self, fd: int, count: int) -> bytes:
        """Up to ``count`` bytes from the fd's position (fewer at the end of the file)."""
        count = _check_int(count, "count")
        if count < 0:
            raise FsUsageError(f"count must be >= 0, not {count}")
        with self._lock:
            of = self._file(fd)
            if not of.readable:
                raise _fail(errno.EBADF, f"fd {fd} is not open for reading")
            try:
                size = os.fstat(of.node.data_fd).st_size
                data = os.pread(of.node.data_fd, max(0, min(count, size - of.pos)), of.pos)
            except OSError as exc:
                raise _reraise(exc, f"read fd {fd}") from None
            of.pos += len(data)
            return data

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        """Write all of ``data`` at the fd's position (at the end with O_APPEND)."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise FsUsageError(f"data must be bytes-like, not {type(data).__name__}")
        data = bytes(data)
        with self._lock:
            of = self._file(fd)
            if not of.writable:
                raise _fail(errno.EBADF, f"fd {fd} is not open for writing")
            node = of.node
            try:
                if node.tmp_name is None:  # a failed commit left none: never write the target
                    self._begin_pending(node)
                pos = os.fstat(node.data_fd).st_size if of.append else of.pos
                if pos + len(data) > MAX_FILE_SIZE:
                    raise _fail(errno.EFBIG, f"the file would exceed {MAX_FILE_SIZE} bytes")
                done = 0
                while done < len(data):
                    done += os.pwrite(node.data_fd, data[done:], pos + done)
            except FsError:
                raise
            except OSError as exc:
                raise _reraise(exc, f"write fd {fd}") from None
            if data:
                node.dirty = True
            of.pos = pos + len(data)
            return len(data)

    def lseek(self, fd: int, offset: int, whence: int) -> int:
        """Move the fd's position (SEEK_SET 0, SEEK_CUR 1, SEEK_END 2); the new position."""
        offset = _check_int(offset, "offset")
        whence = _check_int(whence, "whence")
        with self._lock:
            of = self._file(fd)
            if whence == os.SEEK_SET:
                base = 0
            elif whence == os.SEEK_CUR:
                base = of.pos
            elif whence == os.SEEK_END:
                base = os.fstat(of.node.data_fd).st_size
            else:
                raise _fail(errno.EINVAL, f"whence {whence} is not SEEK_SET/CUR/END")
            new = base + offset
            if not 0 <= new <= MAX_FILE_SIZE:
                raise _fail(errno.EINVAL, f"offset {new} is outside [0, {MAX_FILE_SIZE}]")
            of.pos = new
            return new

    def fsync(self, fd: int) -> None:
        """Commit the path's pending contents now (a no-op for a read-only fd)."""
        with self._lock:
            of = self._file(fd)
            node = of.node
            if not of.writable or not node.dirty:
                return
            try:
                self._commit(node)
            except OSError as exc:
                raise _reraise(exc, f"sync fd {fd}") from None

    def close(self, fd: int) -> None:
        """Close ``fd``; a writable fd commits the path's pending contents first.

        The fd is closed even if the commit fails (the error is raised after).
        """
        with self._lock:
            of = self._file(fd)
            node = of.node
            del self._files[fd]
            failure: OSError | None = None
            if of.writable:
                node.writers -= 1
                try:
                    if node.dirty:
                        self._commit(node)
                except OSError as exc:
                    failure = exc
                if not node.writers:
                    self._drop_pending(node)
            self._release(node)
            if failure is not None:
                raise _reraise(failure, f"close fd {fd}")

    def close_all(self) -> None:
        """Close every fd and directory stream; pending (unacknowledged) contents are lost."""
        with self._lock:
            for node in list(self._nodes.values()):
                node.refs = 1
                self._release(node)
            self._files.clear()
            self._dirs.clear()

    # ------------------------------------------------------------------ namespace operations

    def _entry(self, path: str, what: str) -> tuple[tuple[str, ...], int, str, os.stat_result]:
        """The parent fd, name and lstat of an existing non-root entry (caller closes fd)."""
        parts = _parts(path)
        key = "/".join(parts)
        if not parts:
            raise _fail(errno.EBUSY, f"cannot {what} the root")
        if self._busy(key):
            raise _fail(errno.EBUSY, f"{key!r} has open files")
        dfd = self._walk(parts[:-1])
        try:
            st = os.lstat(parts[-1], dir_fd=dfd)
        except OSError as exc:
            os.close(dfd)
            raise _reraise(exc, f"{what} {key!r}") from None
        if stat.S_ISLNK(st.st_mode):
            os.close(dfd)
            raise _fail(errno.EACCES, f"{key!r} is a symlink")
        return parts, dfd, parts[-1], st

    @contextlib.contextmanager
    def _at_entry(
        self, path: str, what: str, doing: str
    ) -> Iterator[tuple[int, str, os.stat_result]]:
        """The parent fd, name and lstat of an existing entry (see :meth:`_entry`) for the
        body of a ``with``; an OSError in it becomes the FsError of ``doing`` and the fd is
        closed after it."""
        _, dfd, name, st = self._entry(path, what)
        try:
            yield dfd, name, st
        except FsError:
            raise
        except OSError as exc:
            raise _reraise(exc, doing) from None
        finally:
            os.close(dfd)

    def unlink(self, path: str) -> None:
        """Delete the file ``path`` (EISDIR for a directory)."""
        with self._lock, self._at_entry(path, "unlink", f"unlink {path!r}") as (dfd, name, st):
            if stat.S_ISDIR(st.st_mode):
                raise _fail(errno.EISDIR, f"{path!r} is a directory")
            os.unlink(name, dir_fd=dfd)
            os.fsync(dfd)

    def remove(self, path: str) -> None:
        """Delete the file or empty directory ``path`` (stale temp files do not count)."""
        with self._lock, self._at_entry(path, "remove", f"remove {path!r}") as (dfd, name, st):
            if stat.S_ISDIR(st.st_mode):
                sub = os.open(name, _DIR_FLAGS, dir_fd=dfd)
                try:
                    names = os.listdir(sub)
                    if any(not n.startswith(TEMP_PREFIX) for n in names):
                        raise _fail(errno.ENOTEMPTY, f"directory {path!r} is not empty")
                    for n in names:
                        os.unlink(n, dir_fd=sub)
                finally:
                    os.close(sub)
                os.rmdir(name, dir_fd=dfd)
            else:
                os.unlink(name, dir_fd=dfd)
            os.fsync(dfd)

    def rename(self, old: str, new: str) -> None:
        """``rename(old, new)``: replaces a file at ``new``; both parents must exist."""
        with self._lock:
            new_parts = _parts(new)
            new_key = "/".join(new_parts)
            if not new_parts:
                raise _fail(errno.EBUSY, "cannot rename onto the root")
            if self._busy(new_key):
                raise _fail(errno.EBUSY, f"{new_key!r} has open files")
            doing = f"rename {old!r} to {new!r}"
            with self._at_entry(old, "rename", doing) as (ofd, oname, _st):
                nfd = self._walk(new_parts[:-1])
                try:
                    if _is_link(new_parts[-1], nfd):
                        raise _fail(errno.EACCES, f"{new_key!r} is a symlink")
                    os.rename(oname, new_parts[-1], src_dir_fd=ofd, dst_dir_fd=nfd)
                    os.fsync(nfd)
                    os.fsync(ofd)
                finally:
                    os.close(nfd)

    def mkdir(self, path: str, mode: int = 0o770) -> None:
        """Create directory ``path`` and its missing parents (no error if it exists)."""
        mode = _check_int(mode, "mode")
        with self._lock:
            parts = _parts(path)
            if not 0 <= mode <= 0o7777:
                raise _fail(errno.EINVAL, f"mode {mode:#o} is not a permission mode")
            os.close(self._walk(parts, create=True, mode=mode | 0o700))

    def _scan(self, path: str) -> tuple[int, list[tuple[str, int, int]]]:
        """The directory's inode and the (name, inode, d_type) of its visible entries."""
        dfd = self._walk(_parts(path))
        try:
            ino = os.fstat(dfd).st_ino or 1
            out = []
            with os.scandir(dfd) as it:
                for e in it:
                    if e.name.startswith(TEMP_PREFIX):
                        continue
                    try:
                        fmt = stat.S_IFMT(e.stat(follow_symlinks=False).st_mode)
                    except FileNotFoundError:
                        continue
                    out.append((e.name, e.inode() or 1, _DT.get(fmt, 0)))
        except OSError as exc:
            raise _reraise(exc, f"list {path!r}") from None
        finally:
            os.close(dfd)
        return ino, sorted(out)

    def listdir(self, path: str = ".") -> list[str]:
        """The names in directory ``path``, sorted, without ``.``/``..`` and temp files."""
        with self._lock:
            return [name for name, _ino, _t in self._scan(path)[1]]

    def opendir(self, path: str) -> int:
        """A directory stream on ``path`` (a snapshot); the lowest free handle >= 1."""
        with self._lock:
            handle = next(i for i in range(1, MAX_DIR_STREAMS + 2) if i not in self._dirs)
            if handle > MAX_DIR_STREAMS:
                raise _fail(errno.EMFILE, f"{MAX_DIR_STREAMS} directory streams are open")
            ino, scan = self._scan(path)
            stream = _DirStream()
            rows = [(".", ino, 4), ("..", ino, 4), *scan]  # the root is its own parent here
            for i, (name, ino, dtype) in enumerate(rows):
                reclen = (19 + len(os.fsencode(name)) + 1 + 7) & ~7
                stream.entries.append(
                    Dirent(ino=ino, off=i + 1, reclen=reclen, type=dtype, name=name)
                )
            self._dirs[handle] = stream
            return handle

    def readdir(self, handle: int) -> Dirent | None:
        """The stream's next entry, or ``None`` at its end."""
        handle = _check_int(handle, "handle")
        with self._lock:
            stream = self._dirs.get(handle)
            if stream is None:
                raise _fail(errno.EBADF, f"directory stream {handle} is not open")
            if stream.next >= len(stream.entries):
                return None
            stream.next += 1
            return stream.entries[stream.next - 1]

    def closedir(self, handle: int) -> None:
        """Close directory stream ``handle``."""
        handle = _check_int(handle, "handle")
        with self._lock:
            if self._dirs.pop(handle, None) is None:
                raise _fail(errno.EBADF, f"directory stream {handle} is not open")

    # ------------------------------------------------------------------ the listener

    def handle(self, request: bytes | bytearray | memoryview) -> bytes:
        """Serve one request from the shared buffer; the response bytes to write back
        (:func:`supplicant._fs_handler.respond`).

        Raises only :class:`supplicant.fs_msg.FsDecodeError`, for a malformed request (the
        real service then fails the whole callback).
        """
        req = decode_request(request)
        with self._lock:
            return encode_response(respond(self, req))
