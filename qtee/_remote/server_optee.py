"""The device server's OP-TEE flavour: ``qtee serve --tee optee``.

A served OP-TEE device (:class:`ServedOpteeDevice`) is the in-process
:class:`qtee.OpteeDevice` with the hooks a process boundary needs, and nothing else
changed: the same ioctls, the same checks, the same errno.

* **Two nodes.**  A connection's ``hello`` opens ``tee`` (a client's context) or
  ``teepriv`` (tee-supplicant's, :meth:`qtee.OpteeDevice.open_supplicant`: one at a time,
  a second is ``denied`` EBUSY, as the open is).
* **Allocated shms** (SHM_ALLOC) live in memory files (``memfd``); the fd goes to the
  client (a ``shm`` frame), which maps the pages the TA reads and writes, as the kernel's
  shm fd does.  RPC payloads that tee-supplicant allocates with SHM_ALLOC are such shms of
  its own context, so the TA and the supplicant process share them.
* **Registered shms** (SHM_REGISTER) are the caller's own memory, which the server cannot
  reach: the client sends the registered range with SHM_REGISTER (the kernel pins the
  pages, EFAULT if unmapped), and with each OPEN_SESSION/INVOKE the windows of its
  registered shms that the call's memrefs name (``qtee._remote.remote_optee``); the model copies a
  window in before the call and writes back what the TA changed
  (``OpteeContext._gp_params``/``_params_back``), which goes back with the reply.
* **tee-supplicant's registered shms** (what the real tee-supplicant uses for RPC payloads
  when the device reports ``TEE_GEN_CAP_REG_MEM``) are reached by the TA outside any call
  of the supplicant, so the server keeps a *shadow* of each: the TA reads and writes the
  shadow (:class:`_ServedSupp`), a SUPPL_RECV's reply carries the shadow's bytes of the
  input and in/out memrefs it hands over (written into the supplicant's memory at the
  registered address), and a SUPPL_SEND brings the supplicant's bytes of the output and
  in/out memrefs of the request it answers, copied into the shadow before the request
  completes.  Bytes the supplicant changes outside those windows are not seen.
* **Who calls.**  A client UUID for LOGIN_USER/GROUP is computed from the connecting
  process's credentials (``SO_PEERCRED``, ``SO_PEERGROUPS``), as the kernel reads the
  calling task's.
* **Deadlines.**  A call waiting on tee-supplicant (LOAD_TA, storage) counts as waiting on
  a callback: a client's probe sees its deadline stand still meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import uuid as uuidlib
import weakref
from typing import TYPE_CHECKING, Any, Final

from objects import DriverError, UsageError
from qtee import uapi
from qtee._optee.core import _GEN_CAPS, OpteeContext, OpteeDevice, _GpShm
from qtee._optee.supp import OpteeSupp, OpteeSuppContext, RpcParam
from qtee._remote.region_memory import CallRegions, RegionMemory
from qtee._remote.served import Peer
from qtee._tee.shm import MemfdShm
from qtee.gp._identity import Cred

if TYPE_CHECKING:
    from collections.abc import Callable

    from qtee.secure import SecureWorld

__all__ = ["OpteeFlavour", "ServedOpteeDevice"]

_HEAD: Final = uapi.SUPP_ARG_STRUCT
_PARAM: Final = uapi.PARAM_STRUCT
_BUF: Final = uapi.BUF_DATA_STRUCT
_META_INOUT: Final = uapi.TEE_IOCTL_PARAM_ATTR_META | uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_INOUT
_TYPE_MASK: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_MASK
_TO_SUPP: Final = frozenset({5, 7})  # memrefs whose bytes the supplicant reads
_FROM_SUPP: Final = frozenset({6, 7})  # memrefs whose bytes the supplicant writes
_SUPPL_RECV: Final = uapi.TEE_IOC_SUPPL_RECV
_SUPPL_SEND: Final = uapi.TEE_IOC_SUPPL_SEND


class _Shadow:
    """The server's copy of a registered shm's bytes, made when first used."""

    __slots__ = ("_buf", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self._buf: bytearray | None = None

    @property
    def buf(self) -> bytearray:
        if self._buf is None:
            self._buf = bytearray(self.size)
        return self._buf


def _shadow(shm: _GpShm) -> bytearray:
    handle = shm.handle
    if not isinstance(handle, _Shadow):  # a registered shm of a ServedOpteeDevice has one
        raise UsageError(f"shm {shm.id} has no shadow")
    return handle.buf


class _ServedSupp(OpteeSupp):
    """The RPC queue of a served device: payloads in the supplicant's registered memory
    go through their shadows, and a wait for the supplicant is a callback for probes."""

    def request(self, func: int, params: list[RpcParam]) -> int:
        hook: Callable[[bool], None] | None = getattr(self.device, "on_callback", None)
        if hook is None:
            return super().request(func, params)
        hook(True)
        try:
            return super().request(func, params)
        finally:
            hook(False)

    def shm_write(self, shm: _GpShm, off: int, data: bytes) -> None:
        if shm.addr is None:
            super().shm_write(shm, off, data)
            return
        _shadow(shm)[off : off + len(data)] = data

    def shm_read(self, shm: _GpShm, off: int, size: int) -> bytes:
        if shm.addr is None:
            return super().shm_read(shm, off, size)
        return bytes(_shadow(shm)[off : off + size])


class ServedOpteeDevice(OpteeDevice):
    """An OP-TEE device for a :class:`qtee.DeviceServer` (see the module docstring):
    ``memory`` is the server's :class:`~qtee._remote.region_memory.RegionMemory`; allocated shms
    are memory files, registered ones get a shadow; the caller's credentials are the
    connecting process's.  ``on_callback`` is set by the server."""

    memory: RegionMemory

    def __init__(self, world: SecureWorld, *, memory: RegionMemory | None = None) -> None:
        if memory is None:
            memory = RegionMemory()
        elif not isinstance(memory, RegionMemory):
            raise UsageError(f"a served device's memory is a RegionMemory, not {memory!r}")
        super().__init__(world, memory=memory, cred=self._caller)
        #: Called with True when a call starts waiting on tee-supplicant, False after.
        self.on_callback: Callable[[bool], None] | None = None
        self._attach = threading.Lock()

    def _caller(self) -> Cred:
        """The credentials of the process whose call runs in this thread."""
        call = self.memory.current()
        peer = call.peer if call is not None else None
        if isinstance(peer, Peer):
            return Cred(euid=peer.uid, egid=peer.gid, groups=peer.groups)
        return Cred(euid=os.geteuid(), egid=os.getegid(), groups=frozenset(os.getgroups()))

    def open_supplicant(self) -> OpteeSuppContext:
        """The privileged node, on the served RPC queue (made on first use, as
        ``attach_rpc`` makes the in-process one); EBUSY while a supplicant holds it."""
        with self._attach:
            runtime = self.runtime
            owner = getattr(runtime.load_ta, "__self__", None)
            if not isinstance(owner, _ServedSupp):
                if runtime.load_ta is not None:
                    raise UsageError("the runtime already has a load_ta hook")
                runtime.load_ta = _ServedSupp(self).load_ta
        return super().open_supplicant()

    def _shm_backing(self, size: int, addr: int | None) -> tuple[bytearray | memoryview, object]:
        if addr is not None:
            return bytearray(), _Shadow(size)
        return MemfdShm.allocate(size)

    def _shm_release(self, shm: _GpShm) -> None:
        handle = shm.handle
        if isinstance(handle, MemfdShm):
            if isinstance(shm.buf, memoryview):
                with contextlib.suppress(BufferError):
                    shm.buf.release()
            handle.close()


def _block(memory: RegionMemory, arg: bytes) -> tuple[int, list[tuple[int, int, int, int]]]:
    """``(first word, params)`` of a SUPPL_RECV/SEND block as the call's regions hold it;
    DriverError if they do not."""
    if len(arg) < _BUF.size:
        raise DriverError(errno.EINVAL, "short buf_data")
    ptr, length = _BUF.unpack_from(arg)
    block = memory.read(ptr, length)
    if len(block) < _HEAD.size:
        raise DriverError(errno.EINVAL, "short block")
    first, num = _HEAD.unpack_from(block)
    num = min(num, (len(block) - _HEAD.size) // _PARAM.size)
    return first, [_PARAM.unpack_from(block, _HEAD.size + _PARAM.size * i) for i in range(num)]


class _OpteeFile:
    """An OP-TEE context as a connection serves it; on the privileged node, the RECV/SEND
    windows of tee-supplicant's registered shms (see the module docstring)."""

    __slots__ = ("ctx", "memory", "queue")
    plain = False

    def __init__(self, ctx: OpteeContext, memory: RegionMemory) -> None:
        self.ctx = ctx
        self.memory = memory
        self.queue: OpteeSupp | None = ctx.supp if isinstance(ctx, OpteeSuppContext) else None

    def pending(self) -> bool:
        supp = self.queue
        return supp is not None and (bool(supp.reqs) or supp.ctx is not self.ctx)

    def shm_fd(self, shm_id: int) -> int | None:
        shm = self.ctx.shms.get(shm_id)
        handle = shm.handle if shm is not None else None
        return handle.take_fd() if isinstance(handle, MemfdShm) else None

    def before(self, cmd: int, arg: bytes, call: CallRegions) -> None:
        """SUPPL_SEND: the supplicant's bytes of the answered request's output memrefs in
        its registered shms go into their shadows before the request completes."""
        supp = self.queue
        if cmd != _SUPPL_SEND or supp is None:
            return
        try:
            _ret, params = _block(self.memory, arg)
        except DriverError:
            return  # the ioctl fails on its own
        with supp.cond:
            if supp.ctx is not self.ctx or not params:
                return
            if supp.req_id != -1:
                req = supp.idr.get(supp.req_id)
            elif params[0][0] == _META_INOUT:
                req = supp.idr.get(params[0][1])
            else:
                return
            for p in req.params if req is not None else ():
                shm = p.shm
                if (
                    p.attr & _TYPE_MASK in _FROM_SUPP
                    and shm is not None
                    and shm.ctx is self.ctx
                    and shm.addr is not None
                ):
                    end = min(p.a + p.b, shm.size)
                    if p.a < end:
                        call.copy_out(shm.addr + p.a, memoryview(_shadow(shm))[p.a : end])

    def after(self, cmd: int, arg: bytes, call: CallRegions) -> list[tuple[int, bytes]]:
        """SUPPL_RECV: the shadow's bytes of the input memrefs handed over, for the
        supplicant's registered memory (disjoint from the request's regions)."""
        if cmd != _SUPPL_RECV or self.queue is None:
            return []
        try:
            _func, params = _block(self.memory, arg)
        except DriverError:
            return []
        out: list[tuple[int, bytes]] = []
        for attr, a, b, c in params:
            if attr & _TYPE_MASK not in _TO_SUPP or not b or c == uapi.TEE_MEMREF_NULL:
                continue
            shm = self.ctx.shms.get(c)
            if shm is None or shm.addr is None or a + b > shm.size:
                continue
            addr = shm.addr + a
            if call.overlaps(addr, b) or any(x < addr + b and addr < x + len(d) for x, d in out):
                continue
            out.append((addr, bytes(_shadow(shm)[a : a + b])))
        return out


class OpteeFlavour:
    """The server's view of a :class:`ServedOpteeDevice`: impl id OP-TEE, two nodes."""

    impl_id = uapi.TEE_IMPL_ID_OPTEE
    gen_caps = _GEN_CAPS
    server = "qtee optee server"
    traces = False

    def __init__(self, device: ServedOpteeDevice) -> None:
        self.device = device
        self._labels: weakref.WeakKeyDictionary[OpteeContext, str] = weakref.WeakKeyDictionary()

    def open(self, node: str, label: str) -> _OpteeFile:
        if node == "tee":
            ctx = self.device.open()
        elif node == "teepriv":
            ctx = self.device.open_supplicant()
            label += " on teepriv"
        else:
            raise DriverError(errno.ENOENT, f"no {node} node")
        self._labels[ctx] = label
        return _OpteeFile(ctx, self.device.memory)

    def leaks(self) -> dict[str, int]:
        return self.device.leaks()

    def describe(self) -> dict[str, Any]:
        """What ``qtee info --connect`` prints (``qtee._cli.info.format_info``'s keys)."""
        from qtee import __version__

        device = self.device
        runtime = device.runtime
        with runtime._lock:
            loaded = sorted({str(uuidlib.UUID(bytes=i.uuid)) for i in runtime._instances})
        with device._lock:
            contexts = sorted(device.contexts, key=lambda c: c.number)
        return {
            "version": __version__,
            "impl_id": self.impl_id,
            "impl_caps": uapi.TEE_OPTEE_CAP_TZ,
            "gen_caps": self.gen_caps,
            "loaded_tas": loaded,
            "tables": device.leaks(),
            "contexts": [
                {
                    "fd": self._labels.get(c, f"context {c.number}"),
                    "sessions": len(c.sessions),
                    "shms": len(c.shms),
                }
                for c in contexts
            ],
        }
