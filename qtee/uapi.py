"""The Linux TEE uAPI (``include/uapi/linux/tee.h``) as qcomtee uses it, byte for byte.

Every constant carries the kernel's own name; ioctl numbers are computed with the
``_IOR``/``_IOWR`` macros, never typed in.  Each struct of the header is a frozen
record with ``SIZE`` and ``pack``/``unpack`` at the kernel's LP64 offsets; the
variable-size argument blocks (``OBJECT_INVOKE``, ``SUPPL_RECV``/``SEND``,
``OPEN_SESSION``, ``INVOKE``) are a header record plus ``num_params`` 32-byte
:class:`Param` records.  Decoders raise only :class:`objects.DecodeError`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Final, Self, TypeVar

from objects import DecodeError, UsageError

# ----------------------------------------------------------------------------- ioctl numbers
_IOC_NRBITS: Final = 8
_IOC_TYPEBITS: Final = 8
_IOC_SIZEBITS: Final = 14
_IOC_NRSHIFT: Final = 0
_IOC_TYPESHIFT: Final = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT: Final = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT: Final = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE: Final = 0
_IOC_WRITE: Final = 1
_IOC_READ: Final = 2


def _IOC(direction: int, typ: int, nr: int, size: int) -> int:
    """Linux's ``_IOC``: dir<<30 | size<<16 | type<<8 | nr."""
    if not 0 <= size < 1 << _IOC_SIZEBITS:
        raise UsageError(f"ioctl argument size {size} does not fit in {_IOC_SIZEBITS} bits")
    return (
        direction << _IOC_DIRSHIFT
        | typ << _IOC_TYPESHIFT
        | nr << _IOC_NRSHIFT
        | size << _IOC_SIZESHIFT
    )


def _IOR(typ: int, nr: int, size: int) -> int:
    """Linux's ``_IOR``: the kernel writes the argument back."""
    return _IOC(_IOC_READ, typ, nr, size)


def _IOWR(typ: int, nr: int, size: int) -> int:
    """Linux's ``_IOWR``: the argument goes both ways."""
    return _IOC(_IOC_READ | _IOC_WRITE, typ, nr, size)


def _IOC_NR(cmd: int) -> int:
    return cmd >> _IOC_NRSHIFT & ((1 << _IOC_NRBITS) - 1)


def _IOC_SIZE(cmd: int) -> int:
    return cmd >> _IOC_SIZESHIFT & ((1 << _IOC_SIZEBITS) - 1)


# ----------------------------------------------------------------------------- constants
TEE_IOC_MAGIC: Final = 0xA4
TEE_IOC_BASE: Final = 0
TEE_MAX_ARG_SIZE: Final = 4096

TEE_GEN_CAP_GP: Final = 1 << 0
TEE_GEN_CAP_PRIVILEGED: Final = 1 << 1
TEE_GEN_CAP_REG_MEM: Final = 1 << 2
TEE_GEN_CAP_MEMREF_NULL: Final = 1 << 3
TEE_GEN_CAP_OBJREF: Final = 1 << 4

TEE_MEMREF_NULL: Final = 0xFFFF_FFFF_FFFF_FFFF
TEE_OBJREF_NULL: Final = 0xFFFF_FFFF_FFFF_FFFF

TEE_IMPL_ID_OPTEE: Final = 1
TEE_IMPL_ID_AMDTEE: Final = 2
TEE_IMPL_ID_TSTEE: Final = 3
TEE_IMPL_ID_QTEE: Final = 4
TEE_OPTEE_CAP_TZ: Final = 1 << 0

TEE_IOCTL_UUID_LEN: Final = 16

TEE_IOCTL_PARAM_ATTR_TYPE_NONE: Final = 0
TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_INPUT: Final = 1
TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_OUTPUT: Final = 2
TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_INOUT: Final = 3
TEE_IOCTL_PARAM_ATTR_TYPE_MEMREF_INPUT: Final = 5
TEE_IOCTL_PARAM_ATTR_TYPE_MEMREF_OUTPUT: Final = 6
TEE_IOCTL_PARAM_ATTR_TYPE_MEMREF_INOUT: Final = 7
TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_INPUT: Final = 8
TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_OUTPUT: Final = 9
TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_INOUT: Final = 10
TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_INPUT: Final = 11
TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_OUTPUT: Final = 12
TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_INOUT: Final = 13
TEE_IOCTL_PARAM_ATTR_TYPE_MASK: Final = 0xFF
TEE_IOCTL_PARAM_ATTR_META: Final = 0x100
TEE_IOCTL_PARAM_ATTR_MASK: Final = TEE_IOCTL_PARAM_ATTR_TYPE_MASK | TEE_IOCTL_PARAM_ATTR_META

#: The attr types ``params_from_user`` accepts (4 and 14..255 are EINVAL).
VALID_PARAM_TYPES: Final = frozenset({0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13})

TEE_IOCTL_LOGIN_PUBLIC: Final = 0
TEE_IOCTL_LOGIN_USER: Final = 1
TEE_IOCTL_LOGIN_GROUP: Final = 2
TEE_IOCTL_LOGIN_APPLICATION: Final = 4
TEE_IOCTL_LOGIN_USER_APPLICATION: Final = 5
TEE_IOCTL_LOGIN_GROUP_APPLICATION: Final = 6
TEE_IOCTL_LOGIN_REE_KERNEL_MIN: Final = 0x8000_0000
TEE_IOCTL_LOGIN_REE_KERNEL_MAX: Final = 0xBFFF_FFFF
TEE_IOCTL_LOGIN_REE_KERNEL: Final = 0x8000_0000

#: Driver-private objref flags (``b`` of an OBJREF param), ``qcomtee.h``.
QCOMTEE_OBJREF_FLAG_TEE: Final = 1 << 0
QCOMTEE_OBJREF_FLAG_USER: Final = 1 << 1
QCOMTEE_OBJREF_FLAG_MEM: Final = 1 << 2

# ----------------------------------------------------------------------------- records

_U64 = (1 << 64) - 1

#: ``struct tee_ioctl_buf_data`` (16 bytes): u64 buf_ptr, buf_len -- what the ioctls that
#: take an argument block are given.
BUF_DATA_STRUCT: Final = struct.Struct("<QQ")
#: ``struct tee_ioctl_param`` (32 bytes): u64 attr, a, b, c -- the one layout of a param,
#: for code that packs params in place rather than as :class:`Param` records.
PARAM_STRUCT: Final = struct.Struct("<4Q")
#: The header of ``struct tee_iocl_supp_recv_arg`` / ``supp_send_arg``: u32 func (ret),
#: num_params.
SUPP_ARG_STRUCT: Final = struct.Struct("<2I")


def params_struct(n: int) -> struct.Struct:
    """``n`` :data:`PARAM_STRUCT` params back to back."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise UsageError(f"a number of params is an int >= 0, not {n!r}")
    return struct.Struct("<" + "4Q" * n)


def _fit(value: object, bits: int, what: str, *, signed: bool = False) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if not lo <= value <= hi:
        kind = "s" if signed else "u"
        raise UsageError(f"{what}={value} does not fit in {kind}{bits}")
    return value


class _Record:
    """Shared pack/unpack for the fixed-size structs (subclasses set ``_S``/``_FIELDS``)."""

    __slots__ = ()
    _S: ClassVar[struct.Struct]
    _FIELDS: ClassVar[tuple[tuple[str, int, bool], ...]]  # name, bits, signed
    SIZE: ClassVar[int]

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        """Each field fits its width (an int of ``bits`` bits, signed or not)."""
        for name, bits, signed in self._FIELDS:
            _fit(getattr(self, name), bits, f"{type(self).__name__}.{name}", signed=signed)

    def pack(self) -> bytes:
        """The struct's bytes."""
        return self._S.pack(*(getattr(self, n) for n, _, _ in self._FIELDS))

    def pack_into(self, buf: bytearray | memoryview, offset: int = 0) -> None:
        """Write the struct into ``buf`` at ``offset``."""
        if offset < 0 or offset + self.SIZE > len(buf):
            raise UsageError(f"{type(self).__name__} does not fit in the buffer at {offset}")
        self._S.pack_into(buf, offset, *(getattr(self, n) for n, _, _ in self._FIELDS))

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> Self:
        """Read the struct from ``buf`` at ``offset`` (needs ``SIZE`` bytes)."""
        if not isinstance(offset, int) or offset < 0 or len(buf) - offset < cls.SIZE:
            raise DecodeError(
                f"{cls.__name__} needs {cls.SIZE} bytes at offset {offset}, buffer has {len(buf)}"
            )
        return cls(*cls._S.unpack_from(buf, offset))


@dataclass(frozen=True, slots=True)
class BufData(_Record):
    """``struct tee_ioctl_buf_data`` (16): u64 buf_ptr; u64 buf_len."""

    buf_ptr: int
    buf_len: int
    _S = BUF_DATA_STRUCT
    _FIELDS = (("buf_ptr", 64, False), ("buf_len", 64, False))
    SIZE = 16


@dataclass(frozen=True, slots=True)
class Param(_Record):
    """``struct tee_ioctl_param`` (32): u64 attr, a, b, c."""

    attr: int
    a: int = 0
    b: int = 0
    c: int = 0
    _S = PARAM_STRUCT
    _FIELDS = (("attr", 64, False), ("a", 64, False), ("b", 64, False), ("c", 64, False))
    SIZE = 32

    @property
    def type(self) -> int:
        """``attr & TEE_IOCTL_PARAM_ATTR_TYPE_MASK``."""
        return self.attr & TEE_IOCTL_PARAM_ATTR_TYPE_MASK


@dataclass(frozen=True, slots=True)
class VersionData(_Record):
    """``struct tee_ioctl_version_data`` (12): u32 impl_id, impl_caps, gen_caps."""

    impl_id: int
    impl_caps: int
    gen_caps: int
    _S = struct.Struct("<3I")
    _FIELDS = (("impl_id", 32, False), ("impl_caps", 32, False), ("gen_caps", 32, False))
    SIZE = 12


@dataclass(frozen=True, slots=True)
class ShmAllocData(_Record):
    """``struct tee_ioctl_shm_alloc_data`` (16): u64 size; u32 flags; s32 id."""

    size: int
    flags: int = 0
    id: int = 0
    _S = struct.Struct("<QIi")
    _FIELDS = (("size", 64, False), ("flags", 32, False), ("id", 32, True))
    SIZE = 16


@dataclass(frozen=True, slots=True)
class ShmRegisterData(_Record):
    """``struct tee_ioctl_shm_register_data`` (24): u64 addr, length; u32 flags; s32 id."""

    addr: int
    length: int
    flags: int = 0
    id: int = 0
    _S = struct.Struct("<QQIi")
    _FIELDS = (("addr", 64, False), ("length", 64, False), ("flags", 32, False), ("id", 32, True))
    SIZE = 24


@dataclass(frozen=True, slots=True)
class ShmRegisterFdData(_Record):
    """``struct tee_ioctl_shm_register_fd_data`` (24): s64 fd; u64 size; u32 flags; s32 id."""

    fd: int
    size: int = 0
    flags: int = 0
    id: int = 0
    _S = struct.Struct("<qQIi")
    _FIELDS = (("fd", 64, True), ("size", 64, False), ("flags", 32, False), ("id", 32, True))
    SIZE = 24


@dataclass(frozen=True, slots=True)
class CancelArg(_Record):
    """``struct tee_ioctl_cancel_arg`` (8): u32 cancel_id, session."""

    cancel_id: int
    session: int
    _S = struct.Struct("<2I")
    _FIELDS = (("cancel_id", 32, False), ("session", 32, False))
    SIZE = 8


@dataclass(frozen=True, slots=True)
class CloseSessionArg(_Record):
    """``struct tee_ioctl_close_session_arg`` (4): u32 session."""

    session: int
    _S = struct.Struct("<I")
    _FIELDS = (("session", 32, False),)
    SIZE = 4


@dataclass(frozen=True, slots=True)
class ObjectInvokeArg(_Record):
    """``struct tee_ioctl_object_invoke_arg`` (24 + params).

    u64 id; u32 op; u32 ret; u32 num_params; 4 bytes of padding (``__u32 :32``).
    """

    id: int
    op: int
    ret: int = 0
    num_params: int = 0
    _S = struct.Struct("<QIII4x")
    _FIELDS = (("id", 64, False), ("op", 32, False), ("ret", 32, False), ("num_params", 32, False))
    SIZE = 24


@dataclass(frozen=True, slots=True)
class SuppRecvArg(_Record):
    """``struct tee_iocl_supp_recv_arg`` (8 + params): u32 func, num_params."""

    func: int
    num_params: int
    _S = SUPP_ARG_STRUCT
    _FIELDS = (("func", 32, False), ("num_params", 32, False))
    SIZE = 8


@dataclass(frozen=True, slots=True)
class SuppSendArg(_Record):
    """``struct tee_iocl_supp_send_arg`` (8 + params): u32 ret, num_params."""

    ret: int
    num_params: int
    _S = SUPP_ARG_STRUCT
    _FIELDS = (("ret", 32, False), ("num_params", 32, False))
    SIZE = 8


@dataclass(frozen=True, slots=True)
class OpenSessionArg(_Record):
    """``struct tee_ioctl_open_session_arg`` (56 + params)."""

    uuid: bytes
    clnt_uuid: bytes
    clnt_login: int
    cancel_id: int = 0
    session: int = 0
    ret: int = 0
    ret_origin: int = 0
    num_params: int = 0
    _S = struct.Struct("<16s16s6I")
    _FIELDS = (
        ("clnt_login", 32, False),
        ("cancel_id", 32, False),
        ("session", 32, False),
        ("ret", 32, False),
        ("ret_origin", 32, False),
        ("num_params", 32, False),
    )
    SIZE = 56

    def __post_init__(self) -> None:
        for name in ("uuid", "clnt_uuid"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != TEE_IOCTL_UUID_LEN:
                raise UsageError(f"OpenSessionArg.{name} must be {TEE_IOCTL_UUID_LEN} bytes")
        self._validate()

    def pack(self) -> bytes:
        """The struct's bytes."""
        return self._S.pack(
            self.uuid, self.clnt_uuid, *(getattr(self, n) for n, _, _ in self._FIELDS)
        )

    def pack_into(self, buf: bytearray | memoryview, offset: int = 0) -> None:
        """Write the struct into ``buf`` at ``offset``."""
        if offset < 0 or offset + self.SIZE > len(buf):
            raise UsageError(f"OpenSessionArg does not fit in the buffer at {offset}")
        buf[offset : offset + self.SIZE] = self.pack()


@dataclass(frozen=True, slots=True)
class InvokeArg(_Record):
    """``struct tee_ioctl_invoke_arg`` (24 + params).

    u32 func, session, cancel_id, ret, ret_origin, num_params.
    """

    func: int
    session: int
    cancel_id: int = 0
    ret: int = 0
    ret_origin: int = 0
    num_params: int = 0
    _S = struct.Struct("<6I")
    _FIELDS = (
        ("func", 32, False),
        ("session", 32, False),
        ("cancel_id", 32, False),
        ("ret", 32, False),
        ("ret_origin", 32, False),
        ("num_params", 32, False),
    )
    SIZE = 24


# The buf_data ioctls' fixed headers, by the struct each one carries.
HeaderRecord = ObjectInvokeArg | SuppRecvArg | SuppSendArg | OpenSessionArg | InvokeArg

H = TypeVar("H", ObjectInvokeArg, SuppRecvArg, SuppSendArg, OpenSessionArg, InvokeArg)

# ----------------------------------------------------------------------------- ioctl commands
TEE_IOC_VERSION: Final = _IOR(TEE_IOC_MAGIC, TEE_IOC_BASE + 0, VersionData.SIZE)
TEE_IOC_SHM_ALLOC: Final = _IOWR(TEE_IOC_MAGIC, TEE_IOC_BASE + 1, ShmAllocData.SIZE)
TEE_IOC_OPEN_SESSION: Final = _IOR(TEE_IOC_MAGIC, TEE_IOC_BASE + 2, BufData.SIZE)
TEE_IOC_INVOKE: Final = _IOR(TEE_IOC_MAGIC, TEE_IOC_BASE + 3, BufData.SIZE)
TEE_IOC_CANCEL: Final = _IOR(TEE_IOC_MAGIC, TEE_IOC_BASE + 4, CancelArg.SIZE)
TEE_IOC_CLOSE_SESSION: Final = _IOR(TEE_IOC_MAGIC, TEE_IOC_BASE + 5, CloseSessionArg.SIZE)
TEE_IOC_SUPPL_RECV: Final = _IOR(TEE_IOC_MAGIC, TEE_IOC_BASE + 6, BufData.SIZE)
TEE_IOC_SUPPL_SEND: Final = _IOR(TEE_IOC_MAGIC, TEE_IOC_BASE + 7, BufData.SIZE)
TEE_IOC_SHM_REGISTER_FD: Final = _IOWR(TEE_IOC_MAGIC, TEE_IOC_BASE + 8, ShmRegisterFdData.SIZE)
TEE_IOC_SHM_REGISTER: Final = _IOWR(TEE_IOC_MAGIC, TEE_IOC_BASE + 9, ShmRegisterData.SIZE)
TEE_IOC_OBJECT_INVOKE: Final = _IOR(TEE_IOC_MAGIC, TEE_IOC_BASE + 10, BufData.SIZE)

#: ioctl command -> the name the kernel gives it.
IOCTL_NAMES: Final = {
    TEE_IOC_VERSION: "TEE_IOC_VERSION",
    TEE_IOC_SHM_ALLOC: "TEE_IOC_SHM_ALLOC",
    TEE_IOC_OPEN_SESSION: "TEE_IOC_OPEN_SESSION",
    TEE_IOC_INVOKE: "TEE_IOC_INVOKE",
    TEE_IOC_CANCEL: "TEE_IOC_CANCEL",
    TEE_IOC_CLOSE_SESSION: "TEE_IOC_CLOSE_SESSION",
    TEE_IOC_SUPPL_RECV: "TEE_IOC_SUPPL_RECV",
    TEE_IOC_SUPPL_SEND: "TEE_IOC_SUPPL_SEND",
    TEE_IOC_SHM_REGISTER_FD: "TEE_IOC_SHM_REGISTER_FD",
    TEE_IOC_SHM_REGISTER: "TEE_IOC_SHM_REGISTER",
    TEE_IOC_OBJECT_INVOKE: "TEE_IOC_OBJECT_INVOKE",
}


# ----------------------------------------------------------------------------- argument blocks


def pack_params(params: Sequence[Param]) -> bytes:
    """``num_params`` 32-byte params back to back."""
    for i, p in enumerate(params):
        if not isinstance(p, Param):
            raise TypeError(f"param {i} is a {type(p).__name__}, not a Param")
    return b"".join(p.pack() for p in params)


def unpack_params(
    buf: bytes | bytearray | memoryview, offset: int, count: int
) -> tuple[Param, ...]:
    """Read ``count`` params starting at ``offset``."""
    if not isinstance(count, int) or count < 0:
        raise DecodeError(f"param count {count!r} is not a non-negative int")
    if offset < 0 or len(buf) - offset < 32 * count:
        raise DecodeError(
            f"{count} params need {32 * count} bytes at offset {offset}, buffer has {len(buf)}"
        )
    s = Param._S
    return tuple(Param(*s.unpack_from(buf, offset + 32 * i)) for i in range(count))


def pack_arg(header: HeaderRecord, params: Sequence[Param] = ()) -> bytes:
    """A buf_data argument block: the header struct then its params.

    ``header.num_params`` must equal ``len(params)``.
    """
    if header.num_params != len(params):
        raise UsageError(
            f"{type(header).__name__}.num_params={header.num_params} but {len(params)} params given"
        )
    return header.pack() + pack_params(params)


def unpack_arg(cls: type[H], buf: bytes | bytearray | memoryview) -> tuple[H, tuple[Param, ...]]:
    """Split a buf_data argument block into its header and ``header.num_params`` params."""
    header = cls.unpack(buf)
    return header, unpack_params(buf, cls.SIZE, header.num_params)
