"""The time listener: its codec (supplicant/time_msg.py) and service (supplicant/_time.py).

Layouts are checked against pkg-minkipc ``listeners/libtimeservice/time_msg.h`` and the
behaviour against ``atime.c`` (spec quic-teec.md §5.4: time commands start at 0x301,
listener id 0xB, 20 KiB buffer; any other command answers ret = -1).

Fuzz invariant: decoding any bytes, and handling any bytes, either succeeds or raises
TimeDecodeError, and nothing else.
"""

from __future__ import annotations

import dataclasses
import time
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from objects import DecodeError, UsageError
from supplicant import TimeService
from supplicant._time import gmtime
from supplicant.time_msg import (
    MAX_BUF_LEN,
    TIME_MS_FAILURE,
    TIME_SERVICE_BUF_LEN,
    TIME_SERVICE_ID,
    TM_ZERO,
    EndRequest,
    GetHlosUtcRequest,
    GetSystimeRequest,
    GetTimeMsRequest,
    GetUtcSecRequest,
    StatusResponse,
    SystimeResponse,
    TimeCmd,
    TimeDecodeError,
    TimeMsResponse,
    TimeSpecResponse,
    TimeUsageError,
    TzTime,
    UnsupportedRequest,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    response_size,
)

# 2023-11-14 22:13:20.5 UTC, a Tuesday, day 317 of the year.
T0 = 1_700_000_000.5
TM0 = TzTime(
    tm_sec=20,
    tm_min=13,
    tm_hour=22,
    tm_mday=14,
    tm_mon=10,
    tm_year=123,
    tm_wday=2,
    tm_yday=317,
    tm_isdst=0,
)


def fixed(value: float | Fraction | Decimal) -> TimeService:
    return TimeService(clock=lambda: value)


# --------------------------------------------------------------------------- constants


def test_constants_match_time_msg_h() -> None:
    assert TIME_SERVICE_ID == 0xB
    assert TIME_SERVICE_BUF_LEN == 20480
    assert MAX_BUF_LEN == 20040
    assert [(c.name, int(c)) for c in TimeCmd] == [
        ("TIME_START", 0x301),
        ("GET_UTC_SEC", 0x302),
        ("GET_SYSTIME", 0x303),
        ("GET_TIME_MS", 0x304),
        ("GET_HLOS_UTC", 0x305),
        ("TIME_END", 0x306),
        ("UNKNOWN", 0x7FFFFFFF),
    ]
    assert TIME_MS_FAILURE == 0xFFFF_FFFF_FFFF_FFFF


def test_response_sizes() -> None:
    assert response_size(0x302) == 16
    assert response_size(0x303) == 44
    assert response_size(0x304) == 12
    assert response_size(0x305) == 16
    assert response_size(0x306) == 8
    assert response_size(0x301) == 8
    assert response_size(0) == 8
    assert response_size(0xFFFFFFFF) == 8
    with pytest.raises(TimeUsageError, match=r"command id -1 is outside"):
        response_size(-1)


# --------------------------------------------------------------------------- requests


REQUEST_GOLDEN = [
    (GetUtcSecRequest(), "02030000"),
    (GetSystimeRequest(), "03030000"),
    (GetTimeMsRequest(), "04030000"),
    (GetHlosUtcRequest(), "05030000"),
    (EndRequest(), "06030000"),
    (UnsupportedRequest(cmd_id=0x301), "01030000"),
    (UnsupportedRequest(cmd_id=0x307), "07030000"),
    (UnsupportedRequest(cmd_id=0x7FFFFFFF), "ffffff7f"),
    (UnsupportedRequest(cmd_id=0), "00000000"),
]


@pytest.mark.parametrize(("req", "wire"), REQUEST_GOLDEN)
def test_request_golden(req: object, wire: str) -> None:
    assert encode_request(req) == bytes.fromhex(wire)  # type: ignore[arg-type]
    assert decode_request(bytes.fromhex(wire)) == req
    # The listener hands over the whole shared buffer: trailing bytes are ignored.
    assert decode_request(bytearray.fromhex(wire) + b"\xaa" * 20476) == req
    assert decode_request(memoryview(bytes.fromhex(wire))) == req


def test_unsupported_request_refuses_a_supported_id() -> None:
    with pytest.raises(TimeUsageError, match=r"command 0x302 is supported"):
        UnsupportedRequest(cmd_id=0x302)
    with pytest.raises(TimeUsageError, match=r"command id 4294967296 is outside"):
        UnsupportedRequest(cmd_id=1 << 32)


@pytest.mark.parametrize("size", [0, 1, 2, 3])
def test_short_request_is_a_decode_error(size: int) -> None:
    with pytest.raises(TimeDecodeError) as info:
        decode_request(b"\x02\x03\x00\x00"[:size])
    assert str(info.value) == f"request is {size} bytes; the command id needs 4"
    assert isinstance(info.value, DecodeError)


def test_non_bytes_request_is_a_decode_error() -> None:
    with pytest.raises(TimeDecodeError, match=r"^request must be bytes-like, not str$"):
        decode_request("0203")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- responses


RESPONSE_GOLDEN = [
    (
        TimeSpecResponse(cmd_id=0x302, tv_sec=1_700_000_000, tv_nsec=500_000_000, ret=0),
        "02030000 00f15365 0065cd1d 00000000",
    ),
    (
        TimeSpecResponse(cmd_id=0x305, tv_sec=1_700_000_000, tv_nsec=500_000_000, ret=0),
        "05030000 00f15365 0065cd1d 00000000",
    ),
    (
        TimeSpecResponse(cmd_id=0x302, tv_sec=0, tv_nsec=0, ret=-1),
        "02030000 00000000 00000000 ffffffff",
    ),
    (
        SystimeResponse(time=TM0, ret=0),
        "03030000 14000000 0d000000 16000000 0e000000 0a000000 7b000000 02000000 3d010000 00000000"
        " 00000000",
    ),
    (SystimeResponse(time=TM_ZERO, ret=-1), "03030000" + "00000000" * 9 + "ffffffff"),
    (TimeMsResponse(ms=1_700_000_000_500), "04030000 f469e5cf8b010000"),
    (TimeMsResponse(ms=TIME_MS_FAILURE), "04030000 ffffffffffffffff"),
    (StatusResponse(cmd_id=0x306, ret=0), "06030000 00000000"),
    (StatusResponse(cmd_id=0x301, ret=-1), "01030000 ffffffff"),
    (StatusResponse(cmd_id=0x12345678, ret=-1), "78563412 ffffffff"),
]


@pytest.mark.parametrize(("rsp", "wire"), RESPONSE_GOLDEN)
def test_response_golden(rsp: object, wire: str) -> None:
    raw = bytes.fromhex(wire)
    assert encode_response(rsp) == raw  # type: ignore[arg-type]
    assert len(raw) == response_size(int.from_bytes(raw[:4], "little"))
    assert decode_response(raw) == rsp
    assert decode_response(raw + b"\x55" * 100) == rsp


def test_response_records_validate() -> None:
    with pytest.raises(TimeUsageError, match=r"answers GET_UTC_SEC or GET_HLOS_UTC, not 0x303"):
        TimeSpecResponse(cmd_id=0x303, tv_sec=0, tv_nsec=0, ret=0)
    with pytest.raises(TimeUsageError, match=r"tv_sec 4294967296 is outside"):
        TimeSpecResponse(cmd_id=0x302, tv_sec=1 << 32, tv_nsec=0, ret=0)
    with pytest.raises(TimeUsageError, match=r"GET_SYSTIME has its own response record"):
        StatusResponse(cmd_id=0x303, ret=-1)
    with pytest.raises(TimeUsageError, match=r"ms -1 is outside"):
        TimeMsResponse(ms=-1)
    with pytest.raises(TimeUsageError, match=r"tm_year must be an int, not bool"):
        dataclasses.replace(TM_ZERO, tm_year=True)
    with pytest.raises(TimeUsageError, match=r"time must be a TzTime, not tuple"):
        SystimeResponse(time=(0,) * 9, ret=0)  # type: ignore[arg-type]
    with pytest.raises(TimeUsageError, match=r"not a time response record: int"):
        encode_response(5)  # type: ignore[arg-type]
    with pytest.raises(TimeUsageError, match=r"not a time request record: int"):
        encode_request(5)  # type: ignore[arg-type]
    assert isinstance(TimeUsageError("x"), UsageError)


@pytest.mark.parametrize(("cmd", "need"), [(0x302, 16), (0x303, 44), (0x304, 12), (0x306, 8)])
def test_short_response_is_a_decode_error(cmd: int, need: int) -> None:
    raw = cmd.to_bytes(4, "little") + bytes(need - 5)
    with pytest.raises(TimeDecodeError) as info:
        decode_response(raw)
    assert str(info.value) == f"response to {cmd:#x} is {need - 1} bytes; it needs {need}"


# --------------------------------------------------------------------------- the service


def test_service_golden_answers() -> None:
    # 1700000000.5 s = 0x6553F100 s + 0x1DCD6500 ns = 2023-11-14 22:13:20 UTC (Tuesday).
    svc = fixed(T0)
    golden = {
        "02030000": "02030000 00f15365 0065cd1d 00000000",
        "05030000": "05030000 00f15365 0065cd1d 00000000",
        "03030000": "03030000 14000000 0d000000 16000000 0e000000 0a000000 7b000000 02000000"
        " 3d010000 00000000 00000000",
        "04030000": "04030000 f469e5cf8b010000",
        "06030000": "06030000 00000000",
    }
    for req, rsp in golden.items():
        assert svc.handle(bytes.fromhex(req)) == bytes.fromhex(rsp)


@pytest.mark.parametrize("cmd", [0, 0x201, 0x301, 0x307, 0x7FFFFFFF, 0xFFFFFFFF])
def test_unknown_command_answers_minus_one_and_echoes_the_id(cmd: int) -> None:
    out = fixed(T0).handle(cmd.to_bytes(4, "little") + bytes(20476))
    assert out == cmd.to_bytes(4, "little") + b"\xff\xff\xff\xff"
    assert decode_response(out) == StatusResponse(cmd_id=cmd, ret=-1)


@pytest.mark.parametrize("size", [0, 3])
def test_service_malformed_request_is_a_decode_error(size: int) -> None:
    with pytest.raises(TimeDecodeError, match=rf"^request is {size} bytes"):
        fixed(T0).handle(bytes(size))


def test_time_ms_adds_milliseconds_only_past_one_millisecond() -> None:
    # atime.c adds nsec / 1000000 only when nsec > 1000000.
    def ms(value: Fraction) -> int:
        rsp = decode_response(fixed(value).handle(b"\x04\x03\x00\x00"))
        assert isinstance(rsp, TimeMsResponse)
        return rsp.ms

    assert ms(Fraction(5)) == 5000
    assert ms(Fraction(5_000_999_999, 1_000_000_000)) == 5000
    assert ms(Fraction(5_001_000_000, 1_000_000_000)) == 5000  # exactly 1 ms: nothing added
    assert ms(Fraction(5_001_000_001, 1_000_000_000)) == 5001
    assert ms(Fraction(5_999_999_999, 1_000_000_000)) == 5999


def test_clock_values_are_converted_exactly() -> None:
    assert fixed(T0).now() == (1_700_000_000, 500_000_000)
    assert fixed(Decimal("1.000000001")).now() == (1, 1)
    assert fixed(Fraction(3, 2)).now() == (1, 500_000_000)
    assert fixed(2**-30).now() == (0, 0)  # 0.93 ns rounds down
    assert TimeService(clock=lambda: 7).now() == (7, 0)


def test_before_the_epoch() -> None:
    svc = fixed(-1.5)  # 1969-12-31 23:59:58.5, a Wednesday
    assert svc.now() == (-2, 500_000_000)
    assert decode_response(svc.handle(b"\x02\x03\x00\x00")) == TimeSpecResponse(
        cmd_id=0x302, tv_sec=0xFFFFFFFE, tv_nsec=500_000_000, ret=0
    )
    assert decode_response(svc.handle(b"\x03\x03\x00\x00")) == SystimeResponse(
        time=TzTime(
            tm_sec=58,
            tm_min=59,
            tm_hour=23,
            tm_mday=31,
            tm_mon=11,
            tm_year=69,
            tm_wday=3,
            tm_yday=364,
            tm_isdst=0,
        ),
        ret=0,
    )
    assert svc.handle(b"\x04\x03\x00\x00") == b"\x04\x03\x00\x00" + (2**64 - 1500).to_bytes(
        8, "little"
    )


def test_tv_sec_is_truncated_to_32_bits() -> None:
    rsp = decode_response(fixed((1 << 32) + 5).handle(b"\x05\x03\x00\x00"))
    assert rsp == TimeSpecResponse(cmd_id=0x305, tv_sec=5, tv_nsec=0, ret=0)


def _failure_answers(svc: TimeService) -> list[bytes]:
    return [svc.handle(cmd.to_bytes(4, "little")) for cmd in (0x302, 0x303, 0x304, 0x305, 0x306)]


FAILED = [
    bytes.fromhex("02030000 00000000 00000000 ffffffff"),
    bytes.fromhex("03030000" + "00000000" * 9 + "ffffffff"),
    bytes.fromhex("04030000 ffffffffffffffff"),
    bytes.fromhex("05030000 00000000 00000000 ffffffff"),
    bytes.fromhex("06030000 00000000"),
]


@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), float("-inf"), Decimal("NaN"), Fraction(1 << 63)]
)
def test_clock_failure_answers_like_a_failed_clock_gettime(value: float) -> None:
    assert fixed(value).now() is None
    assert _failure_answers(fixed(value)) == FAILED


def test_clock_raising_oserror_is_a_failure() -> None:
    def broken() -> float:
        raise OSError(22, "EINVAL")

    assert _failure_answers(TimeService(clock=broken)) == FAILED


def test_gmtime_overflow_fails_only_systime() -> None:
    svc = fixed(1 << 62)  # seconds fit time_t; the year does not fit an int
    assert gmtime(1 << 62) is None
    assert decode_response(svc.handle(b"\x03\x03\x00\x00")) == SystimeResponse(time=TM_ZERO, ret=-1)
    assert decode_response(svc.handle(b"\x02\x03\x00\x00")) == TimeSpecResponse(
        cmd_id=0x302, tv_sec=0, tv_nsec=0, ret=0
    )


def test_bad_clock_is_a_usage_error() -> None:
    with pytest.raises(TimeUsageError, match=r"^clock must be callable, not int$"):
        TimeService(clock=5)  # type: ignore[arg-type]
    with pytest.raises(TimeUsageError, match=r"^clock returned str, not a number$"):
        TimeService(clock=lambda: "now").handle(b"\x02\x03\x00\x00")  # type: ignore[arg-type,return-value]
    with pytest.raises(TimeUsageError, match=r"^clock returned bool, not a number$"):
        TimeService(clock=lambda: True).now()


def test_default_clock_is_the_wall_clock() -> None:
    before = time.time_ns()
    now = TimeService().now()
    after = time.time_ns()
    assert now is not None
    assert before <= now[0] * 1_000_000_000 + now[1] <= after


def test_gmtime_golden() -> None:
    assert gmtime(1_700_000_000) == TM0
    assert gmtime(0) == TzTime(
        tm_sec=0, tm_min=0, tm_hour=0, tm_mday=1, tm_mon=0, tm_year=70, tm_wday=4, tm_yday=0,
        tm_isdst=0,
    )  # fmt: skip
    # 2024-02-29 12:00:00, a Thursday, day 59.
    assert gmtime(1_709_208_000) == TzTime(
        tm_sec=0, tm_min=0, tm_hour=12, tm_mday=29, tm_mon=1, tm_year=124, tm_wday=4,
        tm_yday=59, tm_isdst=0,
    )  # fmt: skip


@given(st.integers(min_value=-62_135_596_800, max_value=253_402_300_799))
def test_gmtime_matches_the_c_library(seconds: int) -> None:
    ref = time.gmtime(seconds)
    assert gmtime(seconds) == TzTime(
        tm_sec=ref.tm_sec,
        tm_min=ref.tm_min,
        tm_hour=ref.tm_hour,
        tm_mday=ref.tm_mday,
        tm_mon=ref.tm_mon - 1,
        tm_year=ref.tm_year - 1900,
        tm_wday=(ref.tm_wday + 1) % 7,  # Python counts from Monday, C from Sunday
        tm_yday=ref.tm_yday - 1,
        tm_isdst=0,
    )


# --------------------------------------------------------------------------- fuzz


@given(st.binary(max_size=64))
def test_fuzz_decode_request_raises_only_time_decode_error(raw: bytes) -> None:
    try:
        req = decode_request(raw)
    except TimeDecodeError:
        assert len(raw) < 4
        return
    assert encode_request(req) == raw[:4]


@given(
    st.one_of(
        st.binary(max_size=64),
        st.builds(
            lambda cmd, tail: cmd.to_bytes(4, "little") + tail,
            st.sampled_from([0x301, 0x302, 0x303, 0x304, 0x305, 0x306, 0x307]),
            st.binary(max_size=48),
        ),
    )
)
def test_fuzz_decode_response_raises_only_time_decode_error(raw: bytes) -> None:
    try:
        rsp = decode_response(raw)
    except TimeDecodeError:
        return
    out = encode_response(rsp)
    assert out == raw[: len(out)]


@given(st.binary(max_size=64), st.floats(allow_nan=True, allow_infinity=True))
def test_fuzz_handle_raises_only_time_decode_error(raw: bytes, now: float) -> None:
    try:
        out = fixed(now).handle(raw)
    except TimeDecodeError:
        assert len(raw) < 4
        return
    assert out[:4] == raw[:4]
    assert len(out) == response_size(int.from_bytes(raw[:4], "little"))
    assert encode_response(decode_response(out)) == out
