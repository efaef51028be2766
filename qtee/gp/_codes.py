"""TEEC results, origins and logins as plain ints, each named once: what GP records, the
OP-TEE message and the supplicant's answers carry (GP TEE Client API §4.4; the enums with
their full names are :mod:`qtee.gp._defs`'s)."""

from __future__ import annotations

from typing import Final

from qtee.gp._defs import TeecLogin, TeecOrigin, TeecResult

ACCESS_CONFLICT: Final = int(TeecResult.TEEC_ERROR_ACCESS_CONFLICT)
ACCESS_DENIED: Final = int(TeecResult.TEEC_ERROR_ACCESS_DENIED)
BAD_PARAMETERS: Final = int(TeecResult.TEEC_ERROR_BAD_PARAMETERS)
BUSY: Final = int(TeecResult.TEEC_ERROR_BUSY)
CANCEL: Final = int(TeecResult.TEEC_ERROR_CANCEL)
COMMUNICATION: Final = int(TeecResult.TEEC_ERROR_COMMUNICATION)
GENERIC: Final = int(TeecResult.TEEC_ERROR_GENERIC)
ITEM_NOT_FOUND: Final = int(TeecResult.TEEC_ERROR_ITEM_NOT_FOUND)
NOT_SUPPORTED: Final = int(TeecResult.TEEC_ERROR_NOT_SUPPORTED)
OUT_OF_MEMORY: Final = int(TeecResult.TEEC_ERROR_OUT_OF_MEMORY)
OVERFLOW: Final = int(TeecResult.TEE_ERROR_OVERFLOW)
SECURITY: Final = int(TeecResult.TEEC_ERROR_SECURITY)
SHORT_BUFFER: Final = int(TeecResult.TEEC_ERROR_SHORT_BUFFER)
STORAGE_NO_SPACE: Final = int(TeecResult.TEEC_ERROR_STORAGE_NO_SPACE)
SUCCESS: Final = int(TeecResult.TEEC_SUCCESS)
TARGET_DEAD: Final = int(TeecResult.TEEC_ERROR_TARGET_DEAD)
LOGIN_TRUSTED_APP: Final = int(TeecLogin.TEE_LOGIN_TRUSTED_APP)
ORIGIN_COMMS: Final = int(TeecOrigin.TEEC_ORIGIN_COMMS)
ORIGIN_TEE: Final = int(TeecOrigin.TEEC_ORIGIN_TEE)
ORIGIN_TRUSTED_APP: Final = int(TeecOrigin.TEEC_ORIGIN_TRUSTED_APP)
