"""The device server's wire protocol: length-prefixed msgpack frames (sans-IO).

One Unix-socket connection is one open fd of the TEE device.  Each direction is a
stream of frames::

    frame = u32 length (big-endian, 1 .. max_frame) || body (length bytes)
    body  = one msgpack map {"v": PROTOCOL_VERSION, "t": <kind>, <fields of that kind>}

Keys are msgpack str, byte strings are msgpack bin, integers are msgpack ints.  The
map holds exactly the keys of its kind (a missing, unknown or duplicated key is an
error), and the encoder writes them in a fixed order (``v``, ``t``, then the fields as
declared), so a message has one encoding.

=========  ==========  ==========================================================
kind       direction   fields
=========  ==========  ==========================================================
hello      client      client: str, node: "tee" | "teepriv"
welcome    server      impl_id: u32, gen_caps: u32, server: str
denied     server      errno: 1..4095, reason: str  (instead of welcome; then the end)
ioctl      client      seq: u32, cmd: u32, arg: bin, regions: [region]
recv_nowait client     seq: u32, arg: bin, regions: [region]  (a SUPPL_RECV that never waits)
reply      server      seq: u32, errno: 0..4095, arg: bin, written: [region],
                       why: {result: s32 != 0, name: str, detail: str}  (optional)
close      client      seq: u32
shm        server      seq: u32, id: u32, size: u64  (+ one fd, SCM_RIGHTS)
shm_free   client      seq: u32, id: u32
query      client      seq: u32, what: "info" | "trace" | "objects"
answer     server      seq: u32, data: map with str keys
probe      client      seq: u32, call: u32
status     server      seq: u32, call: u32, running: bool, callback: bool, quiet_ms: u64
watch      client      seq: u32
ready      server      (no fields)
bye        either      reason: str
(region)               addr: u64, data: bin, writable: bool  (a map without v/t)
=========  ==========  ==========================================================

``hello`` names the device node the connection opens: ``tee`` (``/dev/teeN``, the
default) or ``teepriv`` (``/dev/teeprivN``, tee-supplicant's node of an OP-TEE device).
A server that cannot open it answers ``denied`` with the errno the open would fail with
(ENOENT: no such node; EBUSY: a supplicant holds the node already) and closes.

``recv_nowait`` is the model's own non-blocking SUPPL_RECV (``Context.recv_nowait``): its
``reply`` comes at once, EAGAIN when no request is queued.  ``watch`` asks the server to
tell this connection when a SUPPL_RECV would find work: it is answered like a query
(``answer`` ``{"watching": true}``, or a refusal), and from then on the server sends a
``ready`` frame whenever a request is queued on the fd, and when the fd's queue ends
(bursts may come as one frame; a ``ready`` right after the answer if one is queued
already).  A connection that never sends ``watch`` gets no ``ready``.

Shared memory crosses as the kernel's shm fd does: after a successful SHM_ALLOC the
server sends a ``shm`` frame (before the reply) with the fd of the memory file behind
the buffer attached to its bytes; the client maps it.  ``shm_free`` is ``close`` of that
fd.  ``query`` asks the server to describe itself (one ``answer``) or to stream its trace
(an ``answer`` ``{"streaming": true}``, then one per crossing until the connection
closes), or to name what the connection's own fd holds (``objects``: one ``answer``
with the model-only labels of its QTEE objects, see ``qtee._cli.info.fd_objects``; never
refused for want of introspection: the fd is the asker's).  A server may refuse a
query with an ``answer`` ``{"errno": n, "reason": str}`` (see :func:`refusal` and
:func:`refused`): EACCES when it was started without introspection, EALREADY for a
second trace stream on one connection.

``probe`` asks about a call (its ``seq``) the client has waited on past its deadline; the
``status`` answer says whether the server is still running it, whether it is waiting on
a callback (the client's deadline then stands still), and for how many milliseconds it has
run since it started or its last callback was answered.  A server sends a call's reply
before it forgets the call, so a ``status`` with ``running`` false comes after the reply.

An ioctl carries the caller's memory it may touch as regions (addresses do not cross
processes: the server maps them at those addresses for the call).  A reply with
``errno`` 0 carries the new ``arg`` and the writable regions the call wrote; with
``errno`` != 0 nothing is written back (the errno channel: the kernel copies nothing
out of a failed ioctl), so ``arg`` and ``written`` are empty.

A successful OBJECT_INVOKE's (or OP-TEE OPEN_SESSION's, INVOKE's) reply may carry
``why``: the secure side's note on why it answered with an error (:mod:`qtee._reason`:
the result, the interface error's name, the reason), a model-only detail the client puts
in its :class:`~objects.QteeError` (or :class:`~qtee.gp.TeecError`); it is
absent when there is no note, and never changes ``arg`` or ``written``.

A reply is checked against its request on the client (:func:`check_reply`,
:func:`check_written`) before anything is written back: same ``seq``, an ``arg`` as long
as the request's, and writes only inside the writable regions the request sent.

Building a record validates it and raises :class:`objects.UsageError` (the caller broke
it); decoding raises only :class:`FrameError` (the other side broke it), whatever the
bytes.  :class:`FrameDecoder` is fed bytes in any chunking and hands out messages; after
its first error it is dead, and the connection should be closed.

This module is the codec (:func:`encode`, :func:`from_map`, :class:`FrameDecoder`) and the
client's reply checks; the records are in :mod:`qtee._remote.frame_records`, the limits
and field checks in :mod:`qtee._remote.frame_fields`, and every name is importable here.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any, Final, NoReturn

import msgpack

from objects import UsageError
from qtee._remote import frame_fields, frame_records
from qtee._remote.frame_fields import *  # noqa: F403 - every name is importable here
from qtee._remote.frame_fields import (
    _HDR,
    _HEADER,
    _U32,
    _U64,
    MAX_ERRNO,
    MAX_FRAME,
    PROTOCOL_VERSION,
    SUPPL_RECV,
    FrameError,
    _check_version,
    _int,
    _str,
)
from qtee._remote.frame_records import *  # noqa: F403
from qtee._remote.frame_records import (
    _KINDS,
    _MESSAGE_TYPES,
    _REQUEST_TYPES,
    Answer,
    Ioctl,
    IoctlReply,
    Message,
    Region,
    Why,
    _why,
    _why_map,
)

__all__ = [
    "FrameDecoder",
    "check_reply",
    "check_written",
    "encode",
    "encode_call",
    "encode_reply",
    "from_map",
    "refusal",
    "refused",
]
__all__ += frame_fields.__all__
__all__ += frame_records.__all__
_BYTES_LIKE: Final = (bytes, bytearray, memoryview)
_read_length = _HEADER.unpack_from  # (a frame's length word, at its start)
_BODY: Final = slice(_HDR, None)  # (a whole frame's body)


def from_map(m: object) -> Message:
    """Decode one message from an unpacked body; :class:`FrameError` if it is not one."""
    if type(m) is not dict:
        raise FrameError(f"frame body is a msgpack {type(m).__name__}, not a map")
    if "v" not in m:
        raise FrameError("frame body has no protocol version 'v'")
    _check_version(m["v"])
    kind = m.get("t")
    cls = _KINDS.get(kind) if type(kind) is str else None
    if cls is None:
        raise FrameError(f"unknown message type {kind!r}")
    return cls.from_map(m)


# The two frames of every call, from the msgpack pairs themselves (maps decoded as tuples of
# pairs, in C, so a duplicated key is seen): a frame whose keys come in the encoder's order
# is checked and built here, in one call, without building kwargs and re-validating through
# __post_init__ (the same checks, inline: ``n >> k`` is n outside [0, 2**k); the records
# filled through their :func:`_filler` classes); anything else (another key order, a
# duplicated key, a ``why``, any doubt) is None, and the body is decoded again as maps by
# from_map, which accepts or names the error exactly as ever.  (``x.__class__`` is
# ``type(x)`` for what msgpack makes, without a call: this runs for every frame of every
# call.  Plain unpacking and a loop, not zip or map: fewer bytecodes through C calls were
# slower.)
_unpackb = msgpack.unpackb
# (a map decodes as a tuple of pairs; an array of [key, value] arrays, a list, is no map)
# m's class, its keys, t, v and v's class, then the classes of seq, cmd or errno, arg, regions
_IOCTL_SHAPE: Final = (
    tuple, "v", "t", "seq", "cmd", "arg", "regions", "ioctl", PROTOCOL_VERSION, int,
    int, int, bytes, list,
)  # fmt: skip
_REPLY_SHAPE: Final = (
    tuple, "v", "t", "seq", "errno", "arg", "written", "reply", PROTOCOL_VERSION, int,
    int, int, bytes, list,
)  # fmt: skip
_REGION_SHAPE: Final = (tuple, "addr", "data", "writable", int, bytes, bool)
_ERRNO_BITS: Final = MAX_ERRNO.bit_length()
_ADDR_END: Final = _U64 + 1
assert MAX_ERRNO == (1 << _ERRNO_BITS) - 1
assert _U32 == (1 << 32) - 1 and _U64 == (1 << 64) - 1


def _filler(cls: type) -> Any:
    """A class of ``cls``'s layout (its base and slots) without its frozen ``__setattr__``:
    the fast path fills an instance of it with plain attribute stores, then makes it a
    ``cls`` by assigning ``__class__`` (allowed between classes of one layout), in about
    half the time of ``object.__new__`` and a slot setter call per field."""
    slots = {"__slots__": cls.__dict__["__slots__"]}
    filler = type(f"_{cls.__name__}Filler", cls.__bases__, slots)
    filler().__class__ = cls  # (a TypeError here, at import, if the layouts differ)
    return filler


_RegionFiller, _IoctlFiller, _ReplyFiller = map(_filler, (Region, Ioctl, IoctlReply))


def _overlap(regions: list[Region]) -> bool:
    """Whether two of ``regions`` share a byte (empty ones overlap nothing; two regions,
    as a SUPPL_RECV's block and scratch, are compared in :func:`_decode_call` itself)."""
    spans = sorted((r.addr, r.addr + len(r.data)) for r in regions if r.data)
    return any(nlo < hi for (_, hi), (nlo, _) in itertools.pairwise(spans))


def _decode_call(body: bytes | bytearray | memoryview) -> Ioctl | IoctlReply | None:
    """A call frame's record from its body, or None (the general path decides)."""
    try:
        m = _unpackb(body, raw=False, strict_map_key=True, object_pairs_hook=tuple)
        (k0, v), (k1, t), (k2, seq), (k3, x), (k4, arg), (k5, regs) = m
    except Exception:  # not one msgpack value, not a map of six pairs
        return None
    # (the keys, the kind, the version and the fields' types, compared as one tuple)
    shape = (
        m.__class__, k0, k1, k2, k3, k4, k5, t, v, v.__class__,
        seq.__class__, x.__class__, arg.__class__, regs.__class__,
    )  # fmt: skip
    if shape == _IOCTL_SHAPE:
        if (seq | x) >> 32:  # (either outside [0, 2**32))
            return None
        writable_only = False
    elif shape == _REPLY_SHAPE:
        if seq >> 32 or (x and (x >> _ERRNO_BITS or arg or regs)):
            return None
        writable_only = True
    else:
        return None
    out = []
    try:
        for r in regs:  # each checked as Region checks it
            (ka, addr), (kd, data), (kw, writable) = r
            if (
                (r.__class__, ka, kd, kw, addr.__class__, data.__class__, writable.__class__)
                != _REGION_SHAPE
                # (in [0, 2**63), an addr is in range and no data can reach past 2**64)
                or (addr >> 63 and (addr >> 64 or addr + len(data) > _ADDR_END))
                or (writable_only and not writable)
            ):
                return None
            region = _RegionFiller()
            region.addr = addr
            region.data = data
            region.writable = writable
            region.__class__ = Region
            out.append(region)
    except (TypeError, ValueError):  # a region that is not a map of three pairs
        return None
    if len(out) > 1:
        if len(out) == 2:  # (a SUPPL_RECV's block and scratch: _overlap's test, inline)
            a, b = out
            if (
                a.addr < b.addr + len(b.data)
                and b.addr < a.addr + len(a.data)
                and a.data
                and b.data
            ):
                return None
        elif _overlap(out):
            return None
    if writable_only:
        rec = _ReplyFiller()
        rec.errno = x
        rec.written = tuple(out)
        rec.why = None
        cls: type[Ioctl | IoctlReply] = IoctlReply
    else:
        rec = _IoctlFiller()
        rec.cmd = x
        rec.regions = tuple(out)
        cls = Ioctl
    rec.seq = seq
    rec.arg = arg
    rec.__class__ = cls
    return rec  # type: ignore[no-any-return]


def _pairs(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    m = dict(pairs)
    if len(m) != len(pairs):
        raise FrameError("a map has a duplicated key")
    return m


def _unpack(body: bytes | bytearray | memoryview) -> object:
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True, object_pairs_hook=_pairs)
    except FrameError:
        raise
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        # ExtraData, FormatError, StackError, invalid UTF-8, declared lengths past the end.
        raise FrameError(
            f"frame body is not one msgpack value: {type(exc).__name__} {exc}"
        ) from None


# --------------------------------------------------------------------------- encoding


def encode_call(
    seq: int,
    cmd: int,
    arg: bytes,
    regions: Iterable[tuple[int, bytes, bool]],
    max_frame: int = MAX_FRAME,
    nowait: bool = False,
) -> bytes:
    """``encode(Ioctl(...))`` of a request the caller built itself from disjoint regions
    ``(addr, data, writable)``: the same bytes, without building the records.  With
    ``nowait``, ``encode(RecvNowait(...))`` (``cmd`` must be SUPPL_RECV)."""
    spans = []
    for a, d, w in regions:  # (a loop: a comprehension is one more call per request)
        spans.append({"addr": a, "data": d, "writable": w})
    if nowait:
        if cmd != SUPPL_RECV:
            raise UsageError(f"recv_nowait stands for SUPPL_RECV, not cmd {cmd:#x}")
        m = {"v": PROTOCOL_VERSION, "t": "recv_nowait", "seq": seq, "arg": arg, "regions": spans}
        return _frame(m, "recv_nowait", max_frame)
    m = {"v": PROTOCOL_VERSION, "t": "ioctl", "seq": seq, "cmd": cmd, "arg": arg, "regions": spans}
    body = _Packer(use_bin_type=True).pack(m)
    if len(body) > max_frame:
        raise UsageError(f"ioctl frame body is {len(body)} bytes, limit {max_frame}")
    return _HEADER.pack(len(body)) + body


def encode_reply(
    seq: int,
    err: int,
    arg: bytes | bytearray = b"",
    written: Iterable[tuple[int, bytes | bytearray]] = (),
    max_frame: int = MAX_FRAME,
    why: Why | None = None,
) -> bytes:
    """``encode(IoctlReply(...))`` of a reply whose disjoint written regions are
    ``(addr, data)``: the same bytes, without building the records (a bytearray is packed
    as the bytes it holds, so the caller's buffers need no copy)."""
    spans = []
    for a, d in written:  # (a loop: a comprehension is one more call per reply)
        spans.append({"addr": a, "data": d, "writable": True})
    m: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "t": "reply",
        "seq": seq,
        "errno": err,
        "arg": arg,
        "written": spans,
    }
    if why is not None:
        m["why"] = _why_map(_why(why))
    body = _Packer(use_bin_type=True).pack(m)
    if len(body) > max_frame:
        raise UsageError(f"reply frame body is {len(body)} bytes, limit {max_frame}")
    return _HEADER.pack(len(body)) + body


_Packer = msgpack.Packer  # msgpack.packb is a Python wrapper around a new Packer


def _frame(m: dict[str, Any], kind: str, max_frame: int) -> bytes:
    body = _Packer(use_bin_type=True).pack(m)
    if len(body) > max_frame:
        raise UsageError(f"{kind} frame body is {len(body)} bytes, limit {max_frame}")
    return _HEADER.pack(len(body)) + body


def encode(msg: Message, *, max_frame: int = MAX_FRAME) -> bytes:
    """One frame: the 4-byte big-endian body length, then the msgpack map."""
    if not isinstance(msg, _MESSAGE_TYPES):
        raise UsageError(f"cannot encode a {type(msg).__name__}: not a frame message")
    body = msgpack.packb(msg.to_map(), use_bin_type=True)
    if len(body) > max_frame:
        raise UsageError(f"{msg.KIND} frame body is {len(body)} bytes, limit {max_frame}")
    return _HEADER.pack(len(body)) + body


def check_reply(request: Ioctl, reply: IoctlReply) -> None:
    """The client's check of a reply: same ``seq``, then :func:`check_written`."""
    if reply.seq != request.seq:
        raise FrameError(f"reply seq {reply.seq} answers no request (expected {request.seq})")
    check_written(reply, len(request.arg), [(r.addr, r.data, r.writable) for r in request.regions])


def check_written(
    reply: IoctlReply, arg_len: int, regions: Iterable[tuple[int, bytes, bool]]
) -> None:
    """A successful reply's ``arg`` is as long as the request's (``arg_len``), and each
    region it writes lies inside one writable ``(addr, data, writable)`` region the request
    sent.  A failed reply carries nothing (the decoder enforces it).  :class:`FrameError`
    names the first thing the server had no right to write."""
    if reply.errno:
        return
    if len(reply.arg) != arg_len:
        raise FrameError(
            f"reply {reply.seq} has a {len(reply.arg)}-byte arg, the request {arg_len} bytes"
        )
    for w in reply.written:
        addr, end = w.addr, w.addr + len(w.data)
        if addr == end:
            continue
        for a, d, writable in regions:
            if writable and a <= addr and end <= a + len(d):
                break
        else:
            raise FrameError(
                f"reply {reply.seq} writes [{addr:#x}, {end:#x}) outside the writable regions"
            )


def refusal(seq: int, code: int, reason: str) -> Answer:
    """The answer that refuses query ``seq`` with errno ``code``."""
    _int(code, "refusal errno", 1, MAX_ERRNO)
    return Answer(seq=seq, data={"errno": code, "reason": _str(reason, "refusal reason")})


def refused(data: dict[str, Any]) -> tuple[int, str] | None:
    """``(errno, reason)`` if an answer's ``data`` refuses the query, else None."""
    if data.keys() != {"errno", "reason"}:
        return None
    code, reason = data["errno"], data["reason"]
    if type(code) is not int or not 1 <= code <= MAX_ERRNO or type(reason) is not str:
        return None
    return code, reason


# --------------------------------------------------------------------------- decoder


class FrameDecoder:
    """Bytes in, messages out, for one direction of one connection.

    :meth:`feed` buffers bytes; :meth:`next_message` returns the next complete message
    or ``None`` when more bytes are needed (:meth:`feed_next` does both in one call).  A
    length word of 0 or above ``max_frame`` is refused as soon as its 4 bytes are in,
    before the body arrives.  With
    ``expect_increasing_seq`` (the default) the ``seq`` of client requests (all but Hello)
    must strictly increase over the connection.  The first :class:`FrameError` kills the
    decoder: every later call raises that same error and the buffer is dropped.
    """

    __slots__ = ("_error", "_expect_seq", "_last_seq", "_max_frame", "pending")

    def __init__(self, *, max_frame: int = MAX_FRAME, expect_increasing_seq: bool = True) -> None:
        _int(max_frame, "max_frame", 1, _U32)
        self._max_frame = max_frame
        self._expect_seq = bool(expect_increasing_seq)
        #: Bytes fed and not decoded yet (read-only to callers: empty, no frame is due).
        self.pending = bytearray()
        self._error: FrameError | None = None
        self._last_seq = -1  # (none yet: below every seq, so the check needs no None test)

    @property
    def max_frame(self) -> int:
        return self._max_frame

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet decoded (non-zero at EOF means a truncated frame)."""
        return len(self.pending)

    @property
    def error(self) -> FrameError | None:
        """The error that killed this decoder, if any."""
        return self._error

    @property
    def last_seq(self) -> int | None:
        """The ``seq`` of the last client request decoded."""
        return None if self._last_seq < 0 else self._last_seq

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes received from the peer (any chunking; empty is fine)."""
        if self._error is not None:
            raise self._error
        if not isinstance(data, _BYTES_LIKE):
            raise UsageError(f"feed takes bytes, not {type(data).__name__}")
        self.pending += data

    def feed_next(self, data: bytes | bytearray | memoryview = b"") -> Message | None:
        """:meth:`feed` ``data``, then :meth:`next_message`, in one call (a reader does
        both for every read)."""
        if self._error is not None:
            raise self._error
        buf = self.pending
        if data.__class__ is bytes and not buf and len(data) > _HDR:
            # One whole frame, as a read mostly brings: its body decoded from the read (a
            # slice: cheaper than a memoryview of it), not through the buffer.
            (length,) = _read_length(data)
            if len(data) == _HDR + length and length <= self._max_frame:
                return self._decode(data[_BODY])
        if data:
            if not isinstance(data, _BYTES_LIKE):
                raise UsageError(f"feed takes bytes, not {type(data).__name__}")
            buf += data
        if len(buf) < _HDR:
            return None
        (length,) = _read_length(buf)
        if length == 0 or length > self._max_frame:
            self._die(FrameError(f"frame length {length} is outside [1, {self._max_frame}]"))
        end = _HDR + length
        if len(buf) < end:
            return None
        msg = self._decode(buf[_HDR:end])  # (a copy: the buffer is resized below)
        del buf[:end]
        return msg

    def _decode(self, body: bytes | bytearray | memoryview) -> Message:
        """The message of one frame's body, its ``seq`` checked (a FrameError kills the
        decoder)."""
        try:
            msg = _decode_call(body) or from_map(_unpack(body))
            if self._expect_seq and isinstance(msg, _REQUEST_TYPES):
                seq = msg.seq
                if seq <= self._last_seq:
                    raise FrameError(f"{msg.KIND} seq {seq} out of order (last {self._last_seq})")
                self._last_seq = seq
        except FrameError as exc:
            self._die(exc)
        return msg

    def next_message(self) -> Message | None:
        """The next message, or ``None`` if the buffer does not hold a whole frame yet."""
        return self.feed_next()

    def __iter__(self) -> FrameDecoder:
        return self

    def __next__(self) -> Message:
        msg = self.next_message()
        if msg is None:
            raise StopIteration
        return msg

    def _die(self, exc: FrameError) -> NoReturn:
        self._error = exc
        self.pending = bytearray()
        raise exc
