"""What crosses the socket for an OP-TEE fd, and what may come back (client side, sans-IO).

The OP-TEE device's ioctls (optee.md §2, §3.3) name memory two ways.  A buf_data block
(OPEN_SESSION, INVOKE, SUPPL_RECV, SUPPL_SEND) is the caller's memory, sent as a region.
A memref names a shm by id: an *allocated* shm is shared pages (its memory file came with
the SHM_ALLOC reply), so nothing more crosses; a *registered* shm is the caller's own
memory, which only this side can reach, so :class:`OpteeDialect` keeps the range of each
shm this fd registered and sends:

* with SHM_REGISTER, the whole range (read-only: the kernel pins the pages, EFAULT if any
  is unmapped; a range longer than the frame limit fails E2BIG here, a limit of the
  socket);
* with OPEN_SESSION and INVOKE, the window ``[addr + offset, + size)`` of each memref on a
  registered shm (writable for OUTPUT/INOUT), which the TA reads and whose changed bytes
  come back with the reply;
* with SUPPL_SEND, the window of each OUTPUT/INOUT memref on a registered shm, read-only:
  what tee-supplicant wrote for the request it answers (the server copies it into its
  shadow of that shm before the request completes);
* and a SUPPL_RECV's reply may carry, beside its block, the window of each INPUT/INOUT
  memref on a registered shm of this fd: the bytes the secure side wrote there.

Replies are checked as the kernel's ioctls allow (issue 13 point 8, for OP-TEE's
structs): the buf_data argument unchanged; OPEN_SESSION/INVOKE change only the session,
``ret`` and ``ret_origin``, VALUE outputs and memref output sizes (never an attr, offset,
shm id or input); SUPPL_RECV fills at most the slots sent, and a window it writes is
exactly one of its own memrefs on a registered shm, apart from the request's regions;
SUPPL_SEND, CANCEL and CLOSE_SESSION write nothing; SHM_REGISTER gives back the range
asked for and a valid id; SHM_ALLOC's fd frame matches its reply; VERSION reports the
welcome's impl id and gen caps.
"""

from __future__ import annotations

import errno
import struct
import threading
from typing import Final

from objects import DriverError
from qtee import uapi
from qtee._remote import checks
from qtee._remote.checks import ShmSeen, Span, block_change, check_shm, check_version, read_spans
from qtee._remote.frames import FrameError, IoctlReply, Region, Welcome, check_written
from qtee.addrspace import TASK_SIZE, AddressSpace

__all__ = ["OpteeDialect"]

_BUF: Final = uapi.BUF_DATA_STRUCT
_PARAM: Final = uapi.PARAM_STRUCT
_U32: Final = struct.Struct("<I")
_OPEN: Final = uapi.TEE_IOC_OPEN_SESSION
_INVOKE: Final = uapi.TEE_IOC_INVOKE
_RECV: Final = uapi.TEE_IOC_SUPPL_RECV
_SEND: Final = uapi.TEE_IOC_SUPPL_SEND
_REGISTER: Final = uapi.TEE_IOC_SHM_REGISTER
#: buf_data ioctls: header size, where num_params sits, the header bytes the kernel keeps.
_HEADS: Final = {
    _OPEN: (56, 52, ((0, 40), (52, 56))),  # uuid, clnt_uuid, login, cancel_id | num
    _INVOKE: (24, 20, ((0, 12), (20, 24))),  # func, session, cancel_id | num
    _RECV: (8, 4, ()),
    _SEND: (8, 4, ()),
}
#: Ioctls whose argument the kernel never writes back.
_ARG_KEPT: Final = frozenset(
    {_OPEN, _INVOKE, _RECV, _SEND, uapi.TEE_IOC_CANCEL, uapi.TEE_IOC_CLOSE_SESSION}
)
_VALUE_OUT: Final = frozenset({2, 3})
_MEMREFS: Final = frozenset({5, 6, 7})
_MEMREF_OUT: Final = frozenset({6, 7})
_MEMREF_IN: Final = frozenset({5, 7})
_SHM_ID_MAX: Final = 0x7FFF_FFFF


def _params(block: bytes, head: int, at: int) -> list[tuple[int, int, int, int]]:
    if len(block) < head:
        return []
    (num,) = _U32.unpack_from(block, at)
    num = min(num, (len(block) - head) // _PARAM.size)
    return [_PARAM.unpack_from(block, head + _PARAM.size * i) for i in range(num)]


class OpteeDialect:
    """An OP-TEE fd's ioctls (see the module docstring); keeps this fd's registered shms."""

    def __init__(self, welcome: Welcome) -> None:
        self.welcome = welcome
        self._lock = threading.Lock()
        #: shm id -> (addr, length) of each shm this fd registered and has not freed.
        self.registered: dict[int, tuple[int, int]] = {}

    # ------------------------------------------------------------------ requests
    def regions(self, cmd: int, arg: bytes, mem: AddressSpace, max_frame: int) -> list[Span]:
        if cmd == _REGISTER:
            return self._register_range(arg, mem, max_frame)
        got = checks.read_block(_HEADS, cmd, arg, mem)
        if got is None:
            return []
        (size, at, _kept), ptr, length, block = got
        spans: list[tuple[int, int, bool]] = [(ptr, length, cmd != _SEND)]
        params = _params(block, size, at)
        if cmd in (_OPEN, _INVOKE):
            for attr, a, b, c in params:
                window = self._window(attr, a, b, c, _MEMREFS)
                if window is not None:
                    spans.append((window[0], b, attr in _MEMREF_OUT))
        elif cmd == _SEND:
            for attr, a, b, c in params[1:]:
                window = self._window(attr, a, b, c, _MEMREF_OUT, clip=True)
                if window is not None:
                    spans.append((window[0], window[1], False))
        return read_spans(mem, spans)

    def _window(
        self, attr: int, a: int, b: int, c: int, types: frozenset[int], *, clip: bool = False
    ) -> tuple[int, int] | None:
        """``(addr, size)`` of a memref's bytes in a registered shm of this fd, or None."""
        if attr not in types or not b:
            return None
        with self._lock:
            shm = self.registered.get(c)
        if shm is None:
            return None
        addr, size = shm
        if clip and a < size:
            b = min(b, size - a)
        if a + b > size:
            return None
        return addr + a, b

    @staticmethod
    def _register_range(arg: bytes, mem: AddressSpace, max_frame: int) -> list[Span]:
        if len(arg) < uapi.ShmRegisterData.SIZE:
            return []
        data = uapi.ShmRegisterData.unpack(arg)
        if data.flags or not 0 < data.length <= TASK_SIZE - data.addr:
            return []  # the kernel's EINVAL comes first
        if data.length > max_frame:
            raise DriverError(
                errno.E2BIG,
                f"cannot register {data.length} bytes through a socket of {max_frame}-byte frames",
            )
        return read_spans(mem, [(data.addr, data.length, False)])

    # ------------------------------------------------------------------ replies
    def check(
        self, cmd: int, arg: bytes, regions: list[checks.Span], reply: IoctlReply, shm: ShmSeen
    ) -> str | None:
        if cmd == uapi.TEE_IOC_SHM_ALLOC:
            lie = _written(reply, arg, regions)
            return lie or check_shm(arg, reply, shm)
        if shm is not None:
            return "a shm fd for a call that is no SHM_ALLOC"
        if cmd == _RECV and not reply.errno:
            return self._check_recv(arg, regions, reply)
        lie = _written(reply, arg, regions)
        if lie is not None or reply.errno:
            return lie
        if cmd == uapi.TEE_IOC_VERSION:
            return check_version(reply, self.welcome)
        if cmd == _REGISTER:
            return _check_register(arg, reply)
        if cmd in _ARG_KEPT and reply.arg != arg:
            return "the reply changes an argument the kernel does not write back"
        if cmd in (_OPEN, _INVOKE):
            change = block_change(arg, regions, reply.written)
            if change is not None and change[0] != change[1]:
                return _check_gp(cmd, *change)
        return None

    def _check_recv(self, arg: bytes, regions: list[Span], reply: IoctlReply) -> str | None:
        """The block's own rules, and each written region outside the request's regions
        is one of the memref windows the reply hands over (an input on a registered shm)."""
        if reply.arg != arg:
            return "the reply changes the buf_data argument"
        own: list[Region] = []
        windows: list[Region] = []
        for w in reply.written:
            inside = any(a <= w.addr and w.end <= a + len(d) for a, d, _ in regions)
            (own if inside else windows).append(w)
        try:
            mine = IoctlReply(seq=reply.seq, arg=reply.arg, written=tuple(own))
            check_written(mine, len(arg), regions)
        except FrameError as exc:
            return str(exc)
        change = block_change(arg, regions, tuple(own))
        if change is None:
            return "a window written beside no block" if windows else None
        before, after = change
        if len(before) < 8:
            return None
        lie = checks.recv_overflow(before, after)
        if lie is not None:
            return lie
        allowed = set()
        for attr, a, b, c in _params(after, 8, 4):
            window = self._window(attr, a, b, c, _MEMREF_IN)
            if window is not None:
                allowed.add(window)
        for w in windows:
            if (w.addr, len(w.data)) not in allowed:
                return f"it writes [{w.addr:#x}, {w.end:#x}), no input memref of the request"
            if any(a < w.end and w.addr < a + len(d) for a, d, _ in regions):
                return f"the window at {w.addr:#x} overlaps the request's memory"
        return None

    # ------------------------------------------------------------------ bookkeeping
    def done(self, cmd: int, arg: bytes) -> None:
        if cmd == _REGISTER:
            data = uapi.ShmRegisterData.unpack(arg)
            with self._lock:
                self.registered[data.id] = (data.addr, data.length)

    def forget(self, shm_id: int) -> bool:
        with self._lock:
            return self.registered.pop(shm_id, None) is not None


def _written(reply: IoctlReply, arg: bytes, regions: list[Span]) -> str | None:
    try:
        check_written(reply, len(arg), regions)
    except FrameError as exc:
        return str(exc)
    return None


def _check_register(arg: bytes, reply: IoctlReply) -> str | None:
    asked = uapi.ShmRegisterData.unpack(arg)
    got = uapi.ShmRegisterData.unpack(reply.arg)
    if (got.addr, got.length, got.flags) != (asked.addr, asked.length, asked.flags):
        return f"SHM_REGISTER of {asked.length} bytes at {asked.addr:#x} answered with {got}"
    if not 1 <= got.id <= _SHM_ID_MAX:
        return f"SHM_REGISTER gives shm id {got.id}"
    return None


def _check_gp(cmd: int, before: bytes, after: bytes) -> str | None:
    """OPEN_SESSION/INVOKE write back the session, ``ret``, ``ret_origin``, VALUE output
    ``a, b, c`` and memref output sizes; nothing else changes."""
    size, at, kept = _HEADS[cmd]
    if len(before) < size:
        return None
    for lo, hi in kept:
        if before[lo:hi] != after[lo:hi]:
            return "the reply changes the call's header (uuid, login, function, session or count)"
    for i, ((attr, a, b, c), (nattr, na, nb, nc)) in enumerate(
        zip(_params(before, size, at), _params(after, size, at), strict=True)
    ):
        if nattr != attr:
            return f"param {i}: attr {nattr:#x} for {attr:#x}"
        if attr in _VALUE_OUT:
            continue
        if attr in _MEMREF_OUT:
            if (na, nc) != (a, c):
                return f"param {i}: the reply moves a memref (offset {na:#x}, shm {nc:#x})"
        elif (na, nb, nc) != (a, b, c):
            return f"param {i}: the reply changes an input (attr {attr:#x})"
    return None
