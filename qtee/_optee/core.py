"""The OP-TEE-flavoured device: GP sessions through the Linux TEE uAPI (``drivers/tee``).

``OpteeDevice()`` is a device with a secure world of its own and tee-supplicant's RPC
queue ready (so ``supplicant.OpteeSupplicant(device, ...)`` serves its LOAD_TA and
storage at once; until one attaches, a session to a TA no registry knows waits for it,
as a user-space client does on Linux).  ``OpteeDevice(world)`` runs on a given world
(the queue is made when the supplicant first opens the privileged device).
``device.open()`` gives a context whose ``ioctl`` takes the kernel's structs
like :class:`qtee.Context` does: VERSION (impl id 1, OP-TEE caps TZ, gen caps GP |
REG_MEM | MEMREF_NULL), SHM_ALLOC, SHM_REGISTER, OPEN_SESSION, INVOKE, CANCEL and
CLOSE_SESSION (optee.md §2).  Sessions live in the secure world's GP runtime, keyed by
the context that opened them: a session id from another context is EINVAL here, before
the secure world is asked, as the OP-TEE driver's per-context session list does.

Memref params name a shm of the calling context by id in ``c`` (offset ``a``, size
``b``); the TA works on those bytes themselves, as OP-TEE maps the shm's pages: an
allocated shm's pages, and a registered shm's user pages, pinned for writing at
SHM_REGISTER (EFAULT if the range starts in memory not mapped writable, ENOMEM if only
its leading part is).  Concurrent calls on one buffer see each other's writes.  Where
the address space cannot lend its pages (a :class:`~qtee.addrspace.SharedSpace` can; a
device server's or the bridge's client memory cannot), a registered shm is copied in
before each call and the range the TA changed written back after it, a known
departure: two overlapping calls on such a buffer may undo each other's writes.

Where the calls go is a driver's business, so three things are hooks a subclass may
replace (an OP-TEE guest's driver, :mod:`qtee.vm._guest_optee`, sends OP-TEE messages
over SMCs instead):

* ``OpteeDevice(None, calls=...)``: cancel, close and the per-context close go there
  (such a device has no secure world and no ``runtime``);
* :meth:`OpteeDevice._shm_backing` / :meth:`OpteeDevice._shm_release`: where a shm's
  bytes live;
* :meth:`OpteeContext._prepare`: a call's params checked and turned into a
  :class:`PreparedCall` that opens or invokes, then gives the params back.

The host's defaults call the secure world's GP runtime directly.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol, TypeVar
from uuid import UUID

from objects import DriverError, IdrAllocator, ObjectTable, UsageError
from qtee import _checks, uapi
from qtee._checks import _einval
from qtee._tee.core import TeeFile, popped
from qtee._tee.shm import SHM_MAX, alloc_size, install
from qtee.addrspace import TASK_SIZE, AddressSpace, ProcessMemory, SharedSpace
from qtee.gp._identity import Cred, calc_client_uuid, check_user_login

if TYPE_CHECKING:
    from qtee._optee.supp import OpteeSuppContext
    from qtee.secure import SecureWorld
    from qtee.secure._gp import GpParam, GpRuntime, GpTA

_G = TypeVar("_G", bound="type[GpTA]")

__all__ = ["OpteeContext", "OpteeDevice", "PreparedCall", "SessionRuntime"]

_PARAM: Final = uapi.PARAM_STRUCT
_OPEN_HEAD: Final = struct.Struct("<16s16s6I")
_INVOKE_HEAD: Final = struct.Struct("<6I")
_GEN_CAPS: Final = uapi.TEE_GEN_CAP_GP | uapi.TEE_GEN_CAP_REG_MEM | uapi.TEE_GEN_CAP_MEMREF_NULL
_VALUE_TYPES: Final = frozenset({1, 2, 3})
_MEMREF_TYPES: Final = frozenset({5, 6, 7})
_P = tuple[int, int, int, int]


class SessionRuntime(Protocol):
    """Where a context's cancel, close and close-all go (the GP runtime on the host)."""

    def cancel(self, session_id: int, cancel_id: int = 0, owner: object = None) -> int:
        """``OPTEE_MSG_CMD_CANCEL``; the outcome shows in the call."""
        ...

    def close_session(self, session_id: int, owner: object = None) -> int:
        """``OPTEE_MSG_CMD_CLOSE_SESSION``."""
        ...

    def close_owner(self, owner: object) -> None:
        """Close every session ``owner`` (a context) still has."""
        ...

    def live(self) -> dict[str, int]:
        """Counts for leak checks."""
        ...


class PreparedCall(Protocol):
    """One call's params, checked and ready to go (see :meth:`OpteeContext._prepare`)."""

    def open(
        self, uuid: bytes, login: int, client: bytes | UUID, cancel_id: int
    ) -> tuple[int, int, int]:
        """OPEN_SESSION with these params: ``(session or 0, ret, ret_origin)``."""
        ...

    def invoke(self, session: int, func: int, cancel_id: int) -> tuple[int, int]:
        """INVOKE_COMMAND with these params: ``(ret, ret_origin)``."""
        ...

    def params_back(self) -> list[_P]:
        """``params_to_user``: the kernel params as the call left them."""
        ...


class _GpShm:
    """A shared buffer of one context: allocated (kernel pages) or registered (user pages)."""

    __slots__ = ("addr", "buf", "ctx", "handle", "id", "size")

    def __init__(
        self,
        ctx: OpteeContext,
        shm_id: int,
        size: int,
        addr: int | None,
        buf: bytearray | memoryview | None = None,
        handle: object = None,
    ) -> None:
        self.ctx = ctx
        self.id = shm_id
        self.size = size
        self.addr = addr  # user address for a registered shm, None when allocated
        if buf is None:
            buf = bytearray(size) if addr is None else bytearray()
        self.buf: bytearray | memoryview = buf
        self.handle = handle  # what the device's _shm_backing made it (None on the host)


@dataclass(slots=True, eq=False)
class _Window:
    """One call's view of a registered shm: ``[addr, addr+len)`` as read before the call."""

    addr: int
    snap: bytes
    buf: bytearray

    def write_back(self, memory: AddressSpace) -> None:
        """Write the bytes the TA changed (first to last changed byte), nothing else."""
        cur = bytes(self.buf)
        if cur == self.snap:
            return
        lo = next(i for i, (x, y) in enumerate(zip(cur, self.snap, strict=True)) if x != y)
        hi = len(cur) - next(
            i
            for i, (x, y) in enumerate(zip(reversed(cur), reversed(self.snap), strict=True))
            if x != y
        )
        memory.write(self.addr + lo, cur[lo:hi])


class OpteeDevice:
    """One OP-TEE ``/dev/teeN`` in front of a secure world's GP runtime.

    ``OpteeDevice()``: a world of its own, the RPC queue to tee-supplicant ready.
    ``OpteeDevice(world)``: the GP runtime of ``world``.  ``OpteeDevice(None,
    calls=...)``: a driver whose calls go elsewhere (a guest's).
    """

    def __init__(
        self,
        world: SecureWorld | None = None,
        *,
        memory: AddressSpace | None = None,
        cred: Callable[[], Cred] | None = None,
        calls: SessionRuntime | None = None,
    ) -> None:
        from qtee.secure import QteeRoot, SecureWorld
        from qtee.secure._gp import GpRuntime

        standalone = world is None and calls is None
        if standalone:
            world = SecureWorld(QteeRoot())
        elif world is not None and not isinstance(world, SecureWorld):
            raise TypeError(f"world must be a SecureWorld or None, not {type(world).__name__}")
        self.world = world
        if world is not None:
            #: The secure world's GP runtime (devices with a secure world only).
            self.runtime: GpRuntime = getattr(world, "gp", None) or GpRuntime(world)
            world.gp = self.runtime  # type: ignore[attr-defined]
        if calls is not None:  # calls go elsewhere (a guest's driver)
            #: Where the contexts' cancel, close and close-all go.
            self.calls: SessionRuntime = calls
        else:
            self.calls = self.runtime
        self.memory: AddressSpace = memory if memory is not None else ProcessMemory()
        self.shm: ObjectTable[_GpShm] = ObjectTable(IdrAllocator(1, 0), name="shm ids")
        #: Who the caller is (the kernel reads current's credentials).
        self.cred = cred or (
            lambda: Cred(euid=os.geteuid(), egid=os.getegid(), groups=frozenset(os.getgroups()))
        )
        self._lock = threading.Lock()
        self.contexts: set[OpteeContext] = set()
        self._opens = itertools.count()
        if standalone:
            from qtee._optee.supp import attach_rpc

            attach_rpc(self)

    def register_gp_ta(self, cls: _G, *, loadable: bool = False) -> _G:
        """Make ``cls`` a GP TA of this device's world only (``world.tas.register_gp``):
        found by UUID at once, or with ``loadable=True`` only through tee-supplicant's
        LOAD_TA of a :func:`~qtee.secure.gp_ta_image`.  Returns ``cls``."""
        if self.world is None:
            raise UsageError("this device has no secure world of its own to register in")
        return self.world.tas.register_gp(cls, loadable=loadable)

    def open(self) -> OpteeContext:
        """Open the device: one context (one fd), numbered in the order of opens."""
        ctx = OpteeContext(self)
        with self._lock:
            ctx.number = next(self._opens)
            self.contexts.add(ctx)
        return ctx

    def open_supplicant(self) -> OpteeSuppContext:
        """Open the privileged device (``/dev/teepriv0``): tee-supplicant's context, with
        SUPPL_RECV/SEND on the RPC queue (:mod:`qtee._optee.supp`); EBUSY while one is open."""
        from qtee._optee.supp import attach_rpc

        return attach_rpc(self).open()

    def _shm_backing(self, size: int, addr: int | None) -> tuple[bytearray | memoryview, object]:
        """The bytes of a new shm and a handle for :meth:`_shm_release`.

        ``addr`` is None for SHM_ALLOC (the shm's own pages) and the user address for
        SHM_REGISTER (the host reads the user's memory per call: no bytes here).  May
        raise DriverError (ENOMEM), and then nothing was made."""
        return (bytearray(size) if addr is None else bytearray()), None

    def _shm_release(self, shm: _GpShm) -> None:
        """A shm is gone (its fd closed, or its context): undo :meth:`_shm_backing`."""

    def _shm_pin(self, addr: int, size: int) -> memoryview | None:
        """SHM_REGISTER's ``pin_user_pages(FOLL_WRITE)`` of ``[addr, addr+size)``.

        The live user bytes where the address space lends them (the TA then works on
        them), None where it cannot (each call copies).  Raises EFAULT if the range
        starts in memory not mapped writable, ENOMEM if only its leading part is."""
        memory = self.memory
        if isinstance(memory, SharedSpace):
            return memory.view(addr, size)
        memory.read(addr, size)  # at least: EFAULT if unmapped
        return None

    def leaks(self) -> dict[str, int]:
        """Tables still holding something (empty when nothing leaked)."""
        found = {f"gp {k}": v for k, v in self.calls.live().items()}
        found["shm ids"] = len(self.shm)
        if self.world is not None:
            found["secure objects"] = len(self.world.live_ids())
        with self._lock:
            for ctx in sorted(self.contexts, key=lambda c: c.number):
                found[f"context {ctx.number} sessions"] = len(ctx.sessions)
        return {k: v for k, v in found.items() if v}


class OpteeContext(TeeFile["_GpShm"]):
    """One open fd of the OP-TEE device: its sessions and shared buffers, and the optee
    ops the TEE core's switch calls (:class:`~qtee._tee.core.TeeFile`)."""

    DRIVER = "optee"

    def __init__(self, device: OpteeDevice) -> None:
        self.device = device
        #: The device's count of opens when this one was made: how ``leaks`` names it.
        self.number = 0
        self.sessions: set[int] = set()
        self.shms: dict[int, _GpShm] = {}
        self._lock = threading.Lock()
        super().__init__()

    # ------------------------------------------------------------------ ops
    def _version(self) -> uapi.VersionData:
        return uapi.VersionData(uapi.TEE_IMPL_ID_OPTEE, uapi.TEE_OPTEE_CAP_TZ, _GEN_CAPS)

    def _cancel_req(self, arg: bytearray | memoryview) -> int:
        # CANCEL and CLOSE_SESSION only read their struct (a read-only one works)
        cancel = uapi.CancelArg.unpack(self._need(arg, uapi.CancelArg.SIZE, writable=False))
        self._own(cancel.session)
        self.device.calls.cancel(cancel.session, cancel.cancel_id, owner=self)
        return 0

    def _close_session(self, arg: bytearray | memoryview) -> int:
        size = uapi.CloseSessionArg.SIZE
        close = uapi.CloseSessionArg.unpack(self._need(arg, size, writable=False))
        self._own(close.session)
        with self._lock:
            self.sessions.discard(close.session)
        self.device.calls.close_session(close.session, owner=self)
        return 0

    def _own(self, session: int) -> None:
        with self._lock:
            if session not in self.sessions:
                raise _einval(
                    f"session {session:#x} is not open on this context (closed, or never opened)"
                )

    # ------------------------------------------------------------------ shared memory
    def _shm_alloc(self, arg: bytearray | memoryview) -> int:
        size = alloc_size(arg, SHM_MAX)
        shm = self._new_shm(size, None)
        uapi.ShmAllocData(size, 0, shm.id).pack_into(arg)
        return 0

    def _new_shm(self, size: int, addr: int | None) -> _GpShm:
        """A shm of this context with the next shm id (nothing made if that fails)."""
        try:
            buf, handle = self.device._shm_backing(size, addr)
        except (MemoryError, OverflowError) as exc:
            raise DriverError(errno.ENOMEM, f"cannot allocate {size} bytes: {exc!r}") from None
        return install(
            self.device.shm,
            self.shms,
            lambda shm_id: _GpShm(self, shm_id, size, addr, buf, handle),
            lambda: self.device._shm_release(_GpShm(self, 0, size, addr, buf, handle)),
        )

    def _drop_shm(self, shm: _GpShm) -> None:
        self.device.shm.erase(shm.id)
        self.device._shm_release(shm)
        if shm.addr is not None and isinstance(shm.buf, memoryview):  # unpin_user_pages
            with contextlib.suppress(BufferError):
                shm.buf.release()
            shm.buf = bytearray()

    def _shm_register(self, arg: bytearray | memoryview) -> int:
        data = uapi.ShmRegisterData.unpack(self._need(arg, uapi.ShmRegisterData.SIZE))
        if data.flags:
            raise _einval("SHM_REGISTER flags must be 0")
        if data.length == 0 or data.addr + data.length > TASK_SIZE:
            raise _einval(f"cannot register {data.length} bytes at {data.addr:#x}")
        pages = self.device._shm_pin(data.addr, data.length)
        shm = self._new_shm(data.length, data.addr)
        if pages is not None and not shm.buf:  # the device keeps no bytes of its own
            shm.buf = pages
        uapi.ShmRegisterData(data.addr, data.length, 0, shm.id).pack_into(arg)
        return 0

    def _mappable(self, shm: _GpShm) -> bool:
        return shm.addr is None  # a registered shm's fd maps nothing

    # ------------------------------------------------------------------ sessions
    def _read_block(
        self, arg: bytearray | memoryview, head: struct.Struct
    ) -> tuple[int, bytes, list[_P]]:
        return _checks.read_buf_block(self.device.memory, arg, head.size, head.size - 4)

    def _prepare(self, params: list[_P]) -> PreparedCall:
        """Check a call's kernel params (errno, before anything is sent) and get it
        ready: here for the secure world's GP runtime (``params_from_user``)."""
        types, gp, shms = self._gp_params(params)
        return _LocalCall(self, params, types, gp, shms)

    def _gp_params(self, params: list[_P]) -> tuple[int, list[GpParam], list[_Window | None]]:
        """Kernel params -> the TA's typed params (``params_from_user`` + the driver)."""
        from qtee.secure._gp import GpParam

        types = 0
        out: list[GpParam] = []
        shms: list[_Window | None] = []
        for i, (attr, a, b, c) in enumerate(params):
            t = attr
            if i < 4:
                types |= (t & 0xF) << (4 * i)
            if t == 0:
                out.append(GpParam(0))
                shms.append(None)
            elif t in _VALUE_TYPES:
                out.append(GpParam(t, a=a & 0xFFFF_FFFF, b=b & 0xFFFF_FFFF))
                shms.append(None)
            elif t in _MEMREF_TYPES:
                if c == uapi.TEE_MEMREF_NULL:
                    out.append(GpParam(t, buffer=None, size=b))
                    shms.append(None)
                    continue
                shm = self.shms.get(c) if c <= 0x7FFF_FFFF else None
                if shm is None:
                    raise _einval(f"param {i}: shm {c} is not a shm of this context")
                if a + b > shm.size:
                    raise _einval(f"param {i}: offset {a} + size {b} past shm of {shm.size}")
                if shm.addr is None or len(shm.buf) == shm.size:
                    # allocated, or registered pages the space lent: the TA works on them
                    out.append(GpParam(t, buffer=memoryview(shm.buf)[a : a + b], size=b))
                    shms.append(None)
                    continue
                # Registered memory the space cannot lend: this call's window only, copied
                # in now; what the TA changed is written back after the call.
                snap = self.device.memory.read(shm.addr + a, b)
                window = _Window(shm.addr + a, snap, bytearray(snap))
                out.append(GpParam(t, buffer=memoryview(window.buf), size=b))
                shms.append(window)
            else:
                raise _einval(f"param {i}: attr {attr:#x} is not a GP param type")
        return types, out, shms

    def _params_back(
        self, params: list[_P], gp: list[GpParam], shms: list[_Window | None]
    ) -> list[_P]:
        """``params_to_user``: VALUE outputs a/b/c, MEMREF outputs the size."""
        out = list(params)
        for i, ((attr, a, _b, c), p) in enumerate(zip(params, gp, strict=True)):
            if attr in (2, 3):
                out[i] = (attr, p.a & 0xFFFF_FFFF, p.b & 0xFFFF_FFFF, 0)
            elif attr in (6, 7):
                out[i] = (attr, a, p.size, c)
                window = shms[i]
                if window is not None:
                    window.write_back(self.device.memory)
        return out

    def _open_session(self, arg: bytearray | memoryview) -> int:
        buf_ptr, block, params = self._read_block(arg, _OPEN_HEAD)
        uuid, clnt_uuid, login, cancel_id, _s, _r, _o, num = _OPEN_HEAD.unpack_from(block)
        call = self._prepare(params)
        check_user_login(login)  # the REE-kernel login range is EPERM from userspace
        client = calc_client_uuid(login, clnt_uuid, cred=self.device.cred())
        session, ret, origin = call.open(uuid, login, client, cancel_id)
        if session:
            with self._lock:
                self.sessions.add(session)
        back = call.params_back()
        head = _OPEN_HEAD.pack(uuid, clnt_uuid, login, cancel_id, session, ret, origin, num)
        try:
            self.device.memory.write(buf_ptr, head + b"".join(_PARAM.pack(*p) for p in back))
        except DriverError:
            if session:  # results could not reach the caller: close it again, no leak
                with self._lock:
                    self.sessions.discard(session)
                self.device.calls.close_session(session, owner=self)
            raise
        return 0

    def _invoke_func(self, arg: bytearray | memoryview) -> int:
        buf_ptr, block, params = self._read_block(arg, _INVOKE_HEAD)
        func, session, cancel_id, _r, _o, num = _INVOKE_HEAD.unpack_from(block)
        call = self._prepare(params)
        self._own(session)
        ret, origin = call.invoke(session, func, cancel_id)
        back = call.params_back()
        head = _INVOKE_HEAD.pack(func, session, cancel_id, ret, origin, num)
        self.device.memory.write(buf_ptr, head + b"".join(_PARAM.pack(*p) for p in back))
        return 0

    # ------------------------------------------------------------------ close
    # close(): new calls fail EBADF; once the last call in flight has returned (at once
    # if none), every session it opened is closed and its shms go, as the driver's
    # release runs after the file's last ioctl.
    def _teardown(self) -> None:
        """The file's release, once no call is in flight; finds nothing the second time."""
        self.device.calls.close_owner(self)
        with self._lock:
            self.sessions.clear()
        for shm in popped(self.shms):
            self._drop_shm(shm)
        with self.device._lock:
            self.device.contexts.discard(self)


@dataclass(frozen=True, slots=True, eq=False)
class _LocalCall:
    """A prepared call for the secure world's GP runtime (the host's driver)."""

    ctx: OpteeContext
    params: list[_P]
    types: int
    gp: list[GpParam]
    shms: list[_Window | None]

    def _runtime(self) -> GpRuntime:
        return self.ctx.device.runtime

    def open(
        self, uuid: bytes, login: int, client: bytes | UUID, cancel_id: int
    ) -> tuple[int, int, int]:
        return self._runtime().open_session(
            uuid, login, client, self.types, self.gp, cancel_id=cancel_id, owner=self.ctx
        )

    def invoke(self, session: int, func: int, cancel_id: int) -> tuple[int, int]:
        return self._runtime().invoke(
            session, func, self.types, self.gp, cancel_id=cancel_id, owner=self.ctx
        )

    def params_back(self) -> list[_P]:
        return self.ctx._params_back(self.params, self.gp, self.shms)
