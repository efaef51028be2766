"""The lifecycle of a VM partition as the mediator sees it, as one table (optee.md §6).

A VM is CREATING while the backend announces it to the TEE (``VM_CREATED``) and its guest
gets a TEE driver; then RUNNING, in the VMM's table of live VMs.  A destroy makes it
DESTROYING (a second destroy is refused); the backend's relinquish makes it STOPPING --
its calls in flight fail (DEFUNCT) and it pins nothing more -- and once its pins, guest
state, RAM and id are gone it is DESTROYED, final.  A creation the TEE refused or that
failed half way (its relinquish makes it STOPPING) ends DESTROYED too, keeping nothing.

Every move is in :data:`VM_STATES`; :meth:`~qtee._statetable.StateTable.move` gives the
next state or raises :class:`~qtee._statetable.IllegalTransition` -- the caller changes
nothing then.
"""

from __future__ import annotations

import enum
from typing import Final

from qtee._statetable import StateTable

__all__ = ["VM_STATES", "VmEvent", "VmPhase"]


class VmPhase(enum.Enum):
    """A VM partition's state in the mediator."""

    CREATING = "creating"
    RUNNING = "running"
    DESTROYING = "destroying"
    STOPPING = "stopping"
    DESTROYED = "destroyed"


class VmEvent(enum.Enum):
    """What moves a VM."""

    #: The backend announced it and its guest has a TEE driver: it is live.
    CREATED = "created"
    #: :meth:`~qtee.vm.Vmm.destroy_vm` began.
    DESTROY = "destroy"
    #: The backend fails its calls from now on (relinquish).
    STOP = "stop"
    #: Everything of it is gone (destroyed, or its creation undone).
    GONE = "gone"


VM_STATES: Final = StateTable.parse(
    "VM partition",
    VmPhase,
    VmEvent,
    """
    CREATING:   CREATED -> RUNNING, STOP -> STOPPING, GONE -> DESTROYED
    RUNNING:    DESTROY -> DESTROYING
    DESTROYING: STOP -> STOPPING, GONE -> DESTROYED
    STOPPING:   GONE -> DESTROYED
    """,
)
