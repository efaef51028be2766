"""cancellationRequestTimeout: TEE_OpenTASession / TEE_InvokeTACommand and IGPSession's
wire timeout (optee.md §2 cancel path).

OP-TEE sets the called session's cancel time from the timeout right after it takes the
instance (OP-TEE/optee_os:core/kernel/tee_ta_manager.c@00b3b9a25e768c935ac2ed2fa8f50157390e7204,
``set_invoke_timeout`` in ``tee_ta_open_session``/``tee_ta_invoke_command``; a close entry
runs with ``TEE_TIMEOUT_INFINITE``); ``tee_ta_session_is_cancelled`` reads the session as
cancelled once that time is reached, but never while cancellation is masked, and the
timeout sets no flag: the TA runs on and its result and origin reach the caller as they
are (``syscall_invoke_ta_command``/``syscall_wait`` in
OP-TEE/optee_os:core/tee/tee_svc.c@0049f334c181a1d4ab1b9b6e9e80ea5062272a1d).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import ClassVar

import pytest

from objects import UsageError
from qtee import Device
from qtee.client import OUT_OBJECT, Client, ObjRef, Out
from qtee.gp import TeecLogin, TeecOrigin, TeecResult
from qtee.secure import (
    CGPAPPCLIENT_UID,
    TEE_TIMEOUT_INFINITE,
    GpParam,
    GpSession,
    GpTA,
    GpTaError,
    QteeRoot,
    SecureWorld,
    TaSession,
    install_gp_app_client,
    register_gp_ta,
    tee_param_types,
    unregister_gp_ta,
)
from qtee.secure._gp import GpRuntime
from qtee.secure._gpclient import IC_IN, OS_IN, OS_IN_V2, OUT_SCALARS, VALUE

OK = TeecResult.TEEC_SUCCESS
CANCEL = TeecResult.TEEC_ERROR_CANCEL
TA = TeecOrigin.TEEC_ORIGIN_TRUSTED_APP
TEE = TeecOrigin.TEEC_ORIGIN_TEE
VI, VO, VIO = 1, 2, 3
OWNER = object()

# target commands
WAIT_UNMASKED, MASKED_THEN_UNMASK, FLAG_UNMASKED = 1, 2, 3
# caller commands: p0 = (timeout, target command), results in p1/p2/p3
CALL, OPEN = 10, 11
# an open whose p0.a is OPEN_WAIT unmasks and waits forever, failing with what it got
OPEN_WAIT = 0x0A17

TARGET_UUID = uuid.UUID("5c1a7e00-0000-4000-8000-00000000ca11")
CALLER_UUID = uuid.UUID("5c1a7e00-0000-4000-8000-00000000ca12")


class Target(GpTA):
    """The called TA; records what its close entry saw."""

    UUID = TARGET_UUID
    close_flags: ClassVar[list[bool]] = []

    def open_session(self, session: GpSession, types: int, params: list[GpParam]) -> None:
        if types == VI and params[0].a == OPEN_WAIT:
            self.unmask_cancellation()
            code = self.wait(TEE_TIMEOUT_INFINITE)
            raise GpTaError(code)

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
        p = params
        if cmd == WAIT_UNMASKED:  # p0.a = ms to wait; returns the wait's result as its own
            self.unmask_cancellation()
            start = time.monotonic()
            code = self.wait(p[0].a)
            p[0].b = int((time.monotonic() - start) * 1000)
            if code != OK:
                raise GpTaError(code)
        elif cmd == MASKED_THEN_UNMASK:  # p0.a = ms to wait masked
            p[0].b = self.wait(p[0].a)
            p[1].a = int(self.cancellation_requested())
            p[1].b = int(self.unmask_cancellation())
            p[2].a = int(self.cancellation_requested())
            p[2].b = self.wait(TEE_TIMEOUT_INFINITE)
        elif cmd == FLAG_UNMASKED:
            self.unmask_cancellation()
            p[0].b = int(self.cancellation_requested())
        else:
            raise GpTaError(TeecResult.TEEC_ERROR_NOT_SUPPORTED)

    def close_session(self, session: GpSession) -> None:
        self.unmask_cancellation()
        type(self).close_flags.append(self.cancellation_requested())


class Caller(GpTA):
    """Calls Target TA-to-TA with the timeout it is given."""

    UUID = CALLER_UUID
    sub: TaSession | None = None
    seen: ClassVar[list[object]] = []

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
        p = params
        timeout, target_cmd = p[0].a, p[0].b
        if cmd == OPEN:  # p1 = (result, origin); p2.a = 1 if a session came back
            sub, code, origin = self.open_ta_session(
                TARGET_UUID, VI, [GpParam(VI, a=target_cmd)], timeout=timeout
            )
            p[1].a, p[1].b, p[2].a = code, origin, int(sub is not None)
            type(self).seen.append((code, origin))
            if sub is not None:
                sub.close()
            return
        if self.sub is None:
            sub, code, _ = self.open_ta_session(TARGET_UUID, 0, [])
            assert code == OK and sub is not None
            self.sub = sub
        q = [GpParam(VIO, a=p[1].a), GpParam(VO), GpParam(VO)]
        code, origin = self.sub.invoke(target_cmd, tee_param_types(VIO, VO, VO), q, timeout=timeout)
        type(self).seen.append((code, origin))
        p[1].a, p[1].b = code, origin
        p[2].a, p[2].b = q[0].b, q[1].a  # elapsed ms / flag read while masked
        p[3].a, p[3].b = q[1].b, q[2].a * 2 + (q[2].b == CANCEL)


@pytest.fixture
def rt() -> Iterator[GpRuntime]:
    register_gp_ta(Target)
    register_gp_ta(Caller)
    Target.close_flags = []
    Caller.seen = []
    world = SecureWorld(QteeRoot())
    runtime = GpRuntime(world)
    yield runtime
    runtime.shutdown()
    unregister_gp_ta(TARGET_UUID)
    unregister_gp_ta(CALLER_UUID)
    assert runtime.live() == {"sessions": 0, "instances": 0}
    assert world.live_ids() == []


def _open_caller(rt: GpRuntime) -> int:
    sid, code, origin = rt.open_session(
        CALLER_UUID, TeecLogin.TEEC_LOGIN_PUBLIC, bytes(16), 0, [], owner=OWNER
    )
    assert (code, origin) == (OK, TA) and sid
    return sid


def _call(
    rt: GpRuntime, sid: int, cmd: int, timeout: int, target_cmd: int, arg: int = 0
) -> list[GpParam]:
    p = [GpParam(VIO, a=timeout, b=target_cmd), GpParam(VIO, a=arg), GpParam(VO), GpParam(VO)]
    assert rt.invoke(sid, cmd, tee_param_types(VIO, VIO, VO, VO), p, owner=OWNER) == (OK, TA)
    return p


def _in_thread(fn: object) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)  # type: ignore[operator]
    t.start()
    return t, out


def test_invoke_timeout_cancels_an_unmasked_wait(rt: GpRuntime) -> None:
    """tee_ta_manager.c ``set_invoke_timeout`` + tee_svc.c ``syscall_wait``: the target's
    infinite TEE_Wait with cancellation unmasked returns TEE_ERROR_CANCEL once the
    caller's timeout expires; the caller sees the target's own result, origin TA."""
    sid = _open_caller(rt)
    t, out = _in_thread(lambda: _call(rt, sid, CALL, 60, WAIT_UNMASKED, TEE_TIMEOUT_INFINITE))
    t.join(5)
    if t.is_alive():  # old code: waits forever; end it so the test can fail cleanly
        rt.shutdown()
        t.join(5)
    assert out, "the wait never ended"
    p = out[0]
    assert isinstance(p, list)
    assert (p[1].a, p[1].b) == (CANCEL, TA)
    assert 40 <= p[2].a < 2000  # it ended at the timeout, not before
    rt.close_session(sid, OWNER)


def test_infinite_and_long_timeouts_do_not_cancel(rt: GpRuntime) -> None:
    """``TEE_TIMEOUT_INFINITE`` (the default) never expires; a timeout longer than the
    call never fires; the cancel time belongs to one call only (the next call without
    a timeout reads not cancelled)."""
    sid = _open_caller(rt)
    p = _call(rt, sid, CALL, TEE_TIMEOUT_INFINITE, WAIT_UNMASKED, 30)
    assert (p[1].a, p[1].b) == (OK, TA) and p[2].a >= 25
    p = _call(rt, sid, CALL, 10_000, WAIT_UNMASKED, 30)
    assert (p[1].a, p[1].b) == (OK, TA)
    p = _call(rt, sid, CALL, 0, WAIT_UNMASKED, 10_000)  # 0: cancelled from the start
    assert (p[1].a, p[1].b) == (CANCEL, TA) and p[2].a < 1000
    p = _call(rt, sid, CALL, TEE_TIMEOUT_INFINITE, FLAG_UNMASKED)
    assert (p[1].a, p[2].a) == (OK, 0)  # the flag read by the next call: clear
    assert Caller.seen == [(OK, TA), (OK, TA), (CANCEL, TA), (OK, TA)]
    rt.close_session(sid, OWNER)


def test_masked_target_ignores_the_timeout_until_it_unmasks(rt: GpRuntime) -> None:
    """``tee_ta_session_is_cancelled`` is False while masked and sets no flag: a masked
    TEE_Wait runs to its end (SUCCESS), the flag reads clear; once unmasked after the
    expiry the flag reads set and TEE_Wait returns TEE_ERROR_CANCEL at once."""
    sid = _open_caller(rt)
    start = time.monotonic()
    p = _call(rt, sid, CALL, 20, MASKED_THEN_UNMASK, 120)
    assert time.monotonic() - start >= 0.1
    assert (p[1].a, p[1].b) == (OK, TA)
    wait_masked, flag_masked = p[2].a, p[2].b
    was_masked, after = p[3].a, p[3].b
    assert wait_masked == 0  # q0.b is the masked wait's result: SUCCESS
    assert flag_masked == 0  # the flag read while masked
    assert was_masked == 1
    assert after == 2 * 1 + 1  # flag set once unmasked, and the wait returned CANCEL
    rt.close_session(sid, OWNER)


def test_close_entry_runs_without_the_timeout(rt: GpRuntime) -> None:
    """``tee_ta_close_session`` calls ``set_invoke_timeout(sess, TEE_TIMEOUT_INFINITE)``:
    an expired timeout of the last invoke does not reach the close entry."""
    sid = _open_caller(rt)
    p = _call(rt, sid, CALL, 0, FLAG_UNMASKED)
    assert (p[1].a, p[2].a) == (OK, 1)  # expired during the invoke
    rt.close_session(sid, OWNER)  # the caller's instance goes: its session to Target closes
    assert Target.close_flags == [False]


def test_open_ta_session_timeout(rt: GpRuntime) -> None:
    """``tee_ta_open_session`` sets the cancel time before the open entry: an open entry
    waiting unmasked is cancelled at the timeout; its refusal reaches the caller as
    (TEE_ERROR_CANCEL, origin TA) with no session."""
    sid = _open_caller(rt)
    t, out = _in_thread(lambda: _call(rt, sid, OPEN, 40, OPEN_WAIT))
    t.join(5)
    if t.is_alive():
        rt.shutdown()
        t.join(5)
    assert out, "the open entry's wait never ended"
    p = out[0]
    assert isinstance(p, list)
    assert (p[1].a, p[1].b, p[2].a) == (CANCEL, TA, 0)
    rt.close_session(sid, OWNER)
    assert rt.live() == {"sessions": 0, "instances": 0}


@pytest.mark.parametrize("bad", [-1, 1 << 32, True, 1.5, "10", None])
def test_timeout_must_be_a_u32(rt: GpRuntime, bad: object) -> None:
    """A cancellationRequestTimeout is a u32 (``uint32_t`` in the GP API): anything else
    is refused by name, before any entry runs."""
    with pytest.raises(UsageError, match="cancellation timeout"):
        rt.invoke(1, 0, 0, [], owner=OWNER, timeout=bad)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="cancellation timeout"):
        rt.open_session(
            TARGET_UUID,
            0,
            bytes(16),
            0,
            [],
            owner=OWNER,
            timeout=bad,  # type: ignore[arg-type]
        )

    class Bad(GpTA):
        UUID = uuid.UUID("5c1a7e00-0000-4000-8000-00000000ca13")
        errors: ClassVar[list[str]] = []

        def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
            for call in (
                lambda: self.open_ta_session(TARGET_UUID, 0, [], timeout=bad),  # type: ignore[arg-type]
                lambda: TaSession(rt, 1, None).invoke(0, 0, [], timeout=bad),  # type: ignore[arg-type]
            ):
                try:
                    call()
                except UsageError as exc:
                    self.errors.append(str(exc))

    register_gp_ta(Bad)
    try:
        sid, code, _ = rt.open_session(Bad.UUID, 0, bytes(16), 0, [], owner=OWNER)
        assert code == OK
        assert rt.invoke(sid, 0, 0, [], owner=OWNER) == (OK, TA)
        assert len(Bad.errors) == 2 and all("cancellation timeout" in e for e in Bad.errors)
        rt.close_session(sid, OWNER)
    finally:
        unregister_gp_ta(Bad.UUID)
    assert rt.live() == {"sessions": 0, "instances": 0}


# ----------------------------------------------------------------------------- IGPSession


@pytest.fixture
def qworld() -> Iterator[SecureWorld]:
    register_gp_ta(Target)
    Target.close_flags = []
    world = SecureWorld(QteeRoot())
    install_gp_app_client(world)
    yield world
    unregister_gp_ta(TARGET_UUID)


@pytest.fixture
def client(qworld: SecureWorld) -> Iterator[Client]:
    c = Client(Device(qworld), workers=2)
    yield c
    c.close()


def _open(app: ObjRef, v2_timeout: int | None, arg: bytes = b"") -> tuple[int, int, object]:
    ptypes = VI if arg else 0
    if v2_timeout is None:
        opcode, scalars = 0, OS_IN.pack(0, 0, 0, ptypes, 0)
    else:
        opcode, scalars = 1, OS_IN_V2.pack(0, v2_timeout, 0, 0, ptypes, 0)
    res = app.invoke(
        opcode, scalars, TARGET_UUID.bytes_le, arg, b"", b"", b"",
        Out(24), Out(0), Out(0), Out(0), Out(0), None, None, None, None, None, OUT_OBJECT,
    )  # fmt: skip
    *_, ret, origin = OUT_SCALARS.unpack(res[0])
    return ret, origin, res[5]


def _wire_invoke(sess: ObjRef, cmd: int, timeout: int, a: int) -> tuple[int, int, int]:
    res = sess.invoke(
        1, IC_IN.pack(cmd, 0, timeout, tee_param_types(VIO, VO, VO), 0),
        VALUE.pack(a, 0), b"", b"", b"",
        Out(24), Out(8), Out(8), Out(8), Out(0), None, None, None, None,
    )  # fmt: skip
    *_, ret, origin = OUT_SCALARS.unpack(res[0])
    _, out_b = VALUE.unpack(res[1])  # elapsed ms, or the flag read
    return ret, origin, out_b


def test_igpsession_wire_timeout_is_honoured(client: Client, qworld: SecureWorld) -> None:
    """IGPSession.invokeCommand's cancellationRequestTimeout (the third input scalar) and
    openSessionV2's (the second) act as TEE_InvokeTACommand's / TEE_OpenTASession's:
    0xFFFFFFFF never expires, openSession (V1) carries none."""
    with client.client_env() as env, client.open_service(env, CGPAPPCLIENT_UID) as app:
        ret, origin, sess = _open(app, None)
        assert (ret, origin) == (OK, TA) and isinstance(sess, ObjRef)
        t, out = _in_thread(lambda: _wire_invoke(sess, WAIT_UNMASKED, 50, TEE_TIMEOUT_INFINITE))
        t.join(5)
        if t.is_alive():  # old code: the timeout is dropped; cancel so the test ends
            qworld.gp.shutdown()  # type: ignore[attr-defined]
            t.join(5)
        assert out and out[0][:2] == (CANCEL, TA)  # type: ignore[index]
        assert 30 <= out[0][2] < 2000  # type: ignore[index,operator]
        assert _wire_invoke(sess, WAIT_UNMASKED, TEE_TIMEOUT_INFINITE, 20)[:2] == (OK, TA)
        assert _wire_invoke(sess, FLAG_UNMASKED, 0, 0) == (OK, TA, 1)
        assert _wire_invoke(sess, FLAG_UNMASKED, TEE_TIMEOUT_INFINITE, 0) == (OK, TA, 0)
        sess.invoke(0)
        sess.release()
        # openSessionV2: the open entry is cancelled at the timeout, NULL session back
        ret, origin, none = _open(app, 40, VALUE.pack(OPEN_WAIT, 0))
        assert (ret, origin, none) == (CANCEL, TA, None)
