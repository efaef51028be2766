"""The OP-TEE device's RPC queue to tee-supplicant, and the secure-world services on it.

**The queue** (:class:`OpteeSupp`, the kernel's ``optee/supp.c``; optee.md §3.3).
:meth:`qtee._optee.core.OpteeDevice.open_supplicant` opens the privileged device
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

The services on the queue: which class a LOAD_TA image is (:mod:`qtee._optee.ta_image`),
GP trusted storage (:mod:`qtee._optee.storage`) and the TA side of supplicant plugins
(:mod:`qtee._optee.supp_plugin`); :class:`OpteeSupp` makes their RPCs.
"""

from __future__ import annotations

import enum
import errno
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from objects import DriverError, UsageError
from qtee import _checks, uapi
from qtee._optee.core import OpteeContext, _GpShm
from qtee._optee.ta_image import _image_class
from qtee.gp import _codes as teec
from qtee.secure._gp import GpRuntime, GpTA, GpTaError
from qtee.secure._rpmb_fs import RpmbFs, rpmb_huk

if TYPE_CHECKING:
    from qtee._optee.core import OpteeDevice
    from qtee._optee.storage import _PObj

__all__ = [
    "OPTEE_RPC_SUPP_PLUGIN_INVOKE",
    "FsOp",
    "OpteeRpcCmd",
    "OpteeSupp",
    "OpteeSuppContext",
    "RpcParam",
    "attach_rpc",
]

# ----------------------------------------------------------------------------- constants


class OpteeRpcCmd(enum.IntEnum):
    """``OPTEE_RPC_CMD_*``: what a request asks tee-supplicant for (its ``func``)."""

    OPTEE_RPC_CMD_LOAD_TA = 0
    OPTEE_RPC_CMD_RPMB = 1
    OPTEE_RPC_CMD_FS = 2
    OPTEE_RPC_CMD_SHM_ALLOC = 6
    OPTEE_RPC_CMD_SHM_FREE = 7
    OPTEE_RPC_CMD_SUPP_PLUGIN = 12


_CMD = OpteeRpcCmd
OPTEE_RPC_SUPP_PLUGIN_INVOKE: Final = 0
OPTEE_RPC_SHM_TYPE_APPL: Final = 0
#: Seconds a request waits with no supplicant attached before the model says so (once
#: per request; the request goes on waiting, as the kernel's does).
NO_SUPPLICANT_NOTE: Final = 2.0

log = logging.getLogger("qtee.optee")


def _rpc_name(func: int) -> str:
    try:
        return OpteeRpcCmd(func).name.removeprefix("OPTEE_RPC_CMD_")
    except ValueError:
        return str(func)


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


_VALUE_IN: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_INPUT
_VALUE_OUT: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_OUTPUT
_VALUE_INOUT: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_INOUT
_MEMREF_IN: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_MEMREF_INPUT
_MEMREF_OUT: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_MEMREF_OUTPUT
_MEMREF_INOUT: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_MEMREF_INOUT
_META: Final = uapi.TEE_IOCTL_PARAM_ATTR_META
_META_INOUT: Final = _META | _VALUE_INOUT
_MEMREFS: Final = frozenset({5, 6, 7})


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


@dataclass(slots=True, eq=False)
class _Req:
    """One RPC request: its command and params, then the supplicant's answer."""

    func: int
    params: list[RpcParam]
    ret: int = teec.COMMUNICATION
    done: bool = False


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
        """``optee_supp_thrd_req``: queue, wait for the answer (no limit), its ``ret``.
        While no supplicant is attached the request waits all the same, as the kernel's
        does for a user context; after :data:`NO_SUPPLICANT_NOTE` s a warning says what it
        waits for (a typo in a UUID otherwise looks like a hang)."""
        req = _Req(func, params)
        with self.cond:
            self.reqs.append(req)
            self.cond.notify_all()
            if self.on_ready is not None:
                self.on_ready()
            noted = False
            while not req.done:
                if noted or self.ctx is not None:
                    self.cond.wait()
                elif not self.cond.wait(NO_SUPPLICANT_NOTE) and self.ctx is None:
                    noted = True
                    log.warning(
                        "the secure side waits for tee-supplicant (RPC %s) and none is "
                        "attached: start one (supplicant.OpteeSupplicant, or qtee supplicant "
                        "--tee optee), or register the TA (register_gp_ta); still waiting",
                        _rpc_name(func),
                    )
        return req.ret

    def alloc_payload(self, size: int) -> _GpShm:
        """An APPL shm of ``size`` bytes from the supplicant (RPC SHM_ALLOC)."""
        p = RpcParam(_VALUE_INOUT, OPTEE_RPC_SHM_TYPE_APPL, size, 0)
        if self.request(_CMD.OPTEE_RPC_CMD_SHM_ALLOC, [p]) != teec.SUCCESS:
            raise GpTaError(teec.OUT_OF_MEMORY, "supplicant could not allocate a payload")
        with self.cond:  # tee_shm_get_from_id(supp->ctx, c)
            ctx = self.ctx
            shm = ctx.shms.get(p.c) if ctx is not None and not ctx.closed else None
        if shm is None or shm.size < size:
            raise GpTaError(
                teec.OUT_OF_MEMORY, f"supplicant answered shm {p.c}, no such {size} bytes"
            )
        return shm

    def free_payload(self, shm: _GpShm) -> None:
        """RPC SHM_FREE; nothing to ask if its supplicant context is gone already."""
        with self.cond:
            if shm.ctx is not self.ctx or shm.ctx.closed:
                return
        self.request(
            _CMD.OPTEE_RPC_CMD_SHM_FREE, [RpcParam(_VALUE_INOUT, OPTEE_RPC_SHM_TYPE_APPL, shm.id)]
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
        if ret != teec.SUCCESS:
            raise GpTaError(ret, f"RPC {func} answered {ret:#010x}")

    # ------------------------------------------------------------------ LOAD_TA
    def load_ta(self, raw: bytes) -> type[GpTA] | None:
        """The runtime's ``load_ta`` hook (``ree_fs_ta.c`` ``rpc_load``)."""
        value = RpcParam(
            _VALUE_IN, int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")
        )
        query = RpcParam(_MEMREF_OUT, 0, 0)
        self.call(_CMD.OPTEE_RPC_CMD_LOAD_TA, [value, query])
        size = query.b
        if not 0 < size <= MAX_TA_IMAGE:
            raise GpTaError(teec.SECURITY, f"TA image of {size} bytes")
        shm = self.alloc_payload(size)
        try:
            memref = RpcParam(_MEMREF_OUT, 0, size, shm=shm)
            self.call(_CMD.OPTEE_RPC_CMD_LOAD_TA, [value, memref])
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
            ret = self.request(_CMD.OPTEE_RPC_CMD_SUPP_PLUGIN, [head, mid, sub, memref])
            outlen = sub.b & 0xFFFF_FFFF
            if shm is not None and buf is not None and outlen:
                buf[:] = self.shm_read(shm, 0, size)
                ret = teec.SUCCESS
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
            self.call(_CMD.OPTEE_RPC_CMD_RPMB, [RpcParam(_MEMREF_IN, 0, len(req), shm=shm), out])
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
            self.call(_CMD.OPTEE_RPC_CMD_FS, [RpcParam(_VALUE_IN, op), name, out])
            return out.a
        finally:
            self.free_payload(shm)

    def fs_close(self, fd: int) -> None:
        self.call(_CMD.OPTEE_RPC_CMD_FS, [RpcParam(_VALUE_IN, FsOp.CLOSE, fd)])

    def fs_read(self, fd: int, offset: int, size: int) -> bytes:
        if size == 0:
            return b""
        shm = self.alloc_payload(size)
        try:
            memref = RpcParam(_MEMREF_OUT, 0, size, shm=shm)
            self.call(_CMD.OPTEE_RPC_CMD_FS, [RpcParam(_VALUE_IN, FsOp.READ, fd, offset), memref])
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
            self.call(_CMD.OPTEE_RPC_CMD_FS, [RpcParam(_VALUE_IN, FsOp.WRITE, fd, offset), memref])
        finally:
            self.free_payload(shm)

    def fs_truncate(self, fd: int, length: int) -> None:
        self.call(_CMD.OPTEE_RPC_CMD_FS, [RpcParam(_VALUE_IN, FsOp.TRUNCATE, fd, length)])

    def fs_remove(self, path: str) -> None:
        shm, name = self._name(path)
        try:
            self.call(_CMD.OPTEE_RPC_CMD_FS, [RpcParam(_VALUE_IN, FsOp.REMOVE), name])
        finally:
            self.free_payload(shm)

    def fs_rename(self, old: str, new: str, *, overwrite: bool) -> None:
        shm_old, p_old = self._name(old)
        try:
            shm_new, p_new = self._name(new)
            try:
                head = RpcParam(_VALUE_IN, FsOp.RENAME, int(overwrite))
                self.call(_CMD.OPTEE_RPC_CMD_FS, [head, p_old, p_new])
            finally:
                self.free_payload(shm_new)
        finally:
            self.free_payload(shm_old)

    def fs_listdir(self, path: str) -> list[str]:
        """OPENDIR, READDIR until ITEM_NOT_FOUND, CLOSEDIR; a missing directory is []."""
        shm, name = self._name(path)
        try:
            out = RpcParam(_VALUE_OUT)
            head = RpcParam(_VALUE_IN, FsOp.OPENDIR)
            ret = self.request(_CMD.OPTEE_RPC_CMD_FS, [head, name, out])
        finally:
            self.free_payload(shm)
        if ret == teec.ITEM_NOT_FOUND:
            return []
        if ret != teec.SUCCESS:
            raise GpTaError(ret, f"OPENDIR {path!r}")
        handle = out.a
        names: list[str] = []
        try:
            shm = self.alloc_payload(_NAME_MAX)
            try:
                while True:
                    memref = RpcParam(_MEMREF_OUT, 0, _NAME_MAX, shm=shm)
                    head = RpcParam(_VALUE_IN, FsOp.READDIR, handle)
                    ret = self.request(_CMD.OPTEE_RPC_CMD_FS, [head, memref])
                    if ret == teec.ITEM_NOT_FOUND:
                        break
                    if ret != teec.SUCCESS:
                        raise GpTaError(ret, f"READDIR {path!r}")
                    raw = self.shm_read(shm, 0, min(memref.b, _NAME_MAX))
                    names.append(raw.split(b"\0", 1)[0].decode(errors="replace"))
            finally:
                self.free_payload(shm)
        finally:
            self.fs_closedir(handle)
        return names

    def fs_closedir(self, handle: int) -> None:
        self.call(_CMD.OPTEE_RPC_CMD_FS, [RpcParam(_VALUE_IN, FsOp.CLOSEDIR, handle)])


# ----------------------------------------------------------------------------- the context


class OpteeSuppContext(OpteeContext):
    """The supplicant's context on the privileged device: its SUPPL_RECV and SUPPL_SEND
    ops (the TEE core's switch and ``recv_nowait`` reach them)."""

    def __init__(self, device: OpteeDevice, supp: OpteeSupp) -> None:
        super().__init__(device)
        self.supp = supp

    def _supp_block(self, arg: bytearray | memoryview, *, exact: bool) -> tuple[int, int, list[_P]]:
        buf_ptr, block, params = _checks.read_buf_block(
            self.device.memory, arg, _HEAD.size, 4, exact=exact
        )
        first: int = _HEAD.unpack_from(block)[0]
        return buf_ptr, first, params

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
                    req.ret = teec.COMMUNICATION
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
