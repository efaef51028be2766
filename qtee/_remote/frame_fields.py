"""The device server's frames: limits, :class:`FrameError` and the field checks (sans-IO).

What every record of :mod:`qtee._remote.frame_records` validates with: the protocol's
version and limits, the checks a record's fields pass when it is built (an
:class:`objects.UsageError`), and the map reading that turns a decoded body into a
record's fields (a :class:`FrameError`).  The protocol itself is described in
:mod:`qtee._remote.frames`.
"""

from __future__ import annotations

import struct
from typing import Any, Final, TypeVar

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
    "FrameError",
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


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)  # normalising a frozen record in __post_init__


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


_T = TypeVar("_T")


def _build(cls: type[_T], f: dict[str, Any], what: str) -> _T:
    try:
        return cls(**f)
    except UsageError as exc:
        raise FrameError(f"{what}: {exc}") from None
