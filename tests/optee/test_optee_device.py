"""The OP-TEE-flavoured device through raw ioctls (optee.md §2, §4; qtee-kernel.md §1.4).

Sessions of a GP TA written in Python are opened, invoked, cancelled and closed with the
kernel's structs; errors are checked errno for errno at the ioctl level and
(result, origin) for what the secure world answers.
"""

from __future__ import annotations

import errno
import os
import struct
import uuid
from collections.abc import Iterator

import pytest

from objects import DriverError
from qtee import OpteeContext, OpteeDevice, uapi
from qtee.addrspace import CheckedMemory
from qtee.gp import TEE_CLIENT_UUID_NS, Cred, TeecOrigin, TeecResult
from qtee.secure import (
    GpParam,
    GpSession,
    GpTA,
    GpTaError,
    QteeRoot,
    SecureWorld,
    register_gp_ta,
    unregister_gp_ta,
)

TA_UUID = uuid.UUID("8aaaf200-2450-11e4-abe2-0002a5d5c51b")
VALUE_IN, VALUE_OUT, VALUE_INOUT = 1, 2, 3
MEMREF_IN, MEMREF_OUT, MEMREF_INOUT = 5, 6, 7
OPEN_HEAD = struct.Struct("<16s16s6I")
INVOKE_HEAD = struct.Struct("<6I")
CMD_ADD, CMD_FILL, CMD_PANIC, CMD_WHO = 0, 1, 2, 3


class Sample(GpTA):
    """Multi-instance test TA: add two values, fill a memref (short buffer), panic."""

    UUID = TA_UUID

    def open_session(self, session: GpSession, types: int, params: list[GpParam]) -> None:
        session.context = session.client_uuid

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
        if cmd == CMD_ADD:
            params[1].a = params[0].a + params[0].b
        elif cmd == CMD_FILL:
            data = b"0123456789"
            if params[0].buffer is None or params[0].size < len(data):
                params[0].size = len(data)
                raise GpTaError(TeecResult.TEEC_ERROR_SHORT_BUFFER)
            params[0].buffer[: len(data)] = data
            params[0].size = len(data)
        elif cmd == CMD_PANIC:
            raise RuntimeError("TA panic")
        elif cmd == CMD_WHO:
            assert isinstance(session.context, bytes | uuid.UUID)
            raw = session.context if isinstance(session.context, bytes) else session.context.bytes
            params[0].buffer[:16] = raw  # type: ignore[index]
            params[0].size = 16
        else:
            raise GpTaError(TeecResult.TEEC_ERROR_NOT_SUPPORTED)


@pytest.fixture
def env() -> Iterator[tuple[OpteeDevice, OpteeContext, CheckedMemory]]:
    register_gp_ta(Sample)
    mem = CheckedMemory()
    dev = OpteeDevice(SecureWorld(QteeRoot()), memory=mem, cred=lambda: Cred(euid=1000, egid=1000))
    ctx = dev.open()
    yield dev, ctx, mem
    ctx.close()
    unregister_gp_ta(TA_UUID)
    assert dev.leaks() == {}


def _buf(mem: CheckedMemory, block: bytearray) -> bytearray:
    return bytearray(uapi.BufData(mem.map(block), len(block)).pack())


def open_session(
    ctx: OpteeContext,
    mem: CheckedMemory,
    ta: uuid.UUID = TA_UUID,
    login: int = 0,
    params: list[tuple[int, int, int, int]] | None = None,
) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    params = params if params is not None else [(0, 0, 0, 0)] * 4
    block = bytearray(OPEN_HEAD.pack(ta.bytes, bytes(16), login, 0, 0, 0, 0, len(params)))
    for p in params:
        block += struct.pack("<4Q", *p)
    ctx.ioctl(uapi.TEE_IOC_OPEN_SESSION, _buf(mem, block))
    head = OPEN_HEAD.unpack_from(block)
    back = [struct.unpack_from("<4Q", block, 56 + 32 * i) for i in range(len(params))]
    return head, back


def invoke(
    ctx: OpteeContext, mem: CheckedMemory, session: int, cmd: int, params: list[tuple[int, ...]]
) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    block = bytearray(INVOKE_HEAD.pack(cmd, session, 0, 0, 0, len(params)))
    for p in params:
        block += struct.pack("<4Q", *p)
    ctx.ioctl(uapi.TEE_IOC_INVOKE, _buf(mem, block))
    head = INVOKE_HEAD.unpack_from(block)
    back = [struct.unpack_from("<4Q", block, 24 + 32 * i) for i in range(len(params))]
    return head, back


def close_session(ctx: OpteeContext, session: int) -> None:
    ctx.ioctl(uapi.TEE_IOC_CLOSE_SESSION, bytearray(struct.pack("<I", session)))


def shm_alloc(ctx: OpteeContext, size: int) -> int:
    arg = bytearray(uapi.ShmAllocData(size).pack())
    ctx.ioctl(uapi.TEE_IOC_SHM_ALLOC, arg)
    return uapi.ShmAllocData.unpack(arg).id


def test_version_is_optee(env: tuple[OpteeDevice, OpteeContext, CheckedMemory]) -> None:
    """§2: impl id OP-TEE (1), OP-TEE caps TZ, gen caps GP | REG_MEM | MEMREF_NULL."""
    _, ctx, _ = env
    arg = bytearray(12)
    ctx.ioctl(uapi.TEE_IOC_VERSION, arg)
    assert struct.unpack("<3I", arg) == (1, 1, 0b1101)


def test_open_invoke_close(env: tuple[OpteeDevice, OpteeContext, CheckedMemory]) -> None:
    """§4.2/§4.3: a session opens with origin TRUSTED_APP on success; VALUE_OUTPUT a/b come
    back; close releases the session object."""
    dev, ctx, mem = env
    head, _ = open_session(ctx, mem)
    session, ret, origin = head[4], head[5], head[6]
    assert session != 0 and (ret, origin) == (0, TeecOrigin.TEEC_ORIGIN_TRUSTED_APP)
    assert dev.leaks() == {"gp sessions": 1, "gp instances": 1, "secure objects": 1,
                           "context 0 sessions": 1}  # fmt: skip
    head, back = invoke(
        ctx, mem, session, CMD_ADD, [(VALUE_IN, 40, 2, 0), (VALUE_OUT, 0, 0, 0), (0,) * 4, (0,) * 4]
    )
    assert head[3:5] == (0, TeecOrigin.TEEC_ORIGIN_TRUSTED_APP)
    assert back[1] == (VALUE_OUT, 42, 0, 0)
    close_session(ctx, session)
    assert dev.leaks() == {}


def test_unknown_uuid_is_item_not_found_from_tee(
    env: tuple[OpteeDevice, OpteeContext, CheckedMemory],
) -> None:
    """§4.2 step 3: unknown UUID → ITEM_NOT_FOUND, origin TEE, session 0."""
    _, ctx, mem = env
    head, _ = open_session(ctx, mem, ta=uuid.UUID(int=1))
    assert head[4:7] == (0, TeecResult.TEEC_ERROR_ITEM_NOT_FOUND, TeecOrigin.TEEC_ORIGIN_TEE)


def test_session_of_another_context_is_einval(
    env: tuple[OpteeDevice, OpteeContext, CheckedMemory],
) -> None:
    """§2: invoke, cancel and close check the session against the fd's own list: EINVAL."""
    dev, ctx, mem = env
    other = dev.open()
    try:
        session = open_session(ctx, mem)[0][4]
        block = bytearray(INVOKE_HEAD.pack(CMD_ADD, session, 0, 0, 0, 0))
        for cmd, arg in (
            (uapi.TEE_IOC_INVOKE, _buf(mem, block)),
            (uapi.TEE_IOC_CANCEL, bytearray(struct.pack("<2I", 0, session))),
            (uapi.TEE_IOC_CLOSE_SESSION, bytearray(struct.pack("<I", session))),
        ):
            with pytest.raises(DriverError) as exc:
                other.ioctl(cmd, arg)
            assert exc.value.errno == errno.EINVAL
        close_session(ctx, session)
        with pytest.raises(DriverError) as exc:  # closed: gone from the fd's list
            close_session(ctx, session)
        assert exc.value.errno == errno.EINVAL
        assert exc.value.detail == (
            f"session {session:#x} is not open on this context (closed, or never opened)"
        )
    finally:
        other.close()


def test_ree_kernel_login_from_userspace_is_eperm(
    env: tuple[OpteeDevice, OpteeContext, CheckedMemory],
) -> None:
    """§1.3/§2: a login in the REE-kernel range from userspace → EPERM, nothing opened."""
    dev, ctx, mem = env
    for login in (0x8000_0000, 0xBFFF_FFFF):
        with pytest.raises(DriverError) as exc:
            open_session(ctx, mem, login=login)
        assert exc.value.errno == errno.EPERM
    assert dev.leaks() == {}


def test_user_login_identity_is_uuid5_of_the_euid(
    env: tuple[OpteeDevice, OpteeContext, CheckedMemory],
) -> None:
    """§2 client UUID: USER → UUIDv5(ns, "uid=%x" of the euid); PUBLIC → nil UUID."""
    _, ctx, mem = env
    shm = shm_alloc(ctx, 16)
    for login, expect in (
        (1, uuid.uuid5(TEE_CLIENT_UUID_NS, "uid=3e8").bytes),
        (0, bytes(16)),
    ):
        session = open_session(ctx, mem, login=login)[0][4]
        _, back = invoke(ctx, mem, session, CMD_WHO, [(MEMREF_OUT, 0, 16, shm), *[(0,) * 4] * 3])
        assert back[0] == (MEMREF_OUT, 0, 16, shm)
        assert bytes(ctx.shm_view(shm)) == expect
        close_session(ctx, session)
    ctx.shm_free(shm)


def test_memref_short_buffer_size_comes_back(
    env: tuple[OpteeDevice, OpteeContext, CheckedMemory],
) -> None:
    """§1.4: the TA's required size reaches ``b`` even with SHORT_BUFFER; then it fits."""
    _, ctx, mem = env
    shm = shm_alloc(ctx, 64)
    session = open_session(ctx, mem)[0][4]
    head, back = invoke(ctx, mem, session, CMD_FILL, [(MEMREF_OUT, 8, 4, shm), *[(0,) * 4] * 3])
    assert head[3:5] == (TeecResult.TEEC_ERROR_SHORT_BUFFER, TeecOrigin.TEEC_ORIGIN_TRUSTED_APP)
    assert back[0] == (MEMREF_OUT, 8, 10, shm)
    head, back = invoke(ctx, mem, session, CMD_FILL, [(MEMREF_OUT, 8, 32, shm), *[(0,) * 4] * 3])
    assert head[3] == 0 and back[0] == (MEMREF_OUT, 8, 10, shm)
    assert bytes(ctx.shm_view(shm)[8:18]) == b"0123456789"
    close_session(ctx, session)
    ctx.shm_free(shm)


def test_memref_checks_are_einval(env: tuple[OpteeDevice, OpteeContext, CheckedMemory]) -> None:
    """§2 params_from_user: a shm of another context, or offset+size past the shm → EINVAL."""
    dev, ctx, mem = env
    other = dev.open()
    try:
        theirs = shm_alloc(other, 16)
        mine = shm_alloc(ctx, 16)
        session = open_session(ctx, mem)[0][4]
        for p in ((MEMREF_IN, 0, 4, theirs), (MEMREF_IN, 8, 9, mine), (8, 0, 0, 0)):
            with pytest.raises(DriverError) as exc:
                invoke(ctx, mem, session, CMD_ADD, [p, *[(0,) * 4] * 3])
            assert exc.value.errno == errno.EINVAL
        close_session(ctx, session)
        ctx.shm_free(mine)
    finally:
        other.close()


def test_panic_is_target_dead_then_a_fresh_instance(
    env: tuple[OpteeDevice, OpteeContext, CheckedMemory],
) -> None:
    """§4.4: a panic → TARGET_DEAD (origin TEE) now and on every later invoke of that
    session; close still works; a new open gets a fresh instance."""
    _, ctx, mem = env
    none4 = [(0,) * 4] * 4
    session = open_session(ctx, mem)[0][4]
    dead = (TeecResult.TEEC_ERROR_TARGET_DEAD, TeecOrigin.TEEC_ORIGIN_TEE)
    assert invoke(ctx, mem, session, CMD_PANIC, none4)[0][3:5] == dead
    assert invoke(ctx, mem, session, CMD_ADD, none4)[0][3:5] == dead
    close_session(ctx, session)
    fresh = open_session(ctx, mem)[0][4]
    head, back = invoke(
        ctx, mem, fresh, CMD_ADD, [(VALUE_IN, 1, 2, 0), (VALUE_OUT, 0, 0, 0), *[(0,) * 4] * 2]
    )
    assert head[3] == 0 and back[1][1] == 3
    close_session(ctx, fresh)


def test_closing_the_context_closes_its_sessions(
    env: tuple[OpteeDevice, OpteeContext, CheckedMemory],
) -> None:
    """§1.1 FinalizeContext: the kernel closes every session still open on the fd."""
    dev, _, mem = env
    ctx = dev.open()
    for _ in range(3):
        assert open_session(ctx, mem)[0][5] == 0
    assert dev.leaks()["gp sessions"] == 3
    ctx.close()
    assert dev.leaks() == {}
    with pytest.raises(DriverError) as exc:
        open_session(ctx, mem)
    assert exc.value.errno == errno.EBADF


def test_default_cred_is_the_process(tmp_path: object) -> None:
    """The kernel reads the caller's credentials; by default, this process's."""
    dev = OpteeDevice(SecureWorld(QteeRoot()), memory=CheckedMemory())
    assert dev.cred() == Cred(
        euid=os.geteuid(), egid=os.getegid(), groups=frozenset(os.getgroups())
    )


SINGLE_UUID = uuid.UUID("cb3e5ba0-adf1-11e0-998b-0002a5d5c51b")
CMD_WAIT, CMD_COUNT = 10, 11


class Single(GpTA):
    """Single-instance, no MULTI_SESSION, KEEP_ALIVE: a counter that outlives sessions."""

    UUID = SINGLE_UUID
    FLAGS = 0b10100  # SINGLE_INSTANCE (bit 2) | INSTANCE_KEEP_ALIVE (bit 4)

    def create(self) -> None:
        self.count = 0

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
        if cmd == CMD_COUNT:
            self.count += 1
            params[0].a = self.count
        elif cmd == CMD_WAIT:
            self.unmask_cancellation()
            code = self.wait(5000)
            if code:
                raise GpTaError(code)


@pytest.fixture
def single(env: tuple[OpteeDevice, OpteeContext, CheckedMemory]) -> Iterator[None]:
    register_gp_ta(Single)
    yield
    env[0].runtime.unload(SINGLE_UUID)
    unregister_gp_ta(SINGLE_UUID)


def test_single_instance_second_open_is_busy(
    env: tuple[OpteeDevice, OpteeContext, CheckedMemory], single: None
) -> None:
    """§4.2 step 2: single-instance without MULTI_SESSION and already open → BUSY, origin
    TEE, session 0; KEEP_ALIVE keeps the instance (and its state) past its last session."""
    _, ctx, mem = env
    none4 = [(0,) * 4] * 4
    first = open_session(ctx, mem, ta=SINGLE_UUID)[0][4]
    head, _ = open_session(ctx, mem, ta=SINGLE_UUID)
    assert head[4:7] == (0, TeecResult.TEEC_ERROR_BUSY, TeecOrigin.TEEC_ORIGIN_TEE)
    assert invoke(ctx, mem, first, CMD_COUNT, [(VALUE_OUT, 0, 0, 0), *none4[:3]])[1][0][1] == 1
    close_session(ctx, first)
    again = open_session(ctx, mem, ta=SINGLE_UUID)[0][4]
    assert invoke(ctx, mem, again, CMD_COUNT, [(VALUE_OUT, 0, 0, 0), *none4[:3]])[1][0][1] == 2
    close_session(ctx, again)


def test_cancel_ioctl_wakes_a_waiting_ta(
    env: tuple[OpteeDevice, OpteeContext, CheckedMemory], single: None
) -> None:
    """§2 cancel path: TEE_IOC_CANCEL on a session whose TA waits with cancellation
    unmasked → the invoke returns TEE_ERROR_CANCEL (origin TRUSTED_APP) promptly."""
    import threading
    import time

    _, ctx, mem = env
    session = open_session(ctx, mem, ta=SINGLE_UUID)[0][4]
    got: list[tuple[int, ...]] = []
    t = threading.Thread(
        target=lambda: got.append(invoke(ctx, mem, session, CMD_WAIT, [(0,) * 4] * 4)[0])
    )
    t0 = time.monotonic()
    t.start()
    time.sleep(0.05)
    ctx.ioctl(uapi.TEE_IOC_CANCEL, bytearray(struct.pack("<2I", 0, session)))
    t.join(5)
    assert not t.is_alive() and time.monotonic() - t0 < 2
    assert got[0][3:5] == (TeecResult.TEEC_ERROR_CANCEL, TeecOrigin.TEEC_ORIGIN_TRUSTED_APP)
    close_session(ctx, session)


def test_closed_session_and_separate_instances(
    env: tuple[OpteeDevice, OpteeContext, CheckedMemory],
) -> None:
    """§4.3: invoking a closed session → EINVAL from the driver (the id left the fd's
    list; OP-TEE is never reached); §4.2: a multi-instance TA gets one instance per
    session, so two sessions are two instances."""
    dev, ctx, mem = env
    a = open_session(ctx, mem)[0][4]
    b = open_session(ctx, mem)[0][4]
    assert dev.leaks()["gp instances"] == 2
    close_session(ctx, a)
    with pytest.raises(DriverError) as exc:
        invoke(ctx, mem, a, CMD_ADD, [(0,) * 4] * 4)
    assert exc.value.errno == errno.EINVAL
    close_session(ctx, b)
