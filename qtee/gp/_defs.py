"""GlobalPlatform TEE Client API constants, as libteec and OP-TEE define them.

Every name is the C name (``tee_client_api.h`` in optee_client, ``tee_api_defines.h``
and ``user_ta_header.h`` in optee_os).  A ``TEEC_Result`` is a ``uint32_t``; errors a TA
invents itself are any other u32, so code that carries results keeps plain ints and
uses :func:`name_of` to print them.  The error that libteec reports through
``(return code, return origin)`` is :class:`TeecError`.
"""

from __future__ import annotations

import enum
import errno
from typing import Final

from objects import QteeBaseError, UsageError
from qtee.uapi import TEE_IOCTL_LOGIN_REE_KERNEL_MAX, TEE_IOCTL_LOGIN_REE_KERNEL_MIN

__all__ = [
    "TA_FLAG_PROPERTIES",
    "TEEC_CONFIG_PAYLOAD_REF_COUNT",
    "TEE_LOGIN_REE_KERNEL_MAX",
    "TEE_LOGIN_REE_KERNEL_MIN",
    "TaFlag",
    "TeecError",
    "TeecLogin",
    "TeecMemFlag",
    "TeecOrigin",
    "TeecParamType",
    "TeecParamTypeError",
    "TeecResult",
    "errno_to_result",
    "is_ree_kernel_login",
    "name_of",
    "param_type_get",
    "param_types",
    "unpack_param_types",
]

#: The largest ``uint32_t``: the range of GP values, logins, command and cancel ids (the
#: GP modules, client and TA side, read this one).
_U32: Final = 0xFFFF_FFFF

#: At most four parameters per operation (``TEEC_CONFIG_PAYLOAD_REF_COUNT``).
TEEC_CONFIG_PAYLOAD_REF_COUNT: Final = 4


class TeecResult(enum.IntEnum):
    """``TEEC_Result`` codes of libteec, plus the ``TEE_ERROR_*`` codes OP-TEE returns.

    Where GP gives one value both a ``TEEC_`` and a ``TEE_`` name, the ``TEEC_`` name is
    the canonical member and the ``TEE_`` one an alias.
    """

    TEEC_SUCCESS = 0x0000_0000
    TEEC_ERROR_STORAGE_NOT_AVAILABLE = 0xF010_0003
    TEEC_ERROR_GENERIC = 0xFFFF_0000
    TEEC_ERROR_ACCESS_DENIED = 0xFFFF_0001
    TEEC_ERROR_CANCEL = 0xFFFF_0002
    TEEC_ERROR_ACCESS_CONFLICT = 0xFFFF_0003
    TEEC_ERROR_EXCESS_DATA = 0xFFFF_0004
    TEEC_ERROR_BAD_FORMAT = 0xFFFF_0005
    TEEC_ERROR_BAD_PARAMETERS = 0xFFFF_0006
    TEEC_ERROR_BAD_STATE = 0xFFFF_0007
    TEEC_ERROR_ITEM_NOT_FOUND = 0xFFFF_0008
    TEEC_ERROR_NOT_IMPLEMENTED = 0xFFFF_0009
    TEEC_ERROR_NOT_SUPPORTED = 0xFFFF_000A
    TEEC_ERROR_NO_DATA = 0xFFFF_000B
    TEEC_ERROR_OUT_OF_MEMORY = 0xFFFF_000C
    TEEC_ERROR_BUSY = 0xFFFF_000D
    TEEC_ERROR_COMMUNICATION = 0xFFFF_000E
    TEEC_ERROR_SECURITY = 0xFFFF_000F
    TEEC_ERROR_SHORT_BUFFER = 0xFFFF_0010
    TEEC_ERROR_EXTERNAL_CANCEL = 0xFFFF_0011
    TEEC_ERROR_TARGET_DEAD = 0xFFFF_3024
    TEEC_ERROR_STORAGE_NO_SPACE = 0xFFFF_3041
    # TEE_ names for the same values (aliases).
    TEE_SUCCESS = 0x0000_0000
    TEE_ERROR_STORAGE_NOT_AVAILABLE = 0xF010_0003
    TEE_ERROR_EXTERNAL_CANCEL = 0xFFFF_0011
    TEE_ERROR_TARGET_DEAD = 0xFFFF_3024
    TEE_ERROR_STORAGE_NO_SPACE = 0xFFFF_3041
    # Codes only the TEE side defines (internal, RPC, or crypto).
    TEE_ERROR_CORRUPT_OBJECT = 0xF010_0001
    TEE_ERROR_CORRUPT_OBJECT_2 = 0xF010_0002
    TEE_ERROR_STORAGE_NOT_AVAILABLE_2 = 0xF010_0004
    TEE_ERROR_UNSUPPORTED_VERSION = 0xF010_0005
    TEE_ERROR_CIPHERTEXT_INVALID = 0xF010_0006
    TEE_ERROR_TIMEOUT = 0xFFFF_3001
    TEE_ERROR_OVERFLOW = 0xFFFF_300F
    TEE_ERROR_MAC_INVALID = 0xFFFF_3071
    TEE_ERROR_SIGNATURE_INVALID = 0xFFFF_3072
    TEE_ERROR_TIME_NOT_SET = 0xFFFF_5000
    TEE_ERROR_TIME_NEEDS_RESET = 0xFFFF_5001


def name_of(code: int) -> str:
    """The C name of a ``TEEC_Result`` (the ``TEEC_`` one when both exist), else ``0x%08X``."""
    if not isinstance(code, int) or isinstance(code, bool) or not 0 <= code <= _U32:
        raise UsageError(f"a TEEC_Result is a u32, not {code!r}")
    try:
        return TeecResult(code).name
    except ValueError:
        return f"0x{code:08X}"


class TeecOrigin(enum.IntEnum):
    """``TEEC_ORIGIN_*``: which layer produced a return code."""

    TEEC_ORIGIN_API = 1
    TEEC_ORIGIN_COMMS = 2
    TEEC_ORIGIN_TEE = 3
    TEEC_ORIGIN_TRUSTED_APP = 4


class TeecLogin(enum.IntEnum):
    """Login (connection) methods: ``TEEC_LOGIN_*`` and OP-TEE's internal ``TEE_LOGIN_*``.

    ``TEE_LOGIN_REE_KERNEL`` is what in-kernel clients use; the kernel refuses the whole
    REE-kernel range from userspace.  ``TEE_LOGIN_TRUSTED_APP`` marks TA-to-TA sessions.
    """

    TEEC_LOGIN_PUBLIC = 0x0
    TEEC_LOGIN_USER = 0x1
    TEEC_LOGIN_GROUP = 0x2
    TEEC_LOGIN_APPLICATION = 0x4
    TEEC_LOGIN_USER_APPLICATION = 0x5
    TEEC_LOGIN_GROUP_APPLICATION = 0x6
    TEE_LOGIN_REE_KERNEL = 0x8000_0000
    TEE_LOGIN_TRUSTED_APP = 0xF000_0000


#: The login range reserved for in-kernel clients (``TEE_IOCTL_LOGIN_REE_KERNEL_MIN/MAX``).
TEE_LOGIN_REE_KERNEL_MIN: Final = TEE_IOCTL_LOGIN_REE_KERNEL_MIN
TEE_LOGIN_REE_KERNEL_MAX: Final = TEE_IOCTL_LOGIN_REE_KERNEL_MAX


def is_ree_kernel_login(method: int) -> bool:
    """Whether ``method`` lies in the REE-kernel login range (0x80000000..0xBFFFFFFF)."""
    return TEE_LOGIN_REE_KERNEL_MIN <= method <= TEE_LOGIN_REE_KERNEL_MAX


class TeecParamType(enum.IntEnum):
    """``TEEC_*`` parameter types, one nibble each in ``paramTypes``.

    0x4 and 0x8..0xB are not types; libteec fails such an operation with
    ``TEEC_ERROR_BAD_PARAMETERS`` (origin API) before any ioctl.
    """

    TEEC_NONE = 0x0
    TEEC_VALUE_INPUT = 0x1
    TEEC_VALUE_OUTPUT = 0x2
    TEEC_VALUE_INOUT = 0x3
    TEEC_MEMREF_TEMP_INPUT = 0x5
    TEEC_MEMREF_TEMP_OUTPUT = 0x6
    TEEC_MEMREF_TEMP_INOUT = 0x7
    TEEC_MEMREF_WHOLE = 0xC
    TEEC_MEMREF_PARTIAL_INPUT = 0xD
    TEEC_MEMREF_PARTIAL_OUTPUT = 0xE
    TEEC_MEMREF_PARTIAL_INOUT = 0xF


class TeecMemFlag(enum.IntFlag):
    """``TEEC_SharedMemory.flags``: the directions a registered block may be used in."""

    TEEC_MEM_INPUT = 0x1
    TEEC_MEM_OUTPUT = 0x2


class TaFlag(enum.IntFlag):
    """``TA_FLAG_*`` of ``user_ta_header.h`` (the TA's ``TA_FLAGS``), OP-TEE's bit values.

    ``TA_FLAG_USER_MODE``, ``TA_FLAG_EXEC_DDR`` and ``TA_FLAG_REMAP_SUPPORT`` are
    deprecated and defined as 0 upstream, so they are left out.
    """

    TA_FLAG_SINGLE_INSTANCE = 1 << 2
    TA_FLAG_MULTI_SESSION = 1 << 3
    TA_FLAG_INSTANCE_KEEP_ALIVE = 1 << 4
    TA_FLAG_SECURE_DATA_PATH = 1 << 5
    TA_FLAG_CACHE_MAINTENANCE = 1 << 7
    TA_FLAG_CONCURRENT = 1 << 8
    TA_FLAG_DEVICE_ENUM = 1 << 9
    TA_FLAG_DEVICE_ENUM_SUPP = 1 << 10
    TA_FLAG_DONT_CLOSE_HANDLE_ON_CORRUPT_OBJECT = 1 << 11
    TA_FLAG_DEVICE_ENUM_TEE_STORAGE_PRIVATE = 1 << 12
    TA_FLAG_INSTANCE_KEEP_CRASHED = 1 << 13


#: The GP (or OP-TEE) property each flag answers to.
TA_FLAG_PROPERTIES: Final[dict[TaFlag, str]] = {
    TaFlag.TA_FLAG_SINGLE_INSTANCE: "gpd.ta.singleInstance",
    TaFlag.TA_FLAG_MULTI_SESSION: "gpd.ta.multiSession",
    TaFlag.TA_FLAG_INSTANCE_KEEP_ALIVE: "gpd.ta.instanceKeepAlive",
    TaFlag.TA_FLAG_DONT_CLOSE_HANDLE_ON_CORRUPT_OBJECT: "gpd.ta.doesNotCloseHandleOnCorruptObject",
    TaFlag.TA_FLAG_INSTANCE_KEEP_CRASHED: "optee.ta.instanceKeepCrashed",
}


# ----------------------------------------------------------------------------- errors


class TeecError(QteeBaseError):
    """A GP call failed: ``code`` is the ``TEEC_Result``, ``origin`` the ``TEEC_ORIGIN_*``.

    ``code`` and ``origin`` are enum members when the value is a known one, plain ints
    otherwise (a TA may return any u32).
    """

    code: int
    origin: int

    def __init__(self, code: int, origin: int, detail: str = "") -> None:
        for what, value in (("code", code), ("origin", origin)):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _U32:
                raise ValueError(f"a TeecError {what} is a u32, not {value!r}")
        if code == TeecResult.TEEC_SUCCESS:
            raise ValueError("TEEC_SUCCESS is not an error")
        self.code = _known(TeecResult, code)
        self.origin = _known(TeecOrigin, origin)
        self.detail = detail
        origin_name = self.origin.name if isinstance(self.origin, TeecOrigin) else hex(origin)
        text = f"{name_of(code)} (origin {origin_name})"
        super().__init__(f"{text}: {detail}" if detail else text)

    def __reduce__(self) -> tuple[type[TeecError], tuple[int, int, str]]:
        return (type(self), (int(self.code), int(self.origin), self.detail))


def _known(kind: type[enum.IntEnum], value: int) -> int:
    try:
        return kind(value)
    except ValueError:
        return value


class TeecParamTypeError(TeecError):
    """Nibble ``index`` of ``paramTypes`` is ``value``, which is no ``TEEC_*`` type.

    libteec answers ``TEEC_ERROR_BAD_PARAMETERS`` with origin API, before any ioctl.
    """

    def __init__(self, index: int, value: int) -> None:
        self.index = index
        self.value = value
        super().__init__(
            TeecResult.TEEC_ERROR_BAD_PARAMETERS,
            TeecOrigin.TEEC_ORIGIN_API,
            f"param {index}: {value:#x} is not a TEEC parameter type",
        )

    def __reduce__(self) -> tuple[type[TeecParamTypeError], tuple[int, int]]:  # type: ignore[override]
        return (type(self), (self.index, self.value))


def errno_to_result(err: int) -> TeecResult:
    """libteec's mapping of a failed ioctl's errno (reported with origin COMMS)."""
    if err == errno.ENOMEM:
        return TeecResult.TEEC_ERROR_OUT_OF_MEMORY
    if err == errno.EINVAL:
        return TeecResult.TEEC_ERROR_BAD_PARAMETERS
    return TeecResult.TEEC_ERROR_GENERIC


# ----------------------------------------------------------------------------- paramTypes


def _param_type(index: int, value: int) -> TeecParamType:
    try:
        return TeecParamType(value)
    except ValueError:
        raise TeecParamTypeError(index, value) from None


def param_types(p0: int, p1: int, p2: int, p3: int) -> int:
    """``TEEC_PARAM_TYPES(p0, p1, p2, p3)`` = ``p0 | p1 << 4 | p2 << 8 | p3 << 12``.

    The C macro packs anything; here a value that is no ``TEEC_*`` type raises the
    :class:`TeecParamTypeError` libteec would report at the call.
    """
    word = 0
    for index, value in enumerate((p0, p1, p2, p3)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"param {index} type must be an int, not {type(value).__name__}")
        word |= _param_type(index, value) << (4 * index)
    return word


def param_type_get(t: int, i: int) -> TeecParamType:
    """``TEEC_PARAM_TYPE_GET(t, i)`` = ``(t >> 4i) & 0xF``, checked as libteec checks it.

    Bits above the fourth nibble are ignored, as libteec ignores them.
    """
    if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t <= _U32:
        raise UsageError(f"paramTypes is a u32, not {t!r}")
    if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < TEEC_CONFIG_PAYLOAD_REF_COUNT:
        raise UsageError(f"param index must be 0..3, not {i!r}")
    return _param_type(i, (t >> (4 * i)) & 0xF)


def unpack_param_types(
    t: int,
) -> tuple[TeecParamType, TeecParamType, TeecParamType, TeecParamType]:
    """The four types of a ``paramTypes`` word (the first bad nibble raises)."""
    return (
        param_type_get(t, 0),
        param_type_get(t, 1),
        param_type_get(t, 2),
        param_type_get(t, 3),
    )
