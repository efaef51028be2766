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
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, NoReturn, Self, TypeAlias, TypeVar

import msgpack

from objects import DecodeError, UsageError

__all__ = [
    "MAX_ERRNO",
    "MAX_FRAME",
    "MAX_WHY_DETAIL",
    "MAX_WHY_NAME",
    "NODES",
    "PROTOCOL_VERSION",
    "QUERIES",
    "SUPPL_RECV",
    "Answer",
    "Bye",
    "Close",
    "Denied",
    "FrameDecoder",
    "FrameError",
    "Hello",
    "Ioctl",
    "IoctlReply",
    "Message",
    "Probe",
    "Query",
    "Ready",
    "RecvNowait",
    "Region",
    "ShmFd",
    "ShmFree",
    "Status",
    "Watch",
    "Welcome",
    "check_reply",
    "check_written",
    "encode",
    "encode_call",
    "encode_reply",
    "from_map",
    "refusal",
    "refused",
]

_BUF_TYPES: Final = (bytearray, memoryview)  # (tuples: a union is built per call)
_SEQUENCES: Final = (tuple, list)
_BYTES_LIKE: Final = (bytes, bytearray, memoryview)

#: 2: ``probe``/``status``, and trace streams acknowledged or queries refused in ``answer``.
#: 3: ``hello.node``, ``denied``, ``recv_nowait``, ``watch``/``ready``.
#: 4: ``reply.why``.
PROTOCOL_VERSION: Final = 4
#: Default limit on a frame body (the length word); configurable per decoder.
MAX_FRAME: Final = 8 * 1024 * 1024
#: Largest errno a reply may carry (the kernel's ``MAX_ERRNO``).
MAX_ERRNO: Final = 4095
#: Longest ``why`` name and detail a reply may carry (characters).
MAX_WHY_NAME: Final = 200
MAX_WHY_DETAIL: Final = 1000

#: What a ``query`` may ask for.
QUERIES: Final = ("info", "trace", "objects")
#: The device nodes a ``hello`` may open.
NODES: Final = ("tee", "teepriv")
#: ``TEE_IOC_SUPPL_RECV`` (``_IOR(0xa4, 6, struct tee_ioctl_buf_data)``): the command a
#: ``recv_nowait`` stands for.
SUPPL_RECV: Final = 0x8010_A406
_U32: Final = 0xFFFF_FFFF
_U64: Final = 0xFFFF_FFFF_FFFF_FFFF
_HEADER: Final = struct.Struct(">I")
_HDR: Final = _HEADER.size


class FrameError(DecodeError):
    """A frame from the peer is malformed; the decoder that raised it is dead."""


# --------------------------------------------------------------------------- field checks
# Exact type tests: msgpack ``true`` decodes to a bool, which ``isinstance(_, int)`` accepts.


def _int(value: object, what: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise UsageError(f"{what} must be an int in [{lo}, {hi}], not {value!r}")
    return value


def _str(value: object, what: str) -> str:
    if type(value) is not str:
        raise UsageError(f"{what} must be a str, not {type(value).__name__}")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise UsageError(f"{what} is not encodable as UTF-8") from None
    return value


def _bytes(value: object, what: str) -> bytes:
    if type(value) is bytes:
        return value
    if isinstance(value, _BUF_TYPES):
        return bytes(value)
    raise UsageError(f"{what} must be bytes, not {type(value).__name__}")


def _regions(value: object, what: str, *, writable_only: bool) -> tuple[Region, ...]:
    """A tuple of non-overlapping regions (empty ones overlap nothing)."""
    if not isinstance(value, _SEQUENCES):
        raise UsageError(f"{what} must be a tuple of Region, not {type(value).__name__}")
    spans: list[tuple[int, int]] = []
    for k, region in enumerate(value):
        if not isinstance(region, Region):
            raise UsageError(f"{what}[{k}] must be a Region, not {type(region).__name__}")
        if writable_only and not region.writable:
            raise UsageError(f"{what}[{k}] at {region.addr:#x} is not writable")
        if region.data:
            spans.append((region.addr, region.addr + len(region.data)))
    spans.sort()
    for (lo, hi), (nlo, _) in itertools.pairwise(spans):
        if nlo < hi:
            raise UsageError(f"{what}: regions [{lo:#x}, {hi:#x}) and {nlo:#x}.. overlap")
    return tuple(value)


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)  # normalising a frozen record in __post_init__


# --------------------------------------------------------------------------- records


class _Control:
    """The frames other than the call's two: a map of ``v``, ``t`` and ``_FIELDS`` in order."""

    __slots__ = ()
    KIND: ClassVar[str]
    _FIELDS: ClassVar[tuple[str, ...]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "_FIELDS" in cls.__dict__:
            cls._KEYS = frozenset({"v", "t", *cls._FIELDS})

    _KEYS: ClassVar[frozenset[str]]

    def to_map(self) -> dict[str, Any]:
        m: dict[str, Any] = {"v": PROTOCOL_VERSION, "t": self.KIND}
        for name in self._FIELDS:
            m[name] = getattr(self, name)
        return m

    @classmethod
    def from_map(cls, m: object) -> Self:
        return _build(cls, _fields(m, cls._KEYS, cls.KIND), cls.KIND)


@dataclass(frozen=True, slots=True, kw_only=True)
class Region:
    """``len(data)`` bytes of the caller's memory at ``addr``; ``writable``: the call may write."""

    addr: int
    data: bytes
    writable: bool = False

    _KEYS: ClassVar[frozenset[str]] = frozenset({"addr", "data", "writable"})

    def __post_init__(self) -> None:
        _int(self.addr, "Region.addr", 0, _U64)
        _set(self, "data", _bytes(self.data, "Region.data"))
        if type(self.writable) is not bool:
            raise UsageError(f"Region.writable must be a bool, not {self.writable!r}")
        if self.addr + len(self.data) > _U64 + 1:
            raise UsageError(f"Region at {self.addr:#x} ({len(self.data)} B) wraps the space")

    @property
    def end(self) -> int:
        """One past the last byte."""
        return self.addr + len(self.data)

    def to_map(self) -> dict[str, Any]:
        return {"addr": self.addr, "data": self.data, "writable": self.writable}

    @classmethod
    def from_map(cls, m: object) -> Region:
        return _build(cls, _fields(m, cls._KEYS, "region"), "region")


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello:
    """Client -> server, first frame: who is connecting."""

    client: str
    node: str = "tee"
    version: int = PROTOCOL_VERSION

    KIND: ClassVar[str] = "hello"
    _KEYS: ClassVar[frozenset[str]] = frozenset({"v", "t", "client", "node"})

    def __post_init__(self) -> None:
        _str(self.client, "Hello.client")
        if type(self.node) is not str or self.node not in NODES:
            raise UsageError(f"Hello.node must be one of {NODES}, not {self.node!r}")
        _int(self.version, "Hello.version", PROTOCOL_VERSION, PROTOCOL_VERSION)

    def to_map(self) -> dict[str, Any]:
        return {"v": self.version, "t": self.KIND, "client": self.client, "node": self.node}

    @classmethod
    def from_map(cls, m: object) -> Hello:
        return _build(cls, _fields(m, cls._KEYS, cls.KIND), cls.KIND)


@dataclass(frozen=True, slots=True, kw_only=True)
class Welcome:
    """Server -> client, answer to Hello: what TEE_IOC_VERSION will report."""

    impl_id: int
    gen_caps: int
    server: str
    version: int = PROTOCOL_VERSION

    KIND: ClassVar[str] = "welcome"
    _KEYS: ClassVar[frozenset[str]] = frozenset({"v", "t", "impl_id", "gen_caps", "server"})

    def __post_init__(self) -> None:
        _int(self.impl_id, "Welcome.impl_id", 0, _U32)
        _int(self.gen_caps, "Welcome.gen_caps", 0, _U32)
        _str(self.server, "Welcome.server")
        _int(self.version, "Welcome.version", PROTOCOL_VERSION, PROTOCOL_VERSION)

    def to_map(self) -> dict[str, Any]:
        return {
            "v": self.version,
            "t": self.KIND,
            "impl_id": self.impl_id,
            "gen_caps": self.gen_caps,
            "server": self.server,
        }

    @classmethod
    def from_map(cls, m: object) -> Welcome:
        return _build(cls, _fields(m, cls._KEYS, cls.KIND), cls.KIND)


@dataclass(frozen=True, slots=True, kw_only=True)
class Denied(_Control):
    """Server -> client, answer to Hello instead of Welcome: the node cannot be opened
    (``errno`` as the open fails: ENOENT no such node, EBUSY held); the server closes."""

    errno: int
    reason: str = ""

    KIND: ClassVar[str] = "denied"
    _FIELDS: ClassVar[tuple[str, ...]] = (
        "errno",
        "reason",
    )

    def __post_init__(self) -> None:
        _int(self.errno, "Denied.errno", 1, MAX_ERRNO)
        _str(self.reason, "Denied.reason")


@dataclass(frozen=True, slots=True, kw_only=True)
class Ioctl:
    """Client -> server: ``ioctl(fd, cmd, arg)`` with the memory it may read or write."""

    seq: int
    cmd: int
    arg: bytes = b""
    regions: tuple[Region, ...] = field(default=())

    KIND: ClassVar[str] = "ioctl"
    _KEYS: ClassVar[frozenset[str]] = frozenset({"v", "t", "seq", "cmd", "arg", "regions"})

    def __post_init__(self) -> None:
        _int(self.seq, "Ioctl.seq", 0, _U32)
        _int(self.cmd, "Ioctl.cmd", 0, _U32)
        _set(self, "arg", _bytes(self.arg, "Ioctl.arg"))
        _set(self, "regions", _regions(self.regions, "Ioctl.regions", writable_only=False))

    def to_map(self) -> dict[str, Any]:
        return {
            "v": PROTOCOL_VERSION,
            "t": self.KIND,
            "seq": self.seq,
            "cmd": self.cmd,
            "arg": self.arg,
            "regions": [r.to_map() for r in self.regions],
        }

    @classmethod
    def from_map(cls, m: object) -> Ioctl:
        f = _fields(m, cls._KEYS, cls.KIND)
        f["regions"] = _region_list(f["regions"], "ioctl.regions")
        return _build(cls, f, cls.KIND)


@dataclass(frozen=True, slots=True, kw_only=True)
class RecvNowait:
    """Client -> server: SUPPL_RECV that never waits (the model's ``recv_nowait``); its
    ``reply`` comes at once, EAGAIN when nothing is queued.  Fields as :class:`Ioctl`'s."""

    seq: int
    arg: bytes = b""
    regions: tuple[Region, ...] = field(default=())

    KIND: ClassVar[str] = "recv_nowait"
    #: The ioctl it stands for.
    cmd: ClassVar[int] = SUPPL_RECV
    _KEYS: ClassVar[frozenset[str]] = frozenset({"v", "t", "seq", "arg", "regions"})

    def __post_init__(self) -> None:
        _int(self.seq, "RecvNowait.seq", 0, _U32)
        _set(self, "arg", _bytes(self.arg, "RecvNowait.arg"))
        _set(self, "regions", _regions(self.regions, "RecvNowait.regions", writable_only=False))

    def to_map(self) -> dict[str, Any]:
        return {
            "v": PROTOCOL_VERSION,
            "t": self.KIND,
            "seq": self.seq,
            "arg": self.arg,
            "regions": [r.to_map() for r in self.regions],
        }

    @classmethod
    def from_map(cls, m: object) -> RecvNowait:
        f = _fields(m, cls._KEYS, cls.KIND)
        f["regions"] = _region_list(f["regions"], "recv_nowait.regions")
        return _build(cls, f, cls.KIND)


#: A reply's ``why``: (result, interface error name, detail).
Why: TypeAlias = tuple[int, str, str]


def _why(value: object) -> Why:
    if type(value) is not tuple or len(value) != 3:
        raise UsageError(f"IoctlReply.why must be (result, name, detail), not {value!r}")
    result, name, detail = value
    if type(result) is not int or result == 0 or not -0x8000_0000 <= result <= 0x7FFF_FFFF:
        raise UsageError(f"IoctlReply.why result must be a non-zero s32, not {result!r}")
    for what, text, limit in (("name", name, MAX_WHY_NAME), ("detail", detail, MAX_WHY_DETAIL)):
        if len(_str(text, f"IoctlReply.why {what}")) > limit:
            raise UsageError(f"IoctlReply.why {what} is over {limit} characters")
    return (result, name, detail)


@dataclass(frozen=True, slots=True, kw_only=True)
class IoctlReply:
    """Server -> client: the ioctl's outcome; on errno != 0 nothing is written back.
    ``why``: the secure side's note on a failed invocation (model-only, optional)."""

    seq: int
    errno: int = 0
    arg: bytes = b""
    written: tuple[Region, ...] = field(default=())
    why: Why | None = None

    KIND: ClassVar[str] = "reply"
    _KEYS: ClassVar[frozenset[str]] = frozenset({"v", "t", "seq", "errno", "arg", "written"})
    _WHY_KEYS: ClassVar[frozenset[str]] = _KEYS | {"why"}

    def __post_init__(self) -> None:
        _int(self.seq, "IoctlReply.seq", 0, _U32)
        _int(self.errno, "IoctlReply.errno", 0, MAX_ERRNO)
        _set(self, "arg", _bytes(self.arg, "IoctlReply.arg"))
        _set(self, "written", _regions(self.written, "IoctlReply.written", writable_only=True))
        if self.errno and (self.arg or self.written):
            raise UsageError(f"IoctlReply with errno {self.errno} must not write anything back")
        if self.why is not None:
            _set(self, "why", _why(self.why))
            if self.errno:
                raise UsageError(f"IoctlReply with errno {self.errno} has no why")

    def to_map(self) -> dict[str, Any]:
        m = {
            "v": PROTOCOL_VERSION,
            "t": self.KIND,
            "seq": self.seq,
            "errno": self.errno,
            "arg": self.arg,
            "written": [r.to_map() for r in self.written],
        }
        if self.why is not None:
            m["why"] = _why_map(self.why)
        return m

    @classmethod
    def from_map(cls, m: object) -> IoctlReply:
        keys = cls._WHY_KEYS if type(m) is dict and "why" in m else cls._KEYS
        f = _fields(m, keys, cls.KIND)
        f["written"] = _region_list(f["written"], "reply.written")
        if "why" in f:
            f["why"] = _why_of(f["why"])
        return _build(cls, f, cls.KIND)


_WHY_MAP_KEYS: Final = frozenset({"result", "name", "detail"})


def _why_map(why: Why) -> dict[str, Any]:
    return {"result": why[0], "name": why[1], "detail": why[2]}


def _why_of(value: object) -> Why:
    f = _fields(value, _WHY_MAP_KEYS, "reply.why")
    # _build's UsageError -> FrameError: a tuple checked by IoctlReply itself
    return (f["result"], f["name"], f["detail"])


@dataclass(frozen=True, slots=True, kw_only=True)
class Close(_Control):
    """Client -> server: ``close(fd)``; a request, so it takes the next ``seq``."""

    seq: int

    KIND: ClassVar[str] = "close"
    _FIELDS: ClassVar[tuple[str, ...]] = ("seq",)

    def __post_init__(self) -> None:
        _int(self.seq, "Close.seq", 0, _U32)


@dataclass(frozen=True, slots=True, kw_only=True)
class Bye(_Control):
    """Either side, last frame: why the connection ends."""

    reason: str = ""

    KIND: ClassVar[str] = "bye"
    _FIELDS: ClassVar[tuple[str, ...]] = ("reason",)

    def __post_init__(self) -> None:
        _str(self.reason, "Bye.reason")


@dataclass(frozen=True, slots=True, kw_only=True)
class ShmFd(_Control):
    """Server -> client, before the reply to a SHM_ALLOC: shm ``id`` of ``size`` bytes; the
    fd of its memory file rides on this frame's bytes (SCM_RIGHTS)."""

    seq: int
    id: int
    size: int

    KIND: ClassVar[str] = "shm"
    _FIELDS: ClassVar[tuple[str, ...]] = (
        "seq",
        "id",
        "size",
    )

    def __post_init__(self) -> None:
        _int(self.seq, "ShmFd.seq", 0, _U32)
        _int(self.id, "ShmFd.id", 1, 0x7FFF_FFFF)
        _int(self.size, "ShmFd.size", 0, _U64)


@dataclass(frozen=True, slots=True, kw_only=True)
class ShmFree(_Control):
    """Client -> server: ``close`` of a shm fd (the owner's reference goes)."""

    seq: int
    id: int

    KIND: ClassVar[str] = "shm_free"
    _FIELDS: ClassVar[tuple[str, ...]] = (
        "seq",
        "id",
    )

    def __post_init__(self) -> None:
        _int(self.seq, "ShmFree.seq", 0, _U32)
        _int(self.id, "ShmFree.id", 1, 0x7FFF_FFFF)


@dataclass(frozen=True, slots=True, kw_only=True)
class Query(_Control):
    """Client -> server: describe yourself (``info``) or stream crossings (``trace``)."""

    seq: int
    what: str

    KIND: ClassVar[str] = "query"
    _FIELDS: ClassVar[tuple[str, ...]] = (
        "seq",
        "what",
    )

    def __post_init__(self) -> None:
        _int(self.seq, "Query.seq", 0, _U32)
        if self.what not in QUERIES:
            raise UsageError(f"Query.what must be one of {QUERIES}, not {self.what!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Answer(_Control):
    """Server -> client: what a query asked for, as a map with str keys."""

    seq: int
    data: dict[str, Any]

    KIND: ClassVar[str] = "answer"
    _FIELDS: ClassVar[tuple[str, ...]] = (
        "seq",
        "data",
    )

    def __post_init__(self) -> None:
        _int(self.seq, "Answer.seq", 0, _U32)
        if type(self.data) is not dict or not all(type(k) is str for k in self.data):
            raise UsageError("Answer.data must be a dict with str keys")

    def __hash__(self) -> int:  # data is a dict: hash its one encoding
        return hash((self.seq, msgpack.packb(self.data, use_bin_type=True)))


@dataclass(frozen=True, slots=True, kw_only=True)
class Probe(_Control):
    """Client -> server: how is call ``call`` doing?  (Sent once its deadline passed.)"""

    seq: int
    call: int

    KIND: ClassVar[str] = "probe"
    _FIELDS: ClassVar[tuple[str, ...]] = (
        "seq",
        "call",
    )

    def __post_init__(self) -> None:
        _int(self.seq, "Probe.seq", 0, _U32)
        _int(self.call, "Probe.call", 0, _U32)


@dataclass(frozen=True, slots=True, kw_only=True)
class Status(_Control):
    """Server -> client, answer to probe ``seq``: call ``call`` is ``running`` (or its reply
    was sent already); ``callback``: it waits on a callback now; ``quiet_ms``: how long it
    has run since it started or its last callback was answered (0 in a callback)."""

    seq: int
    call: int
    running: bool
    callback: bool = False
    quiet_ms: int = 0

    KIND: ClassVar[str] = "status"
    _FIELDS: ClassVar[tuple[str, ...]] = (
        "seq",
        "call",
        "running",
        "callback",
        "quiet_ms",
    )

    def __post_init__(self) -> None:
        _int(self.seq, "Status.seq", 0, _U32)
        _int(self.call, "Status.call", 0, _U32)
        for name in ("running", "callback"):
            if type(getattr(self, name)) is not bool:
                raise UsageError(f"Status.{name} must be a bool, not {getattr(self, name)!r}")
        _int(self.quiet_ms, "Status.quiet_ms", 0, _U64)
        if self.callback and not self.running:
            raise UsageError("Status: a call that is not running waits on no callback")


@dataclass(frozen=True, slots=True, kw_only=True)
class Watch(_Control):
    """Client -> server: send ``ready`` frames for this fd from now on (answered like a
    query: ``{"watching": true}`` or a refusal)."""

    seq: int

    KIND: ClassVar[str] = "watch"
    _FIELDS: ClassVar[tuple[str, ...]] = ("seq",)

    def __post_init__(self) -> None:
        _int(self.seq, "Watch.seq", 0, _U32)


@dataclass(frozen=True, slots=True, kw_only=True)
class Ready(_Control):
    """Server -> a watching client: a SUPPL_RECV on this fd may find work now (a request
    was queued, or the fd's queue ended)."""

    KIND: ClassVar[str] = "ready"
    _FIELDS: ClassVar[tuple[str, ...]] = ()


Message: TypeAlias = (
    Hello
    | Welcome
    | Denied
    | Ioctl
    | RecvNowait
    | IoctlReply
    | Close
    | ShmFd
    | ShmFree
    | Query
    | Answer
    | Probe
    | Status
    | Watch
    | Ready
    | Bye
)

_KINDS: Final[dict[str, type[Message]]] = {
    c.KIND: c
    for c in (
        Hello,
        Welcome,
        Denied,
        Ioctl,
        RecvNowait,
        IoctlReply,
        Close,
        ShmFd,
        ShmFree,
        Query,
        Answer,
        Probe,
        Status,
        Watch,
        Ready,
        Bye,
    )
}
# seq strictly increasing
_REQUEST_TYPES: Final = (Ioctl, RecvNowait, Close, ShmFree, Query, Probe, Watch)
_MESSAGE_TYPES: Final = tuple(_KINDS.values())


# --------------------------------------------------------------------------- map decoding


def _fields(m: object, keys: frozenset[str], what: str) -> dict[str, Any]:
    """Fast path: the exact key set; else say which keys are missing or unknown."""
    if type(m) is not dict:
        raise FrameError(f"{what}: expected a map, got {type(m).__name__}")
    if m.keys() != keys:
        missing = ", ".join(sorted(repr(k) for k in keys - m.keys()))
        unknown = ", ".join(sorted(repr(k) for k in m.keys() - keys))
        problems = [f"missing keys [{missing}]"] if missing else []
        problems += [f"unknown keys [{unknown}]"] if unknown else []
        raise FrameError(f"{what}: {', '.join(problems)}")
    f = dict(m)
    if "v" in keys:  # a message, not a region: check and drop the version and the type tag
        _check_version(f.pop("v"))
        if f.pop("t") != what:
            raise FrameError(f"{what}: type tag is {m['t']!r}")
    return f


def _check_version(v: object) -> None:
    if type(v) is not int or v != PROTOCOL_VERSION:
        raise FrameError(f"protocol version {v!r}, this side speaks {PROTOCOL_VERSION}")


def _region_list(value: object, what: str) -> tuple[Region, ...]:
    if type(value) is not list:
        raise FrameError(f"{what}: expected an array, got {type(value).__name__}")
    return tuple(Region.from_map(r) for r in value)


_T = TypeVar("_T")


def _build(cls: type[_T], f: dict[str, Any], what: str) -> _T:
    try:
        return cls(**f)
    except UsageError as exc:
        raise FrameError(f"{what}: {exc}") from None


def from_map(m: object) -> Message:
    """Decode one message from an unpacked body; :class:`FrameError` if it is not one."""
    if type(m) is not dict:
        raise FrameError(f"frame body is a msgpack {type(m).__name__}, not a map")
    if "v" not in m:
        raise FrameError("frame body has no protocol version 'v'")
    _check_version(m["v"])
    kind = m.get("t")
    if kind in ("ioctl", "reply"):  # a tuple: kind may be unhashable
        fast = _fast_call_frame(m, kind)
        if fast is not None:
            return fast
    cls = _KINDS.get(kind) if type(kind) is str else None
    if cls is None:
        raise FrameError(f"unknown message type {kind!r}")
    return cls.from_map(m)


# The two frames of every call, decoded without building kwargs and re-validating through
# __post_init__: the same checks, inline.  Anything unusual (a wrong key, type or range,
# overlapping regions) returns None and the general path decodes it, or says what is wrong.
_IOCTL_KEYS: Final = frozenset({"v", "t", "seq", "cmd", "arg", "regions"})
_REPLY_KEYS: Final = frozenset({"v", "t", "seq", "errno", "arg", "written"})
_REGION_KEYS: Final = frozenset({"addr", "data", "writable"})
_new = object.__new__
_setattr = object.__setattr__


def _fast_regions(value: object, writable_only: bool) -> tuple[Region, ...] | None:
    if type(value) is not list:
        return None
    out = []
    for r in value:
        if type(r) is not dict or r.keys() != _REGION_KEYS:
            return None
        addr, data, writable = r["addr"], r["data"], r["writable"]
        if (
            type(addr) is not int
            or type(data) is not bytes
            or type(writable) is not bool
            or not 0 <= addr <= _U64
            or addr + len(data) > _U64 + 1
            or (writable_only and not writable)
        ):
            return None
        region = _new(Region)
        _setattr(region, "addr", addr)
        _setattr(region, "data", data)
        _setattr(region, "writable", writable)
        out.append(region)
    if len(out) > 1:
        spans = sorted((r.addr, r.addr + len(r.data)) for r in out if r.data)
        if any(nlo < hi for (_, hi), (nlo, _) in itertools.pairwise(spans)):
            return None
    return tuple(out)


def _fast_call_frame(m: dict[Any, Any], kind: str) -> Ioctl | IoctlReply | None:
    if kind == "ioctl":
        if m.keys() != _IOCTL_KEYS:
            return None
        seq, cmd, arg = m["seq"], m["cmd"], m["arg"]
        if type(cmd) is not int or not 0 <= cmd <= _U32:
            return None
        regions = _fast_regions(m["regions"], False)
        msg: Ioctl | IoctlReply = _new(Ioctl)
        _setattr(msg, "cmd", cmd)
        _setattr(msg, "regions", regions)
    else:
        if m.keys() != _REPLY_KEYS:
            return None
        seq, err, arg = m["seq"], m["errno"], m["arg"]
        regions = _fast_regions(m["written"], True)
        if type(err) is not int or not 0 <= err <= MAX_ERRNO or (err and (arg or regions)):
            return None
        msg = _new(IoctlReply)
        _setattr(msg, "errno", err)
        _setattr(msg, "written", regions)
        _setattr(msg, "why", None)
    if regions is None or type(seq) is not int or not 0 <= seq <= _U32 or type(arg) is not bytes:
        return None
    _setattr(msg, "seq", seq)
    _setattr(msg, "arg", arg)
    return msg


def _pairs(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    m = dict(pairs)
    if len(m) != len(pairs):
        raise FrameError("a map has a duplicated key")
    return m


def _unpack(body: memoryview) -> object:
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
    *,
    max_frame: int = MAX_FRAME,
    nowait: bool = False,
) -> bytes:
    """``encode(Ioctl(...))`` of a request the caller built itself from disjoint regions
    ``(addr, data, writable)``: the same bytes, without building the records.  With
    ``nowait``, ``encode(RecvNowait(...))`` (``cmd`` must be SUPPL_RECV)."""
    spans = [{"addr": a, "data": d, "writable": w} for a, d, w in regions]
    if nowait:
        if cmd != SUPPL_RECV:
            raise UsageError(f"recv_nowait stands for SUPPL_RECV, not cmd {cmd:#x}")
        m = {"v": PROTOCOL_VERSION, "t": "recv_nowait", "seq": seq, "arg": arg, "regions": spans}
        return _frame(m, "recv_nowait", max_frame)
    m = {"v": PROTOCOL_VERSION, "t": "ioctl", "seq": seq, "cmd": cmd, "arg": arg, "regions": spans}
    return _frame(m, "ioctl", max_frame)


def encode_reply(
    seq: int,
    err: int,
    arg: bytes = b"",
    written: Iterable[tuple[int, bytes]] = (),
    *,
    max_frame: int = MAX_FRAME,
    why: Why | None = None,
) -> bytes:
    """``encode(IoctlReply(...))`` of a reply whose disjoint written regions are
    ``(addr, data)``: the same bytes, without building the records."""
    m: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "t": "reply",
        "seq": seq,
        "errno": err,
        "arg": arg,
        "written": [{"addr": a, "data": d, "writable": True} for a, d in written],
    }
    if why is not None:
        m["why"] = _why_map(_why(why))
    return _frame(m, "reply", max_frame)


def _frame(m: dict[str, Any], kind: str, max_frame: int) -> bytes:
    body = msgpack.packb(m, use_bin_type=True)
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
    or ``None`` when more bytes are needed.  A length word of 0 or above ``max_frame`` is
    refused as soon as its 4 bytes are in, before the body arrives.  With
    ``expect_increasing_seq`` (the default) the ``seq`` of client requests (all but Hello)
    must strictly increase over the connection.  The first :class:`FrameError` kills the
    decoder: every later call raises that same error and the buffer is dropped.
    """

    __slots__ = ("_buf", "_error", "_expect_seq", "_last_seq", "_max_frame")

    def __init__(self, *, max_frame: int = MAX_FRAME, expect_increasing_seq: bool = True) -> None:
        _int(max_frame, "max_frame", 1, _U32)
        self._max_frame = max_frame
        self._expect_seq = bool(expect_increasing_seq)
        self._buf = bytearray()
        self._error: FrameError | None = None
        self._last_seq: int | None = None

    @property
    def max_frame(self) -> int:
        return self._max_frame

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet decoded (non-zero at EOF means a truncated frame)."""
        return len(self._buf)

    @property
    def error(self) -> FrameError | None:
        """The error that killed this decoder, if any."""
        return self._error

    @property
    def last_seq(self) -> int | None:
        """The ``seq`` of the last client request decoded."""
        return self._last_seq

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes received from the peer (any chunking; empty is fine)."""
        if self._error is not None:
            raise self._error
        if not isinstance(data, _BYTES_LIKE):
            raise UsageError(f"feed takes bytes, not {type(data).__name__}")
        self._buf += data

    def next_message(self) -> Message | None:
        """The next message, or ``None`` if the buffer does not hold a whole frame yet."""
        if self._error is not None:
            raise self._error
        buf = self._buf
        if len(buf) < _HDR:
            return None
        (length,) = _HEADER.unpack_from(buf, 0)
        if length == 0 or length > self._max_frame:
            self._die(FrameError(f"frame length {length} is outside [1, {self._max_frame}]"))
        end = _HDR + length
        if len(buf) < end:
            return None
        try:
            with memoryview(buf) as view, view[_HDR:end] as body:
                msg = from_map(_unpack(body))
            if self._expect_seq and isinstance(msg, _REQUEST_TYPES):
                seq = msg.seq
                if self._last_seq is not None and seq <= self._last_seq:
                    raise FrameError(f"{msg.KIND} seq {seq} out of order (last {self._last_seq})")
                self._last_seq = seq
        except FrameError as exc:
            self._die(exc)
        del buf[:end]
        return msg

    def __iter__(self) -> FrameDecoder:
        return self

    def __next__(self) -> Message:
        msg = self.next_message()
        if msg is None:
            raise StopIteration
        return msg

    def _die(self, exc: FrameError) -> NoReturn:
        self._error = exc
        self._buf = bytearray()
        raise exc
