"""Client identity of an OpenSession (qtee/gp/_identity.py; optee.md §2).

The expected UUIDs are computed here with hashlib, step by step as the kernel's
``uuid_v5`` does it (SHA-1 of the namespace's 16 bytes then the name without its NUL,
first 16 bytes, ``b[6] = (h[6] & 0x0F) | 0x50``, ``b[8] = (h[8] & 0x3F) | 0x80``), and
cross-checked with Python's ``uuid.uuid5``, which builds the same thing.
"""

from __future__ import annotations

import errno
import hashlib
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from objects import DriverError, UsageError
from qtee.gp import (
    NIL_UUID,
    TEE_CLIENT_UUID_NS,
    Cred,
    TeecLogin,
    calc_client_uuid,
    check_user_login,
    gid_connection_data,
    uuid_v5,
)

NS_BYTES = bytes.fromhex("58ac9ca020864683a1b8ec4bc08e01b6")
L = TeecLogin


def kernel_v5(name: str) -> uuid.UUID:
    h = hashlib.sha1()
    h.update(NS_BYTES)
    h.update(name.encode())
    b = bytearray(h.digest()[:16])
    b[6] = (b[6] & 0x0F) | 0x50
    b[8] = (b[8] & 0x3F) | 0x80
    return uuid.UUID(bytes=bytes(b))


def errno_of(fn: object, *args: object, **kwargs: object) -> int:
    assert callable(fn)
    with pytest.raises(DriverError) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, OSError)
    return info.value.code


ROOT = Cred(euid=0, egid=0)


def test_namespace() -> None:
    assert TEE_CLIENT_UUID_NS.bytes == NS_BYTES
    assert NIL_UUID.bytes == bytes(16)


@pytest.mark.parametrize(
    ("uid", "golden"),
    [
        (0, "ef0180a3-13f3-5d1c-b7f5-888c0e21059a"),
        (1000, "fc34275c-d8dd-5ba7-968b-504718363b87"),
    ],
)
def test_user_login_golden(uid: int, golden: str) -> None:
    got = calc_client_uuid(L.TEEC_LOGIN_USER, cred=Cred(euid=uid, egid=5))
    assert got == kernel_v5(f"uid={uid:x}")
    assert got == uuid.uuid5(TEE_CLIENT_UUID_NS, f"uid={uid:x}")
    assert str(got) == golden
    assert (got.version, got.variant) == (5, uuid.RFC_4122)


def test_name_is_lowercase_hex_without_nul() -> None:
    got = calc_client_uuid(L.TEEC_LOGIN_USER, cred=Cred(euid=0xABCDEF, egid=0))
    assert got == kernel_v5("uid=abcdef")
    assert got != kernel_v5("uid=ABCDEF")
    assert got != kernel_v5("uid=abcdef\0")
    assert got != kernel_v5(f"uid={0xABCDEF}")


def test_user_login_uses_euid_and_ignores_connection_data() -> None:
    cred = Cred(euid=1000, egid=1000, groups=frozenset({1, 2}))
    data = gid_connection_data(1)
    assert calc_client_uuid(L.TEEC_LOGIN_USER, data, cred=cred) == kernel_v5("uid=3e8")


@given(st.integers(0, 0xFFFF_FFFF))
def test_user_login_matches_uuid5(uid: int) -> None:
    got = calc_client_uuid(L.TEEC_LOGIN_USER, cred=Cred(euid=uid, egid=0))
    assert got == uuid.uuid5(TEE_CLIENT_UUID_NS, f"uid={uid:x}")


@given(st.binary(max_size=64))
def test_uuid_v5_is_rfc4122_v5(name: bytes) -> None:
    got = uuid_v5(TEE_CLIENT_UUID_NS, name)
    h = bytearray(hashlib.sha1(NS_BYTES + name).digest()[:16])
    h[6] = (h[6] & 0x0F) | 0x50
    h[8] = (h[8] & 0x3F) | 0x80
    assert got.bytes == bytes(h)


@pytest.mark.parametrize("method", [L.TEEC_LOGIN_PUBLIC, L.TEE_LOGIN_REE_KERNEL])
def test_public_and_ree_kernel_are_nil(method: int) -> None:
    assert calc_client_uuid(method, gid_connection_data(7), cred=ROOT) == NIL_UUID


@pytest.mark.parametrize(
    "cred",
    [
        Cred(euid=5, egid=1000),
        Cred(euid=5, egid=5, groups=frozenset({1000})),
    ],
)
def test_group_login_member(cred: Cred) -> None:
    got = calc_client_uuid(L.TEEC_LOGIN_GROUP, gid_connection_data(1000), cred=cred)
    assert got == kernel_v5("gid=3e8")
    assert got == uuid.uuid5(TEE_CLIENT_UUID_NS, "gid=3e8")


def test_group_login_reads_only_the_gid_t() -> None:
    data = gid_connection_data(1000)[:4] + b"\xff" * 12
    got = calc_client_uuid(L.TEEC_LOGIN_GROUP, data, cred=Cred(euid=0, egid=1000))
    assert got == kernel_v5("gid=3e8")


def test_group_login_non_member_is_eperm() -> None:
    cred = Cred(euid=0, egid=0, groups=frozenset({1, 2}))
    data = gid_connection_data(1000)
    assert errno_of(calc_client_uuid, L.TEEC_LOGIN_GROUP, data, cred=cred) == errno.EPERM


def test_group_login_invalid_gid_is_eperm_even_for_a_member() -> None:
    cred = Cred(euid=0, egid=0xFFFF_FFFF, groups=frozenset({0xFFFF_FFFF}))
    data = gid_connection_data(0xFFFF_FFFF)
    assert errno_of(calc_client_uuid, L.TEEC_LOGIN_GROUP, data, cred=cred) == errno.EPERM


@pytest.mark.parametrize(
    "method",
    [
        L.TEEC_LOGIN_APPLICATION,
        L.TEEC_LOGIN_USER_APPLICATION,
        L.TEEC_LOGIN_GROUP_APPLICATION,
        3,
        7,
        0x80000001,  # the rest of the REE-kernel range: only exactly REE_KERNEL is nil
        0xBFFFFFFF,
        L.TEE_LOGIN_TRUSTED_APP,
        0xFFFFFFFF,
    ],
)
def test_other_methods_are_einval(method: int) -> None:
    cred = Cred(euid=0, egid=0, groups=frozenset({0}))
    data = gid_connection_data(0)
    assert errno_of(calc_client_uuid, method, data, cred=cred) == errno.EINVAL


@pytest.mark.parametrize("login", [0x80000000, 0x80000001, 0x9000_0000, 0xBFFFFFFF])
def test_userspace_may_not_use_the_ree_kernel_range(login: int) -> None:
    assert errno_of(check_user_login, login) == errno.EPERM


@pytest.mark.parametrize("login", [0, 1, 2, 4, 5, 6, 0x7FFFFFFF, 0xC0000000, 0xF0000000])
def test_other_logins_pass_the_ioctl_check(login: int) -> None:
    check_user_login(login)


def test_gid_connection_data_layout() -> None:
    assert gid_connection_data(0x01020304) == bytes([4, 3, 2, 1]) + bytes(12)


def test_usage_errors() -> None:
    with pytest.raises(UsageError):
        calc_client_uuid(L.TEEC_LOGIN_USER, b"short", cred=ROOT)
    with pytest.raises(UsageError):
        calc_client_uuid(-1, cred=ROOT)
    with pytest.raises(UsageError):
        Cred(euid=-1, egid=0)
    with pytest.raises(UsageError):
        Cred(euid=0, egid=0, groups=frozenset({1 << 32}))
    with pytest.raises(UsageError):
        gid_connection_data(1 << 32)
    with pytest.raises(UsageError):
        check_user_login(1 << 32)
