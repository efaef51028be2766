"""Early errno rows of OBJECT_INVOKE / SUPPL_* (qtee-kernel.md §1.5, §2.5, §4.1 step 1, §5)."""

from __future__ import annotations

import errno

import pytest

from objects import DriverError
from qtee import uapi
from qtee._checks import check_buf_len, check_param_attrs, params_check, root_object_check
from tests._helpers import OBJ_IN, OBJ_OUT, UB_IN, UB_OUT


def einval(fn: object, *args: object, **kwargs: object) -> None:
    with pytest.raises(DriverError) as exc:
        fn(*args, **kwargs)  # type: ignore[operator]
    assert exc.value.errno == errno.EINVAL


def test_buf_len_rules_section_1_5() -> None:
    check_buf_len(24, 24, 0)
    check_buf_len(24 + 32 * 2, 24, 2)
    einval(check_buf_len, 23, 24, 0)  # shorter than the header
    einval(check_buf_len, 4096 + 8, 8, 127)  # over TEE_MAX_ARG_SIZE
    einval(check_buf_len, 24 + 32, 24, 2)  # != header + 32n
    # SUPPL_SEND allows a larger buffer, never a shorter one.
    check_buf_len(8 + 32 * 3, 8, 2, exact=False)
    einval(check_buf_len, 8 + 32, 8, 2, exact=False)
    # 127 params is the most that fits 4096 at the core layer.
    check_buf_len(24 + 32 * 127, 24, 127)
    einval(check_buf_len, 24 + 32 * 128, 24, 128)


@pytest.mark.parametrize("attr", [0x200, 0x1000 | UB_IN, 4, 14, 0xFF])
def test_bad_attr_bits_and_undefined_types_section_1_2(attr: int) -> None:
    einval(check_param_attrs, [uapi.Param(UB_IN), uapi.Param(attr)])


def test_defined_types_and_meta_pass_the_core_check() -> None:
    check_param_attrs([uapi.Param(t) for t in sorted(uapi.VALID_PARAM_TYPES)])
    check_param_attrs([uapi.Param(uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_INOUT | 0x100)])


def test_params_check_counts_section_4_1() -> None:
    params = [uapi.Param(a) for a in (OBJ_OUT, UB_IN, UB_OUT, UB_IN, OBJ_IN)]
    assert params_check(params) == (2, 1, 1, 1)
    # 16 of a type passes the kernel's check (the nibble quirk of §7 is downstream).
    assert params_check([uapi.Param(UB_IN)] * 16) == (16, 0, 0, 0)
    einval(params_check, [uapi.Param(UB_IN)] * 17)
    einval(params_check, [uapi.Param(UB_IN)] * 16 * 4 + [uapi.Param(UB_OUT)])  # 65 > 64


@pytest.mark.parametrize(
    "attr",
    [
        uapi.TEE_IOCTL_PARAM_ATTR_TYPE_NONE,
        uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_INPUT,
        uapi.TEE_IOCTL_PARAM_ATTR_TYPE_MEMREF_INPUT,
        uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_INOUT,
        uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_INOUT,
        UB_IN | uapi.TEE_IOCTL_PARAM_ATTR_META,
    ],
)
def test_params_check_refuses_other_types_section_4_1(attr: int) -> None:
    einval(params_check, [uapi.Param(UB_IN), uapi.Param(attr)])


@pytest.mark.parametrize("op", [4, 8, 9])
def test_privileged_root_ops_section_2_5(op: int) -> None:
    einval(root_object_check, op, [])


def test_root_op5_null_credentials_is_kernel_only_section_2_5() -> None:
    null_cred = [uapi.Param(OBJ_IN, uapi.TEE_OBJREF_NULL), uapi.Param(OBJ_OUT)]
    einval(root_object_check, 5, null_cred)
    # A real credentials object, op 2 with NULL, or another shape all pass through.
    root_object_check(
        5, [uapi.Param(OBJ_IN, 7, uapi.QCOMTEE_OBJREF_FLAG_USER), uapi.Param(OBJ_OUT)]
    )
    root_object_check(2, null_cred)
    root_object_check(5, [*null_cred, uapi.Param(UB_IN)])
    root_object_check(0, [])
