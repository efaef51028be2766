"""The client identity the Linux TEE core computes for OpenSession (``tee_core.c``).

The driver (OP-TEE's ``optee_open_session``) calls ``tee_session_calc_client_uuid`` with
the ioctl's ``clnt_login`` and ``clnt_uuid`` and passes the result to the TEE:

* PUBLIC, and exactly ``TEE_LOGIN_REE_KERNEL``: the nil UUID;
* USER: UUIDv5 over the name ``uid=<euid in lowercase hex>``;
* GROUP: the gid is the first 4 bytes of ``clnt_uuid`` (a ``gid_t`` libteec copies in,
  native endian); the caller must be in that group (``in_egroup_p``: egid or a
  supplementary group) and gid -1 is invalid, else -EPERM; name ``gid=<gid in hex>``;
* anything else (the APPLICATION methods included): -EINVAL.

The name is hashed without its NUL; the UUIDv5 is RFC 4122's (SHA-1 of the namespace's
16 big-endian bytes then the name, first 16 bytes, version nibble 5, variant 10), so it
equals Python's ``uuid.uuid5``.  Before that, ``tee_ioctl_open_session`` refuses the
whole REE-kernel login range from userspace with -EPERM (after the params were read, so a
bad param's -EINVAL wins).  Only the initial user namespace is modelled: the kernel
formats the global kuid/kgid values.
"""

from __future__ import annotations

import errno
import hashlib
import struct
import uuid
from dataclasses import dataclass, field
from typing import Final

from objects import DriverError, UsageError
from qtee.gp._defs import _U32, TeecLogin, is_ree_kernel_login

__all__ = [
    "NIL_UUID",
    "TEE_CLIENT_UUID_NS",
    "Cred",
    "calc_client_uuid",
    "check_user_login",
    "gid_connection_data",
    "uuid_v5",
]

_INVALID_GID: Final = _U32  # (gid_t)-1
_UUID_LEN: Final = 16

#: ``uuid_null``: what PUBLIC and REE_KERNEL logins present.
NIL_UUID: Final = uuid.UUID(int=0)

#: ``tee_client_uuid_ns``: the random (v4) namespace of Linux TEE client UUIDs.
TEE_CLIENT_UUID_NS: Final = uuid.UUID("58ac9ca0-2086-4683-a1b8-ec4bc08e01b6")


def _u32(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not 0 <= value <= _U32:
        raise UsageError(f"{what}={value} is not a u32")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class Cred:
    """What the kernel reads of the calling task: ``current_euid()``, egid, groups."""

    euid: int
    egid: int
    groups: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        _u32(self.euid, "euid")
        _u32(self.egid, "egid")
        object.__setattr__(self, "groups", frozenset(self.groups))
        for gid in self.groups:
            _u32(gid, "supplementary gid")

    def in_egroup(self, gid: int) -> bool:
        """``in_egroup_p``: the effective gid, or one of the supplementary groups."""
        return gid == self.egid or gid in self.groups


def uuid_v5(namespace: uuid.UUID, name: bytes) -> uuid.UUID:
    """The kernel's ``uuid_v5``: SHA-1(namespace bytes + name), then version 5, variant 10."""
    digest = bytearray(hashlib.sha1(namespace.bytes + name).digest()[:_UUID_LEN])
    digest[6] = (digest[6] & 0x0F) | 0x50
    digest[8] = (digest[8] & 0x3F) | 0x80
    return uuid.UUID(bytes=bytes(digest))


def gid_connection_data(gid: int) -> bytes:
    """The ``clnt_uuid`` libteec sends for a GROUP login: the ``gid_t``, then zeros."""
    return struct.pack("<I", _u32(gid, "gid")).ljust(_UUID_LEN, b"\0")


def check_user_login(clnt_login: int) -> None:
    """``tee_ioctl_open_session``: a userspace caller may not use the REE-kernel range."""
    if is_ree_kernel_login(_u32(clnt_login, "clnt_login")):
        raise DriverError(errno.EPERM, f"login {clnt_login:#x} is reserved for kernel clients")


def calc_client_uuid(
    connection_method: int, connection_data: bytes = bytes(_UUID_LEN), *, cred: Cred
) -> uuid.UUID:
    """``tee_session_calc_client_uuid``: the client UUID the TEE sees, or DriverError."""
    method = _u32(connection_method, "connection_method")
    if len(connection_data) != _UUID_LEN:
        raise UsageError(f"connection_data is {_UUID_LEN} bytes, not {len(connection_data)}")
    if method in (TeecLogin.TEEC_LOGIN_PUBLIC, TeecLogin.TEE_LOGIN_REE_KERNEL):
        return NIL_UUID
    if method == TeecLogin.TEEC_LOGIN_USER:
        name = f"uid={cred.euid:x}"
    elif method == TeecLogin.TEEC_LOGIN_GROUP:
        (gid,) = struct.unpack_from("<I", connection_data)
        if gid == _INVALID_GID or not cred.in_egroup(gid):
            raise DriverError(errno.EPERM, f"not a member of group {gid}")
        name = f"gid={gid:x}"
    else:
        raise DriverError(errno.EINVAL, f"login method {method:#x} has no client UUID")
    return uuid_v5(TEE_CLIENT_UUID_NS, name.encode("ascii"))
