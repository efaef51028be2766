"""What a QTEE fd accepts back for an OBJECT_INVOKE whose block went alone (no params:
qtee/_remote/checks.py QteeDialect.check): the block's ``ret`` may change, nothing else of
it, nothing outside it, and a failed reply writes nothing.

Issue 18 (socket path) asks the common call to be checked with less work; these are the
verdicts the cheaper check must keep, each the same string the full check gives.
"""

from __future__ import annotations

import errno
import struct

import pytest

from qtee import uapi
from qtee._remote.checks import QteeDialect
from qtee._remote.frames import IoctlReply, Region, Welcome
from qtee.addrspace import CheckedMemory

_INVOKE = uapi.TEE_IOC_OBJECT_INVOKE
_HEAD = struct.Struct("<QIIII")  # object, op, ret, num_params, pad


def _setup() -> tuple[QteeDialect, bytes, list[tuple[int, bytes, bool]], int, bytes]:
    mem = CheckedMemory()
    block = bytearray(_HEAD.pack(7, 3, 0, 0, 0))
    addr = mem.pin(block)
    arg = uapi.BUF_DATA_STRUCT.pack(addr, len(block))
    dialect = QteeDialect(Welcome(impl_id=uapi.TEE_IMPL_ID_QTEE, gen_caps=0, server="test"))
    regions = dialect.regions(_INVOKE, arg, mem, 1 << 20)
    return dialect, arg, regions, addr, bytes(block)


def _w(addr: int, data: bytes) -> Region:
    return Region(addr=addr, data=data, writable=True)


def _reply(arg: bytes, *written: Region, err: int = 0) -> IoctlReply:
    return IoctlReply(seq=1, errno=err, arg=arg, written=written)


def test_the_block_alone_goes_and_its_ret_may_change() -> None:
    """A param-less invoke sends its block alone; the reply may set ``ret``."""
    dialect, arg, regions, addr, block = _setup()
    assert regions == [(addr, block, True)]
    back = _HEAD.pack(7, 3, 5, 0, 0)
    assert dialect.check(_INVOKE, arg, regions, _reply(arg, _w(addr, back)), None) is None
    same = _reply(arg, _w(addr, block))
    assert dialect.check(_INVOKE, arg, regions, same, None) is None
    failed = _reply(b"", err=errno.ENOMEM)
    assert dialect.check(_INVOKE, arg, regions, failed, None) is None


@pytest.mark.parametrize(
    ("back", "want"),
    [
        (_HEAD.pack(8, 3, 0, 0, 0), "the reply changes the invoke's object, op or param count"),
        (_HEAD.pack(7, 4, 0, 0, 0), "the reply changes the invoke's object, op or param count"),
        (_HEAD.pack(7, 3, 0, 1, 0), "the reply changes the invoke's object, op or param count"),
    ],
)
def test_a_reply_changing_the_header_is_a_lie(back: bytes, want: str) -> None:
    """OBJECT_INVOKE writes back ``ret`` alone of the header (issue 18: same verdicts)."""
    dialect, arg, regions, addr, _block = _setup()
    reply = _reply(arg, _w(addr, back))
    assert dialect.check(_INVOKE, arg, regions, reply, None) == want


def test_writes_past_the_block_or_elsewhere_are_lies() -> None:
    """A write one byte longer than the block, or one byte after it, lies outside the
    writable regions sent; an argument of the same length naming another block changes
    the buf_data argument; a shm fd frame for an invoke is a lie."""
    dialect, arg, regions, addr, block = _setup()
    longer = _reply(arg, _w(addr, block + b"x"))
    lie = dialect.check(_INVOKE, arg, regions, longer, None)
    assert lie is not None and "outside the writable regions" in lie
    moved = _reply(arg, _w(addr + 1, block))
    lie = dialect.check(_INVOKE, arg, regions, moved, None)
    assert lie is not None and "outside the writable regions" in lie
    other = uapi.BUF_DATA_STRUCT.pack(addr + 8, len(block))
    lie = dialect.check(_INVOKE, arg, regions, _reply(other, _w(addr, block)), None)
    assert lie == "the reply changes the buf_data argument"
    shm = dialect.check(_INVOKE, arg, regions, _reply(arg, _w(addr, block)), (1, 4096))
    assert shm == "a shm fd for a call that is no SHM_ALLOC"
