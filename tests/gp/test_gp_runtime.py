"""The secure-side GP TA runtime against OP-TEE's session rules (optee.md §1.3, §1.4, §2,
§3, §4).  Every test ends with no session, no instance and no QTEE id left (the ``rt``
fixture checks ``live()`` and ``world.live_ids()`` after each test)."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import pytest

from qtee.gp import TaFlag, TeecLogin, TeecOrigin, TeecResult
from qtee.secure import (
    TEE_TIMEOUT_INFINITE,
    GpParam,
    GpSession,
    GpTA,
    GpTaError,
    QteeRoot,
    SecureObject,
    SecureWorld,
    TaSession,
    TeeParamType,
    register_gp_ta,
    tee_param_types,
    unregister_gp_ta,
)
from qtee.secure._gp import GpRuntime, gp_params
from qtee.secure._gp_ta import lookup_gp_ta

OK = TeecResult.TEEC_SUCCESS
BAD_PARAMETERS = TeecResult.TEEC_ERROR_BAD_PARAMETERS
NOT_FOUND = TeecResult.TEEC_ERROR_ITEM_NOT_FOUND
BUSY = TeecResult.TEEC_ERROR_BUSY
DEAD = TeecResult.TEEC_ERROR_TARGET_DEAD
CANCEL = TeecResult.TEEC_ERROR_CANCEL
SHORT = TeecResult.TEEC_ERROR_SHORT_BUFFER
DENIED = TeecResult.TEEC_ERROR_ACCESS_DENIED
OOM = TeecResult.TEEC_ERROR_OUT_OF_MEMORY
TEE = TeecOrigin.TEEC_ORIGIN_TEE
TA = TeecOrigin.TEEC_ORIGIN_TRUSTED_APP

NONE, VI, VO, VIO = 0, 1, 2, 3
MI, MO, MIO = 5, 6, 7

SINGLE = TaFlag.TA_FLAG_SINGLE_INSTANCE
MULTI = TaFlag.TA_FLAG_MULTI_SESSION
KEEP_ALIVE = TaFlag.TA_FLAG_INSTANCE_KEEP_ALIVE
KEEP_CRASHED = TaFlag.TA_FLAG_INSTANCE_KEEP_CRASHED
CONCURRENT = TaFlag.TA_FLAG_CONCURRENT

CLIENT = bytes(range(16))
OWNER = object()

# open_session: params[0] VALUE_INPUT a = OPEN_FAIL (b = code) or OPEN_PANIC
OPEN_FAIL, OPEN_PANIC = 0xFA11, 0xDEAD
# invoke commands
INC, PANIC, FAIL, SHORT_CMD, WAIT, FLAGS, OVERLAP, IDENT, RENDEZVOUS = range(1, 10)
OPEN_SUB, SUB_IDENT, SUB_CALL, SUB_CLOSE, OPEN_SELF = range(20, 25)
GREETING = b"hello, world"

_serials = itertools.count(1)


class ToyTA(GpTA):
    """A TA whose commands exercise the runtime; every entry is logged per class."""

    events: ClassVar[list[tuple[str, int]]]
    lock: ClassVar[threading.Lock]
    active: ClassVar[int]
    max_active: ClassVar[int]
    entered: ClassVar[threading.Event]
    barrier: ClassVar[threading.Barrier]
    create_error: ClassVar[int | None] = None
    create_panic: ClassVar[bool] = False
    target: ClassVar[uuid.UUID | None] = None  # for the TA-to-TA commands

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.events = []
        cls.lock = threading.Lock()
        cls.active = cls.max_active = 0
        cls.entered = threading.Event()
        cls.barrier = threading.Barrier(2, timeout=5)

    def log(self, what: str) -> None:
        with self.lock:
            self.events.append((what, self.serial))

    def create(self) -> None:
        self.serial = next(_serials)
        self.count = 0
        self.subs: dict[int, TaSession] = {}
        self.log("create")
        if self.create_panic:
            raise RuntimeError("create panics")
        if self.create_error is not None:
            raise GpTaError(self.create_error)

    def open_session(self, session: GpSession, types: int, params: list[GpParam]) -> None:
        self.log("open")
        session.context = "mine"
        if params[0].type == VI and params[0].a == OPEN_FAIL:
            raise GpTaError(params[0].b)
        if params[0].type == VI and params[0].a == OPEN_PANIC:
            raise RuntimeError("open panics")

    def close_session(self, session: GpSession) -> None:
        assert session.context == "mine"
        self.log("close")

    def destroy(self) -> None:
        self.log("destroy")

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
        self.log("invoke")
        p = params
        if cmd == INC:
            self.count += 1
            p[0].a, p[0].b = self.count, self.serial
        elif cmd == PANIC:
            if p[0].type == VO:
                p[0].a = 0x5A  # copied back even though the TA dies (§1.4)
            raise RuntimeError("TEE_Panic")
        elif cmd == FAIL:
            code, p[0].a = p[0].a, 7
            raise GpTaError(code)
        elif cmd == SHORT_CMD:
            if p[0].buffer is None or p[0].size < len(GREETING):
                p[0].size = len(GREETING)
                raise GpTaError(SHORT)
            p[0].buffer[: len(GREETING)] = GREETING
            p[0].size = len(GREETING)
        elif cmd == WAIT:
            if p[0].b:
                self.unmask_cancellation()
            self.entered.set()
            res = self.wait(p[0].a or TEE_TIMEOUT_INFINITE)
            p[0].a = res
            if res:
                raise GpTaError(res)
        elif cmd == FLAGS:
            p[0].a = self.unmask_cancellation()  # was it masked?
            p[0].b = self.cancellation_requested()
            p[1].a = self.mask_cancellation()  # was it masked? (no: just unmasked)
            p[1].b = self.cancellation_requested()  # masked again: never seen
        elif cmd == OVERLAP:
            with self.lock:
                type(self).active += 1
                type(self).max_active = max(self.max_active, self.active)
            time.sleep(0.005)
            with self.lock:
                type(self).active -= 1
        elif cmd == IDENT:
            p[0].a, p[0].b = session.login, session.id
            assert p[1].buffer is not None
            p[1].buffer[:16] = session.client_uuid
        elif cmd == RENDEZVOUS:
            self.barrier.wait()
        else:
            self.ta_to_ta(cmd, p)

    def ta_to_ta(self, cmd: int, p: list[GpParam]) -> None:
        if cmd == OPEN_SUB:
            assert self.target is not None
            sub, code, origin = self.open_ta_session(self.target, 0, [])
            p[0].a, p[0].b = code, origin
            p[1].a = 0 if sub is None else sub.id
            if sub is not None:
                self.subs[sub.id] = sub
        elif cmd == SUB_IDENT:
            q = [GpParam(VO), GpParam(MO, buffer=memoryview(bytearray(16)), size=16)]
            code, _ = self.subs[p[0].a].invoke(IDENT, tee_param_types(VO, MO), q)
            assert code == OK and p[2].buffer is not None and q[1].buffer is not None
            p[1].a, p[1].b = q[0].a, q[0].b
            p[2].buffer[:16] = q[1].buffer[:16]
        elif cmd == SUB_CALL:
            p[0].a, p[0].b = self.subs[p[0].a].invoke(p[0].b, 0, [])
        elif cmd == SUB_CLOSE:
            self.subs.pop(p[0].a).close()
        elif cmd == OPEN_SELF:
            sub, code, origin = self.open_ta_session(self.UUID, 0, [])
            assert sub is None
            p[0].a, p[0].b = code, origin
        else:
            raise GpTaError(TeecResult.TEEC_ERROR_NOT_SUPPORTED)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def world() -> SecureWorld:
    return SecureWorld(QteeRoot())


@pytest.fixture
def rt(world: SecureWorld) -> Iterator[GpRuntime]:
    runtime = GpRuntime(world)
    yield runtime
    assert runtime.live() == {"sessions": 0, "instances": 0}
    assert world.live_ids() == []


MakeTA = Callable[..., type[ToyTA]]


@pytest.fixture
def make_ta() -> Iterator[MakeTA]:
    """A fresh registered ToyTA subclass with its own UUID; unregistered afterwards."""
    made: list[type[ToyTA]] = []

    def make(flags: int = 0, *, register: bool = True, **attrs: Any) -> type[ToyTA]:
        name = f"Toy{len(made)}"
        cls = type(name, (ToyTA,), {"UUID": uuid.uuid4(), "FLAGS": flags, **attrs})
        if register:
            register_gp_ta(cls)
            made.append(cls)
        return cls

    yield make
    for cls in made:
        unregister_gp_ta(cls.UUID)


def types_of(params: Sequence[GpParam]) -> int:
    return sum(p.type << (4 * i) for i, p in enumerate(params))


def op(
    rt: GpRuntime,
    cls: type[GpTA],
    params: Sequence[GpParam] = (),
    *,
    owner: object = OWNER,
    login: int = TeecLogin.TEEC_LOGIN_PUBLIC,
) -> tuple[int, int, int]:
    plist = list(params)
    return rt.open_session(cls.UUID.bytes, login, CLIENT, types_of(plist), plist, owner=owner)


def call(
    rt: GpRuntime, sid: int, cmd: int, params: Sequence[GpParam] = (), *, owner: object = OWNER
) -> tuple[int, int]:
    plist = list(params)
    return rt.invoke(sid, cmd, types_of(plist), plist, owner=owner)


def opened(rt: GpRuntime, cls: type[GpTA], **kw: Any) -> int:
    sid, res, origin = op(rt, cls, **kw)
    assert (res, origin) == (OK, TA) and sid
    return sid


def inc(rt: GpRuntime, sid: int) -> tuple[int, int]:
    """(count, instance serial) after one INC."""
    p = GpParam(VO)
    assert call(rt, sid, INC, [p]) == (OK, TA)
    return p.a, p.b


def names(cls: type[ToyTA]) -> list[str]:
    return [what for what, _ in cls.events]


def clean(rt: GpRuntime) -> None:
    assert rt.live() == {"sessions": 0, "instances": 0}
    assert rt.world.live_ids() == []


# ----------------------------------------------------------------------------- basics


def test_open_invoke_close_and_origins(rt: GpRuntime, make_ta: MakeTA) -> None:
    """§1.3: origin TRUSTED_APP whenever the TA ran (success too); §4.2 step 5, §4.3."""
    cls = make_ta()
    sid, res, origin = op(rt, cls)
    assert (res, origin) == (OK, TA) and sid >= 2
    assert rt.live() == {"sessions": 1, "instances": 1}
    assert inc(rt, sid)[0] == 1
    p = GpParam(VIO, a=DENIED)
    assert call(rt, sid, FAIL, [p]) == (DENIED, TA)
    assert p.a == 7  # output values come back whatever the result (§1.4)
    assert call(rt, sid, 0x1234) == (TeecResult.TEEC_ERROR_NOT_SUPPORTED, TA)
    assert rt.close_session(sid, OWNER) == OK
    assert names(cls) == ["create", "open", "invoke", "invoke", "invoke", "close", "destroy"]
    clean(rt)


def test_session_is_a_qtee_object(rt: GpRuntime, world: SecureWorld, make_ta: MakeTA) -> None:
    """DESIGN "a session is an object": its id is a QTEE object id; the TA sees id, login,
    client UUID; the kernel releasing the id (op RELEASE) closes the session (§4.3)."""
    cls = make_ta()
    sid = opened(rt, cls, login=TeecLogin.TEEC_LOGIN_USER)
    assert world.live_ids() == [sid]
    sess = world.lookup(sid)
    assert isinstance(sess, GpSession) and sess.id == sid and isinstance(sess.ta, cls)
    p = [GpParam(VO), GpParam(MO, buffer=memoryview(bytearray(16)), size=16)]
    assert call(rt, sid, IDENT, p) == (OK, TA)
    assert (p[0].a, p[0].b) == (TeecLogin.TEEC_LOGIN_USER, sid)
    assert p[1].buffer is not None and bytes(p[1].buffer) == CLIENT
    world._drop(sid)  # what QCOMTEE_MSG_OBJECT_OP_RELEASE does
    assert names(cls)[-2:] == ["close", "destroy"]
    assert call(rt, sid, INC) == (BAD_PARAMETERS, TEE)
    clean(rt)


def test_unknown_uuid_is_item_not_found(rt: GpRuntime, make_ta: MakeTA) -> None:
    """§4.2 step 3: an unknown UUID ends as ITEM_NOT_FOUND, origin TEE; nothing is kept."""
    cls = make_ta(register=False)
    assert op(rt, cls) == (0, NOT_FOUND, TEE)
    assert cls.events == []
    clean(rt)


def test_load_ta_hook(rt: GpRuntime, make_ta: MakeTA) -> None:
    """§3.2 LOAD_TA, §4.2 step 3: the hook is asked for unregistered UUIDs only, once per
    new instance; None -> ITEM_NOT_FOUND; its own error is passed on, origin TEE."""
    loadable = make_ta(register=False)
    registered = make_ta()
    asked: list[bytes] = []
    answer: dict[bytes, Any] = {loadable.UUID.bytes: loadable}

    def load(raw: bytes) -> type[GpTA] | None:
        asked.append(raw)
        got = answer.get(raw)
        if isinstance(got, BaseException):
            raise got
        assert got is None or issubclass(got, GpTA)
        return got

    rt.load_ta = load
    a, b = opened(rt, loadable), opened(rt, loadable)  # multi-instance: loaded twice
    assert asked == [loadable.UUID.bytes] * 2
    assert inc(rt, a)[1] != inc(rt, b)[1]
    c = opened(rt, registered)
    assert len(asked) == 2  # a registered TA is not loaded through the supplicant
    unknown = uuid.uuid4().bytes
    assert rt.open_session(unknown, 0, CLIENT, 0, []) == (0, NOT_FOUND, TEE)
    assert asked[-1] == unknown
    answer[unknown] = GpTaError(TeecResult.TEEC_ERROR_COMMUNICATION)
    assert rt.open_session(unknown, 0, CLIENT, 0, []) == (
        0,
        TeecResult.TEEC_ERROR_COMMUNICATION,
        TEE,
    )
    answer[unknown] = registered  # a TA whose UUID is not the one asked for
    assert rt.open_session(unknown, 0, CLIENT, 0, []) == (0, TeecResult.TEEC_ERROR_SECURITY, TEE)
    for sid in (a, b, c):
        assert rt.close_session(sid, OWNER) == OK
    clean(rt)


def test_registry() -> None:
    """register_gp_ta is a decorator; unregistering an unknown UUID is a usage error."""

    @register_gp_ta
    class Reg(GpTA):
        UUID = uuid.uuid4()

    assert lookup_gp_ta(Reg.UUID) is Reg and lookup_gp_ta(Reg.UUID.bytes) is Reg
    unregister_gp_ta(Reg.UUID.bytes)
    assert lookup_gp_ta(Reg.UUID) is None
    with pytest.raises(Exception, match="no GP TA"):
        unregister_gp_ta(Reg.UUID)
    with pytest.raises(TypeError):
        register_gp_ta(int)  # type: ignore[type-var]


# ----------------------------------------------------------------------------- instances


def test_multi_instance_gets_an_instance_per_session(rt: GpRuntime, make_ta: MakeTA) -> None:
    """§4.2 step 2: no SINGLE_INSTANCE -> a new instance (create) for every session."""
    cls = make_ta()
    a, b = opened(rt, cls), opened(rt, cls)
    assert rt.live() == {"sessions": 2, "instances": 2}
    assert inc(rt, a) != inc(rt, b)
    assert inc(rt, a)[0] == 2
    rt.close_session(a, OWNER)
    rt.close_session(b, OWNER)
    assert names(cls).count("create") == names(cls).count("destroy") == 2
    clean(rt)


def test_single_instance_without_multi_session_is_busy(rt: GpRuntime, make_ta: MakeTA) -> None:
    """§4.2 step 2: single-instance without MULTI_SESSION and open -> BUSY, origin TEE;
    the refused open changes nothing; after the close the next open gets a new instance."""
    cls = make_ta(SINGLE)
    a = opened(rt, cls)
    serial = inc(rt, a)[1]
    before = (rt.live(), rt.world.live_ids(), list(cls.events))
    assert op(rt, cls) == (0, BUSY, TEE)
    assert (rt.live(), rt.world.live_ids(), cls.events) == before
    rt.close_session(a, OWNER)
    b = opened(rt, cls)
    count, new = inc(rt, b)
    assert count == 1 and new != serial
    rt.close_session(b, OWNER)
    clean(rt)


def test_single_instance_multi_session_shares_one_instance(rt: GpRuntime, make_ta: MakeTA) -> None:
    """§4.2 step 2: MULTI_SESSION reuses the instance; destroy follows the last close."""
    cls = make_ta(SINGLE | MULTI)
    a, b = opened(rt, cls), opened(rt, cls)
    assert rt.live() == {"sessions": 2, "instances": 1}
    (ca, sa), (cb, sb) = inc(rt, a), inc(rt, b)
    assert (ca, cb) == (1, 2) and sa == sb  # one instance, one counter
    rt.close_session(a, OWNER)
    assert "destroy" not in names(cls)
    rt.close_session(b, OWNER)
    assert names(cls).count("create") == 1 and names(cls)[-1] == "destroy"
    clean(rt)


def test_keep_alive_survives_its_last_session(rt: GpRuntime, make_ta: MakeTA) -> None:
    """§4.1/§4.3: SINGLE_INSTANCE+KEEP_ALIVE stays after the last close (no destroy);
    the next open finds the same instance and its state."""
    cls = make_ta(SINGLE | KEEP_ALIVE)
    a = opened(rt, cls)
    assert inc(rt, a)[0] == 1
    rt.close_session(a, OWNER)
    assert rt.live() == {"sessions": 0, "instances": 1}
    assert rt.world.live_ids() == []
    assert "destroy" not in names(cls)
    b = opened(rt, cls)
    assert inc(rt, b)[0] == 2
    rt.close_session(b, OWNER)
    assert names(cls).count("create") == 1
    assert rt.unload(cls.UUID) is True and names(cls)[-1] == "destroy"
    assert rt.unload(cls.UUID) is False
    clean(rt)


def test_keep_alive_without_single_instance_is_ignored(rt: GpRuntime, make_ta: MakeTA) -> None:
    """§4.1: KEEP_ALIVE means something only for single-instance TAs."""
    cls = make_ta(KEEP_ALIVE)
    rt.close_session(opened(rt, cls), OWNER)
    assert names(cls)[-1] == "destroy"
    clean(rt)


# ----------------------------------------------------------------------------- open failures


def test_open_session_error_frees_the_session(rt: GpRuntime, make_ta: MakeTA) -> None:
    """§4.2 step 5: an open-entry error -> session closed and freed, id 0, origin TA; the
    TA's last session gone -> destroy (libutee); the id is free again."""
    cls = make_ta()
    fail = [GpParam(VI, OPEN_FAIL, DENIED)]
    assert op(rt, cls, fail) == (0, DENIED, TA)
    assert names(cls) == ["create", "open", "destroy"]
    clean(rt)
    sid = opened(rt, cls)
    assert sid == 2  # the failed session's id was released
    rt.close_session(sid, OWNER)
    clean(rt)


def test_open_session_panic(rt: GpRuntime, make_ta: MakeTA) -> None:
    """§4.4: a panic in the open entry -> TARGET_DEAD, origin TEE, no session, no destroy."""
    cls = make_ta(SINGLE | MULTI)
    assert op(rt, cls, [GpParam(VI, OPEN_PANIC)]) == (0, DEAD, TEE)
    assert names(cls) == ["create", "open"]
    clean(rt)
    rt.close_session(opened(rt, cls), OWNER)  # a fresh instance
    assert names(cls).count("create") == 2
    clean(rt)


def test_create_failure(rt: GpRuntime, make_ta: MakeTA) -> None:
    """§4.2 step 5 + libutee: create runs in the first open entry; its error is the open's
    result with origin TA (the TA ran); a panic in it is TARGET_DEAD, origin TEE."""
    failing = make_ta(create_error=OOM)
    assert op(rt, failing) == (0, OOM, TA)
    assert names(failing) == ["create"]  # no open, no destroy
    panicking = make_ta(create_panic=True)
    assert op(rt, panicking) == (0, DEAD, TEE)
    clean(rt)


def test_create_failure_of_keep_alive_instance_is_not_retried(
    rt: GpRuntime, make_ta: MakeTA
) -> None:
    """libutee sets init_done before TA_CreateEntryPoint: a kept instance whose create
    failed is reused without a second create."""
    cls = make_ta(SINGLE | KEEP_ALIVE, create_error=OOM)
    assert op(rt, cls) == (0, OOM, TA)
    assert rt.live() == {"sessions": 0, "instances": 1}
    sid = opened(rt, cls)
    assert names(cls) == ["create", "open"]
    rt.close_session(sid, OWNER)
    rt.unload(cls.UUID)
    clean(rt)


# ----------------------------------------------------------------------------- panic


def test_panic_kills_every_session_of_the_instance(rt: GpRuntime, make_ta: MakeTA) -> None:
    """§4.4: the panicking call and every later invoke on any session of the instance
    -> TARGET_DEAD, origin TEE, without entering the TA; the next open gets a fresh
    instance; close still works and does not call the TA."""
    cls = make_ta(SINGLE | MULTI)
    a, b = opened(rt, cls), opened(rt, cls)
    first = inc(rt, a)[1]
    out = GpParam(VO)
    assert call(rt, a, PANIC, [out]) == (DEAD, TEE)
    assert out.a == 0x5A  # the core copies outputs back even after a panic (§1.4)
    entered = len(cls.events)
    assert call(rt, b, INC, [GpParam(VO)]) == (DEAD, TEE)
    assert call(rt, a, INC, [GpParam(VO)]) == (DEAD, TEE)
    assert len(cls.events) == entered
    c = opened(rt, cls)
    count, serial = inc(rt, c)
    assert count == 1 and serial != first
    assert rt.live() == {"sessions": 3, "instances": 2}
    assert rt.close_session(a, OWNER) == OK
    assert rt.close_session(b, OWNER) == OK
    assert [e for e in cls.events if e[1] == first][-1] == ("invoke", first)  # no close
    assert rt.live() == {"sessions": 1, "instances": 1}
    rt.close_session(c, OWNER)
    clean(rt)


def test_keep_crashed(rt: GpRuntime, make_ta: MakeTA) -> None:
    """§4.1/§4.4: SINGLE_INSTANCE+KEEP_ALIVE+INSTANCE_KEEP_CRASHED: the dead instance
    stays and new opens get TARGET_DEAD, origin TEE."""
    cls = make_ta(SINGLE | MULTI | KEEP_ALIVE | KEEP_CRASHED)
    a = opened(rt, cls)
    assert call(rt, a, PANIC) == (DEAD, TEE)
    assert op(rt, cls) == (0, DEAD, TEE)
    assert rt.close_session(a, OWNER) == OK
    assert op(rt, cls) == (0, DEAD, TEE)
    assert rt.live() == {"sessions": 0, "instances": 1}
    assert rt.unload(cls.UUID) is True
    assert "destroy" not in names(cls)  # a dead TA is never entered again
    clean(rt)


def test_keep_alive_without_keep_crashed_respawns(rt: GpRuntime, make_ta: MakeTA) -> None:
    """§4.4 maybe_release_ta_ctx: a panicked keep-alive instance is dropped at once."""
    cls = make_ta(SINGLE | MULTI | KEEP_ALIVE)
    a = opened(rt, cls)
    old = inc(rt, a)[1]
    assert call(rt, a, PANIC) == (DEAD, TEE)
    b = opened(rt, cls)
    assert inc(rt, b)[1] != old
    rt.close_session(a, OWNER)
    rt.close_session(b, OWNER)
    assert rt.live() == {"sessions": 0, "instances": 1}  # the new one is kept
    rt.unload(cls.UUID)
    clean(rt)


def test_open_panic_close_three_threads(rt: GpRuntime, make_ta: MakeTA) -> None:
    """§4.4 under load: 3 threads x 100 of open -> panic -> TARGET_DEAD -> close on one
    single-instance TA: no deadlock, every result as the rules say, nothing left."""
    cls = make_ta(SINGLE | MULTI)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(100):
                sid, res, origin = op(rt, cls)
                if not sid:  # the instance died while this open waited for it
                    assert (res, origin) == (DEAD, TEE)
                    continue
                assert (res, origin) == (OK, TA)
                assert call(rt, sid, PANIC) == (DEAD, TEE)
                assert call(rt, sid, INC, [GpParam(VO)]) == (DEAD, TEE)
                assert rt.close_session(sid, OWNER) == OK
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "deadlock"
    assert errors == []
    clean(rt)


# ----------------------------------------------------------------------------- serialisation


def _run_pair(target: Callable[[], None]) -> None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
    assert errors == []


def test_invokes_on_one_instance_are_serialised(rt: GpRuntime, make_ta: MakeTA) -> None:
    """§4.2 step 4: a non-CONCURRENT TA runs one entry at a time; others wait."""
    cls = make_ta(SINGLE | MULTI)
    sids = iter([opened(rt, cls), opened(rt, cls)])
    lock = threading.Lock()

    def body() -> None:
        with lock:
            sid = next(sids)
        for _ in range(10):
            assert call(rt, sid, OVERLAP) == (OK, TA)
        assert rt.close_session(sid, OWNER) == OK

    _run_pair(body)
    assert cls.max_active == 1
    assert names(cls).count("invoke") == 20
    clean(rt)


def test_concurrent_ta_is_not_serialised(rt: GpRuntime, make_ta: MakeTA) -> None:
    """§4.1 TA_FLAG_CONCURRENT: no busy serialisation, so two invokes meet inside the TA
    (a barrier of two would time out, i.e. panic, if they were serialised)."""
    cls = make_ta(SINGLE | MULTI | CONCURRENT)
    sids = [opened(rt, cls), opened(rt, cls)]
    results: list[tuple[int, int]] = []
    threads = [
        threading.Thread(target=lambda s=s: results.append(call(rt, s, RENDEZVOUS))) for s in sids
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert results == [(OK, TA), (OK, TA)]
    for sid in sids:
        rt.close_session(sid, OWNER)
    clean(rt)


def test_invokes_on_one_session_are_exclusive(rt: GpRuntime, make_ta: MakeTA) -> None:
    """§4.3: invoke takes the session exclusively, so even a CONCURRENT TA sees one
    invoke at a time per session."""
    cls = make_ta(CONCURRENT)
    sid = opened(rt, cls)

    def body() -> None:
        for _ in range(10):
            assert call(rt, sid, OVERLAP) == (OK, TA)

    _run_pair(body)
    assert cls.max_active == 1
    rt.close_session(sid, OWNER)
    clean(rt)


# ----------------------------------------------------------------------------- cancellation


def _invoke_in_thread(
    rt: GpRuntime, sid: int, cmd: int, params: list[GpParam]
) -> tuple[threading.Thread, list[tuple[int, int]]]:
    out: list[tuple[int, int]] = []
    t = threading.Thread(target=lambda: out.append(call(rt, sid, cmd, params)))
    t.start()
    return t, out


def test_cancel_wakes_an_unmasked_wait(rt: GpRuntime, make_ta: MakeTA) -> None:
    """§2 cancel path: cancel sets the session's flag; TEE_Wait with cancellation
    unmasked returns TEE_ERROR_CANCEL at once; the cancel call itself returns SUCCESS."""
    cls = make_ta()
    sid = opened(rt, cls)
    p = GpParam(VIO, a=0, b=1)  # infinite wait, unmasked
    t, out = _invoke_in_thread(rt, sid, WAIT, [p])
    assert cls.entered.wait(5)
    start = time.monotonic()
    assert rt.cancel(sid, 99, OWNER) == OK  # cancel_id is ignored, as OP-TEE does
    t.join(5)
    assert out == [(CANCEL, TA)] and p.a == CANCEL
    assert time.monotonic() - start < 1
    rt.close_session(sid, OWNER)
    clean(rt)


def test_masked_cancel_is_not_seen_and_is_cleared(rt: GpRuntime, make_ta: MakeTA) -> None:
    """§2: the mask defaults to masked; a masked TA's wait runs to its end; the flag is
    cleared and the mask reset at the end of every entry."""
    cls = make_ta()
    sid = opened(rt, cls)
    p = GpParam(VIO, a=150, b=0)  # 150 ms, masked
    t, out = _invoke_in_thread(rt, sid, WAIT, [p])
    assert cls.entered.wait(5)
    start = time.monotonic()
    assert rt.cancel(sid, 0, OWNER) == OK
    t.join(5)
    assert out == [(OK, TA)] and time.monotonic() - start > 0.05
    q = [GpParam(VO), GpParam(VO)]
    assert call(rt, sid, FLAGS, q) == (OK, TA)
    assert (q[0].a, q[0].b) == (1, 0)  # was masked; the flag was cleared at the end
    assert (q[1].a, q[1].b) == (0, 0)  # mask returns "was it masked": no
    assert call(rt, sid, FLAGS, q) == (OK, TA)
    assert q[0].a == 1  # masked again at the start of the next entry
    rt.close_session(sid, OWNER)
    clean(rt)


def test_cancel_between_entries_is_seen_by_the_next(rt: GpRuntime, make_ta: MakeTA) -> None:
    """§2: the flag stays set until the end of the next entry (a cancel that races the
    invoke it means to cancel still hits it)."""
    cls = make_ta()
    sid = opened(rt, cls)
    assert rt.cancel(sid, 0, OWNER) == OK
    q = [GpParam(VO), GpParam(VO)]
    assert call(rt, sid, FLAGS, q) == (OK, TA)
    assert (q[0].a, q[0].b, q[1].b) == (1, 1, 0)
    assert call(rt, sid, FLAGS, q) == (OK, TA)
    assert q[0].b == 0
    rt.close_session(sid, OWNER)
    clean(rt)


def test_close_waits_for_the_invoke_it_closes(rt: GpRuntime, make_ta: MakeTA) -> None:
    """§4.3/§2: close takes the session exclusively, so it waits for the invoke in flight;
    cancel still reaches that invoke; a third call waiting for the session, or arriving
    after the close began, gets BAD_PARAMETERS (origin TEE)."""
    cls = make_ta()
    sid = opened(rt, cls)
    waiting, out = _invoke_in_thread(rt, sid, WAIT, [GpParam(VIO, a=0, b=1)])
    assert cls.entered.wait(5)
    queued, queued_out = _invoke_in_thread(rt, sid, INC, [GpParam(VO)])
    closed: list[int] = []
    closer = threading.Thread(target=lambda: closed.append(rt.close_session(sid, OWNER)))
    closer.start()
    closer.join(0.1)
    assert closer.is_alive() and closed == []  # held by the waiting invoke
    assert call(rt, sid, INC, [GpParam(VO)]) == (BAD_PARAMETERS, TEE)
    assert rt.cancel(sid, 0, OWNER) == OK
    for t in (waiting, queued, closer):
        t.join(5)
    assert out == [(CANCEL, TA)]
    assert queued_out == [(BAD_PARAMETERS, TEE)]
    assert closed == [OK]
    assert names(cls) == ["create", "open", "invoke", "close", "destroy"]
    clean(rt)


def test_cancel_errors(rt: GpRuntime, make_ta: MakeTA) -> None:
    """§2: cancel of an unknown session (or another context's) -> BAD_PARAMETERS."""
    sid = opened(rt, make_ta())
    assert rt.cancel(sid + 1, 0, OWNER) == BAD_PARAMETERS
    assert rt.cancel(0, 0, OWNER) == BAD_PARAMETERS
    assert rt.cancel(sid, 0, object()) == BAD_PARAMETERS
    rt.close_session(sid, OWNER)
    assert rt.cancel(sid, 0, OWNER) == BAD_PARAMETERS
    clean(rt)


def test_ta_api_outside_an_entry_is_refused(make_ta: MakeTA) -> None:
    """The TEE internal API works only inside the TA's own entry points."""
    ta = make_ta()()
    with pytest.raises(Exception, match="entry points"):
        ta.wait(1)
    with pytest.raises(Exception, match="entry points"):
        ta.cancellation_requested()


# ----------------------------------------------------------------------------- owners, params


def test_sessions_belong_to_their_owner(rt: GpRuntime, make_ta: MakeTA) -> None:
    """§2: a session is usable only by the context that opened it (the driver's list):
    another owner -> BAD_PARAMETERS (origin TEE), nothing changes; close_owner closes
    exactly the owner's sessions."""
    cls = make_ta()
    other = object()
    mine = [opened(rt, cls), opened(rt, cls)]
    theirs = opened(rt, cls, owner=other)
    before = (rt.live(), rt.world.live_ids(), len(cls.events))
    assert call(rt, mine[0], INC, [GpParam(VO)], owner=other) == (BAD_PARAMETERS, TEE)
    assert rt.close_session(mine[0], other) == BAD_PARAMETERS
    assert rt.cancel(mine[0], 0, other) == BAD_PARAMETERS
    assert (rt.live(), rt.world.live_ids(), len(cls.events)) == before
    rt.close_owner(OWNER)
    assert rt.world.live_ids() == [theirs]
    assert call(rt, mine[1], INC, [GpParam(VO)]) == (BAD_PARAMETERS, TEE)
    rt.close_owner(other)
    clean(rt)


def test_close_errors(rt: GpRuntime, world: SecureWorld, make_ta: MakeTA) -> None:
    """§4.3: close of an unknown id -> ITEM_NOT_FOUND; invoke on it -> BAD_PARAMETERS,
    origin TEE; an id that is another QTEE object is not a session and stays."""
    sid = opened(rt, make_ta())
    assert rt.close_session(sid, OWNER) == OK
    assert rt.close_session(sid, OWNER) == NOT_FOUND
    assert call(rt, sid, INC) == (BAD_PARAMETERS, TEE)
    other = world.export(SecureObject())
    assert rt.close_session(other, OWNER) == NOT_FOUND
    assert call(rt, other, INC) == (BAD_PARAMETERS, TEE)
    assert world.live_ids() == [other]
    world._drop(other)
    clean(rt)


def test_ns_cannot_claim_the_trusted_app_login(rt: GpRuntime, make_ta: MakeTA) -> None:
    """§1.3: TEE_LOGIN_TRUSTED_APP is OP-TEE-internal; the normal world cannot use it.
    UUIDs are 16 bytes or uuid.UUIDs."""
    cls = make_ta()
    assert op(rt, cls, login=TeecLogin.TEE_LOGIN_TRUSTED_APP) == (0, BAD_PARAMETERS, TEE)
    assert rt.open_session(cls.UUID.bytes[:8], 0, CLIENT, 0, []) == (0, BAD_PARAMETERS, TEE)
    sid, res, origin = rt.open_session(cls.UUID, 0, uuid.UUID(bytes=CLIENT), 0, [], owner=OWNER)
    assert (res, origin) == (OK, TA)
    assert rt.close_session(sid, OWNER) == OK
    clean(rt)


@pytest.mark.parametrize(
    ("types", "params"),
    [
        (0, [GpParam()] * 5),  # more than four params
        (4, [GpParam(4)]),  # 4 is no TEE type
        (0x8, [GpParam(8)]),
        (1, []),  # a type with no param
        (2, [GpParam(1)]),  # the word and the param disagree
        (1, [GpParam(1, a=1 << 32)]),  # not a u32
        (1 << 16, []),  # bits above the fourth nibble
        (6, [GpParam(6, buffer=memoryview(b"ro"), size=2)]),  # output to read-only bytes
        (5, [GpParam(5, buffer=memoryview(b"ab"), size=3)]),  # size past the buffer
        (5, [GpParam(5, buffer=None, size=-1)]),
    ],
)
def test_bad_params_are_refused_before_anything(
    rt: GpRuntime, make_ta: MakeTA, types: int, params: list[GpParam]
) -> None:
    """§4.3: more than 4 params or bad types -> BAD_PARAMETERS, origin TEE, for open and
    invoke alike, with no session allocated and the TA not entered."""
    cls = make_ta()
    assert rt.open_session(cls.UUID.bytes, 0, CLIENT, types, params) == (0, BAD_PARAMETERS, TEE)
    clean(rt)
    sid = opened(rt, cls)
    before = (rt.live(), rt.world.live_ids(), len(cls.events))
    assert rt.invoke(sid, INC, types, params, owner=OWNER) == (BAD_PARAMETERS, TEE)
    assert (rt.live(), rt.world.live_ids(), len(cls.events)) == before
    rt.close_session(sid, OWNER)
    clean(rt)


def test_short_buffer_and_copy_back(rt: GpRuntime, make_ta: MakeTA) -> None:
    """§1.4: the TA writes the required size and returns SHORT_BUFFER; sizes of output
    memrefs and output values come back whatever the result; inputs never do."""
    sid = opened(rt, make_ta())
    null = GpParam(MO, buffer=None, size=0)
    assert call(rt, sid, SHORT_CMD, [null]) == (SHORT, TA)
    assert null.size == len(GREETING)
    small = GpParam(MO, buffer=memoryview(bytearray(4)), size=4)
    assert call(rt, sid, SHORT_CMD, [small]) == (SHORT, TA)
    assert small.size == len(GREETING)
    buf = bytearray(32)
    big = GpParam(MIO, buffer=memoryview(buf), size=32)
    assert call(rt, sid, SHORT_CMD, [big]) == (OK, TA)
    assert big.size == len(GREETING) and bytes(buf[: big.size]) == GREETING
    value_in = GpParam(VI, a=5)
    assert call(rt, sid, INC, [value_in]) == (OK, TA)
    assert value_in.a == 5  # VALUE_INPUT is never written back
    rt.close_session(sid, OWNER)
    clean(rt)


def test_gp_params_helpers() -> None:
    """TEE_PARAM_TYPES and what the TA sees: 4 params, INPUT memrefs read-only."""
    assert tee_param_types(VI, MO) == 0x61
    with pytest.raises(ValueError):
        tee_param_types(4)
    seen = gp_params(0x51, [GpParam(VI, 1, 2), GpParam(MI, buffer=memoryview(b"abc"), size=2)])
    assert [p.type for p in seen] == [VI, MI, NONE, NONE]
    assert seen[1].buffer is not None and seen[1].buffer.readonly and bytes(seen[1].buffer) == b"ab"
    assert TeeParamType.TEE_PARAM_TYPE_MEMREF_INOUT == MIO
    with pytest.raises(GpTaError) as err:
        gp_params(0, [GpParam()] * 5)
    assert err.value.code == BAD_PARAMETERS


# ----------------------------------------------------------------------------- TA to TA


def test_ta_to_ta(rt: GpRuntime, make_ta: MakeTA) -> None:
    """§4.3/§4.4 TA-to-TA: login TRUSTED_APP with the caller's UUID as client identity; a
    panic of the inner TA gives the caller TARGET_DEAD (origin TEE) and the caller and
    its own session survive, while a CA's session on the inner instance is dead."""
    inner = make_ta(SINGLE | MULTI)
    outer = make_ta(target=inner.UUID)
    ca_inner = opened(rt, inner)
    sid = opened(rt, outer)
    p = [GpParam(VO), GpParam(VO)]
    assert call(rt, sid, OPEN_SUB, p) == (OK, TA)
    assert (p[0].a, p[0].b) == (OK, TA)
    sub = p[1].a
    q = [GpParam(VI, sub), GpParam(VO), GpParam(MO, buffer=memoryview(bytearray(16)), size=16)]
    assert call(rt, sid, SUB_IDENT, q) == (OK, TA)
    assert (q[1].a, q[1].b) == (TeecLogin.TEE_LOGIN_TRUSTED_APP, sub)
    assert q[2].buffer is not None and bytes(q[2].buffer) == outer.UUID.bytes
    # the normal world cannot use a session a TA opened, even knowing its id
    assert call(rt, sub, INC, [GpParam(VO)]) == (BAD_PARAMETERS, TEE)
    assert rt.cancel(sub, 0, OWNER) == BAD_PARAMETERS
    assert rt.close_session(sub, OWNER) == BAD_PARAMETERS
    r = GpParam(VIO, sub, PANIC)
    assert call(rt, sid, SUB_CALL, [r]) == (OK, TA)
    assert (r.a, r.b) == (DEAD, TEE)
    assert inc(rt, sid)[0] == 1  # the caller lives on
    assert call(rt, ca_inner, INC, [GpParam(VO)]) == (DEAD, TEE)
    assert call(rt, sid, SUB_CLOSE, [GpParam(VI, sub)]) == (OK, TA)
    for s in (sid, ca_inner):
        assert rt.close_session(s, OWNER) == OK
    clean(rt)


def test_ta_sessions_close_with_their_ta(rt: GpRuntime, make_ta: MakeTA) -> None:
    """A TA's own sessions go when its instance goes (tee_ta_ctx destruction)."""
    inner = make_ta()
    outer = make_ta(target=inner.UUID)
    sid = opened(rt, outer)
    p = [GpParam(VO), GpParam(VO)]
    assert call(rt, sid, OPEN_SUB, p) == (OK, TA)
    assert rt.live() == {"sessions": 2, "instances": 2}
    assert rt.close_session(sid, OWNER) == OK
    assert names(inner)[-2:] == ["close", "destroy"]
    clean(rt)


def test_nested_call_into_a_busy_ta_is_busy(rt: GpRuntime, make_ta: MakeTA) -> None:
    """§4.2 step 4: a nested TA-to-TA call that would wait for a busy TA it is itself
    running in fails with TEE_ERROR_BUSY, origin TEE ("deadlock avoided")."""
    cls = make_ta(SINGLE | MULTI)
    sid = opened(rt, cls)
    p = GpParam(VO)
    assert call(rt, sid, OPEN_SELF, [p]) == (OK, TA)
    assert (p.a, p.b) == (BUSY, TEE)
    assert rt.live() == {"sessions": 1, "instances": 1}
    rt.close_session(sid, OWNER)
    clean(rt)
