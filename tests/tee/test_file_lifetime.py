"""An fd's errors and lifetime under hostile use (issue 13, points 1-4).

* SHM_ALLOC of any size fails with an errno, never another exception, and a failed
  SHM_ALLOC leaves nothing (no buffer, no memory file, no id): ``tee_ioctl_shm_alloc``
  -> ``tee_dyn_shm_alloc_helper`` -> ``alloc_pages_exact`` (torvalds/linux
  ``drivers/tee/tee_shm.c``, ``drivers/tee/qcomtee/shm.c``), ENOMEM past the largest
  page order.
* An ioctl whose struct cannot be written back is EFAULT before anything happens.
* Closing an fd while calls are in flight: the kernel releases a ``struct file`` only
  after its last ioctl returns (``tee_release`` -> ``close_context``, qtee-kernel.md
  §2.3, §4.5), so whatever a call in flight makes is torn down with the rest.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
import uuid
from pathlib import Path

import pytest

import qtee
from objects import DriverError, op
from qtee import Device, OpteeDevice, uapi
from qtee._tee.shm import SHM_MAX, memfd_backing, private_backing
from qtee.addrspace import CheckedMemory
from qtee.secure import (
    GpParam,
    GpSession,
    GpTA,
    QteeRoot,
    SecureObject,
    SecureWorld,
    register_gp_ta,
    unregister_gp_ta,
)
from tests._helpers import (
    NULL,
    OBJ_IN,
    OBJ_OUT,
    TEE,
    InvokeThread,
    raw_invoke,
    release,
    shm_alloc,
    wait_until,
)

GATE_UID = 0x6A7E
_OPEN_HEAD = struct.Struct("<16s16s6I")  # struct tee_ioctl_open_session_arg


class Token(SecureObject):
    """What the gate hands out: a fresh secure object per call."""


class Gate(SecureObject):
    """op 0 waits until the test opens the gate, then returns a new secure object."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.open = threading.Event()

    @op(0, oo=1)
    def pass_through(self) -> SecureObject:
        self.entered.set()
        assert self.open.wait(10)
        return Token()


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _gate_device(memory: CheckedMemory) -> tuple[Device, Gate]:
    gate = Gate()
    return Device(SecureWorld(QteeRoot({GATE_UID: lambda env: gate})), memory=memory), gate


def _open_gate(ctx: object, mem: CheckedMemory) -> tuple[int, int]:
    """Client env (root op 2, NULL credentials) and the gate service: their fd ids."""
    _, p = raw_invoke(ctx, mem, NULL, 2, [uapi.Param(OBJ_IN, NULL), uapi.Param(OBJ_OUT)])  # type: ignore[arg-type]
    env = p[1].a
    uid = bytearray(struct.pack("<I", GATE_UID))
    _, p = raw_invoke(
        ctx,  # type: ignore[arg-type]
        mem,
        env,
        0,
        [
            uapi.Param(uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_INPUT, mem.map(uid), 4),
            uapi.Param(OBJ_OUT),
        ],
    )
    return env, p[1].a


# ---------------------------------------------------------------- point 1: any size


@pytest.mark.parametrize("backing", [private_backing, memfd_backing], ids=["private", "memfd"])
@pytest.mark.parametrize("size", [SHM_MAX + 1, 1 << 32, 1 << 47, 1 << 62, (1 << 64) - 1])
def test_shm_alloc_of_a_huge_size_is_enomem_and_makes_nothing(backing: object, size: int) -> None:
    """Issue 13 point 1: the kernel answers ENOMEM (``alloc_pages_exact`` cannot go past
    2**MAX_PAGE_ORDER pages); no MemoryError or OverflowError leaves ``ioctl``."""
    dev = Device(SecureWorld(QteeRoot()), shm_backing=backing)  # type: ignore[arg-type]
    ctx = dev.open()
    fds = _open_fds()
    arg = bytearray(uapi.ShmAllocData(size).pack())
    with pytest.raises(DriverError) as exc:
        ctx.ioctl(uapi.TEE_IOC_SHM_ALLOC, arg)
    assert exc.value.errno == errno.ENOMEM
    assert arg == uapi.ShmAllocData(size).pack()  # nothing written back
    assert _open_fds() == fds and len(dev.phys) == 0 and dev.leaks() == {}
    ctx.close()


def test_shm_alloc_of_the_largest_size_works() -> None:
    """SHM_MAX itself is allocated (4 MiB: 1024 pages of 4 KiB, page order 10)."""
    dev = Device(SecureWorld(QteeRoot()))
    ctx = dev.open()
    shm_id = shm_alloc(ctx, SHM_MAX)
    assert len(ctx.shm_view(shm_id)) == SHM_MAX
    ctx.shm_free(shm_id)
    ctx.close()


# ---------------------------------------------------------------- point 2: failures leave nothing


@pytest.mark.parametrize("backing", [private_backing, memfd_backing], ids=["private", "memfd"])
def test_a_failed_shm_alloc_keeps_no_memory_file_and_no_id(
    backing: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13 point 2: placing the shm in physical memory fails after its memory file
    was made and its id reserved; the file is closed and the id freed."""
    dev = Device(SecureWorld(QteeRoot()), shm_backing=backing)  # type: ignore[arg-type]
    ctx = dev.open()

    def full(buf: object) -> int:
        raise DriverError(errno.ENOMEM, "physical address space exhausted")

    monkeypatch.setattr(dev.phys, "add", full)
    fds = _open_fds()
    with pytest.raises(DriverError) as exc:
        shm_alloc(ctx, 4096)
    assert exc.value.errno == errno.ENOMEM
    assert _open_fds() == fds
    assert len(dev.shm.allocator) == 0 and dev.leaks() == {}
    monkeypatch.undo()
    assert shm_alloc(ctx, 4096) == 1  # the id was given back: lowest free again
    ctx.close()


def test_leaks_counts_a_reserved_shm_id() -> None:
    """A reserved id with no shm behind it is a leak too (``leaks()`` used to miss it)."""
    dev = Device(SecureWorld(QteeRoot()))
    ident = dev.shm.reserve()
    assert dev.leaks() == {"shm ids": 1}
    dev.shm.erase(ident)
    assert dev.leaks() == {}


# ---------------------------------------------------------------- point 3: unwritable args


@pytest.mark.parametrize(
    "make",
    [
        lambda data: memoryview(bytes(data)),
        lambda data: memoryview(bytearray(data)).cast("I"),
        lambda data: memoryview(bytearray(data))[::2],
    ],
    ids=["read-only", "u32 items", "strided"],
)
@pytest.mark.parametrize("cmd", ["TEE_IOC_SHM_ALLOC", "TEE_IOC_VERSION"])
def test_an_unwritable_struct_is_efault_before_anything_happens(make: object, cmd: str) -> None:
    """Issue 13 point 3: the struct is checked first (EFAULT), so SHM_ALLOC allocates
    nothing and no TypeError leaves ``ioctl``."""
    dev = Device(SecureWorld(QteeRoot()))
    ctx = dev.open()
    arg = make(uapi.ShmAllocData(4096).pack() + bytes(16))  # type: ignore[operator]
    with pytest.raises(DriverError) as exc:
        ctx.ioctl(getattr(uapi, cmd), arg)
    assert exc.value.errno == errno.EFAULT
    assert dev.leaks() == {} and len(dev.phys) == 0
    ctx.close()


def test_a_released_memoryview_is_efault() -> None:
    dev = Device(SecureWorld(QteeRoot()))
    ctx = dev.open()
    view = memoryview(bytearray(uapi.ShmAllocData(64).pack()))
    view.release()
    with pytest.raises(DriverError) as exc:
        ctx.ioctl(uapi.TEE_IOC_SHM_ALLOC, view)
    assert exc.value.errno == errno.EFAULT and dev.leaks() == {}
    ctx.close()


def test_a_read_only_buf_data_struct_is_enough() -> None:
    """OBJECT_INVOKE only reads its ``tee_ioctl_buf_data`` (the block it points at is
    written, not the struct): a read-only struct works, as with the kernel."""
    mem = CheckedMemory()
    dev = Device(SecureWorld(QteeRoot()), memory=mem)
    ctx = dev.open()
    block = bytearray(
        uapi.pack_arg(
            uapi.ObjectInvokeArg(NULL, 2, 0, 2), [uapi.Param(OBJ_IN, NULL), uapi.Param(OBJ_OUT)]
        )
    )
    arg = memoryview(uapi.BufData(mem.map(block), len(block)).pack())
    assert arg.readonly
    assert ctx.ioctl(uapi.TEE_IOC_OBJECT_INVOKE, arg) == 0
    _, params = uapi.unpack_arg(uapi.ObjectInvokeArg, block)
    assert params[1].b == TEE
    release(ctx, mem, params[1].a)
    ctx.close()


# ------------------------------------------------------- point 4: close with calls in flight


def test_an_invoke_that_returns_an_object_after_close_leaks_nothing() -> None:
    """Issue 13 point 4: the fd is closed while an invoke is in the TA; the TA then
    returns a new object.  The teardown waits for that invoke (the file is released after
    its last ioctl), so the new object is released with the rest."""
    mem = CheckedMemory()
    dev, gate = _gate_device(mem)
    ctx = dev.open()
    env, svc = _open_gate(ctx, mem)
    call = InvokeThread(ctx, mem, svc, 0, [uapi.Param(OBJ_OUT)])
    assert gate.entered.wait(5)
    ctx.close()
    assert ctx.closed and not ctx.life.released.is_set()  # held by the call in flight
    assert ctx in dev.contexts
    with pytest.raises(DriverError) as exc:  # the fd number is gone for new calls
        raw_invoke(ctx, mem, env, 0, [])
    assert exc.value.errno == errno.EBADF
    gate.open.set()
    head, params = call.outcome()
    assert head.ret == 0 and params[0].b == TEE  # the call itself completed
    assert ctx.life.released.wait(5)
    assert dev.leaks() == {}
    assert dev.world.live_ids() == []


def test_a_shm_alloc_racing_close_leaks_nothing() -> None:
    """Issue 13 point 4: SHM_ALLOC is making its buffer when the fd is closed; the shm
    it makes is freed by the teardown that runs when it returns."""
    inside = threading.Event()
    go_on = threading.Event()

    def slow_backing(size: int) -> tuple[bytearray, None]:
        inside.set()
        assert go_on.wait(10)
        return bytearray(size), None

    dev = Device(SecureWorld(QteeRoot()), shm_backing=slow_backing)  # type: ignore[arg-type]
    ctx = dev.open()
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(shm_alloc(ctx, 4096)))
    t.start()
    assert inside.wait(5)
    ctx.close()
    go_on.set()
    t.join(5)
    assert got == [1]  # the call completed as the kernel's would
    assert ctx.life.released.is_set()
    assert dev.leaks() == {} and len(dev.phys) == 0


def test_close_wakes_a_blocked_recv_and_the_teardown_follows() -> None:
    """A thread blocked in SUPPL_RECV returns EINTR at the close (what the signal that
    stops a supplicant thread does), and the teardown runs once it has left."""
    from tests._helpers import recv

    mem = CheckedMemory()
    dev = Device(SecureWorld(QteeRoot()), memory=mem)
    ctx = dev.open()
    errors: list[int] = []

    def receive() -> None:
        try:
            recv(ctx, mem)
        except DriverError as exc:
            errors.append(exc.errno)

    t = threading.Thread(target=receive)
    t.start()
    assert wait_until(lambda: ctx.life.in_flight == 1)
    ctx.close()
    t.join(5)
    assert errors == [errno.EINTR]
    assert ctx.life.released.wait(5) and dev.leaks() == {}


def test_abandon_tears_down_with_calls_in_flight_and_sweeps_as_they_leave() -> None:
    """A destroyed VM's kernel state goes at once (``Context.abandon``); an invoke still
    in the TA then returns an object into the dead fd, and its leaving sweeps it."""
    mem = CheckedMemory()
    dev, gate = _gate_device(mem)
    ctx = dev.open()
    _env, svc = _open_gate(ctx, mem)
    call = InvokeThread(ctx, mem, svc, 0, [uapi.Param(OBJ_OUT)])
    assert gate.entered.wait(5)
    ctx.abandon()
    assert ctx.life.released.is_set() and ctx not in dev.contexts
    gate.open.set()
    call.outcome()
    assert dev.leaks() == {} and dev.world.live_ids() == []


# ------------------------------------------------------- the OP-TEE device: the same rules

SLOW_UUID = uuid.UUID("5ee1a7e0-2450-11e4-abe2-0002a5d5c51b")


class SlowOpen(GpTA):
    """A TA whose open entry waits for the test."""

    UUID = SLOW_UUID
    entered = threading.Event()
    go_on = threading.Event()

    def open_session(self, session: GpSession, types: int, params: list[GpParam]) -> None:
        SlowOpen.entered.set()
        assert SlowOpen.go_on.wait(10)


def test_optee_open_session_returning_after_close_leaks_no_session() -> None:
    """Issue 13 point 4 on the OP-TEE device: a session opened by a call that returns
    after the close is closed by the teardown (the driver's release runs after the
    file's last ioctl), not left open in the TA."""
    SlowOpen.entered.clear()
    SlowOpen.go_on.clear()
    register_gp_ta(SlowOpen)
    try:
        mem = CheckedMemory()
        dev = OpteeDevice(SecureWorld(QteeRoot()), memory=mem)
        ctx = dev.open()
        block = bytearray(_OPEN_HEAD.pack(SLOW_UUID.bytes, bytes(16), 0, 0, 0, 0, 0, 0))
        arg = bytearray(uapi.BufData(mem.map(block), len(block)).pack())
        t = threading.Thread(target=ctx.ioctl, args=(uapi.TEE_IOC_OPEN_SESSION, arg))
        t.start()
        assert SlowOpen.entered.wait(5)
        ctx.close()
        assert not ctx.life.released.is_set()
        SlowOpen.go_on.set()
        t.join(5)
        session, ret = _OPEN_HEAD.unpack_from(block)[4:6]
        assert ret == 0 and session != 0  # the open itself succeeded
        assert ctx.life.released.wait(5)
        assert dev.leaks() == {}
    finally:
        unregister_gp_ta(SLOW_UUID)


@pytest.mark.parametrize("size", [SHM_MAX + 1, 1 << 32, 1 << 62])
def test_optee_shm_alloc_of_a_huge_size_is_enomem(size: int) -> None:
    """Issue 13 point 1 on the OP-TEE device (its dynamic pool takes pages the same way)."""
    dev = OpteeDevice(SecureWorld(QteeRoot()))
    ctx = dev.open()
    with pytest.raises(DriverError) as exc:
        ctx.ioctl(uapi.TEE_IOC_SHM_ALLOC, bytearray(uapi.ShmAllocData(size).pack()))
    assert exc.value.errno == errno.ENOMEM and dev.leaks() == {}
    with pytest.raises(DriverError) as exc:  # point 3: read-only struct, nothing made
        ctx.ioctl(uapi.TEE_IOC_SHM_ALLOC, memoryview(uapi.ShmAllocData(64).pack()))
    assert exc.value.errno == errno.EFAULT and dev.leaks() == {}
    ctx.close()


def test_a_client_hanging_up_mid_invoke_leaks_nothing_in_the_server(tmp_path: Path) -> None:
    """Issue 13 point 4 through the device server: the client's connection drops while
    its invoke is in the TA (the server closes that fd), and the TA then returns a new
    object; the server's fd teardown waits for the call and releases it."""
    from qtee import DeviceServer
    from qtee._remote.server import RegionMemory

    gate = Gate()
    dev = Device(
        SecureWorld(QteeRoot({GATE_UID: lambda env: gate})),
        memory=RegionMemory(),
        shm_backing=memfd_backing,
    )
    with DeviceServer(tmp_path / "qtee.sock", dev) as server:
        remote = qtee.connect(server.path)
        ctx = remote.open()
        _env, svc = _open_gate(ctx, remote.memory)
        errors: list[int] = []

        def call() -> None:
            try:
                raw_invoke(ctx, remote.memory, svc, 0, [uapi.Param(OBJ_OUT)])  # type: ignore[arg-type]
            except DriverError as exc:
                errors.append(exc.errno)

        t = threading.Thread(target=call)
        t.start()
        assert gate.entered.wait(5)
        ctx.sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-call
        t.join(5)
        assert errors == [errno.EBADF]
        (served,) = dev.contexts
        assert wait_until(lambda: served.closed)  # closed, but held by the call...
        assert served.life.in_flight == 1
        gate.open.set()  # ...which now returns a new object into the closed fd
        assert wait_until(lambda: dev.leaks() == {})
        assert dev.world.live_ids() == []
        ctx.close()
