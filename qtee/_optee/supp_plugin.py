"""The TA side of supplicant plugins: ``tee_invoke_supp_plugin`` for a GP TA.

**Supplicant plugins** (:func:`invoke_supp_plugin`, libutee's ``tee_invoke_supp_plugin``
through the system PTA and ``tee_supp_plugin_rpc.c``): cmd 12 with value[0] IN =
(INVOKE 0, UUID word 0, word 1), value[1] IN = (word 2, word 3, cmd), value[2] INOUT =
(sub-command, out length), memref[3] INOUT = the buffer copied into an APPL payload
(NULL when empty); the words are the UUID's octets read as little-endian u32.  The
supplicant's answer is the TA's result (ITEM_NOT_FOUND: no such plugin) and value[2].b
the out length; when both the buffer and the out length are non-zero the whole payload
is copied back over the buffer and the result becomes SUCCESS (``copy_to_user``'s
result replaces the plugin's, as in OP-TEE for a user TA).
"""

from __future__ import annotations

import uuid as uuidlib

from qtee._optee.supp import _queue_of
from qtee.gp import _codes as teec
from qtee.gp._defs import TeecResult, name_of
from qtee.secure._gp import GpTA, GpTaError

__all__ = ["invoke_supp_plugin"]


def invoke_supp_plugin(
    ta: GpTA,
    plugin: uuidlib.UUID | bytes,
    cmd: int,
    sub_cmd: int,
    buf: bytearray | memoryview | None = None,
) -> int:
    """``tee_invoke_supp_plugin``: call the supplicant's plugin ``plugin`` with ``cmd``,
    ``sub_cmd`` and ``buf`` (call it inside one of ``ta``'s entry points); the out length.

    ``buf`` is in/out: its bytes go to the plugin, and when the plugin reports a non-zero
    out length the whole buffer is replaced by the payload as the plugin left it (the
    result is then SUCCESS, whatever the plugin answered).  Any other non-success answer
    is raised as :class:`GpTaError` (ITEM_NOT_FOUND: the supplicant has no such plugin).
    The out length may exceed ``len(buf)`` (a plugin saying how much it needs)."""
    if isinstance(plugin, uuidlib.UUID):
        raw = plugin.bytes
    elif isinstance(plugin, (bytes, bytearray)) and len(plugin) == 16:
        raw = bytes(plugin)
    else:
        raise TypeError(f"plugin must be a UUID or 16 bytes, not {plugin!r}")
    for name, value in (("cmd", cmd), ("sub_cmd", sub_cmd)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0xFFFF_FFFF:
            raise ValueError(f"{name} must be a u32, not {value!r}")
    if buf is not None and (
        not isinstance(buf, (bytearray, memoryview))
        or (isinstance(buf, memoryview) and buf.readonly)
    ):
        raise TypeError(f"buf must be a writable bytearray or memoryview, not {type(buf).__name__}")
    entry = ta._entry()
    supp = _queue_of(entry.runtime)
    if supp is None:
        raise GpTaError(int(TeecResult.TEEC_ERROR_NOT_SUPPORTED), "no supplicant queue")
    ret, outlen = supp.supp_plugin(raw, cmd, sub_cmd, buf)
    if ret != teec.SUCCESS:
        said = name_of(ret)  # the TEEC result's C name when it is one
        said = f"{said} ({ret:#010x})" if said != f"0x{ret:08X}" else said
        raise GpTaError(ret, f"plugin {uuidlib.UUID(bytes=raw)} answered {said}")
    return outlen
