"""What crosses the socket for a QTEE fd, and what may come back (client side, sans-IO).

A :class:`RemoteContext <qtee._remote.remote.RemoteContext>` asks its *dialect* -- this module's
:class:`QteeDialect`, or :class:`qtee._remote.remote_optee.OpteeDialect` for an OP-TEE device --
two things about each ioctl: which of the caller's memory goes with the request
(:meth:`regions`, found by parsing the struct as the kernel will), and whether a reply is
one the kernel could have given (:meth:`check`: a string saying what is wrong, or None).
Nothing reaches the caller's memory before the check passes.  The helpers here
(:func:`merge`, :func:`read_spans`, :func:`block_change`, :func:`check_shm`,
:func:`check_version`) are shared by both dialects.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from typing import Any, Final, Protocol, TypeVar

from objects import DriverError
from qtee import uapi
from qtee._remote.frames import FrameError, IoctlReply, Welcome, check_written
from qtee.addrspace import AddressSpace

__all__ = [
    "Dialect",
    "QteeDialect",
    "ShmSeen",
    "Span",
    "block_change",
    "check_shm",
    "check_version",
    "merge",
    "recv_overflow",
    "read_block",
    "read_spans",
]

#: ``(addr, data, writable)``: caller memory sent with a request.
Span = tuple[int, bytes, bool]
#: ``(id, size)`` from a call's shm fd frame, or None if none came.
ShmSeen = tuple[int, int] | None


_BUF: Final = uapi.BUF_DATA_STRUCT
_BUF_SIZE: Final = _BUF.size
_PARAM: Final = uapi.PARAM_STRUCT
_U32: Final = struct.Struct("<I")
#: buf_data ioctls: header size and where num_params sits in it.
_HEADS: Final = {
    uapi.TEE_IOC_OBJECT_INVOKE: (24, 16),
    uapi.TEE_IOC_SUPPL_RECV: (8, 4),
    uapi.TEE_IOC_SUPPL_SEND: (8, 4),
}
_INVOKE: Final = uapi.TEE_IOC_OBJECT_INVOKE
_RECV: Final = uapi.TEE_IOC_SUPPL_RECV
_UBUF_IN: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_INPUT
_UBUF_OUT: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_OUTPUT
_OBJ_OUT: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_OUTPUT
_UBUF_TYPES: Final = frozenset({8, 9, 10})
_META_TYPES: Final = frozenset({uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_INOUT | 0x100})
#: How many argument blocks ``QteeDialect.regions`` remembers (a pool's workers' RECVs).
_SEEN_MAX: Final = 16


class Dialect(Protocol):
    """How one kind of device's ioctls cross the socket (see the module docstring)."""

    def regions(self, cmd: int, arg: bytes, mem: AddressSpace, max_frame: int) -> list[Span]:
        """The caller memory ``cmd`` may touch, read now; DriverError to fail the call."""
        ...

    def check(
        self, cmd: int, arg: bytes, regions: list[Span], reply: IoctlReply, shm: ShmSeen
    ) -> str | None:
        """What is wrong with ``reply`` to the ioctl ``cmd`` as it went to the server (its
        struct's bytes ``arg``, the caller memory ``regions`` sent with it), or None.
        ``shm``: ``(id, size)`` from the call's shm fd frame, if one came."""
        ...

    def done(self, cmd: int, arg: bytes) -> None:
        """``cmd`` succeeded and left ``arg``: what the dialect keeps track of (not called
        for OBJECT_INVOKE, SUPPL_RECV and SUPPL_SEND, which change nothing it tracks)."""
        ...

    def forget(self, shm_id: int) -> bool:
        """A shm this fd registered is freed: True if it was one."""
        ...


_H = TypeVar("_H")


def read_block(
    heads: Mapping[int, _H], cmd: int, arg: bytes, mem: AddressSpace
) -> tuple[_H, int, int, bytes] | None:
    """The buf_data block that ``cmd``'s argument names, read now, with ``cmd``'s entry in
    ``heads``: ``(head, ptr, length, block)``.  None when ``cmd`` has no block, or its
    argument or block cannot be read (the server's driver fails it as the kernel would)."""
    head = heads.get(cmd)
    if head is None or len(arg) < _BUF.size:
        return None
    ptr, length = _BUF.unpack_from(arg)
    try:
        block = mem.read(ptr, length)
    except DriverError:
        return None
    return head, ptr, length, block


def read_spans(mem: AddressSpace, spans: list[tuple[int, int, bool]]) -> list[Span]:
    """The merged spans' bytes; a span this process has not mapped is left out (the
    server's driver faults on it as the kernel would)."""
    return _read_merged(mem, merge(spans))


def _read_merged(
    mem: AddressSpace, merged: list[tuple[int, int, bool]], at: int = -1, read: bytes = b""
) -> list[Span]:
    """:func:`read_spans` of spans merged already (``[start, end)``); a span that is
    exactly the bytes ``read`` at ``at`` just now is not read again."""
    regions: list[Span] = []
    for start, end, writable in merged:
        if start == at and end - start == len(read):
            regions.append((start, read, writable))
            continue
        try:
            data = mem.read(start, end - start)
        except DriverError:
            continue
        regions.append((start, data, writable))
    return regions


class QteeDialect:
    """The QTEE device's ioctls (``qcomtee``): buf_data blocks with UBUF params and the
    RECV scratch buffer; OBJECT_INVOKE and SUPPL_RECV replies checked param by param."""

    def __init__(self, welcome: Welcome) -> None:
        self.welcome = welcome
        #: By argument, the cmd, block and merged spans of the last call with it whose
        #: block names more memory than itself: a supplicant's worker sends the same RECV
        #: block every time (one entry per worker, so that they do not evict each other).
        self._seen: dict[bytes, tuple[int, bytes, list[tuple[int, int, bool]]]] = {}

    def regions(self, cmd: int, arg: bytes, mem: AddressSpace, max_frame: int) -> list[Span]:
        # (read_block inline, without its result tuple: this runs for every ioctl)
        head = _HEADS.get(cmd)
        if head is None or len(arg) < _BUF_SIZE:
            return []
        ptr, length = _BUF.unpack_from(arg)
        try:
            block = mem.read(ptr, length)
        except DriverError:
            return []
        seen = self._seen.get(arg)  # (the spans depend on the cmd, argument and block alone)
        if seen is not None and seen[1] == block and seen[0] == cmd:
            return _read_merged(mem, seen[2], ptr, block)
        size, at = head
        if len(block) < size:  # no params to read: the block alone, if any
            return [(ptr, block, True)] if length > 0 else []
        (num,) = _U32.unpack_from(block, at)
        if not num:  # the block alone (a call without params), read already
            return [(ptr, block, True)]
        spans: list[tuple[int, int, bool]] = [(ptr, length, True)]
        for i in range(min(num, (len(block) - size) // 32)):
            attr, a, b, _c = _PARAM.unpack_from(block, size + 32 * i)
            if attr & 0xFF in _UBUF_TYPES:
                spans.append((a, b, attr & 0xFF != _UBUF_IN))
            elif attr in _META_TYPES:  # the RECV scratch buffer
                spans.append((a, b, True))
        if len(spans) == 1:  # the block alone (no UBUF, no scratch), read already
            return [(ptr, block, True)]
        merged = merge(spans)
        seen_all = self._seen
        if len(seen_all) >= _SEEN_MAX and arg not in seen_all:
            seen_all.clear()  # (many blocks in turn: no cache is as good as any)
        seen_all[arg] = (cmd, block, merged)
        return _read_merged(mem, merged, ptr, block)

    def check(
        self, cmd: int, arg: bytes, regions: list[Span], reply: IoctlReply, shm: ShmSeen
    ) -> str | None:
        """What is wrong with ``reply`` to the ioctl ``cmd`` (see :meth:`Dialect.check`), or
        None: the frame-level rules (:func:`check_written`), then what the kernel's ioctl
        may change."""
        if shm is None and cmd in _HEADS:  # the common replies first: they pass or go on
            if reply.errno or (not reply.written and reply.arg == arg):
                return None  # a failure writes nothing; nor did this success
            whole = _whole_block(arg, regions, reply)
            if whole is not None:  # check_written passes: the tail's checks, at once
                before, after = whole
                if cmd == _INVOKE:
                    return None if after == before else _check_invoke(before, after)
                return _check_recv(before, after) if cmd == _RECV else None
        try:
            check_written(reply, len(arg), regions)
        except FrameError as exc:
            return str(exc)
        if cmd == uapi.TEE_IOC_SHM_ALLOC:
            return check_shm(arg, reply, shm)
        if shm is not None:
            return "a shm fd for a call that is no SHM_ALLOC"
        if cmd == uapi.TEE_IOC_VERSION:
            return check_version(reply, self.welcome)
        if reply.errno or cmd not in _HEADS:
            return None
        if reply.arg != arg:  # tee_ioctl_buf_data: the kernel never writes it back
            return "the reply changes the buf_data argument"
        change = block_change(arg, regions, reply.written)
        if change is None:
            return None
        before, after = change
        if cmd == uapi.TEE_IOC_OBJECT_INVOKE:
            return None if before == after else _check_invoke(before, after)
        if cmd == uapi.TEE_IOC_SUPPL_RECV:
            return _check_recv(before, after)
        return None

    def done(self, cmd: int, arg: bytes) -> None:
        pass

    def forget(self, shm_id: int) -> bool:
        return False


def _whole_block(arg: bytes, regions: list[Span], reply: IoctlReply) -> tuple[bytes, bytes] | None:
    """The buf_data block as sent and as written back, when the reply keeps ``arg`` and
    writes that block alone and whole, and the request sent it as one writable region of
    its own (then :func:`check_written` passes and :func:`block_change` gives the same);
    else None."""
    written = reply.written
    if len(written) != 1 or reply.arg != arg or len(arg) < _BUF_SIZE:
        return None
    (w,) = written
    ptr, length = _BUF.unpack_from(arg)
    if w.addr != ptr or len(w.data) != length:
        return None
    for start, before, writable in regions:
        if start == ptr and len(before) == length and writable:
            return before, w.data
    return None


def merge(spans: list[tuple[int, int, bool]]) -> list[tuple[int, int, bool]]:
    """Overlapping or touching ``(addr, size, writable)`` spans -> disjoint ``[start, end)``."""
    out: list[tuple[int, int, bool]] = []
    for start, size, writable in sorted(spans):  # (no generator: one call fewer per ioctl)
        if size <= 0:
            continue
        end = start + size
        if out and start < out[-1][1]:
            s, e, w = out[-1]
            out[-1] = (s, max(e, end), w or writable)
        else:
            out.append((start, end, writable))
    return out


def block_change(
    arg: bytes, regions: Iterable[Span], written: tuple[Any, ...]
) -> tuple[bytes, bytes] | None:
    """The buf_data block as sent and as the ``written`` regions leave it, or None when
    nothing was written or the block was not sent."""
    if not written or len(arg) < _BUF.size:
        return None
    ptr, length = _BUF.unpack_from(arg)
    for start, data, _w in regions:  # the block as sent
        if start <= ptr and ptr + length <= start + len(data):
            before = data[ptr - start : ptr - start + length]
            break
    else:
        return None
    for w in written:  # the common case: one written region holds all of it
        if w.addr <= ptr and ptr + length <= w.addr + len(w.data):
            return before, w.data[ptr - w.addr : ptr - w.addr + length]
    return before, _overlay(before, ptr, written)


def check_version(reply: IoctlReply, welcome: Welcome) -> str | None:
    """TEE_IOC_VERSION reports the impl id and gen caps the server welcomed with."""
    if reply.errno or len(reply.arg) < uapi.VersionData.SIZE:
        return None
    got = uapi.VersionData.unpack(reply.arg)
    if (got.impl_id, got.gen_caps) != (welcome.impl_id, welcome.gen_caps):
        return (
            f"VERSION says impl id {got.impl_id}, gen caps {got.gen_caps:#x}; the welcome "
            f"{welcome.impl_id}, {welcome.gen_caps:#x}"
        )
    return None


def check_shm(arg: bytes, reply: IoctlReply, shm: tuple[int, int] | None) -> str | None:
    """SHM_ALLOC: its fd frame names the id and size of the reply, which has the size
    and flags asked for; a failed one has no fd."""
    if reply.errno:
        return None if shm is None else "a shm fd for a SHM_ALLOC that failed"
    if shm is None:
        return "a SHM_ALLOC reply without its shm fd"
    asked = uapi.ShmAllocData.unpack(arg)
    got = uapi.ShmAllocData.unpack(reply.arg)
    if (got.id, got.size) != shm:
        return f"SHM_ALLOC says shm {got.id} of {got.size} bytes, its fd frame {shm[0]} of {shm[1]}"
    if got.size != asked.size or got.flags != asked.flags:
        return f"SHM_ALLOC of {asked.size} bytes answered with {got.size} (flags {got.flags:#x})"
    return None


def _overlay(block: bytes, ptr: int, written: tuple[Any, ...]) -> bytes:
    """``block`` (the bytes at ``ptr``) as the ``written`` regions leave it."""
    out = bytearray(block)
    end = ptr + len(block)
    for w in written:
        lo, hi = max(w.addr, ptr), min(w.end, end)
        if lo < hi:
            out[lo - ptr : hi - ptr] = w.data[lo - w.addr : hi - w.addr]
    return bytes(out)


def _check_invoke(before: bytes, after: bytes) -> str | None:
    """OBJECT_INVOKE writes back ``ret``, the output sizes (at most the buffer) and the
    output objects; the object, op, count, attrs and every input stay as they were."""
    if len(before) < 24:
        return None
    if before[:12] != after[:12] or before[16:24] != after[16:24]:  # all but ret
        return "the reply changes the invoke's object, op or param count"
    (num,) = _U32.unpack_from(before, 16)
    for i in range(min(num, (len(before) - 24) // 32)):
        at = 24 + 32 * i
        attr, a, b, c = _PARAM.unpack_from(before, at)
        nattr, na, nb, nc = _PARAM.unpack_from(after, at)
        if attr == _UBUF_OUT:
            if (nattr, na, nc) != (attr, a, c) or nb > b:
                return f"param {i}: an output of {nb} bytes for a {b}-byte buffer at {a:#x}"
        elif attr == _OBJ_OUT:
            if nattr != attr:
                return f"param {i}: attr {nattr:#x} for an output object"
        elif (nattr, na, nb, nc) != (attr, a, b, c):
            return f"param {i}: the reply changes an input (attr {attr:#x})"
    return None


def recv_overflow(before: bytes, after: bytes) -> str | None:
    """What is wrong if SUPPL_RECV's block (``before`` and ``after`` the call, each with
    its header) holds more params than the slots sent: the kernel fills at most those."""
    (slots,) = _U32.unpack_from(before, 4)
    (num,) = _U32.unpack_from(after, 4)
    return f"a request of {num} params for {slots} slots" if num > slots else None


def _check_recv(before: bytes, after: bytes) -> str | None:
    """SUPPL_RECV fills at most the params sent; an input buffer lies inside the scratch
    buffer (the first param), an output names no address."""
    if len(before) < 40:
        return None
    lie = recv_overflow(before, after)
    if lie is not None:
        return lie
    (num,) = _U32.unpack_from(after, 4)
    if num < 2:  # the meta param alone (a release, a call without arguments)
        return None
    _attr, scratch, size, _c = _PARAM.unpack_from(before, 8)
    for i in range(1, min(num, (len(after) - 8) // 32)):
        attr, a, b, _c = _PARAM.unpack_from(after, 8 + 32 * i)
        if attr == _UBUF_IN and b and not (scratch <= a and a + b <= scratch + size):
            return f"param {i}: an input at [{a:#x}, {a + b:#x}) outside the scratch buffer"
        if attr == _UBUF_OUT and a:
            return f"param {i}: an output buffer at {a:#x}"
    return None
