"""The time listener's messages (listener id 0xB), byte for byte (sans-IO).

QTEE's time listener shares one 20 KiB buffer with the supplicant, like the FS listener
(:mod:`supplicant.fs_msg`).  A request is written at its start and the response is
written over it, in place.  Both begin with a u32 command id, and the response echoes
the request's id (the real service never rewrites it; it is simply left in place).
Every struct is packed and little-endian (the supplicant runs on aarch64, LP64).

**Where the numbers come from.**  ``qualcomm-linux/pkg-minkipc:listeners/libtimeservice/``
``time_msg.h`` (the ids, ``tz_time_spec``, ``tz_time`` and every request and response
struct) and ``atime.c`` (what each command puts in its response), commit ``4dbe8a3``.
Only facts were taken: numbers, field order, sizes and behaviour.

Every request is the bare u32 id (4 bytes).  The responses, with their total sizes:

=====  ============  ===================================================  ====
 id     command       response after the u32 id                            size
=====  ============  ===================================================  ====
0x302  GET_UTC_SEC   u32 tv_sec, u32 tv_nsec, i32 ret                      16
0x303  GET_SYSTIME   i32 tm_sec, tm_min, tm_hour, tm_mday, tm_mon,         44
                     tm_year, tm_wday, tm_yday, tm_isdst; i32 ret
0x304  GET_TIME_MS   u64 ms (``unsigned long``; there is no ret field)     12
0x305  GET_HLOS_UTC  same struct and values as GET_UTC_SEC                 16
0x306  END           i32 ret = 0                                           8
other  (error)       i32 ret = -1 (``tz_time_err_rsp``)                    8
=====  ============  ===================================================  ====

0x301 (``TIME_START``) and 0x7FFFFFFF (``UNKNOWN``) are ids in the header's enum, but the
service's dispatch has no case for them: like any other id they get the error answer.

**What the values mean** (all from ``CLOCK_REALTIME``; the real service reads no
monotonic clock):

* GET_UTC_SEC and GET_HLOS_UTC: the wall clock as ``tv_sec`` (truncated to 32 bits by a
  cast) and ``tv_nsec``; ``ret`` is ``clock_gettime``'s result (0, or -1 with both
  fields 0).
* GET_SYSTIME: ``gmtime_r`` of the wall clock's seconds, so UTC, ``tm_isdst`` = 0,
  ``tm_year`` counted from 1900 and ``tm_mon`` from 0.  ``ret`` is 0, or -1 with all
  nine fields 0.
* GET_TIME_MS: ``tv_sec * 1000``, plus ``tv_nsec / 1000000`` only when ``tv_nsec`` is
  *greater than* 1000000 (so exactly 1 ms past the second adds nothing).  A clock
  failure answers ``(unsigned long)-1`` = 2**64 - 1.

Decoding a request accepts trailing bytes, because the listener hands over the whole
shared buffer.  (The real dispatch also refuses a shared buffer shorter than
``TZ_MAX_BUF_LEN`` = 20040 bytes as a transport error; that check belongs to whoever
owns the buffer, not to this codec.)  Decoders raise only :class:`TimeDecodeError`,
whatever the bytes.  Records validate their fields when they are built and raise
:class:`TimeUsageError`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar, Final

from objects import DecodeError, UsageError
from supplicant._listener_msg import (
    U64_MAX,
    Codec,
    MessageKit,
    Record,
    StatusRecord,
    UnsupportedRecord,
    Wire,
    id_wire,
)

__all__ = [
    "MAX_BUF_LEN",
    "TIME_SERVICE_BUF_LEN",
    "TIME_SERVICE_ID",
    "TIME_MS_FAILURE",
    "TM_ZERO",
    "EndRequest",
    "GetHlosUtcRequest",
    "GetSystimeRequest",
    "GetTimeMsRequest",
    "GetUtcSecRequest",
    "StatusResponse",
    "SystimeResponse",
    "TimeCmd",
    "TimeDecodeError",
    "TimeMsResponse",
    "TimeRequest",
    "TimeResponse",
    "TimeSpecResponse",
    "TimeUsageError",
    "TzTime",
    "UnsupportedRequest",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "response_size",
]

TIME_SERVICE_ID: Final = 0xB
TIME_SERVICE_BUF_LEN: Final = 20 * 1024
MAX_BUF_LEN: Final = 20000 + 40  # TZ_MAX_BUF_LEN: the dispatch's minimum buffer length

TIME_MS_FAILURE: Final = U64_MAX  # GET_TIME_MS's answer when the clock fails


class TimeCmd(enum.IntEnum):
    """``tz_time_msg_cmd_type``: consecutive from TIME_START = 0x301."""

    TIME_START = 0x301
    GET_UTC_SEC = 0x302
    GET_SYSTIME = 0x303
    GET_TIME_MS = 0x304
    GET_HLOS_UTC = 0x305
    TIME_END = 0x306
    UNKNOWN = 0x7FFFFFFF


class TimeDecodeError(DecodeError):
    """Time listener bytes are malformed (the message says which command and field)."""


class TimeUsageError(UsageError):
    """A time message field or TimeService argument has the wrong type or range."""


_KIT: Final = MessageKit(TimeDecodeError, TimeUsageError, TimeCmd)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Record(Record):
    KIT: ClassVar[MessageKit] = _KIT


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True, kw_only=True)
class GetUtcSecRequest(_Record):
    """GET_UTC_SEC: the wall clock as seconds and nanoseconds."""

    CMD: ClassVar[TimeCmd] = TimeCmd.GET_UTC_SEC


@dataclass(frozen=True, slots=True, kw_only=True)
class GetSystimeRequest(_Record):
    """GET_SYSTIME: the wall clock broken down in UTC (``struct tm``)."""

    CMD: ClassVar[TimeCmd] = TimeCmd.GET_SYSTIME


@dataclass(frozen=True, slots=True, kw_only=True)
class GetTimeMsRequest(_Record):
    """GET_TIME_MS: the wall clock in milliseconds."""

    CMD: ClassVar[TimeCmd] = TimeCmd.GET_TIME_MS


@dataclass(frozen=True, slots=True, kw_only=True)
class GetHlosUtcRequest(_Record):
    """GET_HLOS_UTC: the same answer as GET_UTC_SEC."""

    CMD: ClassVar[TimeCmd] = TimeCmd.GET_HLOS_UTC


@dataclass(frozen=True, slots=True, kw_only=True)
class EndRequest(_Record):
    """END: a no-op that answers 0."""

    CMD: ClassVar[TimeCmd] = TimeCmd.TIME_END


@dataclass(frozen=True, slots=True, kw_only=True)
class UnsupportedRequest(UnsupportedRecord):
    """Any id the dispatch has no case for (TIME_START and UNKNOWN included)."""

    KIT: ClassVar[MessageKit] = _KIT


TimeRequest = (
    GetUtcSecRequest
    | GetSystimeRequest
    | GetTimeMsRequest
    | GetHlosUtcRequest
    | EndRequest
    | UnsupportedRequest
)


# --------------------------------------------------------------------------- responses


_TM_FIELDS: Final = (
    "tm_sec",
    "tm_min",
    "tm_hour",
    "tm_mday",
    "tm_mon",
    "tm_year",
    "tm_wday",
    "tm_yday",
    "tm_isdst",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class TzTime(_Record):
    """``tz_time``: a ``struct tm`` as nine i32 fields, in wire order."""

    WIRE: ClassVar[tuple[Wire, ...]] = tuple(Wire(name, "i") for name in _TM_FIELDS)
    tm_sec: int
    tm_min: int
    tm_hour: int
    tm_mday: int
    tm_mon: int
    tm_year: int
    tm_wday: int
    tm_yday: int
    tm_isdst: int

    def fields(self) -> tuple[int, ...]:
        """The nine values in wire order."""
        return self.pack_fields()


TM_ZERO: Final = TzTime(
    tm_sec=0, tm_min=0, tm_hour=0, tm_mday=0, tm_mon=0, tm_year=0, tm_wday=0, tm_yday=0, tm_isdst=0
)
_TIMESPEC_CMDS: Final = frozenset({TimeCmd.GET_UTC_SEC, TimeCmd.GET_HLOS_UTC})
_RET: Final = Wire("ret", "i")


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeSpecResponse(_Record):
    """GET_UTC_SEC's or GET_HLOS_UTC's answer (``tz_time_getutcsec_rsp``)."""

    WIRE: ClassVar[tuple[Wire, ...]] = (
        id_wire(
            "a timespec response answers GET_UTC_SEC or GET_HLOS_UTC, not {:#x}",
            _TIMESPEC_CMDS,
            u32=True,
        ),
        Wire("tv_sec", "I"),
        Wire("tv_nsec", "I"),
        _RET,
    )
    cmd_id: int
    tv_sec: int
    tv_nsec: int
    ret: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SystimeResponse(_Record):
    """GET_SYSTIME's answer (``tz_time_getsystime_rsp``)."""

    CMD: ClassVar[TimeCmd] = TimeCmd.GET_SYSTIME
    WIRE: ClassVar[tuple[Wire, ...]] = (
        Wire("time", "9i", kind="is", types=(TzTime,), noun="a TzTime"),
        _RET,
    )
    time: TzTime
    ret: int


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeMsResponse(_Record):
    """GET_TIME_MS's answer (``tz_time_gettimems_rsp``): milliseconds, no status."""

    CMD: ClassVar[TimeCmd] = TimeCmd.GET_TIME_MS
    WIRE: ClassVar[tuple[Wire, ...]] = (Wire("ms", "Q"),)
    ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusResponse(StatusRecord):
    """The 8-byte ``{id, i32 ret}`` answer: END's (ret 0) and the error one (ret -1)."""

    KIT: ClassVar[MessageKit] = _KIT


TimeResponse = TimeSpecResponse | SystimeResponse | TimeMsResponse | StatusResponse

_CODEC: Final = Codec[TimeRequest, TimeResponse](
    _KIT, "a time", TimeRequest, TimeResponse, StatusResponse, exact=True
)
encode_request: Final = _CODEC.encode_request
decode_request: Final = _CODEC.decode_request
encode_response: Final = _CODEC.encode_response
decode_response: Final = _CODEC.decode_response
response_size: Final = _CODEC.response_size
