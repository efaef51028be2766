"""What a QTEE fd's ioctl sends of the caller's memory (qtee/_remote/checks.py
QteeDialect.regions): the argument block and the memory its params name, read as they are
at each call, whatever calls came before with the same block.

The cases a repeated block might get wrong: the same block under another ioctl (the
num_params field sits elsewhere), a block whose params change, and buffers whose bytes
change between two calls with the same block.
"""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from qtee import uapi
from qtee._remote.checks import QteeDialect
from qtee._remote.frames import Welcome
from qtee.addrspace import CheckedMemory

_RECV = uapi.TEE_IOC_SUPPL_RECV
_INVOKE = uapi.TEE_IOC_OBJECT_INVOKE
_META_SCRATCH = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_INOUT | uapi.TEE_IOCTL_PARAM_ATTR_META
_UBUF_IN = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_INPUT


def _dialect() -> QteeDialect:
    return QteeDialect(Welcome(impl_id=uapi.TEE_IMPL_ID_QTEE, gen_caps=0, server="test"))


def _recv_block(scratch: int, size: int, slots: int = 3) -> bytearray:
    """A supplicant's RECV block: the scratch buffer as its first (meta) param."""
    block = bytearray(struct.pack("<II", 0, slots))
    block += uapi.PARAM_STRUCT.pack(_META_SCRATCH, scratch, size, 0)
    block += bytes(32 * (slots - 1))
    return block


def test_a_repeated_recv_block_sends_the_scratch_as_it_is_now() -> None:
    """Issue 18 (socket path, RECV block seen before): the second RECV with the same block
    sends the scratch buffer's bytes of that moment, not those of the first call."""
    mem = CheckedMemory()
    scratch = bytearray(b"a" * 64)
    s_addr = mem.pin(scratch)
    block = _recv_block(s_addr, len(scratch))
    b_addr = mem.pin(block)
    arg = uapi.BUF_DATA_STRUCT.pack(b_addr, len(block))
    dialect = _dialect()
    first = dialect.regions(_RECV, arg, mem, 1 << 20)
    assert sorted(first) == sorted([(b_addr, bytes(block), True), (s_addr, b"a" * 64, True)])
    scratch[:] = b"b" * 64
    again = dialect.regions(_RECV, arg, mem, 1 << 20)
    assert sorted(again) == sorted([(b_addr, bytes(block), True), (s_addr, b"b" * 64, True)])


def test_the_same_block_under_another_ioctl_is_parsed_for_that_ioctl() -> None:
    """Issue 18: a block's params are found where its ioctl puts num_params (RECV at 4,
    OBJECT_INVOKE at 16): the same bytes sent as an OBJECT_INVOKE after a RECV name no
    scratch buffer (this block's invoke header says 0 params)."""
    mem = CheckedMemory()
    scratch = bytearray(64)
    s_addr = mem.pin(scratch)
    block = _recv_block(s_addr, len(scratch))
    b_addr = mem.pin(block)
    arg = uapi.BUF_DATA_STRUCT.pack(b_addr, len(block))
    dialect = _dialect()
    assert len(dialect.regions(_RECV, arg, mem, 1 << 20)) == 2
    assert dialect.regions(_INVOKE, arg, mem, 1 << 20) == [(b_addr, bytes(block), True)]


def test_a_block_whose_params_change_names_the_new_memory() -> None:
    """Issue 18: the same argument with a block that now names another buffer sends that
    buffer (the block's bytes are compared, not only the argument's)."""
    mem = CheckedMemory()
    one, two = bytearray(b"1" * 16), bytearray(b"2" * 16)
    a1, a2 = mem.pin(one), mem.pin(two)
    block = bytearray(struct.pack("<QIIII", 0, 0, 0, 1, 0))  # object, op, ret, num_params
    block += uapi.PARAM_STRUCT.pack(_UBUF_IN, a1, 16, 0)
    b_addr = mem.pin(block)
    arg = uapi.BUF_DATA_STRUCT.pack(b_addr, len(block))
    dialect = _dialect()
    assert (a1, b"1" * 16, False) in dialect.regions(_INVOKE, arg, mem, 1 << 20)
    block[24:56] = uapi.PARAM_STRUCT.pack(_UBUF_IN, a2, 16, 0)
    got = dialect.regions(_INVOKE, arg, mem, 1 << 20)
    assert (a2, b"2" * 16, False) in got
    assert all(addr != a1 for addr, _d, _w in got)


_SCRATCH = 64


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 19), st.sampled_from([_RECV, _INVOKE]), st.integers(0, 3)),
        min_size=1,
        max_size=60,
    )
)
def test_blocks_used_in_turn_send_what_a_fresh_dialect_sends(
    calls: list[tuple[int, int, int]],
) -> None:
    """Issue 18 (several workers' RECV blocks in turn, more blocks than the dialect
    remembers, blocks and buffers changed between calls): every call sends exactly what
    a dialect that has seen no call before sends for it."""
    mem = CheckedMemory()
    scratches = [bytearray(_SCRATCH) for _ in range(20)]
    at = [mem.pin(s) for s in scratches]
    blocks = [_recv_block(a, _SCRATCH) for a in at]
    args = [uapi.BUF_DATA_STRUCT.pack(mem.pin(b), len(b)) for b in blocks]
    dialect = _dialect()
    for n, (i, cmd, change) in enumerate(calls):
        if change == 1:  # the scratch's bytes
            scratches[i][:] = bytes([n % 256]) * _SCRATCH
        elif change == 2:  # the block names another worker's scratch
            j = (i + 1) % 20
            blocks[i][8:40] = uapi.PARAM_STRUCT.pack(_META_SCRATCH, at[j], _SCRATCH, 0)
        got = dialect.regions(cmd, args[i], mem, 1 << 20)
        assert got == _dialect().regions(cmd, args[i], mem, 1 << 20)
