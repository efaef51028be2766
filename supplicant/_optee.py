"""tee-supplicant for the OP-TEE device: LOAD_TA, the REE FS and APPL shared memory.

:class:`OpteeSupplicant` opens the privileged context
(:meth:`qtee.OpteeDevice.open_supplicant`) and runs ``workers`` threads that loop
on ``SUPPL_RECV`` (room for 5 params, param[0] = META, so requests are answered by id
and several can be in flight) and ``SUPPL_SEND``, as ``tee_supplicant.c`` does (optee.md
§3.3; the real daemon spawns a thread whenever none is left waiting, this one has a
fixed pool).  It serves:

* **LOAD_TA** (0): value[0] = the UUID octets (``a`` = octets 0-7, ``b`` = 8-15, as
  little-endian words); the image is ``<ta_dir>/<uuid>.ta`` with the UUID lowercase
  8-4-4-4-12 (``teec_ta_load.c``'s ``%08x-%04x-%04x-%02x%02x-%02x…%02x.ta``).  No such
  regular file → ITEM_NOT_FOUND.  memref[1]'s size becomes the image size; a NULL
  memref only asks for it (SUCCESS), a too small one is SHORT_BUFFER.
* **FS** (2): the sub-ops of ``tee_supp_fs.c`` over a :class:`supplicant.FileStore` on
  ``storage_dir`` (names are relative to it; a leading ``/`` is dropped).  OPEN of a
  missing file → ITEM_NOT_FOUND; CREATE makes missing directories and truncates; READ and
  WRITE are positioned (value ``c`` = offset); TRUNCATE shortens or zero-extends (the
  store has no ``ftruncate``: the kept prefix is written back through a second fd opened
  with O_TRUNC, which commits at once); REMOVE also removes the directory it leaves
  empty; RENAME with value ``b`` = 0 refuses an existing target (ACCESS_CONFLICT);
  READDIR skips ``.``/``..``, ITEM_NOT_FOUND at the end, SHORT_BUFFER + size if the
  name does not fit.  A path the store refuses (escaping it, a symlink) → ACCESS_DENIED;
  other failures → GENERIC.  The store's atomic replace applies: data written through
  an fd reaches its file when that fd is closed (or truncated).
* **RPMB** (1): memref[0] = ``struct rpmb_req`` (u16 cmd, u16 dev_id, u16 block_count,
  host order) then request frames, memref[1] the response, served by ``rpmb=`` (an
  :class:`supplicant.EmulatedRpmb`; by default an in-memory one, as tee-supplicant's
  ``RPMB_EMU`` build keeps it) as ``rpmb.c`` ``rpmb_process_request`` does: either
  memref missing or not a memref, or the request shorter than its 6-byte header →
  BAD_PARAMETERS (a NULL output memref is an empty buffer; a NULL input one is
  BAD_PARAMETERS); DATA_REQ (0) passes ``(size - 6) // 512`` request frames and
  ``size // 512`` response frames to the device (a device-level refusal is its TEEC
  result); GET_DEV_INFO (1) needs exactly the 6-byte header and a 19-byte response
  (``struct rpmb_dev_info``: CID, rpmb_size_mult, rel_wr_sec_c, ret_code 0), else
  BAD_PARAMETERS; another command → BAD_PARAMETERS.  The emulation serves any ``dev_id``
  (its ``remap_rpmb_dev_id`` accepts every id), so no ITEM_NOT_FOUND is answered.
* **SHM_ALLOC** (6) / **SHM_FREE** (7): a shm allocated on its own context
  (``TEE_IOC_SHM_ALLOC``; the id in value ``c``) / freed by id (value ``b``); an id it
  did not allocate → BAD_PARAMETERS.
* **SUPP_PLUGIN** (12): plugins registered by UUID (``plugins=`` or
  :meth:`OpteeSupplicant.register_plugin`; :func:`plugin_from_spec` reads
  ``UUID=module:function``), as ``plugin.c`` ``plugin_process`` serves them: exactly
  value IN, value IN, value INOUT, memref INOUT or BAD_PARAMETERS; value[0].a not
  INVOKE (0) → NOT_SUPPORTED; the UUID is value[0].b, value[0].c, value[1].a,
  value[1].b as little-endian words of its octets, value[1].c the cmd, value[2].a the
  sub-command.  No plugin with that UUID → ITEM_NOT_FOUND.  A plugin is a callable
  ``(cmd, sub_cmd, data) -> (result, out)``: its result is the RPC's answer as is,
  ``out`` is written over the start of the memref (what does not fit is dropped) and
  its length is value[2].b (the out length, so a plugin can report a size larger than
  the buffer); a plugin that raises or answers something else → GENERIC, out length 0.

Anything else → NOT_SUPPORTED.  Per-TA directories are the secure side's doing (it
names every object file ``/<ta uuid>/<object id hex>``, see :mod:`qtee._optee.storage`):
the supplicant serves paths, as the real one does.  :meth:`OpteeSupplicant.stop`
closes the context (what it had received or had queued fails with COMMUNICATION), joins
the threads and closes every fd the TAs left open.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import struct
import sys
import threading
import uuid as uuidlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final

from objects import DriverError, UsageError
from qtee import uapi
from qtee._cli.ta_modules import find_ta_module, import_ta_module
from qtee.gp import TeecResult
from supplicant._fs import FileStore
from supplicant._fs_paths import FsError
from supplicant._rpmb import RPMB_FRAME_SIZE, EmulatedRpmb, RpmbRequestError
from supplicant.fs_msg import FsOpenFlag

if TYPE_CHECKING:
    from qtee import OpteeDevice, OpteeSuppContext

__all__ = ["RECV_PARAMS", "OpteeSupplicant", "SuppPlugin", "plugin_from_spec", "ta_file_name"]

log = logging.getLogger("supplicant.optee")

#: Param slots per RECV (``RPC_NUM_PARAMS`` 5 in tee_supplicant.c, META included).
RECV_PARAMS: Final = 5

_HEAD: Final = uapi.SUPP_ARG_STRUCT
_PARAM: Final = uapi.PARAM_STRUCT
_META: Final = uapi.TEE_IOCTL_PARAM_ATTR_META
_META_INOUT: Final = _META | uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_INOUT
_VALUES: Final = frozenset({1, 2, 3})
_MEMREFS: Final = frozenset({5, 6, 7})
_BLOCK: Final = _HEAD.size + _PARAM.size * RECV_PARAMS

_OK: Final = int(TeecResult.TEEC_SUCCESS)
_GENERIC: Final = int(TeecResult.TEEC_ERROR_GENERIC)
_DENIED: Final = int(TeecResult.TEEC_ERROR_ACCESS_DENIED)
_CONFLICT: Final = int(TeecResult.TEEC_ERROR_ACCESS_CONFLICT)
_BAD: Final = int(TeecResult.TEEC_ERROR_BAD_PARAMETERS)
_NOT_FOUND: Final = int(TeecResult.TEEC_ERROR_ITEM_NOT_FOUND)
_NOT_SUPPORTED: Final = int(TeecResult.TEEC_ERROR_NOT_SUPPORTED)
_NO_MEMORY: Final = int(TeecResult.TEEC_ERROR_OUT_OF_MEMORY)
_SHORT: Final = int(TeecResult.TEEC_ERROR_SHORT_BUFFER)

_LOAD_TA, _RPMB, _FS, _SHM_ALLOC, _SHM_FREE, _SUPP_PLUGIN = 0, 1, 2, 6, 7, 12
#: The RPC kinds :attr:`OpteeSupplicant.served` counts (``OPTEE_RPC_CMD_*``, lower case).
_KINDS: Final = {
    _LOAD_TA: "load_ta",
    _RPMB: "rpmb",
    _FS: "fs",
    _SHM_ALLOC: "shm_alloc",
    _SHM_FREE: "shm_free",
    _SUPP_PLUGIN: "supp_plugin",
}
_RPMB_REQ: Final = struct.Struct("<3H")  # struct rpmb_req: cmd, dev_id, block_count
_RPMB_CMD_DATA_REQ, _RPMB_CMD_GET_DEV_INFO = 0, 1
_RPMB_DEV_INFO_SIZE: Final = 19  # struct rpmb_dev_info: cid[16], size_mult, rel_wr, ret
_MEMREF_INPUT: Final = 5
_PLUGIN_INVOKE: Final = 0  # OPTEE_RPC_SUPP_PLUGIN_INVOKE
_VALUE_IN, _VALUE_INOUT, _MEMREF_INOUT = 1, 3, 7
_U32: Final = 0xFFFF_FFFF

#: A tee-supplicant plugin: ``(cmd, sub_cmd, data) -> (result, out)``.
SuppPlugin = Callable[[int, int, bytes], tuple[int, bytes]]
_F = FsOpenFlag
_P = list[int]  # a mutable param: attr, a, b, c


def ta_file_name(raw: bytes) -> str:
    """``<uuid>.ta`` for 16 UUID octets: lowercase 8-4-4-4-12."""
    return f"{uuidlib.UUID(bytes=bytes(raw))}.ta"


def _plugin_uuid(value: object) -> uuidlib.UUID:
    if isinstance(value, uuidlib.UUID):
        return value
    if isinstance(value, str):
        try:
            return uuidlib.UUID(value)
        except ValueError:
            raise ValueError(f"plugin UUID {value!r} is not a UUID") from None
    if isinstance(value, (bytes, bytearray)) and len(value) == 16:
        return uuidlib.UUID(bytes=bytes(value))
    raise TypeError(f"plugin UUID must be a UUID, its string or 16 bytes, not {value!r}")


def plugin_from_spec(spec: str) -> tuple[uuidlib.UUID, SuppPlugin]:
    """``UUID=MODULE:FUNCTION`` → the UUID and the function, imported now; MODULE is a
    module name (looked for in the current directory first) or a path to a ``.py`` file,
    as ``--ta-module`` takes them; a module that is not there is a :class:`UsageError`."""
    if not isinstance(spec, str):
        raise TypeError(f"plugin spec must be a str, not {type(spec).__name__}")
    uuid_part, sep, target = spec.partition("=")
    module, colon, name = target.rpartition(":")
    if not sep or not colon or not module or not name:
        raise ValueError(f"{spec}: not UUID=MODULE:FUNCTION")
    try:
        uuid = uuidlib.UUID(uuid_part)
    except ValueError:
        raise ValueError(f"{spec}: {uuid_part!r} is not a UUID") from None
    loaded = sys.modules.get(module)
    if loaded is None:  # found as --ta-module finds one: the current directory first
        try:
            found = find_ta_module(module)
        except UsageError as exc:
            raise UsageError(f"{spec}: {exc}") from None
        loaded = import_ta_module(found)
    fn = getattr(loaded, name, None)
    if not callable(fn):
        raise ValueError(f"{spec}: {module}:{name} is not a callable")
    return uuid, fn


class _BadParams(Exception):
    """An FS request's params are not the op's: TEEC_ERROR_BAD_PARAMETERS."""


def _fs_errno(exc: FsError) -> int:
    return _DENIED if exc.code == errno.EACCES else _GENERIC


class OpteeSupplicant:
    """The tee-supplicant daemon (see the module docstring)."""

    def __init__(
        self,
        device: OpteeDevice,
        ta_dir: str | os.PathLike[str],
        storage_dir: str | os.PathLike[str],
        workers: int = 2,
        plugins: Mapping[uuidlib.UUID, SuppPlugin] | Mapping[str, SuppPlugin] | None = None,
        *,
        rpmb: EmulatedRpmb | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("at least one worker")
        if rpmb is not None and not isinstance(rpmb, EmulatedRpmb):
            raise TypeError(f"rpmb must be an EmulatedRpmb, not {type(rpmb).__name__}")
        #: The RPMB partition RPC 1 serves (tee-supplicant's emulated one by default).
        self.rpmb = rpmb if rpmb is not None else EmulatedRpmb()
        self._lock = threading.Lock()
        self._plugins: dict[uuidlib.UUID, SuppPlugin] = {}  # plugin.c's plugin list
        for key, fn in (plugins or {}).items():
            self.register_plugin(key, fn)
        self.device = device
        self.ta_dir = os.fspath(ta_dir)
        self.store = FileStore(storage_dir)
        self._paths: dict[int, str] = {}  # REE FS fd -> its path (TRUNCATE needs it)
        self._shms: set[int] = set()  # shm ids of SHM_ALLOC (tee-supplicant's shm list)
        self._served: dict[str, int] = {}  # RPCs answered, by kind
        self.ctx: OpteeSuppContext = device.open_supplicant()
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._serve, name=f"tee-supplicant-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Close the context, join the workers, close what the TAs left open."""
        self._stopping = True
        self.ctx.close()
        for t in self._threads:
            t.join(timeout)
        self.store.close_all()
        with self._lock:
            self._paths.clear()
            self._shms.clear()

    def register_plugin(self, uuid: uuidlib.UUID | str | bytes, fn: SuppPlugin) -> None:
        """Serve SUPP_PLUGIN calls naming ``uuid`` with ``fn`` (replacing any before)."""
        key = _plugin_uuid(uuid)
        if not callable(fn):
            raise TypeError(f"plugin {key} must be callable, not {fn!r}")
        with self._lock:
            self._plugins[key] = fn

    def unregister_plugin(self, uuid: uuidlib.UUID | str | bytes) -> bool:
        """Forget the plugin of ``uuid``; False if there was none."""
        key = _plugin_uuid(uuid)
        with self._lock:
            return self._plugins.pop(key, None) is not None

    @property
    def served(self) -> dict[str, int]:
        """RPCs answered so far by kind (``load_ta``, ``fs``, ``rpmb``, ``shm_alloc``,
        ``shm_free``, ``supp_plugin``; another command is ``rpc N``), whatever their result."""
        with self._lock:
            return dict(self._served)

    def __enter__(self) -> OpteeSupplicant:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ the loop
    def _serve(self) -> None:
        mem = self.device.memory
        block = bytearray(_BLOCK)
        addr = mem.pin(block)
        arg = bytearray(uapi.BufData(addr, _BLOCK).pack())
        request = _HEAD.pack(0, RECV_PARAMS) + _PARAM.pack(_META, 0, 0, 0)
        request += _PARAM.pack(0, 0, 0, 0) * (RECV_PARAMS - 1)
        try:
            while not self._stopping:
                block[:] = request
                if not self._ioctl(uapi.TEE_IOC_SUPPL_RECV, arg, "SUPPL_RECV"):
                    return
                func, num = _HEAD.unpack_from(block)
                params = [
                    list(_PARAM.unpack_from(block, _HEAD.size + _PARAM.size * i))
                    for i in range(num)
                ]
                meta, args = params[0], params[1:]
                try:
                    ret = self._process(func, args)
                except Exception:
                    log.exception("RPC %d failed", func)
                    ret = _GENERIC
                out = _HEAD.pack(ret, num) + _PARAM.pack(_META_INOUT, meta[1], 0, 0)
                out += b"".join(_PARAM.pack(*p) for p in args)
                block[: len(out)] = out
                send = bytearray(uapi.BufData(addr, len(out)).pack())
                if not self._ioctl(uapi.TEE_IOC_SUPPL_SEND, send, "SUPPL_SEND"):
                    return
                kind = _KINDS.get(func, f"rpc {func}")
                with self._lock:
                    self._served[kind] = self._served.get(kind, 0) + 1
        finally:
            mem.unpin(addr)

    def _ioctl(self, cmd: int, arg: bytearray, name: str) -> bool:
        """One of the loop's two ioctls; False when it failed (logged unless stopping)."""
        try:
            self.ctx.ioctl(cmd, arg)
        except DriverError as exc:
            if not (self._stopping or self.ctx.closed):
                log.error("%s failed: %s", name, exc)
            return False
        return True

    def _process(self, func: int, args: list[_P]) -> int:
        name = _RPCS.get(func)  # by name: a subclass's override serves its RPC
        return _NOT_SUPPORTED if name is None else getattr(self, name)(args)

    # ------------------------------------------------------------------ params
    @staticmethod
    def _value(args: list[_P], i: int) -> _P | None:
        p = args[i] if i < len(args) else None
        return p if p is not None and p[0] & 0xFF in _VALUES else None

    def _memref(self, args: list[_P], i: int) -> tuple[memoryview | None, _P] | None:
        """The memref's bytes (None for a NULL memref) and the param, or None if bad."""
        p = args[i] if i < len(args) else None
        if p is None or p[0] & 0xFF not in _MEMREFS:
            return None
        if p[3] == uapi.TEE_MEMREF_NULL:
            return None, p
        with self._lock:
            if p[3] not in self._shms:
                return None
        view = self.ctx.shm_view(p[3])
        if p[1] + p[2] > len(view):
            return None
        return view[p[1] : p[1] + p[2]], p

    def _name(self, args: list[_P], i: int) -> str | None:
        got = self._memref(args, i)
        if got is None or got[0] is None:
            return None
        raw = bytes(got[0]).split(b"\0", 1)[0]
        try:
            return raw.decode().lstrip("/")
        except UnicodeDecodeError:
            return None

    def _name_and_out(self, args: list[_P]) -> tuple[str, _P]:
        """An FS open's three params: the head, the path memref and the value out param."""
        name = self._name(args, 1)
        out = self._value(args, 2)
        if len(args) != 3 or name is None or out is None:
            raise _BadParams
        return name, out

    # ------------------------------------------------------------------ LOAD_TA
    def _load_ta(self, args: list[_P]) -> int:
        value = self._value(args, 0)
        got = self._memref(args, 1)
        if len(args) != 2 or value is None or got is None:
            return _BAD
        raw = value[1].to_bytes(8, "little") + value[2].to_bytes(8, "little")
        path = os.path.join(self.ta_dir, ta_file_name(raw))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return _NOT_FOUND
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return _NOT_FOUND
            with os.fdopen(os.dup(fd), "rb") as f:
                image = f.read()
        finally:
            os.close(fd)
        view, p = got
        room = p[2]
        p[2] = len(image)
        if view is None:
            return _OK  # a size query
        if len(image) > room:
            return _SHORT
        view[: len(image)] = image
        return _OK

    # ------------------------------------------------------------------ RPMB
    def _rpmb_buf(self, args: list[_P], i: int) -> memoryview | None:
        """``get_param``: the memref's bytes; a NULL output memref is empty; None if bad."""
        p = args[i] if i < len(args) else None
        if p is None or p[0] & 0xFF not in _MEMREFS:
            return None
        with self._lock:
            known = p[3] in self._shms
        if not known and p[3] == uapi.TEE_MEMREF_NULL:
            return None if p[0] & 0xFF == _MEMREF_INPUT else memoryview(bytearray())
        got = self._memref(args, i)
        return None if got is None else got[0]

    def _rpmb(self, args: list[_P]) -> int:
        req, rsp = self._rpmb_buf(args, 0), self._rpmb_buf(args, 1)
        if req is None or rsp is None or len(req) < _RPMB_REQ.size:
            return _BAD
        cmd, _dev_id, _count = _RPMB_REQ.unpack_from(req)
        if cmd == _RPMB_CMD_GET_DEV_INFO:
            if len(req) != _RPMB_REQ.size or len(rsp) != _RPMB_DEV_INFO_SIZE:
                return _BAD
            dev = self.rpmb
            rsp[:] = dev.cid + bytes((dev.size_mult, dev.rel_wr_sec_c, 0))
            return _OK
        if cmd != _RPMB_CMD_DATA_REQ:
            return _BAD
        n_req = (len(req) - _RPMB_REQ.size) // RPMB_FRAME_SIZE
        n_rsp = len(rsp) // RPMB_FRAME_SIZE
        if n_req == 0:
            return _GENERIC  # no frame: no supported message type
        frames = bytes(req[_RPMB_REQ.size : _RPMB_REQ.size + n_req * RPMB_FRAME_SIZE])
        size = n_rsp * RPMB_FRAME_SIZE
        try:
            out = self.rpmb.data_request(
                frames, n_rsp, rsp=bytes(rsp[:size]), frame_type_check=True
            )
        except RpmbRequestError as exc:
            return exc.teec
        rsp[:size] = out
        return _OK

    # ------------------------------------------------------------------ shm
    def _shm_alloc(self, args: list[_P]) -> int:
        value = self._value(args, 0)
        if len(args) != 1 or value is None:
            return _BAD
        data = bytearray(uapi.ShmAllocData(max(value[2], 1)).pack())
        try:
            self.ctx.ioctl(uapi.TEE_IOC_SHM_ALLOC, data)
        except DriverError:
            return _NO_MEMORY
        shm_id = uapi.ShmAllocData.unpack(data).id
        with self._lock:
            self._shms.add(shm_id)
        value[3] = shm_id
        return _OK

    def _shm_free(self, args: list[_P]) -> int:
        value = self._value(args, 0)
        if len(args) != 1 or value is None:
            return _BAD
        with self._lock:
            if value[2] not in self._shms:
                return _BAD
            self._shms.discard(value[2])
        self.ctx.shm_free(value[2])
        return _OK

    # ------------------------------------------------------------------ SUPP_PLUGIN
    def _supp_plugin(self, args: list[_P]) -> int:
        types = [p[0] & 0xFF for p in args]
        if types != [_VALUE_IN, _VALUE_IN, _VALUE_INOUT, _MEMREF_INOUT]:
            return _BAD
        got = self._memref(args, 3)
        if got is None or (got[0] is None and args[3][2]):
            return _BAD
        view, _p = got
        head, mid, sub = args[0], args[1], args[2]
        if head[1] != _PLUGIN_INVOKE:
            return _NOT_SUPPORTED
        words = (head[2], head[3], mid[1], mid[2])
        raw = b"".join((w & _U32).to_bytes(4, "little") for w in words)
        with self._lock:
            fn = self._plugins.get(uuidlib.UUID(bytes=raw))
        sub[2] = 0
        if fn is None:
            return _NOT_FOUND
        data = bytes(view) if view is not None else b""
        try:
            answer = fn(mid[3] & _U32, sub[1] & _U32, data)
            ret, out = answer
            if not isinstance(ret, int) or not 0 <= ret <= _U32:
                raise TypeError(f"result {ret!r} is not a u32")
            if not isinstance(out, (bytes, bytearray, memoryview)):
                raise TypeError(f"out {out!r} is not bytes")
            out = bytes(out)
        except Exception:
            log.exception("plugin %s failed", uuidlib.UUID(bytes=raw))
            return _GENERIC
        if view is not None:
            n = min(len(out), len(view))
            view[:n] = out[:n]
        sub[2] = len(out)
        return ret

    # ------------------------------------------------------------------ FS
    def _fs(self, args: list[_P]) -> int:
        head = self._value(args, 0)
        if head is None:
            return _BAD
        op = head[1]
        handler = _FS_OPS.get(op)
        if handler is None:
            return _BAD
        try:
            return handler(self, head, args)
        except _BadParams:
            return _BAD
        except FsError as exc:
            return _fs_errno(exc)

    def _fs_open(self, head: _P, args: list[_P], *, create: bool) -> int:
        name, out = self._name_and_out(args)
        flags = _F.O_RDWR | (_F.O_CREAT | _F.O_TRUNC if create else 0)
        try:
            fd = self.store.open(name, int(flags))
        except FsError as exc:
            if not create and exc.code != errno.EACCES:
                return _NOT_FOUND
            raise
        with self._lock:
            self._paths[fd] = name
        out[1] = fd
        return _OK

    def _fs_close(self, head: _P, args: list[_P]) -> int:
        if len(args) != 1:
            return _BAD
        with self._lock:
            self._paths.pop(head[2], None)
        self.store.close(head[2])
        return _OK

    def _buffer(self, args: list[_P]) -> tuple[memoryview | None, _P]:
        """An FS read's, write's or readdir's two params: the head and the buffer memref."""
        got = self._memref(args, 1)
        if len(args) != 2 or got is None:
            raise _BadParams
        return got

    def _at_offset(self, head: _P, args: list[_P]) -> tuple[memoryview, _P]:
        """An FS read's or write's buffer (not NULL), the file positioned at the offset."""
        view, p = self._buffer(args)
        if view is None:
            raise _BadParams
        self.store.lseek(head[2], head[3], os.SEEK_SET)
        return view, p

    def _fs_read(self, head: _P, args: list[_P]) -> int:
        view, p = self._at_offset(head, args)
        data = self.store.read(head[2], len(view))
        view[: len(data)] = data
        p[2] = len(data)
        return _OK

    def _fs_write(self, head: _P, args: list[_P]) -> int:
        view, _p = self._at_offset(head, args)
        self.store.write(head[2], bytes(view))
        return _OK

    def _fs_truncate(self, head: _P, args: list[_P]) -> int:
        if len(args) != 1:
            return _BAD
        fd, length = head[2], head[3]
        with self._lock:
            path = self._paths.get(fd)
        if path is None:
            return _GENERIC
        size = self.store.lseek(fd, 0, os.SEEK_END)
        self.store.lseek(fd, 0, os.SEEK_SET)
        keep = self.store.read(fd, min(length, size)) + bytes(max(0, length - size))
        tmp = self.store.open(path, int(_F.O_WRONLY | _F.O_TRUNC))
        try:
            self.store.write(tmp, keep)
        finally:
            self.store.close(tmp)
        return _OK

    def _fs_remove(self, head: _P, args: list[_P]) -> int:
        name = self._name(args, 1)
        if len(args) != 2 or name is None:
            return _BAD
        try:
            self.store.unlink(name)
        except FsError as exc:
            return _NOT_FOUND if exc.code == errno.ENOENT else _fs_errno(exc)
        parent = os.path.dirname(name)
        if parent:
            with contextlib.suppress(FsError):  # only if now empty, like the real rmdir
                self.store.remove(parent)
        return _OK

    def _fs_rename(self, head: _P, args: list[_P]) -> int:
        old, new = self._name(args, 1), self._name(args, 2)
        if len(args) != 3 or old is None or new is None:
            return _BAD
        if not head[2]:
            try:
                fd = self.store.open(new, int(_F.O_RDONLY))
            except FsError:
                pass
            else:
                self.store.close(fd)
                return _CONFLICT
        try:
            self.store.rename(old, new)
        except FsError as exc:
            return _NOT_FOUND if exc.code == errno.ENOENT else _fs_errno(exc)
        return _OK

    def _fs_opendir(self, head: _P, args: list[_P]) -> int:
        name, out = self._name_and_out(args)
        try:
            out[1] = self.store.opendir(name or ".")
        except FsError:
            return _NOT_FOUND
        return _OK

    def _fs_closedir(self, head: _P, args: list[_P]) -> int:
        if len(args) != 1:
            return _BAD
        self.store.closedir(head[2])
        return _OK

    def _fs_readdir(self, head: _P, args: list[_P]) -> int:
        view, p = self._buffer(args)
        while True:
            entry = self.store.readdir(head[2])
            if entry is None:
                return _NOT_FOUND
            if entry.name not in (".", ".."):
                break
        raw = os.fsencode(entry.name) + b"\0"
        if view is None or len(view) < len(raw):
            p[2] = len(raw)
            return _SHORT
        view[: len(raw)] = raw
        p[2] = len(raw)
        return _OK


def _open(s: OpteeSupplicant, head: _P, args: list[_P]) -> int:
    return s._fs_open(head, args, create=False)


def _create(s: OpteeSupplicant, head: _P, args: list[_P]) -> int:
    return s._fs_open(head, args, create=True)


_FS_OPS: Final = {
    0: _open,
    1: _create,
    2: OpteeSupplicant._fs_close,
    3: OpteeSupplicant._fs_read,
    4: OpteeSupplicant._fs_write,
    5: OpteeSupplicant._fs_truncate,
    6: OpteeSupplicant._fs_remove,
    7: OpteeSupplicant._fs_rename,
    8: OpteeSupplicant._fs_opendir,
    9: OpteeSupplicant._fs_closedir,
    10: OpteeSupplicant._fs_readdir,
}

#: The RPCs served, by ``OPTEE_MSG_RPC_CMD_*`` (tee-supplicant's ``process_one_request``).
_RPCS: Final[dict[int, str]] = {
    _LOAD_TA: "_load_ta",
    _FS: "_fs",
    _RPMB: "_rpmb",
    _SHM_ALLOC: "_shm_alloc",
    _SHM_FREE: "_shm_free",
    _SUPP_PLUGIN: "_supp_plugin",
}
