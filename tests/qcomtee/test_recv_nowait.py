"""The model's non-blocking SUPPL_RECV (``Context.recv_nowait``) and its wait
(``RequestQueue.wait_ready``): what the device server uses to park waiting RECVs without
a thread each (issue 13 point 9).  Past the wait, the RECV is the kernel's (QK §4.2)."""

from __future__ import annotations

import errno
import threading

import pytest

from objects import DriverError
from qtee import Device, uapi
from qtee.addrspace import CheckedMemory
from qtee.secure import QteeRoot, SecureWorld
from tests._helpers import OBJ_IN, RELEASE, USER, buf_arg, raw_invoke, recv_block


def test_nothing_queued_is_eagain_and_writes_nothing() -> None:
    mem = CheckedMemory()
    dev = Device(SecureWorld(QteeRoot()), memory=mem)
    ctx = dev.open()
    block = recv_block(mem.map(bytearray(64)), 64, 2)
    before = bytes(block)
    with pytest.raises(DriverError) as exc:
        ctx.recv_nowait(buf_arg(mem, block))
    assert exc.value.errno == errno.EAGAIN and bytes(block) == before
    assert ctx.requests.wait_ready(0.05) is False
    ctx.close()


def test_a_queued_request_is_received_as_by_the_ioctl() -> None:
    """A release notification queued (the root drops a callback object it was given):
    ``wait_ready`` says so at once and ``recv_nowait`` returns it, RECV's bytes."""
    mem = CheckedMemory()
    dev = Device(SecureWorld(QteeRoot()), memory=mem)
    ctx = dev.open()
    # Root op 3 is not served: QTEE consumes the callback object and releases it.
    raw_invoke(ctx, mem, uapi.TEE_OBJREF_NULL, 3, [uapi.Param(OBJ_IN, 42, USER)])
    assert ctx.requests.wait_ready(0)
    block = recv_block(mem.map(bytearray(64)), 64, 2)
    assert ctx.recv_nowait(buf_arg(mem, block)) == 0
    head = uapi.SuppRecvArg.unpack(block)
    params = uapi.unpack_params(block, uapi.SuppRecvArg.SIZE, head.num_params)
    assert (head.func, head.num_params, params[0].a, params[0].b) == (RELEASE, 1, 42, 0)
    ctx.close()
    assert dev.leaks() == {}


def test_wait_ready_returns_when_the_fd_closes() -> None:
    dev = Device(SecureWorld(QteeRoot()))
    ctx = dev.open()
    got: list[bool] = []
    t = threading.Thread(target=lambda: got.append(ctx.requests.wait_ready(5)))
    t.start()
    ctx.close()
    t.join(5)
    assert got == [True]
    with pytest.raises(DriverError) as exc:  # and the RECV itself: the fd is closed
        ctx.recv_nowait(bytearray(16))
    assert exc.value.errno == errno.EBADF


def test_on_ready_is_called_when_a_request_is_queued_and_at_close() -> None:
    """The hook a waiter outside Python uses (a C bridge's eventfd)."""
    mem = CheckedMemory()
    dev = Device(SecureWorld(QteeRoot()), memory=mem)
    ctx = dev.open()
    calls: list[int] = []
    ctx.requests.on_ready = lambda: calls.append(len(ctx.requests.fifo))
    raw_invoke(ctx, mem, uapi.TEE_OBJREF_NULL, 3, [uapi.Param(OBJ_IN, 42, USER)])
    assert calls == [1]  # the release notification, queued
    ctx.close()
    assert calls == [1, 0]  # released: the waiter wakes to find the fd closed


def test_optee_supplicant_recv_nowait_and_on_ready() -> None:
    """The same on the OP-TEE supplicant's fd: EAGAIN with nothing queued; the hook runs
    when the secure side queues an RPC and when the supplicant's fd closes."""
    from qtee import OpteeDevice
    from qtee._optee.supp import attach_rpc

    dev = OpteeDevice(SecureWorld(QteeRoot()), memory=CheckedMemory())
    supp = attach_rpc(dev)
    ctx = dev.open_supplicant()
    calls: list[str] = []
    supp.on_ready = lambda: calls.append("ready")
    mem = dev.memory
    assert isinstance(mem, CheckedMemory)
    block = bytearray(uapi.pack_arg(uapi.SuppRecvArg(0, 1), [uapi.Param(0)]))
    with pytest.raises(DriverError) as exc:
        ctx.recv_nowait(buf_arg(mem, block))
    assert exc.value.errno == errno.EAGAIN
    assert supp.wait_ready(0) is False
    ctx.close()
    assert calls == ["ready"] and supp.wait_ready(0) is True
