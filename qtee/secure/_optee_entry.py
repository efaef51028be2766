"""OP-TEE's SMC entry with virtualization: fast calls, and std calls into guest partitions.

:class:`OpteeEntry` registers with the secure monitor (``add_service``) for OP-TEE's
function ids and answers them as OP-TEE built with virtualization does (optee.md §6.1):

* ``VM_CREATED`` / ``VM_DESTROYED`` (a1 = guest client id) are the hypervisor's: a7 must
  be 0 (``HYP_CLNT_ID``) and a1 must not be 0, else ``ENOTAVAIL``.  Creation beyond
  ``guest_limit`` (``CFG_VIRT_GUEST_COUNT``) partitions, or of an id that exists, is
  ``ENOTAVAIL``.  Destroying an unknown id is logged (DEBUG) and answers OK.
* ``GET_THREAD_COUNT`` answers ``threads``; ``EXCHANGE_CAPABILITIES`` sets
  ``SEC_CAP_VIRTUALIZATION`` (bit 3) with DYNAMIC_SHM and MEMREF_NULL.
* Any call whose a7 names neither the hypervisor (fast calls only) nor a live guest is
  ``ENOTAVAIL``: there is no implicit creation on a first std call (§6.1).
* ``CALL_WITH_ARG`` (a1:a2 = the message's physical address) runs one
  :class:`~qtee._optee.optee_msg.OpteeMsg` in the caller's partition: a :class:`OpteePartition`,
  which is its own :class:`SecureWorld` and :class:`GpRuntime` (so session ids, session
  lists, TA instances and registered buffers are per guest: the same session number in
  two guests names two sessions) and its own threads (``threads`` calls at a time, then
  ``ETHREAD_LIMIT``).  The answer is written into the message's page -- only ``ret``,
  ``ret_origin``, ``session`` and the output fields (:func:`write_reply`).
* ``RETURN_FROM_RPC`` answers ``ERESUME``: the model's OP-TEE makes no RPC to a guest
  (LOAD_TA and storage for guests are out of scope), so no thread is ever suspended.

Destroy marks the partition closing, shuts its GP runtime down (no TA entry runs, waits
end, sessions and instances are dropped, :meth:`GpRuntime.shutdown`) and forgets its
registered buffers; the partition itself is freed when its last call leaves ("freed when
the last reference drops", §6.1), and counts toward ``guest_limit`` until then.

Model choices where the sheet is silent: an arg address that is not page-aligned or not
mapped is ``EBADADDR``; a malformed message is answered ``TEE_ERROR_BAD_PARAMETERS``
(origin TEE) in its page; an unknown command is ``EBADCMD``; guest ids are 16 bits.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from objects import DecodeError, UsageError
from qtee._optee.optee_msg import (
    MSG_HEADER_SIZE,
    MsgParam,
    OpteeMsg,
    OpteeMsgCmd,
    OpteeReply,
    OpteeSecCap,
    arg_size_of,
    decode_msg,
    write_reply,
)
from qtee._smc import HYP_CLIENT_ID, OnReturn, Regs, SmcArgs, SmcConduit, SmcFid, SmcReturn
from qtee.gp import _codes as teec
from qtee.secure._gp import GpParam, GpRuntime
from qtee.secure._gp_params import TEE_NUM_PARAMS
from qtee.secure._world import PhysicalMemory, SecureObject, SecureWorld

__all__ = ["OPTEE_FIDS", "OpteeEntry", "OpteePartition", "ServiceHost"]

log = logging.getLogger("qtee.optee")

#: The function ids :class:`OpteeEntry` serves.
OPTEE_FIDS: Final = (
    SmcFid.OPTEE_SMC_VM_CREATED,
    SmcFid.OPTEE_SMC_VM_DESTROYED,
    SmcFid.OPTEE_SMC_GET_THREAD_COUNT,
    SmcFid.OPTEE_SMC_EXCHANGE_CAPABILITIES,
    SmcFid.OPTEE_SMC_CALL_WITH_ARG,
    SmcFid.OPTEE_SMC_RETURN_FROM_RPC,
)
_VM_FIDS: Final = frozenset({SmcFid.OPTEE_SMC_VM_CREATED, SmcFid.OPTEE_SMC_VM_DESTROYED})
_MAX_GUEST_ID: Final = 0xFFFF
_PAGE_MASK: Final = 0xFFF
_U32: Final = 0xFFFF_FFFF

_C = OpteeMsgCmd
_ENTRIES: weakref.WeakKeyDictionary[object, OpteeEntry] = weakref.WeakKeyDictionary()
_OF_LOCK: Final = threading.Lock()


def _regs(a0: int, a1: int = 0) -> Regs:
    return (int(a0), a1, 0, 0)


class ServiceHost(Protocol):
    """What the entry needs of the secure monitor: a place to register, and memory."""

    @property
    def phys(self) -> PhysicalMemory:
        """Host-physical memory, where messages and memrefs are."""
        ...

    def add_service(
        self,
        fids: Iterable[int],
        handler: Callable[[int, int, int, int, int, int, int, int, OnReturn | None], Regs],
    ) -> None:
        """Route SMCs with these function ids to ``handler``."""
        ...


class _PartitionRoot(SecureObject):
    """The root object of a partition's secure world: OP-TEE guests never call it."""


@dataclass(frozen=True, slots=True)
class _Shm:
    paddr: int
    size: int


class OpteePartition:
    """One guest's share of OP-TEE (§6.1): its world, GP runtime, buffers and threads."""

    def __init__(self, client_id: int) -> None:
        self.client_id = client_id
        self.world = SecureWorld(_PartitionRoot(), client_id=client_id)
        self.gp = GpRuntime(self.world)
        self.world.gp = self.gp  # type: ignore[attr-defined]
        self.shm: dict[int, _Shm] = {}  # REGISTER_SHM cookie -> buffer
        self.shm_users: dict[int, int] = {}  # cookie -> calls using it now
        self.calls = 0  # threads of this partition running a std call
        self.closing = False

    def live(self) -> dict[str, int]:
        """What the partition still holds (for leak checks)."""
        found = {f"gp {k}": v for k, v in self.gp.live().items()}
        found["registered shm"] = len(self.shm)
        found["secure objects"] = len(self.world.live_ids())
        found["calls"] = self.calls
        return {k: v for k, v in found.items() if v}

    def __repr__(self) -> str:
        state = "closing" if self.closing else "live"
        return f"<OpteePartition {self.client_id} {state} calls={self.calls}>"


class OpteeEntry(SmcConduit):
    """OP-TEE's fast-call and std-call entry for guests (see the module docstring)."""

    def __init__(
        self,
        monitor: ServiceHost,
        *,
        guest_limit: int = 2,
        threads: int = 8,
        virtualization: bool = True,
    ) -> None:
        for name, v in (("guest_limit", guest_limit), ("threads", threads)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UsageError(f"{name} must be an int >= 1, not {v!r}")
        if not callable(getattr(monitor, "add_service", None)):
            raise TypeError(f"an OpteeEntry registers with a monitor, not {monitor!r}")
        self.monitor = monitor
        self.guest_limit = guest_limit
        self.threads = threads
        self.virtualization = bool(virtualization)
        self._lock = threading.Lock()
        self._partitions: dict[int, OpteePartition] = {}
        self._dying: set[OpteePartition] = set()  # destroyed, calls still inside
        monitor.add_service(OPTEE_FIDS, self._service)
        with _OF_LOCK:
            _ENTRIES[monitor] = self

    @classmethod
    def of(cls, monitor: object) -> OpteeEntry | None:
        """The entry registered with ``monitor``, if any (for the normal world's tables)."""
        with _OF_LOCK:
            try:
                return _ENTRIES.get(monitor)
            except TypeError:  # not weak-referenceable: never had one
                return None

    # ------------------------------------------------------------------ queries
    @property
    def capabilities(self) -> OpteeSecCap:
        """a1 of ``EXCHANGE_CAPABILITIES``."""
        caps = OpteeSecCap.OPTEE_SMC_SEC_CAP_DYNAMIC_SHM | OpteeSecCap.OPTEE_SMC_SEC_CAP_MEMREF_NULL
        if self.virtualization:
            caps |= OpteeSecCap.OPTEE_SMC_SEC_CAP_VIRTUALIZATION
        return caps

    def partition(self, client_id: int) -> OpteePartition | None:
        """The live partition of guest ``client_id``."""
        with self._lock:
            return self._partitions.get(client_id)

    def clients(self) -> list[int]:
        """Client ids of the live partitions."""
        with self._lock:
            return sorted(self._partitions)

    def leaks(self) -> dict[str, int]:
        """Partitions (live or still draining) and what they hold; ``{}`` when none."""
        found: dict[str, int] = {}
        with self._lock:
            parts = [*self._partitions.values(), *self._dying]
        if self._partitions:
            found["optee partitions"] = len(self._partitions)
        if self._dying:
            found["optee partitions draining"] = len(self._dying)
        for part in parts:
            for k, v in part.live().items():
                found[f"optee {k}"] = found.get(f"optee {k}", 0) + v
        return found

    # ------------------------------------------------------------------ the SMC
    def _service(self, *args: Any) -> Regs:
        """The monitor's :data:`~qtee._smc.SmcHandler`: ``(fid, a1, ..., a7, on_return)``."""
        return self._smc(args[:8], args[8])

    def _smc(self, args: SmcArgs, on_return: OnReturn | None) -> Regs:
        """Answer one SMC of :data:`OPTEE_FIDS`."""
        fid, a1, a2, _a3, _a4, _a5, _a6, a7 = args
        if fid in _VM_FIDS:
            if not self.virtualization:
                return _regs(SmcReturn.UNKNOWN_FUNCTION)
            if fid == SmcFid.OPTEE_SMC_VM_CREATED:
                return _regs(self._vm_created(a1, a7))
            return _regs(self._vm_destroyed(a1, a7))
        part = self.partition(a7) if a7 != HYP_CLIENT_ID else None
        if part is None and (a7 != HYP_CLIENT_ID or fid == SmcFid.OPTEE_SMC_CALL_WITH_ARG):
            return _regs(SmcReturn.ENOTAVAIL)  # no such guest; the hypervisor has no threads
        if fid == SmcFid.OPTEE_SMC_GET_THREAD_COUNT:
            return _regs(SmcReturn.OK, self.threads)
        if fid == SmcFid.OPTEE_SMC_EXCHANGE_CAPABILITIES:
            return _regs(SmcReturn.OK, int(self.capabilities))
        if fid == SmcFid.OPTEE_SMC_CALL_WITH_ARG and part is not None:
            return _regs(self._std_call(part, ((a1 & _U32) << 32) | (a2 & _U32)))
        if fid == SmcFid.OPTEE_SMC_RETURN_FROM_RPC:
            return _regs(SmcReturn.ERESUME)
        return _regs(SmcReturn.UNKNOWN_FUNCTION)

    # ------------------------------------------------------------------ VM lifecycle
    def _vm_created(self, client_id: int, a7: int) -> SmcReturn:
        if a7 != HYP_CLIENT_ID or not 0 < client_id <= _MAX_GUEST_ID:
            return SmcReturn.ENOTAVAIL
        with self._lock:
            if client_id in self._partitions:
                return SmcReturn.ENOTAVAIL
            if len(self._partitions) + len(self._dying) >= self.guest_limit:
                log.debug("VM_CREATED %d: guest limit %d reached", client_id, self.guest_limit)
                return SmcReturn.ENOTAVAIL
            part = self._partitions[client_id] = OpteePartition(client_id)
        host = getattr(self.monitor, "host", None)
        if isinstance(host, SecureWorld):  # the platform's TAs, then the process's
            part.world.tas.parent = host.tas
        return SmcReturn.OK

    def _vm_destroyed(self, client_id: int, a7: int) -> SmcReturn:
        if a7 != HYP_CLIENT_ID or not 0 < client_id <= _MAX_GUEST_ID:
            return SmcReturn.ENOTAVAIL
        with self._lock:
            part = self._partitions.pop(client_id, None)
            if part is None:
                log.debug("VM_DESTROYED %d: no such guest", client_id)
                return SmcReturn.OK
            part.closing = True
            if part.calls:
                self._dying.add(part)
        part.gp.shutdown()
        with self._lock:
            part.shm.clear()
        self._release_world(part)
        return SmcReturn.OK

    def _release_world(self, part: OpteePartition) -> None:
        """Anything left in the partition's table goes (nothing, after the shutdown)."""
        release_all = getattr(part.world, "release_all", None)
        if callable(release_all) and not part.calls:
            release_all()

    # ------------------------------------------------------------------ std calls
    def _std_call(self, part: OpteePartition, paddr: int) -> SmcReturn:
        with self._lock:
            if part.closing:
                return SmcReturn.ENOTAVAIL
            if part.calls >= self.threads:
                return SmcReturn.ETHREAD_LIMIT
            part.calls += 1
        try:
            return self._run_arg(part, paddr)
        finally:
            with self._lock:
                part.calls -= 1
                drained = not part.calls and part in self._dying  # destroyed meanwhile
                if drained:
                    self._dying.discard(part)
            if drained:
                self._release_world(part)

    def _run_arg(self, part: OpteePartition, paddr: int) -> SmcReturn:
        if paddr & _PAGE_MASK:
            return SmcReturn.EBADADDR
        phys = self.monitor.phys
        head = _view(phys, paddr, MSG_HEADER_SIZE)
        if head is None:
            return SmcReturn.EBADADDR
        try:
            size = arg_size_of(head)
        except DecodeError:
            _refuse(head)
            return SmcReturn.OK
        buf = _view(phys, paddr, size)
        if buf is None:
            return SmcReturn.EBADADDR
        try:
            msg = decode_msg(buf)
        except DecodeError as exc:
            log.debug("client %d: malformed message: %s", part.client_id, exc)
            _refuse(buf)
            return SmcReturn.OK
        handler = _COMMANDS.get(msg.cmd)
        if handler is None:
            return SmcReturn.EBADCMD
        reply = handler(self, part, msg)
        write_reply(buf, msg, reply)
        return SmcReturn.OK

    # ------------------------------------------------------------------ commands
    def _open(self, part: OpteePartition, msg: OpteeMsg) -> OpteeReply:
        def open_session(types: int, gp: list[GpParam]) -> tuple[int, int, int]:
            return part.gp.open_session(
                msg.uuid,
                msg.login,
                msg.clnt_uuid,
                types,
                gp,
                cancel_id=msg.cancel_id,
                owner=part,
            )

        return self._gp_entry(part, msg, open_session)

    def _invoke(self, part: OpteePartition, msg: OpteeMsg) -> OpteeReply:
        def invoke(types: int, gp: list[GpParam]) -> tuple[int, int, int]:
            ret, origin = part.gp.invoke(
                msg.session, msg.func, types, gp, cancel_id=msg.cancel_id, owner=part
            )
            return msg.session, ret, origin

        return self._gp_entry(part, msg, invoke)

    def _gp_entry(
        self,
        part: OpteePartition,
        msg: OpteeMsg,
        entry: Callable[[int, list[GpParam]], tuple[int, int, int]],
    ) -> OpteeReply:
        """An open or invoke: the params copied in, ``entry(types, params) -> (session,
        ret, origin)`` run, the shm buffers it held released, the params copied out."""
        prepared = self._gp_params(part, msg)
        if isinstance(prepared, OpteeReply):
            return prepared
        types, gp, cookies = prepared
        try:
            session, ret, origin = entry(types, gp)
        finally:
            self._unuse(part, cookies)
        return _reply(msg, gp, ret, origin, session)

    def _close(self, part: OpteePartition, msg: OpteeMsg) -> OpteeReply:
        if msg.params:
            return _fail(msg, teec.BAD_PARAMETERS)
        return _fail(msg, part.gp.close_session(msg.session, owner=part))

    def _cancel(self, part: OpteePartition, msg: OpteeMsg) -> OpteeReply:
        if msg.params:
            return _fail(msg, teec.BAD_PARAMETERS)
        return _fail(msg, part.gp.cancel(msg.session, msg.cancel_id, owner=part))

    def _register_shm(self, part: OpteePartition, msg: OpteeMsg) -> OpteeReply:
        if len(msg.params) != 1 or not msg.params[0].attr.is_tmem:
            return _fail(msg, teec.BAD_PARAMETERS)
        p = msg.params[0]
        if not p.a or not p.b or not p.c:  # address, size and cookie all needed
            return _fail(msg, teec.BAD_PARAMETERS)
        try:
            self.monitor.phys.view(p.a, p.b)
        except (UsageError, ValueError, KeyError):
            return _fail(msg, teec.BAD_PARAMETERS)
        with self._lock:
            if p.c in part.shm:  # a cookie registered twice
                return _fail(msg, teec.BAD_PARAMETERS)
            part.shm[p.c] = _Shm(p.a, p.b)
        return _fail(msg, teec.SUCCESS)

    def _unregister_shm(self, part: OpteePartition, msg: OpteeMsg) -> OpteeReply:
        if len(msg.params) != 1 or not msg.params[0].attr.is_rmem:
            return _fail(msg, teec.BAD_PARAMETERS)
        cookie = msg.params[0].c
        with self._lock:
            if cookie not in part.shm:
                return _fail(msg, teec.ITEM_NOT_FOUND)
            if part.shm_users.get(cookie):  # a call is using it
                return _fail(msg, teec.BUSY)
            del part.shm[cookie]
        return _fail(msg, teec.SUCCESS)

    # ------------------------------------------------------------------ params
    def _gp_params(
        self, part: OpteePartition, msg: OpteeMsg
    ) -> tuple[int, list[GpParam], list[int]] | OpteeReply:
        """The message's params -> the TA's (``copy_in_params``), or the refusal.

        Memrefs become views of the physical pages (the TA works on shared memory); an
        RMEM names a buffer of this partition only and is held for the call."""
        if len(msg.params) > TEE_NUM_PARAMS:
            return _fail(msg, teec.BAD_PARAMETERS)
        phys = self.monitor.phys
        types = 0
        gp: list[GpParam] = []
        cookies: list[int] = []
        for i, p in enumerate(msg.params):
            t = p.attr.gp_type
            types |= t << (4 * i)
            if p.attr.is_value:
                gp.append(GpParam(t, a=p.a & _U32, b=p.b & _U32))
                continue
            if not (p.attr.is_tmem or p.attr.is_rmem):
                gp.append(GpParam(0))
                continue
            if p.attr.is_tmem:
                paddr = p.a
                if not paddr:  # the NULL memref
                    gp.append(GpParam(t, buffer=None, size=p.b))
                    continue
            else:
                with self._lock:
                    shm = part.shm.get(p.c)
                    if shm is None or p.a + p.b > shm.size:
                        self._unuse(part, cookies, locked=True)
                        return _fail(msg, teec.BAD_PARAMETERS)
                    part.shm_users[p.c] = part.shm_users.get(p.c, 0) + 1
                    cookies.append(p.c)
                paddr = shm.paddr + p.a
            try:
                view = phys.view(paddr, p.b)
            except (UsageError, ValueError, KeyError):
                self._unuse(part, cookies)
                return _fail(msg, teec.BAD_PARAMETERS)
            gp.append(GpParam(t, buffer=view, size=p.b))
        return types, gp, cookies

    def _unuse(self, part: OpteePartition, cookies: list[int], *, locked: bool = False) -> None:
        if not cookies:
            return
        if not locked:
            with self._lock:
                self._unuse(part, cookies, locked=True)
            return
        for c in cookies:
            n = part.shm_users.get(c, 0) - 1
            if n > 0:
                part.shm_users[c] = n
            else:
                part.shm_users.pop(c, None)
        cookies.clear()


def _view(phys: PhysicalMemory, paddr: int, size: int) -> memoryview | None:
    """The message bytes at ``paddr``, or None when they are not in memory (EBADADDR)."""
    try:
        return phys.view(paddr, size)
    except (UsageError, ValueError, KeyError):
        return None


def _refuse(buf: memoryview) -> None:
    """Answer a malformed message in its header: BAD_PARAMETERS, origin TEE."""
    buf[20:24] = teec.BAD_PARAMETERS.to_bytes(4, "little")
    buf[24:28] = teec.ORIGIN_TEE.to_bytes(4, "little")


def _fail(msg: OpteeMsg, ret: int, session: int = 0) -> OpteeReply:
    """A reply that changes no param (``ret``, origin TEE)."""
    return OpteeReply(ret=ret, ret_origin=teec.ORIGIN_TEE, session=session, outs=msg.params)


def _reply(msg: OpteeMsg, gp: list[GpParam], ret: int, origin: int, session: int) -> OpteeReply:
    """``copy_out_param``: output values and output memref sizes, whatever ``ret``."""
    outs = []
    for p, q in zip(msg.params, gp, strict=True):
        if p.attr.is_output:
            if p.attr.is_value:
                p = MsgParam(attr=p.attr, a=q.a & _U32, b=q.b & _U32, c=p.c)
            elif p.a + q.size <= 0xFFFF_FFFF_FFFF_FFFF:
                p = MsgParam(attr=p.attr, a=p.a, b=q.size, c=p.c)
        outs.append(p)
    return OpteeReply(ret=ret, ret_origin=origin, session=session, outs=tuple(outs))


_Handler = Callable[[OpteeEntry, OpteePartition, OpteeMsg], OpteeReply]
_COMMANDS: Final[dict[int, _Handler]] = {
    _C.OPTEE_MSG_CMD_OPEN_SESSION: OpteeEntry._open,
    _C.OPTEE_MSG_CMD_INVOKE_COMMAND: OpteeEntry._invoke,
    _C.OPTEE_MSG_CMD_CLOSE_SESSION: OpteeEntry._close,
    _C.OPTEE_MSG_CMD_CANCEL: OpteeEntry._cancel,
    _C.OPTEE_MSG_CMD_REGISTER_SHM: OpteeEntry._register_shm,
    _C.OPTEE_MSG_CMD_UNREGISTER_SHM: OpteeEntry._unregister_shm,
}
