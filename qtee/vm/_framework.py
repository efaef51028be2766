"""The TEE-agnostic mediator core: VM lifecycle and the backend registry (per-VM state: ``_state``).

Backends register under a TEE name (``@register_backend("qtee")``, as Xen's
``REGISTER_TEE_MEDIATOR``) and are probed once when a :class:`Vmm` is built.  A backend
that finds no TEE is left out quietly: a VM asking for it fails with ENODEV, and a VM with
``tee="none"`` never touches a backend and logs nothing (seed 002: no TEE is a valid
configuration, not worth a warning).

Lifecycle (optee.md §6.1 hypervisor duties, §6.2 Xen):

* :meth:`Vmm.create_vm` gives the VM an id and a client id (``vm_id``, never 0: 0 is the
  hypervisor), its RAM, and -- with a TEE -- announces it (VM_CREATED).  A refusal (guest
  limit) is :class:`VmError` and nothing is kept: no RAM, no id, no row, id cursor as it was.
* :meth:`Vmm.destroy_vm` stops the vCPUs first, lets the backend fail the VM's calls in
  flight and announce the end (VM_DESTROYED), drops every pin, then discards the guest
  kernel's TEE state and frees the RAM and the id.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Final, Protocol, TypeVar

from objects import CyclicAllocator, UsageError
from qtee.vm._guest import Guest, GuestTee, TeeKind
from qtee.vm._phase import VmEvent, VmPhase
from qtee.vm._ram import PAGE_SIZE, GuestRam
from qtee.vm._state import VmError, VmLimits, VmState

if TYPE_CHECKING:
    from qtee._smc import OnReturn, Regs, SmcArgs
    from qtee.secure._monitor import SecureMonitor

__all__ = [
    "DestroyReport",
    "TeeBackend",
    "VmError",
    "VmLimits",
    "VmRow",
    "VmState",
    "Vmm",
    "register_backend",
    "registered_backends",
]

log = logging.getLogger("qtee.vm")

#: VM ids (= client ids) handed out cyclically, so an id whose stale calls outlived a
#: destroy is not soon reused; 0 is the hypervisor's and 0xFFFF stays unused.
VM_ID_MIN: Final = 1
VM_ID_MAX: Final = 0xFFFE


class TeeBackend(Protocol):
    """A TEE mediator backend; built as ``cls(monitor)`` by the :class:`Vmm`.

    Every method but :meth:`probe` is called only for VMs of this backend's TEE.
    """

    name: ClassVar[str]

    def probe(self) -> bool:
        """Is this TEE there, with VM support?  False leaves guests without it, quietly."""
        ...

    def domain_create(self, vm: VmState) -> None:
        """Announce the VM to the TEE (VM_CREATED) and resolve ``vm.max_calls``; a refusal
        raises :class:`VmError` and leaves nothing behind."""
        ...

    def guest_tee(self, vm: VmState) -> GuestTee:
        """Build the guest kernel's TEE driver instance, trapping to this backend."""
        ...

    def handle_smc(self, vm: VmState, args: SmcArgs, on_return: OnReturn | None) -> Regs:
        """One trapped guest SMC, ``args`` its ``(fid, a1, ..., a7)`` (on the guest's
        thread; the guest's a7 is ignored: ``vm.client_id`` is the VM's)."""
        ...

    def relinquish(self, vm: VmState, deadline: float) -> None:
        """The vCPUs are stopped: fail the calls in flight, wait for them until
        ``deadline`` (``time.monotonic()``), announce VM_DESTROYED, drop every pin."""
        ...

    def secure_objects(self, vm: VmState) -> int:
        """Objects the TEE holds in the VM's partition now (for :meth:`Vmm.rows`)."""
        ...

    def leaks(self) -> dict[str, int]:
        """The backend's own tables that still hold something."""
        ...


B = TypeVar("B")
_BACKENDS: dict[str, Callable[[SecureMonitor], TeeBackend]] = {}
_REG_LOCK = threading.Lock()


def register_backend(name: str) -> Callable[[type[B]], type[B]]:
    """Class decorator: register a :class:`TeeBackend` for TEE ``name`` (``qtee``/``optee``)."""
    if name not in (TeeKind.QTEE, TeeKind.OPTEE):
        raise UsageError(f"a backend mediates 'qtee' or 'optee', not {name!r}")

    def deco(cls: type[B]) -> type[B]:
        for method in ("probe", "domain_create", "guest_tee", "handle_smc", "relinquish"):
            if not callable(getattr(cls, method, None)):
                raise TypeError(f"backend {cls.__name__} has no {method}()")
        with _REG_LOCK:
            old = _BACKENDS.get(name)
            if old is not None and getattr(old, "__qualname__", None) != cls.__qualname__:
                raise UsageError(f"a {name} backend is already registered ({old!r})")
            _BACKENDS[name] = cls  # type: ignore[assignment]
        return cls

    return deco


def registered_backends() -> tuple[str, ...]:
    """Names of the registered backends."""
    with _REG_LOCK:
        return tuple(sorted(_BACKENDS))


@dataclass(frozen=True, slots=True, kw_only=True)
class DestroyReport:
    """What :meth:`Vmm.destroy_vm` did.

    ``seconds``: from the start of the destroy until no call of the VM was left in flight
    (or the deadline); ``stuck``: calls still running TA code at that point (they fail
    DEFUNCT when they leave); ``objects_released``: objects the TEE still held for the VM;
    ``pins_dropped``: pages the mediator unpinned.
    """

    name: str
    client_id: int
    tee: str
    seconds: float
    stuck: int
    objects_released: int
    pins_dropped: int


@dataclass(frozen=True, slots=True, kw_only=True)
class VmRow:
    """One line of the per-VM table (:meth:`Vmm.rows`)."""

    name: str
    vm_id: int
    client_id: int
    tee: str
    state: str  # "running" or "stopped" (its vCPUs), or "destroyed" (VmPhase.DESTROYED)
    calls_ok: int
    calls_failed: int
    callbacks: int
    results: tuple[tuple[int, int], ...]  # (QTEE/TEE result, count), sorted by result
    pinned_now: int
    pinned_peak: int
    mappings: int
    limit_hits: int
    secure_objects: int


def _row(vm: VmState, state: str, objects: int) -> VmRow:
    guest = vm.guest
    with vm.lock:
        ok = [(0, vm.ok)] if vm.ok else []
        return VmRow(
            name=guest.name,
            vm_id=guest.vm_id,
            client_id=vm.client_id,
            tee=str(guest.tee),
            state=state,
            calls_ok=vm.ok,
            calls_failed=vm.stats["failed"],
            callbacks=vm.stats["callbacks"],
            results=tuple(sorted([(int(k), n) for k, n in vm.results.items() if n] + ok)),
            pinned_now=vm.pinned,
            pinned_peak=vm.pinned_peak,
            mappings=len(vm.mappings),
            limit_hits=sum(n for k, n in vm.stats.items() if k.startswith("limit:")),
            secure_objects=objects,
        )


class Vmm:
    """The VMM's TEE side: VMs, their guests, and the backends that mediate their SMCs."""

    def __init__(
        self, monitor: SecureMonitor, *, backends: Sequence[str] = ("qtee", "optee")
    ) -> None:
        if isinstance(backends, str):
            raise UsageError("backends must be a sequence of names, not one string")
        names = list(backends)
        for name in names:
            if name not in (TeeKind.QTEE, TeeKind.OPTEE):
                raise UsageError(f"unknown TEE backend {name!r} (known: qtee, optee)")
        self.monitor = monitor
        self._lock = threading.Lock()
        self._ids = CyclicAllocator(VM_ID_MIN, VM_ID_MAX, name="vm ids")
        self._live: dict[int, VmState] = {}  # vm id -> state, in creation order
        self._rows: dict[int, VmRow] = {}  # serial -> row of a destroyed VM
        self._order: dict[int, int] = {}  # vm id -> serial (creation order of the rows)
        self._serial = 0
        self._backends: dict[str, TeeBackend] = {}
        self._absent: dict[str, str] = {}
        self._closed = False
        with _REG_LOCK:
            factories = {n: _BACKENDS.get(n) for n in names}
        for name, factory in factories.items():
            if factory is None:
                self._absent[name] = "no backend is registered"
                log.debug("no %s mediator: no backend is registered", name)
                continue
            backend = factory(monitor)
            if backend.probe():
                self._backends[name] = backend
            else:
                self._absent[name] = "its probe found no TEE with VM support"
                log.debug("no %s mediator: the probe found no TEE with VM support", name)

    # ------------------------------------------------------------------ queries
    def backend(self, tee: str) -> TeeBackend | None:
        """The active backend for ``tee`` (None: guests cannot have that TEE)."""
        return self._backends.get(tee)

    def guests(self) -> list[Guest]:
        """Live guests, in creation order."""
        with self._lock:
            return [vm.guest for vm in self._live.values()]

    def state(self, guest: Guest) -> VmState:
        """The mediator's state of a live guest (UsageError if not one of this VMM's)."""
        with self._lock:
            vm = self._live.get(guest.vm_id) if isinstance(guest, Guest) else None
        if vm is None or vm.guest is not guest:
            raise UsageError(f"{guest!r} is not a live VM of this VMM")
        return vm

    # ------------------------------------------------------------------ lifecycle
    def create_vm(
        self,
        name: str,
        *,
        tee: str = "none",
        ram_size: int = 64 << 20,
        limits: VmLimits | None = None,
    ) -> Guest:
        """A new VM named ``name`` with ``ram_size`` bytes of RAM and TEE ``tee``.

        ``tee="none"``: no backend is called, the guest has no TEE device, nothing is
        logged.  Otherwise the backend announces the VM; without an active backend or on
        the TEE's refusal this raises :class:`VmError` (ENODEV) and keeps nothing.
        """
        if not isinstance(name, str) or not name:
            raise UsageError(f"a VM needs a non-empty name, not {name!r}")
        try:
            kind = TeeKind(tee)
        except ValueError:
            raise UsageError(f"tee must be one of none, qtee, optee, not {tee!r}") from None
        if limits is None:
            limits = VmLimits()
        elif not isinstance(limits, VmLimits):
            raise TypeError(f"limits must be a VmLimits, not {type(limits).__name__}")
        if not isinstance(ram_size, int) or isinstance(ram_size, bool) or ram_size <= 0:
            raise UsageError(f"ram_size must be a positive int, not {ram_size!r}")
        if ram_size % PAGE_SIZE:
            raise UsageError(f"ram_size must be a multiple of {PAGE_SIZE}, not {ram_size}")
        backend: TeeBackend | None = None
        if kind is not TeeKind.NONE:
            backend = self._backends.get(kind)
            if backend is None:
                why = self._absent.get(kind, "it was not asked for when the VMM was built")
                raise VmError(errno.ENODEV, f"no {kind} mediator: {why}")
        with self._lock:
            if self._closed:
                raise UsageError("this VMM is closed")
            if any(vm.guest.name == name for vm in self._live.values()):
                raise UsageError(f"a VM named {name!r} already exists")
            cursor = self._ids.next
            vm_id = self._ids.alloc()
        ram: GuestRam | None = None
        vm: VmState | None = None
        try:
            ram = GuestRam(ram_size, self.monitor.phys)
            guest = Guest(vm_id=vm_id, name=name, client_id=vm_id, tee=kind, ram=ram)
            vm = VmState(guest, limits)
            if backend is not None:
                backend.domain_create(vm)
                try:
                    guest._attach(vm, backend.handle_smc, backend.guest_tee(vm))
                except BaseException:
                    backend.relinquish(vm, time.monotonic())
                    raise
        except BaseException:
            if vm is not None:
                with vm.lock:
                    vm.move(VmEvent.GONE)
            if ram is not None:
                ram.close()
            with self._lock:
                self._ids.free(vm_id)
                self._ids.next = cursor  # a refused creation changes nothing
            raise
        with self._lock, vm.lock:
            vm.move(VmEvent.CREATED)
            self._live[vm_id] = vm
            self._serial += 1
            self._order[vm_id] = self._serial
        if backend is not None:
            log.debug("VM %s created: client id %d, tee %s", name, vm_id, kind)
        return guest

    def destroy_vm(self, guest: Guest, *, timeout: float = 1.0) -> DestroyReport:
        """Destroy a VM: stop its vCPUs, fail its calls (within ``timeout`` seconds),
        VM_DESTROYED, drop every pin, discard the guest's TEE state, free RAM and id."""
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout < 0:
            raise UsageError(f"timeout must be a number of seconds >= 0, not {timeout!r}")
        vm = self.state(guest)
        with self._lock, vm.lock:  # every DESTROY happens under the VMM's lock
            if vm.phase is not VmPhase.RUNNING:
                raise UsageError(f"{guest!r} is already being destroyed")
            vm.move(VmEvent.DESTROY)
        start = time.monotonic()
        backend = self._backends.get(guest.tee)
        objects = pins = stuck = 0
        try:
            guest.stop()
            if backend is not None:
                objects = backend.secure_objects(vm)
                pins = vm.pinned
                backend.relinquish(vm, start + timeout)
        finally:  # whatever the backend did, the VM goes: its pins, guest state, RAM and id
            pins += vm.unpin_all()
            seconds = time.monotonic() - start
            with vm.lock:
                stuck = vm.calls
            try:
                guest.discard()
            finally:
                guest.ram.close()
                with vm.lock:
                    vm.move(VmEvent.GONE)
                row = _row(vm, vm.phase.value, 0)
                with self._lock:
                    del self._live[guest.vm_id]
                    self._rows[self._order.pop(guest.vm_id)] = row
                    self._ids.free(guest.vm_id)
        if stuck:
            log.warning(
                "VM %s destroyed with %d call(s) still in TA code; they fail DEFUNCT on leaving",
                guest.name,
                stuck,
            )
        elif backend is not None:
            log.debug("VM %s destroyed in %.3f s", guest.name, seconds)
        return DestroyReport(
            name=guest.name,
            client_id=guest.client_id,
            tee=str(guest.tee),
            seconds=seconds,
            stuck=stuck,
            objects_released=objects,
            pins_dropped=pins,
        )

    def close(self) -> None:
        """Destroy every live VM (idempotent)."""
        with self._lock:
            self._closed = True
            live = [vm.guest for vm in self._live.values() if vm.phase is VmPhase.RUNNING]
        failed: BaseException | None = None
        for guest in live:
            try:
                self.destroy_vm(guest)
            except BaseException as exc:  # the others still go
                failed = failed or exc
        if failed is not None:
            raise failed

    def __enter__(self) -> Vmm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ tables
    def rows(self) -> list[VmRow]:
        """One row per VM created (live or destroyed), in creation order."""
        with self._lock:
            live = [(self._order[i], vm) for i, vm in self._live.items()]
            rows = dict(self._rows)
        for serial, vm in live:
            backend = self._backends.get(vm.guest.tee)
            objects = backend.secure_objects(vm) if backend is not None else 0
            rows[serial] = _row(vm, "running" if vm.guest.running else "stopped", objects)
        return [rows[k] for k in sorted(rows)]

    def leaks(self) -> dict[str, int]:
        """What the VMM still holds (empty once every VM is destroyed and every call left)."""
        found: dict[str, int] = {}
        with self._lock:
            live = list(self._live.values())
        if live:
            found["live vms"] = len(live)
            found["pinned pages"] = sum(vm.pinned for vm in live)
            found["calls in flight"] = sum(vm.calls for vm in live)
        for name, backend in self._backends.items():
            for table, count in backend.leaks().items():
                found[f"{name} {table}"] = count
        return {k: v for k, v in found.items() if v}

    def __repr__(self) -> str:
        return f"<Vmm {len(self._live)} live VMs, backends {sorted(self._backends)}>"
