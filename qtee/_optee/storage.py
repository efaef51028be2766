"""GP trusted storage for a GP TA, through the supplicant's REE FS or the RPMB FS.

**Trusted storage** (:func:`trusted_storage`): a subset of the GP persistent-object
API for GP TAs, kept in the supplicant's REE FS through FS RPCs (cmd 2: OPEN 0, CREATE
1, CLOSE 2, READ 3, WRITE 4, TRUNCATE 5, REMOVE 6, RENAME 7, OPENDIR 8, CLOSEDIR 9,
READDIR 10, laid out as ``tee_fs_rpc.c`` sends them, names NUL-terminated in a
payload).  The secure side owns the namespace: object ``id`` of the TA ``uuid`` is the
REE file ``/<uuid>/<id as lowercase hex>``, so a TA can only name files in its own
directory and another TA's object is ITEM_NOT_FOUND.  Differences from OP-TEE, on
purpose: no encryption, hash tree or ``dirf.db`` (a file holds the object's data as
is); no object attributes or ``TEE_GetObjectInfo`` beyond :attr:`PersistentObject.size`;
the enumerator is :meth:`TrustedStorage.enumerate`, a list of ids; TEE_STORAGE_PRIVATE
and TEE_STORAGE_PRIVATE_REE name the same store; errors are raised as
:class:`GpTaError` (which ends the entry with that code unless the TA catches it).
Handles a TA leaves open stay open in the supplicant until it stops.
``TEE_STORAGE_PRIVATE_RPMB`` (0x80000100) is another store with the same API: OP-TEE's
RPMB FS (:mod:`qtee.secure._rpmb_fs`), one per device, over RPC 1 (``OPTEE_RPC_CMD_RPMB``:
memref[0] IN = ``struct rpmb_req`` + frames, memref[1] OUT = the response, both in one
payload, the response at the next 4 KiB boundary); its objects are not the REE FS's.
"""

from __future__ import annotations

import threading
import uuid as uuidlib
import weakref
from typing import Final, Protocol

from qtee._optee.supp import OpteeSupp, _queue_of
from qtee.gp import _codes as teec
from qtee.gp._defs import TeecResult
from qtee.secure._gp import GpTA, GpTaError

__all__ = [
    "TEE_DATA_FLAG_ACCESS_READ",
    "TEE_DATA_FLAG_ACCESS_WRITE",
    "TEE_DATA_FLAG_ACCESS_WRITE_META",
    "TEE_DATA_FLAG_OVERWRITE",
    "TEE_DATA_FLAG_SHARE_READ",
    "TEE_DATA_FLAG_SHARE_WRITE",
    "TEE_DATA_SEEK_CUR",
    "TEE_DATA_SEEK_END",
    "TEE_DATA_SEEK_SET",
    "TEE_STORAGE_PRIVATE",
    "TEE_STORAGE_PRIVATE_REE",
    "TEE_STORAGE_PRIVATE_RPMB",
    "PersistentObject",
    "TrustedStorage",
    "trusted_storage",
]

TEE_STORAGE_PRIVATE: Final = 0x0000_0001
TEE_STORAGE_PRIVATE_REE: Final = 0x8000_0000
TEE_STORAGE_PRIVATE_RPMB: Final = 0x8000_0100
TEE_DATA_FLAG_ACCESS_READ: Final = 0x0001
TEE_DATA_FLAG_ACCESS_WRITE: Final = 0x0002
TEE_DATA_FLAG_ACCESS_WRITE_META: Final = 0x0004
TEE_DATA_FLAG_SHARE_READ: Final = 0x0010
TEE_DATA_FLAG_SHARE_WRITE: Final = 0x0020
TEE_DATA_FLAG_OVERWRITE: Final = 0x0400
TEE_DATA_SEEK_SET: Final = 0
TEE_DATA_SEEK_CUR: Final = 1
TEE_DATA_SEEK_END: Final = 2
TEE_OBJECT_ID_MAX_LEN: Final = 64
TEE_DATA_MAX_POSITION: Final = 0xFFFF_FFFF


_FLAGS: Final = (
    TEE_DATA_FLAG_ACCESS_READ
    | TEE_DATA_FLAG_ACCESS_WRITE
    | TEE_DATA_FLAG_ACCESS_WRITE_META
    | TEE_DATA_FLAG_SHARE_READ
    | TEE_DATA_FLAG_SHARE_WRITE
    | TEE_DATA_FLAG_OVERWRITE
)


class _StorageFs(Protocol):
    """What a store's objects are kept through: the REE FS RPCs (:class:`OpteeSupp`) or
    the RPMB FS (:class:`~qtee.secure._rpmb_fs.RpmbFs`)."""

    cond: threading.Condition
    _pobjs: dict[tuple[bytes, bytes], _PObj]

    def fs_open(self, path: str, *, create: bool) -> int: ...
    def fs_close(self, fd: int) -> None: ...
    def fs_read(self, fd: int, offset: int, size: int) -> bytes: ...
    def fs_write(self, fd: int, offset: int, data: bytes) -> None: ...
    def fs_truncate(self, fd: int, length: int) -> None: ...
    def fs_remove(self, path: str) -> None: ...
    def fs_rename(self, old: str, new: str, *, overwrite: bool) -> None: ...
    def fs_listdir(self, path: str) -> list[str]: ...


class _PObj:
    """``tee_pobj``: an object's open handles (their flags) and data size."""

    __slots__ = ("handles", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.handles: list[PersistentObject] = []


def _conflicts(old: int, new: int) -> bool:
    """Whether a handle with ``new`` flags may not join one with ``old`` (GP sharing)."""
    share = TEE_DATA_FLAG_SHARE_READ | TEE_DATA_FLAG_SHARE_WRITE
    if (old | new) & TEE_DATA_FLAG_ACCESS_WRITE_META:
        return True
    if (old ^ new) & share:
        return True
    for f in (old, new):
        if f & TEE_DATA_FLAG_ACCESS_READ and not f & TEE_DATA_FLAG_SHARE_READ:
            return True
        if f & TEE_DATA_FLAG_ACCESS_WRITE and not f & TEE_DATA_FLAG_SHARE_WRITE:
            return True
    return False


def _check_id(object_id: object) -> bytes:
    if not isinstance(object_id, bytes | bytearray) or not (
        0 < len(object_id) <= TEE_OBJECT_ID_MAX_LEN
    ):
        raise GpTaError(teec.BAD_PARAMETERS, "an object id is 1 to 64 bytes")
    return bytes(object_id)


class TrustedStorage:
    """One TA's persistent objects (``TEE_*PersistentObject*``), see the module docstring."""

    def __init__(self, supp: OpteeSupp, ta_uuid: bytes) -> None:
        self._queue = supp
        self._supp: _StorageFs = supp
        self.ta_uuid = ta_uuid
        self._dir = "/" + str(uuidlib.UUID(bytes=ta_uuid))
        self._rpmb_store: TrustedStorage | None = None

    def path(self, object_id: bytes) -> str:
        """The REE FS name of ``object_id`` (in this TA's directory)."""
        return f"{self._dir}/{object_id.hex()}"

    @staticmethod
    def _storage(storage_id: int) -> None:
        if storage_id not in (TEE_STORAGE_PRIVATE, TEE_STORAGE_PRIVATE_REE):
            raise GpTaError(teec.ITEM_NOT_FOUND, f"no storage {storage_id:#x}")

    def _join(self, key: bytes, flags: int, size: int) -> _PObj:
        # Under supp.cond.
        pobj = self._supp._pobjs.get((self.ta_uuid, key))
        if pobj is None:
            pobj = self._supp._pobjs[(self.ta_uuid, key)] = _PObj(size)
        elif any(_conflicts(h.flags, flags) for h in pobj.handles):
            raise GpTaError(teec.ACCESS_CONFLICT, "the object is open with incompatible flags")
        return pobj

    def _rpmb(self) -> TrustedStorage:
        store = self._rpmb_store
        if store is None:
            store = self._rpmb_store = _RpmbStorage(self._queue, self.ta_uuid)
        return store

    def open(
        self, object_id: bytes, flags: int, storage_id: int = TEE_STORAGE_PRIVATE
    ) -> PersistentObject:
        """``TEE_OpenPersistentObject``: ITEM_NOT_FOUND if this TA has no such object."""
        if storage_id == TEE_STORAGE_PRIVATE_RPMB and not isinstance(self, _RpmbStorage):
            return self._rpmb().open(object_id, flags, storage_id)
        key = _check_id(object_id)
        self._storage(storage_id)
        if flags & ~_FLAGS & 0xFFFF_FFFF or flags & TEE_DATA_FLAG_OVERWRITE:
            raise GpTaError(teec.BAD_PARAMETERS, f"open flags {flags:#x}")
        with self._supp.cond:  # sharing is checked before the REE FS is asked
            pobj = self._supp._pobjs.get((self.ta_uuid, key))
            if pobj is not None and any(_conflicts(h.flags, flags) for h in pobj.handles):
                raise GpTaError(teec.ACCESS_CONFLICT, "the object is open with incompatible flags")
        fd = self._supp.fs_open(self.path(key), create=False)
        try:
            size = self._size(fd)
            with self._supp.cond:
                pobj = self._join(key, flags, size)
                handle = PersistentObject(self, key, flags, fd, pobj)
                pobj.handles.append(handle)
        except BaseException:
            self._supp.fs_close(fd)
            raise
        return handle

    def _size(self, fd: int) -> int:
        size, chunk = 0, 1 << 16
        while True:
            got = len(self._supp.fs_read(fd, size, chunk))
            size += got
            if got < chunk:
                return size

    def create(
        self,
        object_id: bytes,
        flags: int,
        data: bytes = b"",
        storage_id: int = TEE_STORAGE_PRIVATE,
    ) -> PersistentObject:
        """``TEE_CreatePersistentObject``: an existing object is ACCESS_CONFLICT unless
        ``TEE_DATA_FLAG_OVERWRITE`` (and never while it is open)."""
        if storage_id == TEE_STORAGE_PRIVATE_RPMB and not isinstance(self, _RpmbStorage):
            return self._rpmb().create(object_id, flags, data, storage_id)
        key = _check_id(object_id)
        self._storage(storage_id)
        if flags & ~_FLAGS & 0xFFFF_FFFF:
            raise GpTaError(teec.BAD_PARAMETERS, f"create flags {flags:#x}")
        data = bytes(data)
        with self._supp.cond:
            if (self.ta_uuid, key) in self._supp._pobjs:
                raise GpTaError(teec.ACCESS_CONFLICT, "the object is open")
        path = self.path(key)
        if not flags & TEE_DATA_FLAG_OVERWRITE:
            try:
                fd = self._supp.fs_open(path, create=False)
            except GpTaError as exc:
                if exc.code != teec.ITEM_NOT_FOUND:
                    raise
            else:
                self._supp.fs_close(fd)
                raise GpTaError(teec.ACCESS_CONFLICT, "the object exists")
        fd = self._supp.fs_open(path, create=True)
        try:
            self._supp.fs_write(fd, 0, data)
            with self._supp.cond:
                pobj = self._join(key, flags & ~TEE_DATA_FLAG_OVERWRITE, len(data))
                pobj.size = len(data)
                handle = PersistentObject(self, key, flags & ~TEE_DATA_FLAG_OVERWRITE, fd, pobj)
                pobj.handles.append(handle)
        except BaseException:
            self._supp.fs_close(fd)
            raise
        return handle

    def enumerate(self, storage_id: int = TEE_STORAGE_PRIVATE) -> list[bytes]:
        """The ids of this TA's objects, sorted (the persistent-object enumerator)."""
        if storage_id == TEE_STORAGE_PRIVATE_RPMB and not isinstance(self, _RpmbStorage):
            return self._rpmb().enumerate(storage_id)
        self._storage(storage_id)
        ids = []
        for name in self._supp.fs_listdir(self._dir):
            if name in (".", ".."):
                continue
            try:
                ids.append(bytes.fromhex(name))
            except ValueError:
                continue  # not an object file
        return sorted(ids)


class _RpmbStorage(TrustedStorage):
    """The same API over the device's RPMB FS: files ``/<UUID>/<ID>`` in uppercase hex,
    the UUID as ``TEE_UUID`` lies in memory (``create_filename``)."""

    def __init__(self, supp: OpteeSupp, ta_uuid: bytes) -> None:
        super().__init__(supp, ta_uuid)
        self._supp = self._fs = supp.rpmb_fs()
        self._dir = "/" + uuidlib.UUID(bytes=ta_uuid).bytes_le.hex().upper()

    def path(self, object_id: bytes) -> str:
        return f"{self._dir}/{object_id.hex().upper()}"

    @staticmethod
    def _storage(storage_id: int) -> None:
        if storage_id != TEE_STORAGE_PRIVATE_RPMB:
            raise GpTaError(teec.ITEM_NOT_FOUND, f"no storage {storage_id:#x}")

    def _size(self, fd: int) -> int:
        return self._fs.fs_size(fd)


class PersistentObject:
    """An open handle on a persistent object (``TEE_ObjectHandle``)."""

    def __init__(
        self, storage: TrustedStorage, object_id: bytes, flags: int, fd: int, pobj: _PObj
    ) -> None:
        self._storage = storage
        self._supp = storage._supp
        self.object_id = object_id
        self.flags = flags
        self._fd = fd
        self._pobj = pobj
        self.pos = 0
        self.closed = False

    @property
    def size(self) -> int:
        """``dataSize``."""
        return self._pobj.size

    def _need(self, flag: int) -> None:
        if self.closed:
            raise GpTaError(teec.BAD_PARAMETERS, "the handle is closed")
        if flag and not self.flags & flag:
            raise GpTaError(teec.ACCESS_CONFLICT, f"the handle lacks access flag {flag:#x}")

    def read(self, size: int) -> bytes:
        """``TEE_ReadObjectData``: up to ``size`` bytes from the position."""
        self._need(TEE_DATA_FLAG_ACCESS_READ)
        if size < 0:
            raise GpTaError(teec.BAD_PARAMETERS, "negative size")
        data = self._supp.fs_read(self._fd, self.pos, min(size, max(0, self.size - self.pos)))
        self.pos += len(data)
        return data

    def write(self, data: bytes) -> None:
        """``TEE_WriteObjectData``: at the position; a gap past the end reads as zeros."""
        self._need(TEE_DATA_FLAG_ACCESS_WRITE)
        data = bytes(data)
        if self.pos + len(data) > TEE_DATA_MAX_POSITION:
            raise GpTaError(teec.OVERFLOW, "past TEE_DATA_MAX_POSITION")
        self._supp.fs_write(self._fd, self.pos, data)
        self.pos += len(data)
        with self._supp.cond:
            self._pobj.size = max(self._pobj.size, self.pos)

    def seek(self, offset: int, whence: int = TEE_DATA_SEEK_SET) -> int:
        """``TEE_SeekObjectData``: the new position."""
        self._need(0)
        base = {TEE_DATA_SEEK_SET: 0, TEE_DATA_SEEK_CUR: self.pos, TEE_DATA_SEEK_END: self.size}
        if whence not in base:
            raise GpTaError(teec.BAD_PARAMETERS, f"whence {whence}")
        new = base[whence] + offset
        new = max(new, 0)  # GP: a negative result sets the position to 0
        if new > TEE_DATA_MAX_POSITION:
            raise GpTaError(teec.OVERFLOW, "past TEE_DATA_MAX_POSITION")
        self.pos = new
        return new

    def truncate(self, size: int) -> None:
        """``TEE_TruncateObjectData``: shorten, or extend with zeros."""
        self._need(TEE_DATA_FLAG_ACCESS_WRITE)
        if not 0 <= size <= TEE_DATA_MAX_POSITION:
            raise GpTaError(teec.BAD_PARAMETERS, f"size {size}")
        self._supp.fs_truncate(self._fd, size)
        with self._supp.cond:
            self._pobj.size = size

    def rename(self, new_id: bytes) -> None:
        """``TEE_RenamePersistentObject`` (needs ACCESS_WRITE_META): ACCESS_CONFLICT if
        this TA has an object ``new_id`` already."""
        self._need(TEE_DATA_FLAG_ACCESS_WRITE_META)
        new_key = _check_id(new_id)
        if new_key == self.object_id:
            return
        st = self._storage
        with self._supp.cond:
            if (st.ta_uuid, new_key) in self._supp._pobjs:
                raise GpTaError(teec.ACCESS_CONFLICT, "an object with the new id is open")
        self._supp.fs_close(self._fd)  # the REE FS renames closed files only
        old_path = st.path(self.object_id)
        try:
            self._supp.fs_rename(old_path, st.path(new_key), overwrite=False)
        except GpTaError:
            self._fd = self._supp.fs_open(old_path, create=False)
            raise
        self._fd = self._supp.fs_open(st.path(new_key), create=False)
        with self._supp.cond:
            del self._supp._pobjs[(st.ta_uuid, self.object_id)]
            self._supp._pobjs[(st.ta_uuid, new_key)] = self._pobj
        self.object_id = new_key

    def _detach(self) -> None:
        with self._supp.cond:
            self.closed = True
            self._pobj.handles.remove(self)
            if not self._pobj.handles:
                key = (self._storage.ta_uuid, self.object_id)
                if self._supp._pobjs.get(key) is self._pobj:
                    del self._supp._pobjs[key]

    def close(self) -> None:
        """``TEE_CloseObject`` (a closed handle: nothing)."""
        if self.closed:
            return
        self._detach()
        self._supp.fs_close(self._fd)

    def close_and_delete(self) -> None:
        """``TEE_CloseAndDeletePersistentObject1`` (needs ACCESS_WRITE_META)."""
        self._need(TEE_DATA_FLAG_ACCESS_WRITE_META)
        self._detach()
        self._supp.fs_close(self._fd)
        self._supp.fs_remove(self._storage.path(self.object_id))

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"pos={self.pos} size={self.size}"
        return f"<PersistentObject {self.object_id.hex()} {state}>"


_STORAGES: weakref.WeakKeyDictionary[GpTA, TrustedStorage] = weakref.WeakKeyDictionary()


def trusted_storage(ta: GpTA) -> TrustedStorage:
    """The trusted storage of ``ta`` (call it inside one of its entry points): objects
    named under the UUID it runs as, kept through the device's supplicant."""
    entry = ta._entry()
    supp = _queue_of(entry.runtime)
    if supp is None:
        raise GpTaError(int(TeecResult.TEEC_ERROR_STORAGE_NOT_AVAILABLE), "no supplicant queue")
    store = _STORAGES.get(ta)
    if store is None:
        store = _STORAGES[ta] = TrustedStorage(supp, entry.instance.uuid)
    return store
