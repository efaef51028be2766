"""The device server's frame records: one frozen record per frame kind (sans-IO).

Each record validates itself when built (:class:`objects.UsageError`), writes its map
(``to_map``: ``v``, ``t``, then its fields in a fixed order) and reads one
(``from_map``: exactly its keys, else :class:`~qtee._remote.frame_fields.FrameError`).
:data:`Message` is their union; the table of kinds, and the codec that frames them, are
in :mod:`qtee._remote.frames`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Self, TypeAlias

import msgpack

from objects import UsageError
from qtee._remote.frame_fields import (
    _SEQUENCES,
    _U32,
    _U64,
    MAX_ERRNO,
    MAX_WHY_DETAIL,
    MAX_WHY_NAME,
    NODES,
    PROTOCOL_VERSION,
    QUERIES,
    SUPPL_RECV,
    FrameError,
    _build,
    _bytes,
    _fields,
    _int,
    _set,
    _str,
)

__all__ = [
    "Answer",
    "Bye",
    "Close",
    "Denied",
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
    "Why",
]


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


class _CallFrame(_Control):
    """The call's frames: a :class:`_Control` map whose last field is a list of regions."""

    __slots__ = ()

    def to_map(self) -> dict[str, Any]:
        m = super().to_map()
        key = self._FIELDS[-1]
        m[key] = [r.to_map() for r in m[key]]
        return m

    @classmethod
    def from_map(cls, m: object) -> Self:
        return cls._from_fields(_fields(m, cls._KEYS, cls.KIND))

    @classmethod
    def _from_fields(cls, f: dict[str, Any]) -> Self:
        key = cls._FIELDS[-1]
        f[key] = _region_list(f[key], f"{cls.KIND}.{key}")
        cls._decode_more(f)
        return _build(cls, f, cls.KIND)

    @classmethod
    def _decode_more(cls, f: dict[str, Any]) -> None:
        """Decode the fields past ``_FIELDS`` a frame may carry (in place)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Ioctl(_CallFrame):
    """Client -> server: ``ioctl(fd, cmd, arg)`` with the memory it may read or write."""

    seq: int
    cmd: int
    arg: bytes = b""
    regions: tuple[Region, ...] = field(default=())

    KIND: ClassVar[str] = "ioctl"
    _FIELDS: ClassVar[tuple[str, ...]] = ("seq", "cmd", "arg", "regions")

    def __post_init__(self) -> None:
        _int(self.seq, "Ioctl.seq", 0, _U32)
        _int(self.cmd, "Ioctl.cmd", 0, _U32)
        _set(self, "arg", _bytes(self.arg, "Ioctl.arg"))
        _set(self, "regions", _regions(self.regions, "Ioctl.regions", writable_only=False))


@dataclass(frozen=True, slots=True, kw_only=True)
class RecvNowait(_CallFrame):
    """Client -> server: SUPPL_RECV that never waits (the model's ``recv_nowait``); its
    ``reply`` comes at once, EAGAIN when nothing is queued.  Fields as :class:`Ioctl`'s."""

    seq: int
    arg: bytes = b""
    regions: tuple[Region, ...] = field(default=())

    KIND: ClassVar[str] = "recv_nowait"
    #: The ioctl it stands for.
    cmd: ClassVar[int] = SUPPL_RECV
    _FIELDS: ClassVar[tuple[str, ...]] = ("seq", "arg", "regions")

    def __post_init__(self) -> None:
        _int(self.seq, "RecvNowait.seq", 0, _U32)
        _set(self, "arg", _bytes(self.arg, "RecvNowait.arg"))
        _set(self, "regions", _regions(self.regions, "RecvNowait.regions", writable_only=False))


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
class IoctlReply(_CallFrame):
    """Server -> client: the ioctl's outcome; on errno != 0 nothing is written back.
    ``why``: the secure side's note on a failed invocation (model-only, optional)."""

    seq: int
    errno: int = 0
    arg: bytes = b""
    written: tuple[Region, ...] = field(default=())
    why: Why | None = None

    KIND: ClassVar[str] = "reply"
    _FIELDS: ClassVar[tuple[str, ...]] = ("seq", "errno", "arg", "written")

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
        m = super(IoctlReply, self).to_map()
        if self.why is not None:
            m["why"] = _why_map(self.why)
        return m

    @classmethod
    def from_map(cls, m: object) -> IoctlReply:
        keys = cls._KEYS | {"why"} if type(m) is dict and "why" in m else cls._KEYS
        return cls._from_fields(_fields(m, keys, cls.KIND))

    @classmethod
    def _decode_more(cls, f: dict[str, Any]) -> None:
        if "why" in f:
            f["why"] = _why_of(f["why"])


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


def _region_list(value: object, what: str) -> tuple[Region, ...]:
    if type(value) is not list:
        raise FrameError(f"{what}: expected an array, got {type(value).__name__}")
    return tuple(Region.from_map(r) for r in value)
