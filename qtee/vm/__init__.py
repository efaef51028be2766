"""Guests and the userspace TEE mediator (the VMM side), over the same object model.

The design of seed 001 (the KVM review): KVM only forwards guest SMCs to userspace, and
the **VMM** mediates -- "just another piece of userspace using the TEE".  Here:

* a :class:`Guest` has its own RAM (:class:`GuestRam`, guest-physical addresses) and runs
  its own driver model with unchanged client and supplicant code; its SMCs trap to the VMM;
* the :class:`Vmm` is the TEE-agnostic mediator core: VM lifecycle (``tee`` per VM:
  ``none``, ``qtee``, ``optee``), per-VM state and :class:`VmLimits`, and backends
  registered with :func:`register_backend` and probed at start (a backend that finds no
  TEE leaves guests without one, quietly);
* the QTEE backend checks, pins and shadow-copies each guest call and forwards it through
  the host driver's VM primitive (:class:`HostVmChannel`) with the VM's client id; the
  OP-TEE backend does the same for a guest's OP-TEE messages (its guest device is a
  :class:`GuestOpteeDevice`).

Build a :class:`~qtee.secure.SecureMonitor`, a ``Vmm(monitor)``, then
``vmm.create_vm("vm1", tee="qtee")``; ``guest.device`` is the guest's ``qtee.Device``.
"""

from objects import publish_errors as _publish_errors
from qtee.vm import _framework
from qtee.vm import _optee_backend as _optee_backend
from qtee.vm import _qtee_backend as _qtee_backend
from qtee.vm._channel import HostVmChannel, ShadowPage, Upcall
from qtee.vm._framework import *  # noqa: F403  (the mediator core: its __all__)
from qtee.vm._guest import Guest, GuestTee, TeeKind
from qtee.vm._guest_optee import GuestOpteeDevice
from qtee.vm._optee_backend import OpteeBackend, OpteeGuestTee
from qtee.vm._qtee_backend import QteeBackend, QteeGuestTee
from qtee.vm._ram import GUEST_RAM_BASE, PAGE_SIZE, GuestFault, GuestRam, Pin

__all__ = [
    "GUEST_RAM_BASE",
    "PAGE_SIZE",
    "Guest",
    "GuestFault",
    "GuestOpteeDevice",
    "GuestRam",
    "GuestTee",
    "HostVmChannel",
    "ShadowPage",
    "OpteeBackend",
    "OpteeGuestTee",
    "Pin",
    "QteeBackend",
    "QteeGuestTee",
    "TeeKind",
    "Upcall",
]
__all__ += _framework.__all__

_publish_errors("qtee.vm", globals(), __all__)
