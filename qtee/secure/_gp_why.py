"""Why a GP call failed: the GP runtime's model-only notes, and the client's reading of them.

OP-TEE answers a failed OpenSession or InvokeCommand with a ``TEE_Result`` and an
origin, nothing more, and so does the model on the wire.  The GP runtime knows why (no
TA with that UUID, and which ones it would have found; a loadable TA that no
tee-supplicant served; the TA's own text; a panic), so it notes that on the thread it
answers on, through :mod:`qtee._reason`, under the result's C name.  The TEEC client
(:mod:`qtee.gp`) clears the note before its call and, when the call's result is the one
noted, makes the note the :class:`~qtee.gp.TeecError`'s ``detail``.  Nothing here
changes a byte, a result or an origin.

The note reaches the client the way a QTEE invocation's reason does: on the calling
thread in process and in a guest (the secure side runs there), in a device server's
reply otherwise.  Over IGPAppClient the GP result travels inside a successful QTEE
invocation, whose reply carries the note all the same.
"""

from __future__ import annotations

import uuid as uuidlib
from typing import TYPE_CHECKING, Final

from qtee import _reason
from qtee.gp import _codes as teec
from qtee.gp._defs import name_of

if TYPE_CHECKING:
    from qtee.secure._registry import TaRegistry

__all__ = ["clear", "load_failed", "not_found", "note", "taken", "types_text"]

_TYPE_NAMES: Final = {
    0: "NONE",
    1: "VALUE_INPUT",
    2: "VALUE_OUTPUT",
    3: "VALUE_INOUT",
    5: "MEMREF_INPUT",
    6: "MEMREF_OUTPUT",
    7: "MEMREF_INOUT",
}
_REGISTER_HINT: Final = (
    "@pytest.mark.qtee_gp_ta(cls, loadable=False), device.register_gp_ta(cls) or "
    "qtee.register_gp_ta(cls) registers one"
)


def _signed(code: int) -> int:
    return code - 0x1_0000_0000 if code & 0x8000_0000 else code


def note(code: int, detail: str) -> None:
    """The GP runtime answers this thread's call with ``code`` (a u32 ``TEE_Result``,
    not SUCCESS): remember why."""
    if code:
        _reason.note(_signed(code), name_of(code), detail)


def clear() -> None:
    """Forget this thread's note (the client, before a GP call)."""
    _reason.clear()


def taken(ret: int) -> str:
    """The detail of this thread's note when it is the GP runtime's for ``ret``, else
    ``""``; the note is forgotten either way."""
    got = _reason.take()
    if got is None or not ret or got.result != _signed(ret) or got.name != name_of(ret):
        return ""
    return got.detail


def types_text(types: int) -> str:
    """``paramTypes`` for people: ``VALUE_INPUT, NONE, NONE, NONE``."""
    nibbles = [(types >> (4 * i)) & 0xF for i in range(4)]
    return ", ".join(_TYPE_NAMES.get(t, f"{t:#x}") for t in nibbles)


def _registered(tas: TaRegistry) -> list[str]:
    """The GP TAs (not loadable) ``tas`` finds, its own first: ``uuid (Class)``."""
    seen: dict[str, str] = {}
    layer: TaRegistry | None = tas
    layers: list[TaRegistry] = []
    while layer is not None and layer not in layers:
        layers.append(layer)
        for text in layer.names()["gp"]:
            if text not in seen:
                cls = tas.lookup_gp(uuidlib.UUID(text))
                seen[text] = f"{text} ({cls.__name__})" if cls is not None else text
        layer = layer.parent
    return list(seen.values())


def _file_class(tas: TaRegistry, want: uuidlib.UUID) -> type | None:
    """The class a TA-file registration for OP-TEE gives images of ``want``, or None."""
    layer: TaRegistry | None = tas
    layers: list[TaRegistry] = []
    while layer is not None and layer not in layers:
        layers.append(layer)
        for reg in layer.files.entries():
            if reg.world == "optee" and (
                (reg.kind == "uuid" and reg.key == want.bytes)
                or getattr(reg.cls, "UUID", None) == want
            ):
                return reg.cls
        layer = layer.parent
    return None


def not_found(tas: TaRegistry, uuid: bytes, load: str) -> str:
    """Why no TA answers ``uuid``: what ``tas`` has instead, and how to register one.
    ``load`` says what the LOAD_TA path did (no supplicant, no image, ...)."""
    want = uuidlib.UUID(bytes=uuid)
    loadable = tas.lookup_loadable(uuid)
    if loadable is not None:
        return (
            f"no TA with UUID {want} answers: {loadable.__name__} is registered for it as a "
            f"loadable TA, found only through tee-supplicant's LOAD_TA, and {load} "
            "(register it with loadable=False to find it at once, or serve its "
            "gp_ta_image as <uuid>.ta from a supplicant.OpteeSupplicant's TA directory)"
        )
    filed = _file_class(tas, want)
    if filed is not None:
        return (
            f"no TA with UUID {want} answers: {filed.__name__} is registered for a TA file "
            f"(register_ta_file), loaded only through tee-supplicant's LOAD_TA, and {load}: "
            f"the image {want}.ta is missing from the supplicant's TA directory (its ta_dir, "
            f"or --ta-dir; qtee ta sign --uuid {want} --out DIR/{want}.ta makes one)"
        )
    found = _registered(tas)
    return (
        f"no TA with UUID {want} (registered GP TAs: {tas.listed(found)}); {load}; {_REGISTER_HINT}"
    )


def load_failed(tas: TaRegistry, uuid: bytes, code: int, detail: str) -> str:
    """Why LOAD_TA of ``uuid`` answered ``code`` (tee-supplicant's or OP-TEE's checks)."""
    if code == teec.ITEM_NOT_FOUND:
        return not_found(tas, uuid, "tee-supplicant has no image of it")
    if code == teec.COMMUNICATION:
        return f"LOAD_TA of {uuidlib.UUID(bytes=uuid)}: tee-supplicant went away"
    return f"LOAD_TA of {uuidlib.UUID(bytes=uuid)}: {detail or name_of(code)}"
