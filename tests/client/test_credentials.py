"""Credentials CBOR map (qtee-kernel.md §6 step 3; quic-teec.md §1.6)."""

from __future__ import annotations

import contextlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from objects import DecodeError, UsageError
from qtee.credentials import CredentialKey, Credentials


def test_default_carries_uid_and_time_only() -> None:
    cred = Credentials.default()
    assert set(cred.fields) == {CredentialKey.UID, CredentialKey.SYSTEM_TIME}
    assert cred.uid == os.getuid()


def test_golden_encoding() -> None:
    # Hand-derived CBOR: map(2) a2; key 1 -> uint16 1000 (19 03e8); key 6 -> uint32 (1a ...).
    cred = Credentials({CredentialKey.UID: 1000, CredentialKey.SYSTEM_TIME: 123456789})
    assert cred.encode() == bytes.fromhex("a2 01 19 03e8 06 1a 075bcd15")
    assert Credentials.decode(bytes.fromhex("a2 01 19 03e8 06 1a 075bcd15")) == cred


def test_all_keys_round_trip() -> None:
    cred = Credentials(
        {1: 0, 2: 3, 3: "com.example.app", 4: b"\x30\x82", 5: 7, 6: 1}  # type: ignore[dict-item]
    )
    assert Credentials.decode(cred.encode()) == cred


@pytest.mark.parametrize("fields", [{9: 1}, {1: "root"}, {3: 5}, {1: True}, {6: 1.5}])
def test_bad_fields_are_refused(fields: dict[int, object]) -> None:
    with pytest.raises(UsageError):
        Credentials(fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("data", [b"", b"\xff", b"\x01", bytes.fromhex("a1 09 01"), b"\x9f"])
def test_malformed_bytes_are_decode_errors(data: bytes) -> None:
    with pytest.raises(DecodeError):
        Credentials.decode(data)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_decode_or_raise_decode_error(data: bytes) -> None:
    """Invariant: any byte string either parses as credentials or raises DecodeError."""
    with contextlib.suppress(DecodeError):
        Credentials.decode(data)
