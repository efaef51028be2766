"""The time listener's backend: answers QTEE's clock questions from one wall clock.

:class:`TimeService` serves the requests of :mod:`supplicant.time_msg` the way
``pkg-minkipc:listeners/libtimeservice/atime.c`` does.  Every command reads the same
clock, ``CLOCK_REALTIME``; the real service reads no monotonic clock, so neither does
this one.

* GET_UTC_SEC and GET_HLOS_UTC: ``tv_sec`` (truncated to 32 bits) and ``tv_nsec``.
* GET_SYSTIME: the seconds broken down in UTC like ``gmtime_r`` (``tm_year`` from 1900,
  ``tm_mon`` from 0, ``tm_wday`` from Sunday, ``tm_yday`` from 0, ``tm_isdst`` 0).
* GET_TIME_MS: ``sec * 1000``, plus ``nsec // 1000000`` only if ``nsec`` > 1000000
  (the real rule, kept as is), modulo 2**64.
* END: ``ret`` 0.  Any other id: ``ret`` -1, with the id echoed.

**The clock.**  ``clock`` returns seconds since the Epoch, like :func:`time.time`.  An
``int``, ``float``, :class:`~fractions.Fraction` or :class:`~decimal.Decimal` is
converted exactly (a float through its binary value), rounding toward minus infinity to
whole nanoseconds, so injected clocks give deterministic answers.  Without a
``clock`` the service reads :func:`time.time_ns`, which loses no precision.

**Clock failures** are answered as the real service answers a failed
``clock_gettime``: GET_UTC_SEC and GET_HLOS_UTC ``ret`` = -1 with both fields 0,
GET_SYSTIME ``ret`` = -1 with all fields 0, GET_TIME_MS 2**64 - 1.  A failure is a clock
that raises :class:`OSError`, returns a NaN or an infinity, or returns a time whose
seconds do not fit a 64-bit ``time_t``.  GET_SYSTIME also fails, as ``gmtime_r`` does,
when ``tm_year`` would not fit an ``int``.  A clock that returns something that is not
a number is a programming error: :class:`~supplicant.time_msg.TimeUsageError`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from decimal import Decimal
from fractions import Fraction
from typing import Final

from supplicant.time_msg import (
    TIME_MS_FAILURE,
    TM_ZERO,
    EndRequest,
    GetHlosUtcRequest,
    GetSystimeRequest,
    GetTimeMsRequest,
    GetUtcSecRequest,
    StatusResponse,
    SystimeResponse,
    TimeMsResponse,
    TimeRequest,
    TimeResponse,
    TimeSpecResponse,
    TimeUsageError,
    TzTime,
    UnsupportedRequest,
    decode_request,
    encode_response,
)

__all__ = ["TimeService", "gmtime"]

_NS: Final = 1_000_000_000
_I32_MIN: Final = -(1 << 31)
_I32_MAX: Final = (1 << 31) - 1
_I64_MIN: Final = -(1 << 63)
_I64_MAX: Final = (1 << 63) - 1
_U32_MASK: Final = (1 << 32) - 1
_U64_MASK: Final = (1 << 64) - 1
_EPOCH_WDAY: Final = 4  # 1970-01-01 was a Thursday


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (month 1-12)."""
    y = year - (month <= 2)
    era, yoe = divmod(y, 400)
    mp = month - 3 if month > 2 else month + 9  # March = 0
    doy = (153 * mp + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _civil_from_days(days: int) -> tuple[int, int, int]:
    """The proleptic Gregorian (year, month 1-12, day) of a day count from 1970-01-01."""
    era, doe = divmod(days + 719468, 146097)
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153  # March = 0
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (month <= 2), month, day


def gmtime(seconds: int) -> TzTime | None:
    """``gmtime_r`` of ``seconds`` since the Epoch; ``None`` where it would fail (EOVERFLOW)."""
    if isinstance(seconds, bool) or not isinstance(seconds, int):
        raise TimeUsageError(f"seconds must be an int, not {type(seconds).__name__}")
    days, sod = divmod(seconds, 86400)
    year, month, mday = _civil_from_days(days)
    if not _I32_MIN <= year - 1900 <= _I32_MAX:
        return None
    hour, rem = divmod(sod, 3600)
    minute, sec = divmod(rem, 60)
    return TzTime(
        tm_sec=sec,
        tm_min=minute,
        tm_hour=hour,
        tm_mday=mday,
        tm_mon=month - 1,
        tm_year=year - 1900,
        tm_wday=(days + _EPOCH_WDAY) % 7,
        tm_yday=days - _days_from_civil(year, 1, 1),
        tm_isdst=0,
    )


class TimeService:
    """The time listener (id 0xB): decodes a request, answers it from ``clock``."""

    __slots__ = ("_clock",)

    def __init__(self, clock: Callable[[], float | Fraction | Decimal] | None = None) -> None:
        if clock is not None and not callable(clock):
            raise TimeUsageError(f"clock must be callable, not {type(clock).__name__}")
        self._clock = clock

    def now(self) -> tuple[int, int] | None:
        """The clock as ``(tv_sec, tv_nsec)``, ``tv_nsec`` in [0, 1e9); ``None`` if it failed."""
        if self._clock is None:
            sec, nsec = divmod(time.time_ns(), _NS)
            return sec, nsec
        try:
            value = self._clock()
        except OSError:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float | Fraction | Decimal):
            raise TimeUsageError(f"clock returned {type(value).__name__}, not a number")
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, Decimal) and not value.is_finite():
            return None
        sec, nsec = divmod(math.floor(Fraction(value) * _NS), _NS)
        if not _I64_MIN <= sec <= _I64_MAX:
            return None
        return sec, nsec

    def answer(self, req: TimeRequest) -> TimeResponse:
        """The response record for one decoded request."""
        match req:
            case GetUtcSecRequest() | GetHlosUtcRequest():
                ts = self.now()
                if ts is None:
                    return TimeSpecResponse(cmd_id=req.CMD, tv_sec=0, tv_nsec=0, ret=-1)
                return TimeSpecResponse(
                    cmd_id=req.CMD, tv_sec=ts[0] & _U32_MASK, tv_nsec=ts[1], ret=0
                )
            case GetSystimeRequest():
                ts = self.now()
                tm = None if ts is None else gmtime(ts[0])
                if tm is None:
                    return SystimeResponse(time=TM_ZERO, ret=-1)
                return SystimeResponse(time=tm, ret=0)
            case GetTimeMsRequest():
                ts = self.now()
                if ts is None:
                    return TimeMsResponse(ms=TIME_MS_FAILURE)
                sec, nsec = ts
                extra = nsec // 1_000_000 if nsec > 1_000_000 else 0
                return TimeMsResponse(ms=(sec * 1000 + extra) & _U64_MASK)
            case EndRequest():
                return StatusResponse(cmd_id=req.CMD, ret=0)
            case UnsupportedRequest(cmd_id=cmd_id):
                return StatusResponse(cmd_id=cmd_id, ret=-1)
            case _:
                raise TimeUsageError(f"not a time request record: {type(req).__name__}")

    def handle(self, request: bytes | bytearray | memoryview) -> bytes:
        """Serve one request from the shared buffer; the response bytes to write back.

        Raises :class:`supplicant.time_msg.TimeDecodeError` for a malformed request
        (shorter than the 4-byte id, or not bytes-like), and nothing else for any bytes.
        """
        return encode_response(self.answer(decode_request(request)))
