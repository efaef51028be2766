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


_RECV = uapi.TEE_IOC_SUPPL_RECV
_SEND = uapi.TEE_IOC_SUPPL_SEND
_META_SCRATCH = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_INOUT | uapi.TEE_IOCTL_PARAM_ATTR_META


def _recv_setup() -> tuple[QteeDialect, bytes, list[tuple[int, bytes, bool]], int, int, bytes]:
    """A supplicant's RECV: its block (3 slots, the scratch buffer first) and scratch."""
    mem = CheckedMemory()
    scratch = bytearray(64)
    s_addr = mem.pin(scratch)
    block = bytearray(struct.pack("<II", 0, 3))
    block += uapi.PARAM_STRUCT.pack(_META_SCRATCH, s_addr, len(scratch), 0) + bytes(64)
    b_addr = mem.pin(block)
    arg = uapi.BUF_DATA_STRUCT.pack(b_addr, len(block))
    dialect = QteeDialect(Welcome(impl_id=uapi.TEE_IMPL_ID_QTEE, gen_caps=0, server="test"))
    regions = dialect.regions(_RECV, arg, mem, 1 << 20)
    return dialect, arg, regions, b_addr, s_addr, bytes(block)


def _request(s_addr: int, num: int, attr: int, addr: int, size: int) -> bytes:
    """A RECV block as the server fills it: ``num`` params, the second one given."""
    head = struct.pack("<II", 9, num)
    first = uapi.PARAM_STRUCT.pack(_META_SCRATCH, s_addr, 64, 0)
    return head + first + uapi.PARAM_STRUCT.pack(attr, addr, size, 0) + bytes(32)


def test_a_recv_reply_writing_its_block_alone_is_checked_param_by_param() -> None:
    """SUPPL_RECV (issue 18: same verdicts): a request inside the scratch buffer passes;
    more params than slots, an input outside the scratch buffer, or an output naming an
    address is a lie -- also when the block alone comes back."""
    dialect, arg, regions, b_addr, s_addr, _block = _recv_setup()
    ubuf_in = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_INPUT
    ubuf_out = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_OUTPUT

    def verdict(back: bytes) -> str | None:
        return dialect.check(_RECV, arg, regions, _reply(arg, _w(b_addr, back)), None)

    assert verdict(_request(s_addr, 2, ubuf_in, s_addr + 8, 16)) is None
    assert verdict(_request(s_addr, 4, ubuf_in, s_addr, 8)) == "a request of 4 params for 3 slots"
    outside = verdict(_request(s_addr, 2, ubuf_in, s_addr + 60, 16))
    assert (
        outside
        == f"param 1: an input at [{s_addr + 60:#x}, {s_addr + 76:#x}) outside the scratch buffer"
    )
    assert (
        verdict(_request(s_addr, 2, ubuf_out, s_addr, 8))
        == f"param 1: an output buffer at {s_addr:#x}"
    )


def test_a_send_reply_writing_nothing_passes_and_one_changing_the_arg_does_not() -> None:
    """SUPPL_SEND writes nothing back: an empty reply passes; an argument changed is a lie."""
    mem = CheckedMemory()
    block = bytearray(struct.pack("<II", 9, 1) + bytes(32))
    addr = mem.pin(block)
    arg = uapi.BUF_DATA_STRUCT.pack(addr, len(block))
    dialect = QteeDialect(Welcome(impl_id=uapi.TEE_IMPL_ID_QTEE, gen_caps=0, server="test"))
    regions = dialect.regions(_SEND, arg, mem, 1 << 20)
    assert dialect.check(_SEND, arg, regions, _reply(arg), None) is None
    other = uapi.BUF_DATA_STRUCT.pack(addr, len(block) - 8)
    assert dialect.check(_SEND, arg, regions, _reply(other), None) == (
        "the reply changes the buf_data argument"
    )
