"""What ``qtee info`` reports about a device: version, ids, caps, TAs, live objects.

:func:`describe` builds a plain map (msgpack-ready, so a device server can send it in an
``answer`` frame) and :func:`format_info` renders one as the lines ``qtee info`` prints,
the same for an in-process device and a served one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from qtee import uapi

if TYPE_CHECKING:
    from qtee._driver import Device

__all__ = ["describe", "format_info"]

_GEN_CAP_NAMES: Final = (
    (uapi.TEE_GEN_CAP_GP, "GP"),
    (uapi.TEE_GEN_CAP_PRIVILEGED, "PRIVILEGED"),
    (uapi.TEE_GEN_CAP_REG_MEM, "REG_MEM"),
    (uapi.TEE_GEN_CAP_MEMREF_NULL, "MEMREF_NULL"),
    (uapi.TEE_GEN_CAP_OBJREF, "OBJREF"),
)
_IMPL: Final = {uapi.TEE_IMPL_ID_QTEE: "QTEE", uapi.TEE_IMPL_ID_OPTEE: "OP-TEE"}


def describe(device: Device) -> dict[str, Any]:
    """The device as a map: what TEE_IOC_VERSION reports, the TAs the secure world has
    loaded, every non-empty table, and per open fd what it holds."""
    from qtee import __version__
    from qtee._user_obj import UserObject

    ctx = device.open()
    try:
        arg = bytearray(uapi.VersionData.SIZE)
        ctx.ioctl(uapi.TEE_IOC_VERSION, arg)
        ver = uapi.VersionData.unpack(arg)
    finally:
        ctx.close()
    loaded: set[str] = getattr(device.world.root, "loaded_apps", set())
    exported: dict[int, int] = {}
    for _, obj in device.ns.items():
        if isinstance(obj, UserObject):
            exported[id(obj.ctx)] = exported.get(id(obj.ctx), 0) + 1
    with device._lock:
        contexts = sorted(device.contexts, key=lambda c: c.number)
    return {
        "version": __version__,
        "impl_id": ver.impl_id,
        "impl_caps": ver.impl_caps,
        "gen_caps": ver.gen_caps,
        "loaded_tas": sorted(loaded),
        "tables": device.leaks(),
        "contexts": [
            {
                "fd": c.label,
                "qtee objects": len(c.objects),
                "callback objects": exported.get(id(c), 0),
                "shms": len(c.shms),
                "requests": len(c.requests),
            }
            for c in contexts
        ],
    }


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
        held = ", ".join(f"{k} {v}" for k, v in c.items() if k != "fd")
        lines.append(f"  {c['fd']}: {held}")
    return "\n".join(lines)
