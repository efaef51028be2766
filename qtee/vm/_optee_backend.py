"""The OP-TEE backend of the mediator: a guest's std calls checked, shadowed, translated.

Per guest ``CALL_WITH_ARG`` (a1:a2 = the guest-physical address of an OP-TEE message), on
the guest's own thread, as Xen's OP-TEE mediator does (optee.md §6.2):

1. the address must be page-aligned (else ``EBADADDR``); a call slot is taken
   (``max_calls``, default OP-TEE's thread count from GET_THREAD_COUNT; over it:
   ``ETHREAD_LIMIT``, which the guest driver parks on and retries);
2. the message is copied out of guest RAM once (the *shadow*) and from then on only the
   shadow is read: a guest rewriting its page mid-call changes nothing OP-TEE sees;
3. only OPEN/INVOKE/CLOSE/CANCEL/REGISTER_SHM/UNREGISTER_SHM pass (else ``EBADCMD``);
4. each TMEM param with an address (a contiguous guest range, not a NONCONTIG page list:
   a model choice) must be guest RAM (else BAD_PARAMETERS, origin COMMS), is pinned and
   its address rewritten to the host's; REGISTER_SHM keeps its pages pinned until a
   successful UNREGISTER_SHM (or unpins at once if OP-TEE refused).  Buffers count against
   :class:`~qtee.vm.VmLimits`: at most ``shm_buffers`` (16) at once, ``shm_buffer_pages``
   (129) each, fewer than ``pinned_pages`` (16384) in total -- over a limit the guest gets
   ``TEEC_ERROR_OUT_OF_MEMORY``, origin COMMS, and nothing is sent.  A cookie registered
   twice is BAD_PARAMETERS (COMMS).  VALUE and RMEM params pass through (an RMEM cookie
   names a buffer of the guest's own partition only);
5. the host driver places the translated message in host-physical memory and makes the
   std call with the VM's client id in a7;
6. only ``ret``, ``ret_origin``, ``session``, output values and output memref sizes are
   written back to the guest's page (:func:`~qtee._optee.optee_msg.reply_patches`).

Destroy (:meth:`OpteeBackend.relinquish`): every call of the VM in flight is answered
``TEEC_ERROR_COMMUNICATION``, origin COMMS, with nothing else written back.  VM_DESTROYED
is sent *before* waiting for those calls: OP-TEE frees a partition when its last
reference drops (§6.1), and its shutdown is what ends a TA's ``TEE_Wait``; the wait for
the calls comes after, bounded by the deadline; then every pin goes.

The guest's other SMCs: GET_THREAD_COUNT and EXCHANGE_CAPABILITIES are forwarded with its
client id (reserved shm masked out of the caps, as Xen does); VM_CREATED/VM_DESTROYED are
the hypervisor's (ENOTAVAIL); RETURN_FROM_RPC is ERESUME (no RPC to guests is modelled);
anything else is an unknown function.
"""

from __future__ import annotations

import errno
import logging
import operator
from dataclasses import replace
from typing import TYPE_CHECKING, ClassVar, Final

from objects import DecodeError, DriverError
from qtee._optee.optee_msg import (
    MSG_HEADER_SIZE,
    OpteeMsg,
    OpteeMsgCmd,
    OpteeReply,
    OpteeSecCap,
    arg_size_of,
    decode_msg,
    encode_msg,
    read_reply,
    reply_patches,
)
from qtee._smc import HYP_CLIENT_ID, SmcFid, SmcReturn
from qtee.gp import _codes as teec
from qtee.vm._channel import HostVmChannel
from qtee.vm._framework import VmError, VmState, register_backend
from qtee.vm._guest_optee import GuestOpteeDevice
from qtee.vm._phase import VmEvent
from qtee.vm._ram import PAGE_SIZE, GuestFault, Pin

if TYPE_CHECKING:
    from qtee._smc import OnReturn, Regs, SmcArgs
    from qtee.secure._monitor import SecureMonitor

__all__ = ["OpteeBackend", "OpteeGuestTee"]

log = logging.getLogger("qtee.vm.optee")

_U32: Final = 0xFFFF_FFFF
_PAGE_MASK: Final = PAGE_SIZE - 1
_CALL: Final = int(SmcFid.OPTEE_SMC_CALL_WITH_ARG)
_COMMANDS: Final = frozenset(int(c) for c in OpteeMsgCmd)
_REGISTER: Final = int(OpteeMsgCmd.OPTEE_MSG_CMD_REGISTER_SHM)
_UNREGISTER: Final = int(OpteeMsgCmd.OPTEE_MSG_CMD_UNREGISTER_SHM)
_VM_FIDS: Final = frozenset(
    {
        SmcFid.OPTEE_SMC_VM_CREATED,
        SmcFid.OPTEE_SMC_VM_DESTROYED,
        SmcFid.QTEE_MODEL_VM_CREATED,
        SmcFid.QTEE_MODEL_VM_DESTROYED,
    }
)
_FORWARDED: Final = frozenset(
    {SmcFid.OPTEE_SMC_GET_THREAD_COUNT, SmcFid.OPTEE_SMC_EXCHANGE_CAPABILITIES}
)
_BUFFERS: Final = "optee buffers"  # VmState.data key: buffers pinned now (temp + registered)
#: ``vm.stopping`` read afresh (another thread sets it while this one is in the TEE).
_stopping: Final = operator.attrgetter("stopping")


class _Refused(Exception):
    """The mediator answers the guest itself: ``ret``, origin COMMS, nothing sent."""

    def __init__(self, ret: int, why: str) -> None:
        super().__init__(why)
        self.ret = ret


class OpteeGuestTee:
    """An OP-TEE guest's kernel driver: a :class:`GuestOpteeDevice` over guest RAM."""

    __slots__ = ("device",)

    def __init__(self, device: GuestOpteeDevice) -> None:
        self.device = device

    def freeze(self) -> None:
        """Callers parked on ETHREAD_LIMIT wake (their next SMC fails: the VM stopped)."""
        self.device.port.wake()

    def discard(self) -> None:
        """Close every context: their CLOSE and UNREGISTER calls fail inside the guest
        (COMMUNICATION) and the guest kernel's tables empty."""
        self.device.close_all()


@register_backend("optee")
class OpteeBackend:
    """Mediates OP-TEE for guests (see the module docstring)."""

    name: ClassVar[str] = "optee"

    def __init__(self, monitor: SecureMonitor) -> None:
        self.monitor = monitor
        self.channel = HostVmChannel(monitor)
        #: OP-TEE's thread count (GET_THREAD_COUNT at probe): the default per-VM call limit.
        self.threads = 0

    # ------------------------------------------------------------------ lifecycle
    def probe(self) -> bool:
        """OP-TEE there (GET_THREAD_COUNT answers), built with virtualization
        (VM_DESTROYED(0) is not UNKNOWN_FUNCTION) and dynamic shm (optee.md §6.2)."""
        smc = self.monitor.smc
        a0, threads, _, _ = smc(SmcFid.OPTEE_SMC_GET_THREAD_COUNT, a7=HYP_CLIENT_ID)
        if a0 != SmcReturn.OK:
            log.debug("OP-TEE probe: GET_THREAD_COUNT answered %#x: no OP-TEE", a0)
            return False
        status = self.channel.vm_destroyed(SmcFid.OPTEE_SMC_VM_DESTROYED, 0)
        if status == SmcReturn.UNKNOWN_FUNCTION:
            log.debug("OP-TEE probe: no virtualization (VM_DESTROYED is an unknown function)")
            return False
        a0, caps, _, _ = smc(SmcFid.OPTEE_SMC_EXCHANGE_CAPABILITIES, a7=HYP_CLIENT_ID)
        if a0 != SmcReturn.OK or not caps & OpteeSecCap.OPTEE_SMC_SEC_CAP_DYNAMIC_SHM:
            log.debug("OP-TEE probe: no dynamic shared memory (caps %#x)", caps)
            return False
        self.threads = threads
        return True

    def domain_create(self, vm: VmState) -> None:
        """VM_CREATED with the VM's client id; a refusal is VmError(ENODEV)."""
        status = self.channel.vm_created(SmcFid.OPTEE_SMC_VM_CREATED, vm.client_id)
        if status != SmcReturn.OK:
            try:
                name = SmcReturn(status).name
            except ValueError:
                name = f"{status:#x}"
            why = (
                "guest limit (CFG_VIRT_GUEST_COUNT) reached or out of resources"
                if status == SmcReturn.ENOTAVAIL
                else "refused"
            )
            raise VmError(
                errno.ENODEV,
                f"OP-TEE refused client id {vm.client_id}: {name}, {why}",
                tee_status=status,
            )
        if not vm.max_calls:
            vm.max_calls = self.threads
        vm.data[_BUFFERS] = 0

    def guest_tee(self, vm: VmState) -> OpteeGuestTee:
        """The guest's own OP-TEE driver over its RAM, SMCs trapping here."""
        return OpteeGuestTee(GuestOpteeDevice(vm.guest, vm.guest.ram))

    def relinquish(self, vm: VmState, deadline: float) -> None:
        """Fail the VM's calls (COMMUNICATION/COMMS), VM_DESTROYED (OP-TEE shuts the
        partition down, which ends TA waits), wait for the calls until ``deadline``,
        drop every pin."""
        with vm.cond:
            vm.move(VmEvent.STOP)
        status = self.channel.vm_destroyed(SmcFid.OPTEE_SMC_VM_DESTROYED, vm.client_id)
        if status != SmcReturn.OK:
            log.debug("VM_DESTROYED of client %d answered %#x", vm.client_id, status)
        vm.wait_for_calls(deadline)
        vm.unpin_all()
        with vm.cond:
            vm.data[_BUFFERS] = 0

    def secure_objects(self, vm: VmState) -> int:
        """Sessions OP-TEE's partition for the VM holds now."""
        from qtee.secure._optee_entry import OpteeEntry

        entry = OpteeEntry.of(self.monitor)
        part = None if entry is None else entry.partition(vm.client_id)
        return 0 if part is None else len(part.world.live_ids())

    def leaks(self) -> dict[str, int]:
        """OP-TEE's partitions that outlived their VMs, and what they hold."""
        from qtee.secure._optee_entry import OpteeEntry

        entry = OpteeEntry.of(self.monitor)
        return {} if entry is None else entry.leaks()

    # ------------------------------------------------------------------ SMCs
    def handle_smc(self, vm: VmState, args: SmcArgs, on_return: OnReturn | None) -> Regs:
        """One trapped guest SMC (see the module docstring)."""
        fid, a1, a2 = args[0], args[1], args[2]
        if fid == _CALL:
            return (self._std_call(vm, ((a1 & _U32) << 32) | (a2 & _U32)), 0, 0, 0)
        if fid in _FORWARDED:
            regs = self.monitor.smc(fid, a7=vm.client_id)
            if fid == SmcFid.OPTEE_SMC_EXCHANGE_CAPABILITIES:
                caps = regs[1] & ~OpteeSecCap.OPTEE_SMC_SEC_CAP_HAVE_RESERVED_SHM
                return (regs[0], caps, 0, 0)
            return regs
        if fid in _VM_FIDS:
            return (SmcReturn.ENOTAVAIL, 0, 0, 0)
        if fid == SmcFid.OPTEE_SMC_RETURN_FROM_RPC:
            return (SmcReturn.ERESUME, 0, 0, 0)
        return (SmcReturn.UNKNOWN_FUNCTION, 0, 0, 0)

    def _std_call(self, vm: VmState, gpa: int) -> int:
        if gpa & _PAGE_MASK:
            return SmcReturn.EBADADDR
        ram = vm.guest.ram
        with vm.cond:
            if vm.stopping:
                return SmcReturn.ENOTAVAIL
            if vm.calls >= vm.max_calls:
                vm.stats["limit:calls"] += 1
                return SmcReturn.ETHREAD_LIMIT
            vm.calls += 1
        pins: list[Pin] = []  # this call's (the arg page, temporary buffers)
        held: Pin | None = None  # a REGISTER_SHM's, kept on success
        ret: int | None = None
        try:
            try:
                head = ram.read(gpa, MSG_HEADER_SIZE)
                arg_pin = vm.pin(gpa, MSG_HEADER_SIZE)
            except GuestFault:
                return SmcReturn.EBADADDR
            if arg_pin is None:  # stopping, or the VM's pinned pages are at the limit
                if _stopping(vm):
                    return SmcReturn.ENOTAVAIL
                ret = teec.OUT_OF_MEMORY
                return self._answer_ret(vm, gpa, teec.OUT_OF_MEMORY)
            pins.append(arg_pin)
            try:
                shadow = ram.read(gpa, arg_size_of(head))  # THE copy of the message
                msg = decode_msg(shadow)
            except (DecodeError, GuestFault) as exc:
                log.debug("client %d: malformed message: %s", vm.client_id, exc)
                ret = teec.BAD_PARAMETERS
                return self._answer_ret(vm, gpa, teec.BAD_PARAMETERS)
            if msg.cmd not in _COMMANDS:
                return SmcReturn.EBADCMD
            try:
                sent, held = self._translate(vm, msg, pins)
            except _Refused as exc:
                log.debug("client %d: %s", vm.client_id, exc)
                ret = exc.ret
                return self._answer_ret(vm, gpa, exc.ret)
            a0, reply = self._forward(vm, sent)
            if a0 != SmcReturn.OK:
                return a0
            assert reply is not None
            if _stopping(vm):
                ret = teec.COMMUNICATION
                return self._answer_ret(vm, gpa, teec.COMMUNICATION)
            ret = reply.ret
            if held is not None and msg.cmd == _REGISTER and reply.ret == teec.SUCCESS:
                with vm.cond:
                    vm.mappings[msg.params[0].c] = held
                held = None
            if msg.cmd == _UNREGISTER and reply.ret == teec.SUCCESS:
                self._unregistered(vm, msg.params[0].c)
            try:
                for off, data in reply_patches(msg, reply):
                    ram.write(gpa + off, data)
            except GuestFault:
                return SmcReturn.EBADADDR  # the page vanished (Xen re-validates it)
            return SmcReturn.OK
        finally:
            with vm.cond:
                vm.data[_BUFFERS] -= len(pins[1:])  # the temporary buffers
                if held is not None:
                    vm.data[_BUFFERS] -= 1
                    pins.append(held)
                for pin in pins:
                    vm.unpin_locked(pin)
                vm.calls -= 1
                if ret == teec.SUCCESS:
                    vm.ok += 1
                elif ret is not None:
                    vm.stats["failed"] += 1
                    vm.results[ret] += 1
                else:
                    vm.stats["smc_errors"] += 1
                if _stopping(vm):
                    vm.cond.notify_all()

    @staticmethod
    def _answer_ret(vm: VmState, gpa: int, ret: int) -> int:
        """Answer in the guest's page: ``ret``, origin COMMS; nothing else written."""
        try:
            vm.guest.ram.write(
                gpa + 20, ret.to_bytes(4, "little") + teec.ORIGIN_COMMS.to_bytes(4, "little")
            )
        except GuestFault:
            return SmcReturn.EBADADDR
        return SmcReturn.OK

    # ------------------------------------------------------------------ params
    def _translate(
        self, vm: VmState, msg: OpteeMsg, pins: list[Pin]
    ) -> tuple[OpteeMsg, Pin | None]:
        """The message OP-TEE gets: TMEM addresses pinned and rewritten to host ones.

        Pins of temporary buffers go to ``pins`` (dropped after the call); a
        REGISTER_SHM's pin is returned (kept if OP-TEE accepts it)."""
        limits = vm.limits
        register = msg.cmd == _REGISTER
        if register:
            p0 = msg.params[0] if len(msg.params) == 1 else None
            if p0 is None or not p0.attr.is_tmem or not p0.a:
                raise _Refused(
                    teec.BAD_PARAMETERS, "REGISTER_SHM needs one TMEM param with an address"
                )
            with vm.cond:
                if p0.c in vm.mappings:
                    raise _Refused(
                        teec.BAD_PARAMETERS, f"shm cookie {p0.c:#x} is already registered"
                    )
        held: Pin | None = None
        params = []
        for i, p in enumerate(msg.params):
            if not p.attr.is_tmem or not p.a:  # VALUE, RMEM, the NULL memref: as they are
                params.append(p)
                continue
            ram = vm.guest.ram
            try:
                hpa = ram.translate(p.a, p.b)
            except GuestFault as exc:
                raise _Refused(teec.BAD_PARAMETERS, f"param {i}: {exc.detail}") from None
            pages = ((p.a + p.b + _PAGE_MASK) >> 12) - (p.a >> 12) if p.b else 0
            if pages > limits.shm_buffer_pages:
                with vm.cond:
                    vm.stats["limit:shm_buffer_pages"] += 1
                raise _Refused(
                    teec.OUT_OF_MEMORY,
                    f"param {i}: {pages} pages > {limits.shm_buffer_pages} per buffer",
                )
            with vm.cond:
                if vm.stopping:
                    raise _Refused(teec.COMMUNICATION, "the VM is being destroyed")
                if vm.data[_BUFFERS] >= limits.shm_buffers:
                    vm.stats["limit:shm_buffers"] += 1
                    raise _Refused(
                        teec.OUT_OF_MEMORY, f"{limits.shm_buffers} shared buffers already"
                    )
                pin = vm.pin_locked(p.a, p.b)
                if pin is None:
                    raise _Refused(
                        teec.OUT_OF_MEMORY, f"pinned pages would reach {limits.pinned_pages}"
                    )
                vm.data[_BUFFERS] += 1
            if register:
                held = pin
            else:
                pins.append(pin)
            params.append(replace(p, a=hpa))
        return replace(msg, params=tuple(params)), held

    def _unregistered(self, vm: VmState, cookie: int) -> None:
        with vm.cond:
            pin = vm.mappings.pop(cookie, None)
            if pin is not None:
                vm.data[_BUFFERS] -= 1
                vm.unpin_locked(pin)

    # ------------------------------------------------------------------ host driver
    def _forward(self, vm: VmState, msg: OpteeMsg) -> tuple[int, OpteeReply | None]:
        """The host driver's part: the message in host-physical memory, the std call with
        the VM's client id, the whitelisted reply fields read back."""
        phys = self.monitor.phys
        shadow = encode_msg(msg)
        hpa = phys.lend(shadow)
        try:
            a0 = self.monitor.smc(_CALL, hpa >> 32, hpa & _U32, a7=vm.client_id)[0]
        except DriverError as exc:
            log.debug("client %d: CALL_WITH_ARG failed: %s", vm.client_id, exc)
            return SmcReturn.ENOTAVAIL, None
        finally:
            phys.take_back(hpa)
        if a0 != SmcReturn.OK:
            return a0, None
        return a0, read_reply(shadow, msg)
