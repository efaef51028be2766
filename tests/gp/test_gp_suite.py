"""The GP session rules as one suite over both TEEs (optee.md §1-§4, issue 5 acceptance).

Every scenario runs twice through the same :class:`qtee.gp.TeecContext` code: once over
:class:`~qtee.gp.OpteeTransport` (the OP-TEE device's raw ioctls, argument blocks in a
checked address space) and once over :class:`~qtee.gp._qtee_transport.QteeGpTransport`
(``IGPAppClient`` / ``IGPSession`` objects of a ``qtee.Device`` through a
``qtee.Client``).  Test bodies never look at which one they got; where the TEEs differ
(REG_MEM) they ask the context's capabilities, as libteec does.  Teardown finalizes the
context and checks both devices' tables: ``OpteeDevice.leaks()`` here, ``Device.leaks()``
through the suite-wide conftest check, and the GP runtime's sessions and instances for
both.

:func:`test_every_teec_result` then reaches every ``TeecResult`` member through the GP
API on the OP-TEE device (where the supplicant paths exist), with its exact
``(code, origin)``.  A code that only a TA can produce says ``ta-returned`` in its id.
"""

from __future__ import annotations

import os
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import ClassVar

import pytest

from qtee import (
    TEE_DATA_FLAG_ACCESS_READ,
    TEE_DATA_FLAG_ACCESS_WRITE,
    TEE_DATA_FLAG_ACCESS_WRITE_META,
    Device,
    OpteeDevice,
    TrustedStorage,
    trusted_storage,
    uapi,
)
from qtee._optee.supp import attach_rpc
from qtee.addrspace import CheckedMemory
from qtee.client import Client
from qtee.gp import (
    SIZE_MAX,
    Cred,
    OpteeTransport,
    TaFlag,
    TeecContext,
    TeecError,
    TeecOperation,
    TeecOrigin,
    TeecParamType,
    TeecRegisteredMemoryReference,
    TeecResult,
    TeecSession,
    TeecTempMemoryReference,
    TeecValue,
    param_types,
)
from qtee.gp._qtee_transport import QteeGpTransport
from qtee.secure import (
    GpParam,
    GpSession,
    GpTA,
    GpTaError,
    QteeRoot,
    SecureWorld,
    install_gp_app_client,
    register_gp_ta,
    unregister_gp_ta,
)
from qtee.secure._gp import GpRuntime
from supplicant import OpteeSupplicant

R = TeecResult
API = TeecOrigin.TEEC_ORIGIN_API
COMMS = TeecOrigin.TEEC_ORIGIN_COMMS
TEE = TeecOrigin.TEEC_ORIGIN_TEE
TA = TeecOrigin.TEEC_ORIGIN_TRUSTED_APP
IN, OUT = 1, 2
T = TeecParamType
NONE = T.TEEC_NONE
VI, VO, VIO = T.TEEC_VALUE_INPUT, T.TEEC_VALUE_OUTPUT, T.TEEC_VALUE_INOUT
TI, TO, TIO = T.TEEC_MEMREF_TEMP_INPUT, T.TEEC_MEMREF_TEMP_OUTPUT, T.TEEC_MEMREF_TEMP_INOUT
WHOLE = T.TEEC_MEMREF_WHOLE
PI, PO, PIO = T.TEEC_MEMREF_PARTIAL_INPUT, T.TEEC_MEMREF_PARTIAL_OUTPUT, T.TEEC_MEMREF_PARTIAL_INOUT
SINGLE = TaFlag.TA_FLAG_SINGLE_INSTANCE
MULTI = TaFlag.TA_FLAG_MULTI_SESSION
KEEP_ALIVE = TaFlag.TA_FLAG_INSTANCE_KEEP_ALIVE
GROUP = 2000

# SuiteTA / SharedTA / KeepTA commands
VALUES, ECHO, FILL, UPPER, DESCRIBE, COUNT, PANIC, WAIT, RETURN, STORE = range(10)
DATA = b"0123456789"
UNKNOWN_UUID = uuid.UUID("5e17e5e0-0000-4000-8000-0000000000ff")
UNLOADED_UUID = uuid.UUID("5e17e5e0-0000-4000-8000-0000000000fe")  # only a file, if at all


# ----------------------------------------------------------------------------- TAs


class Counting(GpTA):
    """Instance state: a counter made in ``create`` (so a fresh instance restarts it)."""

    def create(self) -> None:
        self.count = 0

    def _count(self, p: GpParam) -> None:
        self.count += 1
        p.a = self.count


class SuiteTA(Counting):
    """Multi-instance TA exercising every param kind (one instance per session)."""

    UUID = uuid.UUID("5e17e5e0-0000-4000-8000-000000000001")
    waiting: ClassVar[threading.Event] = threading.Event()

    def open_session(self, session: GpSession, types: int, params: list[GpParam]) -> None:
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
        elif cmd == FILL:  # p0 memref out (short-buffer idiom); p1 VO set whatever happens
            p[1].a, p[1].b = 0xAB, len(DATA)
            if p[0].buffer is None or p[0].size < len(DATA):
                p[0].size = len(DATA)
                raise GpTaError(R.TEEC_ERROR_SHORT_BUFFER)
            p[0].buffer[: len(DATA)] = DATA
            p[0].size = len(DATA)
        elif cmd == UPPER:
            assert p[0].buffer is not None
            p[0].buffer[:] = bytes(p[0].buffer).upper()
        elif cmd == DESCRIBE:  # p1: (TEE type of p0, NULL?), p2: (size, first byte)
            p[1].a, p[1].b = types & 0xF, int(p[0].buffer is None)
            first = p[0].buffer[0] if p[0].buffer is not None and p[0].size else 0xFFFF
            p[2].a, p[2].b = p[0].size, first
        elif cmd == COUNT:
            self._count(p[0])
        elif cmd == PANIC:
            raise RuntimeError("SuiteTA panics on purpose")
        elif cmd == WAIT:  # unmasked TEE_Wait(5000): returns its result
            self.unmask_cancellation()
            SuiteTA.waiting.set()
            ret = self.wait(5000)
            if ret:
                raise GpTaError(ret)
        elif cmd == RETURN:  # return the code in p0.a (what any TA may do)
            raise GpTaError(p[0].a)
        else:
            raise GpTaError(R.TEEC_ERROR_NOT_SUPPORTED)


class SharedTA(Counting):
    """Single-instance multi-session: one instance (one counter) behind every session."""

    UUID = uuid.UUID("5e17e5e0-0000-4000-8000-000000000002")
    FLAGS = SINGLE | MULTI

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
        if cmd == COUNT:
            self._count(params[0])
        elif cmd == PANIC:
            raise RuntimeError("SharedTA panics on purpose")
        else:
            raise GpTaError(R.TEEC_ERROR_NOT_SUPPORTED)


class KeepTA(SharedTA):
    """Single-instance keep-alive: the instance outlives its last session."""

    UUID = uuid.UUID("5e17e5e0-0000-4000-8000-000000000003")
    FLAGS = SINGLE | MULTI | KEEP_ALIVE


class SoloTA(GpTA):
    """Single-instance without MULTI_SESSION: one session at a time."""

    UUID = uuid.UUID("5e17e5e0-0000-4000-8000-000000000004")
    FLAGS = SINGLE


class DefaultTA(GpTA):
    """No entry points of its own: GpTA's default invoke answers NOT_SUPPORTED."""

    UUID = uuid.UUID("5e17e5e0-0000-4000-8000-000000000005")


class StoreTA(GpTA):
    """Runs the test's script on its trusted storage inside an invoke (errors propagate)."""

    UUID = uuid.UUID("5e17e5e0-0000-4000-8000-000000000006")
    script: ClassVar[Callable[[TrustedStorage], object] | None] = None

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
        script = StoreTA.script
        if cmd != STORE or script is None:
            raise GpTaError(R.TEEC_ERROR_NOT_SUPPORTED)
        script(trusted_storage(self))


TAS: tuple[type[GpTA], ...] = (SuiteTA, SharedTA, KeepTA, SoloTA, DefaultTA, StoreTA)


@pytest.fixture
def tas() -> Iterator[None]:
    for cls in TAS:
        register_gp_ta(cls)
    SuiteTA.waiting.clear()
    StoreTA.script = None
    yield
    StoreTA.script = None
    for cls in TAS:
        unregister_gp_ta(cls.UUID)


# ----------------------------------------------------------------------------- helpers


def raises(code: int, origin: int) -> pytest.RaisesExc[TeecError]:
    return pytest.raises(TeecError, check=lambda e: (e.code, e.origin) == (code, origin))


def op(
    *params: TeecValue | TeecTempMemoryReference | TeecRegisteredMemoryReference | None,
    types: tuple[int, ...],
) -> TeecOperation:
    return TeecOperation(param_types(*types, *(NONE,) * (4 - len(types))), params)


def count(session: TeecSession) -> int:
    value = TeecValue()
    session.invoke_command(COUNT, op(value, types=(VO,)))
    return value.a


def outcome(call: Callable[[], object]) -> tuple[int, int]:
    """``(TEEC_Result, origin)`` of a GP call: its TeecError, or SUCCESS with the origin
    it returned (an int origin, or a session's)."""
    try:
        got = call()
    except TeecError as exc:
        return exc.code, exc.origin
    origin = got.origin if isinstance(got, TeecSession) else got
    if isinstance(got, TeecSession):
        got.close()
    assert isinstance(origin, int)
    return R.TEEC_SUCCESS, origin


def join_all(threads: list[threading.Thread], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "deadlock: a thread did not finish"


# ----------------------------------------------------------------------------- the rig


@dataclass
class Rig:
    """One GP client over one TEE, and the secure world's GP runtime behind it."""

    ctx: TeecContext
    runtime: GpRuntime
    teardown: list[Callable[[], None]] = field(default_factory=list)


def _optee_rig() -> Rig:
    mem = CheckedMemory()
    dev = OpteeDevice(
        SecureWorld(QteeRoot()),
        memory=mem,
        cred=lambda: Cred(euid=1000, egid=1000, groups=frozenset({GROUP})),
    )
    ctx = TeecContext(OpteeTransport(dev.open(), dev.memory))
    rig = Rig(ctx, dev.runtime)

    def check() -> None:
        assert dev.leaks() == {}
        assert len(mem) == 0, "something is still pinned"

    rig.teardown.append(check)
    return rig


def _qtee_rig() -> Rig:
    world = SecureWorld(QteeRoot())
    install_gp_app_client(world)
    dev = Device(world)
    client = Client(dev, workers=1)
    with client.client_env() as env:
        ctx = TeecContext(QteeGpTransport(client, env))
    rig = Rig(ctx, world.gp)  # type: ignore[attr-defined]

    def check() -> None:
        client.close()
        assert dev.leaks() == {}  # the conftest checks it again after every fixture

    rig.teardown.append(check)
    return rig


@pytest.fixture(params=["optee", "qtee"])
def rig(request: pytest.FixtureRequest, tas: None) -> Iterator[Rig]:
    """A TeecContext over the OP-TEE device or over IGPAppClient on the QTEE device."""
    made = _optee_rig() if request.param == "optee" else _qtee_rig()
    yield made
    made.ctx.finalize()
    made.runtime.unload(KeepTA.UUID)
    assert made.runtime.live() == {"sessions": 0, "instances": 0}
    for step in made.teardown:
        step()


# ----------------------------------------------------------------------------- sessions


def test_open_invoke_close(rig: Rig) -> None:
    """§1.1/§1.3: open → origin TRUSTED_APP (xtest 1009); invoke returns TRUSTED_APP;
    close releases session and instance; close is idempotent."""
    session = rig.ctx.open_session(SuiteTA.UUID)
    assert session.session_id and session.origin == TA
    assert rig.runtime.live() == {"sessions": 1, "instances": 1}
    assert session.invoke_command(COUNT, op(TeecValue(), types=(VO,))) == TA
    session.close()
    assert session.session_id == 0 and rig.runtime.live() == {"sessions": 0, "instances": 0}
    session.close()


def test_open_session_operation_is_post_processed(rig: Rig) -> None:
    """§1.1 OpenSession: the operation's outputs come back whenever the TEE answered,
    even with an error (the TA's code, origin TRUSTED_APP); no session is left."""
    value = TeecValue(10, 0)
    with rig.ctx.open_session(SuiteTA.UUID, operation=op(value, types=(VIO,))):
        assert value.a == 11
    value = TeecValue(20, 0xDE)
    with raises(R.TEEC_ERROR_ACCESS_DENIED, TA):
        rig.ctx.open_session(SuiteTA.UUID, operation=op(value, types=(VIO,)))
    assert value.a == 21
    assert rig.runtime.live() == {"sessions": 0, "instances": 0}


def test_values(rig: Rig) -> None:
    """§1.2: VALUE_INPUT is never written back, OUTPUT and INOUT are."""
    with rig.ctx.open_session(SuiteTA.UUID) as session:
        vi, vo, vio = TeecValue(6, 7), TeecValue(0xFF, 0xFF), TeecValue(1, 2)
        assert session.invoke_command(VALUES, op(vi, vo, vio, types=(VI, VO, VIO))) == TA
        assert (vi.a, vi.b, vo.a, vo.b, vio.a, vio.b) == (6, 7, 13, 42, 2, 3)
        big = TeecValue(0xFFFF_FFFF, 0xFFFF_FFFF)  # u32 wrap on the TA side
        session.invoke_command(VALUES, op(TeecValue(), TeecValue(), big, types=(VI, VO, VIO)))
        assert (big.a, big.b) == (0, 0)


def test_temp_memrefs(rig: Rig) -> None:
    """§1.2: TEMP_INPUT/OUTPUT/INOUT through a temporary shm per call; the size comes back;
    a NULL temp memref of size 0 reaches the TA as no buffer (both TEEs have
    MEMREF_NULL), a NULL buffer with a size is BAD_PARAMETERS (origin API)."""
    assert rig.ctx.memref_null
    with rig.ctx.open_session(SuiteTA.UUID) as session:
        src = TeecTempMemoryReference(bytearray(b"hello"))
        dst = TeecTempMemoryReference(bytearray(8))
        session.invoke_command(ECHO, op(src, dst, types=(TI, TO)))
        assert dst.size == 5 and dst.buffer == bytearray(b"hello\0\0\0")
        inout = TeecTempMemoryReference(bytearray(b"abcXYZ"), 3)  # only the first 3 bytes
        session.invoke_command(UPPER, op(inout, types=(TIO,)))
        assert inout.buffer == bytearray(b"ABCXYZ") and inout.size == 3
        kind, info = TeecValue(), TeecValue()
        null = TeecTempMemoryReference(None)
        session.invoke_command(DESCRIBE, op(null, kind, info, types=(TI, VO, VO)))
        assert (kind.a, kind.b, info.a) == (5, 1, 0)
        with raises(R.TEEC_ERROR_BAD_PARAMETERS, API):
            session.invoke_command(
                DESCRIBE, op(TeecTempMemoryReference(None, 4), kind, info, types=(TI, VO, VO))
            )


def test_whole_memref(rig: Rig) -> None:
    """§1.2 WHOLE: offset 0, size = the parent's, direction from the parent's flags
    (INPUT → TEE type 5, OUTPUT → 6, both → 7).  A registered buffer is shared in place
    with REG_MEM, else through a shadow copied in (if INPUT) and out (if OUTPUT)."""
    ctx = rig.ctx
    with ctx.open_session(SuiteTA.UUID) as session:
        for flags, tee_type in ((IN, 5), (OUT, 6), (IN | OUT, 7)):
            with ctx.register_shared_memory(bytearray(b"wxyz"), flags) as shm:
                assert (shm.shadow is None) is ctx.reg_mem
                kind, info = TeecValue(), TeecValue()
                ref = TeecRegisteredMemoryReference(shm, offset=3, size=1)  # ignored
                session.invoke_command(DESCRIBE, op(ref, kind, info, types=(WHOLE, VO, VO)))
                seen = ord("w") if ctx.reg_mem or flags & IN else 0
                assert (kind.a, info.a, info.b) == (tee_type, 4, seen)
        buf = bytearray(b"abcdef")
        with ctx.register_shared_memory(buf, IN | OUT) as shm:
            session.invoke_command(UPPER, op(TeecRegisteredMemoryReference(shm), types=(WHOLE,)))
            assert bytes(shm.buffer) == b"ABCDEF" == bytes(buf)
        with ctx.allocate_shared_memory(16, IN | OUT) as shm:
            ref = TeecRegisteredMemoryReference(shm)
            session.invoke_command(FILL, op(ref, TeecValue(), types=(WHOLE, VO)))
            assert ref.size == 10 and bytes(shm.buffer) == DATA + bytes(6)


def test_partial_memrefs(rig: Rig) -> None:
    """§1.2 PARTIAL: the TA sees exactly the window (TEE types 5/6/7); INOUT round-trips
    only the window."""
    ctx = rig.ctx
    buf = bytearray(b"abcdefghij")
    with (
        ctx.open_session(SuiteTA.UUID) as session,
        ctx.register_shared_memory(buf, IN | OUT) as shm,
    ):
        for ptype, tee_type in ((PI, 5), (PO, 6), (PIO, 7)):
            kind, info = TeecValue(), TeecValue()
            ref = TeecRegisteredMemoryReference(shm, 2, 3)
            session.invoke_command(DESCRIBE, op(ref, kind, info, types=(ptype, VO, VO)))
            assert (kind.a, info.a) == (tee_type, 3)
            if ptype != PO:
                assert info.b == ord("c")
        ref = TeecRegisteredMemoryReference(shm, 2, 3)
        session.invoke_command(UPPER, op(ref, types=(PIO,)))
        assert bytes(shm.buffer) == b"abCDEfghij" == bytes(buf) and ref.size == 3
        # Two windows of one parent in one call: [0, 3) in, [6, 10) out.
        src, dst = (
            TeecRegisteredMemoryReference(shm, 0, 3),
            TeecRegisteredMemoryReference(shm, 6, 4),
        )
        session.invoke_command(ECHO, op(src, dst, types=(PI, PO)))
        assert bytes(shm.buffer) == b"abCDEfabCj" == bytes(buf) and dst.size == 3


def test_registered_memref_parent_flags_and_bounds(rig: Rig) -> None:
    """§1.2: PARTIAL past the parent or overflowing size_t, a parent without the needed
    flag, a WHOLE on a parent without flags, an unknown type nibble → BAD_PARAMETERS,
    origin API, before any ioctl (no temporary shm survives)."""
    ctx = rig.ctx
    session = ctx.open_session(SuiteTA.UUID)
    shm_in = ctx.allocate_shared_memory(16, IN)
    shm_out = ctx.allocate_shared_memory(16, OUT)
    bad = (
        (TeecRegisteredMemoryReference(shm_in, 8, 9), PI),
        (TeecRegisteredMemoryReference(shm_in, 17, 0), PI),
        (TeecRegisteredMemoryReference(shm_in, SIZE_MAX, 2), PI),
        (TeecRegisteredMemoryReference(shm_in, 0, 4), PO),
        (TeecRegisteredMemoryReference(shm_in, 0, 4), PIO),
        (TeecRegisteredMemoryReference(shm_out, 0, 4), PI),
        (TeecRegisteredMemoryReference(shm_out, 0, 4), PIO),
    )
    for ref, ptype in bad:
        with raises(R.TEEC_ERROR_BAD_PARAMETERS, API):
            session.invoke_command(
                DESCRIBE, op(TeecTempMemoryReference(bytearray(4)), ref, types=(TI, ptype))
            )
    ok = TeecRegisteredMemoryReference(shm_in, 16, 0)  # an empty window at the end is fine
    session.invoke_command(DESCRIBE, op(ok, TeecValue(), TeecValue(), types=(PI, VO, VO)))
    shm_out.flags = 0
    with raises(R.TEEC_ERROR_BAD_PARAMETERS, API):
        session.invoke_command(DESCRIBE, op(TeecRegisteredMemoryReference(shm_out), types=(WHOLE,)))
    with raises(R.TEEC_ERROR_BAD_PARAMETERS, API):
        session.invoke_command(DESCRIBE, TeecOperation(0x4, [None]))
    shm_in.release()
    shm_out.release()
    session.close()


def test_short_buffer(rig: Rig) -> None:
    """§1.4: with SHORT_BUFFER (origin TRUSTED_APP) the TA's size and output values come
    back whatever the code: {NULL, 0} asks the size; a too-small temp keeps its bytes
    (only MIN(returned, original) are copied); WHOLE/PARTIAL sizes are updated, a shadow
    is not copied back when the returned size is larger; then it fits."""
    ctx = rig.ctx
    with ctx.open_session(SuiteTA.UUID) as session:
        for buf in (None, bytearray(b"abcd")):
            ref, value = TeecTempMemoryReference(buf), TeecValue()
            with raises(R.TEEC_ERROR_SHORT_BUFFER, TA):
                session.invoke_command(FILL, op(ref, value, types=(TO, VO)))
            assert (ref.size, value.a, value.b) == (10, 0xAB, 10)
            assert ref.buffer == buf
        big = TeecTempMemoryReference(bytearray(16))
        session.invoke_command(FILL, op(big, TeecValue(), types=(TO, VO)))
        assert big.size == 10 and bytes(big.buffer or b"")[:10] == DATA
        with ctx.allocate_shared_memory(4, OUT) as shm:
            shm.buffer[:] = b"...."
            whole, value = TeecRegisteredMemoryReference(shm), TeecValue()
            with raises(R.TEEC_ERROR_SHORT_BUFFER, TA):
                session.invoke_command(FILL, op(whole, value, types=(WHOLE, VO)))
            assert (whole.size, value.a) == (10, 0xAB) and bytes(shm.buffer) == b"...."
        with ctx.allocate_shared_memory(32, IN | OUT) as shm:
            part = TeecRegisteredMemoryReference(shm, 8, 4)
            with raises(R.TEEC_ERROR_SHORT_BUFFER, TA):
                session.invoke_command(FILL, op(part, TeecValue(), types=(PO, VO)))
            assert part.size == 10
            part = TeecRegisteredMemoryReference(shm, 8, 16)
            session.invoke_command(FILL, op(part, TeecValue(), types=(PO, VO)))
            assert part.size == 10 and bytes(shm.buffer[8:18]) == DATA
            assert bytes(shm.buffer[:8]) == bytes(8) and bytes(shm.buffer[18:]) == bytes(14)


def test_unknown_uuid_is_item_not_found_from_tee(rig: Rig) -> None:
    """§4.2 step 3: an unknown UUID → ITEM_NOT_FOUND, origin TEE; nothing is left."""
    with raises(R.TEEC_ERROR_ITEM_NOT_FOUND, TEE):
        rig.ctx.open_session(UNKNOWN_UUID)
    assert rig.runtime.live() == {"sessions": 0, "instances": 0}


def test_ta_error_codes_have_origin_trusted_app(rig: Rig) -> None:
    """§1.3: whatever code a TA returns reaches the client as is, origin TRUSTED_APP,
    from an invoke and from an open entry (the GpTA default invoke: NOT_SUPPORTED)."""
    with rig.ctx.open_session(SuiteTA.UUID) as session:
        for code in sorted({int(c) for c in R} - {0} | {0x1234, 0xFFFF_FFFF}):
            with raises(code, TA):
                session.invoke_command(RETURN, op(TeecValue(code), types=(VI,)))
        assert count(session) == 1  # the session is still fine
    with rig.ctx.open_session(DefaultTA.UUID) as session, raises(R.TEEC_ERROR_NOT_SUPPORTED, TA):
        session.invoke_command(0)


def test_panic_kills_the_instance_for_every_session(rig: Rig) -> None:
    """§4.4: a panic → TARGET_DEAD (origin TEE) for that call and every later call on
    every session of that instance; close still works; the next open gets a fresh
    instance (its state restarts) while the old handles stay dead."""
    ctx = rig.ctx
    s1, s2 = ctx.open_session(SharedTA.UUID), ctx.open_session(SharedTA.UUID)
    assert (count(s1), count(s2)) == (1, 2)
    with raises(R.TEEC_ERROR_TARGET_DEAD, TEE):
        s2.invoke_command(PANIC)
    for s in (s1, s2, s1):
        with raises(R.TEEC_ERROR_TARGET_DEAD, TEE):
            count(s)
    s3 = ctx.open_session(SharedTA.UUID)
    assert count(s3) == 1 and count(s3) == 2
    assert rig.runtime.live() == {"sessions": 3, "instances": 2}
    with raises(R.TEEC_ERROR_TARGET_DEAD, TEE):
        count(s1)
    s1.close()
    s2.close()
    assert count(s3) == 3
    s3.close()
    # Multi-instance: the panic kills only its own session's instance.
    a, b = ctx.open_session(SuiteTA.UUID), ctx.open_session(SuiteTA.UUID)
    with raises(R.TEEC_ERROR_TARGET_DEAD, TEE):
        a.invoke_command(PANIC)
    with raises(R.TEEC_ERROR_TARGET_DEAD, TEE):
        count(a)
    assert count(b) == 1
    a.close()
    b.close()


def test_single_instance_without_multi_session_is_busy(rig: Rig) -> None:
    """§4.2 step 2: single-instance without MULTI_SESSION and a session open → BUSY,
    origin TEE; once it is closed a new open works."""
    first = rig.ctx.open_session(SoloTA.UUID)
    with raises(R.TEEC_ERROR_BUSY, TEE):
        rig.ctx.open_session(SoloTA.UUID)
    first.close()
    rig.ctx.open_session(SoloTA.UUID).close()


def test_instances_and_keep_alive(rig: Rig) -> None:
    """§4.1/§4.2: a multi-instance TA gets a new instance (separate state) per session; a
    single-instance multi-session TA shares one, gone with its last session unless
    INSTANCE_KEEP_ALIVE, which keeps its state across sessions -- but not across a
    panic without KEEP_CRASHED (§4.4)."""
    ctx = rig.ctx
    a, b = ctx.open_session(SuiteTA.UUID), ctx.open_session(SuiteTA.UUID)
    assert (count(a), count(a), count(b)) == (1, 2, 1)
    assert rig.runtime.live()["instances"] == 2
    a.close()
    b.close()
    a, b = ctx.open_session(SharedTA.UUID), ctx.open_session(SharedTA.UUID)
    assert (count(a), count(b), count(a)) == (1, 2, 3)
    a.close()
    b.close()
    with ctx.open_session(SharedTA.UUID) as a:  # a new instance: restarts
        assert count(a) == 1
    for expect in (1, 2, 3):
        with ctx.open_session(KeepTA.UUID) as k:
            assert count(k) == expect
        assert rig.runtime.live() == {"sessions": 0, "instances": 1}  # kept
    assert rig.runtime.unload(KeepTA.UUID)
    with ctx.open_session(KeepTA.UUID) as k:  # unloaded: fresh again
        assert count(k) == 1
        with raises(R.TEEC_ERROR_TARGET_DEAD, TEE):
            k.invoke_command(PANIC)
    with ctx.open_session(KeepTA.UUID) as k:  # a crashed kept instance is not kept (§4.4)
        assert count(k) == 1


def test_cancellation_of_a_waiting_ta(rig: Rig) -> None:
    """§1.1/§2: RequestCancellation of the operation of an invoke in progress → the TA's
    unmasked TEE_Wait(5000) returns CANCEL at once (origin TRUSTED_APP); cancelling an
    operation never used by an invoke sends nothing."""
    ctx = rig.ctx
    with ctx.open_session(SuiteTA.UUID) as session:
        operation = TeecOperation(0)
        ctx.request_cancellation(operation)  # never invoked: no-op
        got: list[tuple[int, int]] = []
        thread = threading.Thread(
            target=lambda: got.append(outcome(lambda: session.invoke_command(WAIT, operation)))
        )
        start = time.monotonic()
        thread.start()
        assert SuiteTA.waiting.wait(5)
        ctx.request_cancellation(operation)
        join_all([thread], 5)
        assert time.monotonic() - start < 2
        assert got == [(R.TEEC_ERROR_CANCEL, TA)]
        assert count(session) == 1  # the flag went with that entry


def test_closed_session_invoke_is_bad_parameters_from_comms(rig: Rig) -> None:
    """§4.3: after close the id is gone from the fd's list: the invoke's ioctl fails with
    EINVAL → BAD_PARAMETERS, origin COMMS (the TEE is never reached); temporary shms
    are freed all the same."""
    session = rig.ctx.open_session(SuiteTA.UUID)
    session.close()
    with raises(R.TEEC_ERROR_BAD_PARAMETERS, COMMS):
        session.invoke_command(FILL, op(TeecTempMemoryReference(bytearray(16)), types=(TO,)))
    with raises(R.TEEC_ERROR_BAD_PARAMETERS, COMMS):
        session.invoke_command(COUNT)


def test_finalize_closes_open_sessions(rig: Rig) -> None:
    """§1.1 FinalizeContext: closing the fd closes every session still open on it (the
    TA's close entries run, instances go) and frees its shms; later calls are no-ops or
    EBADF → GENERIC (origin COMMS)."""
    ctx = rig.ctx
    sessions = [ctx.open_session(SuiteTA.UUID), ctx.open_session(SharedTA.UUID)]
    sessions.append(ctx.open_session(SharedTA.UUID))
    shm = ctx.allocate_shared_memory(32, IN | OUT)
    assert rig.runtime.live() == {"sessions": 3, "instances": 2}
    ctx.finalize()
    assert rig.runtime.live() == {"sessions": 0, "instances": 0}
    assert [s.session_id for s in sessions] == [0, 0, 0] and shm.released
    sessions[0].close()
    shm.release()
    ctx.finalize()
    with raises(R.TEEC_ERROR_GENERIC, COMMS):
        sessions[1].invoke_command(COUNT)


def test_threads_open_panic_close(rig: Rig) -> None:
    """§4.4 (issue acceptance): 3 threads x 100 of open → panic → TARGET_DEAD (origin
    TEE) → close on one single-instance TA, in bounded time, no deadlock, no leak.  An
    open that binds to the instance another thread is killing gets TARGET_DEAD (origin
    TEE) too and is retried."""
    ctx = rig.ctx
    errors: list[BaseException] = []
    loops = 100

    def work() -> None:
        try:
            done = 0
            while done < loops:
                try:
                    session = ctx.open_session(SharedTA.UUID)
                except TeecError as exc:
                    assert (exc.code, exc.origin) == (R.TEEC_ERROR_TARGET_DEAD, TEE)
                    continue
                try:
                    got = outcome(partial(session.invoke_command, PANIC))
                    assert got == (R.TEEC_ERROR_TARGET_DEAD, TEE)
                finally:
                    session.close()
                done += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(3)]
    start = time.monotonic()
    for t in threads:
        t.start()
    join_all(threads, 20)
    assert errors == []
    assert time.monotonic() - start < 20
    assert rig.runtime.live() == {"sessions": 0, "instances": 0}


def test_threads_share_one_session(rig: Rig) -> None:
    """§4.3: invokes on one session from 3 threads serialise (the TA entry runs one at a
    time): no update is lost, no deadlock."""
    session = rig.ctx.open_session(SharedTA.UUID)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(50):
                count(session)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    join_all(threads, 10)
    assert errors == [] and count(session) == 151
    session.close()


# ----------------------------------------------------------------------------- every code


RW = TEE_DATA_FLAG_ACCESS_READ | TEE_DATA_FLAG_ACCESS_WRITE
ALL = RW | TEE_DATA_FLAG_ACCESS_WRITE_META
_HEAD = struct.Struct("<2I")
_PARAM = struct.Struct("<4Q")
_META = uapi.TEE_IOCTL_PARAM_ATTR_META


class Cov:
    """The OP-TEE device of the coverage test, with a supplicant when a case wants one."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.mem = CheckedMemory()
        self.dev = OpteeDevice(
            SecureWorld(QteeRoot()),
            memory=self.mem,
            cred=lambda: Cred(euid=1000, egid=1000, groups=frozenset({GROUP})),
        )
        self.ctx = TeecContext(self.dev)
        self.supp: OpteeSupplicant | None = None
        (tmp / "ta").mkdir()
        (tmp / "store").mkdir()

    def supplicant(self) -> OpteeSupplicant:
        if self.supp is None:
            self.supp = OpteeSupplicant(self.dev, self.tmp / "ta", self.tmp / "store", workers=2)
        return self.supp

    def store(self, script: Callable[[TrustedStorage], object]) -> int:
        """Run ``script`` on StoreTA's trusted storage in an invoke (through the API)."""
        StoreTA.script = script
        with self.ctx.open_session(StoreTA.UUID) as session:
            return session.invoke_command(STORE)

    def invoke(self, ta: type[GpTA], cmd: int, operation: TeecOperation | None = None) -> int:
        with self.ctx.open_session(ta.UUID) as session:
            return session.invoke_command(cmd, operation)

    def close(self) -> None:
        self.ctx.finalize()
        if self.supp is not None:
            self.supp.stop()
        self.dev.runtime.unload(KeepTA.UUID)
        assert self.dev.leaks() == {}
        assert len(self.mem) == 0


@pytest.fixture
def cov(tmp_path: Path, tas: None) -> Iterator[Cov]:
    made = Cov(tmp_path)
    yield made
    made.close()


def _success(c: Cov) -> object:
    return c.invoke(
        SuiteTA, VALUES, op(TeecValue(1, 2), TeecValue(), TeecValue(), types=(VI, VO, VIO))
    )


def _generic_ebadf(c: Cov) -> object:
    with TeecContext(c.dev) as other:
        session = other.open_session(SuiteTA.UUID)
    return session.invoke_command(COUNT)  # the fd is closed: EBADF


def _generic_eperm(c: Cov) -> object:
    return c.ctx.open_session(SuiteTA.UUID, login=2, connection_data=3000)  # not my group


def _access_denied(c: Cov) -> object:
    c.supplicant()
    (c.tmp / "elsewhere").mkdir()
    os.symlink(c.tmp / "elsewhere", c.tmp / "store" / str(StoreTA.UUID))
    return c.store(lambda st: st.create(b"obj", RW))


def _cancel(c: Cov) -> object:
    with c.ctx.open_session(SuiteTA.UUID) as session:
        operation = TeecOperation(0)
        got: list[tuple[int, int]] = []
        t = threading.Thread(
            target=lambda: got.append(outcome(lambda: session.invoke_command(WAIT, operation)))
        )
        t.start()
        assert SuiteTA.waiting.wait(5)
        c.ctx.request_cancellation(operation)
        join_all([t], 5)
    raise TeecError(*got[0])


def _access_conflict(c: Cov) -> object:
    c.supplicant()

    def script(st: TrustedStorage) -> None:
        st.create(b"obj", ALL).close()
        with_meta = st.open(b"obj", ALL)
        try:
            st.open(b"obj", TEE_DATA_FLAG_ACCESS_READ)  # WRITE_META is exclusive
        finally:
            with_meta.close()

    return c.store(script)


def _bad_parameters_api(c: Cov) -> object:
    with c.ctx.allocate_shared_memory(8, IN) as shm:
        ref = TeecRegisteredMemoryReference(shm, 4, 8)  # past the parent
        return c.invoke(SuiteTA, DESCRIBE, op(ref, types=(PI,)))


def _bad_parameters_comms(c: Cov) -> object:
    session = c.ctx.open_session(SuiteTA.UUID)
    session.close()
    return session.invoke_command(COUNT)


def _item_not_found_tee(c: Cov) -> object:
    c.supplicant()  # LOAD_TA asks it: no image
    return c.ctx.open_session(UNLOADED_UUID)


def _item_not_found_api(c: Cov) -> object:
    return TeecContext(c.dev, "not-optee")


def _not_supported(c: Cov) -> object:
    return c.invoke(DefaultTA, 0)


def _out_of_memory(c: Cov) -> object:
    return c.ctx.allocate_shared_memory((1 << 32) + 1, IN)


def _busy(c: Cov) -> object:
    with c.ctx.open_session(SoloTA.UUID):
        return c.ctx.open_session(SoloTA.UUID)


def _communication(c: Cov) -> object:
    """§3.3: the supplicant receives the LOAD_TA request and goes away unanswered."""
    attach_rpc(c.dev)
    sctx = c.dev.open_supplicant()
    got: list[tuple[int, int]] = []
    t = threading.Thread(
        target=lambda: got.append(outcome(lambda: c.ctx.open_session(UNLOADED_UUID)))
    )
    t.start()
    block = bytearray(_HEAD.pack(0, 5) + _PARAM.pack(_META, 0, 0, 0) + _PARAM.pack(0, 0, 0, 0) * 4)
    addr = c.mem.map(block)
    try:
        sctx.ioctl(uapi.TEE_IOC_SUPPL_RECV, bytearray(uapi.BufData(addr, len(block)).pack()))
    finally:
        c.mem.unmap(addr)
    assert _HEAD.unpack_from(block) == (0, 3)  # LOAD_TA, META + 2 params
    sctx.close()
    join_all([t], 5)
    raise TeecError(*got[0])


def _security(c: Cov) -> object:
    c.supplicant()
    (c.tmp / "ta" / f"{UNLOADED_UUID}.ta").write_bytes(b"not a TA image")
    return c.ctx.open_session(UNLOADED_UUID)


def _short_buffer(c: Cov) -> object:
    ref, value = TeecTempMemoryReference(None), TeecValue()
    try:
        return c.invoke(SuiteTA, FILL, op(ref, value, types=(TO, VO)))
    finally:
        assert (ref.size, value.a) == (10, 0xAB)


def _target_dead(c: Cov) -> object:
    return c.invoke(SuiteTA, PANIC)


def _storage_not_available(c: Cov) -> object:
    return c.store(lambda st: st.create(b"obj", RW))  # no supplicant queue on this device


def _overflow(c: Cov) -> object:
    c.supplicant()

    def script(st: TrustedStorage) -> None:
        obj = st.create(b"obj", RW)
        try:
            obj.seek(1 << 40)  # past TEE_DATA_MAX_POSITION
        finally:
            obj.close()

    return c.store(script)


Driver = Callable[[Cov], object]

#: Codes the model itself produces, each through the path that really produces it.  Origin
#: TRUSTED_APP for a storage error means the TEE's storage API raised it inside the TA's
#: entry and the TA let it through.  NOT_SUPPORTED is the GpTA base class's answer to a
#: command (the supplicant's own NOT_SUPPORTED, for an unknown RPC, never reaches a client).
PRODUCED: list[tuple[TeecResult, int, str, Driver]] = [
    (R.TEEC_SUCCESS, TA, "ta-ran", _success),
    (R.TEEC_ERROR_GENERIC, COMMS, "comms-ebadf-after-finalize", _generic_ebadf),
    (R.TEEC_ERROR_GENERIC, COMMS, "comms-eperm-group-login", _generic_eperm),
    (R.TEEC_ERROR_ACCESS_DENIED, TA, "storage-path-refused-by-supplicant", _access_denied),
    (R.TEEC_ERROR_CANCEL, TA, "cancelled-unmasked-wait", _cancel),
    (R.TEEC_ERROR_ACCESS_CONFLICT, TA, "storage-write-meta-exclusive", _access_conflict),
    (R.TEEC_ERROR_BAD_PARAMETERS, API, "api-partial-past-parent", _bad_parameters_api),
    (R.TEEC_ERROR_BAD_PARAMETERS, COMMS, "comms-closed-session", _bad_parameters_comms),
    (R.TEEC_ERROR_ITEM_NOT_FOUND, TEE, "tee-no-ta-image", _item_not_found_tee),
    (R.TEEC_ERROR_ITEM_NOT_FOUND, API, "api-no-device-by-name", _item_not_found_api),
    (R.TEEC_ERROR_NOT_SUPPORTED, TA, "ta-default-invoke-entry", _not_supported),
    (R.TEEC_ERROR_OUT_OF_MEMORY, API, "api-alloc-over-4GiB", _out_of_memory),
    (R.TEEC_ERROR_BUSY, TEE, "tee-single-instance", _busy),
    (R.TEEC_ERROR_COMMUNICATION, TEE, "tee-supplicant-gone-in-load-ta", _communication),
    (R.TEEC_ERROR_SECURITY, TEE, "tee-bad-ta-image", _security),
    (R.TEEC_ERROR_SHORT_BUFFER, TA, "ta-short-buffer-size-back", _short_buffer),
    (R.TEEC_ERROR_TARGET_DEAD, TEE, "tee-panic", _target_dead),
    (R.TEEC_ERROR_STORAGE_NOT_AVAILABLE, TA, "storage-no-rpc", _storage_not_available),
    (R.TEE_ERROR_OVERFLOW, TA, "storage-seek-past-max", _overflow),
]


def _ta_returned(code: int) -> Driver:
    def drive(c: Cov) -> object:
        return c.invoke(SuiteTA, RETURN, op(TeecValue(code), types=(VI,)))

    return drive


_CASES = [
    pytest.param(code, origin, driver, id=f"{code.name}-{how}")
    for code, origin, how, driver in PRODUCED
] + [
    pytest.param(code, TA, _ta_returned(code), id=f"{code.name}-ta-returned")
    for code in R
    if code not in {c for c, *_ in PRODUCED}
]


def test_cases_cover_every_teec_result() -> None:
    """Every TeecResult member (aliases share their canonical member's value) has a case."""
    covered = {p.values[0] for p in _CASES}
    assert covered == set(R) and {int(v) for v in R.__members__.values()} <= covered


@pytest.mark.parametrize(("code", "origin", "driver"), _CASES)
def test_every_teec_result(cov: Cov, code: TeecResult, origin: int, driver: Driver) -> None:
    """§1.3: each code is reached through the GP API with its exact (code, origin)."""
    assert outcome(lambda: driver(cov)) == (code, origin)
