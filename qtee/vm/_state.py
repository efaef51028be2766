"""What the mediator keeps per VM: its limits, its state, and the error of a refused VM.

:class:`VmLimits` are Xen's OP-TEE mediator figures by default (optee.md §6.2);
:class:`VmState` holds a VM's calls in flight, pins and mappings, guarded by one lock,
accounts pins against the limits and moves its :class:`~qtee.vm._phase.VmPhase` through
the one table (``_phase``); :class:`VmError` is a VM creation the VMM or the
TEE refused.  TEE-agnostic: both backends use them.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from objects import DriverError, UsageError
from qtee.vm._phase import VM_STATES, VmEvent, VmPhase

if TYPE_CHECKING:
    from qtee.vm._guest import Guest
    from qtee.vm._ram import GuestRam, Pin

__all__ = ["VmError", "VmLimits", "VmState"]


@dataclass(frozen=True, slots=True, kw_only=True)
class VmLimits:
    """Per-VM limits; the defaults are Xen's OP-TEE mediator figures (optee.md §6.2).

    ``max_calls`` None means the TEE's thread count (the backend asks the TEE).  Pinned
    pages must stay *below* ``pinned_pages`` ("fewer than 16384 in total").
    """

    max_calls: int | None = None
    shm_buffers: int = 16  # MAX_SHM_BUFFER_COUNT
    shm_buffer_pages: int = 129  # MAX_SHM_BUFFER_PG
    pinned_pages: int = 16384  # MAX_TOTAL_SMH_BUF_PG

    def __post_init__(self) -> None:
        for name in ("shm_buffers", "shm_buffer_pages", "pinned_pages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"VmLimits.{name} must be an int >= 1, not {value!r}")
        mc = self.max_calls
        if mc is not None and (not isinstance(mc, int) or isinstance(mc, bool) or mc < 1):
            raise UsageError(f"VmLimits.max_calls must be None or an int >= 1, not {mc!r}")


class VmError(DriverError):
    """A VM could not be created (or given a TEE): errno plus a clear message.

    ``tee_status`` is the TEE's SMC return code when the TEE refused (e.g. ENOTAVAIL 7).
    """

    def __init__(self, code: int, detail: str = "", *, tee_status: int | None = None) -> None:
        super().__init__(code, detail)
        self.tee_status = tee_status

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_vm_error, (self.code, self.detail, self.tee_status))


def _rebuild_vm_error(code: int, detail: str, tee_status: int | None) -> VmError:
    return VmError(code, detail, tee_status=tee_status)


class VmState:
    """What the mediator keeps per VM: its calls in flight, pins, mappings, counters.

    ``lock`` guards every field (``cond`` is a condition on that same lock, for waiting
    until the calls drain); ``calls`` counts direct calls in flight (callbacks take
    no slot).  ``phase`` is its place in :data:`~qtee.vm._phase.VM_STATES`, changed only
    by :meth:`move`; ``stopping`` (read on every call) is set when it reaches STOPPING.
    Pins are accounted here against :class:`VmLimits` (``pinned`` pages now,
    ``pinned_peak`` the most at once); ``pins`` holds the pins of calls in flight,
    ``mappings`` the long-lived ones (QTEE: MAP_REGION by mapping NS id; OP-TEE:
    registered shm by cookie); ``pages`` the outbound shadow pages free for its next
    calls (lent to the TEE from call to call, released at destroy).  ``refused_ns`` are
    NS ids the guest believes the TEE holds but the TEE never saw (to be released back
    to the guest).  ``data`` is the backend's.
    """

    __slots__ = (
        "calls",
        "client_id",
        "cond",
        "data",
        "guest",
        "limits",
        "lock",
        "mappings",
        "max_calls",
        "ok",
        "pages",
        "phase",
        "pinned",
        "pinned_peak",
        "pins",
        "refused_ns",
        "results",
        "stats",
        "stopping",
    )

    def __init__(self, guest: Guest, limits: VmLimits) -> None:
        self.guest = guest
        self.client_id = guest.client_id
        self.limits = limits
        #: Concurrent direct calls allowed (the backend resolves None to the TEE's threads).
        self.max_calls = limits.max_calls or 0
        self.calls = 0
        self.pins: dict[object, int] = {}  # pages of a call's GuestRam.pin_smc, by its key
        self.mappings: dict[int, Pin] = {}
        self.refused_ns: list[int] = []
        #: The VMM's outbound shadow pages kept lent for this VM's calls (the backend's).
        self.pages: list[Any] = []
        self.phase = VmPhase.CREATING
        self.stopping = False  # phase reached STOPPING: no more pins, calls fail
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.pinned = 0
        self.pinned_peak = 0
        #: Calls that returned success (result 0); ``results`` counts the other results.
        self.ok = 0
        self.stats: collections.Counter[str] = collections.Counter()
        self.results: collections.Counter[int] = collections.Counter()
        self.data: dict[str, Any] = {}

    def move(self, event: VmEvent) -> None:
        """Move through :data:`~qtee.vm._phase.VM_STATES` (an illegal move raises and
        changes nothing); call it holding :attr:`lock`."""
        phase = VM_STATES.move(self.phase, event)
        self.phase = phase
        if phase is VmPhase.STOPPING:
            self.stopping = True

    @property
    def ram(self) -> GuestRam:
        """The VM's RAM."""
        return self.guest.ram

    def pin(self, gpa: int, n: int) -> Pin | None:
        """Pin ``[gpa, gpa+n)`` for the VM; None when the VM is stopping or its pinned pages
        would reach :attr:`VmLimits.pinned_pages` (counted as ``limit:pinned_pages``).  A
        range outside guest RAM raises :class:`~qtee.vm.GuestFault`.  Store the pin in
        :attr:`pins` or :attr:`mappings` (under :attr:`lock`); give it back with :meth:`unpin`."""
        with self.lock:
            return None if self.stopping else self.pin_locked(gpa, n)

    def pin_locked(self, gpa: int, n: int) -> Pin | None:
        """:meth:`pin` for a caller already holding :attr:`lock` (and checking ``stopping``)."""
        ram = self.guest.ram
        pin = ram.pin(gpa, n)
        if self.pinned + pin.pages >= self.limits.pinned_pages:
            self.stats["limit:pinned_pages"] += 1
            ram.unpin(pin)
            return None
        self.pinned += pin.pages
        self.pinned_peak = max(self.pinned_peak, self.pinned)
        return pin

    def unpin(self, pin: Pin) -> None:
        """Give back a pin :meth:`pin` took (already removed from ``pins``/``mappings``)."""
        with self.lock:
            self.unpin_locked(pin)

    def unpin_locked(self, pin: Pin) -> None:
        """:meth:`unpin` for a caller already holding :attr:`lock`."""
        self.guest.ram.unpin(pin)
        self.pinned -= pin.pages

    def wait_for_calls(self, deadline: float) -> int:
        """Wait until no direct call is in flight or the monotonic ``deadline`` passes
        (calls leaving a stopping VM notify :attr:`cond`); the calls still in flight."""
        with self.cond:
            while self.calls:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            return self.calls

    def unpin_all(self) -> int:
        """Drop every pin of the VM (destroy); the number of pages they held."""
        ram = self.guest.ram
        with self.lock:
            calls = list(self.pins.items())
            held = list(self.mappings.values())
            self.pins.clear()
            self.mappings.clear()
            pages = 0
            for key, n in calls:
                ram.unpin_smc(key)
                pages += n
            for pin in held:
                ram.unpin(pin)
                pages += pin.pages
            self.pinned -= pages
        return pages

    def __repr__(self) -> str:
        return (
            f"<VmState {self.guest.name} client {self.client_id} calls={self.calls} "
            f"pinned={self.pinned} mappings={len(self.mappings)} stopping={self.stopping}>"
        )
