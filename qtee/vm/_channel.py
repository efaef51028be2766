"""The host TEE driver's VM primitive: what a VMM asks of the host driver.

Seed 001 (Zyngier): the VMM translates guest addresses itself, and the host TEE driver
"must know about VMs" -- it sends the VM lifecycle calls and the VM's calls with the
VM's client id in a7, and does VA -> PA and pinning for the VMM's buffers as for any
process.  Here that is :class:`HostVmChannel`: the VMM hands it its shadow buffers (VMM
memory), the host driver places them in host-physical memory (``PhysMemory.lend``, an
alias on the host, no copy) and issues the SMCs.  Nothing here knows QTEE's message
format; the QTEE backend does the checking.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from qtee._smc import HYP_CLIENT_ID, Regs, SmcFid

if TYPE_CHECKING:
    from qtee.secure._monitor import SecureMonitor

__all__ = ["HostVmChannel", "Upcall"]

#: Called for each callback request (response type 3) of a VM call, on the caller's thread;
#: the shadow outbound buffer holds the request and gets the answer in place.
Upcall = Callable[[Regs], object]

_OUT_SIZE: Final = 4096


class HostVmChannel:
    """VM calls through the host driver to the secure monitor (a7 = client id)."""

    __slots__ = ("_invoke_fid", "_rsp_fid", "monitor")

    def __init__(self, monitor: SecureMonitor) -> None:
        if not callable(getattr(monitor, "smc", None)) or getattr(monitor, "phys", None) is None:
            raise TypeError(
                f"HostVmChannel needs a secure monitor (smc and phys), not {type(monitor).__name__}"
            )
        self.monitor = monitor
        self._invoke_fid = int(SmcFid.QCOM_SCM_SMCINVOKE_INVOKE)
        self._rsp_fid = int(SmcFid.QCOM_SCM_SMCINVOKE_CB_RSP)

    def vm_created(self, fid: int, client_id: int) -> int:
        """Announce a VM (a1 = client id, a7 = 0: only the hypervisor may); a0 of the answer."""
        return self.monitor.smc(int(fid), client_id, a7=HYP_CLIENT_ID)[0]

    def vm_destroyed(self, fid: int, client_id: int) -> int:
        """Announce a VM's end (its vCPUs are already stopped); a0 of the answer."""
        return self.monitor.smc(int(fid), client_id, a7=HYP_CLIENT_ID)[0]

    def invoke(
        self, client_id: int, shadow_in: bytearray, shadow_out: bytearray, upcall: Upcall
    ) -> Regs:
        """INVOKE for VM ``client_id`` on the VMM's shadow buffers; the final a0..a3.

        ``upcall`` runs for every callback request; the channel answers each with
        CB_RSP on the same outbound buffer.  A failing SMC raises ``DriverError``.
        """
        phys = self.monitor.phys
        out_size = len(shadow_out)
        in_pa = phys.lend(shadow_in)
        try:
            out_pa = phys.lend(shadow_out)
        except BaseException:
            phys.take_back(in_pa)
            raise
        rsp = (self._rsp_fid, out_pa, out_size)

        def on_return(regs: Regs) -> tuple[int, int, int]:
            upcall(regs)
            return rsp

        try:
            return self.monitor.smc(
                self._invoke_fid,
                in_pa,
                len(shadow_in),
                out_pa,
                out_size,
                0,
                0,
                client_id,
                on_return=on_return,
            )
        finally:
            phys.take_back(out_pa)
            phys.take_back(in_pa)
