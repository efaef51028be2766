"""Raw-ioctl helpers shared by the driver tests: one copy of each struct builder.

Everything here goes through ``Context.ioctl`` with the kernel's structs
(qtee-kernel.md §1.3-§1.5, §4.1, §4.3, §4.4), the way a C client or libqcomtee would,
with buffers mapped into a :class:`CheckedMemory` so a stray pointer is EFAULT.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable

import pytest

from objects import DriverError
from qtee import Context, uapi
from qtee.addrspace import CheckedMemory
from qtee.credentials import CredentialKey, Credentials

UB_IN = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_INPUT
UB_OUT = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_OUTPUT
OBJ_IN = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_INPUT
OBJ_OUT = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_OUTPUT
META_IN = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_INOUT | uapi.TEE_IOCTL_PARAM_ATTR_META
META_OUT = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_OUTPUT | uapi.TEE_IOCTL_PARAM_ATTR_META
TEE = uapi.QCOMTEE_OBJREF_FLAG_TEE
USER = uapi.QCOMTEE_OBJREF_FLAG_USER
MEM = uapi.QCOMTEE_OBJREF_FLAG_MEM
NULL = uapi.TEE_OBJREF_NULL

RELEASE = 0xFFFF

InvokeResult = tuple[uapi.ObjectInvokeArg, tuple[uapi.Param, ...]]


def buf_arg(mem: CheckedMemory, block: bytearray) -> bytearray:
    """The ``struct tee_ioctl_buf_data`` pointing at ``block`` (mapped into ``mem``)."""
    return bytearray(uapi.BufData(mem.map(block), len(block)).pack())


def invoke_block(obj_id: int, op: int, params: list[uapi.Param]) -> bytearray:
    """An OBJECT_INVOKE argument block: header then params."""
    return bytearray(uapi.pack_arg(uapi.ObjectInvokeArg(obj_id, op, 0, len(params)), params))


def raw_invoke(
    ctx: Context, mem: CheckedMemory, obj_id: int, op: int, params: list[uapi.Param]
) -> InvokeResult:
    """TEE_IOC_OBJECT_INVOKE; returns the header and params the driver wrote back."""
    block = invoke_block(obj_id, op, params)
    assert ctx.ioctl(uapi.TEE_IOC_OBJECT_INVOKE, buf_arg(mem, block)) == 0
    return uapi.unpack_arg(uapi.ObjectInvokeArg, block)


def release(ctx: Context, mem: CheckedMemory, obj_id: int) -> None:
    """Drop this fd's reference to a QTEE object (op 0xFFFF, handled in the driver)."""
    raw_invoke(ctx, mem, obj_id, RELEASE, [])


def expect_errno(
    code: int, ctx: Context, cmd: int, arg: bytearray, block: bytearray | None = None
) -> None:
    """``cmd`` fails with ``code`` and writes nothing back (neither ``arg`` nor ``block``)."""
    before = bytes(arg), None if block is None else bytes(block)
    with pytest.raises(DriverError) as exc:
        ctx.ioctl(cmd, arg)
    assert exc.value.errno == code, exc.value
    assert (bytes(arg), None if block is None else bytes(block)) == before


def expect_invoke_errno(
    code: int, ctx: Context, mem: CheckedMemory, obj_id: int, op: int, params: list[uapi.Param]
) -> None:
    """OBJECT_INVOKE fails with ``code`` and leaves its argument block untouched."""
    block = invoke_block(obj_id, op, params)
    expect_errno(code, ctx, uapi.TEE_IOC_OBJECT_INVOKE, buf_arg(mem, block), block)


def recv_block(scratch_addr: int, scratch_size: int, n: int) -> bytearray:
    """A SUPPL_RECV block: the meta param then ``n - 1`` NONE params."""
    params = [uapi.Param(META_IN, scratch_addr, scratch_size)] + [uapi.Param(0)] * (n - 1)
    return bytearray(uapi.pack_arg(uapi.SuppRecvArg(0, n), params))


def recv(
    ctx: Context, mem: CheckedMemory, n: int = 4, scratch_size: int = 256
) -> tuple[uapi.SuppRecvArg, tuple[uapi.Param, ...], bytearray]:
    """TEE_IOC_SUPPL_RECV with a fresh scratch buffer; returns header, params, scratch."""
    scratch = bytearray(scratch_size)
    block = recv_block(mem.map(scratch), scratch_size, n)
    ctx.ioctl(uapi.TEE_IOC_SUPPL_RECV, buf_arg(mem, block))
    head = uapi.SuppRecvArg.unpack(block)
    return head, uapi.unpack_params(block, uapi.SuppRecvArg.SIZE, head.num_params), scratch


def send_block(ret: int, params: list[uapi.Param]) -> bytearray:
    """A SUPPL_SEND block."""
    return bytearray(uapi.pack_arg(uapi.SuppSendArg(ret, len(params)), params))


def send(ctx: Context, mem: CheckedMemory, ret: int, params: list[uapi.Param]) -> None:
    """TEE_IOC_SUPPL_SEND."""
    ctx.ioctl(uapi.TEE_IOC_SUPPL_SEND, buf_arg(mem, send_block(ret, params)))


def shm_alloc(ctx: Context, size: int) -> int:
    """TEE_IOC_SHM_ALLOC; returns the shm id."""
    arg = bytearray(uapi.ShmAllocData(size).pack())
    ctx.ioctl(uapi.TEE_IOC_SHM_ALLOC, arg)
    return uapi.ShmAllocData.unpack(arg).id


def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``cond`` every 10 ms until it holds or ``timeout`` seconds pass."""
    ev = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if cond():
            return True
        ev.wait(0.01)
    return cond()


class InvokeThread(threading.Thread):
    """A client thread blocked in OBJECT_INVOKE while the test plays the supplicant."""

    def __init__(
        self, ctx: Context, mem: CheckedMemory, obj_id: int, op: int, params: list[uapi.Param]
    ) -> None:
        super().__init__(daemon=True)
        self.args_ = (ctx, mem, obj_id, op, params)
        self.result: InvokeResult | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.result = raw_invoke(*self.args_)
        except BaseException as exc:  # reported by outcome()
            self.error = exc

    def outcome(self, timeout: float = 5.0) -> InvokeResult:
        """Join and return (header, params); re-raise what the invoke raised."""
        self.join(timeout)
        assert not self.is_alive(), "OBJECT_INVOKE still blocked"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


CRED = Credentials({CredentialKey.UID: 1000, CredentialKey.SYSTEM_TIME: 5}).encode()


class RawSupplicant:
    """Serves one credentials object (user id 1) over SUPPL_RECV/SEND, like libqcomtee."""

    def __init__(self, ctx: Context, mem: CheckedMemory) -> None:
        self.ctx, self.mem = ctx, mem
        self.releases: list[int] = []
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self) -> None:
        scratch = bytearray(1024)
        while True:
            block = recv_block(self.mem.map(scratch), 1024, 5)
            try:
                self.ctx.ioctl(uapi.TEE_IOC_SUPPL_RECV, buf_arg(self.mem, block))
            except DriverError:
                return
            head = uapi.SuppRecvArg.unpack(block)
            p = uapi.unpack_params(block, uapi.SuppRecvArg.SIZE, head.num_params)
            if head.func == RELEASE:
                self.releases.append(p[0].a)
                continue
            reply: list[uapi.Param] = [uapi.Param(META_OUT, p[0].b)]
            if head.func == 0:  # getLength
                data = bytearray(struct.pack("<Q", len(CRED)))
                reply.append(uapi.Param(UB_OUT, self.mem.map(data), 8))
            else:  # readAtOffset
                (off,) = struct.unpack("<Q", self.mem.read(p[1].a, 8))
                data = bytearray(CRED[off : off + p[2].b])
                reply += [p[1], uapi.Param(UB_OUT, self.mem.map(data), len(data))]
            self.ctx.ioctl(uapi.TEE_IOC_SUPPL_SEND, buf_arg(self.mem, send_block(0, reply)))

    def stop(self) -> None:
        """After the context is closed: the loop's RECV fails and the thread ends."""
        self.thread.join(5)
        assert not self.thread.is_alive()


def eventually(cond: Callable[[], object], timeout: float = 5.0) -> bool:
    """Poll ``cond`` every 5 ms until it is true or ``timeout`` seconds pass; its last
    truth (a wait on another thread or process, bounded)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.005)
    return bool(cond())
