"""Client credentials: the CBOR map a client hands QTEE when it registers.

Qualcomm's userspace library registers with QTEE by passing a callback object that
exposes the IIO interface (op 0 ``getLength``, op 1 ``readAtOffset``); QTEE reads a CBOR
map through it.  Keys: 1 uid, 2 pkg_flags, 3 pkg_name, 4 pkg_cert, 5 permissions,
6 system_time (ms).  The library itself sends uid and time only.
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import cbor2

from objects import DecodeError, UsageError

__all__ = ["CredentialKey", "Credentials"]


class CredentialKey(enum.IntEnum):
    """Keys of the credentials CBOR map."""

    UID = 1
    PKG_FLAGS = 2
    PKG_NAME = 3
    PKG_CERT = 4
    PERMISSIONS = 5
    SYSTEM_TIME = 6


_TYPES: dict[CredentialKey, type | tuple[type, ...]] = {
    CredentialKey.UID: int,
    CredentialKey.PKG_FLAGS: int,
    CredentialKey.PKG_NAME: str,
    CredentialKey.PKG_CERT: bytes,
    CredentialKey.PERMISSIONS: (int, bytes),
    CredentialKey.SYSTEM_TIME: int,
}


@dataclass(frozen=True, slots=True)
class Credentials:
    """The identity a client presents; ``default()`` is what the real library sends."""

    fields: Mapping[CredentialKey, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        clean: dict[CredentialKey, Any] = {}
        for key, value in dict(self.fields).items():
            try:
                k = CredentialKey(key)
            except ValueError:
                raise UsageError(f"unknown credentials key {key!r}") from None
            if not isinstance(value, _TYPES[k]) or isinstance(value, bool):
                raise UsageError(f"credentials {k.name} must be {_TYPES[k]}, not {value!r}")
            clean[k] = value
        object.__setattr__(self, "fields", clean)

    @classmethod
    def default(cls) -> Credentials:
        """uid of this process and the wall-clock time in ms, as libqcomtee sends."""
        return cls(
            {
                CredentialKey.UID: os.getuid(),
                CredentialKey.SYSTEM_TIME: time.time_ns() // 1_000_000,
            }
        )

    def encode(self) -> bytes:
        """The CBOR map (integer keys in ascending order)."""
        return cbor2.dumps({int(k): v for k, v in sorted(self.fields.items())})

    @classmethod
    def decode(cls, data: bytes) -> Credentials:
        """Parse a credentials map; anything that is not one is a :class:`DecodeError`."""
        try:
            value = cbor2.loads(data)
        except Exception as exc:  # cbor2 raises several types for malformed input
            raise DecodeError(f"credentials are not valid CBOR: {exc}") from None
        if not isinstance(value, dict):
            raise DecodeError(f"credentials must be a CBOR map, not {type(value).__name__}")
        try:
            return cls(value)
        except UsageError as exc:
            raise DecodeError(str(exc)) from None

    @property
    def uid(self) -> int | None:
        """The uid, if present."""
        uid = self.fields.get(CredentialKey.UID)
        return uid if isinstance(uid, int) else None
