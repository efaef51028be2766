"""Golden byte vectors for the Linux TEE uAPI structs and ioctl numbers (qtee/uapi.py).

Every expected byte string and number below was written by hand from qtee-kernel.md §1
(constants §1.1/§1.2, ioctls §1.3, LP64 struct layouts §1.4) and the constants list of §8;
none of them is produced by the code under test.  All fields are little-endian.
"""

from __future__ import annotations

from typing import Any

import pytest

from objects import DecodeError, UsageError
from qtee import uapi
from qtee.uapi import (
    BufData,
    CancelArg,
    CloseSessionArg,
    InvokeArg,
    ObjectInvokeArg,
    OpenSessionArg,
    Param,
    ShmAllocData,
    ShmRegisterData,
    ShmRegisterFdData,
    SuppRecvArg,
    SuppSendArg,
    VersionData,
)


def h(text: str) -> bytes:
    """Hex (spaces and newlines allowed) to bytes."""
    return bytes.fromhex(text)


def roundtrip(record: object, expected: bytes) -> None:
    """``record`` packs to ``expected`` and ``expected`` unpacks to ``record``."""
    assert record.pack() == expected  # type: ignore[attr-defined]
    assert type(record).unpack(expected) == record  # type: ignore[attr-defined]
    buf = bytearray(len(expected) + 8)
    record.pack_into(buf, 8)  # type: ignore[attr-defined]
    assert bytes(buf) == bytes(8) + expected
    assert type(record).unpack(bytes(buf), 8) == record  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- struct vectors


def test_buf_data() -> None:
    """qtee-kernel.md §1.4: tee_ioctl_buf_data (16): 0 u64 buf_ptr; 8 u64 buf_len."""
    roundtrip(
        BufData(buf_ptr=0x00007FFFDEADBEEF, buf_len=0x58),
        h("efbeadde ff7f0000 58000000 00000000"),
    )


def test_param() -> None:
    """qtee-kernel.md §1.4: tee_ioctl_param (32): u64 attr, a, b, c at 0/8/16/24."""
    roundtrip(
        Param(attr=0x103, a=0x1122334455667788, b=0x10, c=0xFFFFFFFFFFFFFFFF),
        h(
            "03010000 00000000"  # attr VALUE_INOUT | META
            "88776655 44332211"  # a
            "10000000 00000000"  # b
            "ffffffff ffffffff"  # c
        ),
    )
    assert Param(0x10C).type == 12  # §1.2: type = attr & 0xff
    assert Param(0).pack() == bytes(32)


def test_version_data() -> None:
    """qtee-kernel.md §1.3/§1.4: version_data (12) as qcomtee reports it (4, 0, 0x10)."""
    roundtrip(VersionData(4, 0, 0x10), h("04000000 00000000 10000000"))
    roundtrip(VersionData(0x01020304, 0xA0B0C0D0, 3), h("04030201 d0c0b0a0 03000000"))


def test_shm_alloc_data() -> None:
    """qtee-kernel.md §1.4: shm_alloc_data (16): u64 size; u32 flags; s32 id (negative ok)."""
    roundtrip(ShmAllocData(size=0x2000, flags=0, id=-1), h("00200000 00000000 00000000 ffffffff"))
    roundtrip(ShmAllocData(size=0x1000, flags=2, id=7), h("00100000 00000000 02000000 07000000"))
    roundtrip(
        ShmAllocData(size=1, flags=0, id=-0x80000000), h("01000000 00000000 00000000 00000080")
    )


def test_shm_register_data() -> None:
    """qtee-kernel.md §1.4: shm_register_data (24): u64 addr, length; u32 flags; s32 id."""
    roundtrip(
        ShmRegisterData(addr=0x1000, length=0x3000, flags=0, id=-22),
        h("00100000 00000000 00300000 00000000 00000000 eaffffff"),
    )


def test_shm_register_fd_data() -> None:
    """qtee-kernel.md §1.4: shm_register_fd_data (24): s64 fd; u64 size; u32 flags; s32 id."""
    roundtrip(
        ShmRegisterFdData(fd=3, size=0x4000, flags=0, id=5),
        h("03000000 00000000 00400000 00000000 00000000 05000000"),
    )
    roundtrip(
        ShmRegisterFdData(fd=-1, size=0, flags=1, id=-2),
        h("ffffffff ffffffff 00000000 00000000 01000000 feffffff"),
    )


def test_open_session_arg() -> None:
    """qtee-kernel.md §1.4: open_session_arg (56): uuid[16], clnt_uuid[16], then 6 u32."""
    rec = OpenSessionArg(
        uuid=bytes(range(16)),
        clnt_uuid=bytes(range(16, 32)),
        clnt_login=0x80000000,
        cancel_id=1,
        session=2,
        ret=0xFFFF000E,
        ret_origin=4,
        num_params=0,
    )
    expected = h(
        "00010203 04050607 08090a0b 0c0d0e0f"  # 0 uuid
        "10111213 14151617 18191a1b 1c1d1e1f"  # 16 clnt_uuid
        "00000080"  # 32 clnt_login (REE_KERNEL)
        "01000000"  # 36 cancel_id
        "02000000"  # 40 session
        "0e00ffff"  # 44 ret (TEEC_ERROR_COMMUNICATION)
        "04000000"  # 48 ret_origin
        "00000000"  # 52 num_params
    )
    assert len(expected) == 56
    roundtrip(rec, expected)


def test_invoke_arg() -> None:
    """qtee-kernel.md §1.4: invoke_arg (24): func, session, cancel_id, ret, ret_origin, n."""
    roundtrip(
        InvokeArg(func=0x11, session=0x22, cancel_id=0x33, ret=0xFFFF0006, ret_origin=3),
        h("11000000 22000000 33000000 0600ffff 03000000 00000000"),
    )


def test_cancel_and_close_session_arg() -> None:
    """qtee-kernel.md §1.4: cancel_arg (8): cancel_id, session; close_session_arg (4)."""
    roundtrip(CancelArg(cancel_id=7, session=9), h("07000000 09000000"))
    roundtrip(CloseSessionArg(session=0xDEADBEEF), h("efbeadde"))


def test_object_invoke_arg_has_4_byte_pad() -> None:
    """qtee-kernel.md §1.4: object_invoke_arg (24): u64 id; u32 op, ret, num_params; pad."""
    rec = ObjectInvokeArg(id=0xFFFFFFFFFFFFFFFF, op=5, ret=0xFFFFFFA0, num_params=0)
    expected = h(
        "ffffffff ffffffff"  # 0 id = TEE_OBJREF_NULL (the root)
        "05000000"  # 8 op
        "a0ffffff"  # 12 ret = (u32)-96 UNAVAIL
        "00000000"  # 16 num_params
        "00000000"  # 20 pad (__u32 :32)
    )
    roundtrip(rec, expected)
    roundtrip(
        ObjectInvokeArg(id=0x0000000100000002, op=0xFFFF, ret=0, num_params=0),
        h("02000000 01000000 ffff0000 00000000 00000000 00000000"),
    )


def test_supp_recv_and_send_arg() -> None:
    """qtee-kernel.md §1.4: supp_recv_arg (8): func, num_params; supp_send_arg (8): ret, n."""
    roundtrip(SuppRecvArg(func=0xFFFF, num_params=0), h("ffff0000 00000000"))
    roundtrip(SuppSendArg(ret=0xFFFFFFA0, num_params=0), h("a0ffffff 00000000"))


# --------------------------------------------------------------------------- argument blocks

# §1.4 + §4.1/§6: OBJECT_INVOKE on the root (id TEE_OBJREF_NULL), op 5, with
# [OBJREF_INPUT {id 0x1234, flags USER=2}, OBJREF_OUTPUT] -> 24 + 2*32 = 88 bytes.
OBJECT_INVOKE_BLOCK = h(
    "ffffffff ffffffff 05000000 00000000 02000000 00000000"  # header
    "0b000000 00000000 34120000 00000000 02000000 00000000 00000000 00000000"  # param 0
    "0c000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000"  # param 1
)


def test_object_invoke_block() -> None:
    """qtee-kernel.md §1.4 (header 24 B then 32-B params), §1.5 (24 + 32n == buf_len)."""
    header = ObjectInvokeArg(id=0xFFFFFFFFFFFFFFFF, op=5, ret=0, num_params=2)
    params = [Param(11, a=0x1234, b=2), Param(12)]
    block = uapi.pack_arg(header, params)
    assert block == OBJECT_INVOKE_BLOCK
    assert len(block) == 24 + 32 * 2
    got_header, got_params = uapi.unpack_arg(ObjectInvokeArg, OBJECT_INVOKE_BLOCK)
    assert got_header == header
    assert got_params == (Param(11, 0x1234, 2, 0), Param(12, 0, 0, 0))
    assert uapi.pack_params(params) == OBJECT_INVOKE_BLOCK[24:]
    assert uapi.unpack_params(OBJECT_INVOKE_BLOCK, 24, 2) == tuple(params)


def test_supp_recv_block() -> None:
    """qtee-kernel.md §1.4, §4.3: RECV output {func=op, n, meta 0x103 {obj id, req id}, IB}."""
    header = SuppRecvArg(func=1, num_params=2)
    params = [Param(0x103, a=0x42, b=3, c=0), Param(8, a=0x00007F0000001000, b=5)]
    expected = h(
        "01000000 02000000"
        "03010000 00000000 42000000 00000000 03000000 00000000 00000000 00000000"
        "08000000 00000000 00100000 007f0000 05000000 00000000 00000000 00000000"
    )
    assert uapi.pack_arg(header, params) == expected
    assert uapi.unpack_arg(SuppRecvArg, expected) == (header, tuple(params))


def test_supp_send_block() -> None:
    """qtee-kernel.md §1.4, §4.4: SEND {ret, n, meta 0x102 {a = request id}, UBUF_OUTPUT}."""
    header = SuppSendArg(ret=0, num_params=2)
    params = [Param(0x102, a=3), Param(9, a=0x00007F0000002000, b=4)]
    expected = h(
        "00000000 02000000"
        "02010000 00000000 03000000 00000000 00000000 00000000 00000000 00000000"
        "09000000 00000000 00200000 007f0000 04000000 00000000 00000000 00000000"
    )
    assert uapi.pack_arg(header, params) == expected
    assert uapi.unpack_arg(SuppSendArg, expected) == (header, tuple(params))


def test_invoke_and_open_session_blocks() -> None:
    """qtee-kernel.md §1.4: invoke_arg params at 24, open_session_arg params at 56."""
    inv = InvokeArg(func=1, session=2, num_params=1)
    value = Param(1, a=1, b=2, c=3)
    value_bytes = h("01000000 00000000 01000000 00000000 02000000 00000000 03000000 00000000")
    block = h("01000000 02000000 00000000 00000000 00000000 01000000") + value_bytes
    assert uapi.pack_arg(inv, [value]) == block
    assert uapi.unpack_arg(InvokeArg, block) == (inv, (value,))
    sess = OpenSessionArg(bytes(16), bytes(16), 0, num_params=1)
    block = bytes(52) + h("01000000") + value_bytes
    assert uapi.pack_arg(sess, [value]) == block
    assert uapi.unpack_arg(OpenSessionArg, block) == (sess, (value,))


# --------------------------------------------------------------------------- numbers


def test_ioctl_numbers() -> None:
    """qtee-kernel.md §1.3 and §8: full ioctl command numbers."""
    assert uapi.TEE_IOC_VERSION == 0x800CA400
    assert uapi.TEE_IOC_SHM_ALLOC == 0xC010A401
    assert uapi.TEE_IOC_OPEN_SESSION == 0x8010A402
    assert uapi.TEE_IOC_INVOKE == 0x8010A403
    assert uapi.TEE_IOC_CANCEL == 0x8008A404
    assert uapi.TEE_IOC_CLOSE_SESSION == 0x8004A405
    assert uapi.TEE_IOC_SUPPL_RECV == 0x8010A406
    assert uapi.TEE_IOC_SUPPL_SEND == 0x8010A407
    assert uapi.TEE_IOC_SHM_REGISTER_FD == 0xC018A408
    assert uapi.TEE_IOC_SHM_REGISTER == 0xC018A409
    assert uapi.TEE_IOC_OBJECT_INVOKE == 0x8010A40A
    assert uapi.IOCTL_NAMES[0x8010A40A] == "TEE_IOC_OBJECT_INVOKE"
    assert uapi.IOCTL_NAMES[0x800CA400] == "TEE_IOC_VERSION"
    assert len(uapi.IOCTL_NAMES) == 11


def test_struct_sizes() -> None:
    """qtee-kernel.md §1.4: struct sizes (LP64)."""
    sizes: dict[type[Any], int] = {
        BufData: 16,
        Param: 32,
        VersionData: 12,
        ShmAllocData: 16,
        ShmRegisterData: 24,
        ShmRegisterFdData: 24,
        OpenSessionArg: 56,
        InvokeArg: 24,
        CancelArg: 8,
        CloseSessionArg: 4,
        ObjectInvokeArg: 24,
        SuppRecvArg: 8,
        SuppSendArg: 8,
    }
    for cls, size in sizes.items():
        assert size == cls.SIZE, cls.__name__


def test_constants() -> None:
    """qtee-kernel.md §1.1, §1.2 and §8: every listed constant."""
    assert uapi.TEE_IOC_MAGIC == 0xA4
    assert uapi.TEE_IOC_BASE == 0
    assert uapi.TEE_MAX_ARG_SIZE == 4096
    assert uapi.TEE_GEN_CAP_GP == 0x1
    assert uapi.TEE_GEN_CAP_PRIVILEGED == 0x2
    assert uapi.TEE_GEN_CAP_REG_MEM == 0x4
    assert uapi.TEE_GEN_CAP_MEMREF_NULL == 0x8
    assert uapi.TEE_GEN_CAP_OBJREF == 0x10
    assert uapi.TEE_MEMREF_NULL == 0xFFFFFFFFFFFFFFFF
    assert uapi.TEE_OBJREF_NULL == 0xFFFFFFFFFFFFFFFF
    assert uapi.TEE_IMPL_ID_OPTEE == 1
    assert uapi.TEE_IMPL_ID_AMDTEE == 2
    assert uapi.TEE_IMPL_ID_TSTEE == 3
    assert uapi.TEE_IMPL_ID_QTEE == 4
    assert uapi.TEE_OPTEE_CAP_TZ == 1
    assert uapi.TEE_IOCTL_UUID_LEN == 16
    assert uapi.TEE_IOCTL_PARAM_ATTR_TYPE_NONE == 0
    assert uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_INPUT == 1
    assert uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_OUTPUT == 2
    assert uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_INOUT == 3
    assert uapi.TEE_IOCTL_PARAM_ATTR_TYPE_MEMREF_INPUT == 5
    assert uapi.TEE_IOCTL_PARAM_ATTR_TYPE_MEMREF_OUTPUT == 6
    assert uapi.TEE_IOCTL_PARAM_ATTR_TYPE_MEMREF_INOUT == 7
    assert uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_INPUT == 8
    assert uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_OUTPUT == 9
    assert uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_INOUT == 10
    assert uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_INPUT == 11
    assert uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_OUTPUT == 12
    assert uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_INOUT == 13
    assert uapi.TEE_IOCTL_PARAM_ATTR_TYPE_MASK == 0xFF
    assert uapi.TEE_IOCTL_PARAM_ATTR_META == 0x100
    assert uapi.TEE_IOCTL_PARAM_ATTR_MASK == 0x1FF
    assert frozenset({0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13}) == uapi.VALID_PARAM_TYPES
    assert uapi.TEE_IOCTL_LOGIN_PUBLIC == 0
    assert uapi.TEE_IOCTL_LOGIN_USER == 1
    assert uapi.TEE_IOCTL_LOGIN_GROUP == 2
    assert uapi.TEE_IOCTL_LOGIN_APPLICATION == 4
    assert uapi.TEE_IOCTL_LOGIN_USER_APPLICATION == 5
    assert uapi.TEE_IOCTL_LOGIN_GROUP_APPLICATION == 6
    assert uapi.TEE_IOCTL_LOGIN_REE_KERNEL_MIN == 0x80000000
    assert uapi.TEE_IOCTL_LOGIN_REE_KERNEL_MAX == 0xBFFFFFFF
    assert uapi.TEE_IOCTL_LOGIN_REE_KERNEL == 0x80000000
    assert uapi.QCOMTEE_OBJREF_FLAG_TEE == 1
    assert uapi.QCOMTEE_OBJREF_FLAG_USER == 2
    assert uapi.QCOMTEE_OBJREF_FLAG_MEM == 4


# --------------------------------------------------------------------------- errors


def test_decoders_reject_short_buffers() -> None:
    """qtee-kernel.md §1.4: each struct needs SIZE bytes at its offset."""
    for cls, size in (
        (BufData, 16),
        (Param, 32),
        (VersionData, 12),
        (ShmAllocData, 16),
        (ShmRegisterData, 24),
        (ShmRegisterFdData, 24),
        (OpenSessionArg, 56),
        (InvokeArg, 24),
        (CancelArg, 8),
        (CloseSessionArg, 4),
        (ObjectInvokeArg, 24),
        (SuppRecvArg, 8),
        (SuppSendArg, 8),
    ):
        with pytest.raises(DecodeError):
            cls.unpack(bytes(size - 1))
        with pytest.raises(DecodeError):
            cls.unpack(bytes(size), 1)
        with pytest.raises(DecodeError):
            cls.unpack(b"")
    # Header says 2 params but only one (and a bit) follows.
    with pytest.raises(DecodeError):
        uapi.unpack_arg(ObjectInvokeArg, OBJECT_INVOKE_BLOCK[:-1])
    with pytest.raises(DecodeError):
        uapi.unpack_arg(ObjectInvokeArg, OBJECT_INVOKE_BLOCK[:20])
    with pytest.raises(DecodeError):
        uapi.unpack_params(bytes(31), 0, 1)
    with pytest.raises(DecodeError):
        uapi.unpack_params(bytes(64), 0, -1)


def test_out_of_range_fields() -> None:
    """qtee-kernel.md §1.4: fields are u32/u64/s32/s64; values that do not fit are refused."""
    with pytest.raises(UsageError):
        VersionData(2**32, 0, 0)
    with pytest.raises(UsageError):
        VersionData(-1, 0, 0)
    with pytest.raises(UsageError):
        Param(attr=2**64)
    with pytest.raises(UsageError):
        Param(attr=0, a=-1)
    with pytest.raises(UsageError):
        ShmAllocData(size=1, id=2**31)
    with pytest.raises(UsageError):
        ShmAllocData(size=1, id=-(2**31) - 1)
    with pytest.raises(UsageError):
        ShmRegisterFdData(fd=-(2**63) - 1)
    with pytest.raises(UsageError):
        ShmRegisterFdData(fd=2**63)
    with pytest.raises(UsageError):
        ObjectInvokeArg(id=2**64, op=0)
    with pytest.raises(UsageError):
        ObjectInvokeArg(id=0, op=0, ret=-96)  # ret is a u32: pass (u32)-96
    with pytest.raises(UsageError):
        SuppSendArg(ret=-1, num_params=0)
    with pytest.raises(UsageError):
        CloseSessionArg(2**32)
    with pytest.raises(UsageError):
        OpenSessionArg(bytes(15), bytes(16), 0)
    with pytest.raises(UsageError):
        OpenSessionArg(bytes(16), bytes(17), 0)
    with pytest.raises(UsageError):
        uapi.pack_arg(ObjectInvokeArg(id=0, op=0, num_params=1), [])
    with pytest.raises(UsageError):
        Param(0).pack_into(bytearray(31))
    # Extremes that do fit are accepted.
    assert ShmRegisterFdData(fd=-(2**63)).pack()[:8] == h("00000000 00000080")
    assert ShmAllocData(size=2**64 - 1, id=2**31 - 1).pack() == h(
        "ffffffff ffffffff 00000000 ffffff7f"
    )


def test_non_int_fields() -> None:
    """Non-integer field values are a TypeError, not silently coerced."""
    with pytest.raises(TypeError):
        Param(attr=1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Param(attr=True)
    with pytest.raises(TypeError):
        BufData("0", 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ObjectInvokeArg(id=None, op=0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        uapi.pack_params([Param(0), (0, 0, 0, 0)])  # type: ignore[list-item]


def test_the_layouts_have_one_definition() -> None:
    """Issue 17: ``struct tee_ioctl_param`` and ``tee_ioctl_buf_data`` are laid out once, in
    uapi.py (qtee-kernel.md §1.4); the modules that pack them in place use those structs."""
    import re
    from pathlib import Path

    assert uapi.PARAM_STRUCT.format == "<4Q" and uapi.PARAM_STRUCT.size == 32
    assert uapi.BUF_DATA_STRUCT.format == "<QQ" and uapi.BUF_DATA_STRUCT.size == 16
    assert uapi.SUPP_ARG_STRUCT.format == "<2I" and uapi.SUPP_ARG_STRUCT.size == 8
    assert uapi.params_struct(3).size == 96
    with pytest.raises(UsageError):
        uapi.params_struct(-1)
    root = Path(uapi.__file__).resolve().parents[1]
    # optee_msg_param has the same bytes but is OP-TEE's message ABI, not the uAPI's.
    allowed = {
        "qtee/uapi.py",
        "qtee/_optee/optee_msg.py",
    }
    layouts = re.compile(r"""Struct\(["']<(4Q|QQQQ|QQ)["']\)""")
    found = {
        str(p.relative_to(root))
        for pkg in ("objects", "qtee", "supplicant")
        for p in (root / pkg).rglob("*.py")
        if layouts.search(p.read_text())
    }
    assert found <= allowed, sorted(found - allowed)
