"""The host TEE driver's VM primitive: what a VMM asks of the host driver.

Seed 001 (Zyngier): the VMM translates guest addresses itself, and the host TEE driver
"must know about VMs" -- it sends the VM lifecycle calls and the VM's calls with the
VM's client id in a7, and does VA -> PA and pinning for the VMM's buffers as for any
process.  Here that is :class:`HostVmChannel`: the VMM hands it its shadow buffers (VMM
memory), the host driver places them in host-physical memory (``PhysMemory.lend``, an
alias on the host, no copy) and issues the SMCs.  The shadows are the two buffers of
a :class:`ShadowPage`, which the VMM keeps registered (lent) from call to call, as the
kernel keeps its outbound pool pages.  Nothing here knows QTEE's message format; the QTEE
backend does the checking.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from qtee._smc import HYP_CLIENT_ID, Regs, SmcFid

if TYPE_CHECKING:
    from qtee._qcomtee.shm import PhysMemory
    from qtee.secure._monitor import SecureMonitor

__all__ = ["HostVmChannel", "ShadowPage", "Upcall"]

#: Called for each callback request (response type 3) of a VM call, on the caller's thread,
#: with the call's page: its ``buf`` holds the request and gets the answer in place.
Upcall = Callable[["ShadowPage"], object]

_OUT_SIZE: Final = 4096
_CB_RSP: Final = int(SmcFid.QCOM_SCM_SMCINVOKE_CB_RSP)
_INVOKE: Final = int(SmcFid.QCOM_SCM_SMCINVOKE_INVOKE)


class ShadowPage:
    """The VMM's two buffers for one call at a time, kept lent to host-physical memory
    from call to call: ``inbuf`` (the shadow of a guest's inbound message, resized to each
    call's message; lent at ``in_pa``) and ``buf`` (4 KiB outbound, zeroed between calls;
    lent at ``pa``).  ``call`` is the VMM's context for the upcall and ``callbacks`` how
    many callback requests the current call served.  ``on_return`` is bound once, so a
    call makes no callable."""

    __slots__ = ("buf", "call", "callbacks", "in_pa", "inbuf", "on_return", "pa", "rsp", "upcall")

    def __init__(self, phys: PhysMemory, upcall: Upcall) -> None:
        self.inbuf = bytearray()
        self.buf = bytearray(_OUT_SIZE)
        self.in_pa = phys.lend(self.inbuf)
        try:
            self.pa = phys.lend(self.buf)
        except BaseException:
            phys.take_back(self.in_pa)
            raise
        self.rsp = (_CB_RSP, self.pa, _OUT_SIZE)
        self.upcall = upcall
        self.call: object = None
        self.callbacks = 0
        self.on_return = self._on_return

    def _on_return(self, _regs: Regs) -> tuple[int, int, int]:
        """A type-3 return: the VMM serves the request in ``buf``, then CB_RSP on it."""
        self.callbacks += 1
        self.upcall(self)
        return self.rsp


class HostVmChannel:
    """VM calls through the host driver to the secure monitor (a7 = client id).

    ``upcall`` serves the callback requests of :meth:`invoke` (the QTEE backend's)."""

    __slots__ = ("monitor", "upcall")

    def __init__(self, monitor: SecureMonitor, upcall: Upcall | None = None) -> None:
        if not callable(getattr(monitor, "smc", None)) or getattr(monitor, "phys", None) is None:
            raise TypeError(
                f"HostVmChannel needs a secure monitor (smc and phys), not {type(monitor).__name__}"
            )
        if upcall is not None and not callable(upcall):
            raise TypeError("upcall must be callable")
        self.monitor = monitor
        self.upcall = upcall

    def vm_created(self, fid: int, client_id: int) -> int:
        """Announce a VM (a1 = client id, a7 = 0: only the hypervisor may); a0 of the answer."""
        return self.monitor.smc(int(fid), client_id, a7=HYP_CLIENT_ID)[0]

    def vm_destroyed(self, fid: int, client_id: int) -> int:
        """Announce a VM's end (its vCPUs are already stopped); a0 of the answer."""
        return self.monitor.smc(int(fid), client_id, a7=HYP_CLIENT_ID)[0]

    def page(self) -> ShadowPage:
        """A new shadow page for a VM's pool, its two buffers lent until :meth:`release`."""
        if self.upcall is None:
            raise TypeError("this channel was made without an upcall for callbacks")
        return ShadowPage(self.monitor.phys, self.upcall)

    def renew_inbuf(self, page: ShadowPage) -> bytearray:
        """Give ``page`` a new inbound shadow (its old one cannot be resized: a view of it
        outlived its call) and lend it in place of the old; the new buffer."""
        phys = self.monitor.phys
        fresh = bytearray()
        in_pa = phys.lend(fresh)
        phys.take_back(page.in_pa)
        page.inbuf, page.in_pa = fresh, in_pa
        return fresh

    def release(self, pool: list[ShadowPage]) -> int:
        """End the lends of every page in ``pool`` (a VM's once it stopped, or a page
        whose call ends after that); how many."""
        phys = self.monitor.phys
        n = 0
        while pool:
            page = pool.pop()
            phys.take_back(page.in_pa)
            phys.take_back(page.pa)
            n += 1
        return n

    def invoke(self, client_id: int, page: ShadowPage) -> Regs:
        """INVOKE for VM ``client_id`` on ``page``: its ``inbuf`` as the inbound message,
        its ``buf`` as the outbound buffer; the final a0..a3.

        The channel's ``upcall`` runs for every callback request, and each is answered
        with CB_RSP on the same page.  A failing SMC raises ``DriverError``.
        """
        return self.monitor.smc(
            _INVOKE,
            page.in_pa,
            len(page.inbuf),
            page.pa,
            _OUT_SIZE,
            0,
            0,
            client_id,
            on_return=page.on_return,
        )
