"""GP sessions on QTEE: IGPAppClient / IGPSession through a qtee Client, and
QteeGpTransport on top (quic-teec.md §1.4, §5.3; optee.md §1.3, §1.4, §2)."""

from __future__ import annotations

import errno
import struct
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from objects import DriverError, QteeError
from qtee import Device, uapi
from qtee.client import OUT_OBJECT, Client, ObjRef, Out
from qtee.gp import TeecOrigin, TeecResult
from qtee.gp._qtee_transport import QTEE_GEN_CAPS, QteeGpTransport, map_idl_error
from qtee.secure import (
    CGPAPPCLIENT_UID,
    GpParam,
    GpSession,
    GpTA,
    GpTaError,
    QteeRoot,
    SecureWorld,
)
from qtee.secure._gpclient import (
    IC_IN,
    IGPSESSION_ERROR_CLOSED,
    MEM_PARAMS,
    OS_IN,
    OUT_SCALARS,
    VALUE,
)

OK = TeecResult.TEEC_SUCCESS
SHORT = TeecResult.TEEC_ERROR_SHORT_BUFFER
DEAD = TeecResult.TEEC_ERROR_TARGET_DEAD
NOT_FOUND = TeecResult.TEEC_ERROR_ITEM_NOT_FOUND
DENIED = TeecResult.TEEC_ERROR_ACCESS_DENIED
BAD = TeecResult.TEEC_ERROR_BAD_PARAMETERS
TEE = TeecOrigin.TEEC_ORIGIN_TEE
TA = TeecOrigin.TEEC_ORIGIN_TRUSTED_APP

VI, VO, VIO, MI, MO, MIO = 1, 2, 3, 5, 6, 7
ADD, FILL, PANIC, SUM, WAIT = 1, 2, 3, 4, 5
REFUSE = 0xBAD
TA_UUID = uuid.UUID("8aaaf200-2450-11e4-abe2-0002a5d5c51b")
UNKNOWN_UUID = uuid.UUID("00000000-0000-0000-0000-00000000beef")


def types(*ts: int) -> int:
    return sum(t << (4 * i) for i, t in enumerate(ts))


class AddTA(GpTA):
    """ADD: p0 VALUE_INOUT a += p1.a; FILL: p0 MEMREF_OUTPUT filled with p1.a bytes of
    'Q' (SHORT_BUFFER if it does not fit); PANIC; SUM: p0 MEMREF_INPUT -> p1.a = sum."""

    UUID = TA_UUID

    def open_session(self, session: GpSession, types: int, params: list[GpParam]) -> None:
        if types == VI and params[0].a == REFUSE:
            raise GpTaError(DENIED)

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
        if cmd == ADD:
            params[0].a += params[1].a
        elif cmd == FILL:
            want = params[1].a
            if params[0].buffer is None or params[0].size < want:
                params[0].size = want
                raise GpTaError(SHORT)
            params[0].buffer[:want] = b"Q" * want
            params[0].size = want
        elif cmd == PANIC:
            raise RuntimeError("boom")
        elif cmd == WAIT:
            self.unmask_cancellation()
            params[0].a = self.wait(0xFFFFFFFF)
        elif cmd == SUM:
            assert params[0].buffer is not None
            params[1].a = sum(params[0].buffer)
        else:
            raise GpTaError(TeecResult.TEEC_ERROR_NOT_SUPPORTED)


#: Every test's GP TA, on the plugin's standard QTEE (``qtee_device`` offers IGPAppClient);
#: ``with_args``: a lone class argument would be taken for the decorated object.
pytestmark = pytest.mark.qtee_gp_ta.with_args(AddTA)


@pytest.fixture
def transport(qtee_client: Client) -> Iterator[QteeGpTransport]:
    with qtee_client.client_env() as env:
        t = QteeGpTransport(qtee_client, env)
    yield t
    t.close()


# ----------------------------------------------------------------------------- IDL level

_EMPTY4 = (b"", b"", b"", b"")


def raw_open(
    app: ObjRef, ta: uuid.UUID, ptypes: int = 0, ins: tuple[bytes, ...] = _EMPTY4
) -> tuple[int, int, ObjRef | None]:
    res = app.invoke(
        0,
        OS_IN.pack(0, 0, 0, ptypes, 0),
        ta.bytes_le,
        *ins,
        Out(24),
        Out(0),
        Out(0),
        Out(0),
        Out(0),
        None,
        None,
        None,
        None,
        None,
        OUT_OBJECT,
    )
    _, _, _, _, ret, origin = OUT_SCALARS.unpack(res[0])
    return ret, origin, res[5]


def raw_add(sess: ObjRef, a: int, b: int) -> tuple[int, int, int]:
    res = sess.invoke(
        1,
        IC_IN.pack(ADD, 0, 0xFFFFFFFF, types(VIO, VI), 0),
        VALUE.pack(a, 0),
        VALUE.pack(b, 0),
        b"",
        b"",
        Out(24),
        Out(8),
        Out(0),
        Out(0),
        Out(0),
        None,
        None,
        None,
        None,
    )
    *_, ret, origin = OUT_SCALARS.unpack(res[0])
    return ret, origin, VALUE.unpack(res[1])[0]


def test_idl_open_invoke_close(qtee_client: Client) -> None:
    with qtee_client.client_env() as env, qtee_client.open_service(env, CGPAPPCLIENT_UID) as app:
        ret, origin, sess = raw_open(app, TA_UUID)
        assert (ret, origin) == (OK, TA)
        assert isinstance(sess, ObjRef)
        assert raw_add(sess, 40, 2) == (OK, TA, 42)
        sess.invoke(0)  # close
        for _ in range(2):  # every later call is CLOSED at the IDL level
            with pytest.raises(QteeError) as exc:
                raw_add(sess, 1, 1)
            assert exc.value.result == IGPSESSION_ERROR_CLOSED
        with pytest.raises(QteeError) as exc:
            sess.invoke(0)
        assert exc.value.result == IGPSESSION_ERROR_CLOSED
        sess.release()


def test_idl_open_failures(qtee_client: Client) -> None:
    with qtee_client.client_env() as env, qtee_client.open_service(env, CGPAPPCLIENT_UID) as app:
        assert raw_open(app, UNKNOWN_UUID) == (NOT_FOUND, TEE, None)
        refuse = (VALUE.pack(REFUSE, 0), b"", b"", b"")
        assert raw_open(app, TA_UUID, VI, refuse) == (DENIED, TA, None)
        with pytest.raises(QteeError) as exc:  # INVALID_UUID_LEN
            app.invoke(0, OS_IN.pack(0, 0, 0, 0, 0), b"short", *_EMPTY4, Out(24),
                       *[Out(0)] * 4, *[None] * 5, OUT_OBJECT)  # fmt: skip
        assert exc.value.result == 10
        with pytest.raises(QteeError) as exc:  # wrong counts: the skeleton refuses
            app.invoke(0, OS_IN.pack(0, 0, 0, 0, 0), TA_UUID.bytes_le, Out(24), OUT_OBJECT)
        assert exc.value.result == 2


def test_idl_release_closes_session(qtee_client: Client, qtee_device: Device) -> None:
    runtime = qtee_device.world.gp  # type: ignore[attr-defined]
    with qtee_client.client_env() as env, qtee_client.open_service(env, CGPAPPCLIENT_UID) as app:
        _, _, sess = raw_open(app, TA_UUID)
        assert sess is not None
        assert runtime.live()["sessions"] == 1
        sess.release()
        assert runtime.live() == {"sessions": 0, "instances": 0}


def test_idl_memref_through_memory_object(qtee_client: Client) -> None:
    with (
        qtee_client.client_env() as env,
        qtee_client.open_service(env, CGPAPPCLIENT_UID) as app,
        qtee_client.memory(64) as mem,
    ):
        _, _, sess = raw_open(app, TA_UUID)
        assert sess is not None
        res = sess.invoke(
            1,
            IC_IN.pack(FILL, 0, 0xFFFFFFFF, types(MO, VI), 0),
            MEM_PARAMS.pack(16, 8, 0),
            VALUE.pack(5, 0),
            b"",
            b"",
            Out(24),
            *[Out(0)] * 4,
            mem,
            None,
            None,
            None,
        )
        assert OUT_SCALARS.unpack(res[0]) == (5, 0, 0, 0, OK, TA)
        assert bytes(mem.view[:16]) == bytes(8) + b"QQQQQ" + bytes(3)
        sess.release()


def test_session_object_of_another_context(qtee_device: Device, qtee_client: Client) -> None:
    with qtee_client.client_env() as env, qtee_client.open_service(env, CGPAPPCLIENT_UID) as app:
        _, _, sess = raw_open(app, TA_UUID)
        assert sess is not None
        with Client(qtee_device, workers=0) as other:
            with pytest.raises(DriverError) as exc:
                ObjRef(other, sess.id).invoke(0)
            assert exc.value.errno == errno.EINVAL
        assert raw_add(sess, 1, 2) == (OK, TA, 3)
        sess.release()


def test_service_is_opt_in() -> None:
    dev = Device(SecureWorld(QteeRoot()))
    with Client(dev, workers=1) as c, c.client_env() as env:
        with pytest.raises(QteeError) as exc:
            c.open_service(env, CGPAPPCLIENT_UID)
        assert exc.value.result == 10  # IOpener NOT_FOUND


# ----------------------------------------------------------------------------- transport


def P(attr: int, a: int = 0, b: int = 0, c: int = 0) -> uapi.Param:
    return uapi.Param(attr, a, b, c)


NONE4 = [P(0)] * 4


def open_ta(t: QteeGpTransport) -> int:
    sess, ret, origin, _ = t.open_session(TA_UUID.bytes, bytes(16), 0, 0, NONE4)
    assert (ret, origin) == (OK, TA) and sess
    return sess


def test_transport_version_and_value_add(transport: QteeGpTransport) -> None:
    assert transport.version() == (uapi.TEE_IMPL_ID_QTEE, 0, QTEE_GEN_CAPS)
    s = open_ta(transport)
    ret, origin, back = transport.invoke(s, ADD, 0, [P(VIO, 40, 7), P(VI, 2), P(0), P(0)])
    assert (ret, origin) == (OK, TA)
    assert back[0] == P(VIO, 42, 7, 0)
    assert back[1] == P(VI, 2)
    transport.close_session(s)
    with pytest.raises(DriverError) as exc:
        transport.invoke(s, ADD, 0, NONE4)
    assert exc.value.errno == errno.EINVAL


def test_transport_memref_and_short_buffer(transport: QteeGpTransport) -> None:
    s = open_ta(transport)
    shm, view = transport.shm_alloc(32)
    ret, origin, back = transport.invoke(s, FILL, 0, [P(MO, 4, 8, shm), P(VI, 6), P(0), P(0)])
    assert (ret, origin) == (OK, TA)
    assert back[0] == P(MO, 4, 6, shm)
    assert bytes(view[:12]) == bytes(4) + b"QQQQQQ" + bytes(2)
    # short buffer: the required size comes back whatever the result
    ret, origin, back = transport.invoke(s, FILL, 0, [P(MO, 0, 3, shm), P(VI, 20), P(0), P(0)])
    assert (ret, origin) == (SHORT, TA)
    assert back[0].b == 20
    # a NULL memref is the size query
    null = uapi.TEE_MEMREF_NULL
    ret, origin, back = transport.invoke(s, FILL, 0, [P(MO, 0, 0, null), P(VI, 9), P(0), P(0)])
    assert (ret, origin, back[0].b) == (SHORT, TA, 9)
    # the same shm twice: the second travels as MEMREF_DUP
    view[:4] = b"\x01\x02\x03\x04"
    ret, origin, back = transport.invoke(
        s, SUM, 0, [P(MI, 0, 4, shm), P(VO), P(MO, 16, 4, shm), P(0)]
    )
    assert (ret, origin, back[1].a) == (OK, TA, 10)
    # kernel-shaped errors: unknown shm, out of bounds
    for bad in (P(MI, 0, 4, shm + 100), P(MI, 30, 4, shm)):
        with pytest.raises(DriverError) as exc:
            transport.invoke(s, SUM, 0, [bad, P(VO), P(0), P(0)])
        assert exc.value.errno == errno.EINVAL
    transport.shm_free(shm)
    transport.close_session(s)


def test_transport_panic_and_failures(transport: QteeGpTransport) -> None:
    s = open_ta(transport)
    ret, origin, _ = transport.invoke(s, PANIC, 0, NONE4)
    assert (ret, origin) == (DEAD, TEE)
    ret, origin, _ = transport.invoke(s, ADD, 0, [P(VIO, 1), P(VI, 1), P(0), P(0)])
    assert (ret, origin) == (DEAD, TEE)
    transport.close_session(s)
    sess, ret, origin, _ = transport.open_session(UNKNOWN_UUID.bytes, bytes(16), 0, 0, NONE4)
    assert (sess, ret, origin) == (0, NOT_FOUND, TEE)
    sess, ret, origin, _ = transport.open_session(
        TA_UUID.bytes, bytes(16), 0, 0, [P(VI, REFUSE), P(0), P(0), P(0)]
    )
    assert (sess, ret, origin) == (0, DENIED, TA)
    with pytest.raises(DriverError) as exc:
        transport.open_session(TA_UUID.bytes, bytes(16), 0x8000_0000, 0, NONE4)
    assert exc.value.errno == errno.EPERM
    with pytest.raises(DriverError) as exc:
        transport.shm_register(bytearray(8))
    assert exc.value.errno == errno.EOPNOTSUPP


def test_transport_sessions_are_per_transport(qtee_device: Device, qtee_client: Client) -> None:
    with qtee_client.client_env() as env:
        a = QteeGpTransport(qtee_client, env)
    with Client(qtee_device, workers=1) as other:
        with other.client_env() as env2:
            b = QteeGpTransport(other, env2)
        s = open_ta(a)
        for call in (
            lambda: b.invoke(s, ADD, 0, NONE4),
            lambda: b.cancel(s, 0),
            lambda: b.close_session(s),
        ):
            with pytest.raises(DriverError) as exc:
                call()
            assert exc.value.errno == errno.EINVAL
        b.close()
    a.cancel(s, 1)
    a.close()  # closes the session it still holds
    assert qtee_device.world.gp.live() == {"sessions": 0, "instances": 0}  # type: ignore[attr-defined]


def test_map_idl_error() -> None:
    assert map_idl_error(-90, invoke=False) == (DEAD, TEE)
    assert map_idl_error(-99, invoke=True) == (TeecResult.TEEC_ERROR_BUSY, TEE)
    assert map_idl_error(-97, invoke=True) == (TeecResult.TEEC_ERROR_OUT_OF_MEMORY, TEE)
    assert map_idl_error(10, invoke=False) == (TeecResult.TEEC_ERROR_GENERIC, 2)
    assert map_idl_error(10, invoke=True) == (TeecResult.TEEC_ERROR_GENERIC, TEE)


def test_value_struct_layout() -> None:
    assert struct.calcsize("<5I") == OS_IN.size == IC_IN.size == 20
    assert OUT_SCALARS.size == MEM_PARAMS.size == 24


def test_transport_cancel(transport: QteeGpTransport) -> None:
    s = open_ta(transport)
    got: list[tuple[int, int, list[uapi.Param]]] = []
    t = threading.Thread(
        target=lambda: got.append(transport.invoke(s, WAIT, 7, [P(VO), *NONE4[1:]]))
    )
    t.start()
    deadline = time.monotonic() + 5
    while t.is_alive() and time.monotonic() < deadline:
        transport.cancel(s, 7)
        t.join(0.02)
    t.join()
    ret, origin, back = got[0]
    assert (ret, origin, back[0].a) == (OK, TA, TeecResult.TEEC_ERROR_CANCEL)
    transport.close_session(s)


# ----------------------------------------------------------------------------- TeecContext


def test_teec_context_over_qtee(qtee_client: Client) -> None:
    import qtee.gp as gp
    from qtee.gp import TeecError, TeecMemFlag, TeecParamType, param_types

    with qtee_client.client_env() as env:
        ctx = gp.TeecContext(QteeGpTransport(qtee_client, env))
    try:
        assert ctx.memref_null and not ctx.reg_mem
        sess = ctx.open_session(TA_UUID)
        assert sess.origin == TA
        T = TeecParamType
        op = gp.TeecOperation(
            param_types(T.TEEC_VALUE_INOUT, T.TEEC_VALUE_INPUT, T.TEEC_NONE, T.TEEC_NONE),
            [gp.TeecValue(40), gp.TeecValue(2)],
        )
        assert sess.invoke_command(ADD, op) == TA
        assert op.params[0].a == 42
        # a temp memref: through a temporary shm (a memory object)
        buf = bytearray(8)
        tmp = gp.TeecTempMemoryReference(buf)
        op = gp.TeecOperation(
            param_types(T.TEEC_MEMREF_TEMP_OUTPUT, T.TEEC_VALUE_INPUT, T.TEEC_NONE, T.TEEC_NONE),
            [tmp, gp.TeecValue(5)],
        )
        sess.invoke_command(FILL, op)
        assert (bytes(buf), tmp.size) == (b"QQQQQ" + bytes(3), 5)
        # short buffer: the needed size comes back
        tmp = gp.TeecTempMemoryReference(None, 0)
        op = gp.TeecOperation(
            param_types(T.TEEC_MEMREF_TEMP_OUTPUT, T.TEEC_VALUE_INPUT, T.TEEC_NONE, T.TEEC_NONE),
            [tmp, gp.TeecValue(12)],
        )
        with pytest.raises(TeecError) as exc:
            sess.invoke_command(FILL, op)
        assert (exc.value.code, exc.value.origin, tmp.size) == (SHORT, TA, 12)
        # allocated shared memory, whole
        shm = ctx.allocate_shared_memory(
            16, TeecMemFlag.TEEC_MEM_INPUT | TeecMemFlag.TEEC_MEM_OUTPUT
        )
        ref = gp.TeecRegisteredMemoryReference(shm)
        op = gp.TeecOperation(
            param_types(T.TEEC_MEMREF_WHOLE, T.TEEC_VALUE_INPUT, T.TEEC_NONE, T.TEEC_NONE),
            [ref, gp.TeecValue(3)],
        )
        sess.invoke_command(FILL, op)
        assert bytes(shm.buffer[:4]) == b"QQQ\0" and ref.size == 3
        shm.release()
        # panic
        with pytest.raises(TeecError) as exc:
            sess.invoke_command(PANIC)
        assert (exc.value.code, exc.value.origin) == (DEAD, TEE)
        sess.close()
        with pytest.raises(TeecError) as exc:
            ctx.open_session(UNKNOWN_UUID)
        assert (exc.value.code, exc.value.origin) == (NOT_FOUND, TEE)
        ctx.open_session(TA_UUID)  # left open: finalize closes it
    finally:
        ctx.finalize()
