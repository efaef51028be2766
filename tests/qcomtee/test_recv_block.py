"""SUPPL_RECV's argument block is read and checked on every call (QK §4.2), also when a
thread sends the very block that passed before: a change to the block, made between two
RECVs through the same argument struct, is seen by the second (issue 18: "a RECV fast
path that recognises the worker's unchanged block" keeps every errno)."""

from __future__ import annotations

import errno

import pytest

from objects import DriverError
from qtee import Device, uapi
from qtee.addrspace import CheckedMemory
from qtee.secure import QteeRoot, SecureWorld
from tests._helpers import buf_arg, recv_block


def _eagain(ctx: object, arg: bytearray) -> None:
    with pytest.raises(DriverError) as exc:
        ctx.recv_nowait(arg)  # type: ignore[attr-defined]
    assert exc.value.errno == errno.EAGAIN


@pytest.mark.parametrize(
    ("at", "value", "why"),
    [
        (uapi.SuppRecvArg.SIZE + 32, 1, "params after the first must be NONE"),  # VALUE_INPUT
        (uapi.SuppRecvArg.SIZE + 8, 0x1004, "8-byte aligned"),  # scratch address
        (uapi.SuppRecvArg.SIZE, 1, "VALUE_INOUT|META first"),  # first param's attr
        (4, 3, "buf_len"),  # num_params no longer matches the block
    ],
)
def test_a_block_changed_after_it_passed_is_checked_again(at: int, value: int, why: str) -> None:
    """QK §4.2: the same argument struct twice, the block changed in between: the first
    RECV passes its checks (EAGAIN, nothing queued), the second fails EINVAL for the
    change, and the block put back passes again."""
    mem = CheckedMemory()
    dev = Device(SecureWorld(QteeRoot()), memory=mem)
    ctx = dev.open()
    block = recv_block(mem.map(bytearray(64)), 64, 2)
    good = bytes(block)
    arg = buf_arg(mem, block)
    _eagain(ctx, arg)
    _eagain(ctx, arg)
    width = 4 if at < uapi.SuppRecvArg.SIZE else 8
    block[at : at + width] = value.to_bytes(width, "little")
    with pytest.raises(DriverError, match=why) as exc:
        ctx.recv_nowait(arg)
    assert exc.value.errno == errno.EINVAL
    block[:] = good
    _eagain(ctx, arg)
    ctx.close()
    assert dev.leaks() == {}


def test_the_same_block_through_another_struct_is_read_at_its_address() -> None:
    """QK §4.2: a struct naming an unmapped address faults (EFAULT) though an equal block
    passed elsewhere before."""
    mem = CheckedMemory()
    dev = Device(SecureWorld(QteeRoot()), memory=mem)
    ctx = dev.open()
    block = recv_block(mem.map(bytearray(64)), 64, 2)
    _eagain(ctx, buf_arg(mem, block))
    bad = bytearray(uapi.BufData(0x10, len(block)).pack())
    with pytest.raises(DriverError) as exc:
        ctx.recv_nowait(bad)
    assert exc.value.errno == errno.EFAULT
    ctx.close()
    assert dev.leaks() == {}
