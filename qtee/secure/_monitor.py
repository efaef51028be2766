"""The secure monitor: EL3 plus QTEE's SMC entry, the host's instance of the SMC boundary.

Every SMC carries a client id in ``a7`` (0 = the hypervisor/host, OP §6.1) and the
monitor routes it to that client's *partition*: one :class:`SecureWorld` per client id,
with its own object ids, async releases, listeners and root, so the same id in two VMs
names two objects.  The host's partition exists from the start; a guest's is made by the
model-only ``QTEE_MODEL_VM_CREATED`` and torn down by ``QTEE_MODEL_VM_DESTROYED``
(OP-TEE's rules, OP §6.1: only from ``a7`` = 0, client id 0 refused, ENOTAVAIL past the
guest limit, an unknown id on destroy logged and OK; QK says nothing about VMs).

``INVOKE(in_pa, in_size, out_pa, 4096)`` runs :meth:`SecureWorld.invoke` on the bytes at
those physical addresses; each callback request becomes a type-3 return delivered to
the caller's ``on_return`` on the caller's thread, whose answer must be
``CB_RSP(out_pa, 4096)`` (QK §3.1, §4.1 step 6).

Where the sheets are silent the model chooses, and says so: both SMC64 and SMC32 ids are
accepted; an unmapped buffer, an outbound size other than 4096 or an inbound larger than
4 MiB fail the SMC with EINVAL; a malformed inbound is answered ``ERROR_INVALID``; a
CB_RSP naming another buffer is taken as an NS answer of UNAVAIL; a CB_RSP with nothing
pending fails with EINVAL; an INVOKE for a client id never created fails with ENODEV and
one for a partition being destroyed is answered DEFUNCT; a caller whose ``on_return``
raises has abandoned the call: the secure side sees DEFUNCT, runs to the end, and the
exception reaches the caller.  The monitor has no thread limit (per-VM limits are the
mediator's).
"""

from __future__ import annotations

import errno
import logging
import operator
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

from objects import DecodeError, DriverError, UsageError, result_to_u32
from qtee import wire
from qtee._qcomtee.shm import PhysFault, PhysMemory
from qtee._qcomtee_msg import Result
from qtee._smc import (
    HYP_CLIENT_ID,
    QCOMTEE_RESULT_INBOUND_REQ_NEEDED,
    OnReturn,
    Regs,
    SmcArgs,
    SmcConduit,
    SmcFid,
    SmcHandler,
    SmcReturn,
)
from qtee.secure._gpclient import CGPAPPCLIENT_UID, install_gp_app_client
from qtee.secure._services import QteeRoot
from qtee.secure._world import SecureObject, SecureWorld

__all__ = ["SecureMonitor"]

log = logging.getLogger("qtee.secure.monitor")

_INVOKE: Final = int(SmcFid.QCOM_SCM_SMCINVOKE_INVOKE)
_INVOKE_32: Final = int(SmcFid.QCOM_SCM_SMCINVOKE_INVOKE_32)
_CB_RSP: Final = int(SmcFid.QCOM_SCM_SMCINVOKE_CB_RSP)
_CB_RSP_32: Final = int(SmcFid.QCOM_SCM_SMCINVOKE_CB_RSP_32)
_INVOKES: Final = frozenset({_INVOKE, _INVOKE_32})
_CB_RSPS: Final = frozenset({_CB_RSP, _CB_RSP_32})
_VM_CALLS: Final = frozenset(
    {int(SmcFid.QTEE_MODEL_VM_CREATED), int(SmcFid.QTEE_MODEL_VM_DESTROYED)}
)
_LEGACY: Final = frozenset(
    {SmcFid.QCOM_SCM_SMCINVOKE_INVOKE_LEGACY, SmcFid.QCOM_SCM_SMCINVOKE_INVOKE_LEGACY_32}
)
_VM_CREATED: Final = int(SmcFid.QTEE_MODEL_VM_CREATED)
_VM_DESTROYED: Final = int(SmcFid.QTEE_MODEL_VM_DESTROYED)
#: Function ids the monitor answers itself; a service cannot take them.
_OWN: Final = frozenset(
    {_INVOKE, _INVOKE_32, _CB_RSP, _CB_RSP_32, _VM_CREATED, _VM_DESTROYED, *_LEGACY}
)
_OUT_SIZE: Final = wire.MAX_OUTBOUND_BUFFER_SIZE
_CB_REQ: Final = (QCOMTEE_RESULT_INBOUND_REQ_NEEDED, 0, 0, 0)
_DEFUNCT: Final = result_to_u32(Result.ERROR_DEFUNCT)
_UNAVAIL: Final = result_to_u32(Result.ERROR_UNAVAIL)
_DEFUNCT_REGS: Final = (0, _DEFUNCT, 0, 0)
_OK: Final = (int(SmcReturn.OK), 0, 0, 0)
_ENOTAVAIL: Final = (int(SmcReturn.ENOTAVAIL), 0, 0, 0)
_UNKNOWN: Final = (int(SmcReturn.UNKNOWN_FUNCTION), 0, 0, 0)
#: Guest client ids are 16-bit on the secure side (OP §6.2); 0 is the hypervisor's.
_MAX_CLIENT_ID: Final = 0xFFFF
_U32: Final = struct.Struct("<I")
#: The names of an SMC's argument registers, in a refusal.
_ARG_NAMES: Final = ("fid", "a1", "a2", "a3", "a4", "a5", "a6", "a7")
_U64: Final = 1 << 64
_OF_LOCK: Final = threading.Lock()
#: ``world.closing`` read afresh (a destroy sets it while a call is in the world).
_closing: Final = operator.attrgetter("closing")


def _services(world: SecureWorld) -> dict[int, object] | None:
    """The service table of ``world``'s root (a :class:`QteeRoot`'s), or None."""
    services = getattr(world.root, "services", None)
    return services if isinstance(services, dict) else None


def _offer_gp(world: SecureWorld) -> None:
    """IGPAppClient (0x199) through ``world``'s client env, as the standard QTEE offers it
    (``qtee.Device()``), when its root has a service table."""
    if _services(world) is not None:
        install_gp_app_client(world)


def _check_reg(value: object, name: str) -> None:
    if not isinstance(value, int) or not 0 <= value < _U64:
        raise UsageError(f"{name} = {value!r} is not a 64-bit register value")


#: What a reused :class:`_SmcCall` holds between calls.
_NO_OUT: Final = memoryview(b"")


@dataclass(slots=True, eq=False)
class _SmcCall:
    """One INVOKE's state on the monitor, from its SMC to its final return: whom a
    callback request goes back to (``on_return``), the outbound buffer it must come
    back on, and the caller's failure while serving one.  The record itself is the
    world's ``serve`` (no bound method made per INVOKE)."""

    monitor: SecureMonitor
    on_return: OnReturn | None
    out_pa: int
    cid: int
    out: bytearray | memoryview
    #: What the caller raised serving a callback (Ctrl-C too): QTEE finishes the call on
    #: DEFUNCTs, then the caller gets it.
    failed: BaseException | None = None

    def __call__(self, out: bytearray | memoryview) -> None:
        """The world's ``serve``: one type-3 return, and the caller's next SMC, which must
        be CB_RSP of the same outbound buffer."""
        if out is not self.out:  # not this call's buffer
            _U32.pack_into(out, 0, _UNAVAIL)
            return
        on_return = self.on_return
        if on_return is None or self.failed is not None:
            _U32.pack_into(out, 0, _UNAVAIL if self.failed is None else _DEFUNCT)
            return
        trace = self.monitor.trace_smc
        cid = self.cid
        if trace is not None:
            trace(cid, None, _CB_REQ)
        try:
            nxt = on_return(_CB_REQ)
        except BaseException as exc:  # the caller abandoned the call (Ctrl-C too): QTEE
            self.failed = exc  # finishes it on DEFUNCTs, then the caller gets its exception
            _U32.pack_into(out, 0, _DEFUNCT)
            return
        if trace is not None and isinstance(nxt, tuple) and len(nxt) == 3:
            trace(cid, nxt[0], (nxt[1], nxt[2], 0, 0))
        out_pa = self.out_pa
        if nxt not in ((_CB_RSP, out_pa, _OUT_SIZE), (_CB_RSP_32, out_pa, _OUT_SIZE)):
            _U32.pack_into(out, 0, _UNAVAIL)


class SecureMonitor(SmcConduit):
    """EL3 + QTEE entry: routes each SMC to the partition its ``a7`` names (implements
    :class:`~qtee._smc.SmcConduit`).

    ``root_factory`` makes each guest partition's root (a root keeps per-world state, so
    every partition needs its own); the host's partition is ``host_world`` or a new world
    around ``root_factory()`` offering IGPAppClient (0x199) too: ``SecureMonitor()`` is
    the standard QTEE of ``qtee.Device()``.  A guest's partition offers the services the
    host's does, IGPAppClient included (on a GP runtime of its own, whose TA lookups fall
    back on the host partition's registry).  ``phys`` is THE host-physical memory: every host
    :class:`~qtee.Device` on this monitor lends its SMC buffers and places its shm there.
    ``smcinvoke=False`` models a QTEE without smcinvoke (the driver's probe gets EIO,
    QK §3.1); ``virtualization=False`` one without the VM calls (UNKNOWN_FUNCTION).
    """

    def __init__(
        self,
        root_factory: Callable[[], SecureObject] = QteeRoot,
        *,
        host_world: SecureWorld | None = None,
        phys: PhysMemory | None = None,
        guest_limit: int = 2,
        threads: int = 8,
        smcinvoke: bool = True,
        virtualization: bool = True,
    ) -> None:
        if not callable(root_factory):
            raise TypeError("root_factory must be callable")
        if not isinstance(guest_limit, int) or guest_limit < 0:
            raise UsageError(f"guest_limit must be an int >= 0, not {guest_limit!r}")
        if not isinstance(threads, int) or threads < 1:
            raise UsageError(f"threads must be an int >= 1, not {threads!r}")
        if phys is not None and not isinstance(phys, PhysMemory):
            raise TypeError("phys must be a PhysMemory (host-physical memory)")
        if host_world is None:
            host_world = SecureWorld(root_factory())
            _offer_gp(host_world)
        elif not isinstance(host_world, SecureWorld):
            raise TypeError("host_world must be a SecureWorld")
        elif host_world.client_id != HYP_CLIENT_ID:
            raise UsageError(f"host_world has client id {host_world.client_id}, not 0")
        elif host_world.monitor is not None:
            raise UsageError("host_world already has a monitor")
        self.root_factory = root_factory
        self.phys: PhysMemory = phys if phys is not None else PhysMemory()
        self.guest_limit = guest_limit
        #: QTEE threads (informational: the mediator's default per-VM call limit).
        self.threads = threads
        self.smcinvoke = bool(smcinvoke)
        self.virtualization = bool(virtualization)
        #: ``trace_smc(client_id, fid, (a1, a2, a3, a4))`` for each call into the monitor
        #: (a CB_RSP included) and ``trace_smc(client_id, None, (a0, a1, a2, a3))`` for
        #: each return (a type-3 one included), when set.
        self.trace_smc: Callable[[int, int | None, Regs], None] | None = None
        self._lent_at = self.phys.lent_at
        host_world.monitor = self
        host_world.phys = self.phys
        self._host = host_world
        #: The records of the host's finished INVOKEs, reused (one per call in flight).
        self._idle_calls: list[_SmcCall] = []
        self._lock = threading.Lock()
        self._worlds: dict[int, SecureWorld] = {HYP_CLIENT_ID: host_world}
        self._services: dict[int, SmcHandler] = {}

    @classmethod
    def of(cls, world: SecureWorld, phys: PhysMemory | None = None) -> SecureMonitor:
        """The monitor of ``world``: made on first use with ``world`` as its host
        partition (and ``phys`` as its memory, when given)."""
        if not isinstance(world, SecureWorld):
            raise TypeError("a monitor is found for a SecureWorld")
        with _OF_LOCK:
            monitor = world.monitor
            if monitor is None:
                monitor = cls(host_world=world, phys=phys)
        if phys is not None and phys is not monitor.phys:
            raise UsageError("this world's monitor already has its own physical memory")
        return monitor

    # ------------------------------------------------------------------ queries
    @property
    def host(self) -> SecureWorld:
        """The host's partition (client id 0)."""
        return self._host

    def partition(self, client_id: int) -> SecureWorld | None:
        """The live partition of ``client_id`` (0 = the host); None when there is none or
        it is being destroyed."""
        if not isinstance(client_id, int):
            raise TypeError(f"a client id is an int, not {type(client_id).__name__}")
        with self._lock:
            world = self._worlds.get(client_id)
        return None if world is None or world.closing else world

    def clients(self) -> list[int]:
        """Client ids of the live guest partitions, ascending (the host's 0 is not one)."""
        with self._lock:
            return sorted(c for c, w in self._worlds.items() if c and not w.closing)

    def calls_in_flight(self, client_id: int) -> int:
        """INVOKEs of a guest partition still running (host calls are not counted)."""
        world = self._worlds.get(client_id)
        return 0 if world is None or not client_id else len(world.inflight)

    def leaks(self) -> dict[str, int]:
        """What outlives its VMs, by name (empty when nothing leaked): guest partitions
        not freed, their calls in flight and secure objects.

        The host partition's tables are its devices' to report (:meth:`Device.leaks`).
        Lent SMC buffers are not counted: a device keeps its outbound pages lent while
        it has an open context, and each call's inbound is taken back in a ``finally``
        (``phys.lent()`` gives the count)."""
        found: dict[str, int] = {}
        with self._lock:
            guests = [(c, w) for c, w in self._worlds.items() if c]
        if guests:
            found["guest partitions"] = len(guests)
        for cid, world in sorted(guests, key=lambda cw: cw[0]):
            found[f"partition {cid} secure objects"] = len(world.live_ids())
            found[f"partition {cid} calls in flight"] = len(world.inflight)
        return {name: count for name, count in found.items() if count}

    # ------------------------------------------------------------------ services
    def add_service(self, fids: Iterable[int], handler: SmcHandler) -> None:
        """Route ``fids`` to ``handler(fid, a1, ..., a7, on_return) -> Regs`` (another
        secure-side entry, e.g. OP-TEE's).  A fid the monitor answers itself, or one
        already routed, is refused and nothing is added."""
        if not callable(handler):
            raise TypeError("handler must be callable")
        wanted = list(fids)
        for fid in wanted:
            _check_reg(fid, "fid")
            if fid >= 1 << 32:
                raise UsageError(f"function id {fid:#x} is not 32-bit")
        with self._lock:
            taken = [f for f in wanted if f in _OWN or f in self._services]
            if taken or len(set(wanted)) != len(wanted):
                raise UsageError(f"function ids already taken: {[hex(f) for f in taken]}")
            for fid in wanted:
                self._services[fid] = handler

    # ------------------------------------------------------------------ the SMC
    def _smc(self, args: SmcArgs, on_return: OnReturn | None) -> Regs:
        """One SMC from the non-secure side; see the module docstring for the calls."""
        fid, a1, a2, a3, a4, _a5, _a6, a7 = args
        if fid == _INVOKE and self.trace_smc is None and self.smcinvoke:
            # INVOKE on two lent buffers, exactly (the host driver's and the VMM's calls):
            # the hot path, one dict lookup per buffer.
            lent_at = self._lent_at
            inbound = lent_at(a1)
            outbound = lent_at(a3)
            if (
                inbound is not None
                and outbound is not None
                and len(inbound) == a2
                and a4 == _OUT_SIZE == len(outbound)
            ):
                if a7 == HYP_CLIENT_ID:
                    idle = self._idle_calls
                    try:  # a record of a finished call, or a new one
                        call = idle.pop()
                    except IndexError:
                        call = _SmcCall(self, on_return, a3, HYP_CLIENT_ID, outbound)
                    else:
                        call.on_return, call.out_pa, call.out = on_return, a3, outbound
                    regs = self._enter(self._host, inbound, call)  # (raises: not reused)
                    call.on_return, call.out = None, _NO_OUT  # it keeps nothing alive
                    idle.append(call)
                    return regs
                world = self._worlds.get(a7) if type(a7) is int else None
                if world is not None:  # (else the general path names what is wrong)
                    call = _SmcCall(self, on_return, a3, a7, outbound)
                    return self._enter_partition(world, inbound, call)
        trace = self.trace_smc
        if trace is not None:
            trace(a7, fid, (a1, a2, a3, a4))
        regs = self._call(args, on_return)
        if trace is not None:
            trace(a7, None, regs)
        return regs

    def _call(self, args: SmcArgs, on_return: OnReturn | None) -> Regs:
        """The general path: ``args`` is the call's ``(fid, a1, ..., a7)``, each checked."""
        for value, name in zip(args, _ARG_NAMES, strict=True):
            _check_reg(value, name)
        if on_return is not None and not callable(on_return):
            raise TypeError("on_return must be callable")
        fid, a1, a2, a3, a4, _a5, _a6, a7 = args
        if fid in _OWN:
            if not self.smcinvoke:  # qcom_scm_call fails: the probe's -EIO (QK §3.1)
                raise DriverError(errno.EIO, "QTEE has no smcinvoke service")
            if fid in _INVOKES:
                return self._invoke(a1, a2, a3, a4, a7, on_return)
            if fid in _CB_RSPS:
                raise DriverError(errno.EINVAL, "CB_RSP with no callback request pending")
            if fid in _VM_CALLS:
                if not self.virtualization:
                    return _UNKNOWN
                return self._vm_call(fid, a1, a7)
            return _UNKNOWN  # INVOKE_LEGACY: unused, unknown (QK §3.1)
        handler = self._services.get(fid)
        if handler is None:
            return _UNKNOWN
        return handler(*args, on_return)

    def _invoke(
        self,
        in_pa: int,
        in_size: int,
        out_pa: int,
        out_size: int,
        client_id: int,
        on_return: OnReturn | None,
    ) -> Regs:
        if out_size != _OUT_SIZE or in_size > wire.MAX_INBOUND_BUFFER_SIZE:
            raise DriverError(errno.EINVAL, f"buffer sizes {in_size}/{out_size}")
        world = self._host
        if client_id != HYP_CLIENT_ID:
            got = self._worlds.get(client_id)
            if got is None:
                raise DriverError(errno.ENODEV, f"client id {client_id} has no partition")
            if got.closing:
                return _DEFUNCT_REGS
            world = got
        try:
            inbound = self.phys.buffer(in_pa, in_size)
            outbound = self.phys.buffer(out_pa, out_size)
        except PhysFault as exc:
            raise DriverError(errno.EINVAL, str(exc)) from None
        call = _SmcCall(self, on_return, out_pa, client_id, outbound)
        if client_id == HYP_CLIENT_ID:
            return self._enter(world, inbound, call)
        return self._enter_partition(world, inbound, call)

    def _enter_partition(
        self, world: SecureWorld, inbound: bytearray | memoryview, call: _SmcCall
    ) -> Regs:
        """A guest's INVOKE, counted in flight on its partition: a destroyed partition is
        freed when its last call leaves (OP §6.1).

        The count is lock-free, as firmware keeps an atomic counter: the deque's append
        and pop are atomic; a call appends before it reads ``closing`` and VM_DESTROYED
        sets ``closing`` before it reads the count, so one of them sees the other."""
        inflight = world.inflight
        inflight.append(None)
        try:
            if _closing(world):
                return _DEFUNCT_REGS
            return self._enter(world, inbound, call)
        finally:
            inflight.pop()
            if not inflight and _closing(world):
                self._reap(call.cid, world)

    def _reap(self, client_id: int, world: SecureWorld) -> None:
        """Free a destroyed partition once no call is in it (once: the first to see it)."""
        with self._lock:
            if world.inflight or self._worlds.get(client_id) is not world:
                return
            del self._worlds[client_id]
        released = world.release_all()
        log.debug("client %d: partition freed after its last call, %d objects", client_id, released)

    def _enter(self, world: SecureWorld, inbound: bytearray | memoryview, call: _SmcCall) -> Regs:
        """One INVOKE in ``world``, ``call`` its state on the monitor (made by the caller)."""
        try:
            result = world.invoke(inbound, call.out, call)
        except DecodeError:  # malformed inbound: answered, not forwarded
            result = Result.ERROR_INVALID
        if call.failed is not None:
            raise call.failed
        return _OK if not result else (0, int(result) & 0xFFFF_FFFF, 0, 0)

    # ------------------------------------------------------------------ VM lifecycle
    def _vm_call(self, fid: int, client_id: int, caller: int) -> Regs:
        # OP §6.1 rules, borrowed for the model's QTEE calls.
        if caller != HYP_CLIENT_ID or client_id == HYP_CLIENT_ID or client_id > _MAX_CLIENT_ID:
            return _ENOTAVAIL
        if fid == _VM_CREATED:
            return self._vm_created(client_id)
        return self._vm_destroyed(client_id)

    def _vm_created(self, client_id: int) -> Regs:
        with self._lock:
            if self._no_room_for(client_id):
                return _ENOTAVAIL
        try:
            world = SecureWorld(self.root_factory(), client_id=client_id)
        except Exception:
            log.exception("client %d: the partition could not be made", client_id)
            return _ENOTAVAIL
        world.monitor = self
        world.phys = self.phys
        world.tas.parent = self._host.tas  # the host partition's TAs, then the process's
        host_services = _services(self._host)
        if host_services is not None and CGPAPPCLIENT_UID in host_services:
            _offer_gp(world)  # the standard services the host's partition offers
        with self._lock:  # checked again: another creation may have won meanwhile
            if self._no_room_for(client_id):
                return _ENOTAVAIL
            self._worlds[client_id] = world
        return _OK

    def _no_room_for(self, client_id: int) -> bool:
        """Whether ``client_id`` has a partition already or the guest limit is reached
        (under the lock; the host's partition is not a guest)."""
        return client_id in self._worlds or len(self._worlds) - 1 >= self.guest_limit

    def _vm_destroyed(self, client_id: int) -> Regs:
        with self._lock:
            world = self._worlds.get(client_id)
            if world is None or world.closing:
                log.debug("VM_DESTROYED for client id %d, which has no partition", client_id)
                return _OK
            world.closing = True  # callbacks answer DEFUNCT, new calls are refused
            if world.inflight:
                return _OK  # freed when the last call leaves (OP §6.1)
            del self._worlds[client_id]
        world.release_all()
        return _OK
