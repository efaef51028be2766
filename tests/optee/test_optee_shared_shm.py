"""Registered shared memory is shared: the TA works on the client's pages, no copy.

In OP-TEE a registered shm is the client's own pages, pinned by the kernel at
SHM_REGISTER and mapped into the TA for each call, so concurrent calls on one buffer see
each other's writes.  The kernel pins them for writing: memory not mapped writable fails
the registration.  Sources:

* linux ``gregkh/linux:drivers/tee/tee_shm.c@04532034ebf839a097ce46429b283de6cc971217``
  (``tee_shm_register_user_buf``: ``iov_iter_ubuf(ITER_DEST)``, pages pinned for
  writing; ``register_shm_helper``: no page pinned gives GUP's error (EFAULT for a
  read-only or unmapped range), only some pinned gives ENOMEM);
* ``../shared/spec/optee.md`` §2 (memref params name a shm by id; offset ``a``, size ``b``).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import struct
import threading
import uuid
from collections.abc import Iterator

import pytest

from objects import DriverError
from qtee import OpteeContext, OpteeDevice, uapi
from qtee.addrspace import AddressSpace, CheckedMemory, ProcessMemory, SharedSpace, address_of
from qtee.gp import (
    Cred,
    TeecContext,
    TeecOperation,
    TeecParamType,
    TeecRegisteredMemoryReference,
    TeecTempMemoryReference,
    param_types,
)
from qtee.secure import GpParam, GpSession, GpTA, QteeRoot, SecureWorld

MEMREF_INOUT = 7
INVOKE_HEAD = struct.Struct("<6I")
OPEN_HEAD = struct.Struct("<16s16s6I")
CMD_A, CMD_B = 1, 2


class Racer(GpTA):
    """Call A writes byte 0, waits until call B (which writes byte 5) has returned, then
    writes byte 10."""

    UUID = uuid.UUID("5a4ed000-0000-4000-8000-00000000a510")
    a_in = threading.Event()
    b_done = threading.Event()

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
        buf = params[0].buffer
        assert buf is not None
        if cmd == CMD_A:
            buf[0] = 0xA0
            Racer.a_in.set()
            assert Racer.b_done.wait(5), "call B never ran"
            buf[10] = 0xA1
        else:
            buf[5] = 0xB5


class _CopyOnly:
    """An address space that cannot lend pages (a device server's client memory, say)."""

    def __init__(self, inner: CheckedMemory) -> None:
        self.inner = inner

    def check(self, addr: int, size: int) -> None:
        self.inner.check(addr, size)

    def read(self, addr: int, size: int) -> bytes:
        return self.inner.read(addr, size)

    def write(self, addr: int, data: bytes) -> None:
        self.inner.write(addr, data)

    def pin(self, buf: bytes | bytearray) -> int:
        return self.inner.pin(buf)

    def unpin(self, addr: int) -> None:
        self.inner.unpin(addr)


def _device(memory: AddressSpace) -> OpteeDevice:
    world = SecureWorld(QteeRoot())
    world.tas.register_gp(Racer)
    Racer.a_in.clear()
    Racer.b_done.clear()
    return OpteeDevice(world, memory=memory, cred=lambda: Cred(euid=1000, egid=1000))


def _call(ctx: OpteeContext, memory: AddressSpace, cmd: int, block: bytearray) -> bytearray:
    """An ioctl whose arg is a buf_data naming ``block`` in ``memory``."""
    addr = memory.pin(block)
    try:
        ctx.ioctl(cmd, bytearray(uapi.BufData(addr, len(block)).pack()))
    finally:
        memory.unpin(addr)
    return block


def _open(ctx: OpteeContext, memory: AddressSpace) -> int:
    block = bytearray(OPEN_HEAD.pack(Racer.UUID.bytes, bytes(16), 0, 0, 0, 0, 0, 0))
    head = OPEN_HEAD.unpack_from(_call(ctx, memory, uapi.TEE_IOC_OPEN_SESSION, block))
    assert head[5] == 0, head
    return int(head[4])


def _invoke(ctx: OpteeContext, memory: AddressSpace, session: int, cmd: int, shm: int) -> int:
    block = bytearray(INVOKE_HEAD.pack(cmd, session, 0, 0, 0, 1))
    block += struct.pack("<4Q", MEMREF_INOUT, 0, 16, shm)
    return int(INVOKE_HEAD.unpack_from(_call(ctx, memory, uapi.TEE_IOC_INVOKE, block))[3])


def _register(ctx: OpteeContext, addr: int, length: int) -> int:
    arg = bytearray(uapi.ShmRegisterData(addr, length).pack())
    ctx.ioctl(uapi.TEE_IOC_SHM_REGISTER, arg)
    return uapi.ShmRegisterData.unpack(arg).id


def _race(ctx: OpteeContext, memory: AddressSpace, shm: int) -> None:
    """Call A (in a thread) and, while it is in the TA, the whole of call B, each in its
    own session, on one 16-byte memref."""
    sessions = [_open(ctx, memory), _open(ctx, memory)]
    rets: list[int] = []
    thread = threading.Thread(
        target=lambda: rets.append(_invoke(ctx, memory, sessions[0], CMD_A, shm))
    )
    thread.start()
    try:
        assert Racer.a_in.wait(5), "call A never reached the TA"
        assert _invoke(ctx, memory, sessions[1], CMD_B, shm) == 0
    finally:
        Racer.b_done.set()
        thread.join(10)
    assert not thread.is_alive(), "deadlock"
    assert rets == [0]
    for s in sessions:
        ctx.ioctl(uapi.TEE_IOC_CLOSE_SESSION, bytearray(struct.pack("<I", s)))


EXPECTED = bytes([0xA0, 0, 0, 0, 0, 0xB5, 0, 0, 0, 0, 0xA1]) + bytes(5)


@pytest.mark.parametrize("where", ["process-raw", "process-pinned", "checked"])
def test_concurrent_calls_on_one_registered_buffer_lose_nothing(where: str) -> None:
    """Issue 16 point 4 (tee_shm.c ``tee_shm_register_user_buf``: the shm is the user's
    pinned pages): call A writes byte 0, waits for B, writes byte 10; call B writes byte
    5 meanwhile.  Every write lands (a per-call copy written back would undo byte 5).
    "process-raw": real memory reached through /proc/self/maps checks; "process-pinned":
    a buffer pinned in ProcessMemory; "checked": a CheckedMemory mapping."""
    memory: AddressSpace
    raw = ctypes.create_string_buffer(16)
    buf = bytearray(16)
    if where == "checked":
        memory = CheckedMemory()
        addr = memory.pin(buf)
    else:
        memory = ProcessMemory()
        addr = address_of(raw) if where == "process-raw" else memory.pin(buf)
    dev = _device(memory)
    ctx = dev.open()
    try:
        shm = _register(ctx, addr, 16)
        _race(ctx, memory, shm)
        seen = raw.raw if where == "process-raw" else bytes(buf)
        assert seen == EXPECTED
        ctx.shm_free(shm)
    finally:
        ctx.close()
        if where != "process-raw":
            memory.unpin(addr)
    assert dev.leaks() == {}


def test_allocated_shm_is_shared_too() -> None:
    """Issue 16 point 4: an allocated shm's pages are the TA's view as well (tee_shm.c
    ``tee_shm_alloc_user_buf``): the same race loses nothing."""
    memory = CheckedMemory()
    dev = _device(memory)
    ctx = dev.open()
    try:
        arg = bytearray(uapi.ShmAllocData(16).pack())
        ctx.ioctl(uapi.TEE_IOC_SHM_ALLOC, arg)
        shm = uapi.ShmAllocData.unpack(arg).id
        _race(ctx, memory, shm)
        assert bytes(ctx.shm_view(shm)) == EXPECTED
        ctx.shm_free(shm)
    finally:
        ctx.close()
    assert dev.leaks() == {}


def test_space_that_cannot_lend_pages_copies_and_writes_back() -> None:
    """The known departure (a space that is no SharedSpace, as a device server's client
    memory): registration checks the range is mapped, each call copies its window in and
    writes the changed range back, so a single call's writes still arrive."""
    inner = CheckedMemory()
    memory = _CopyOnly(inner)
    assert not isinstance(memory, SharedSpace)
    buf = bytearray(16)
    addr = inner.pin(buf)
    dev = _device(memory)
    ctx = dev.open()
    try:
        with pytest.raises(DriverError) as exc:
            _register(ctx, addr + 4096, 16)  # the guard page: unmapped
        assert exc.value.errno == errno.EFAULT
        shm = _register(ctx, addr, 16)
        session = _open(ctx, memory)
        assert _invoke(ctx, memory, session, CMD_B, shm) == 0
        assert buf[5] == 0xB5
        ctx.ioctl(uapi.TEE_IOC_CLOSE_SESSION, bytearray(struct.pack("<I", session)))
        ctx.shm_free(shm)
    finally:
        ctx.close()
        inner.unpin(addr)
    assert dev.leaks() == {}


# ----------------------------------------------------------------------------- errno
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PAGE = mmap.PAGESIZE


@pytest.fixture
def pages() -> Iterator[int]:
    """Three fresh pages: read-write, read-only, then unmapped."""
    addr = _libc.mmap(
        None,
        3 * PAGE,
        mmap.PROT_READ | mmap.PROT_WRITE,
        mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
        -1,
        0,
    )
    assert addr not in (None, ctypes.c_void_p(-1).value)
    assert _libc.mprotect(addr + PAGE, PAGE, mmap.PROT_READ) == 0
    assert _libc.munmap(addr + 2 * PAGE, PAGE) == 0
    yield addr
    assert _libc.munmap(addr, 2 * PAGE) == 0


@pytest.mark.parametrize(
    ("offset", "length", "code"),
    [
        (PAGE, 16, errno.EFAULT),  # read-only (mmap PROT_READ): FOLL_WRITE pins nothing
        (2 * PAGE, 16, errno.EFAULT),  # unmapped
        (PAGE - 8, 16, errno.ENOMEM),  # the read-write page pins, the read-only one not
        (0, 3 * PAGE, errno.ENOMEM),
    ],
    ids=["read-only", "unmapped", "half-read-only", "runs-into-unmapped"],
)
def test_registering_memory_not_mapped_writable(
    pages: int, offset: int, length: int, code: int
) -> None:
    """tee_shm.c ``register_shm_helper``: the range is pinned for writing; no page pinned
    is GUP's EFAULT (read-only or unmapped memory), a short pin is ENOMEM.  Nothing is
    left registered; the writable page itself registers."""
    dev = _device(ProcessMemory())
    ctx = dev.open()
    try:
        with pytest.raises(DriverError) as exc:
            _register(ctx, pages + offset, length)
        assert exc.value.errno == code
        assert dev.leaks() == {}
        shm = _register(ctx, pages, PAGE)
        ctx.shm_free(shm)
    finally:
        ctx.close()
    assert dev.leaks() == {}


def test_checked_memory_registration_errno() -> None:
    """The same rules in a CheckedMemory: ``bytes`` are read-only (EFAULT), a range past a
    buffer's end pins only its leading part (ENOMEM), a writable buffer registers."""
    memory = CheckedMemory()
    ro = memory.pin(b"read-only bytes!")
    rw = memory.pin(bytearray(16))
    dev = _device(memory)
    ctx = dev.open()
    try:
        for addr, length, code in ((ro, 16, errno.EFAULT), (rw, 17, errno.ENOMEM)):
            with pytest.raises(DriverError) as exc:
                _register(ctx, addr, length)
            assert exc.value.errno == code
        ctx.shm_free(_register(ctx, rw, 16))
    finally:
        ctx.close()
        memory.unpin(ro)
        memory.unpin(rw)
    assert dev.leaks() == {}


class Peeker(GpTA):
    """Writes byte 0 of its memref and records what the client's own buffer shows then."""

    UUID = uuid.UUID("5a4ed000-0000-4000-8000-00000000a511")
    client: bytearray = bytearray()
    seen = -1

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
        assert params[0].buffer is not None
        params[0].buffer[0] = 0x77
        Peeker.seen = Peeker.client[0]


@pytest.mark.parametrize("kind", ["temporary", "registered"])
def test_temporary_memrefs_stay_copied(kind: str) -> None:
    """libteec's ``teec_pre_process_tmpref``/``teec_post_process_tmpref`` put a temporary
    memref in a shm of its own, copied in before and back after the call: the client's
    buffer changes only after it.  A registered memref is the client's buffer: the TA's
    write shows there at once.  Source:
    OP-TEE/optee_client:libteec/src/tee_client_api.c@27888d73d156d4862c07effce7c8c2455774768b
    """
    memory = CheckedMemory()
    world = SecureWorld(QteeRoot())
    world.tas.register_gp(Peeker)
    dev = OpteeDevice(world, memory=memory, cred=lambda: Cred(euid=1000, egid=1000))
    Peeker.client = bytearray(8)
    Peeker.seen = -1
    inout = TeecParamType.TEEC_MEMREF_TEMP_INOUT
    with TeecContext(dev) as ctx, ctx.open_session(Peeker.UUID) as session:
        if kind == "temporary":
            ref = TeecTempMemoryReference(Peeker.client)
            session.invoke_command(0, TeecOperation(param_types(inout, 0, 0, 0), [ref]))
        else:
            with ctx.register_shared_memory(Peeker.client, 3) as shm:
                whole = TeecParamType.TEEC_MEMREF_WHOLE
                reg = TeecRegisteredMemoryReference(shm)
                session.invoke_command(0, TeecOperation(param_types(whole, 0, 0, 0), [reg]))
    assert Peeker.seen == (0 if kind == "temporary" else 0x77)
    assert Peeker.client[0] == 0x77
    assert dev.leaks() == {} and len(memory) == 0
