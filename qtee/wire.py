"""The QTEE transport message, byte for byte (sans-IO).

Two buffers are shared with QTEE per invocation (kernel ``qcomtee_msg.h``, ``core.c``,
``async.c``):

* the **inbound** buffer carries a direct invocation (``qcomtee_msg_object_invoke``:
  ``u32 cxt, op, counts`` then 8-byte args) and QTEE's response written in place
  (OB sizes and payloads, OO ids); its size is computed per call, at most 4 MiB;
* the **outbound** buffer (exactly 4096 bytes) carries a callback request from QTEE
  (``qcomtee_msg_callback``: ``u32 result, cxt, op, counts`` then args), the kernel's
  response written in place, and -- in its unused tail -- asynchronous messages
  (only RELEASE exists) that QTEE piggybacks on every return.

Buffer arguments are ``{u32 offset; u32 size}`` with ``offset`` counted from the start
of the message; object arguments are ``u32 id`` in the first half of the 8-byte slot.
Payloads start at ``align8(header + 8 * nargs)``; each IB, then each OB, takes
``align8(size)`` bytes.  Everything is little-endian.

Encoders validate what they are given and raise :class:`objects.UsageError`
(:class:`MessageTooLarge` for the size limits); decoders raise only
:class:`objects.DecodeError`, whatever the bytes.  Decoded messages are named tuples:
immutable, and cheap to build on the invoke path.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final, NamedTuple, Protocol, TypeVar

from objects import DecodeError, UsageError
from qtee._qcomtee_msg import unpack_counts

__all__ = [
    "ASYNC_STOP_END",
    "ASYNC_STOP_OP",
    "ASYNC_STOP_VERSION",
    "MAX_INBOUND_BUFFER_SIZE",
    "MAX_OUTBOUND_BUFFER_SIZE",
    "QCOMTEE_ASYNC_VERSION_1_0",
    "QCOMTEE_ASYNC_VERSION_1_1",
    "QCOMTEE_ASYNC_VERSION_1_2",
    "QCOMTEE_ASYNC_VERSION_CURRENT",
    "QCOMTEE_MSG_OBJECT_NS_BIT",
    "QCOMTEE_MSG_OBJECT_NULL",
    "QCOMTEE_MSG_OBJECT_OP_MASK",
    "QCOMTEE_MSG_OBJECT_OP_RELEASE",
    "QCOMTEE_MSG_OBJECT_OP_RETAIN",
    "QCOMTEE_MSG_OBJECT_PRIMORDIAL",
    "QCOMTEE_MSG_OBJECT_ROOT",
    "QCOMTEE_RESULT_INBOUND_REQ_NEEDED",
    "AsyncBatch",
    "BufRef",
    "CallbackMsg",
    "CallbackResponse",
    "InvokeMsg",
    "InvokeResponse",
    "MessageTooLarge",
    "align8",
    "async_offset",
    "callback_size",
    "clear_async",
    "decode_async",
    "decode_callback",
    "decode_callback_response",
    "decode_invoke",
    "decode_invoke_response",
    "encode_async_release",
    "encode_callback",
    "encode_callback_msg",
    "encode_invoke",
    "invoke_size",
    "result_from_errno",
    "write_async",
    "write_callback_response",
    "write_invoke_response",
]

_BYTES_LIKE: Final = (bytes, bytearray, memoryview)  # (a tuple: a union is built per call)
_BYTES: Final = (bytes, bytearray)
_BUF_TYPES: Final = (bytearray, memoryview)

QCOMTEE_MSG_OBJECT_NULL: Final = 0
QCOMTEE_MSG_OBJECT_ROOT: Final = 1
QCOMTEE_MSG_OBJECT_NS_BIT: Final = 1 << 31
#: The kernel-hosted primordial object: the first NS id, reserved.
QCOMTEE_MSG_OBJECT_PRIMORDIAL: Final = QCOMTEE_MSG_OBJECT_NS_BIT
QCOMTEE_MSG_OBJECT_OP_MASK: Final = 0xFFFF
QCOMTEE_MSG_OBJECT_OP_RELEASE: Final = 0xFFFF
QCOMTEE_MSG_OBJECT_OP_RETAIN: Final = 0xFFFE
#: SMC response type meaning "the outbound buffer holds a callback request".
QCOMTEE_RESULT_INBOUND_REQ_NEEDED: Final = 3

MAX_INBOUND_BUFFER_SIZE: Final = 4 * 1024 * 1024
MAX_OUTBOUND_BUFFER_SIZE: Final = 4096

QCOMTEE_ASYNC_VERSION_1_0: Final = 0x0001_0000
QCOMTEE_ASYNC_VERSION_1_1: Final = 0x0001_0001
QCOMTEE_ASYNC_VERSION_1_2: Final = 0x0001_0002
QCOMTEE_ASYNC_VERSION_CURRENT: Final = QCOMTEE_ASYNC_VERSION_1_2

ASYNC_STOP_END: Final = "end"  # version 0, or no room for another message
ASYNC_STOP_VERSION: Final = "version"  # major version is not 1
ASYNC_STOP_OP: Final = "op"  # an async op other than RELEASE

_INVOKE_HDR: Final = 12
_CALLBACK_HDR: Final = 16
_ASYNC_HDR: Final = 8
_MAX_PER_KIND: Final = 15
_MAX_ARGS: Final = 64  # the kernel's QCOMTEE_ARGS_MAX: 16 of each kind, counts wrapped
_U32: Final = 0xFFFF_FFFF

_U32_AT = struct.Struct("<I")
_HDR3 = struct.Struct("<3I")
_HDR4 = struct.Struct("<4I")
_PAIR = struct.Struct("<II")

_ARGS: list[struct.Struct] = [struct.Struct("<" + "II" * n) for n in range(_MAX_ARGS + 1)]
_INVOKE_ALL: list[struct.Struct] = [struct.Struct("<3I" + "II" * n) for n in range(_MAX_ARGS + 1)]
_CALLBACK_ALL: list[struct.Struct] = [struct.Struct("<4I" + "II" * n) for n in range(_MAX_ARGS + 1)]


class MessageTooLarge(UsageError):
    """The message would exceed its buffer (4 MiB inbound, 4096 B outbound)."""


class BufRef(NamedTuple):
    """Where a buffer argument lives in its message."""

    offset: int
    size: int


class _Message(NamedTuple):
    """A decoded message: header words, then the args by kind; ``size`` is where it ends,
    ``align8(header + 8n) + sum(align8(buffer sizes))`` (after a callback message, the
    async region starts there)."""

    cxt: int
    op: int
    counts: int
    ib: tuple[bytes, ...]
    ob: tuple[BufRef, ...]
    io: tuple[int, ...]
    n_oo: int
    size: int


class InvokeMsg(_Message):
    """A decoded inbound (direct invocation) message (12-byte header)."""

    __slots__ = ()


class CallbackMsg(_Message):
    """A decoded outbound (callback request) message (16-byte header)."""

    __slots__ = ()


class InvokeResponse(NamedTuple):
    """Outputs QTEE wrote into the inbound buffer (read only when result == 0)."""

    ob: tuple[bytes, ...]
    oo: tuple[int, ...]


class CallbackResponse(NamedTuple):
    """The kernel's answer written into the outbound buffer."""

    result: int
    ob: tuple[bytes, ...]
    oo: tuple[int, ...]


class AsyncBatch(NamedTuple):
    """Async messages found in a region: one tuple of ids per RELEASE message."""

    releases: tuple[tuple[int, ...], ...]
    stop: str


def align8(x: int) -> int:
    """``qcomtee_msg_offset_align``: round up to a multiple of 8."""
    return (x + 7) & ~7


def result_from_errno(err: int) -> int:
    """``qcomtee_msg_set_result``: the QTEE result for a callback's errno-style answer.

    0 -> OK; positive values pass through; -ENOMEM -> KMEM; -ENODEV -> DEFUNCT;
    -ENOSPC, -EBUSY -> BUSY; -EBADF, -EINVAL -> UNAVAIL; any other negative -> ERROR (1).
    """
    if not isinstance(err, int) or isinstance(err, bool):
        raise TypeError(f"err must be an int, not {type(err).__name__}")
    if err >= 0:
        return err
    return _ERRNO_RESULT.get(err, 1)


_ERRNO_RESULT: Final = {-12: -97, -19: -90, -28: -99, -16: -99, -9: -96, -22: -96}


# --------------------------------------------------------------------------- encoding


def _check_u32(value: int, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _U32:
        raise UsageError(f"{what} must be a u32, not {value!r}")


def _validate(
    ib: Sequence[bytes], ob: Sequence[int], io: Sequence[int], n_oo: int, most: int = _MAX_PER_KIND
) -> None:
    """Slow path: say exactly what is wrong with an argument set the fast path refused."""
    if len(ib) > most or len(ob) > most or len(io) > most:
        shape = f"IB {len(ib)}, OB {len(ob)}, IO {len(io)}"
        raise UsageError(f"at most {most} arguments of a kind ({shape})")
    if not isinstance(n_oo, int) or isinstance(n_oo, bool) or not 0 <= n_oo <= most:
        raise UsageError(f"at most {most} output objects, not {n_oo!r}")
    for i, data in enumerate(ib):
        if not isinstance(data, _BYTES_LIKE):
            raise TypeError(f"IB {i} must be bytes-like, not {type(data).__name__}")
    for i, size in enumerate(ob):
        _check_u32(size, f"OB {i} size")
    for i, ident in enumerate(io):
        _check_u32(ident, f"IO {i} object id")


def _name_refusal(
    exc: Exception,
    cxt: int,
    op: int,
    ib: Sequence[bytes],
    ob: Sequence[int],
    io: Sequence[int],
    n_oo: int,
    most: int,
) -> None:
    """An encoder's pack failed with ``exc``: raise the error that names the bad argument
    (``exc`` itself when it is one); return only when none is found, for the caller's raise."""
    if isinstance(exc, UsageError):
        raise exc
    _validate(ib, ob, io, n_oo, most)
    _check_u32(cxt, "cxt")
    _check_u32(op, "op")


def _nbytes(data: object) -> int:
    """Bytes in a bytes-like object (``len`` counts items of a non-byte memoryview); -1 if none."""
    if isinstance(data, memoryview):
        return data.nbytes
    if isinstance(data, _BYTES):
        return len(data)
    return -1


def _layout(
    hdr: int,
    ib: Sequence[bytes],
    ob: Sequence[int],
    io: Sequence[int],
    n_oo: int,
    most: int = _MAX_PER_KIND,
) -> tuple[list[int], int]:
    """The one message layout (qtee-kernel.md §3.3, §3.4), for the inbound and the callback
    message alike: ``[counts, arg words...]`` and the message's total size.

    Arg ``k`` (IBs, then OBs, IOs, OOs) is the 8-byte slot at ``hdr + 8k``: a buffer's
    ``(offset, size)``, an object's ``(id, 0)``, an OO's ``(0, 0)``.  Payloads start at
    ``align8(hdr + 8n)``, each buffer taking ``align8(size)``.  Up to ``most`` args of a
    kind; the counts word is :func:`~qtee._qcomtee_msg.pack_counts`'s (16 wraps to 0).
    Validated by packing the fields (the slow path names what is wrong)."""
    nib = len(ib)
    nob = len(ob)
    nio = len(io)
    if nib > most or nob > most or nio > most or n_oo > most:
        _validate(ib, ob, io, n_oo, most)
    off = (hdr + 8 * (nib + nob + nio + n_oo) + 7) & ~7
    # pack_counts(nib, nob, nio, n_oo), inlined: a call here is 4% of an encode+decode.
    fields = [(nib & 0xF) | (nob & 0xF) << 4 | (nio & 0xF) << 8 | (n_oo & 0xF) << 12]
    for data in ib:
        size = len(data) if type(data) is bytes else _nbytes(data)
        if size < 0:
            _validate(ib, ob, io, n_oo, most)
        fields += (off, size)
        off += (size + 7) & ~7
    for size in ob:
        fields += (off, size)
        off += (size + 7) & ~7
    for ident in io:
        fields += (ident, 0)
    if n_oo:
        fields.extend(_ZEROS[n_oo])
    return fields, off


_ZEROS: Final = [[0] * (2 * n) for n in range(_MAX_PER_KIND + 2)]


def invoke_size(ib_sizes: Sequence[int], ob_sizes: Sequence[int], n_objects: int) -> int:
    """Bytes an inbound message needs: ``align8(12 + 8n) + sum(align8(IB|OB sizes))``."""
    return _size(_INVOKE_HDR, ib_sizes, ob_sizes, n_objects)


def callback_size(ib_sizes: Sequence[int], ob_sizes: Sequence[int], n_objects: int) -> int:
    """Bytes a callback message occupies (where its async region starts)."""
    return _size(_CALLBACK_HDR, ib_sizes, ob_sizes, n_objects)


def _size(hdr: int, ib_sizes: Sequence[int], ob_sizes: Sequence[int], n_objects: int) -> int:
    n = len(ib_sizes) + len(ob_sizes) + n_objects
    return ((hdr + 8 * n + 7) & ~7) + sum((s + 7) & ~7 for s in (*ib_sizes, *ob_sizes))


class _InboundEncoder(Protocol):
    def __call__(
        self,
        cxt: int,
        op: int,
        ib: Sequence[bytes] = (),
        ob: Sequence[int] = (),
        io: Sequence[int] = (),
        n_oo: int = 0,
    ) -> bytearray: ...


def _inbound_encoder(most: int) -> _InboundEncoder:
    """The inbound encoder for up to ``most`` args of a kind: 15 (:func:`encode_invoke`), or
    16 for the driver, whose ``qcomtee_msg_init`` wraps a count of 16 to 0 and lays out
    every arg (§7).  One body, made twice: the invoke path pays no extra call for ``most``."""

    def encode_invoke(
        cxt: int,
        op: int,
        ib: Sequence[bytes] = (),
        ob: Sequence[int] = (),
        io: Sequence[int] = (),
        n_oo: int = 0,
    ) -> bytearray:
        """Build a zero-filled inbound message: IB payloads copied, OB space reserved.

        ``ob`` holds the capacities of the output buffers, ``io`` the wire ids of the input
        objects, ``n_oo`` the number of output-object slots (left 0 for QTEE to fill).
        The result is exactly :func:`invoke_size` bytes; over 4 MiB -> :class:`MessageTooLarge`.
        """
        try:
            fields, end = _layout(_INVOKE_HDR, ib, ob, io, n_oo, most)
            if end > MAX_INBOUND_BUFFER_SIZE:
                raise MessageTooLarge(
                    f"inbound message needs {end} bytes, limit {MAX_INBOUND_BUFFER_SIZE}"
                )
            buf = bytearray(end)
            _INVOKE_ALL[len(fields) >> 1].pack_into(buf, 0, cxt, op, *fields)
        except (struct.error, TypeError, ValueError, OverflowError) as exc:
            _name_refusal(exc, cxt, op, ib, ob, io, n_oo, most)
            raise
        if ib:
            _copy_ib(buf, fields, ib)
        return buf

    encode_invoke.__module__ = __name__
    return encode_invoke


encode_invoke: Final = _inbound_encoder(_MAX_PER_KIND)
#: :func:`encode_invoke` for the driver: up to 16 args of a kind, the counts word wrapped.
_encode_inbound: Final = _inbound_encoder(_MAX_PER_KIND + 1)


def encode_callback(
    buf: bytearray | memoryview,
    cxt: int,
    op: int,
    ib: Sequence[bytes] = (),
    ob: Sequence[int] = (),
    io: Sequence[int] = (),
    n_oo: int = 0,
) -> int:
    """Write a callback request at the start of the 4096-byte outbound ``buf``.

    The ``result`` word is left 0 for the kernel.  Returns the message size, which is
    where the async region of this callback starts.
    """
    return _write_callback(buf, cxt, op, ib, ob, io, n_oo)[1]


def encode_callback_msg(
    buf: bytearray | memoryview,
    cxt: int,
    op: int,
    ib: Sequence[bytes] = (),
    ob: Sequence[int] = (),
    io: Sequence[int] = (),
    n_oo: int = 0,
) -> CallbackMsg:
    """:func:`encode_callback`, returning the message written (what :func:`decode_callback`
    of ``buf`` would give, without parsing it back)."""
    fields, end = _write_callback(buf, cxt, op, ib, ob, io, n_oo)
    nib, nob = len(ib), len(ob)
    refs = tuple(
        _new(BufRef, (fields[1 + 2 * k], fields[2 + 2 * k])) for k in range(nib, nib + nob)
    )
    ib_bytes = tuple(bytes(data) for data in ib)
    return _new(CallbackMsg, (cxt, op, fields[0], ib_bytes, refs, tuple(io), n_oo, end))


def _write_callback(
    buf: bytearray | memoryview,
    cxt: int,
    op: int,
    ib: Sequence[bytes],
    ob: Sequence[int],
    io: Sequence[int],
    n_oo: int,
) -> tuple[list[int], int]:
    _check_outbound(buf)
    try:
        fields, end = _layout(_CALLBACK_HDR, ib, ob, io, n_oo)
        if end > MAX_OUTBOUND_BUFFER_SIZE:
            raise MessageTooLarge(
                f"callback message needs {end} bytes, outbound buffer is {MAX_OUTBOUND_BUFFER_SIZE}"
            )
        _CALLBACK_ALL[len(fields) >> 1].pack_into(buf, 0, 0, cxt, op, *fields)
    except (struct.error, TypeError, ValueError, OverflowError) as exc:
        _name_refusal(exc, cxt, op, ib, ob, io, n_oo, _MAX_PER_KIND)
        raise
    if ib:
        _copy_ib(buf, fields, ib)
    return fields, end


def _copy_ib(buf: bytearray | memoryview, fields: list[int], ib: Sequence[bytes]) -> None:
    """Copy each input buffer's payload to its offset (``fields``: offset, size pairs
    after the counts word, inputs first, as :func:`_layout` gives them)."""
    k = 1
    for data in ib:
        off = fields[k]
        buf[off : off + fields[k + 1]] = data
        k += 2


def _check_outbound(buf: bytearray | memoryview) -> None:
    if not isinstance(buf, _BUF_TYPES) or len(buf) != MAX_OUTBOUND_BUFFER_SIZE:
        raise UsageError(f"the outbound buffer must be {MAX_OUTBOUND_BUFFER_SIZE} writable bytes")


# --------------------------------------------------------------------------- decoding

_Buf = bytes | bytearray | memoryview
_M = TypeVar("_M", InvokeMsg, CallbackMsg)


_new = tuple.__new__


def _not_bytes(buf: object, what: str) -> TypeError:
    return TypeError(f"{what} takes a bytes-like buffer, not {type(buf).__name__}")


def _decode(buf: _Buf, hdr: int, cls: type[_M], cxt: int, op: int, counts: int, what: str) -> _M:
    """Parse the args of a message whose header was read; ``cls`` is the result type."""
    try:
        nib, nob, nio, noo = unpack_counts(counts)
    except DecodeError as exc:
        raise DecodeError(f"{what}: {exc}") from None
    nb = nib + nob
    n = nb + nio + noo
    length = len(buf)
    start = (hdr + 8 * n + 7) & ~7
    if start > length:
        raise DecodeError(f"{what}: {n} args need {start} bytes, message has {length}")
    vals = _ARGS[n].unpack_from(buf, hdr)
    ib: list[bytes] = []
    ob: list[BufRef] = []
    end = start
    nib2 = 2 * nib
    for k in range(0, 2 * nb, 2):
        off = vals[k]
        size = vals[k + 1]
        top = off + size
        if off & 7 or off < start or top > length:
            kind, index = ("IB", k >> 1) if k < nib2 else ("OB", (k >> 1) - nib)
            raise DecodeError(
                f"{what}: {kind} {index} at offset {off} size {size} is outside the payload "
                f"area [{start}, {length}) or not 8-byte aligned"
            )
        if k < nib2:
            ib.append(bytes(buf[off:top]))
        else:
            ob.append(_new(BufRef, (off, size)))
        end += (size + 7) & ~7
    io = vals[2 * nb : 2 * (nb + nio) : 2]
    return _new(cls, (cxt, op, counts, tuple(ib), tuple(ob), io, noo, end))


def decode_invoke(buf: _Buf) -> InvokeMsg:
    """Parse an inbound message (what QTEE reads)."""
    if not isinstance(buf, _BYTES_LIKE):
        raise _not_bytes(buf, "decode_invoke")
    length = len(buf)
    if length < _INVOKE_HDR:
        raise DecodeError(f"inbound message is {length} bytes, header needs {_INVOKE_HDR}")
    if length > MAX_INBOUND_BUFFER_SIZE:
        raise DecodeError(f"inbound message is {length} bytes, limit {MAX_INBOUND_BUFFER_SIZE}")
    cxt, op, counts = _HDR3.unpack_from(buf, 0)
    return _decode(buf, _INVOKE_HDR, InvokeMsg, cxt, op, counts, "inbound")


def decode_callback(buf: _Buf) -> CallbackMsg:
    """Parse the callback request at the head of a 4096-byte outbound buffer."""
    if not isinstance(buf, _BYTES_LIKE):
        raise _not_bytes(buf, "decode_callback")
    if len(buf) != MAX_OUTBOUND_BUFFER_SIZE:
        raise DecodeError(
            f"outbound buffer is {len(buf)} bytes, must be {MAX_OUTBOUND_BUFFER_SIZE}"
        )
    _result, cxt, op, counts = _HDR4.unpack_from(buf, 0)
    return _decode(buf, _CALLBACK_HDR, CallbackMsg, cxt, op, counts, "callback")


# --------------------------------------------------------------------------- responses


def _write_outputs(
    buf: bytearray | memoryview,
    hdr: int,
    counts: int,
    ob: Sequence[BufRef],
    ob_data: Sequence[bytes],
    oo_ids: Sequence[int],
    what: str,
) -> None:
    nib, nob, nio, noo = unpack_counts(counts & 0xFFFF)
    if len(ob_data) != nob or len(oo_ids) != noo:
        raise UsageError(
            f"{what}: message has {nob} OB and {noo} OO, got {len(ob_data)} and {len(oo_ids)}"
        )
    # Check everything before writing anything: a refused response leaves the buffer as it was.
    sizes = []
    for k, (ref, data) in enumerate(zip(ob, ob_data, strict=True)):
        if not isinstance(data, _BYTES_LIKE):
            raise TypeError(f"{what}: OB {k} data must be bytes-like")
        size = _nbytes(data)
        if size > ref.size:
            raise UsageError(f"{what}: OB {k} holds {size} bytes, only {ref.size} allowed")
        sizes.append(size)
    for k, ident in enumerate(oo_ids):
        _check_u32(ident, f"{what}: OO {k} id")
    for k, (ref, data, size) in enumerate(zip(ob, ob_data, sizes, strict=True)):
        buf[ref.offset : ref.offset + size] = data
        _PAIR.pack_into(buf, hdr + 8 * (nib + k), ref.offset, size)
    first_oo = hdr + 8 * (nib + nob + nio)
    for k, ident in enumerate(oo_ids):
        _U32_AT.pack_into(buf, first_oo + 8 * k, ident)


def write_invoke_response(
    buf: bytearray | memoryview, msg: InvokeMsg, ob_data: Sequence[bytes], oo_ids: Sequence[int]
) -> None:
    """QTEE's side: write OB payloads and sizes (never above the capacity) and OO ids."""
    _write_outputs(buf, _INVOKE_HDR, msg.counts, msg.ob, ob_data, oo_ids, "invoke response")


def write_callback_response(
    buf: bytearray | memoryview,
    msg: CallbackMsg,
    result: int,
    ob_data: Sequence[bytes] = (),
    oo_ids: Sequence[int] = (),
) -> None:
    """The kernel's side: write ``result`` and, when it is 0, OB data (shrink only) and OO ids.

    An OB longer than QTEE asked for raises :class:`objects.UsageError` (the kernel
    answers -EINVAL, which QTEE sees as UNAVAIL) and writes nothing.
    """
    if not isinstance(result, int) or isinstance(result, bool):
        raise TypeError("result must be an int")
    if not -0x8000_0000 <= result <= 0x7FFF_FFFF:
        raise UsageError(f"result {result} does not fit in 32 bits")
    if result == 0:
        _write_outputs(buf, _CALLBACK_HDR, msg.counts, msg.ob, ob_data, oo_ids, "callback response")
    _U32_AT.pack_into(buf, 0, result & _U32)


def _read_outputs(
    buf: _Buf, hdr: int, what: str, shape: tuple[int, int, int, int] | None = None
) -> tuple[tuple[bytes, ...], tuple[int, ...]]:
    """OB data and OO ids from the arg slots of :func:`_layout`; ``shape`` is ``(IB, OB,
    IO, OO)``, by default the message's counts word (the driver passes its own counts
    when a kind had 16 args and the word wrapped, §7)."""
    if shape is None:
        counts = _U32_AT.unpack_from(buf, hdr - 4)[0]
        try:
            shape = unpack_counts(counts)
        except DecodeError as exc:
            raise DecodeError(f"{what}: {exc}") from None
    nib, nob, nio, noo = shape
    n = nib + nob + nio + noo
    length = len(buf)
    if hdr + 8 * n > length:
        raise DecodeError(f"{what}: {n} args do not fit in {length} bytes")
    vals = _ARGS[n].unpack_from(buf, hdr)
    ob: list[bytes] = []
    for k in range(nib, nib + nob):
        off = vals[2 * k]
        size = vals[2 * k + 1]
        if off + size > length:
            raise DecodeError(f"{what}: OB {k - nib} [{off}, +{size}) runs past {length} bytes")
        ob.append(bytes(buf[off : off + size]))
    first = 2 * (nib + nob + nio)
    return tuple(ob), vals[first : first + 2 * noo : 2]


def decode_invoke_response(buf: _Buf) -> InvokeResponse:
    """The kernel's side: read OB data and OO ids QTEE wrote into the inbound buffer.

    Like the kernel, the OB sizes QTEE reports are trusted (only bounded by the buffer).
    """
    if not isinstance(buf, _BYTES_LIKE):
        raise _not_bytes(buf, "decode_invoke_response")
    if len(buf) < _INVOKE_HDR:
        raise DecodeError(f"inbound message is {len(buf)} bytes, header needs {_INVOKE_HDR}")
    return InvokeResponse(*_read_outputs(buf, _INVOKE_HDR, "invoke response"))


def decode_callback_response(buf: _Buf, msg: CallbackMsg) -> CallbackResponse:
    """QTEE's side: read the kernel's result and, when it is 0, the outputs.

    OB sizes larger than the request asked for are rejected (the kernel never grows them).
    """
    if not isinstance(buf, _BYTES_LIKE):
        raise _not_bytes(buf, "decode_callback_response")
    if len(buf) != MAX_OUTBOUND_BUFFER_SIZE:
        raise DecodeError(
            f"outbound buffer is {len(buf)} bytes, must be {MAX_OUTBOUND_BUFFER_SIZE}"
        )
    raw = _U32_AT.unpack_from(buf, 0)[0]
    result = raw - 0x1_0000_0000 if raw & 0x8000_0000 else raw
    if result != 0:
        return _new(CallbackResponse, (result, (), ()))
    ob, oo = _read_outputs(buf, _CALLBACK_HDR, "callback response")
    for k, (data, ref) in enumerate(zip(ob, msg.ob, strict=False)):
        if len(data) > ref.size:
            raise DecodeError(f"callback response: OB {k} grew from {ref.size} to {len(data)}")
    return _new(CallbackResponse, (0, ob, oo))


# --------------------------------------------------------------------------- async


def async_offset(msg: CallbackMsg | None) -> int:
    """Start of the async region: 0 after a direct return, the message end after a callback."""
    return 0 if msg is None else msg.size


def encode_async_release(ids: Sequence[int], version: int = QCOMTEE_ASYNC_VERSION_CURRENT) -> bytes:
    """One RELEASE message: ``{u32 version; u32 op=0xFFFF; u32 counts; u32 ids[counts]}``."""
    _check_u32(version, "async version")
    if version == 0:
        raise UsageError("async version 0 means 'no message'; use a 1.x version")
    for k, ident in enumerate(ids):
        _check_u32(ident, f"async release id {k}")
    n = len(ids)
    return struct.pack(f"<3I{n}I", version, QCOMTEE_MSG_OBJECT_OP_RELEASE, n, *ids)


def _write_async_release(buf: bytearray | memoryview, offset: int, ids: Sequence[int]) -> None:
    """:func:`encode_async_release` of ``ids`` written by :func:`write_async` at ``offset``,
    for a caller whose ids are its own u32 NS ids and who checked the room (an 8-aligned
    ``offset``, ``12 + 4 * len(ids)`` bytes free): the same bytes, without the checks."""
    n = len(ids)
    struct.pack_into(
        f"<3I{n}I",
        buf,
        offset,
        QCOMTEE_ASYNC_VERSION_CURRENT,
        QCOMTEE_MSG_OBJECT_OP_RELEASE,
        n,
        *ids,
    )


def write_async(buf: bytearray | memoryview, offset: int, messages: Sequence[bytes]) -> int:
    """Append async ``messages`` at ``offset``, each at an 8-byte boundary; returns the end."""
    _check_outbound(buf)
    if not isinstance(offset, int) or offset & 7 or not 0 <= offset <= len(buf):
        raise UsageError(f"async offset {offset!r} must be 8-byte aligned inside the buffer")
    used = offset
    for k, message in enumerate(messages):
        if used + len(message) > len(buf):
            raise MessageTooLarge(f"async message {k} ({len(message)} B) does not fit at {used}")
        buf[used : used + len(message)] = message
        used += (len(message) + 7) & ~7
    return min(used, len(buf))


def decode_async(buf: _Buf, offset: int = 0) -> AsyncBatch:
    """Read the async messages from ``offset`` on, as ``qcomtee_fetch_async_reqs`` does.

    Parsing goes on while more than 8 bytes remain; it ends at a zero version
    (``end``), at a major version other than 1 (``version``) or at an op other than
    RELEASE (``op``).  A RELEASE whose ids run past the buffer is a :class:`DecodeError`.
    """
    if not isinstance(buf, _BYTES_LIKE):
        raise _not_bytes(buf, "decode_async")
    length = len(buf)
    if not isinstance(offset, int) or not 0 <= offset <= length:
        raise DecodeError(f"async offset {offset!r} is outside the {length}-byte buffer")
    releases: list[tuple[int, ...]] = []
    used = offset
    stop = ASYNC_STOP_END
    while length - used > _ASYNC_HDR:
        version, op = _PAIR.unpack_from(buf, used)
        if version == 0:
            break
        if version >> 16 != 1:
            stop = ASYNC_STOP_VERSION
            break
        if op != QCOMTEE_MSG_OBJECT_OP_RELEASE:
            stop = ASYNC_STOP_OP
            break
        if length - used < _ASYNC_HDR + 4:
            raise DecodeError(f"async release at {used}: no room for its counts word")
        count = _U32_AT.unpack_from(buf, used + _ASYNC_HDR)[0]
        consumed = _ASYNC_HDR + 4 + 4 * count
        if used + consumed > length:
            raise DecodeError(
                f"async release at {used}: {count} ids run past the {length}-byte buffer"
            )
        releases.append(struct.unpack_from(f"<{count}I", buf, used + 12))
        used += (consumed + 7) & ~7
    return _new(AsyncBatch, (tuple(releases), stop))


def clear_async(buf: bytearray | memoryview, offset: int) -> None:
    """Zero the async region after processing, so requests do not loop back to QTEE."""
    buf[offset:] = bytes(len(buf) - offset)
