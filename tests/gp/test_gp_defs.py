"""GP/OP-TEE constants and paramTypes packing (qtee/gp/_defs.py; optee.md §1.2, §1.3, §4.1).

The golden values are written out from the spec tables, independently of the enums.
"""

from __future__ import annotations

import errno
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from objects import QteeBaseError, UsageError
from qtee.gp import (
    TA_FLAG_PROPERTIES,
    TEE_LOGIN_REE_KERNEL_MAX,
    TEE_LOGIN_REE_KERNEL_MIN,
    TEEC_CONFIG_PAYLOAD_REF_COUNT,
    TaFlag,
    TeecError,
    TeecLogin,
    TeecMemFlag,
    TeecOrigin,
    TeecParamType,
    TeecParamTypeError,
    TeecResult,
    errno_to_result,
    is_ree_kernel_login,
    name_of,
    param_type_get,
    param_types,
    unpack_param_types,
)

# optee.md §1.3, every row.
RESULTS = {
    "TEEC_SUCCESS": 0x00000000,
    "TEEC_ERROR_STORAGE_NOT_AVAILABLE": 0xF0100003,
    "TEEC_ERROR_GENERIC": 0xFFFF0000,
    "TEEC_ERROR_ACCESS_DENIED": 0xFFFF0001,
    "TEEC_ERROR_CANCEL": 0xFFFF0002,
    "TEEC_ERROR_ACCESS_CONFLICT": 0xFFFF0003,
    "TEEC_ERROR_EXCESS_DATA": 0xFFFF0004,
    "TEEC_ERROR_BAD_FORMAT": 0xFFFF0005,
    "TEEC_ERROR_BAD_PARAMETERS": 0xFFFF0006,
    "TEEC_ERROR_BAD_STATE": 0xFFFF0007,
    "TEEC_ERROR_ITEM_NOT_FOUND": 0xFFFF0008,
    "TEEC_ERROR_NOT_IMPLEMENTED": 0xFFFF0009,
    "TEEC_ERROR_NOT_SUPPORTED": 0xFFFF000A,
    "TEEC_ERROR_NO_DATA": 0xFFFF000B,
    "TEEC_ERROR_OUT_OF_MEMORY": 0xFFFF000C,
    "TEEC_ERROR_BUSY": 0xFFFF000D,
    "TEEC_ERROR_COMMUNICATION": 0xFFFF000E,
    "TEEC_ERROR_SECURITY": 0xFFFF000F,
    "TEEC_ERROR_SHORT_BUFFER": 0xFFFF0010,
    "TEEC_ERROR_EXTERNAL_CANCEL": 0xFFFF0011,
    "TEE_ERROR_EXTERNAL_CANCEL": 0xFFFF0011,
    "TEE_ERROR_TIMEOUT": 0xFFFF3001,
    "TEE_ERROR_OVERFLOW": 0xFFFF300F,
    "TEEC_ERROR_TARGET_DEAD": 0xFFFF3024,
    "TEE_ERROR_TARGET_DEAD": 0xFFFF3024,
    "TEEC_ERROR_STORAGE_NO_SPACE": 0xFFFF3041,
    "TEE_ERROR_STORAGE_NO_SPACE": 0xFFFF3041,
    "TEE_ERROR_MAC_INVALID": 0xFFFF3071,
    "TEE_ERROR_SIGNATURE_INVALID": 0xFFFF3072,
    "TEE_ERROR_TIME_NOT_SET": 0xFFFF5000,
    "TEE_ERROR_TIME_NEEDS_RESET": 0xFFFF5001,
    "TEE_ERROR_CORRUPT_OBJECT": 0xF0100001,
    "TEE_ERROR_CORRUPT_OBJECT_2": 0xF0100002,
    "TEE_ERROR_STORAGE_NOT_AVAILABLE_2": 0xF0100004,
    "TEE_ERROR_UNSUPPORTED_VERSION": 0xF0100005,
    "TEE_ERROR_CIPHERTEXT_INVALID": 0xF0100006,
}

PARAM_TYPES = {
    "TEEC_NONE": 0x0,
    "TEEC_VALUE_INPUT": 0x1,
    "TEEC_VALUE_OUTPUT": 0x2,
    "TEEC_VALUE_INOUT": 0x3,
    "TEEC_MEMREF_TEMP_INPUT": 0x5,
    "TEEC_MEMREF_TEMP_OUTPUT": 0x6,
    "TEEC_MEMREF_TEMP_INOUT": 0x7,
    "TEEC_MEMREF_WHOLE": 0xC,
    "TEEC_MEMREF_PARTIAL_INPUT": 0xD,
    "TEEC_MEMREF_PARTIAL_OUTPUT": 0xE,
    "TEEC_MEMREF_PARTIAL_INOUT": 0xF,
}
UNDEFINED_NIBBLES = (0x4, 0x8, 0x9, 0xA, 0xB)

TA_FLAG_BITS = {
    "TA_FLAG_SINGLE_INSTANCE": 2,
    "TA_FLAG_MULTI_SESSION": 3,
    "TA_FLAG_INSTANCE_KEEP_ALIVE": 4,
    "TA_FLAG_SECURE_DATA_PATH": 5,
    "TA_FLAG_CACHE_MAINTENANCE": 7,
    "TA_FLAG_CONCURRENT": 8,
    "TA_FLAG_DEVICE_ENUM": 9,
    "TA_FLAG_DEVICE_ENUM_SUPP": 10,
    "TA_FLAG_DONT_CLOSE_HANDLE_ON_CORRUPT_OBJECT": 11,
    "TA_FLAG_DEVICE_ENUM_TEE_STORAGE_PRIVATE": 12,
    "TA_FLAG_INSTANCE_KEEP_CRASHED": 13,
}

BAD = TeecResult.TEEC_ERROR_BAD_PARAMETERS
API = TeecOrigin.TEEC_ORIGIN_API


# ----------------------------------------------------------------------------- golden tables


@pytest.mark.parametrize(("name", "value"), RESULTS.items())
def test_result_codes(name: str, value: int) -> None:
    assert TeecResult[name] == value


def test_result_enum_has_nothing_else() -> None:
    assert {m: int(v) for m, v in TeecResult.__members__.items()} == RESULTS | {
        "TEE_SUCCESS": 0,
        "TEE_ERROR_STORAGE_NOT_AVAILABLE": 0xF0100003,
    }


def test_name_of_prefers_the_teec_name() -> None:
    assert name_of(0xFFFF0006) == "TEEC_ERROR_BAD_PARAMETERS"
    assert name_of(0xFFFF0011) == "TEEC_ERROR_EXTERNAL_CANCEL"
    assert name_of(0xFFFF3024) == "TEEC_ERROR_TARGET_DEAD"
    assert name_of(0xFFFF3001) == "TEE_ERROR_TIMEOUT"
    assert name_of(0) == "TEEC_SUCCESS"


def test_name_of_unknown_and_invalid() -> None:
    assert name_of(0x1234) == "0x00001234"
    assert name_of(0xFFFF2000) == "0xFFFF2000"
    for bad in (-1, 1 << 32):
        with pytest.raises(UsageError):
            name_of(bad)
    with pytest.raises(UsageError):
        name_of(True)


def test_origins() -> None:
    assert [(o.name, o.value) for o in TeecOrigin] == [
        ("TEEC_ORIGIN_API", 1),
        ("TEEC_ORIGIN_COMMS", 2),
        ("TEEC_ORIGIN_TEE", 3),
        ("TEEC_ORIGIN_TRUSTED_APP", 4),
    ]


def test_logins() -> None:
    assert {m.name: m.value for m in TeecLogin} == {
        "TEEC_LOGIN_PUBLIC": 0,
        "TEEC_LOGIN_USER": 1,
        "TEEC_LOGIN_GROUP": 2,
        "TEEC_LOGIN_APPLICATION": 4,
        "TEEC_LOGIN_USER_APPLICATION": 5,
        "TEEC_LOGIN_GROUP_APPLICATION": 6,
        "TEE_LOGIN_REE_KERNEL": 0x80000000,
        "TEE_LOGIN_TRUSTED_APP": 0xF0000000,
    }
    assert (TEE_LOGIN_REE_KERNEL_MIN, TEE_LOGIN_REE_KERNEL_MAX) == (0x80000000, 0xBFFFFFFF)


@pytest.mark.parametrize(
    ("method", "kernel"),
    [
        (0, False),
        (6, False),
        (0x7FFFFFFF, False),
        (0x80000000, True),
        (0x80000001, True),
        (0xBFFFFFFF, True),
        (0xC0000000, False),
        (0xF0000000, False),
    ],
)
def test_ree_kernel_range(method: int, kernel: bool) -> None:
    assert is_ree_kernel_login(method) is kernel


def test_param_type_values() -> None:
    assert {m.name: m.value for m in TeecParamType} == PARAM_TYPES


def test_mem_flags_and_ref_count() -> None:
    assert {m.name: m.value for m in TeecMemFlag} == {"TEEC_MEM_INPUT": 1, "TEEC_MEM_OUTPUT": 2}
    assert TEEC_CONFIG_PAYLOAD_REF_COUNT == 4


def test_ta_flags() -> None:
    assert {m.name: m.value for m in TaFlag} == {k: 1 << v for k, v in TA_FLAG_BITS.items()}
    assert TA_FLAG_PROPERTIES[TaFlag.TA_FLAG_SINGLE_INSTANCE] == "gpd.ta.singleInstance"
    keep = TA_FLAG_PROPERTIES[TaFlag.TA_FLAG_INSTANCE_KEEP_CRASHED]
    assert keep == "optee.ta.instanceKeepCrashed"


@pytest.mark.parametrize(
    ("err", "result"),
    [
        (errno.ENOMEM, TeecResult.TEEC_ERROR_OUT_OF_MEMORY),
        (errno.EINVAL, TeecResult.TEEC_ERROR_BAD_PARAMETERS),
        (errno.EFAULT, TeecResult.TEEC_ERROR_GENERIC),
        (errno.EPERM, TeecResult.TEEC_ERROR_GENERIC),
    ],
)
def test_errno_to_result(err: int, result: TeecResult) -> None:
    assert errno_to_result(err) is result


# ----------------------------------------------------------------------------- TeecError


def test_teec_error_carries_code_and_origin() -> None:
    e = TeecError(0xFFFF0010, 4, "need 32 bytes")
    assert isinstance(e, QteeBaseError)
    assert e.code is TeecResult.TEEC_ERROR_SHORT_BUFFER
    assert e.origin is TeecOrigin.TEEC_ORIGIN_TRUSTED_APP
    assert "TEEC_ERROR_SHORT_BUFFER" in str(e)
    assert "TEEC_ORIGIN_TRUSTED_APP" in str(e)
    assert "need 32 bytes" in str(e)


def test_teec_error_keeps_unknown_codes() -> None:
    e = TeecError(0x12345678, 99)
    assert e.code == 0x12345678
    assert not isinstance(e.code, TeecResult)
    assert e.origin == 99


@pytest.mark.parametrize(("code", "origin"), [(0, 1), (-1, 1), (1 << 32, 1), (1, -1)])
def test_teec_error_rejects(code: int, origin: int) -> None:
    with pytest.raises(ValueError):
        TeecError(code, origin)


def test_teec_errors_pickle() -> None:
    e = pickle.loads(pickle.dumps(TeecError(BAD, API, "x")))
    assert (type(e), e.code, e.origin, e.detail) == (TeecError, BAD, API, "x")
    p = pickle.loads(pickle.dumps(TeecParamTypeError(2, 9)))
    assert (type(p), p.index, p.value, p.code, p.origin) == (TeecParamTypeError, 2, 9, BAD, API)


# ----------------------------------------------------------------------------- paramTypes


def test_param_types_golden() -> None:
    assert param_types(1, 5, 0xD, 0) == 0x0D51
    assert param_types(0, 0, 0, 0) == 0
    assert param_types(0xF, 0xF, 0xF, 0xF) == 0xFFFF
    assert param_types(3, 0, 0, 0xC) == 0xC003
    t = param_types(
        TeecParamType.TEEC_VALUE_INOUT,
        TeecParamType.TEEC_MEMREF_TEMP_OUTPUT,
        TeecParamType.TEEC_NONE,
        TeecParamType.TEEC_MEMREF_WHOLE,
    )
    assert t == 0xC063


@pytest.mark.parametrize("index", range(4))
@pytest.mark.parametrize("value", [*UNDEFINED_NIBBLES, 0x10, -1])
def test_param_types_names_the_bad_index(index: int, value: int) -> None:
    args = [0, 0, 0, 0]
    args[index] = value
    with pytest.raises(TeecParamTypeError) as info:
        param_types(*args)
    e = info.value
    assert (e.index, e.value, e.code, e.origin) == (index, value, BAD, API)
    assert f"param {index}" in str(e)


def test_param_types_first_bad_index_wins() -> None:
    with pytest.raises(TeecParamTypeError) as info:
        param_types(0, 4, 8, 4)
    assert info.value.index == 1


def test_param_types_rejects_non_ints() -> None:
    with pytest.raises(TypeError):
        param_types(0, "1", 0, 0)  # type: ignore[arg-type]


@pytest.mark.parametrize("index", range(4))
@pytest.mark.parametrize("value", UNDEFINED_NIBBLES)
def test_param_type_get_bad_nibble(index: int, value: int) -> None:
    with pytest.raises(TeecParamTypeError) as info:
        param_type_get(value << (4 * index), index)
    assert (info.value.index, info.value.value) == (index, value)


def test_param_type_get_ignores_high_bits() -> None:
    assert param_type_get(0xABCD_0001, 0) is TeecParamType.TEEC_VALUE_INPUT
    assert param_type_get(0xFFFF_0000, 3) is TeecParamType.TEEC_NONE


@pytest.mark.parametrize(("t", "i"), [(-1, 0), (1 << 32, 0), (0, -1), (0, 4), (0, True)])
def test_param_type_get_usage(t: int, i: int) -> None:
    with pytest.raises(UsageError):
        param_type_get(t, i)


_types = st.sampled_from(list(TeecParamType))


@given(_types, _types, _types, _types)
def test_param_types_round_trip(
    p0: TeecParamType, p1: TeecParamType, p2: TeecParamType, p3: TeecParamType
) -> None:
    t = param_types(p0, p1, p2, p3)
    assert 0 <= t <= 0xFFFF
    assert t == p0 | p1 << 4 | p2 << 8 | p3 << 12
    assert unpack_param_types(t) == (p0, p1, p2, p3)
    assert [param_type_get(t, i) for i in range(4)] == [p0, p1, p2, p3]


@given(st.integers(0, 0xFFFF_FFFF))
def test_param_type_get_matches_the_macro(t: int) -> None:
    for i in range(4):
        nibble = (t >> (4 * i)) & 0xF
        if nibble in PARAM_TYPES.values():
            assert param_type_get(t, i) == nibble
        else:
            with pytest.raises(TeecParamTypeError):
                param_type_get(t, i)
