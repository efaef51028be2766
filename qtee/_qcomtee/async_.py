"""The async message tail (``qcomtee/async.c``): QTEE's batched RELEASEs of NS ids,
written after a callback request or at offset 0 of the outbound buffer on a final
return (QK §3.3).  The driver reads it wherever one can be, erases and drops each NS
id, then clears the tail so a reused buffer holds no stale message."""

from __future__ import annotations

import struct
import time
from typing import TYPE_CHECKING, Final

from qtee import wire
from qtee._cli.trace import TraceRecord
from qtee._qcomtee.object import QCOMTEE_OBJECT_ID_END, QCOMTEE_OBJECT_ID_START

if TYPE_CHECKING:
    from qtee._qcomtee.core import Device

__all__ = ["fetch_async"]

_U32: Final = struct.Struct("<I")


def fetch_async(device: Device, out: bytearray | memoryview, offset: int) -> None:
    """Process the async message at ``offset`` of ``out`` (if there is one) and clear it."""
    if len(out) - offset <= 8 or not _U32.unpack_from(out, offset)[0]:
        return  # no async message (version 0): nothing to parse or clear
    try:
        batch = wire.decode_async(out, offset)
    except Exception:  # a malformed tail stops parsing, as in the kernel
        batch = wire.AsyncBatch((), wire.ASYNC_STOP_END)
    trace, records = device.trace, device.trace_records
    for ids in batch.releases:
        if ids and (trace or records):
            what = f"async RELEASE of {', '.join(hex(i) for i in ids)}"
            if trace:
                trace(f"{'QTEE -> NS':<11} {what}")
            if records:
                records(TraceRecord(time.time(), "QTEE -> NS", None, None, 0, 0, 0, 0, what))
        for ident in ids:
            if QCOMTEE_OBJECT_ID_START <= ident <= QCOMTEE_OBJECT_ID_END:
                obj = device.ns.erase(ident)
                if obj is not None:
                    obj.put()
    wire.clear_async(out, offset)
