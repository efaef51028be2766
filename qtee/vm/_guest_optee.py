"""An OP-TEE guest's kernel driver: the same OP-TEE device, its calls sent as OP-TEE messages.

The guest runs its own :class:`~qtee._optee.core.OpteeDevice` (its own shm ids, contexts and
per-context session lists), so ``TeecContext(guest.device)`` and everything on top of it
run unchanged.  What differs is where calls go (the hooks of :mod:`qtee._optee.core`):

* every OPEN_SESSION, INVOKE, CANCEL and CLOSE becomes an :class:`~qtee._optee.optee_msg.OpteeMsg`
  in a page of guest RAM and the std call ``CALL_WITH_ARG`` (a1:a2 = its guest-physical
  address) through the guest's SMC instruction, which traps to the VMM (optee.md §6.1);
* the answer is read back from that page; a std call that fails (any a0 but OK, or an SMC
  that cannot be made: the VM stopped) is ``TEEC_ERROR_COMMUNICATION``, origin COMMS, as
  the OP-TEE driver reports a failed SMC (§2);
* ``ETHREAD_LIMIT`` is not an error: the caller parks until another call of this guest
  returns (or briefly, since the threads may be another guest's) and retries (§2);
* a shm is guest RAM, registered with OP-TEE (REGISTER_SHM, one contiguous buffer, whole
  pages) for as long as it lives, and named in calls by its cookie (RMEM).  A refused
  registration -- the mediator's per-VM limits -- makes SHM_ALLOC fail with ENOMEM (a model
  choice).  SHM_REGISTER of user memory gets a bounce buffer in guest RAM, registered the
  same way; each call copies its window in before and the changed bytes out after (the
  host device copies registered user memory the same way).

No tee-supplicant: OP-TEE's RPCs to a guest (LOAD_TA, storage) are out of scope, so
:meth:`GuestOpteeDevice.open_supplicant` fails ENODEV and a TA must be registered.
"""

from __future__ import annotations

import errno
import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final
from uuid import UUID

from objects import DriverError
from qtee import uapi
from qtee._optee.core import OpteeContext, OpteeDevice, _GpShm, _Window
from qtee._optee.optee_msg import (
    MsgParam,
    OpteeMsg,
    OpteeMsgAttr,
    OpteeMsgCmd,
    OpteeReply,
    encode_msg,
    read_reply,
)
from qtee._smc import SmcConduit, SmcFid, SmcReturn
from qtee.addrspace import AddressSpace, CheckedMemory
from qtee.gp import _codes as teec
from qtee.vm._ram import PAGE_SIZE, GuestRam

if TYPE_CHECKING:
    from qtee._optee.supp import OpteeSuppContext
    from qtee.gp._identity import Cred

__all__ = ["GuestOpteeContext", "GuestOpteeDevice", "OpteePort"]

log = logging.getLogger("qtee.vm.optee")

_U32: Final = 0xFFFF_FFFF
_CALL: Final = int(SmcFid.OPTEE_SMC_CALL_WITH_ARG)
#: How long a caller parked on ETHREAD_LIMIT waits before it tries again anyway.
_RETRY: Final = 0.01
_A = OpteeMsgAttr
_C = OpteeMsgCmd
_P = tuple[int, int, int, int]


def _failed(msg: OpteeMsg) -> OpteeReply:
    """What the driver reports when the std call itself failed (§2)."""
    return OpteeReply(
        ret=teec.COMMUNICATION, ret_origin=teec.ORIGIN_COMMS, session=0, outs=msg.params
    )


class OpteePort:
    """The guest driver's std-call path (``optee_do_call_with_arg``), and its
    :class:`~qtee._optee.core.SessionRuntime` for cancel and close."""

    def __init__(self, conduit: SmcConduit, ram: GuestRam) -> None:
        if not callable(getattr(conduit, "smc", None)):
            raise TypeError(f"an OP-TEE port needs an SMC conduit, not {conduit!r}")
        if not isinstance(ram, GuestRam):
            raise TypeError(f"an OP-TEE port needs the guest's GuestRam, not {ram!r}")
        self.conduit = conduit
        self.ram = ram
        self._cond = threading.Condition()
        self._calls = 0
        #: Calls that met ETHREAD_LIMIT and were parked (for tests and tables).
        self.parked = 0

    def call(self, msg: OpteeMsg) -> OpteeReply:
        """Send ``msg`` and wait for its answer (retried on ETHREAD_LIMIT).

        The message is copied into fresh guest pages for the call (DriverError ENOMEM when
        guest RAM is full: the ioctl fails, nothing was sent)."""
        if not isinstance(msg, OpteeMsg):
            raise TypeError(f"call() takes an OpteeMsg, not {type(msg).__name__}")
        page = encode_msg(msg)
        gpa = self.ram.lend(page)
        with self._cond:
            self._calls += 1
        try:
            a0 = self._smc(gpa)
        finally:
            self.ram.take_back(gpa)
            with self._cond:
                self._calls -= 1
                self._cond.notify_all()
        if a0 != SmcReturn.OK:
            return _failed(msg)
        return read_reply(page, msg)

    def _smc(self, gpa: int) -> int:
        while True:
            try:
                a0 = self.conduit.smc(_CALL, gpa >> 32, gpa & _U32)[0]
            except DriverError as exc:
                log.debug("CALL_WITH_ARG failed: %s", exc)
                return -1
            if a0 != SmcReturn.ETHREAD_LIMIT:
                return a0
            with self._cond:  # optee_cq_wait_for_completion
                self.parked += 1
                self._cond.wait(_RETRY)

    # ------------------------------------------------------------------ SessionRuntime
    def cancel(self, session_id: int, cancel_id: int = 0, owner: object = None) -> int:
        """OPTEE_MSG_CMD_CANCEL."""
        msg = OpteeMsg(cmd=_C.OPTEE_MSG_CMD_CANCEL, session=session_id, cancel_id=cancel_id)
        return self._quiet(msg)

    def close_session(self, session_id: int, owner: object = None) -> int:
        """OPTEE_MSG_CMD_CLOSE_SESSION."""
        return self._quiet(OpteeMsg(cmd=_C.OPTEE_MSG_CMD_CLOSE_SESSION, session=session_id))

    def close_owner(self, owner: object) -> None:
        """A context is closing: close each session on its list."""
        sessions = getattr(owner, "sessions", ())
        for sid in sorted(sessions):
            self.close_session(sid, owner)

    def _quiet(self, msg: OpteeMsg) -> int:
        try:
            return self.call(msg).ret
        except DriverError as exc:  # no guest page for the message: the call is lost
            log.debug("%s not sent: %s", _C(msg.cmd).name, exc)
            return teec.COMMUNICATION

    def live(self) -> dict[str, int]:
        """Calls in flight."""
        with self._cond:
            return {"calls": self._calls} if self._calls else {}

    def wake(self) -> None:
        """Wake parked callers (their next SMC finds the VM stopped)."""
        with self._cond:
            self._cond.notify_all()


@dataclass(frozen=True, slots=True)
class _GuestShm:
    """Where a guest shm lives: its guest pages, and the cookie OP-TEE knows it by."""

    gpa: int
    view: memoryview
    cookie: int


class GuestOpteeDevice(OpteeDevice):
    """``/dev/tee0`` of an OP-TEE guest (see the module docstring).

    ``conduit`` is the guest's SMC instruction (:class:`~qtee.vm.Guest`), ``ram`` its RAM.
    The guest's user memory is ``memory`` (a :class:`~qtee.addrspace.CheckedMemory` by
    default: it never crosses to the VMM; only guest RAM does).
    """

    def __init__(
        self,
        conduit: SmcConduit,
        ram: GuestRam,
        *,
        memory: AddressSpace | None = None,
        cred: Callable[[], Cred] | None = None,
    ) -> None:
        self.port = OpteePort(conduit, ram)
        self.ram = ram
        self._cookies = itertools.count(1)
        super().__init__(
            None,
            memory=memory if memory is not None else CheckedMemory(),
            cred=cred,
            calls=self.port,
        )

    def open(self) -> GuestOpteeContext:
        """Open the device: one context (one fd)."""
        ctx = GuestOpteeContext(self)
        with self._lock:
            self.contexts.add(ctx)
        return ctx

    def open_supplicant(self) -> OpteeSuppContext:
        """No tee-supplicant in a guest: OP-TEE's RPCs to guests are not modelled."""
        raise DriverError(errno.ENODEV, "no tee-supplicant device: RPC to guests is not modelled")

    def close_all(self) -> None:
        """Abandon every context (the guest kernel's TEE state goes with the VM)."""
        with self._lock:
            contexts = list(self.contexts)
        for ctx in contexts:
            ctx.abandon()

    # ------------------------------------------------------------------ shm hooks
    def _shm_backing(self, size: int, addr: int | None) -> tuple[bytearray | memoryview, object]:
        """Guest pages registered with OP-TEE; ENOMEM if guest RAM or OP-TEE says no."""
        pages = max(1, (size + PAGE_SIZE - 1) // PAGE_SIZE)
        view, _ = self.ram.backing(pages * PAGE_SIZE)
        gpa = self.ram.add(view)
        cookie = next(self._cookies)
        param = MsgParam.tmem(_A.OPTEE_MSG_ATTR_TYPE_TMEM_INOUT, gpa, pages * PAGE_SIZE, cookie)
        try:
            ret = self.port.call(OpteeMsg(cmd=_C.OPTEE_MSG_CMD_REGISTER_SHM, params=(param,))).ret
        except BaseException:
            self.ram.remove(gpa)
            raise
        if ret != teec.SUCCESS:
            self.ram.remove(gpa)
            raise DriverError(errno.ENOMEM, f"OP-TEE did not register {size} bytes: {ret:#010x}")
        handle = _GuestShm(gpa, view, cookie)
        return (view[:size] if addr is None else bytearray()), handle

    def _shm_release(self, shm: _GpShm) -> None:
        """UNREGISTER_SHM, then the pages go back to the guest kernel."""
        handle = shm.handle
        if not isinstance(handle, _GuestShm):
            return
        rmem = MsgParam.rmem(_A.OPTEE_MSG_ATTR_TYPE_RMEM_INPUT, handle.cookie, 0, 0)
        ret = self.port._quiet(OpteeMsg(cmd=_C.OPTEE_MSG_CMD_UNREGISTER_SHM, params=(rmem,)))
        if ret != teec.SUCCESS:
            log.debug("UNREGISTER_SHM of cookie %d answered %#010x", handle.cookie, ret)
        self.ram.remove(handle.gpa)


class GuestOpteeContext(OpteeContext):
    """One fd of a guest's OP-TEE device: calls become OP-TEE messages."""

    device: GuestOpteeDevice

    def _prepare(self, params: list[_P]) -> _GuestCall:
        """Kernel params -> message params (``optee_to_msg_param``), errno as the host's."""
        out: list[MsgParam] = []
        windows: list[tuple[_Window, _GuestShm, int] | None] = []
        for i, (attr, a, b, c) in enumerate(params):
            window = None
            if attr == 0:
                out.append(MsgParam(attr=_A.OPTEE_MSG_ATTR_TYPE_NONE))
            elif attr in (1, 2, 3):
                out.append(MsgParam.value(attr, a, b, c))
            elif attr in (5, 6, 7):
                if c == uapi.TEE_MEMREF_NULL:
                    out.append(MsgParam.tmem(attr + 4, 0, b))
                    windows.append(None)
                    continue
                shm = self.shms.get(c) if c <= 0x7FFF_FFFF else None
                if shm is None or not isinstance(shm.handle, _GuestShm):
                    raise DriverError(errno.EINVAL, f"param {i}: shm {c} is not of this context")
                if a + b > shm.size:
                    raise DriverError(
                        errno.EINVAL, f"param {i}: offset {a} + size {b} past shm of {shm.size}"
                    )
                h = shm.handle
                if shm.addr is not None:  # registered user memory: through its bounce
                    snap = self.device.memory.read(shm.addr + a, b)
                    h.view[a : a + b] = snap
                    window = (_Window(shm.addr + a, snap, bytearray()), h, a)
                out.append(MsgParam.rmem(attr, h.cookie, a, b))
            else:
                raise DriverError(errno.EINVAL, f"param {i}: attr {attr:#x} is not a GP param type")
            windows.append(window)
        return _GuestCall(self, params, tuple(out), windows)


@dataclass(slots=True, eq=False)
class _GuestCall:
    """A prepared guest call: sends the message, gives the params back."""

    ctx: GuestOpteeContext
    params: list[_P]
    msg_params: tuple[MsgParam, ...]
    windows: list[tuple[_Window, _GuestShm, int] | None]
    reply: OpteeReply | None = None

    def open(
        self, uuid: bytes, login: int, client: bytes | UUID, cancel_id: int
    ) -> tuple[int, int, int]:
        raw = client.bytes if isinstance(client, UUID) else client
        msg = OpteeMsg(
            cmd=_C.OPTEE_MSG_CMD_OPEN_SESSION,
            cancel_id=cancel_id,
            uuid=uuid,
            clnt_uuid=raw,
            login=login,
            params=self.msg_params,
        )
        reply = self.reply = self.ctx.device.port.call(msg)
        session = reply.session if reply.ret == teec.SUCCESS else 0
        return session, reply.ret, reply.ret_origin

    def invoke(self, session: int, func: int, cancel_id: int) -> tuple[int, int]:
        msg = OpteeMsg(
            cmd=_C.OPTEE_MSG_CMD_INVOKE_COMMAND,
            func=func,
            session=session,
            cancel_id=cancel_id,
            params=self.msg_params,
        )
        reply = self.reply = self.ctx.device.port.call(msg)
        return reply.ret, reply.ret_origin

    def params_back(self) -> list[_P]:
        """``params_to_user``: VALUE outputs a/b/c, memref outputs the size."""
        outs = self.reply.outs if self.reply is not None else self.msg_params
        back = list(self.params)
        memory = self.ctx.device.memory
        for i, ((attr, a, _b, c), p) in enumerate(zip(self.params, outs, strict=True)):
            if attr in (2, 3):
                back[i] = (attr, p.a & _U32, p.b & _U32, 0)
            elif attr in (6, 7):
                back[i] = (attr, a, p.b, c)
                window = self.windows[i]
                if window is not None:
                    win, h, off = window
                    win.buf = bytearray(h.view[off : off + len(win.snap)])
                    win.write_back(memory)
        return back
