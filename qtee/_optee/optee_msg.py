"""The OP-TEE message a std call carries: records, a byte layout, and the reply whitelist.

A normal-world OP-TEE driver puts one message (OP-TEE's ``optee_msg_arg``) in a page of
shared memory and makes the std call ``OPTEE_SMC_CALL_WITH_ARG`` with the page's physical
address in a1 (upper 32 bits) and a2 (lower 32 bits); OP-TEE answers in the same page
(optee.md §6.1, §6.2).  This module is that message, sans-IO:

* :class:`OpteeMsg` and :class:`MsgParam` are the request, :class:`OpteeReply` the
  answer; all are frozen, slotted, keyword-only records checked when built;
* :func:`encode_msg` / :func:`decode_msg` are the bytes in the page: a header of eight
  u32 (``cmd, func, session, cancel_id, pad, ret, ret_origin, num_params``) then
  ``num_params`` params of four u64 (``attr, a, b, c``), little-endian.  OPEN_SESSION
  puts two META value params first: the TA's UUID (``a``, ``b`` = its 16 octets), then
  the client UUID and login (``c``), as the OP-TEE driver does (§2);
* :func:`reply_patches` is the whitelist a mediator may write back to a guest (Xen,
  §6.2): ``ret``, ``ret_origin``, ``session``, output values (``a, b, c``) and output
  memref sizes (``b``) -- nothing else.  :func:`read_reply` reads exactly those fields.

Params mirror the union of the real message: a VALUE is ``{a, b, c}``; a temporary
memref (TMEM) is ``{buf_ptr, size, shm_ref}`` -- here one contiguous physical range, not
a NONCONTIG page list (a model choice: a guest's RAM is one host region); a registered
memref (RMEM) is ``{offs, size, shm_ref}``, naming a buffer registered with
REGISTER_SHM by its cookie.  ``buf_ptr`` 0 is the NULL memref.

Facts used: the command and attribute numbers, the META/NONCONTIG bits and the
capability bits are those of OP-TEE's message ABI (the sheet states only CANCEL = 3, §2,
and SEC_CAP_VIRTUALIZATION = bit 3, §6.1); the std-call function ids (``SmcFid``) are
§6.1.  The model refuses NONCONTIG (Xen requires it; the model has no page
lists) and bounds a message to one 4 KiB page (Xen's shadow page, §6.2).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Final

from objects import DecodeError, UsageError

__all__ = [
    "MSG_HEADER_SIZE",
    "MSG_MAX_PARAMS",
    "MSG_PARAM_SIZE",
    "OPTEE_MSG_ATTR_META",
    "OPTEE_MSG_ATTR_NONCONTIG",
    "MsgParam",
    "OpteeMsg",
    "OpteeMsgAttr",
    "OpteeMsgCmd",
    "OpteeReply",
    "OpteeSecCap",
    "arg_size",
    "arg_size_of",
    "decode_msg",
    "encode_msg",
    "read_reply",
    "reply_patches",
    "write_reply",
]

OPTEE_MSG_ATTR_META: Final = 0x100
OPTEE_MSG_ATTR_NONCONTIG: Final = 0x200

_HEAD: Final = struct.Struct("<8I")
_PARAM: Final = struct.Struct("<4Q")  # struct optee_msg_param: u64 attr, then a 24-byte union
_U32: Final = 0xFFFF_FFFF
_U64: Final = 0xFFFF_FFFF_FFFF_FFFF
_PAGE: Final = 4096

MSG_HEADER_SIZE: Final = _HEAD.size
MSG_PARAM_SIZE: Final = _PARAM.size
#: As many params as fit one 4 KiB page with the header.
MSG_MAX_PARAMS: Final = (_PAGE - _HEAD.size) // _PARAM.size

# Offsets inside the header of the fields a reply may change.
_OFF_SESSION: Final = 8
_OFF_RET: Final = 20
_OFF_ORIGIN: Final = 24
_META_OPEN: Final = 2  # OPEN_SESSION's two META params come first


class OpteeMsgCmd(enum.IntEnum):
    """``OPTEE_MSG_CMD_*``: what a std call asks for."""

    OPTEE_MSG_CMD_OPEN_SESSION = 0
    OPTEE_MSG_CMD_INVOKE_COMMAND = 1
    OPTEE_MSG_CMD_CLOSE_SESSION = 2
    OPTEE_MSG_CMD_CANCEL = 3
    OPTEE_MSG_CMD_REGISTER_SHM = 4
    OPTEE_MSG_CMD_UNREGISTER_SHM = 5


class OpteeSecCap(enum.IntFlag):
    """``OPTEE_SMC_SEC_CAP_*``: a1 of ``EXCHANGE_CAPABILITIES`` (VIRTUALIZATION: §6.1)."""

    OPTEE_SMC_SEC_CAP_HAVE_RESERVED_SHM = 1 << 0
    OPTEE_SMC_SEC_CAP_UNREGISTERED_SHM = 1 << 1
    OPTEE_SMC_SEC_CAP_DYNAMIC_SHM = 1 << 2
    OPTEE_SMC_SEC_CAP_VIRTUALIZATION = 1 << 3
    OPTEE_SMC_SEC_CAP_MEMREF_NULL = 1 << 4


class OpteeMsgAttr(enum.IntEnum):
    """``OPTEE_MSG_ATTR_TYPE_*``: a param's type (the low byte of ``attr``)."""

    OPTEE_MSG_ATTR_TYPE_NONE = 0x0
    OPTEE_MSG_ATTR_TYPE_VALUE_INPUT = 0x1
    OPTEE_MSG_ATTR_TYPE_VALUE_OUTPUT = 0x2
    OPTEE_MSG_ATTR_TYPE_VALUE_INOUT = 0x3
    OPTEE_MSG_ATTR_TYPE_RMEM_INPUT = 0x5
    OPTEE_MSG_ATTR_TYPE_RMEM_OUTPUT = 0x6
    OPTEE_MSG_ATTR_TYPE_RMEM_INOUT = 0x7
    OPTEE_MSG_ATTR_TYPE_TMEM_INPUT = 0x9
    OPTEE_MSG_ATTR_TYPE_TMEM_OUTPUT = 0xA
    OPTEE_MSG_ATTR_TYPE_TMEM_INOUT = 0xB

    @property
    def is_value(self) -> bool:
        return 0x1 <= self <= 0x3

    @property
    def is_rmem(self) -> bool:
        return 0x5 <= self <= 0x7

    @property
    def is_tmem(self) -> bool:
        return 0x9 <= self <= 0xB

    @property
    def is_output(self) -> bool:
        """Written back by the TEE (OUTPUT or INOUT)."""
        return bool(self & 0x2)

    @property
    def gp_type(self) -> int:
        """The ``TEE_PARAM_TYPE_*`` a TA sees (memrefs collapse to 5/6/7)."""
        if self.is_tmem:
            return int(self) - 4
        return int(self)


_A = OpteeMsgAttr


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _u(v: object, top: int, what: str) -> None:
    if not _is_int(v) or not 0 <= v <= top:  # type: ignore[operator]
        raise UsageError(f"{what} must be an int in [0, {top:#x}], not {v!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class MsgParam:
    """One param of a message: ``attr`` and the three u64 of its union.

    VALUE: ``a``, ``b``, ``c``.  TMEM: ``a`` = physical address (0: NULL memref),
    ``b`` = size, ``c`` = shm reference.  RMEM: ``a`` = offset, ``b`` = size, ``c`` =
    the cookie of a registered buffer.  Build memrefs with :meth:`tmem` / :meth:`rmem`.
    """

    attr: OpteeMsgAttr
    a: int = 0
    b: int = 0
    c: int = 0

    def __post_init__(self) -> None:
        try:
            attr = OpteeMsgAttr(self.attr)
        except ValueError:
            raise UsageError(f"{self.attr!r} is not an OPTEE_MSG_ATTR_TYPE_*") from None
        object.__setattr__(self, "attr", attr)
        for name in ("a", "b", "c"):
            _u(getattr(self, name), _U64, f"MsgParam.{name}")
        if (attr.is_tmem or attr.is_rmem) and self.a + self.b > _U64:
            raise UsageError(f"memref {self.a:#x} + {self.b:#x} overflows a u64")

    @classmethod
    def value(cls, attr: int, a: int = 0, b: int = 0, c: int = 0) -> MsgParam:
        """A VALUE param."""
        p = cls(attr=OpteeMsgAttr(attr), a=a, b=b, c=c)
        if not p.attr.is_value:
            raise UsageError(f"{p.attr.name} is not a VALUE type")
        return p

    @classmethod
    def tmem(cls, attr: int, addr: int, size: int, shm_ref: int = 0) -> MsgParam:
        """A temporary memref: ``size`` bytes at physical ``addr`` (0 = NULL memref)."""
        p = cls(attr=OpteeMsgAttr(attr), a=addr, b=size, c=shm_ref)
        if not p.attr.is_tmem:
            raise UsageError(f"{p.attr.name} is not a TMEM type")
        return p

    @classmethod
    def rmem(cls, attr: int, shm_ref: int, offset: int, size: int) -> MsgParam:
        """A registered memref: ``size`` bytes at ``offset`` of buffer ``shm_ref``."""
        p = cls(attr=OpteeMsgAttr(attr), a=offset, b=size, c=shm_ref)
        if not p.attr.is_rmem:
            raise UsageError(f"{p.attr.name} is not an RMEM type")
        return p

    @property
    def size(self) -> int:
        """A memref's size (``b``)."""
        return self.b


@dataclass(frozen=True, slots=True, kw_only=True)
class OpteeMsg:
    """One message (``optee_msg_arg`` without ``ret``/``ret_origin``, which are replies).

    ``uuid``, ``clnt_uuid`` and ``login`` are OPEN_SESSION's META params; the other
    commands carry them as zeros.  ``cmd`` may be any u32 so that a received message
    with an unknown command can be decoded and refused (EBADCMD) by whoever reads it.
    """

    cmd: int
    func: int = 0
    session: int = 0
    cancel_id: int = 0
    uuid: bytes = bytes(16)
    clnt_uuid: bytes = bytes(16)
    login: int = 0
    params: tuple[MsgParam, ...] = field(default=())

    def __post_init__(self) -> None:
        for name in ("cmd", "func", "session", "cancel_id", "login"):
            _u(getattr(self, name), _U32, f"OpteeMsg.{name}")
        for name in ("uuid", "clnt_uuid"):
            v = getattr(self, name)
            if not isinstance(v, bytes | bytearray) or len(v) != 16:
                raise UsageError(f"OpteeMsg.{name} must be 16 bytes, not {v!r}")
            object.__setattr__(self, name, bytes(v))
        params = tuple(self.params)
        if not all(isinstance(p, MsgParam) for p in params):
            raise UsageError("OpteeMsg.params must be MsgParam records")
        if len(params) + self._meta > MSG_MAX_PARAMS:
            raise UsageError(f"{len(params)} params do not fit one {_PAGE}-byte message")
        object.__setattr__(self, "params", params)
        if self.cmd != OpteeMsgCmd.OPTEE_MSG_CMD_OPEN_SESSION and (
            any(self.uuid) or any(self.clnt_uuid) or self.login
        ):
            raise UsageError("uuid, clnt_uuid and login belong to OPEN_SESSION only")

    @property
    def _meta(self) -> int:
        return _META_OPEN if self.cmd == OpteeMsgCmd.OPTEE_MSG_CMD_OPEN_SESSION else 0

    @property
    def size(self) -> int:
        """Bytes of the encoded message."""
        return arg_size(len(self.params) + self._meta)


@dataclass(frozen=True, slots=True, kw_only=True)
class OpteeReply:
    """What the TEE answered: the whitelisted fields only (optee.md §6.2).

    ``outs`` has one record per param of the message, equal to it except for the
    output fields (VALUE outputs ``a, b, c``, memref outputs the size ``b``).
    """

    ret: int
    ret_origin: int
    session: int = 0
    outs: tuple[MsgParam, ...] = field(default=())

    def __post_init__(self) -> None:
        for name in ("ret", "ret_origin", "session"):
            _u(getattr(self, name), _U32, f"OpteeReply.{name}")
        outs = tuple(self.outs)
        if not all(isinstance(p, MsgParam) for p in outs):
            raise UsageError("OpteeReply.outs must be MsgParam records")
        object.__setattr__(self, "outs", outs)


# ----------------------------------------------------------------------------- codec


def arg_size(num_params: int) -> int:
    """Bytes of a message with ``num_params`` params (META ones included)."""
    _u(num_params, MSG_MAX_PARAMS, "num_params")
    return _HEAD.size + _PARAM.size * num_params


def arg_size_of(buf: bytes | bytearray | memoryview) -> int:
    """The size of the message whose header starts ``buf`` (read before the rest)."""
    if len(buf) < _HEAD.size:
        raise DecodeError(f"a message header is {_HEAD.size} bytes, got {len(buf)}")
    num = _HEAD.unpack_from(buf)[7]
    if num > MSG_MAX_PARAMS:
        raise DecodeError(f"num_params {num} does not fit one {_PAGE}-byte message")
    return arg_size(num)


def _uuid_words(raw: bytes) -> tuple[int, int]:
    return int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")


def _words_uuid(a: int, b: int) -> bytes:
    return a.to_bytes(8, "little") + b.to_bytes(8, "little")


def encode_msg(msg: OpteeMsg) -> bytearray:
    """The message's bytes, ``ret`` and ``ret_origin`` zero."""
    if not isinstance(msg, OpteeMsg):
        raise UsageError(f"encode_msg takes an OpteeMsg, not {type(msg).__name__}")
    raw: list[tuple[int, int, int, int]] = []
    if msg._meta:
        meta_in = OPTEE_MSG_ATTR_META | _A.OPTEE_MSG_ATTR_TYPE_VALUE_INPUT
        raw.append((meta_in, *_uuid_words(msg.uuid), 0))
        raw.append((meta_in, *_uuid_words(msg.clnt_uuid), msg.login))
    raw.extend((int(p.attr), p.a, p.b, p.c) for p in msg.params)
    out = bytearray(arg_size(len(raw)))
    _HEAD.pack_into(out, 0, msg.cmd, msg.func, msg.session, msg.cancel_id, 0, 0, 0, len(raw))
    for i, p in enumerate(raw):
        _PARAM.pack_into(out, _HEAD.size + _PARAM.size * i, *p)
    return out


def decode_msg(buf: bytes | bytearray | memoryview) -> OpteeMsg:
    """Bytes -> :class:`OpteeMsg`; anything malformed raises ``DecodeError`` only.

    Malformed: short, ``num_params`` past one page, a param type that is not a type,
    the NONCONTIG bit, a memref whose range overflows, META params anywhere but the two
    leading ones of OPEN_SESSION (which must be there).
    """
    size = arg_size_of(buf)
    if len(buf) < size:
        raise DecodeError(f"the message needs {size} bytes, got {len(buf)}")
    cmd, func, session, cancel_id, _pad, _ret, _origin, num = _HEAD.unpack_from(buf)
    raw = [_PARAM.unpack_from(buf, _HEAD.size + _PARAM.size * i) for i in range(num)]
    uuid = clnt = bytes(16)
    login = 0
    if cmd == OpteeMsgCmd.OPTEE_MSG_CMD_OPEN_SESSION:
        meta_in = OPTEE_MSG_ATTR_META | _A.OPTEE_MSG_ATTR_TYPE_VALUE_INPUT
        if num < _META_OPEN or raw[0][0] != meta_in or raw[1][0] != meta_in:
            raise DecodeError("OPEN_SESSION needs its two META value params first")
        if raw[1][3] > _U32:
            raise DecodeError(f"login {raw[1][3]:#x} is not a u32")
        uuid, clnt, login = _words_uuid(*raw[0][1:3]), _words_uuid(*raw[1][1:3]), raw[1][3]
        raw = raw[_META_OPEN:]
    params = []
    for i, (attr, a, b, c) in enumerate(raw):
        if attr & OPTEE_MSG_ATTR_NONCONTIG:
            raise DecodeError(f"param {i}: NONCONTIG page lists are not modelled")
        if attr & OPTEE_MSG_ATTR_META:
            raise DecodeError(f"param {i}: a META param where none may be")
        try:
            params.append(MsgParam(attr=OpteeMsgAttr(attr), a=a, b=b, c=c))
        except (ValueError, UsageError) as exc:
            raise DecodeError(f"param {i}: attr {attr:#x}: {exc}") from None
    return OpteeMsg(
        cmd=cmd,
        func=func,
        session=session,
        cancel_id=cancel_id,
        uuid=uuid,
        clnt_uuid=clnt,
        login=login,
        params=tuple(params),
    )


def _check_pair(msg: OpteeMsg, reply: OpteeReply) -> None:
    if not isinstance(msg, OpteeMsg) or not isinstance(reply, OpteeReply):
        raise UsageError("a reply is written for an OpteeMsg with an OpteeReply")
    if len(reply.outs) != len(msg.params) or any(
        o.attr != p.attr for o, p in zip(reply.outs, msg.params, strict=True)
    ):
        raise UsageError("the reply's params do not match the message's")


def reply_patches(msg: OpteeMsg, reply: OpteeReply) -> list[tuple[int, bytes]]:
    """``(offset, bytes)`` of every field the reply may change in ``msg``'s page.

    These are the only bytes a mediator writes back to a guest (optee.md §6.2):
    ``ret``, ``ret_origin``, ``session``, output values, output memref sizes.
    """
    _check_pair(msg, reply)
    le32 = struct.Struct("<I").pack
    le64 = struct.Struct("<Q").pack
    out = [
        (_OFF_SESSION, le32(reply.session)),
        (_OFF_RET, le32(reply.ret)),
        (_OFF_ORIGIN, le32(reply.ret_origin)),
    ]
    base = _HEAD.size + _PARAM.size * msg._meta
    for i, p in enumerate(reply.outs):
        if not p.attr.is_output:
            continue
        off = base + _PARAM.size * i
        if p.attr.is_value:
            out.append((off + 8, le64(p.a) + le64(p.b) + le64(p.c)))
        else:
            out.append((off + 16, le64(p.b)))
    return out


def write_reply(buf: bytearray | memoryview, msg: OpteeMsg, reply: OpteeReply) -> None:
    """Write the reply's fields (and only those) into ``msg``'s bytes in ``buf``."""
    if len(buf) < msg.size:
        raise UsageError(f"the message needs {msg.size} bytes, the buffer has {len(buf)}")
    for off, data in reply_patches(msg, reply):
        buf[off : off + len(data)] = data


def read_reply(buf: bytes | bytearray | memoryview, msg: OpteeMsg) -> OpteeReply:
    """Read the reply to ``msg`` from its bytes: only the whitelisted fields.

    Everything else in ``buf`` is ignored, so whatever the other side wrote there does
    not reach the caller.  Raises ``DecodeError`` if ``buf`` is too short.
    """
    if not isinstance(msg, OpteeMsg):
        raise UsageError(f"read_reply needs the OpteeMsg sent, not {type(msg).__name__}")
    if len(buf) < msg.size:
        raise DecodeError(f"the reply needs {msg.size} bytes, got {len(buf)}")
    _c, _f, session, _i, _p, ret, origin, _n = _HEAD.unpack_from(buf)
    base = _HEAD.size + _PARAM.size * msg._meta
    outs = []
    for i, p in enumerate(msg.params):
        if p.attr.is_output:
            _attr, a, b, c = _PARAM.unpack_from(buf, base + _PARAM.size * i)
            try:
                if p.attr.is_value:
                    p = MsgParam(attr=p.attr, a=a, b=b, c=c)
                else:
                    p = MsgParam(attr=p.attr, a=p.a, b=b, c=p.c)
            except UsageError as exc:
                raise DecodeError(f"reply param {i}: {exc}") from None
        outs.append(p)
    return OpteeReply(ret=ret, ret_origin=origin, session=session, outs=tuple(outs))
