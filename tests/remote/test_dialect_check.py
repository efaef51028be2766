"""What a QTEE fd accepts back for an OBJECT_INVOKE whose block went alone (no params:
qtee/_remote/checks.py QteeDialect.check): the block's ``ret`` may change, nothing else of
it, nothing outside it, and a failed reply writes nothing.

Issue 18 (socket path) asks the common call to be checked with less work; these are the
verdicts the cheaper check must keep, each the same string the full check gives.
"""

from __future__ import annotations

import errno
import random
import struct

import pytest

from qtee import uapi
from qtee._remote.checks import QteeDialect, _check_invoke, _check_recv, block_change
from qtee._remote.frames import FrameError, IoctlReply, Region, Welcome, check_written
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
_UBUF_OUT = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_OUTPUT
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


def _general(
    cmd: int, arg: bytes, regions: list[tuple[int, bytes, bool]], reply: IoctlReply
) -> str | None:
    """The QTEE dialect's general check of a buf_data ioctl's reply without a shm fd
    (check_written, the arg, block_change, the ioctl's tail): what the one-pass check of the
    common replies must say too."""
    try:
        check_written(reply, len(arg), regions)
    except FrameError as exc:
        return str(exc)
    if reply.errno:
        return None
    if reply.arg != arg:
        return "the reply changes the buf_data argument"
    change = block_change(arg, regions, reply.written)
    if change is None:
        return None
    before, after = change
    if cmd == _INVOKE:
        return None if before == after else _check_invoke(before, after)
    return _check_recv(before, after) if cmd == _RECV else None


def test_the_one_pass_check_gives_the_general_checks_verdict() -> None:
    """Issue 18: for random OBJECT_INVOKE, SUPPL_RECV and SUPPL_SEND replies -- the block
    written whole, in part, with more, elsewhere, or not at all; params inside and outside
    the buffers; headers changed -- ``QteeDialect.check`` says what the general path says."""
    rng = random.Random(18)
    attrs = [
        uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_INPUT,
        uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_OUTPUT,
        uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_INPUT,
        uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_OUTPUT,
        _META_SCRATCH,
        0,
    ]
    verdicts = set()
    for _ in range(600):
        mem = CheckedMemory()
        scratch = bytearray(64)
        s_addr = mem.pin(scratch)
        out = bytearray(16)
        o_addr = mem.pin(out)
        cmd = rng.choice([_INVOKE, _RECV, _SEND])
        slots = rng.randint(1, 3)
        head = _HEAD.pack(7, 3, 0, slots, 0) if cmd == _INVOKE else struct.pack("<II", 0, slots)
        size = len(head) + 32 * slots
        whole = bytearray(size + 16)  # the block, then 16 bytes a param may name
        b_addr = mem.pin(whole)
        params = [uapi.PARAM_STRUCT.pack(_META_SCRATCH, s_addr, len(scratch), 0)]
        if cmd == _INVOKE:  # an output buffer elsewhere, or just past the block
            target = rng.choice([o_addr, b_addr + size])
            params = [uapi.PARAM_STRUCT.pack(_UBUF_OUT, target, 16, 0)]
        params += [bytes(32)] * (slots - 1)
        whole[:size] = head + b"".join(params)
        block = whole[:size]
        arg = uapi.BUF_DATA_STRUCT.pack(b_addr, size)
        dialect = QteeDialect(Welcome(impl_id=uapi.TEE_IMPL_ID_QTEE, gen_caps=0, server="t"))
        regions = dialect.regions(cmd, arg, mem, 1 << 20)
        back = bytearray(block)
        if rng.random() < 0.5:  # a new header: a count, a ret, or the object changed
            at = rng.choice([0, 8, 12, 16] if cmd == _INVOKE else [0, 4])
            struct.pack_into("<I", back, at, rng.choice([0, 1, slots, slots + 1, 9]))
        for i in range(slots):  # params the server fills in
            if rng.random() < 0.6:
                base = len(head) + 32 * i
                addr = rng.choice([0, s_addr, s_addr + 60, o_addr, b_addr])
                size = rng.choice([0, 4, 16, 17, 64])
                uapi.PARAM_STRUCT.pack_into(back, base, rng.choice(attrs), addr, size, 0)
        shape = rng.randrange(6)
        err = errno.EINVAL if shape == 0 else 0
        written = {
            0: (),
            1: (),
            2: (_w(b_addr, bytes(back)),),
            3: (_w(b_addr, bytes(back[:8])),),
            4: (_w(b_addr, bytes(back)), _w(o_addr, bytes(4))),
            5: (_w(o_addr + 8, bytes(back[:8])),),
        }[shape]
        reply_arg = b"" if err else arg
        if shape == 1 and rng.random() < 0.5:
            reply_arg = uapi.BUF_DATA_STRUCT.pack(b_addr, len(block) - 8)
        reply = _reply(reply_arg, *written, err=err)
        want = _general(cmd, arg, regions, reply)
        assert dialect.check(cmd, arg, regions, reply, None) == want, (cmd, shape, bytes(back))
        verdicts.add(want is None)
    assert verdicts == {True, False}  # both kinds were met
