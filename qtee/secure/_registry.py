"""Which Python class a TA load finds: TA registries, one per secure world, over one per process.

Four kinds of registration say what a load runs:

* QTEE TAs by name (:class:`~qtee.secure.TrustedApp`; IAppLoader's model images and
  ``loadEmbedded`` by name);
* GP TAs by UUID (:class:`~qtee.secure.GpTA`; a session to that UUID finds it at once,
  as OP-TEE finds its early TAs);
* loadable GP TAs by UUID (found only through tee-supplicant's LOAD_TA, in an image
  :func:`~qtee.secure.gp_ta_image` made);
* real TA files by SHA-256 or, for GP TAs, by UUID (:mod:`qtee.secure._tafiles`).

A :class:`TaRegistry` holds all four.  Every :class:`~qtee.secure.SecureWorld` has its
own as ``world.tas``, and every lookup tries the world's registry first, then its
``parent``: the process-wide registry (:data:`PROCESS_TAS`, which the module-level
functions ``register_ta``, ``register_gp_ta``, ``register_loadable_ta`` and
``register_ta_file`` fill), or for a guest's partition the host partition's registry
first.  So two devices in one process can run two classes under one TA name, and a
process-wide registration is what every world falls back on.

Registering is a model-only act (the secure side's firmware, in effect): nothing
crosses the wire, and a running TA instance keeps the class it was loaded with.
"""

from __future__ import annotations

import inspect
import threading
import uuid as uuidlib
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

from objects import UsageError
from qtee.secure._tafiles import _DEFAULT as _PROCESS_FILES
from qtee.secure._tafiles import TaFileTable

if TYPE_CHECKING:
    from qtee.secure._apps import TrustedApp
    from qtee.secure._gp import GpTA

__all__ = ["PROCESS_TAS", "TaRegistry"]

_G = TypeVar("_G", bound="type[GpTA]")


def refuse_marker_call(cls: type, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
    """A TA class called with a test function: pytest's ``mark(cls)`` marked the class
    and returned it, so the class decorates the test.  Say how to write the marker."""
    if len(args) == 1 and not kwargs and inspect.isfunction(args[0]):
        marker = "qtee_gp_ta" if hasattr(cls, "UUID") else "qtee_ta_file"
        raise UsageError(
            f"{cls.__name__} was called with the function {args[0].__name__}(): a pytest "
            "marker given a lone class marks that class instead of the test; write "
            + (
                f"@pytest.mark.qtee_gp_ta({cls.__name__}, loadable=False)"
                if marker == "qtee_gp_ta"
                else f"@pytest.mark.qtee_ta_file({cls.__name__}, path=...)"
            )
        )


def uuid_bytes(uuid: uuidlib.UUID | bytes) -> bytes:
    """A TA UUID as its 16 octets (``uuid.UUID.bytes`` order)."""
    if isinstance(uuid, uuidlib.UUID):
        return uuid.bytes
    if isinstance(uuid, bytes | bytearray) and len(uuid) == 16:
        return bytes(uuid)
    raise UsageError(f"a TA UUID is a uuid.UUID or 16 bytes, not {uuid!r}")


def check_ta(name: object, cls: object) -> type[TrustedApp]:
    """``cls`` if it can be registered as the QTEE TA ``name``."""
    from qtee.secure._apps import TrustedApp

    if not isinstance(name, str) or not name or len(name.encode()) > 0xFFFF:
        raise UsageError(f"TA name {name!r} must be a non-empty string")
    if not (isinstance(cls, type) and issubclass(cls, TrustedApp)):
        raise TypeError(f"a TA must be a TrustedApp subclass, not {cls!r}")
    return cls


def check_gp_ta(cls: object) -> type[GpTA]:
    """``cls`` if it can be registered as a GP TA (a GpTA with a UUID and u32 FLAGS)."""
    from qtee.secure._gp import GpTA

    if not (isinstance(cls, type) and issubclass(cls, GpTA)):
        raise TypeError(f"a GP TA must be a GpTA subclass, not {cls!r}")
    if not isinstance(getattr(cls, "UUID", None), uuidlib.UUID):
        raise UsageError(f"{cls.__name__}.UUID must be a uuid.UUID")
    flags = cls.FLAGS
    if not isinstance(flags, int) or isinstance(flags, bool) or not 0 <= flags <= 0xFFFF_FFFF:
        raise UsageError(f"{cls.__name__}.FLAGS must be TA_FLAG_* bits (a u32)")
    return cls


class TaRegistry:
    """The TAs one layer knows, over a ``parent`` layer that lookups fall back on.

    ``world.tas`` is a world's own; :data:`PROCESS_TAS` is the process-wide one.  Every
    ``lookup*`` answers from this layer, else from the parent chain (``inherit=False``:
    this layer only).  Safe to use from many threads.
    """

    def __init__(self, parent: TaRegistry | None = None) -> None:
        if parent is not None and not isinstance(parent, TaRegistry):
            raise TypeError(f"a registry's parent is a TaRegistry, not {parent!r}")
        #: The layer lookups fall back on (None: this is the last one).
        self.parent = parent
        self._lock = threading.Lock()
        self._qtee: dict[str, type[TrustedApp]] = {}
        self._gp: dict[bytes, type[GpTA]] = {}
        self._loadable: dict[bytes, type[GpTA]] = {}
        #: Real TA files registered in this layer.
        self.files = TaFileTable()
        #: :func:`~qtee.secure.register_ta_file` in this layer: its table's ``register``.
        self.register_file: Final = self.files.register

    def _chain(self, inherit: bool) -> list[TaRegistry]:
        layers: list[TaRegistry] = []
        layer: TaRegistry | None = self
        while layer is not None and layer not in layers:
            layers.append(layer)
            layer = layer.parent if inherit else None
        return layers

    # ------------------------------------------------------------------ QTEE TAs
    def register(self, name: str, cls: type[TrustedApp]) -> None:
        """Make ``cls`` the QTEE TA loaded from images named ``name`` (replaces this
        layer's earlier one)."""
        cls = check_ta(name, cls)
        with self._lock:
            self._qtee[name] = cls

    def unregister(self, name: str) -> None:
        """Forget this layer's QTEE TA ``name`` (UsageError if it has none)."""
        with self._lock:
            if self._qtee.pop(name, None) is None:
                raise UsageError(f"no TA is registered as {name!r} here")

    def lookup(self, name: str, *, inherit: bool = True) -> type[TrustedApp] | None:
        """The QTEE TA registered as ``name``, or None."""
        for layer in self._chain(inherit):
            with layer._lock:
                cls = layer._qtee.get(name)
            if cls is not None:
                return cls
        return None

    # ------------------------------------------------------------------ GP TAs
    def register_gp(self, cls: _G, *, loadable: bool = False) -> _G:
        """Make ``cls`` the GP TA for ``cls.UUID``; ``loadable=True``: only through
        tee-supplicant's LOAD_TA, from an image :func:`gp_ta_image` made.  Returns
        ``cls`` (usable as a class decorator)."""
        checked = check_gp_ta(cls)
        with self._lock:
            (self._loadable if loadable else self._gp)[checked.UUID.bytes] = checked
        return cls

    def unregister_gp(self, uuid: uuidlib.UUID | bytes, *, loadable: bool = False) -> None:
        """Forget this layer's GP TA (or loadable TA) of ``uuid``; running instances keep
        their class.  UsageError if it has none."""
        key = uuid_bytes(uuid)
        with self._lock:
            table = self._loadable if loadable else self._gp
            if table.pop(key, None) is None:
                what = "loadable GP TA" if loadable else "GP TA"
                raise UsageError(f"no {what} is registered for {uuidlib.UUID(bytes=key)} here")

    def lookup_gp(self, uuid: uuidlib.UUID | bytes, *, inherit: bool = True) -> type[GpTA] | None:
        """The GP TA registered for ``uuid`` (not a loadable one), or None."""
        return self._lookup_gp(uuid_bytes(uuid), inherit, loadable=False)

    def lookup_loadable(
        self, uuid: uuidlib.UUID | bytes, *, inherit: bool = True
    ) -> type[GpTA] | None:
        """The loadable GP TA registered for ``uuid``, or None."""
        return self._lookup_gp(uuid_bytes(uuid), inherit, loadable=True)

    def _lookup_gp(self, key: bytes, inherit: bool, *, loadable: bool) -> type[GpTA] | None:
        """The nearest layer's GP TA (or loadable TA) of UUID bytes ``key``, or None."""
        for layer in self._chain(inherit):
            with layer._lock:
                cls = (layer._loadable if loadable else layer._gp).get(key)
            if cls is not None:
                return cls
        return None

    def describe(self, *, inherit: bool = True) -> list[str]:
        """What this registry loads, a line each: ``'name' (Class)`` for QTEE TAs,
        ``<uuid> (Class, GP)``, ``(Class, loadable GP)``, ``<file key> (Class, file)``;
        a name shadowed by a nearer layer is listed once."""
        seen: set[object] = set()
        lines: list[str] = []
        for layer in self._chain(inherit):
            with layer._lock:
                qtee = sorted(layer._qtee.items())
                gp = sorted(layer._gp.items())
                loadable = sorted(layer._loadable.items())
            for name, cls in qtee:
                if ("qtee", name) not in seen:
                    seen.add(("qtee", name))
                    lines.append(f"{name!r} ({cls.__name__})")
            for kind, table in (("GP", gp), ("loadable GP", loadable)):
                for key, gcls in table:
                    if (kind, key) not in seen:
                        seen.add((kind, key))
                        lines.append(f"{uuidlib.UUID(bytes=key)} ({gcls.__name__}, {kind})")
            for reg in layer.files.entries():
                if ("file", reg.world, reg.key) not in seen:
                    seen.add(("file", reg.world, reg.key))
                    lines.append(f"{reg.name} ({reg.cls.__name__}, {reg.world} file)")
        return lines

    # ------------------------------------------------------------------ TA files
    def file_by_sha256(
        self, kind: Literal["qtee", "optee"], image: bytes, *, inherit: bool = True
    ) -> tuple[type[Any], bytes] | None:
        """The class of a real TA file (``kind``: which loader asks) and the digest it
        matched, or None."""
        for layer in self._chain(inherit):
            found = layer.files.by_sha256(kind, image)
            if found is not None:
                return found
        return None

    def file_by_uuid(self, uuid: uuidlib.UUID, *, inherit: bool = True) -> type[GpTA] | None:
        """The GP TA registered for any ``<uuid>.ta`` file, or None."""
        for layer in self._chain(inherit):
            cls = layer.files.by_uuid(uuid)
            if cls is not None:
                return cls
        return None

    # ------------------------------------------------------------------ info
    @staticmethod
    def listed(names: list[str], most: int = 8) -> str:
        """``names`` for a message: the first ``most``, comma-separated (``...`` when there
        are more), or ``none``."""
        text = ", ".join(names[:most]) + (", ..." if len(names) > most else "")
        return text or "none"

    def qtee_names(self) -> list[str]:
        """Every QTEE TA name a lookup here finds (this layer's and its parents'), sorted."""
        found: set[str] = set()
        for layer in self._chain(True):
            with layer._lock:
                found.update(layer._qtee)
        return sorted(found)

    def names(self) -> dict[str, list[str]]:
        """This layer's registrations (not its parents'), for people: QTEE TA names,
        GP and loadable UUIDs (TA files: :attr:`files`)."""
        with self._lock:
            return {
                "qtee": sorted(self._qtee),
                "gp": sorted(str(uuidlib.UUID(bytes=k)) for k in self._gp),
                "loadable": sorted(str(uuidlib.UUID(bytes=k)) for k in self._loadable),
            }

    def __repr__(self) -> str:
        with self._lock:
            counts = (len(self._qtee), len(self._gp), len(self._loadable))
        tag = "process" if self is PROCESS_TAS else "world"
        return (
            f"<TaRegistry {tag} qtee={counts[0]} gp={counts[1]} loadable={counts[2]} "
            f"files={len(self.files)}>"
        )


#: The process-wide registry: what ``register_ta``, ``register_gp_ta``,
#: ``register_loadable_ta`` and ``register_ta_file`` fill, and every world falls back on.
PROCESS_TAS = TaRegistry()
PROCESS_TAS.files = _PROCESS_FILES
