"""What ``qtee info`` reports about a device: version, ids, caps, TAs, live objects.

:func:`describe` builds a plain map (msgpack-ready, so a device server can send it in an
``answer`` frame) and :func:`format_info` renders one as the lines ``qtee info`` prints,
the same for an in-process device and a served one.  :func:`fd_objects` is what one fd
holds, by name: the QTEE objects in its IDR with the secure world's labels
(:meth:`qtee.secure.SecureWorld.label`), the callback objects QTEE holds of it, and its
shared memory.  The labels are the model's own knowledge: nothing of it crosses the wire.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from qtee import uapi

if TYPE_CHECKING:
    from qtee._qcomtee.call import Context
    from qtee._qcomtee.core import Device
    from qtee.secure._world import SecureWorld

__all__ = ["describe", "fd_objects", "format_info", "format_table", "object_label", "world_of"]

_GEN_CAP_NAMES: Final = (
    (uapi.TEE_GEN_CAP_GP, "GP"),
    (uapi.TEE_GEN_CAP_PRIVILEGED, "PRIVILEGED"),
    (uapi.TEE_GEN_CAP_REG_MEM, "REG_MEM"),
    (uapi.TEE_GEN_CAP_MEMREF_NULL, "MEMREF_NULL"),
    (uapi.TEE_GEN_CAP_OBJREF, "OBJREF"),
)
_IMPL: Final = {uapi.TEE_IMPL_ID_QTEE: "QTEE", uapi.TEE_IMPL_ID_OPTEE: "OP-TEE"}
#: The columns of an fd's table in ``qtee info``.
HELD_COLUMNS: Final = ("kind", "id", "what")


def world_of(device: Device) -> SecureWorld | None:
    """The secure world that answers ``device``'s SMCs (model-only, for labels): the host's
    world, or a guest's partition, found through the VMM's backend; None if unknown, and
    for a stopped or destroyed VM."""
    world = device.secure_world
    if world is not None:
        return world
    guest = device.conduit  # a guest device's SMCs trap to its Guest
    if getattr(guest, "running", True) is False:  # a stopped VM reaches no secure world
        return None
    handle = getattr(guest, "_handle", None)
    monitor = getattr(getattr(handle, "__self__", None), "monitor", None)
    client_id = getattr(guest, "client_id", None)
    partition = getattr(monitor, "partition", None)
    if partition is None or not isinstance(client_id, int):
        return None
    found: SecureWorld | None = partition(client_id)
    return found


def object_label(ctx: Context, ident: int) -> str | None:
    """The secure world's label of the object an fd holds as ``ident`` (model-only)."""
    obj = ctx.objects.lookup(ident)
    world = world_of(ctx.device) if obj is not None else None
    return world.label(obj.qtee_id) if world is not None and obj is not None else None


def fd_objects(ctx: Context) -> dict[str, Any]:
    """What one fd holds, msgpack-ready, each list sorted by id:

    * ``objects``: ``[id, label]`` per QTEE object in its IDR (label ``""``: unknown);
    * ``callbacks``: ``[user id, class name, references]`` per callback object QTEE holds
      (class ``""`` when the fd's owner did not say, as over a device server);
    * ``memory``: ``[shm id, size, references QTEE holds, owner holds it]`` per shm;
    * ``secure_world``: whether the secure world behind the fd is there (a destroyed
      guest's partition is not: nobody holds those callback objects any more).
    """
    from qtee._qcomtee.mem_obj import MemObject
    from qtee._qcomtee.user_obj import UserObject

    device = ctx.device
    world = world_of(device)
    objects = []
    for ident, obj in sorted(ctx.objects.items(), key=lambda item: item[0]):
        label = world.label(obj.qtee_id) if world is not None else None
        objects.append([ident, label or ""])
    callbacks: dict[int, int] = {}
    shared: dict[int, tuple[int, int]] = {}  # shm id -> (size, references QTEE holds)
    for _, ns in device.ns.items():
        if isinstance(ns, UserObject) and ns.ctx is ctx:
            callbacks[ns.user_id] = callbacks.get(ns.user_id, 0) + 1
        elif isinstance(ns, MemObject) and ns.shm.ctx is ctx:
            size, refs = shared.get(ns.shm.id, (len(ns.shm.buf), 0))
            shared[ns.shm.id] = (size, refs + 1)
    for shm_id, shm in list(ctx.shms.items()):
        shared.setdefault(shm_id, (len(shm.buf), 0))
    owned = set(ctx.shms)
    name = ctx.callback_class
    return {
        "objects": objects,
        "callbacks": [
            [uid, (name(uid) if name is not None else None) or "", refs]
            for uid, refs in sorted(callbacks.items())
        ],
        "memory": [
            [shm_id, size, refs, shm_id in owned] for shm_id, (size, refs) in sorted(shared.items())
        ],
        "secure_world": world is not None,
    }


def _held_rows(held: dict[str, Any]) -> list[list[Any]]:
    """:func:`fd_objects` as ``[kind, id, what]`` rows (``qtee info``'s table)."""
    rows: list[list[Any]] = [["QTEE object", i, label or "?"] for i, label in held["objects"]]
    for uid, cls, refs in held["callbacks"]:
        what = cls or "?"
        rows.append(["callback object", uid, what if refs == 1 else f"{what}, {refs} refs"])
    for shm_id, size, refs, owned in held["memory"]:
        what = f"{size} bytes"
        if refs:
            what += f", QTEE holds {refs}"
        if not owned:
            what += ", owner closed it"
        rows.append(["memory object", shm_id, what])
    return rows


def describe(device: Device) -> dict[str, Any]:
    """The device as a map: what TEE_IOC_VERSION reports, the TAs the secure world has
    loaded, every non-empty table, and per open fd what it holds (counts, and its objects
    by name as ``held`` rows: kind, id, what)."""
    from qtee import __version__

    ctx = device.open()
    try:
        arg = bytearray(uapi.VersionData.SIZE)
        ctx.ioctl(uapi.TEE_IOC_VERSION, arg)
        ver = uapi.VersionData.unpack(arg)
    finally:
        ctx.close()
    world = world_of(device)
    loaded: set[str] = getattr(getattr(world, "root", None), "loaded_apps", set())
    with device._lock:
        contexts = sorted(device.contexts, key=lambda c: c.number)
    fds = []
    for c in contexts:
        held = fd_objects(c)
        fds.append(
            {
                "fd": c.label,
                "qtee objects": len(held["objects"]),
                "callback objects": sum(refs for _, _, refs in held["callbacks"]),
                "shms": len(c.shms),
                "requests": len(c.requests),
                "held": _held_rows(held),
            }
        )
    return {
        "version": __version__,
        "impl_id": ver.impl_id,
        "impl_caps": ver.impl_caps,
        "gen_caps": ver.gen_caps,
        "loaded_tas": sorted(loaded),
        "tables": device.leaks(),
        "contexts": fds,
    }


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "    "
) -> list[str]:
    """``rows`` under ``headers`` as aligned ``a | b | c`` lines (numbers to the right)."""
    cells = [[str(x) for x in row] for row in rows]
    numeric = [all(isinstance(row[i], int) for row in rows) for i in range(len(headers))]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]

    def line(items: Sequence[str]) -> str:
        parts = [
            x.rjust(w) if num else x.ljust(w)
            for x, w, num in zip(items, widths, numeric, strict=True)
        ]
        return (indent + " | ".join(parts)).rstrip()

    return [
        line(list(headers)),
        indent + "-+-".join("-" * w for w in widths),
        *(line(r) for r in cells),
    ]


def format_info(info: dict[str, Any]) -> str:
    """The lines ``qtee info`` prints for a :func:`describe` map."""
    caps = [name for bit, name in _GEN_CAP_NAMES if info["gen_caps"] & bit]
    lines = [
        f"version: {info['version']}",
        f"impl id: {info['impl_id']} ({_IMPL.get(info['impl_id'], 'unknown')})",
        f"impl caps: {info['impl_caps']:#x}",
        f"gen caps: {info['gen_caps']:#x} ({' | '.join(caps) or 'none'})",
        f"loaded TAs: {', '.join(info['loaded_tas']) or 'none'}",
        "live objects:" + ("" if info["tables"] else " none"),
    ]
    lines += [f"  {name}: {count}" for name, count in info["tables"].items()]
    lines.append("open fds:" + ("" if info["contexts"] else " none"))
    for c in info["contexts"]:
        held = ", ".join(f"{k} {v}" for k, v in c.items() if k not in ("fd", "held"))
        lines.append(f"  {c['fd']}: {held}")
        rows = c.get("held") or []
        if rows:
            lines += format_table(HELD_COLUMNS, rows)
    return "\n".join(lines)
