"""A guest: its RAM, its TEE driver instance, and the SMC instruction that traps to the VMM.

A guest runs its **own** driver model (its own IDRs, NS ids, shm ids, request queues and
primordial object) over guest RAM, and unchanged ``qtee.Client`` / ``WorkerPool`` /
``supplicant.Supplicant`` code on top, because all they need is a device.  Its SMCs do
not reach the secure world: :meth:`Guest.smc` is the trap to the VMM, the way KVM hands
guest SMCs to userspace (optee.md §6.3).  The guest's a7 is dropped: the VMM supplies the
client id, as a hypervisor must (optee.md §6.1).
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Protocol

from objects import DriverError
from qtee._smc import SmcConduit, SmcReturn

if TYPE_CHECKING:
    from qtee._smc import OnReturn, Regs, SmcArgs
    from qtee.vm._framework import VmState
    from qtee.vm._ram import GuestRam

__all__ = ["Guest", "GuestTee", "SmcHandler", "TeeKind"]

_UNKNOWN: Final = (int(SmcReturn.UNKNOWN_FUNCTION), 0, 0, 0)


class TeeKind(enum.StrEnum):
    """Which TEE a VM gets, decided per VM by the toolstack (``tee=`` of xl.cfg)."""

    NONE = "none"
    QTEE = "qtee"
    OPTEE = "optee"


#: A backend's :meth:`~qtee.vm.TeeBackend.handle_smc`, bound: ``(vm, args, on_return) ->
#: regs``, one trapped guest SMC (the guest's a7 is ignored).
SmcHandler = Callable[["VmState", "SmcArgs", "OnReturn | None"], "Regs"]


class GuestTee(Protocol):
    """The guest kernel's TEE driver instance, as its backend built it."""

    @property
    def device(self) -> Any:
        """The device the guest's userspace opens (``qtee.Device`` for QTEE)."""

    def freeze(self) -> None:
        """The guest's vCPUs stopped: pending callbacks fail, blocked receivers wake."""

    def discard(self) -> None:
        """The guest kernel's state goes: every context closed, every table empty."""


class Guest(SmcConduit):
    """One VM as the VMM runs it.  Built by :meth:`qtee.vm.Vmm.create_vm`."""

    __slots__ = ("_handle", "_tee", "_vm", "client_id", "name", "ram", "running", "tee", "vm_id")

    def __init__(
        self, *, vm_id: int, name: str, client_id: int, tee: TeeKind, ram: GuestRam
    ) -> None:
        self.vm_id = vm_id
        self.name = name
        self.client_id = client_id
        self.tee = tee
        self.ram = ram
        self.running = True
        self._vm: VmState | None = None
        self._handle: SmcHandler | None = None
        self._tee: GuestTee | None = None

    def _attach(self, vm: VmState, handle: SmcHandler, tee: GuestTee) -> None:
        """Wire the trap to a backend and install the guest's TEE driver (by the VMM)."""
        self._vm = vm
        self._handle = handle
        self._tee = tee

    @property
    def device(self) -> Any:
        """The guest's TEE device, or None: a VM with ``tee="none"`` has no TEE device."""
        return None if self._tee is None else self._tee.device

    def _smc(self, args: SmcArgs, on_return: OnReturn | None) -> Regs:
        """The guest's SMC instruction: traps to the VMM, which answers with a0..a3.

        ``a7`` is ignored (the VMM puts the VM's client id there).  A VM without a TEE
        answers SMCCC "unknown function"; a stopped VM never reaches the VMM (ENODEV).
        """
        if not self.running:
            raise DriverError(errno.ENODEV, f"VM {self.name} is stopped")
        handle = self._handle
        if handle is None:
            return _UNKNOWN  # no TEE for this VM
        return handle(self._vm, args, on_return)  # type: ignore[arg-type]

    def stop(self) -> None:
        """Stop the vCPUs: no further SMC traps, and the guest kernel's TEE driver is frozen
        (pending callbacks finish DEFUNCT for QTEE, blocked SUPPL_RECVs return EINTR)."""
        self.running = False
        if self._tee is not None:
            self._tee.freeze()

    def discard(self) -> None:
        """After destroy: the guest kernel's TEE state goes (its device's tables empty)."""
        if self.running:
            raise DriverError(errno.EBUSY, f"VM {self.name} must be stopped before discard")
        if self._tee is not None:
            self._tee.discard()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Guest {self.name} vm {self.vm_id} client {self.client_id} tee={self.tee} {state}>"
