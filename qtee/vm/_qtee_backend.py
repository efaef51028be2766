"""The QTEE backend of the mediator: a guest's smcinvoke calls, checked, shadowed, forwarded.

For a guest INVOKE (qtee-kernel.md §3.1: a1 in_pa, a2 in_size, a3 out_pa, a4 out_size) the
backend, on the guest's own thread:

1. takes a call slot (``max_calls``, default the TEE's thread count; over it: ERROR_BUSY,
   since qcomtee has no ETHREAD-style retry);
2. checks the registers: in_size <= 4 MiB (else ERROR_MAXDATA), out_size == 4096, both
   buffers page-aligned inside guest RAM (else the SMC fails EINVAL);
3. pins the guest's in/out pages for the call (:meth:`~qtee.vm.GuestRam.pin_smc`, counted
   against ``VmLimits.pinned_pages``);
4. copies the inbound message into VMM memory (the *shadow*: a
   :class:`~qtee.vm.ShadowPage` of the VM's, lent to the TEE from call to call) and from
   then on reads only the shadow: a guest rewriting its buffer mid-call changes nothing
   QTEE sees; the outbound shadow starts zeroed and the guest's outbound is never read
   on the way in;
5. forwards through the host driver (:class:`~qtee.vm.HostVmChannel`, a7 = client id);
6. for each callback request: releases pins of mappings QTEE dropped (async RELEASE),
   appends NS ids to give back to the guest, copies QTEE's request to the guest page,
   re-enters the guest (its driver serves it and answers CB_RSP), then takes back **only**
   the response fields (result, OB sizes up to the requested size and their payloads, OO
   ids) at the offsets of the VMM's copy of the request;
7. MAP_REGION answers (primordial object, op 0, qtee-kernel.md §2.4) carry a guest address:
   the range must be guest RAM and within the per-VM shm limits (else UNAVAIL / KMEM); it is
   pinned until QTEE releases the mapping object and rewritten to the host address;
8. on the final return writes back only OB sizes, OB payloads and OO ids (result 0), then
   the outbound buffer (async messages), and unpins.

A VM being destroyed gets ERROR_DEFUNCT for every call and callback, without a byte
written to its RAM.
"""

from __future__ import annotations

import errno
import logging
import operator
import struct
from typing import TYPE_CHECKING, ClassVar, Final

from objects import DecodeError, DriverError
from qtee import wire
from qtee._qcomtee_msg import Result
from qtee._smc import QCOMTEE_RESULT_INBOUND_REQ_NEEDED, SmcFid, SmcReturn
from qtee.vm._channel import HostVmChannel, ShadowPage
from qtee.vm._framework import VmError, VmState, register_backend
from qtee.vm._phase import VmEvent
from qtee.vm._ram import PAGE_SIZE, GuestFault

if TYPE_CHECKING:
    from qtee._qcomtee.core import Device
    from qtee._smc import OnReturn, Regs, SmcArgs
    from qtee.secure._monitor import SecureMonitor

__all__ = ["QteeBackend", "QteeGuestTee"]

log = logging.getLogger("qtee.vm.qtee")

_OUT: Final = wire.MAX_OUTBOUND_BUFFER_SIZE
_MAX_IN: Final = wire.MAX_INBOUND_BUFFER_SIZE
_PAGE_MASK: Final = PAGE_SIZE - 1
_U32: Final = struct.Struct("<I")
_REGION: Final = struct.Struct("<QQI")  # MAP_REGION's OB: {u64 paddr; u64 len; u32 perms}
_NS_FIRST: Final = wire.QCOMTEE_MSG_OBJECT_NS_BIT + 1  # NS ids the kernel releases
_PRIMORDIAL: Final = wire.QCOMTEE_MSG_OBJECT_PRIMORDIAL
_OP_MASK: Final = wire.QCOMTEE_MSG_OBJECT_OP_MASK
_OP_RELEASE: Final = wire.QCOMTEE_MSG_OBJECT_OP_RELEASE
_MAP_REGION: Final = 0


def _u32(result: int) -> int:
    return result & 0xFFFF_FFFF


_DEFUNCT: Final = _u32(Result.ERROR_DEFUNCT)
_UNAVAIL: Final = _u32(Result.ERROR_UNAVAIL)
_KMEM: Final = _u32(Result.ERROR_KMEM)
_BUSY: Final = _u32(Result.ERROR_BUSY)
#: ``struct`` of n (offset, size) pairs, by n.
_ARGS: Final = [struct.Struct("<" + "II" * n) for n in range(16)]
_DEFUNCT_REGS: Final = (0, _DEFUNCT, 0, 0)
_ZERO_PAGE: Final = bytes(_OUT)
_NO_OUTPUTS: Final[tuple[tuple[int, ...], int, int, int]] = ((), 0, 12, 0)
_CALLBACK_REGS: Final = (QCOMTEE_RESULT_INBOUND_REQ_NEEDED, 0, 0, 0)
_INVOKE_FIDS: Final = frozenset(
    {int(SmcFid.QCOM_SCM_SMCINVOKE_INVOKE), int(SmcFid.QCOM_SCM_SMCINVOKE_INVOKE_32)}
)
_RSP_FIDS: Final = frozenset(
    {int(SmcFid.QCOM_SCM_SMCINVOKE_CB_RSP), int(SmcFid.QCOM_SCM_SMCINVOKE_CB_RSP_32)}
)
#: The VM calls are the hypervisor's: a guest asking gets ENOTAVAIL (optee.md §6.1).
_VM_FIDS: Final = frozenset(
    int(f)
    for f in (
        SmcFid.QTEE_MODEL_VM_CREATED,
        SmcFid.QTEE_MODEL_VM_DESTROYED,
        SmcFid.OPTEE_SMC_VM_CREATED,
        SmcFid.OPTEE_SMC_VM_DESTROYED,
    )
)
#: ``vm.stopping`` read afresh (another thread sets it while this one is in the TEE).
_stopping: Final = operator.attrgetter("stopping")


class QteeGuestTee:
    """A QTEE guest's kernel driver: a ``qtee.Device`` over guest RAM, trapping its SMCs."""

    __slots__ = ("device",)

    def __init__(self, device: Device) -> None:
        self.device = device

    def freeze(self) -> None:
        """Pending callback requests finish -ENODEV (QTEE: DEFUNCT), receivers get EINTR."""
        with self.device._lock:
            contexts = list(self.device.contexts)
        for ctx in contexts:
            ctx.requests.close()

    def discard(self) -> None:
        """Close every context and drop every NS id: the guest kernel's TEE state is gone
        (its RELEASE SMCs fail ENODEV inside the guest and are dropped, as for ENODEV)."""
        device = self.device
        with device._lock:
            contexts = list(device.contexts)
        for ctx in contexts:
            ctx.abandon()
        for _ident, obj in device.ns.drain():
            obj.put()
        device.release_pages()  # the outbound pages it kept lent while contexts were open


@register_backend("qtee")
class QteeBackend:
    """Mediates QTEE for guests (see the module docstring)."""

    name: ClassVar[str] = "qtee"

    def __init__(self, monitor: SecureMonitor) -> None:
        self.monitor = monitor
        self.channel = HostVmChannel(monitor, self._upcall)

    # ------------------------------------------------------------------ lifecycle
    def probe(self) -> bool:
        """smcinvoke present (an all-zero INVOKE is not -EIO, qtee-kernel.md §3.1) and VM
        calls known (VM_DESTROYED(0) is not UNKNOWN_FUNCTION, as Xen probes OP-TEE)."""
        try:
            self.monitor.smc(SmcFid.QCOM_SCM_SMCINVOKE_INVOKE)
        except DriverError as exc:
            if exc.code == errno.EIO:
                log.debug("QTEE probe: no smcinvoke (INVOKE answered -EIO)")
                return False
        if self.channel.vm_destroyed(SmcFid.QTEE_MODEL_VM_DESTROYED, 0) == (
            SmcReturn.UNKNOWN_FUNCTION
        ):
            log.debug("QTEE probe: no VM support (VM_DESTROYED is an unknown function)")
            return False
        return True

    def domain_create(self, vm: VmState) -> None:
        """VM_CREATED with the VM's client id; a refusal is VmError(ENODEV)."""
        status = self.channel.vm_created(SmcFid.QTEE_MODEL_VM_CREATED, vm.client_id)
        if status != SmcReturn.OK:
            raise VmError(
                errno.ENODEV,
                f"QTEE refused client id {vm.client_id}: {self._refusal(status)}",
                tee_status=status,
            )
        if not vm.max_calls:
            vm.max_calls = int(self.monitor.threads)

    def _refusal(self, status: int) -> str:
        try:
            name = SmcReturn(status).name
        except ValueError:
            name = f"{status:#x}"
        limit = getattr(self.monitor, "guest_limit", None)
        guests = [c for c in self.monitor.clients() if c]
        if status == SmcReturn.ENOTAVAIL and limit is not None and len(guests) >= limit:
            return f"guest limit {limit} reached (its SMC answered {name})"
        return f"its SMC answered {name}"

    def guest_tee(self, vm: VmState) -> QteeGuestTee:
        """The guest's own driver model: ``Device`` over guest RAM, SMCs trapping here."""
        from qtee._qcomtee.core import Device
        from qtee.addrspace import CheckedMemory

        ram = vm.guest.ram
        device = Device(
            None, memory=CheckedMemory(), phys=ram, conduit=vm.guest, shm_backing=ram.backing
        )
        return QteeGuestTee(device)

    def relinquish(self, vm: VmState, deadline: float) -> None:
        """Fail the VM's calls (DEFUNCT), wait for them until ``deadline``, VM_DESTROYED
        (QTEE releases the partition's objects once its last call left), unpin all and
        end the lends of the VM's shadow pages."""
        with vm.cond:
            vm.move(VmEvent.STOP)
        vm.wait_for_calls(deadline)
        status = self.channel.vm_destroyed(SmcFid.QTEE_MODEL_VM_DESTROYED, vm.client_id)
        if status != SmcReturn.OK:
            log.debug("VM_DESTROYED of client %d answered %#x", vm.client_id, status)
        vm.unpin_all()
        with vm.lock:
            vm.refused_ns.clear()
            pool, vm.pages = vm.pages, []  # a call still in flight ends its own page's lend
        self.channel.release(pool)

    def secure_objects(self, vm: VmState) -> int:
        """Objects QTEE's partition for the VM holds now."""
        world = self.monitor.partition(vm.client_id)
        return 0 if world is None else len(world.live_ids())

    def leaks(self) -> dict[str, int]:
        """Nothing of its own: every per-VM table lives in the VM's state."""
        return {}

    # ------------------------------------------------------------------ SMCs
    def handle_smc(self, vm: VmState, args: SmcArgs, on_return: OnReturn | None) -> Regs:
        """INVOKE (a1 in_pa, a2 in_size, a3 out_pa, a4 out_size) is mediated (the module
        docstring); CB_RSP outside a callback fails EINVAL; the VM calls are the
        hypervisor's (ENOTAVAIL); anything else is unknown."""
        fid, in_pa, in_size, out_pa, out_size, _a5, _a6, _a7 = args
        if fid not in _INVOKE_FIDS:
            return self._other(fid)
        if out_size != _OUT:
            raise DriverError(errno.EINVAL, f"outbound buffer of {out_size} bytes, must be 4096")
        if in_pa & _PAGE_MASK or out_pa & _PAGE_MASK:
            raise DriverError(errno.EINVAL, "inbound and outbound buffers must be page-aligned")
        if in_size > _MAX_IN:
            return (0, _u32(Result.ERROR_MAXDATA), 0, 0)
        ram = vm.guest.ram
        lock = vm.lock
        lock.acquire()  # (not ``with``: this is every guest call's path)
        try:
            if vm.stopping:
                return _DEFUNCT_REGS
            if vm.calls >= vm.max_calls:
                vm.stats["limit:calls"] += 1
                vm.results[Result.ERROR_BUSY] += 1
                return (0, _BUSY, 0, 0)
            pool = vm.pages
            page = pool.pop() if pool else self.channel.page()
            try:
                pages = ram.pin_smc(page, in_pa, in_size, out_pa, _OUT)
            except BaseException as exc:
                pool.append(page)
                if isinstance(exc, GuestFault):
                    raise DriverError(errno.EINVAL, exc.detail) from None
                raise
            pinned = vm.pinned + pages
            if pinned >= vm.limits.pinned_pages:
                ram.unpin_smc(page)
                pool.append(page)
                vm.stats["limit:pinned_pages"] += 1
                vm.results[Result.ERROR_KMEM] += 1
                return (0, _KMEM, 0, 0)
            vm.pinned = pinned
            if pinned > vm.pinned_peak:  # noqa: PLR1730 - (no max() call on this path)
                vm.pinned_peak = pinned
            vm.pins[page] = pages
            vm.calls += 1
        finally:
            lock.release()
        page.call = (vm, out_pa, on_return)
        result: int | None = None
        dirty = True  # the outbound page needs zeroing before its next call
        try:
            shadow_in = page.inbuf
            try:
                ram.copy_into(
                    shadow_in, in_pa, in_size
                )  # THE copy: nothing below reads guest input
            except BufferError:  # a view of the last shadow outlived its call: use a new one
                shadow_in = self.channel.renew_inbuf(page)
                ram.copy_into(shadow_in, in_pa, in_size)
            counts = _U32.unpack_from(shadow_in, 8)[0] if in_size >= 12 else -1
            layout = _layout(shadow_in, counts) if counts else _NO_OUTPUTS
            if layout is None:  # no header, or a malformed counts word: not forwarded
                result = Result.ERROR_INVALID
                return (0, Result.ERROR_INVALID, 0, 0)
            a0, a1, _a2, _a3 = self.channel.invoke(vm.client_id, page)
            if _stopping(vm):
                result = Result.ERROR_DEFUNCT
                return _DEFUNCT_REGS
            if a1:  # QTEE's error: nothing of the message comes back
                result = a1 - 0x1_0000_0000 if a1 & 0x8000_0000 else a1
            else:
                result = 0
                if layout[0] or layout[3]:
                    _write_back(ram.view(in_pa, in_size), shadow_in, layout)
            out = page.buf
            if vm.mappings or vm.refused_ns:
                self._async(vm, out, 0)
            if page.callbacks or _U32.unpack_from(out, 0)[0]:
                ram.write(out_pa, out)
            else:
                dirty = False
            return (a0, a1, 0, 0)
        finally:
            if dirty:
                page.buf[:] = _ZERO_PAGE
            page.call = None
            lock.acquire()
            try:
                if vm.pins.pop(page, None) is not None:  # None: a destroy dropped them
                    ram.unpin_smc(page)
                    vm.pinned -= pages
                vm.calls -= 1
                if result is None:
                    vm.stats["smc_errors"] += 1
                elif result:
                    vm.stats["failed"] += 1
                    vm.results[result] += 1
                else:
                    vm.ok += 1
                if page.callbacks:
                    vm.stats["callbacks"] += page.callbacks
                    page.callbacks = 0
                if _stopping(vm):  # the VM is going: this page's lend ends with its call
                    self.channel.release([page])
                    vm.cond.notify_all()  # relinquish waits for the calls to drain
                else:
                    pool.append(page)
            finally:
                lock.release()

    @staticmethod
    def _other(fid: int) -> Regs:
        if fid in _RSP_FIDS:
            raise DriverError(errno.EINVAL, "CB_RSP with no callback request pending")
        if fid in _VM_FIDS:
            return (SmcReturn.ENOTAVAIL, 0, 0, 0)
        return (SmcReturn.UNKNOWN_FUNCTION, 0, 0, 0)

    # ------------------------------------------------------------------ callbacks
    def _upcall(self, page: ShadowPage) -> None:
        """One callback request QTEE wrote into the call's shadow page: let the guest
        serve it and write back into the shadow only what the protocol lets the kernel
        answer."""
        call: tuple[VmState, int, OnReturn | None] = page.call  # type: ignore[assignment]
        vm, out_pa, on_return = call
        shadow_out = page.buf
        gout = vm.guest.ram.view(out_pa, _OUT)
        if vm.stopping:
            _U32.pack_into(shadow_out, 0, _DEFUNCT)
            return
        try:
            cb = wire.decode_callback(shadow_out)
        except DecodeError:
            _U32.pack_into(shadow_out, 0, _UNAVAIL)
            return
        if on_return is None:  # a raw SMC without a callback server
            _U32.pack_into(shadow_out, 0, _UNAVAIL)
            return
        if vm.mappings or vm.refused_ns:
            self._async(vm, shadow_out, cb.size)
        gout[:] = shadow_out
        # The guest serves it.  If its kernel raises instead, the exception unwinds to the
        # monitor, which takes the call as abandoned (QTEE sees DEFUNCT) and re-raises it
        # to the guest once QTEE is done, as for a host caller.
        rsp = on_return(_CALLBACK_REGS)
        if _stopping(vm):  # destroyed while the guest served: its answer is not used
            _U32.pack_into(shadow_out, 0, _DEFUNCT)
            return
        if len(rsp) < 3 or rsp[0] not in _RSP_FIDS or rsp[1] != out_pa or rsp[2] != _OUT:
            self._refuse(vm, cb, gout, shadow_out, _UNAVAIL)
            return
        self._answer(vm, cb, gout, shadow_out)

    def _answer(
        self, vm: VmState, cb: wire.CallbackMsg, gout: memoryview, shadow_out: bytearray
    ) -> None:
        raw = _U32.unpack_from(gout, 0)[0]
        if raw:
            wire.write_callback_response(shadow_out, cb, raw - 0x1_0000_0000 if raw >> 31 else raw)
            return
        nib = len(cb.ib)
        nob = len(cb.ob)
        ob: list[bytes] = []
        for k, ref in enumerate(cb.ob):
            size = _U32.unpack_from(gout, 16 + 8 * (nib + k) + 4)[0]
            if size > ref.size:  # shrink only (qtee-kernel.md §3.4)
                self._refuse(vm, cb, gout, shadow_out, _UNAVAIL)
                return
            ob.append(bytes(gout[ref.offset : ref.offset + size]))
        first = 16 + 8 * (nib + nob + len(cb.io))
        oo = [_U32.unpack_from(gout, first + 8 * k)[0] for k in range(cb.n_oo)]
        op = cb.op & _OP_MASK
        if cb.cxt == _PRIMORDIAL and op == _MAP_REGION:
            refused = self._map_region(vm, ob, oo)
            if refused:
                self._refuse(vm, cb, gout, shadow_out, refused)
                return
        elif op == _OP_RELEASE and cb.cxt in vm.mappings:
            self._unmap(vm, cb.cxt)
        wire.write_callback_response(shadow_out, cb, 0, ob, oo)

    def _refuse(
        self, vm: VmState, cb: wire.CallbackMsg, gout: memoryview, shadow_out: bytearray, res: int
    ) -> None:
        """Answer QTEE ``res`` instead of the guest's success: the NS ids the guest put in
        its OO slots never reach QTEE, so they go back to the guest as an async RELEASE
        (the QTEE analogue of Xen's own SHM_FREE RPC, optee.md §6.2)."""
        if not _U32.unpack_from(gout, 0)[0] and cb.n_oo:
            first = 16 + 8 * (len(cb.ib) + len(cb.ob) + len(cb.io))
            ids = [_U32.unpack_from(gout, first + 8 * k)[0] for k in range(cb.n_oo)]
            with vm.lock:
                vm.refused_ns.extend(i for i in ids if i >= _NS_FIRST)
        wire.write_callback_response(shadow_out, cb, res - 0x1_0000_0000 if res >> 31 else res)

    def _map_region(self, vm: VmState, ob: list[bytes], oo: list[int]) -> int:
        """Check, pin and translate a MAP_REGION answer in place; 0 or the u32 result."""
        if len(ob) != 1 or len(ob[0]) != _REGION.size or len(oo) != 1 or oo[0] < _NS_FIRST:
            return _UNAVAIL
        gpa, length, perms = _REGION.unpack(ob[0])
        ram = vm.guest.ram
        limits = vm.limits
        try:
            hpa = ram.translate(gpa, length)
        except GuestFault:
            with vm.lock:
                vm.stats["refused:map_outside_ram"] += 1
            return _UNAVAIL
        pages = ((gpa & _PAGE_MASK) + length + _PAGE_MASK) // PAGE_SIZE
        with vm.lock:
            if vm.stopping:
                return _DEFUNCT
            if pages > limits.shm_buffer_pages:
                vm.stats["limit:shm_buffer_pages"] += 1
                return _KMEM
            if len(vm.mappings) >= limits.shm_buffers:
                vm.stats["limit:shm_buffers"] += 1
                return _KMEM
            if oo[0] in vm.mappings:
                return _UNAVAIL
            pin = vm.pin_locked(gpa, length)
            if pin is None:
                return _KMEM
            vm.mappings[oo[0]] = pin
        ob[0] = _REGION.pack(hpa, length, perms)
        return 0

    def _unmap(self, vm: VmState, ns_id: int) -> None:
        with vm.lock:
            pin = vm.mappings.pop(ns_id, None)
            if pin is not None:
                vm.unpin_locked(pin)

    def _async(self, vm: VmState, out: bytearray, offset: int) -> None:
        """The async region of ``out`` from ``offset``: unpin the mappings QTEE released,
        and append the NS ids to give back to the guest (qtee-kernel.md §3.5)."""
        end = offset
        if len(out) - offset > 8 and _U32.unpack_from(out, offset)[0]:
            try:
                batch = wire.decode_async(out, offset)
            except DecodeError:
                batch = wire.AsyncBatch((), wire.ASYNC_STOP_END)
            for ids in batch.releases:
                end += wire.align8(12 + 4 * len(ids))
                for ident in ids:
                    if ident in vm.mappings:
                        self._unmap(vm, ident)
        if not vm.refused_ns:
            return
        room = (len(out) - end - 12) // 4
        if room <= 0:
            return
        with vm.lock:
            back, vm.refused_ns[:] = vm.refused_ns[:room], vm.refused_ns[room:]
        if back:
            wire.write_async(out, end, [wire.encode_async_release(back)])


def _layout(shadow: bytearray, counts: int) -> tuple[tuple[int, ...], int, int, int] | None:
    """Where QTEE's answer goes in an inbound message (qtee-kernel.md §3.2-§3.4): the OB
    arg words (offset, size, ...), #IB, the first OO slot and #OO; None when the counts
    word is malformed (or -1: no header) or the arg words do not fit.  The rest is QTEE's
    to check (it answers ERROR_INVALID for a malformed message)."""
    if counts >> 16 or counts < 0:
        return None
    nib = counts & 0xF
    nob = counts >> 4 & 0xF
    first_oo = 12 + 8 * (nib + nob + (counts >> 8 & 0xF))
    noo = counts >> 12
    if first_oo + 8 * noo > len(shadow):
        return None
    obs = _ARGS[nob].unpack_from(shadow, 12 + 8 * nib) if nob else ()
    return obs, nib, first_oo, noo


def _write_back(
    gin: memoryview, shadow: bytearray, layout: tuple[tuple[int, ...], int, int, int]
) -> None:
    """Copy into the guest's inbound page only what QTEE answers (qtee-kernel.md §3.4):
    each OB's size (at most what was asked) and payload, each OO id."""
    obs, nib, first_oo, noo = layout
    end = len(shadow)
    for k in range(0, len(obs), 2):
        off = obs[k]
        at = 16 + 8 * nib + 4 * k  # the size word of OB k/2
        size = min(_U32.unpack_from(shadow, at)[0], obs[k + 1], max(0, end - off))
        _U32.pack_into(gin, at, size)
        gin[off : off + size] = shadow[off : off + size]
    for at in range(first_oo, first_oo + 8 * noo, 8):
        gin[at : at + 4] = shadow[at : at + 4]
