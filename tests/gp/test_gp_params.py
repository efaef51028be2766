"""libteec's param pre/post-processing (qtee/gp/_params.py; optee.md §1.2, §1.4).

Every error row is BAD_PARAMETERS with origin API and leaves nothing to allocate; the
kernel params are compared field by field with what tee_client_api.c builds.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from objects import UsageError
from qtee.gp import (
    SIZE_MAX,
    MemrefUpdate,
    NeedTempShm,
    RegisteredMemref,
    SharedMemory,
    TeecError,
    TeecMemFlag,
    TeecOrigin,
    TeecParam,
    TeecParamType,
    TeecParamTypeError,
    TeecResult,
    TempMemref,
    Value,
    ValueUpdate,
    check_partial_bounds,
    param_types,
    post_process_operation,
    post_process_param,
    pre_process_operation,
    pre_process_param,
)
from qtee.uapi import TEE_MEMREF_NULL, Param

T = TeecParamType
IN = TeecMemFlag.TEEC_MEM_INPUT
OUT = TeecMemFlag.TEEC_MEM_OUTPUT
BAD = TeecResult.TEEC_ERROR_BAD_PARAMETERS
API = TeecOrigin.TEEC_ORIGIN_API
U32 = 0xFFFF_FFFF
U64 = 0xFFFF_FFFF_FFFF_FFFF
# kernel attrs (TEE_IOCTL_PARAM_ATTR_TYPE_*), written out from qtee-kernel.md §1.2
MEMREF_INPUT, MEMREF_OUTPUT, MEMREF_INOUT = 5, 6, 7


def bad_params(fn: object, *args: object, **kwargs: object) -> TeecError:
    assert callable(fn)
    with pytest.raises(TeecError) as info:
        fn(*args, **kwargs)
    assert (info.value.code, info.value.origin) == (BAD, API)
    return info.value


# ----------------------------------------------------------------------------- values


def test_none_is_all_zero() -> None:
    assert pre_process_param(T.TEEC_NONE, None) == Param(0, 0, 0, 0)
    assert pre_process_param(T.TEEC_NONE, Value(1, 2)) == Param(0, 0, 0, 0)


@pytest.mark.parametrize("ptype", [T.TEEC_VALUE_INPUT, T.TEEC_VALUE_OUTPUT, T.TEEC_VALUE_INOUT])
def test_values_copy_a_and_b(ptype: TeecParamType) -> None:
    assert pre_process_param(ptype, Value(7, U32)) == Param(int(ptype), 7, U32, 0)


@pytest.mark.parametrize(("a", "b"), [(-1, 0), (0, 1 << 32)])
def test_value_is_u32(a: int, b: int) -> None:
    with pytest.raises(UsageError):
        Value(a, b)


def test_param_kind_must_match_type() -> None:
    with pytest.raises(UsageError):
        pre_process_param(T.TEEC_VALUE_INPUT, TempMemref(4))
    with pytest.raises(UsageError):
        pre_process_param(T.TEEC_MEMREF_WHOLE, Value())
    with pytest.raises(UsageError):
        pre_process_param(T.TEEC_MEMREF_TEMP_INPUT, None)


# ----------------------------------------------------------------------------- temp memrefs

TEMP = [
    (T.TEEC_MEMREF_TEMP_INPUT, MEMREF_INPUT, IN),
    (T.TEEC_MEMREF_TEMP_OUTPUT, MEMREF_OUTPUT, OUT),
    (T.TEEC_MEMREF_TEMP_INOUT, MEMREF_INOUT, IN | OUT),
]


@pytest.mark.parametrize(("ptype", "attr", "flags"), TEMP)
def test_temp_registers_the_buffer(ptype: TeecParamType, attr: int, flags: TeecMemFlag) -> None:
    need = pre_process_param(ptype, TempMemref(100))
    assert need == NeedTempShm(attr, 100, flags, register=True)
    assert isinstance(need, NeedTempShm)
    assert need.alloc_size == 100
    assert need.param(3) == Param(attr, 0, 100, 3)


def test_temp_size_zero_registers_eight_bytes() -> None:
    need = pre_process_param(T.TEEC_MEMREF_TEMP_OUTPUT, TempMemref(0))
    assert isinstance(need, NeedTempShm)
    assert (need.size, need.alloc_size) == (0, 8)
    assert need.param(1).b == 0


@pytest.mark.parametrize(("ptype", "attr", "flags"), TEMP)
@pytest.mark.parametrize("memref_null", [False, True])
def test_temp_null_with_size_is_bad(
    ptype: TeecParamType, attr: int, flags: TeecMemFlag, memref_null: bool
) -> None:
    bad_params(pre_process_param, ptype, TempMemref(1, null=True), memref_null=memref_null)


@pytest.mark.parametrize(("ptype", "attr", "flags"), TEMP)
def test_temp_null_empty_with_memref_null_cap(
    ptype: TeecParamType, attr: int, flags: TeecMemFlag
) -> None:
    got = pre_process_param(ptype, TempMemref(0, null=True), memref_null=True)
    assert got == Param(attr, 0, 0, TEE_MEMREF_NULL)


@pytest.mark.parametrize(("ptype", "attr", "flags"), TEMP)
def test_temp_null_empty_without_cap_needs_a_dummy(
    ptype: TeecParamType, attr: int, flags: TeecMemFlag
) -> None:
    got = pre_process_param(ptype, TempMemref(0, null=True), memref_null=False)
    assert got == NeedTempShm(attr, 0, flags, register=False)


def test_need_temp_shm_id_is_sign_extended_and_checked() -> None:
    need = NeedTempShm(MEMREF_INPUT, 4, IN, register=True)
    assert need.param(-1).c == U64
    with pytest.raises(UsageError):
        need.param(1 << 31)


# ----------------------------------------------------------------------------- WHOLE


@pytest.mark.parametrize(
    ("flags", "attr"),
    [(IN, MEMREF_INPUT), (OUT, MEMREF_OUTPUT), (IN | OUT, MEMREF_INOUT), (IN | 4, MEMREF_INPUT)],
)
def test_whole_takes_attr_from_parent(flags: int, attr: int) -> None:
    shm = SharedMemory(id=9, size=4096, flags=flags)
    got = pre_process_param(T.TEEC_MEMREF_WHOLE, RegisteredMemref(shm, offset=10, size=5))
    assert got == Param(attr, 0, 4096, 9)


@pytest.mark.parametrize("flags", [0, 4, 0xFFFF_FFFC])
def test_whole_without_direction_is_bad(flags: int) -> None:
    shm = SharedMemory(id=1, size=16, flags=flags)
    bad_params(pre_process_param, T.TEEC_MEMREF_WHOLE, RegisteredMemref(shm))


# ----------------------------------------------------------------------------- PARTIAL

PARTIAL = [
    (T.TEEC_MEMREF_PARTIAL_INPUT, MEMREF_INPUT, IN),
    (T.TEEC_MEMREF_PARTIAL_OUTPUT, MEMREF_OUTPUT, OUT),
    (T.TEEC_MEMREF_PARTIAL_INOUT, MEMREF_INOUT, IN | OUT),
]


@pytest.mark.parametrize(("ptype", "attr", "need"), PARTIAL)
def test_partial_window(ptype: TeecParamType, attr: int, need: int) -> None:
    shm = SharedMemory(id=2, size=100, flags=IN | OUT)
    assert pre_process_param(ptype, RegisteredMemref(shm, 40, 60)) == Param(attr, 40, 60, 2)
    assert pre_process_param(ptype, RegisteredMemref(shm, 100, 0)) == Param(attr, 100, 0, 2)


@pytest.mark.parametrize(("ptype", "attr", "need"), PARTIAL)
@pytest.mark.parametrize("have", [0, IN, OUT])
def test_partial_needs_the_parent_flags(
    ptype: TeecParamType, attr: int, need: int, have: int
) -> None:
    shm = SharedMemory(id=2, size=100, flags=have)
    if have & need != need:
        bad_params(pre_process_param, ptype, RegisteredMemref(shm, 0, 1))
    else:
        assert pre_process_param(ptype, RegisteredMemref(shm, 0, 1)) == Param(attr, 0, 1, 2)


@pytest.mark.parametrize(
    ("offset", "size"), [(0, 101), (1, 100), (100, 1), (101, 0), (SIZE_MAX, 1), (1, SIZE_MAX)]
)
def test_partial_out_of_bounds_is_bad(offset: int, size: int) -> None:
    shm = SharedMemory(id=2, size=100, flags=IN)
    e = bad_params(
        pre_process_param, T.TEEC_MEMREF_PARTIAL_INPUT, RegisteredMemref(shm, offset, size)
    )
    assert "memref offset" in str(e)


def test_partial_flags_are_checked_before_bounds() -> None:
    shm = SharedMemory(id=2, size=100, flags=IN)
    e = bad_params(pre_process_param, T.TEEC_MEMREF_PARTIAL_OUTPUT, RegisteredMemref(shm, 0, 999))
    assert "flags" in str(e)


def test_size_t_wrap_is_caught_as_in_c() -> None:
    # On a 32-bit client 0xFFFFFFF0 + 0x20 wraps to 0x10, below the offset.
    e = bad_params(check_partial_bounds, 0xFFFF_FFF0, 0x20, 0x100, size_max=U32)
    assert "overflows" in str(e)
    bad_params(check_partial_bounds, SIZE_MAX, 2, SIZE_MAX)


def test_shm_descriptor_ranges() -> None:
    for kwargs in ({"id": 1 << 31}, {"size": -1}, {"size": SIZE_MAX + 1}, {"flags": 1 << 32}):
        with pytest.raises(UsageError):
            SharedMemory(**({"id": 0, "size": 0, "flags": 0} | kwargs))
    assert pre_process_param(
        T.TEEC_MEMREF_WHOLE, RegisteredMemref(SharedMemory(-1, 8, IN))
    ) == Param(MEMREF_INPUT, 0, 8, U64)


_u64 = st.integers(0, SIZE_MAX)
_u32 = st.integers(0, U32)


@given(_u64, _u64, _u64)
def test_partial_accepts_exactly_the_windows_inside_the_parent(
    offset: int, size: int, parent: int
) -> None:
    shm = SharedMemory(id=5, size=parent, flags=IN | OUT)
    try:
        got = pre_process_param(T.TEEC_MEMREF_PARTIAL_INOUT, RegisteredMemref(shm, offset, size))
    except TeecError as e:
        assert (e.code, e.origin) == (BAD, API)
        assert offset + size > parent
    else:
        assert offset + size <= parent <= SIZE_MAX
        assert got == Param(MEMREF_INOUT, offset, size, 5)


@given(_u32, _u32, _u32)
def test_32_bit_size_t_never_accepts_an_overflow(offset: int, size: int, parent: int) -> None:
    try:
        check_partial_bounds(offset, size, parent, size_max=U32)
    except TeecError:
        assert offset + size > parent
    else:
        assert offset + size <= parent <= U32


@given(st.integers(0, 64), st.integers(0, 64))
def test_windows_near_the_top_of_size_t(lo: int, n: int) -> None:
    parent = SIZE_MAX - 32
    offset = SIZE_MAX - lo
    try:
        check_partial_bounds(offset, n, parent)
    except TeecError:
        assert offset + n > parent
    else:
        assert offset + n <= parent


# ----------------------------------------------------------------------------- operation


def test_null_operation_is_four_none_params() -> None:
    assert pre_process_operation(None) == (Param(0),) * 4


def test_operation_builds_each_slot() -> None:
    shm = SharedMemory(id=4, size=64, flags=IN | OUT)
    t = param_types(
        T.TEEC_VALUE_INOUT, T.TEEC_MEMREF_TEMP_OUTPUT, T.TEEC_MEMREF_PARTIAL_INPUT, T.TEEC_NONE
    )
    got = pre_process_operation(
        t, [Value(1, 2), TempMemref(8), RegisteredMemref(shm, 8, 16)], memref_null=True
    )
    assert got == (
        Param(3, 1, 2, 0),
        NeedTempShm(MEMREF_OUTPUT, 8, OUT, register=True),
        Param(MEMREF_INPUT, 8, 16, 4),
        Param(0),
    )


def test_operation_bad_nibble_names_its_index() -> None:
    with pytest.raises(TeecParamTypeError) as info:
        pre_process_operation(0x0801, [Value(), None, None])
    assert (info.value.index, info.value.value, info.value.code, info.value.origin) == (
        2,
        8,
        BAD,
        API,
    )


def test_operation_fails_before_anything_is_allocated() -> None:
    # libteec would register param 0's buffer, fail on param 1 and free it again.
    t = param_types(T.TEEC_MEMREF_TEMP_INPUT, T.TEEC_MEMREF_TEMP_INPUT, 0, 0)
    bad_params(pre_process_operation, t, [TempMemref(4), TempMemref(4, null=True)])


def test_operation_at_most_four_params() -> None:
    with pytest.raises(UsageError):
        pre_process_operation(0, [None] * 5)


# ----------------------------------------------------------------------------- post-process


def test_value_input_and_none_are_never_written_back() -> None:
    back = Param(1, 99, 99, 99)
    assert post_process_param(T.TEEC_VALUE_INPUT, Value(1, 2), back) is None
    assert post_process_param(T.TEEC_NONE, None, back) is None


@pytest.mark.parametrize("ptype", [T.TEEC_VALUE_OUTPUT, T.TEEC_VALUE_INOUT])
def test_values_come_back_truncated_to_u32(ptype: TeecParamType) -> None:
    back = Param(int(ptype), 0x1_0000_0005, 6, 7)
    assert post_process_param(ptype, Value(), back) == ValueUpdate(5, 6)


def test_temp_input_is_not_written_back() -> None:
    back = Param(MEMREF_INPUT, 0, 1, 3)
    assert post_process_param(T.TEEC_MEMREF_TEMP_INPUT, TempMemref(4), back, shadow=True) is None


@pytest.mark.parametrize("ptype", [T.TEEC_MEMREF_TEMP_OUTPUT, T.TEEC_MEMREF_TEMP_INOUT])
@pytest.mark.parametrize(
    ("original", "returned", "shadow", "null", "copy"),
    [
        (16, 10, True, False, 10),
        (16, 16, True, False, 16),
        (16, 40, True, False, 16),  # short buffer: size says 40, copy min(40, 16)
        (16, 10, False, False, 0),  # registered in place: nothing to copy
        (0, 40, False, True, 0),  # {NULL, 0}: only the size comes back
    ],
)
def test_temp_copy_back(
    ptype: TeecParamType, original: int, returned: int, shadow: bool, null: bool, copy: int
) -> None:
    back = Param(MEMREF_OUTPUT, 0, returned, 3)
    got = post_process_param(ptype, TempMemref(original, null=null), back, shadow=shadow)
    assert got == MemrefUpdate(returned, 0, copy)


@pytest.mark.parametrize(
    ("returned", "shadow", "copy"), [(64, True, 64), (10, True, 10), (65, True, 0), (10, False, 0)]
)
def test_whole_copy_back(returned: int, shadow: bool, copy: int) -> None:
    memref = RegisteredMemref(SharedMemory(1, 64, IN | OUT))
    back = Param(MEMREF_INOUT, 0, returned, 1)
    got = post_process_param(T.TEEC_MEMREF_WHOLE, memref, back, shadow=shadow)
    assert got == MemrefUpdate(returned, 0, copy)


def test_whole_input_only_is_not_written_back() -> None:
    memref = RegisteredMemref(SharedMemory(1, 64, IN))
    back = Param(MEMREF_INPUT, 0, 64, 1)
    assert post_process_param(T.TEEC_MEMREF_WHOLE, memref, back, shadow=True) is None


@pytest.mark.parametrize("ptype", [T.TEEC_MEMREF_PARTIAL_OUTPUT, T.TEEC_MEMREF_PARTIAL_INOUT])
@pytest.mark.parametrize(
    ("returned", "shadow", "copy"), [(16, True, 16), (3, True, 3), (17, True, 0), (3, False, 0)]
)
def test_partial_copy_back(ptype: TeecParamType, returned: int, shadow: bool, copy: int) -> None:
    memref = RegisteredMemref(SharedMemory(1, 64, IN | OUT), offset=8, size=16)
    back = Param(MEMREF_INOUT, 8, returned, 1)
    assert post_process_param(ptype, memref, back, shadow=shadow) == MemrefUpdate(returned, 8, copy)


def test_partial_input_is_not_written_back() -> None:
    memref = RegisteredMemref(SharedMemory(1, 64, IN), offset=8, size=16)
    back = Param(MEMREF_INPUT, 8, 16, 1)
    assert post_process_param(T.TEEC_MEMREF_PARTIAL_INPUT, memref, back, shadow=True) is None


def test_post_process_operation() -> None:
    shm = SharedMemory(id=4, size=64, flags=OUT)
    t = param_types(
        T.TEEC_VALUE_OUTPUT, T.TEEC_MEMREF_TEMP_OUTPUT, T.TEEC_MEMREF_WHOLE, T.TEEC_VALUE_INPUT
    )
    params: list[TeecParam] = [Value(), TempMemref(8), RegisteredMemref(shm), Value(1, 1)]
    returned = [Param(2, 10, 20, 0), Param(6, 0, 12, 3), Param(6, 0, 32, 4), Param(1, 1, 1, 0)]
    got = post_process_operation(t, params, returned, shadow=[False, True, True])
    assert got == (ValueUpdate(10, 20), MemrefUpdate(12, 0, 8), MemrefUpdate(32, 0, 32), None)
    assert post_process_operation(None, [], returned) == (None,) * 4
    with pytest.raises(UsageError):
        post_process_operation(t, params, returned[:3])


@given(st.integers(0, 1 << 20), st.integers(0, 1 << 20), st.booleans())
def test_temp_copy_never_exceeds_either_buffer(original: int, returned: int, shadow: bool) -> None:
    back = Param(MEMREF_INOUT, 0, returned, 1)
    got = post_process_param(T.TEEC_MEMREF_TEMP_INOUT, TempMemref(original), back, shadow=shadow)
    assert isinstance(got, MemrefUpdate)
    assert got.size == returned
    assert got.copy_length <= min(original, returned)
