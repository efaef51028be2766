"""``qtee demo``: walk one invocation and one callback through the byte-exact codecs.

Every line is one crossing: direction, object, op, counts, result.  The driver model and
secure world build on exactly these messages.
"""

from __future__ import annotations

from objects import Counts, Result, result_name
from qtee import uapi, wire


def _line(direction: str, obj: int, op: int, counts: int, result: str, nbytes: int) -> str:
    c = Counts.unpack(counts)
    shape = f"IB{c.ib} OB{c.ob} IO{c.io} OO{c.oo}"
    return f"{direction:<14} obj={obj:#010x} op={op:<5} {shape:<16} {result:<14} {nbytes:>5} B"


def run() -> int:
    """Print the trace and return 0 when every check held."""
    print(f"TEE_IOC_OBJECT_INVOKE = {uapi.TEE_IOC_OBJECT_INVOKE:#010x}  (computed with _IOR)")
    arg = uapi.ObjectInvokeArg(id=7, op=0, num_params=5)
    print(f"object_invoke_arg header: {arg.pack().hex(' ', 4)}")

    # client -> QTEE: add(1, 2) on QTEE object 7, passing a callback object in.
    msg = wire.encode_invoke(7, 0, [b"\x01\0\0\0\x02\0\0\0"], [4], [0x80000001], 1)
    print(_line("client->QTEE", 7, 0, wire.decode_invoke(msg).counts, "", len(msg)))
    seen = wire.decode_invoke(msg)
    a = int.from_bytes(seen.ib[0][:4], "little")
    b = int.from_bytes(seen.ib[0][4:], "little")
    wire.write_invoke_response(msg, seen, [(a + b).to_bytes(4, "little")], [9])

    # QTEE -> client callback on the object it was given, with a release piggybacked.
    out = bytearray(wire.MAX_OUTBOUND_BUFFER_SIZE)
    end = wire.encode_callback(out, 0x80000001, 3, [b"ping"], [16])
    wire.write_async(out, end, [wire.encode_async_release([0x80000002])])
    cb = wire.decode_callback(out)
    print(_line("QTEE->client", cb.cxt, cb.op, cb.counts, "", cb.size))
    released = wire.decode_async(out, wire.async_offset(cb))
    wire.write_callback_response(out, cb, 0, [b"pong"], [])
    answer = wire.decode_callback_response(out, cb)
    print(_line("client->QTEE", cb.cxt, cb.op, cb.counts, result_name(answer.result), 4))
    print(f"async release   ids={[hex(i) for i in released.releases[0]]} stop={released.stop}")

    reply = wire.decode_invoke_response(msg)
    total = int.from_bytes(reply.ob[0], "little")
    print(_line("QTEE->client", 7, 0, seen.counts, Result.OK.name, len(msg)))
    print(f"add(1, 2) = {total}; out object id {reply.oo[0]}; callback answered {answer.ob[0]!r}")
    ok = total == 3 and answer.ob == (b"pong",) and released.releases == ((0x80000002,),)
    print("all checks held" if ok else "A CHECK FAILED")
    return 0 if ok else 1
