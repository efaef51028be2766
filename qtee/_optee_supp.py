"""The OP-TEE device's RPC queue to tee-supplicant, and the secure-world services on it.

**The queue** (:class:`OpteeSupp`, the kernel's ``optee/supp.c``; optee.md §3.3).
:meth:`qtee._optee.OpteeDevice.open_supplicant` opens the privileged device
(``/dev/teepriv0``): one :class:`OpteeSuppContext` at a time, a second open is EBUSY.
A secure-world thread that needs the supplicant queues a request with
:meth:`OpteeSupp.request` and waits (without limit: no supplicant attached means it
waits for one, as a user-space client's call does).  On the supplicant's context:

* ``SUPPL_RECV`` (buf_data: ``u32 func, u32 num_params`` + params) takes params that
  are NONE or exactly META (``supp_check_recv_params``), else EINVAL.  It blocks until a
  request is queued (EINTR when the context is closed meanwhile), pops it, gives it the
  lowest free id >= 1 and returns ``func`` and its params; with META first, param[0]
  is ``VALUE_INOUT|META`` with ``a`` = the id.  Too few param slots for the request →
  EINVAL and the request stays queued.  Without META the request is *synchronous*: the
  next RECV before its SEND is EINVAL.
* ``SUPPL_SEND`` (``u32 ret, u32 num_params`` + params) names the request by the META
  param's ``a`` (or the synchronous one): unknown id → ENOENT, ``num_params`` not the
  request's (+1 for META) → EINVAL.  Only VALUE_OUTPUT/INOUT ``a, b, c`` and
  MEMREF_OUTPUT/INOUT sizes are copied back, then the waiter resumes with ``ret``.
* Closing the supplicant's context completes every request it had received and every
  one still queued with ``TEEC_ERROR_COMMUNICATION`` and detaches it; requests queued
  afterwards wait for the next supplicant.

Params a supplicant receives are the kernel's (``params_to_supp``): values as they are,
a memref as ``(offset, size, shm id)`` (``c`` = ``TEE_MEMREF_NULL``, ``a`` = 0 for a NULL
memref).

**Memrefs (the payload scheme).**  As in OP-TEE, RPC payloads live in *application*
shared memory that the supplicant allocates: the secure side sends ``SHM_ALLOC`` (cmd
6, value ``a`` = APPL 0, ``b`` = size) and the supplicant answers with the id of a shm
it allocated on its own context (``TEE_IOC_SHM_ALLOC``) in ``c``; the kernel finds that
shm by id (``tee_shm_get_from_id``).  The secure side reads and writes its bytes, and the
supplicant sees them through the shm's mapping (:meth:`OpteeContext.shm_view`; a
registered shm's user memory also works).  ``SHM_FREE`` (cmd 7, ``b`` = id) gives it
back.  Model choices: a payload is allocated per operation (OP-TEE caches one per
thread); a failed SHM_ALLOC is ``TEE_ERROR_OUT_OF_MEMORY`` to the secure side, as the
kernel answers; a payload whose supplicant context is already closed is not freed
through the queue (it went with that context) instead of waiting for a new supplicant.

**LOAD_TA** (cmd 0; :func:`attach_rpc` installs the runtime's ``load_ta`` hook).  A
session to a UUID that no :func:`qtee.secure.register_gp_ta` TA answers asks the
supplicant as ``ree_fs_ta.c`` does: value[0] = the UUID octets (``a`` = octets 0-7,
``b`` = 8-15, little-endian words), memref[1] NULL → the image size; then an APPL
payload of that size and LOAD_TA again.  Any non-zero answer is the open's result
(ITEM_NOT_FOUND when the supplicant has no image, COMMUNICATION when it goes away),
origin TEE.  **How an image names a GP TA:** a model image is a
:func:`gp_ta_image` image (OP-TEE's signed ``struct shdr`` layout with the UUID in its
bootstrap header; :mod:`qtee.secure._signing`) or a :func:`qtee.secure.ta_image` image
named ``str(uuid)``, and must verify with the device key (``runtime.ta_key``); its
Python class is one registered with :func:`register_loadable_ta` (a registry of TAs
that exist only as images, never found without the supplicant) or
:func:`qtee.secure.register_ta_file` by UUID.  A model image that does not verify (a
bit flipped anywhere, another key), names another UUID, or any other image for a
loadable TA, is ``TEE_ERROR_SECURITY`` (``signed_hdr.c``); one whose TA the model has no
class for, ITEM_NOT_FOUND.  Any other image is a TA file as users have them (``struct shdr``, then
the ELF): the class :func:`~qtee.secure.register_ta_file` registered for its SHA-256,
else for its UUID (any signed image: one without ``SHDR_MAGIC`` is SECURITY).  Every
lookup asks the loading world's registry first (``world.tas``,
:class:`~qtee.secure.TaRegistry`), then the process-wide one.  As
``ree_fs_ta.c`` ``ree_fs_ta_open`` answers, a signed header that names another UUID
(``shdr_bootstrap_ta``), or that is cut short, and an image the model has no class for
(OP-TEE could not verify its signature) are ``TEE_ERROR_SECURITY``; no file at all is
the supplicant's ITEM_NOT_FOUND.  Each new instance loads the image again (no cache),
as OP-TEE does.

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

**Supplicant plugins** (:func:`invoke_supp_plugin`, libutee's ``tee_invoke_supp_plugin``
through the system PTA and ``tee_supp_plugin_rpc.c``): cmd 12 with value[0] IN =
(INVOKE 0, UUID word 0, word 1), value[1] IN = (word 2, word 3, cmd), value[2] INOUT =
(sub-command, out length), memref[3] INOUT = the buffer copied into an APPL payload
(NULL when empty); the words are the UUID's octets read as little-endian u32.  The
supplicant's answer is the TA's result (ITEM_NOT_FOUND: no such plugin) and value[2].b
the out length; when both the buffer and the out length are non-zero the whole payload
is copied back over the buffer and the result becomes SUCCESS (``copy_to_user``'s
result replaces the plugin's, as in OP-TEE for a user TA).
"""

from __future__ import annotations

import errno
import threading
import uuid as uuidlib
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

from objects import DriverError, UsageError
from qtee import _checks, uapi
from qtee._optee import OpteeContext, _GpShm
from qtee.gp._defs import TeecResult, name_of
from qtee.secure._gp import (
    GpRuntime,
    GpTA,
    GpTaError,
    gp_ta_image,
    lookup_loadable_ta,
    register_loadable_ta,
    unregister_loadable_ta,
)
from qtee.secure._rpmb_fs import RpmbFs, rpmb_huk

if TYPE_CHECKING:
    from qtee._optee import OpteeDevice
    from qtee.secure._registry import TaRegistry
    from qtee.secure._signing import SigningKey

__all__ = [
    "OPTEE_RPC_CMD_FS",
    "OPTEE_RPC_CMD_LOAD_TA",
    "OPTEE_RPC_CMD_SHM_ALLOC",
    "OPTEE_RPC_CMD_SHM_FREE",
    "OPTEE_RPC_CMD_SUPP_PLUGIN",
    "OPTEE_RPC_SUPP_PLUGIN_INVOKE",
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
    "FsOp",
    "OpteeSupp",
    "OpteeSuppContext",
    "PersistentObject",
    "RpcParam",
    "TrustedStorage",
    "attach_rpc",
    "gp_ta_image",
    "invoke_supp_plugin",
    "lookup_loadable_ta",
    "register_loadable_ta",
    "trusted_storage",
    "unregister_loadable_ta",
]

# ----------------------------------------------------------------------------- constants

OPTEE_RPC_CMD_LOAD_TA: Final = 0
OPTEE_RPC_CMD_RPMB: Final = 1
OPTEE_RPC_CMD_FS: Final = 2
OPTEE_RPC_CMD_SHM_ALLOC: Final = 6
OPTEE_RPC_CMD_SHM_FREE: Final = 7
OPTEE_RPC_CMD_SUPP_PLUGIN: Final = 12
OPTEE_RPC_SUPP_PLUGIN_INVOKE: Final = 0
OPTEE_RPC_SHM_TYPE_APPL: Final = 0


class FsOp:
    """``OPTEE_RPC_FS_*``: value[0].a of an FS RPC."""

    OPEN: Final = 0
    CREATE: Final = 1
    CLOSE: Final = 2
    READ: Final = 3
    WRITE: Final = 4
    TRUNCATE: Final = 5
    REMOVE: Final = 6
    RENAME: Final = 7
    OPENDIR: Final = 8
    CLOSEDIR: Final = 9
    READDIR: Final = 10


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

_VALUE_IN: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_INPUT
_VALUE_OUT: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_OUTPUT
_VALUE_INOUT: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_INOUT
_MEMREF_IN: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_MEMREF_INPUT
_MEMREF_OUT: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_MEMREF_OUTPUT
_MEMREF_INOUT: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_MEMREF_INOUT
_META: Final = uapi.TEE_IOCTL_PARAM_ATTR_META
_META_INOUT: Final = _META | _VALUE_INOUT
_MEMREFS: Final = frozenset({5, 6, 7})

_OK: Final = int(TeecResult.TEEC_SUCCESS)
_COMMUNICATION: Final = int(TeecResult.TEEC_ERROR_COMMUNICATION)
_NOT_FOUND: Final = int(TeecResult.TEEC_ERROR_ITEM_NOT_FOUND)
_NO_MEMORY: Final = int(TeecResult.TEEC_ERROR_OUT_OF_MEMORY)
_SECURITY: Final = int(TeecResult.TEEC_ERROR_SECURITY)
_BAD_PARAMETERS: Final = int(TeecResult.TEEC_ERROR_BAD_PARAMETERS)
_CONFLICT: Final = int(TeecResult.TEEC_ERROR_ACCESS_CONFLICT)
_OVERFLOW: Final = int(TeecResult.TEE_ERROR_OVERFLOW)

_HEAD: Final = uapi.SUPP_ARG_STRUCT
_PARAM: Final = uapi.PARAM_STRUCT
_P = tuple[int, int, int, int]
#: A LOAD_TA image larger than this is refused (the secure side cannot map it).
MAX_TA_IMAGE: Final = 16 << 20
_NAME_MAX: Final = 256


# ----------------------------------------------------------------------------- requests


@dataclass(slots=True, eq=False)
class RpcParam:
    """One param of an RPC request (the kernel's ``tee_param``), updated by the answer.

    Values: ``a, b, c``.  Memrefs: ``shm`` (None for a NULL memref), offset ``a`` and
    size ``b``; an OUTPUT/INOUT memref's ``b`` becomes the size the supplicant reports.
    """

    attr: int
    a: int = 0
    b: int = 0
    c: int = 0
    shm: _GpShm | None = None

    def to_supp(self) -> _P:
        """``params_to_supp``: what the supplicant's RECV shows."""
        t = self.attr & uapi.TEE_IOCTL_PARAM_ATTR_TYPE_MASK
        if t in (_VALUE_IN, _VALUE_INOUT):
            return (self.attr, self.a, self.b, self.c)
        if t in _MEMREFS:
            if self.shm is None:
                return (self.attr, 0, self.b, uapi.TEE_MEMREF_NULL)
            return (self.attr, self.a, self.b, self.shm.id)
        return (self.attr, 0, 0, 0)


class _Req:
    __slots__ = ("done", "func", "params", "ret")

    def __init__(self, func: int, params: list[RpcParam]) -> None:
        self.func = func
        self.params = params
        self.ret = _COMMUNICATION
        self.done = False


class OpteeSupp:
    """``struct optee_supp``: the requests waiting for, or being served by, the supplicant."""

    def __init__(self, device: OpteeDevice) -> None:
        self.device = device
        self.cond = threading.Condition()
        self.ctx: OpteeSuppContext | None = None
        self.reqs: deque[_Req] = deque()  # queued, not yet received
        self.idr: dict[int, _Req] = {}  # received, not yet answered
        self.req_id = -1  # the synchronous request (no META), -1 if none
        self._pobjs: dict[tuple[bytes, bytes], _PObj] = {}  # open persistent objects
        self._rpmb_fs: RpmbFs | None = None  # TEE_STORAGE_PRIVATE_RPMB, made on first use
        self._rpmb_shm: _GpShm | None = None  # the RPMB payload kept between requests
        self._rpmb_lock = threading.Lock()
        #: Called (under ``cond``: it must not block) when a request is queued and when
        #: the supplicant's context closes (see ``RequestQueue.on_ready``).
        self.on_ready: Callable[[], None] | None = None

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until a request is queued or no supplicant context is attached (True),
        or ``timeout`` seconds pass (False)."""
        with self.cond:
            return self.cond.wait_for(lambda: bool(self.reqs) or self.ctx is None, timeout)

    # ------------------------------------------------------------------ attach
    def open(self) -> OpteeSuppContext:
        """``optee_open`` of the privileged device: EBUSY while a supplicant is attached."""
        with self.cond:
            if self.ctx is not None:
                raise DriverError(errno.EBUSY, "a supplicant context is already open")
            ctx = self.ctx = OpteeSuppContext(self.device, self)
        with self.device._lock:
            self.device.contexts.add(ctx)
        return ctx

    def counts(self) -> dict[str, int]:
        """Requests queued and in flight (for leak checks and tests)."""
        with self.cond:
            return {"queued": len(self.reqs), "in flight": len(self.idr)}

    # ------------------------------------------------------------------ secure side
    def request(self, func: int, params: list[RpcParam]) -> int:
        """``optee_supp_thrd_req``: queue, wait for the answer (no limit), its ``ret``."""
        req = _Req(func, params)
        with self.cond:
            self.reqs.append(req)
            self.cond.notify_all()
            if self.on_ready is not None:
                self.on_ready()
            while not req.done:
                self.cond.wait()
        return req.ret

    def alloc_payload(self, size: int) -> _GpShm:
        """An APPL shm of ``size`` bytes from the supplicant (RPC SHM_ALLOC)."""
        p = RpcParam(_VALUE_INOUT, OPTEE_RPC_SHM_TYPE_APPL, size, 0)
        if self.request(OPTEE_RPC_CMD_SHM_ALLOC, [p]) != _OK:
            raise GpTaError(_NO_MEMORY, "supplicant could not allocate a payload")
        with self.cond:  # tee_shm_get_from_id(supp->ctx, c)
            ctx = self.ctx
            shm = ctx.shms.get(p.c) if ctx is not None and not ctx.closed else None
        if shm is None or shm.size < size:
            raise GpTaError(_NO_MEMORY, f"supplicant answered shm {p.c}, no such {size} bytes")
        return shm

    def free_payload(self, shm: _GpShm) -> None:
        """RPC SHM_FREE; nothing to ask if its supplicant context is gone already."""
        with self.cond:
            if shm.ctx is not self.ctx or shm.ctx.closed:
                return
        self.request(
            OPTEE_RPC_CMD_SHM_FREE, [RpcParam(_VALUE_INOUT, OPTEE_RPC_SHM_TYPE_APPL, shm.id)]
        )

    def shm_write(self, shm: _GpShm, off: int, data: bytes) -> None:
        if shm.addr is not None:
            self.device.memory.write(shm.addr + off, data)
        else:
            shm.buf[off : off + len(data)] = data

    def shm_read(self, shm: _GpShm, off: int, size: int) -> bytes:
        if shm.addr is not None:
            return self.device.memory.read(shm.addr + off, size)
        return bytes(shm.buf[off : off + size])

    def call(self, func: int, params: list[RpcParam]) -> None:
        """:meth:`request`; a non-zero answer is raised as :class:`GpTaError`."""
        ret = self.request(func, params)
        if ret != _OK:
            raise GpTaError(ret, f"RPC {func} answered {ret:#010x}")

    # ------------------------------------------------------------------ LOAD_TA
    def load_ta(self, raw: bytes) -> type[GpTA] | None:
        """The runtime's ``load_ta`` hook (``ree_fs_ta.c`` ``rpc_load``)."""
        value = RpcParam(
            _VALUE_IN, int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")
        )
        query = RpcParam(_MEMREF_OUT, 0, 0)
        self.call(OPTEE_RPC_CMD_LOAD_TA, [value, query])
        size = query.b
        if not 0 < size <= MAX_TA_IMAGE:
            raise GpTaError(_SECURITY, f"TA image of {size} bytes")
        shm = self.alloc_payload(size)
        try:
            memref = RpcParam(_MEMREF_OUT, 0, size, shm=shm)
            self.call(OPTEE_RPC_CMD_LOAD_TA, [value, memref])
            image = self.shm_read(shm, 0, min(memref.b, size))
        finally:
            self.free_payload(shm)
        world = self.device.runtime.world
        return _image_class(raw, image, world.tas, world.ta_key)

    # ------------------------------------------------------------------ SUPP_PLUGIN
    def supp_plugin(
        self, raw: bytes, cmd: int, sub_cmd: int, buf: bytearray | memoryview | None
    ) -> tuple[int, int]:
        """RPC SUPP_PLUGIN for a TA's buffer: (result, out length); see
        :func:`invoke_supp_plugin` for the copy-back rule."""
        size = len(buf) if buf is not None else 0
        words = [int.from_bytes(raw[i : i + 4], "little") for i in range(0, 16, 4)]
        head = RpcParam(_VALUE_IN, OPTEE_RPC_SUPP_PLUGIN_INVOKE, words[0], words[1])
        mid = RpcParam(_VALUE_IN, words[2], words[3], cmd)
        sub = RpcParam(_VALUE_INOUT, sub_cmd, 0, 0)
        shm = self.alloc_payload(size) if size else None
        try:
            if shm is not None and buf is not None:
                self.shm_write(shm, 0, bytes(buf))
            memref = RpcParam(_MEMREF_INOUT, 0, size, shm=shm)
            ret = self.request(OPTEE_RPC_CMD_SUPP_PLUGIN, [head, mid, sub, memref])
            outlen = sub.b & 0xFFFF_FFFF
            if shm is not None and buf is not None and outlen:
                buf[:] = self.shm_read(shm, 0, size)
                ret = _OK
        finally:
            if shm is not None:
                self.free_payload(shm)
        return ret, outlen

    # ------------------------------------------------------------------ RPMB
    def rpmb_request(self, req: bytes, rsp_size: int, rsp: bytes) -> bytes:
        """RPC RPMB (``tee_rpmb_invoke``, legacy): the request at 0 and the response
        (initially ``rsp``) at the next 4 KiB boundary of one payload; the response's
        bytes.  The payload is kept for the next RPMB request, as OP-TEE's per-thread
        RPC shm cache (``THREAD_SHM_CACHE_USER_RPMB``) keeps it: a larger need, or a new
        supplicant, replaces it."""
        offs = -(-len(req) // 4096) * 4096
        need = offs + max(-(-rsp_size // 4096) * 4096, 4096)
        with self._rpmb_lock:
            shm = self._rpmb_shm
            if shm is not None and (shm.size < need or shm.ctx is not self.ctx or shm.ctx.closed):
                self._rpmb_shm = None
                self.free_payload(shm)
                shm = None
            if shm is None:
                shm = self._rpmb_shm = self.alloc_payload(need)
            self.shm_write(shm, 0, req)
            self.shm_write(shm, offs, rsp)
            out = RpcParam(_MEMREF_OUT, offs, rsp_size, shm=shm)
            self.call(OPTEE_RPC_CMD_RPMB, [RpcParam(_MEMREF_IN, 0, len(req), shm=shm), out])
            return self.shm_read(shm, offs, rsp_size)

    def rpmb_fs(self) -> RpmbFs:
        """The device's RPMB FS, its key derived from the world's HUK on first use."""
        with self.cond:
            if self._rpmb_fs is None:
                huk = rpmb_huk(self.device.runtime.world)
                self._rpmb_fs = RpmbFs(self.rpmb_request, huk)
            return self._rpmb_fs

    # ------------------------------------------------------------------ FS
    def _name(self, path: str) -> tuple[_GpShm, RpcParam]:
        raw = path.encode() + b"\0"
        shm = self.alloc_payload(len(raw))
        self.shm_write(shm, 0, raw)
        return shm, RpcParam(_MEMREF_IN, 0, len(raw), shm=shm)

    def fs_open(self, path: str, *, create: bool) -> int:
        shm, name = self._name(path)
        try:
            out = RpcParam(_VALUE_OUT)
            op = FsOp.CREATE if create else FsOp.OPEN
            self.call(OPTEE_RPC_CMD_FS, [RpcParam(_VALUE_IN, op), name, out])
            return out.a
        finally:
            self.free_payload(shm)

    def fs_close(self, fd: int) -> None:
        self.call(OPTEE_RPC_CMD_FS, [RpcParam(_VALUE_IN, FsOp.CLOSE, fd)])

    def fs_read(self, fd: int, offset: int, size: int) -> bytes:
        if size == 0:
            return b""
        shm = self.alloc_payload(size)
        try:
            memref = RpcParam(_MEMREF_OUT, 0, size, shm=shm)
            self.call(OPTEE_RPC_CMD_FS, [RpcParam(_VALUE_IN, FsOp.READ, fd, offset), memref])
            return self.shm_read(shm, 0, min(memref.b, size))
        finally:
            self.free_payload(shm)

    def fs_write(self, fd: int, offset: int, data: bytes) -> None:
        if not data:
            return
        shm = self.alloc_payload(len(data))
        try:
            self.shm_write(shm, 0, data)
            memref = RpcParam(_MEMREF_IN, 0, len(data), shm=shm)
            self.call(OPTEE_RPC_CMD_FS, [RpcParam(_VALUE_IN, FsOp.WRITE, fd, offset), memref])
        finally:
            self.free_payload(shm)

    def fs_truncate(self, fd: int, length: int) -> None:
        self.call(OPTEE_RPC_CMD_FS, [RpcParam(_VALUE_IN, FsOp.TRUNCATE, fd, length)])

    def fs_remove(self, path: str) -> None:
        shm, name = self._name(path)
        try:
            self.call(OPTEE_RPC_CMD_FS, [RpcParam(_VALUE_IN, FsOp.REMOVE), name])
        finally:
            self.free_payload(shm)

    def fs_rename(self, old: str, new: str, *, overwrite: bool) -> None:
        shm_old, p_old = self._name(old)
        try:
            shm_new, p_new = self._name(new)
            try:
                head = RpcParam(_VALUE_IN, FsOp.RENAME, int(overwrite))
                self.call(OPTEE_RPC_CMD_FS, [head, p_old, p_new])
            finally:
                self.free_payload(shm_new)
        finally:
            self.free_payload(shm_old)

    def fs_listdir(self, path: str) -> list[str]:
        """OPENDIR, READDIR until ITEM_NOT_FOUND, CLOSEDIR; a missing directory is []."""
        shm, name = self._name(path)
        try:
            out = RpcParam(_VALUE_OUT)
            ret = self.request(OPTEE_RPC_CMD_FS, [RpcParam(_VALUE_IN, FsOp.OPENDIR), name, out])
        finally:
            self.free_payload(shm)
        if ret == _NOT_FOUND:
            return []
        if ret != _OK:
            raise GpTaError(ret, f"OPENDIR {path!r}")
        handle = out.a
        names: list[str] = []
        try:
            shm = self.alloc_payload(_NAME_MAX)
            try:
                while True:
                    memref = RpcParam(_MEMREF_OUT, 0, _NAME_MAX, shm=shm)
                    head = RpcParam(_VALUE_IN, FsOp.READDIR, handle)
                    ret = self.request(OPTEE_RPC_CMD_FS, [head, memref])
                    if ret == _NOT_FOUND:
                        break
                    if ret != _OK:
                        raise GpTaError(ret, f"READDIR {path!r}")
                    raw = self.shm_read(shm, 0, min(memref.b, _NAME_MAX))
                    names.append(raw.split(b"\0", 1)[0].decode(errors="replace"))
            finally:
                self.free_payload(shm)
        finally:
            self.fs_closedir(handle)
        return names

    def fs_closedir(self, handle: int) -> None:
        self.call(OPTEE_RPC_CMD_FS, [RpcParam(_VALUE_IN, FsOp.CLOSEDIR, handle)])


# ----------------------------------------------------------------------------- the context


class OpteeSuppContext(OpteeContext):
    """The supplicant's context on the privileged device: SUPPL_RECV and SUPPL_SEND too."""

    def __init__(self, device: OpteeDevice, supp: OpteeSupp) -> None:
        super().__init__(device)
        self.supp = supp

    def _dispatch(self, cmd: int, arg: bytearray | memoryview) -> int:
        if cmd == uapi.TEE_IOC_SUPPL_RECV:
            return self._supp_recv(arg)
        if cmd == uapi.TEE_IOC_SUPPL_SEND:
            return self._supp_send(arg)
        return super()._dispatch(cmd, arg)

    def _supp_block(self, arg: bytearray | memoryview, *, exact: bool) -> tuple[int, int, list[_P]]:
        buf_ptr, block, params = _checks.read_buf_block(
            self.device.memory, arg, _HEAD.size, 4, exact=exact
        )
        first: int = _HEAD.unpack_from(block)[0]
        return buf_ptr, first, params

    def recv_nowait(self, arg: bytearray | memoryview) -> int:
        """SUPPL_RECV that never blocks (the model's own): EAGAIN when no request is
        queued, else what the ioctl does (see ``Context.recv_nowait``)."""
        life = self.life
        life.enter()
        try:
            return self._supp_recv(arg, wait=False)
        finally:
            life.leave()

    def _supp_recv(self, arg: bytearray | memoryview, *, wait: bool = True) -> int:
        buf_ptr, _func, params = self._supp_block(arg, exact=True)
        if not params or any(p[0] not in (0, _META) for p in params):
            raise DriverError(errno.EINVAL, "SUPPL_RECV params must be NONE or META")
        num_meta = 1 if params[0][0] == _META else 0
        supp = self.supp
        with supp.cond:
            while True:
                if self.closed or supp.ctx is not self:
                    raise DriverError(errno.EINTR, "supplicant context closed while waiting")
                if supp.req_id != -1:
                    raise DriverError(errno.EINVAL, "the synchronous request was not answered")
                if supp.reqs:
                    req = supp.reqs[0]
                    if len(params) - num_meta < len(req.params):
                        raise DriverError(errno.EINVAL, "not enough params for the request")
                    req_id = next(i for i in range(1, len(supp.idr) + 2) if i not in supp.idr)
                    supp.reqs.popleft()
                    supp.idr[req_id] = req
                    if not num_meta:
                        supp.req_id = req_id
                    break
                if not wait:
                    raise DriverError(errno.EAGAIN, "no request is queued")
                supp.cond.wait()
        out: list[_P] = [(_META_INOUT, req_id, 0, 0)] if num_meta else []
        out += [p.to_supp() for p in req.params]
        head = _HEAD.pack(req.func, len(out))
        self.device.memory.write(buf_ptr, head + b"".join(_PARAM.pack(*p) for p in out))
        return 0

    def _supp_send(self, arg: bytearray | memoryview) -> int:
        _ptr, ret, params = self._supp_block(arg, exact=False)
        supp = self.supp
        with supp.cond:
            if supp.ctx is not self:
                raise DriverError(errno.EINVAL, "not the supplicant")
            if not params:
                raise DriverError(errno.EINVAL, "SUPPL_SEND needs params")
            if supp.req_id == -1:
                if params[0][0] != _META_INOUT:
                    raise DriverError(errno.EINVAL, "SUPPL_SEND needs a VALUE_INOUT|META param")
                req_id, nm = params[0][1], 1
            else:
                req_id, nm = supp.req_id, 0
            req = supp.idr.get(req_id)
            if req is None:
                raise DriverError(errno.ENOENT, f"no request {req_id}")
            if len(params) - nm != len(req.params):
                raise DriverError(errno.EINVAL, f"request {req_id} has {len(req.params)} params")
            del supp.idr[req_id]
            supp.req_id = -1
            for p, (_attr, a, b, c) in zip(req.params, params[nm:], strict=True):
                t = p.attr & uapi.TEE_IOCTL_PARAM_ATTR_TYPE_MASK
                if t in (_VALUE_OUT, _VALUE_INOUT):
                    p.a, p.b, p.c = a, b, c
                elif t in (_MEMREF_OUT, uapi.TEE_IOCTL_PARAM_ATTR_TYPE_MEMREF_INOUT):
                    p.b = b
            req.ret = ret
            req.done = True
            supp.cond.notify_all()
        return 0

    def _on_close(self) -> None:
        """``optee_supp_release``: every request received or queued → COMMUNICATION, and
        the threads blocked in SUPPL_RECV return EINTR."""
        supp = self.supp
        with supp.cond:
            if supp.ctx is self:
                for req in [*supp.idr.values(), *supp.reqs]:
                    req.ret = _COMMUNICATION
                    req.done = True
                supp.idr.clear()
                supp.reqs.clear()
                supp.ctx = None
                supp.req_id = -1
            supp.cond.notify_all()
            if supp.on_ready is not None:
                supp.on_ready()


# ----------------------------------------------------------------------------- attaching

_ATTACH_LOCK = threading.Lock()


def _queue_of(runtime: GpRuntime) -> OpteeSupp | None:
    """The queue whose LOAD_TA hook the runtime has (the hook is the queue's method, so
    nothing else keeps a device alive)."""
    owner = getattr(runtime.load_ta, "__self__", None)
    return owner if isinstance(owner, OpteeSupp) else None


def attach_rpc(device: OpteeDevice) -> OpteeSupp:
    """The device's supplicant queue, made on first use; it installs the LOAD_TA hook on
    the device's runtime, so from then on an unknown UUID waits for a supplicant.

    A runtime that already has another ``load_ta`` hook (another device's queue, too) is
    a UsageError."""
    with _ATTACH_LOCK:
        runtime = device.runtime
        supp = _queue_of(runtime)
        if supp is not None and supp.device is device:
            return supp
        if runtime.load_ta is not None:
            raise UsageError("the runtime already has a load_ta hook")
        supp = OpteeSupp(device)
        runtime.load_ta = supp.load_ta
        return supp


# ----------------------------------------------------------------------------- loadable TAs
# register_loadable_ta, unregister_loadable_ta, lookup_loadable_ta and gp_ta_image live
# with the GP TA registry (qtee.secure._gp); they are imported above.


def _image_class(
    raw: bytes, image: bytes, tas: TaRegistry | None = None, key: SigningKey | None = None
) -> type[GpTA] | None:
    """The class of the image tee-supplicant sent for the UUID ``raw`` (None: the model
    has none, ITEM_NOT_FOUND); :class:`GpTaError` (SECURITY) where OP-TEE's checks of
    the image would fail.  See "How an image names a GP TA" in the module docstring.
    ``tas`` is the registry of the world that loads (default: the process-wide one),
    ``key`` the key it trusts for model images (default: the process's model key)."""
    from qtee.secure._apps import TA_MAGIC
    from qtee.secure._registry import PROCESS_TAS
    from qtee.secure._signing import (
        ImageFormatError,
        ImageSignatureError,
        default_model_key,
        is_optee_model,
        verify_optee_model,
        verify_qtee_model,
    )
    from qtee.secure._tafiles import SignedHeaderError, is_signed_image, signed_header_uuid

    if tas is None:
        tas = PROCESS_TAS
    if key is None:
        key = default_model_key()

    want = uuidlib.UUID(bytes=bytes(raw))
    if is_optee_model(image) or image.startswith(TA_MAGIC):  # a model image: verify it
        try:
            if is_optee_model(image):
                name = str(verify_optee_model(image, key)[0])
            else:
                name = verify_qtee_model(image, key)[0]
        except (ImageFormatError, ImageSignatureError) as exc:
            raise GpTaError(_SECURITY, f"the image for {want}: {exc}") from None
        if name != str(want):
            raise GpTaError(_SECURITY, f"the image for {want} is {name!r}")
        return tas.lookup_loadable(want) or tas.file_by_uuid(want)
    try:  # ree_fs_ta_open: the signed header first, its UUID against the one asked for
        inside, bad = signed_header_uuid(image), ""
    except SignedHeaderError as exc:
        inside, bad = None, str(exc)
    if inside is not None and inside != want:
        raise GpTaError(_SECURITY, f"the image for {want} is signed for {inside}")
    found = tas.file_by_sha256("optee", image)
    if found is not None:
        cls: type[GpTA] = found[0]
        if want != cls.UUID:
            raise GpTaError(_SECURITY, f"the image for {want} is registered as {cls.UUID}")
        return cls
    if tas.lookup_loadable(want) is not None:  # it exists only as a model image
        raise GpTaError(_SECURITY, f"the image for {want} is not a signed model image")
    if bad:
        raise GpTaError(_SECURITY, f"the image for {want}: {bad}")
    if not is_signed_image(image):  # shdr_alloc_and_copy: no SHDR_MAGIC, no TA
        raise GpTaError(_SECURITY, f"the image for {want} is not a signed TA (no SHDR magic)")
    cls_by_name = tas.file_by_uuid(want)
    if cls_by_name is None:  # OP-TEE cannot verify an image it has no key for
        raise GpTaError(_SECURITY, f"no TA is registered for the image of {want}")
    return cls_by_name


# ----------------------------------------------------------------------------- storage


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
        raise GpTaError(_BAD_PARAMETERS, "an object id is 1 to 64 bytes")
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
            raise GpTaError(_NOT_FOUND, f"no storage {storage_id:#x}")

    def _join(self, key: bytes, flags: int, size: int) -> _PObj:
        # Under supp.cond.
        pobj = self._supp._pobjs.get((self.ta_uuid, key))
        if pobj is None:
            pobj = self._supp._pobjs[(self.ta_uuid, key)] = _PObj(size)
        elif any(_conflicts(h.flags, flags) for h in pobj.handles):
            raise GpTaError(_CONFLICT, "the object is open with incompatible flags")
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
            raise GpTaError(_BAD_PARAMETERS, f"open flags {flags:#x}")
        with self._supp.cond:  # sharing is checked before the REE FS is asked
            pobj = self._supp._pobjs.get((self.ta_uuid, key))
            if pobj is not None and any(_conflicts(h.flags, flags) for h in pobj.handles):
                raise GpTaError(_CONFLICT, "the object is open with incompatible flags")
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
            raise GpTaError(_BAD_PARAMETERS, f"create flags {flags:#x}")
        data = bytes(data)
        with self._supp.cond:
            if (self.ta_uuid, key) in self._supp._pobjs:
                raise GpTaError(_CONFLICT, "the object is open")
        path = self.path(key)
        if not flags & TEE_DATA_FLAG_OVERWRITE:
            try:
                fd = self._supp.fs_open(path, create=False)
            except GpTaError as exc:
                if exc.code != _NOT_FOUND:
                    raise
            else:
                self._supp.fs_close(fd)
                raise GpTaError(_CONFLICT, "the object exists")
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
            raise GpTaError(_NOT_FOUND, f"no storage {storage_id:#x}")

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
            raise GpTaError(_BAD_PARAMETERS, "the handle is closed")
        if flag and not self.flags & flag:
            raise GpTaError(_CONFLICT, f"the handle lacks access flag {flag:#x}")

    def read(self, size: int) -> bytes:
        """``TEE_ReadObjectData``: up to ``size`` bytes from the position."""
        self._need(TEE_DATA_FLAG_ACCESS_READ)
        if size < 0:
            raise GpTaError(_BAD_PARAMETERS, "negative size")
        data = self._supp.fs_read(self._fd, self.pos, min(size, max(0, self.size - self.pos)))
        self.pos += len(data)
        return data

    def write(self, data: bytes) -> None:
        """``TEE_WriteObjectData``: at the position; a gap past the end reads as zeros."""
        self._need(TEE_DATA_FLAG_ACCESS_WRITE)
        data = bytes(data)
        if self.pos + len(data) > TEE_DATA_MAX_POSITION:
            raise GpTaError(_OVERFLOW, "past TEE_DATA_MAX_POSITION")
        self._supp.fs_write(self._fd, self.pos, data)
        self.pos += len(data)
        with self._supp.cond:
            self._pobj.size = max(self._pobj.size, self.pos)

    def seek(self, offset: int, whence: int = TEE_DATA_SEEK_SET) -> int:
        """``TEE_SeekObjectData``: the new position."""
        self._need(0)
        base = {TEE_DATA_SEEK_SET: 0, TEE_DATA_SEEK_CUR: self.pos, TEE_DATA_SEEK_END: self.size}
        if whence not in base:
            raise GpTaError(_BAD_PARAMETERS, f"whence {whence}")
        new = base[whence] + offset
        new = max(new, 0)  # GP: a negative result sets the position to 0
        if new > TEE_DATA_MAX_POSITION:
            raise GpTaError(_OVERFLOW, "past TEE_DATA_MAX_POSITION")
        self.pos = new
        return new

    def truncate(self, size: int) -> None:
        """``TEE_TruncateObjectData``: shorten, or extend with zeros."""
        self._need(TEE_DATA_FLAG_ACCESS_WRITE)
        if not 0 <= size <= TEE_DATA_MAX_POSITION:
            raise GpTaError(_BAD_PARAMETERS, f"size {size}")
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
                raise GpTaError(_CONFLICT, "an object with the new id is open")
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


def invoke_supp_plugin(
    ta: GpTA,
    plugin: uuidlib.UUID | bytes,
    cmd: int,
    sub_cmd: int,
    buf: bytearray | memoryview | None = None,
) -> int:
    """``tee_invoke_supp_plugin``: call the supplicant's plugin ``plugin`` with ``cmd``,
    ``sub_cmd`` and ``buf`` (call it inside one of ``ta``'s entry points); the out length.

    ``buf`` is in/out: its bytes go to the plugin, and when the plugin reports a non-zero
    out length the whole buffer is replaced by the payload as the plugin left it (the
    result is then SUCCESS, whatever the plugin answered).  Any other non-success answer
    is raised as :class:`GpTaError` (ITEM_NOT_FOUND: the supplicant has no such plugin).
    The out length may exceed ``len(buf)`` (a plugin saying how much it needs)."""
    if isinstance(plugin, uuidlib.UUID):
        raw = plugin.bytes
    elif isinstance(plugin, (bytes, bytearray)) and len(plugin) == 16:
        raw = bytes(plugin)
    else:
        raise TypeError(f"plugin must be a UUID or 16 bytes, not {plugin!r}")
    for name, value in (("cmd", cmd), ("sub_cmd", sub_cmd)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0xFFFF_FFFF:
            raise ValueError(f"{name} must be a u32, not {value!r}")
    if buf is not None and (
        not isinstance(buf, (bytearray, memoryview))
        or (isinstance(buf, memoryview) and buf.readonly)
    ):
        raise TypeError(f"buf must be a writable bytearray or memoryview, not {type(buf).__name__}")
    entry = ta._entry()
    supp = _queue_of(entry.runtime)
    if supp is None:
        raise GpTaError(int(TeecResult.TEEC_ERROR_NOT_SUPPORTED), "no supplicant queue")
    ret, outlen = supp.supp_plugin(raw, cmd, sub_cmd, buf)
    if ret != _OK:
        said = name_of(ret)  # the TEEC result's C name when it is one
        said = f"{said} ({ret:#010x})" if said != f"0x{ret:08X}" else said
        raise GpTaError(ret, f"plugin {uuidlib.UUID(bytes=raw)} answered {said}")
    return outlen
