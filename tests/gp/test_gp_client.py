"""The GP TEE Client API (libteec's behaviour, optee.md §1) over the OP-TEE device (§2, §4).

Every test drives :class:`qtee.gp.TeecContext` against an ``OpteeDevice`` in front of a
secure world running Python GP TAs, and checks ``TEEC_Result`` codes and origins exactly.
The fixture asserts that nothing leaked: no session, instance, shm id or secure object on
the device, and nothing left pinned in the checked address space.

The session rules both TEEs share (open/invoke/close, values, temp and registered memrefs,
short buffers, origins, panics, busy, threads) are tests/gp/test_gp_suite.py's, run over
both devices; this file keeps what libteec over the OP-TEE device alone shows: choosing the
device, the ioctl errno mapping, logins, masked capabilities, registration and shadows,
cancellation's ioctls, finalize.
"""

from __future__ import annotations

import errno
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from typing import ClassVar

import pytest

from objects import DriverError, UsageError
from qtee import OpteeDevice, uapi
from qtee.addrspace import CheckedMemory
from qtee.gp import (
    SIZE_MAX,
    TEE_CLIENT_UUID_NS,
    Cred,
    GpTransport,
    OpteeTransport,
    TaFlag,
    TeecContext,
    TeecError,
    TeecLogin,
    TeecOperation,
    TeecOrigin,
    TeecParamType,
    TeecRegisteredMemoryReference,
    TeecResult,
    TeecSession,
    TeecSharedMemory,
    TeecTempMemoryReference,
    TeecValue,
    param_types,
)
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

R = TeecResult
API = TeecOrigin.TEEC_ORIGIN_API
COMMS = TeecOrigin.TEEC_ORIGIN_COMMS
TEE = TeecOrigin.TEEC_ORIGIN_TEE
TA = TeecOrigin.TEEC_ORIGIN_TRUSTED_APP
IN = 1
OUT = 2
T = TeecParamType
NONE = T.TEEC_NONE
VI, VO, VIO = T.TEEC_VALUE_INPUT, T.TEEC_VALUE_OUTPUT, T.TEEC_VALUE_INOUT
TI, TO, TIO = T.TEEC_MEMREF_TEMP_INPUT, T.TEEC_MEMREF_TEMP_OUTPUT, T.TEEC_MEMREF_TEMP_INOUT
WHOLE = T.TEEC_MEMREF_WHOLE
PIO = T.TEEC_MEMREF_PARTIAL_INOUT
SINGLE = TaFlag.TA_FLAG_SINGLE_INSTANCE
MULTI = TaFlag.TA_FLAG_MULTI_SESSION
GROUP = 2000

# ParamTA commands
VALUES, ECHO, FILL, UPPER, DESCRIBE, WHO, WAIT, COUNT = range(8)
DATA = b"0123456789"


def _fill(p: GpParam) -> None:
    """The short-buffer idiom (§1.4): required size in ``size`` and SHORT_BUFFER."""
    if p.buffer is None or p.size < len(DATA):
        p.size = len(DATA)
        raise GpTaError(R.TEEC_ERROR_SHORT_BUFFER)
    p.buffer[: len(DATA)] = DATA
    p.size = len(DATA)


class ParamTA(GpTA):
    """Multi-instance TA exercising every param kind."""

    UUID = uuid.UUID("a0c1e5e0-0000-4000-8000-000000000001")
    waiting: ClassVar[threading.Event] = threading.Event()

    def open_session(self, session: GpSession, types: int, params: list[GpParam]) -> None:
        session.context = session.client_uuid
        if types & 0xF == VIO:  # the open's operation is post-processed too
            params[0].a += 1
            if params[0].b == 0xDE:
                raise GpTaError(R.TEEC_ERROR_ACCESS_DENIED)

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
        p = params
        if cmd == VALUES:  # p0 VI, p1 VO, p2 VIO
            p[1].a, p[1].b = p[0].a + p[0].b, p[0].a * p[0].b
            p[2].a, p[2].b = p[2].a + 1, p[2].b + 1
            p[0].a = 0xBAD  # VALUE_INPUT is never written back
        elif cmd == ECHO:  # p0 memref in -> p1 memref out
            assert p[0].buffer is not None
            if p[1].buffer is None or p[1].size < p[0].size:
                p[1].size = p[0].size
                raise GpTaError(R.TEEC_ERROR_SHORT_BUFFER)
            p[1].buffer[: p[0].size] = p[0].buffer
            p[1].size = p[0].size
        elif cmd == FILL:
            _fill(p[0])
        elif cmd == UPPER:
            assert p[0].buffer is not None
            p[0].buffer[:] = bytes(p[0].buffer).upper()
        elif cmd == DESCRIBE:  # p1: (TEE type of p0, NULL?), p2: (size, first byte)
            p[1].a, p[1].b = types & 0xF, int(p[0].buffer is None)
            first = p[0].buffer[0] if p[0].buffer is not None and p[0].size else 0xFFFF
            p[2].a, p[2].b = p[0].size, first
        elif cmd == WHO:
            assert p[0].buffer is not None and isinstance(session.context, bytes)
            p[0].buffer[:16] = session.context
            p[0].size = 16
        elif cmd == WAIT:  # unmasked TEE_Wait(5000): returns its result
            self.unmask_cancellation()
            ParamTA.waiting.set()
            ret = self.wait(5000)
            if ret:
                raise GpTaError(ret)
        else:
            raise GpTaError(R.TEEC_ERROR_NOT_SUPPORTED)


class Gate:
    """Counts the INVOKE argument blocks the device reads (calls on their way in)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.reads = 0
        self.armed = False


class SharedTA(GpTA):
    """Single-instance multi-session TA: one instance behind every client session."""

    UUID = uuid.UUID("a0c1e5e0-0000-4000-8000-000000000003")
    FLAGS = SINGLE | MULTI
    gate: ClassVar[Gate | None] = None

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
        if cmd != COUNT:
            raise GpTaError(R.TEEC_ERROR_NOT_SUPPORTED)
        gate = SharedTA.gate
        if gate is not None and gate.armed:  # first call: every thread has sent its own
            gate.armed = False
            with gate.cond:
                gate.cond.wait_for(lambda: gate.reads >= 3, timeout=2)
        buf = params[0].buffer  # slice: u32 counter, then the thread's marker
        assert buf is not None
        (n,) = struct.unpack_from("<I", buf)
        struct.pack_into("<I", buf, 0, n + 1)
        buf[4:] = bytes([params[1].a]) * (len(buf) - 4)


INVOKE_BLOCK = uapi.InvokeArg.SIZE + 4 * 32  # libteec always sends 4 params


class GatedMemory(CheckedMemory):
    """CheckedMemory that tells the :class:`Gate` when the device reads an INVOKE block."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = Gate()

    def read(self, addr: int, size: int) -> bytes:
        data = super().read(addr, size)
        gate = self.gate
        if size == INVOKE_BLOCK:
            with gate.cond:
                gate.reads += 1
                gate.cond.notify_all()
        return data


class MaskedTransport(OpteeTransport):
    """The OP-TEE transport with some ``gen_caps`` hidden (a TEE without REG_MEM, ...)."""

    def __init__(self, dev: OpteeDevice, *, mask: int = 0, impl_id: int | None = None) -> None:
        super().__init__(dev.open(), dev.memory)
        self.mask = mask
        self.impl_id = impl_id
        self.cancels = 0
        self.fail_invoke: int | None = None

    def version(self) -> tuple[int, int, int]:
        impl_id, impl_caps, gen_caps = super().version()
        return self.impl_id or impl_id, impl_caps, gen_caps & ~self.mask

    def cancel(self, session: int, cancel_id: int) -> None:
        self.cancels += 1
        super().cancel(session, cancel_id)

    def invoke(
        self, session: int, func: int, cancel_id: int, params: list[uapi.Param]
    ) -> tuple[int, int, list[uapi.Param]]:
        if self.fail_invoke is not None:
            raise DriverError(self.fail_invoke, "injected")
        return super().invoke(session, func, cancel_id, params)


Env = tuple[OpteeDevice, GatedMemory]


@pytest.fixture
def env() -> Iterator[Env]:
    for cls in (ParamTA, SharedTA):
        register_gp_ta(cls)
    mem = GatedMemory()
    dev = OpteeDevice(
        SecureWorld(QteeRoot()),
        memory=mem,
        cred=lambda: Cred(euid=1000, egid=1000, groups=frozenset({GROUP})),
    )
    ParamTA.waiting.clear()
    yield dev, mem
    SharedTA.gate = None
    for cls in (ParamTA, SharedTA):
        unregister_gp_ta(cls.UUID)
    assert dev.leaks() == {}
    assert len(mem) == 0, "something is still pinned"


@pytest.fixture
def ctx(env: Env) -> Iterator[TeecContext]:
    with TeecContext(env[0]) as context:
        yield context


def masked(dev: OpteeDevice, mask: int) -> TeecContext:
    return TeecContext(MaskedTransport(dev, mask=mask))


def raises(code: int, origin: int) -> pytest.RaisesExc[TeecError]:
    return pytest.raises(TeecError, check=lambda e: (e.code, e.origin) == (code, origin))


def op(
    *params: TeecValue | TeecTempMemoryReference | TeecRegisteredMemoryReference | None,
    types: tuple[int, ...],
) -> TeecOperation:
    return TeecOperation(param_types(*types, *(NONE,) * (4 - len(types))), params)


def shm_count(dev: OpteeDevice) -> int:
    return len(dev.shm)


# ----------------------------------------------------------------------------- context


def test_initialize_by_name(env: Env) -> None:
    """§1.1 InitializeContext: NULL name or "optee-tz" (impl OP-TEE + TZ) finds the
    device and caches REG_MEM/MEMREF_NULL; any other name → ITEM_NOT_FOUND (origin API)
    and the device opened for the attempt is closed again."""
    dev, _ = env
    for name in (None, "optee-tz"):
        with TeecContext(dev, name) as ctx:
            assert (ctx.reg_mem, ctx.memref_null) == (True, True)
    for name in ("", "optee", "optee-tz "):
        with raises(R.TEEC_ERROR_ITEM_NOT_FOUND, API):
            TeecContext(dev, name)
    with raises(R.TEEC_ERROR_ITEM_NOT_FOUND, API):
        TeecContext(MaskedTransport(dev, impl_id=uapi.TEE_IMPL_ID_QTEE), "optee-tz")
    assert dev.contexts == set()


def test_initialize_tries_devices_in_order(env: Env) -> None:
    """§1.1: /dev/tee0..9 in order; a device without TEE_GEN_CAP_GP is skipped (and
    closed); none qualifies → ITEM_NOT_FOUND.  Caps are cached from the chosen one."""
    dev, _ = env
    no_gp = MaskedTransport(dev, mask=uapi.TEE_GEN_CAP_GP)
    other = MaskedTransport(dev, impl_id=uapi.TEE_IMPL_ID_QTEE)
    chosen = MaskedTransport(dev, mask=uapi.TEE_GEN_CAP_REG_MEM)
    with TeecContext([no_gp, other, chosen]) as ctx:  # name None: any GP TEE
        assert ctx.transport is other and no_gp.ctx.closed and not other.ctx.closed
    chosen.close()
    with raises(R.TEEC_ERROR_ITEM_NOT_FOUND, API):
        TeecContext([MaskedTransport(dev, mask=uapi.TEE_GEN_CAP_GP)])
    with TeecContext([MaskedTransport(dev, impl_id=3), dev], "optee-tz") as ctx:
        assert isinstance(ctx.transport, OpteeTransport)
        assert (ctx.reg_mem, ctx.memref_null) == (True, True)
    with masked(dev, uapi.TEE_GEN_CAP_REG_MEM | uapi.TEE_GEN_CAP_MEMREF_NULL) as ctx:
        assert (ctx.reg_mem, ctx.memref_null) == (False, False)
    assert isinstance(chosen, GpTransport) and dev.contexts == set()


def test_finalize_closes_sessions_and_shared_memory(env: Env) -> None:
    """§1.1 FinalizeContext: closing the fd closes every session still open on it and
    frees its shms; later Close/Release are no-ops; finalize is idempotent."""
    dev, mem = env
    ctx = TeecContext(dev)
    sessions = [ctx.open_session(ParamTA.UUID) for _ in range(2)]
    shm = ctx.allocate_shared_memory(32, IN | OUT)
    assert dev.leaks()["gp sessions"] == 2 and len(mem) == 1
    ctx.finalize()
    assert dev.leaks() == {} and len(mem) == 0
    assert [s.session_id for s in sessions] == [0, 0] and shm.released
    sessions[0].close()
    shm.release()
    ctx.finalize()
    with raises(R.TEEC_ERROR_GENERIC, COMMS):  # the fd is closed: EBADF
        sessions[1].invoke_command(VALUES)
    with raises(R.TEEC_ERROR_OUT_OF_MEMORY, API):
        ctx.allocate_shared_memory(8, IN)
    assert dev.leaks() == {} and len(mem) == 0


# ----------------------------------------------------------------------------- sessions


def test_ioctl_errno_mapping(env: Env) -> None:
    """§1.1: an ioctl failure → origin COMMS, ENOMEM → OUT_OF_MEMORY, EINVAL →
    BAD_PARAMETERS, anything else → GENERIC (EPERM: REE-kernel login from userspace)."""
    dev, _ = env
    transport = MaskedTransport(dev)
    with TeecContext(transport) as ctx:
        with raises(R.TEEC_ERROR_GENERIC, COMMS):
            ctx.open_session(ParamTA.UUID, login=TeecLogin.TEE_LOGIN_REE_KERNEL)
        session = ctx.open_session(ParamTA.UUID)
        for err, code in (
            (errno.ENOMEM, R.TEEC_ERROR_OUT_OF_MEMORY),
            (errno.EINVAL, R.TEEC_ERROR_BAD_PARAMETERS),
            (errno.EIO, R.TEEC_ERROR_GENERIC),
        ):
            transport.fail_invoke = err
            with raises(code, COMMS):
                session.invoke_command(
                    ECHO,
                    op(
                        TeecTempMemoryReference(bytearray(4)),
                        TeecTempMemoryReference(bytearray(4)),
                        types=(TI, TO),
                    ),
                )
        session.close()
        assert shm_count(dev) == 0  # the temporary shms went despite the failures
    assert dev.leaks() == {}


def test_login_methods(ctx: TeecContext) -> None:
    """§1.1/§2: PUBLIC → nil client UUID; USER → UUIDv5("uid=%x"); GROUP copies the gid
    into clnt_uuid → UUIDv5("gid=%x"), a group the caller is not in → EPERM → GENERIC
    (origin COMMS)."""
    cases = (
        (TeecLogin.TEEC_LOGIN_PUBLIC, None, bytes(16)),
        (TeecLogin.TEEC_LOGIN_USER, None, uuid.uuid5(TEE_CLIENT_UUID_NS, "uid=3e8").bytes),
        (TeecLogin.TEEC_LOGIN_GROUP, GROUP, uuid.uuid5(TEE_CLIENT_UUID_NS, "gid=7d0").bytes),
    )
    for login, data, expect in cases:
        who = bytearray(16)
        with ctx.open_session(ParamTA.UUID, login, data) as session:
            session.invoke_command(WHO, op(TeecTempMemoryReference(who), types=(TO,)))
        assert bytes(who) == expect
    with raises(R.TEEC_ERROR_GENERIC, COMMS):
        ctx.open_session(ParamTA.UUID, TeecLogin.TEEC_LOGIN_GROUP, 3000)
    with raises(R.TEEC_ERROR_BAD_PARAMETERS, API):
        ctx.open_session(ParamTA.UUID, TeecLogin.TEEC_LOGIN_GROUP)


# ----------------------------------------------------------------------------- temp memrefs


def test_temp_memrefs(env: Env, ctx: TeecContext) -> None:
    """§1.2: TEMP_INPUT/OUTPUT/INOUT go through a temporary shm per call, freed after it
    (no shm id and nothing pinned left); outputs come back with the TA's size."""
    dev, mem = env
    with ctx.open_session(ParamTA.UUID) as session:
        src = TeecTempMemoryReference(bytearray(b"hello"))
        dst = TeecTempMemoryReference(bytearray(8))
        session.invoke_command(ECHO, op(src, dst, types=(TI, TO)))
        assert dst.size == 5 and dst.buffer == bytearray(b"hello\0\0\0")
        assert shm_count(dev) == 0 and len(mem) == 0
        inout = TeecTempMemoryReference(bytearray(b"abcXYZ"), 3)  # only the first 3 bytes
        session.invoke_command(UPPER, op(inout, types=(TIO,)))
        assert inout.buffer == bytearray(b"ABCXYZ") and inout.size == 3
        with raises(R.TEEC_ERROR_BAD_PARAMETERS, API):  # Python only: size past the buffer
            session.invoke_command(
                UPPER, op(TeecTempMemoryReference(bytearray(2), 3), types=(TIO,))
            )
        with raises(R.TEEC_ERROR_BAD_PARAMETERS, API):  # an output into read-only memory
            session.invoke_command(
                FILL, op(TeecTempMemoryReference(memoryview(b"x" * 10)), types=(TO,))
            )
        assert shm_count(dev) == 0 and len(mem) == 0


@pytest.mark.parametrize("memref_null", [True, False])
def test_temp_null_memref(env: Env, memref_null: bool) -> None:
    """§1.2: a NULL temp memref of size 0 is TEE_MEMREF_NULL (the TA sees no buffer) with
    TEE_GEN_CAP_MEMREF_NULL, else a dummy 8-byte shm whose param says size 0; a NULL
    buffer with size ≠ 0 → BAD_PARAMETERS (origin API) before any ioctl."""
    dev, _ = env
    mask = 0 if memref_null else uapi.TEE_GEN_CAP_MEMREF_NULL
    with masked(dev, mask) as ctx, ctx.open_session(ParamTA.UUID) as session:
        assert ctx.memref_null is memref_null
        kind, info = TeecValue(), TeecValue()
        session.invoke_command(
            DESCRIBE, op(TeecTempMemoryReference(None), kind, info, types=(TI, VO, VO))
        )
        assert (kind.a, kind.b) == (5, int(memref_null)) and info.a == 0
        with raises(R.TEEC_ERROR_BAD_PARAMETERS, API):
            session.invoke_command(
                DESCRIBE, op(TeecTempMemoryReference(None, 4), kind, info, types=(TI, VO, VO))
            )
        assert shm_count(dev) == 0


# ----------------------------------------------------------------------------- registered


def test_shared_memory_allocate_register_release(env: Env, ctx: TeecContext) -> None:
    """§1.1: flags must be a non-empty subset of INPUT|OUTPUT and the buffer non-NULL,
    else BAD_PARAMETERS (origin API); size 0 → 8 bytes internally; SIZE_MAX →
    OUT_OF_MEMORY (xtest 5006); release is idempotent."""
    dev, mem = env
    for flags in (0, 4, IN | 4):
        with raises(R.TEEC_ERROR_BAD_PARAMETERS, API):
            ctx.allocate_shared_memory(8, flags)
        with raises(R.TEEC_ERROR_BAD_PARAMETERS, API):
            ctx.register_shared_memory(bytearray(8), flags)
    with raises(R.TEEC_ERROR_BAD_PARAMETERS, API):
        TeecSharedMemory.register(ctx, None, IN)  # type: ignore[arg-type]
    with raises(R.TEEC_ERROR_OUT_OF_MEMORY, API):
        ctx.allocate_shared_memory(SIZE_MAX, IN)
    empty = ctx.allocate_shared_memory(0, IN)
    assert (empty.size, empty.alloced_size, len(empty.buffer)) == (0, 8, 0)
    reg0 = ctx.register_shared_memory(bytearray(), OUT)  # 8 bytes of nothing: a shadow
    assert reg0.shadow is not None and (reg0.size, reg0.alloced_size) == (0, 8)
    reg3 = ctx.register_shared_memory(bytearray(b"abc"), OUT)  # in place
    assert reg3.shadow is None and reg3.alloced_size == 3
    assert shm_count(dev) == 3
    for shm in (empty, reg0, reg3, empty, reg0, reg3):
        shm.release()
    assert shm.released and shm_count(dev) == 0 and len(mem) == 0
    with pytest.raises(UsageError):
        _ = shm.buffer


def test_read_only_buffer_gets_a_shadow(ctx: TeecContext) -> None:
    """§1.1 RegisterSharedMemory: memory the kernel cannot register (read-only) falls
    back to a shadow copied in before each call; OUTPUT over read-only memory is
    BAD_PARAMETERS (origin API) here, where C would fault on the copy back."""
    with ctx.register_shared_memory(b"ro-data", IN) as shm, ctx.open_session(ParamTA.UUID) as s:
        assert shm.shadow is not None
        kind, info = TeecValue(), TeecValue()
        s.invoke_command(
            DESCRIBE, op(TeecRegisteredMemoryReference(shm), kind, info, types=(WHOLE, VO, VO))
        )
        assert (kind.a, info.a, info.b) == (5, 7, ord("r"))
    with raises(R.TEEC_ERROR_BAD_PARAMETERS, API):
        ctx.register_shared_memory(b"ro-data", IN | OUT)


def test_released_parent_is_bad_parameters(ctx: TeecContext) -> None:
    """A released TEEC_SharedMemory has id -1; using it is BAD_PARAMETERS (origin API)
    here instead of libteec's undefined behaviour (its c would read as TEE_MEMREF_NULL)."""
    shm = ctx.allocate_shared_memory(8, IN)
    shm.release()
    with ctx.open_session(ParamTA.UUID) as session, raises(R.TEEC_ERROR_BAD_PARAMETERS, API):
        session.invoke_command(DESCRIBE, op(TeecRegisteredMemoryReference(shm), types=(WHOLE,)))


def test_parent_of_another_context_is_einval(env: Env, ctx: TeecContext) -> None:
    """§2: a memref's shm id resolves in the caller's context: another fd's shm → EINVAL
    → BAD_PARAMETERS, origin COMMS."""
    dev, _ = env
    with (
        TeecContext(dev) as other,
        other.allocate_shared_memory(8, IN) as theirs,
        ctx.open_session(ParamTA.UUID) as session,
        raises(R.TEEC_ERROR_BAD_PARAMETERS, COMMS),
    ):
        session.invoke_command(DESCRIBE, op(TeecRegisteredMemoryReference(theirs), types=(WHOLE,)))


# ----------------------------------------------------------------------------- cancellation


def test_request_cancellation_wakes_an_unmasked_wait(env: Env) -> None:
    """§1.1/§2: RequestCancellation of an operation in an invoke → TEE_IOC_CANCEL → the
    TA's unmasked TEE_Wait(5000) returns TEE_ERROR_CANCEL at once (origin TRUSTED_APP)."""
    dev, _ = env
    transport = MaskedTransport(dev)
    with TeecContext(transport) as ctx, ctx.open_session(ParamTA.UUID) as session:
        operation = TeecOperation(0)
        ctx.request_cancellation(operation)  # never used by an invoke: nothing is sent
        assert transport.cancels == 0
        errors: list[TeecError] = []

        def run() -> None:
            try:
                session.invoke_command(WAIT, operation)
            except TeecError as exc:
                errors.append(exc)

        thread = threading.Thread(target=run)
        start = time.monotonic()
        thread.start()
        assert ParamTA.waiting.wait(5)
        ctx.request_cancellation(operation)
        thread.join(5)
        assert not thread.is_alive() and time.monotonic() - start < 2
        assert [(e.code, e.origin) for e in errors] == [(R.TEEC_ERROR_CANCEL, TA)]
        assert transport.cancels == 1


def test_open_session_cannot_be_cancelled(env: Env) -> None:
    """§1.1: OpenSession never records the operation's session, so cancelling an
    operation used only to open sends nothing."""
    dev, _ = env
    transport = MaskedTransport(dev)
    with TeecContext(transport) as ctx:
        operation = op(TeecValue(1), types=(VIO,))
        with ctx.open_session(ParamTA.UUID, operation=operation):
            ctx.request_cancellation(operation)
        assert transport.cancels == 0


# ----------------------------------------------------------------------------- concurrency


@pytest.mark.parametrize(
    "registered",
    [
        pytest.param(True, id="registered"),
        pytest.param(False, id="allocated"),
    ],
)
def test_threads_share_one_partial_inout_memref(env: Env, registered: bool) -> None:
    """Issue acceptance (§1.2 PARTIAL, §4.1 MULTI_SESSION, §4.3): three threads, each with
    its own session on one single-instance multi-session TA, update their own slice of
    one PARTIAL_INOUT shared memory 30 times: every update survives, no leak.
    "registered": REG_MEM, the client's bytearray registered in place (the first call
    waits until all three calls are in flight, so they always overlap); "allocated": a
    TEE without REG_MEM (SHM_ALLOC)."""
    dev, mem = env
    loops, width = 30, 64
    ctx = masked(dev, 0 if registered else uapi.TEE_GEN_CAP_REG_MEM)
    buf = bytearray(3 * width)
    shm = ctx.register_shared_memory(buf, IN | OUT)
    if registered:
        assert shm.shadow is None
        SharedTA.gate = mem.gate
        mem.gate.reads = 0  # count the calls from now on
        mem.gate.armed = True
    opened = threading.Barrier(3, timeout=5)
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            with ctx.open_session(SharedTA.UUID) as session:
                opened.wait()
                for _ in range(loops):
                    ref = TeecRegisteredMemoryReference(shm, k * width, width)
                    session.invoke_command(COUNT, op(ref, TeecValue(0xA0 + k), types=(PIO, VI)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads), "deadlock"
    try:
        assert errors == []
        for k in range(3):
            window = bytes(shm.buffer[k * width : (k + 1) * width])
            assert struct.unpack_from("<I", window)[0] == loops, f"slice {k}"
            assert window[4:] == bytes([0xA0 + k]) * (width - 4)
    finally:
        shm.release()
        ctx.finalize()


def test_session_close_is_thread_safe(ctx: TeecContext) -> None:
    """§1.1 CloseSession: closing one session from several threads sends one close."""
    session: TeecSession = ctx.open_session(ParamTA.UUID)
    threads = [threading.Thread(target=session.close) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert session.session_id == 0
