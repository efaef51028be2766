"""supplicant.WorkerPool, one rule at a time (quic-teec.md §2.2-§2.4, §6; qtee-kernel.md §3.6,
§4.2-§4.5).

Every rule is checked twice:

* at the object level -- what the TA sees as the callback result of ``NsObject.invoke``
  (the :class:`Probe` TA writes it into a 4-byte output buffer, so a non-zero result does
  not turn into an invoke failure);
* at the raw level -- what the pool actually SENDs: :class:`Spy` wraps ``client.ctx.ioctl``
  and records each SUPPL_SEND block (``ret`` as the u32 written, params, and the errno the
  ioctl failed with, 0 on success), each request SUPPL_RECV returned, and each
  OBJECT_INVOKE the client issued.

The pool under test is installed after the spy (``Client(workers=0)`` then
``WorkerPool``), so no worker is already blocked in an unwrapped RECV.  The device uses a
:class:`CheckedMemory`, so a stray pointer is EFAULT.
"""

from __future__ import annotations

import errno
import logging
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from objects import DriverError, QteeError, op
from qtee import Device, Result, uapi
from qtee.addrspace import CheckedMemory
from qtee.client import OUT_OBJECT, CallbackObject, Client, ObjRef, Out
from qtee.secure import NsObject, SecureObject, SecureWorld, TrustedApp
from supplicant import WorkerPool
from tests._helpers import (
    META_IN,
    META_OUT,
    NULL,
    OBJ_IN,
    TEE,
    UB_IN,
    UB_OUT,
    USER,
    raw_invoke,
    wait_until,
)

U32 = 0xFFFF_FFFF
DEFUNCT = Result.ERROR_DEFUNCT & U32  # 0xFFFFFFA6
BADOBJ = Result.ERROR_BADOBJ & U32  # 0xFFFFFFA4
UNAVAIL = Result.ERROR_UNAVAIL & U32  # 0xFFFFFFA0
EBUSY = -errno.EBUSY & U32  # the watchdog's answer
RELEASE = 0xFFFF
#: CheckedMemory maps nothing below 0x100000: access_ok passes, the copy faults.
UNMAPPED = 0x1000

# Probe ops
CALL, CALL_DATA, CALL_OBJ, KEEP, KEEP15, CALL_KEPT, DROP, DROP_ALL, NOTHING = range(9)
# Callback ops (Counter / Blocker / Sleeper)
CB_OK, CB_USER_ERROR, CB_RAISE, CB_DATA, CB_OBJ = range(5)
CB_MISSING = 7


def result(r: int) -> bytes:
    """The 4-byte output of a Probe call: the callback result the TA saw."""
    return struct.pack("<i", r)


def meta(req: int) -> uapi.Param:
    """The SEND meta param answering request ``req``."""
    return uapi.Param(META_OUT, req)


# ------------------------------------------------------------------------------ secure side


class Probe(TrustedApp):
    """Calls back the objects it is given and reports the callback result it saw."""

    def __init__(self) -> None:
        self.kept: list[NsObject] = []
        self.lock = threading.Lock()

    @op(CALL, ib=(4,), io=1, ob=(4,))
    def call(self, which: bytes, cb: NsObject) -> bytes:
        return result(cb.invoke(struct.unpack("<I", which)[0]).result)

    @op(CALL_DATA, ib=(None,), io=1, ob=(4,))
    def call_data(self, data: bytes, cb: NsObject) -> bytes:
        return result(cb.invoke(CB_DATA, [data]).result)

    @op(CALL_OBJ, io=1, ob=(4,))
    def call_obj(self, cb: NsObject) -> bytes:
        """Passes itself to the callback and asks for an object back."""
        res = cb.invoke(CB_OBJ, io=[self], n_oo=1)
        for o in res.oo:
            if isinstance(o, NsObject):
                o.release()
        return result(res.result)

    @op(KEEP, io=1)
    def keep(self, cb: NsObject) -> None:
        with self.lock:
            self.kept.append(cb.retain())

    @op(KEEP15, io=15)
    def keep15(self, *cbs: NsObject) -> None:
        with self.lock:
            self.kept += [cb.retain() for cb in cbs]

    @op(CALL_KEPT, ib=(8,), ob=(4,))
    def call_kept(self, which: bytes) -> bytes:
        index, cb_op = struct.unpack("<II", which)
        return result(self.kept[index].invoke(cb_op).result)

    @op(DROP, ib=(4,))
    def drop(self, index: bytes) -> None:
        with self.lock:
            cb = self.kept.pop(struct.unpack("<I", index)[0])
        cb.release()

    @op(DROP_ALL)
    def drop_all(self) -> None:
        with self.lock:
            kept, self.kept = self.kept, []
        for cb in kept:
            cb.release()

    @op(NOTHING)
    def nothing(self) -> None:
        """A return to the kernel: flushes async releases that did not fit the last one."""


class Root(SecureObject):
    """op 0 hands out the one Probe (a new QTEE id each time)."""

    def __init__(self) -> None:
        self.probe = Probe()

    @op(0, oo=1)
    def open(self) -> SecureObject:
        return self.probe


# ------------------------------------------------------------------------------ callback side


class Counter(CallbackObject):
    """Records each method it runs."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @op(CB_OK)
    def ok(self) -> None:
        self.calls.append("ok")

    @op(CB_USER_ERROR)
    def user_error(self) -> None:
        self.calls.append("user_error")
        raise QteeError(12)

    @op(CB_RAISE)
    def explode(self) -> None:
        self.calls.append("explode")
        raise ValueError("boom")

    @op(CB_DATA, ib=(None,))
    def data(self, data: bytes) -> None:
        self.calls.append("data")

    @op(CB_OBJ, io=1, oo=1)
    def obj(self, o: object) -> object:
        self.calls.append("obj")
        return None


class Blocker(CallbackObject):
    """op 0 blocks until :attr:`leave` is set; op 1 returns at once."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.leave = threading.Event()
        self.left = threading.Event()

    @op(0)
    def block(self) -> None:
        self.entered.set()
        self.leave.wait(5)
        self.left.set()

    @op(1)
    def fast(self) -> None:
        pass


class Sleeper(CallbackObject):
    """op 0 sleeps 1.5 s; op 1 returns at once."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.done = threading.Event()

    @op(0)
    def slow(self) -> None:
        self.entered.set()
        time.sleep(1.5)
        self.done.set()

    @op(1)
    def fast(self) -> None:
        pass


# ------------------------------------------------------------------------------ the spy


@dataclass(frozen=True)
class Sent:
    """One SUPPL_SEND the pool issued: the ``ret`` u32, params, and the ioctl's errno."""

    ret: int
    params: tuple[uapi.Param, ...]
    errno: int = 0


Tamper = Callable[[int, tuple[uapi.Param, ...]], tuple[uapi.Param, ...]]


class Spy:
    """Wraps ``client.ctx.ioctl``; records SENDs, returned RECVs and OBJECT_INVOKEs.

    ``tamper`` (func, params) -> params rewrites what a RECV returned before the pool
    reads it, standing in for a kernel that hands over something the pool cannot use.
    """

    def __init__(self, client: Client) -> None:
        self.real = client.ctx.ioctl
        self.mem = client.device.memory
        self.lock = threading.Lock()
        self.sends: list[Sent] = []
        self.recvs: list[tuple[int, tuple[uapi.Param, ...]]] = []
        self.invokes: list[tuple[uapi.ObjectInvokeArg, tuple[uapi.Param, ...]]] = []
        self.in_recv = 0  # threads blocked in SUPPL_RECV right now
        self.tamper: Tamper | None = None
        client.ctx.ioctl = self  # type: ignore[method-assign]

    def _block(self, arg: bytearray | memoryview) -> tuple[int, bytes]:
        buf = uapi.BufData.unpack(arg)
        return buf.buf_ptr, self.mem.read(buf.buf_ptr, buf.buf_len)

    def __call__(self, cmd: int, arg: bytearray | memoryview) -> int:
        if cmd == uapi.TEE_IOC_SUPPL_SEND:
            head, params = uapi.unpack_arg(uapi.SuppSendArg, self._block(arg)[1])
            try:
                rc = self.real(cmd, arg)
            except DriverError as exc:
                with self.lock:
                    self.sends.append(Sent(head.ret, params, exc.code))
                raise
            with self.lock:
                self.sends.append(Sent(head.ret, params))
            return rc
        if cmd == uapi.TEE_IOC_OBJECT_INVOKE:
            with self.lock:
                self.invokes.append(uapi.unpack_arg(uapi.ObjectInvokeArg, self._block(arg)[1]))
            return self.real(cmd, arg)
        if cmd == uapi.TEE_IOC_SUPPL_RECV:
            with self.lock:
                self.in_recv += 1
            try:
                rc = self.real(cmd, arg)
            finally:
                with self.lock:
                    self.in_recv -= 1
            ptr, block = self._block(arg)
            head, params = uapi.unpack_arg(uapi.SuppRecvArg, block)
            if self.tamper is not None:
                params = self.tamper(head.func, params)
                self.mem.write(ptr + uapi.SuppRecvArg.SIZE, uapi.pack_params(params))
            with self.lock:
                self.recvs.append((head.func, params))
            return rc
        return self.real(cmd, arg)

    def releases(self) -> list[int]:
        """User ids of the release notifications RECV returned, in order."""
        with self.lock:
            return [p[0].a for func, p in self.recvs if func == RELEASE]

    def idle(self, workers: int = 1) -> bool:
        """Every worker is back in RECV (its last request fully handled)."""
        with self.lock:
            return self.in_recv == workers

    def sent_user_ids(self, op_: int) -> list[int]:
        """The USER ids passed as input objects to OBJECT_INVOKEs of ``op_``."""
        with self.lock:
            return [
                p.a
                for head, params in self.invokes
                if head.op == op_
                for p in params
                if p.attr == OBJ_IN and p.b == USER
            ]


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture
def dev() -> Iterator[Device]:
    root = Root()
    device = Device(SecureWorld(root), memory=CheckedMemory())
    yield device
    for ctx in list(device.contexts):  # a failed test must not cascade into the leak check
        ctx.close()


def client_with_spy(
    dev: Device, workers: int = 1, deadline: float | None = None
) -> tuple[Client, Spy]:
    """A client whose context is spied on before its pool starts."""
    c = Client(dev, workers=0)
    spy = Spy(c)
    c.pool = WorkerPool(c, workers, deadline=deadline)
    return c, spy


def open_probe(c: Client) -> ObjRef:
    (probe,) = ObjRef(c, NULL).invoke(0, OUT_OBJECT)
    assert isinstance(probe, ObjRef)
    return probe


def call(probe: ObjRef, cb: CallbackObject, cb_op: int) -> bytes:
    """Probe.call: the TA calls ``cb`` with ``cb_op``; returns the result it saw (packed)."""
    (out,) = probe.invoke(CALL, struct.pack("<I", cb_op), cb, Out(4))
    assert isinstance(out, bytes)
    return out


def supplicant_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("qtee-supplicant-"))


def close_all(dev: Device, *clients: Client) -> None:
    for c in clients:
        c.close()
    assert dev.leaks() == {}


# ------------------------------------------------------------------------------ rule 1


def test_unknown_object_is_defunct_and_ta_sees_error(dev: Device) -> None:
    """quic-teec.md §2.3 dispatch 1: no exported object with that id -> SEND ret DEFUNCT
    (0xFFFFFFA6); §6 and qtee-kernel.md §3.6: the kernel maps -90 to ERROR (1) for QTEE.

    The client never exported user id 999; a raw OBJECT_INVOKE hands it to the TA anyway.
    """
    c, spy = client_with_spy(dev)
    probe = open_probe(c)
    mem = dev.memory
    assert isinstance(mem, CheckedMemory)
    out = bytearray(4)
    head, params = raw_invoke(
        c.ctx,
        mem,
        probe.id,
        CALL,
        [
            uapi.Param(UB_IN, mem.map(struct.pack("<I", CB_OK)), 4),
            uapi.Param(OBJ_IN, 999, USER),
            uapi.Param(UB_OUT, mem.map(out), 4),
        ],
    )
    assert (head.ret, params[2].b, bytes(out)) == (0, 4, result(Result.ERROR))
    # QTEE dropped its reference: the notification for 999 is consumed and not answered.
    assert wait_until(lambda: spy.releases() == [999] and spy.idle())
    assert spy.recvs[0] == (CB_OK, (uapi.Param(META_IN, 999, 0),))
    assert spy.sends == [Sent(DEFUNCT, (meta(0),))]
    assert spy.sends[0].ret == 0xFFFF_FFA6
    assert c.exported() == 0
    probe.release()
    close_all(dev, c)


# ------------------------------------------------------------------------------ rule 2


def test_unsupported_op_is_badobj_without_dispatch(
    dev: Device, caplog: pytest.LogCaptureFixture
) -> None:
    """quic-teec.md §2.3 dispatch 2: ``supported(op)`` false -> SEND ret BADOBJ (-92)
    without calling any method; QTEE sees ERROR (1) (§6, qtee-kernel.md §3.6).  The
    client's side logs which object lacked which op (the TA sees only ERROR)."""
    c, spy = client_with_spy(dev)
    probe = open_probe(c)
    cb = Counter()
    with caplog.at_level("WARNING", logger="qtee.supplicant"):
        assert call(probe, cb, CB_MISSING) == result(Result.ERROR)
    assert [r.getMessage() for r in caplog.records if r.name == "qtee.supplicant"] == [
        f"Counter has no op {CB_MISSING} (its ops: "
        f"{', '.join(str(n) for n in sorted(Counter.__ops__))}): answered BADOBJ"
    ]
    assert cb.calls == []
    assert wait_until(lambda: spy.releases() == [1] and spy.idle())
    assert spy.sends == [Sent(BADOBJ, (meta(0),))]
    assert spy.sends[0].ret == 0xFFFF_FFA4
    probe.release()
    close_all(dev, c)


# ------------------------------------------------------------------------------ rule 3


def test_unreadable_input_buffer_is_unavail(dev: Device, caplog: pytest.LogCaptureFixture) -> None:
    """quic-teec.md §2.3 dispatch 3: arguments that cannot be unmarshalled -> SEND ret
    UNAVAIL (-96), the method is not called; QTEE sees ERROR (1) (§6).

    An honest kernel always places input buffers in the RECV scratch buffer
    (qtee-kernel.md §4.3), so the spy rewrites the returned UBUF_INPUT address to an
    unmapped one: the pool's copy faults (EFAULT) -- the failure a bad pointer causes.
    """
    caplog.set_level(logging.WARNING, logger="qtee.supplicant")
    c, spy = client_with_spy(dev)
    probe = open_probe(c)

    def bad_address(func: int, params: tuple[uapi.Param, ...]) -> tuple[uapi.Param, ...]:
        if func != CB_DATA:
            return params
        assert params[1].attr == UB_IN and params[1].b == 5
        return (params[0], uapi.Param(UB_IN, UNMAPPED, 5), *params[2:])

    spy.tamper = bad_address
    cb = Counter()
    (out,) = probe.invoke(CALL_DATA, b"hello", cb, Out(4))
    assert out == result(Result.ERROR)
    assert cb.calls == []
    assert wait_until(lambda: spy.releases() == [1] and spy.idle())
    assert spy.sends == [Sent(UNAVAIL, (meta(0),))]
    assert spy.sends[0].ret == 0xFFFF_FFA0
    warnings = [r.getMessage() for r in caplog.records if "cannot unmarshal" in r.getMessage()]
    assert warnings == [
        f"request 0 for {cb!r} op {CB_DATA}: cannot unmarshal: "
        f"[EFAULT] Bad address: user range {UNMAPPED:#x}+5 is not mapped"
    ]
    probe.release()
    close_all(dev, c)


def test_unmarshal_failure_releases_input_objects_already_converted(dev: Device) -> None:
    """quic-teec.md §2.3 dispatch 3: an input QTEE object becomes an object the
    dispatcher owns (qtee-kernel.md §4.3: a new id in the supplicant's IDR); when a later
    parameter cannot be unmarshalled the reply is UNAVAIL and that object is released
    again (op 0xFFFF on its id), so the context's IDR holds only what it held before.

    The spy turns the OBJREF_OUTPUT slot (after the input object) into UBUF_INOUT, an
    attr the pool does not expect.
    """
    c, spy = client_with_spy(dev)
    probe = open_probe(c)

    def bad_attr(func: int, params: tuple[uapi.Param, ...]) -> tuple[uapi.Param, ...]:
        if func != CB_OBJ:
            return params
        return (*params[:2], uapi.Param(uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_INOUT))

    spy.tamper = bad_attr
    cb = Counter()
    (out,) = probe.invoke(CALL_OBJ, cb, Out(4))
    assert out == result(Result.ERROR)
    assert cb.calls == []
    assert wait_until(lambda: spy.releases() == [1] and spy.idle())
    func, params = spy.recvs[0]
    assert func == CB_OBJ
    assert params[1].attr == OBJ_IN and params[1].b == TEE
    assert spy.sends == [Sent(UNAVAIL, (meta(0),))]
    dropped = [(head.id, head.op) for head, _ in spy.invokes if head.op == RELEASE]
    assert dropped == [(params[1].a, RELEASE)]
    assert len(c.ctx.objects) == 1  # the probe handle only
    probe.release()
    close_all(dev, c)


# ------------------------------------------------------------------------------ rule 4


def test_release_notification_drops_a_reference_and_sends_nothing(dev: Device) -> None:
    """quic-teec.md §2.3 dispatch 4 and §6: a release (op 65535) drops one reference and
    is never answered (qtee-kernel.md §4.3: the request is already freed)."""
    c, spy = client_with_spy(dev)
    probe = open_probe(c)
    cb = Counter()
    assert call(probe, cb, CB_OK) == result(Result.OK)
    assert wait_until(lambda: c.exported() == 0 and spy.idle())
    assert cb.calls == ["ok"]
    assert spy.recvs == [
        (CB_OK, (uapi.Param(META_IN, 1, 0),)),
        (RELEASE, (uapi.Param(META_IN, 1, 0),)),
    ]
    assert spy.sends == [Sent(0, (meta(0),))]  # the answer to op 0 only
    probe.release()
    close_all(dev, c)


# ------------------------------------------------------------------------------ rule 5


def test_handler_errors_and_the_worker_survives(
    dev: Device, caplog: pytest.LogCaptureFixture
) -> None:
    """quic-teec.md §2.3 dispatch 5: a non-zero result is sent as ``ret``; §6 and
    qtee-kernel.md §3.6: positive results pass unchanged (QteeError(12) -> 12); any other
    exception is ERROR (1), logged with object class, method and op; the one worker goes
    on serving."""
    caplog.set_level(logging.WARNING)
    c, spy = client_with_spy(dev)
    probe = open_probe(c)
    cb = Counter()
    for n, (cb_op, seen) in enumerate(
        [(CB_USER_ERROR, 12), (CB_RAISE, Result.ERROR), (CB_OK, Result.OK)], 1
    ):
        assert call(probe, cb, cb_op) == result(seen)
        # Wait for the release notification, so the next request id is 0 again (the
        # object is exported anew each time: ids go round-robin, quic-teec.md §2.2).
        assert wait_until(lambda n=n: spy.releases() == [1, 2, 3][:n] and spy.idle())
    assert cb.calls == ["user_error", "explode", "ok"]
    assert spy.sends == [Sent(12, (meta(0),)), Sent(1, (meta(0),)), Sent(0, (meta(0),))]
    raised = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [(r.name, r.getMessage()) for r in raised] == [
        ("qtee.objects", f"Counter.explode (op {CB_RAISE}) raised")
    ]
    assert raised[0].exc_info is not None and raised[0].exc_info[0] is ValueError
    assert c.pool is not None and c.pool.alive() == 1
    probe.release()
    close_all(dev, c)


# ------------------------------------------------------------------------------ rule 6


def test_deadline_answers_busy_and_drops_the_late_answer(
    dev: Device, caplog: pytest.LogCaptureFixture
) -> None:
    """WorkerPool deadline (supplicant/_pool.py): a handler running past ``deadline`` is
    answered -EBUSY by the watchdog, which the kernel maps to ERROR_BUSY (-99)
    (qtee-kernel.md §3.6); other requests are served by the other worker meanwhile
    (quic-teec.md §2.4: several threads serve one context); the late answer is dropped."""
    caplog.set_level(logging.WARNING, logger="qtee.supplicant")
    c, spy = client_with_spy(dev, workers=2, deadline=0.2)
    probe = open_probe(c)
    sleeper = Sleeper()
    slow: list[object] = []
    t0 = time.monotonic()
    caller = threading.Thread(target=lambda: slow.append(call(probe, sleeper, 0)))
    caller.start()
    assert sleeper.entered.wait(2)
    t1 = time.monotonic()
    assert call(probe, sleeper, 1) == result(Result.OK)  # served by the other worker
    assert time.monotonic() - t1 < 0.2
    caller.join(2)
    assert slow == [result(Result.ERROR_BUSY)]
    assert time.monotonic() - t0 < 0.5
    assert not sleeper.done.is_set()
    assert sleeper.done.wait(2)
    late = f"request 0 for {sleeper!r} op 0 answered after its deadline"
    assert wait_until(lambda: late in [r.getMessage() for r in caplog.records])
    assert wait_until(lambda: c.exported() == 0 and spy.idle(2))
    # The fast request (id 1) answered first, then the watchdog for id 0; nothing late.
    assert spy.sends == [Sent(0, (meta(1),)), Sent(EBUSY, (meta(0),))]
    assert spy.sends[1].ret == 0xFFFF_FFF0
    probe.release()
    close_all(dev, c)
    assert c.pool is not None and c.pool.alive() == 0


# ------------------------------------------------------------------------------ rule 7


def test_stop_with_queued_requests_gives_defunct_promptly(dev: Device) -> None:
    """WorkerPool.stop closes the context: qtee-kernel.md §4.5 / §2.3 close_context -- the
    request in progress and the queued ones complete with -ENODEV, QTEE result DEFUNCT
    (-90) (§3.6); quic-teec.md §2.4: the pool joins every thread.

    The TA calls come from another client (another context): the hosting one is closed.
    """
    before = supplicant_threads()
    host, _ = client_with_spy(dev, workers=1)
    other = Client(dev, workers=0)
    probe_host, probe_other = open_probe(host), open_probe(other)
    blocker = Blocker()
    probe_host.invoke(KEEP, blocker)
    results: list[object] = []

    def ta_call() -> None:
        (out,) = probe_other.invoke(CALL_KEPT, struct.pack("<II", 0, 0), Out(4))
        results.append(out)

    callers = [threading.Thread(target=ta_call) for _ in range(4)]
    for t in callers:
        t.start()
    assert blocker.entered.wait(2)
    assert wait_until(lambda: len(host.ctx.requests) == 4)  # 1 in dispatch, 3 queued
    pool = host.pool
    assert pool is not None
    t0 = time.monotonic()
    stopper = threading.Thread(target=pool.stop)
    stopper.start()
    for t in callers:
        t.join(1)
    assert time.monotonic() - t0 < 1.0
    assert results == [result(Result.ERROR_DEFUNCT)] * 4
    assert not blocker.left.is_set()  # the worker was still in its handler
    blocker.leave.set()
    stopper.join(2)
    assert not stopper.is_alive()
    assert pool.alive() == 0
    assert supplicant_threads() == before
    probe_other.invoke(DROP_ALL)  # the notification to the closed context is dropped
    probe_other.release()
    close_all(dev, other, host)


# ------------------------------------------------------------------------------ rule 8


def test_context_closed_mid_dispatch_late_send_is_ebadf(
    dev: Device, caplog: pytest.LogCaptureFixture
) -> None:
    """qtee-kernel.md §4.5: closing the fd completes the request in progress with -ENODEV
    (QTEE: DEFUNCT); the worker's late SEND then fails -- here EBADF, as on Linux where
    the fd is gone; the worker ends and nothing leaks."""
    caplog.set_level(logging.WARNING, logger="qtee.supplicant")
    c, spy = client_with_spy(dev, workers=1)
    probe = open_probe(c)
    blocker = Blocker()
    got: list[object] = []
    caller = threading.Thread(target=lambda: got.append(call(probe, blocker, 0)))
    caller.start()
    assert blocker.entered.wait(2)
    t0 = time.monotonic()
    c.ctx.close()
    caller.join(1)
    assert time.monotonic() - t0 < 1.0
    assert got == [result(Result.ERROR_DEFUNCT)]
    blocker.leave.set()
    pool = c.pool
    assert pool is not None
    assert wait_until(lambda: pool.alive() == 0, 2)
    assert spy.sends == [Sent(0, (meta(0),), errno.EBADF)]
    assert [r.getMessage() for r in caplog.records] == [
        "callback request 0: [EBADF] Bad file descriptor: context is closed"
    ]
    close_all(dev, c)


# ------------------------------------------------------------------------------ rule 9


def test_callback_ids_round_robin_reuse_and_limit(dev: Device) -> None:
    """quic-teec.md §2.2: ids 1..1023 round-robin, allocated on first export, reused when
    the same object is sent again (each send released separately), held until the last
    reference goes; a full table fails the invoke before any ioctl (ENOSPC) and the
    caller keeps ownership; an ioctl failure leaves ownership with the caller."""
    c, spy = client_with_spy(dev, workers=1)
    probe = open_probe(c)
    a, b = Counter(), Counter()
    probe.invoke(KEEP, a)
    probe.invoke(KEEP, b)
    probe.invoke(KEEP, a)  # kept = [a, b, a]
    assert spy.sent_user_ids(KEEP) == [1, 2, 1]
    assert c.exported() == 2

    probe.invoke(DROP, struct.pack("<I", 0))  # kept = [b, a]: a still held once
    assert wait_until(lambda: spy.releases() == [1] and spy.idle())
    assert c.exported() == 2
    probe.invoke(DROP, struct.pack("<I", 1))  # kept = [b]: id 1 is free now
    assert wait_until(lambda: spy.releases() == [1, 1] and spy.idle())
    assert c.exported() == 1

    probe.invoke(KEEP, Counter())  # kept = [b, c]
    assert spy.sent_user_ids(KEEP)[-1] == 3  # round-robin: not 1

    # ioctl failure (unknown target -> EINVAL): ownership stays with the caller.
    bad = ObjRef(c, 4242)
    with pytest.raises(DriverError) as exc:
        bad.invoke(KEEP, Counter())  # took id 4, then gave it back
    assert exc.value.code == errno.EINVAL
    assert c.exported() == 2
    with pytest.raises(DriverError) as exc:
        bad.invoke(KEEP, b)
    assert exc.value.code == errno.EINVAL
    probe.invoke(DROP, struct.pack("<I", 0))  # kept = [c]: b's only reference
    assert wait_until(lambda: spy.releases() == [1, 1, 2] and spy.idle())
    assert c.exported() == 1  # the failed send of b added no reference

    # Fill the table: 1022 more (ids 5..1023, then 1, 2, 4 after wrapping).
    fresh = [Counter() for _ in range(1022)]
    n_before = len(spy.sent_user_ids(KEEP15))
    for i in range(0, 1020, 15):
        probe.invoke(KEEP15, *fresh[i : i + 15])
    probe.invoke(KEEP, fresh[1020])
    probe.invoke(KEEP, fresh[1021])
    filled = spy.sent_user_ids(KEEP15)[n_before:] + spy.sent_user_ids(KEEP)[-2:]
    assert filled == [*range(5, 1024), 1, 2, 4]
    assert c.exported() == 1023

    n_invokes = len(spy.invokes)
    with pytest.raises(DriverError) as exc:
        probe.invoke(KEEP, Counter())
    assert exc.value.code == errno.ENOSPC
    assert len(spy.invokes) == n_invokes  # no ioctl was issued
    assert c.exported() == 1023

    probe.invoke(DROP_ALL)
    probe.invoke(NOTHING)  # 1023 releases need two returns to the kernel
    assert dev.world.pending_releases() == []
    assert wait_until(lambda: c.exported() == 0 and spy.idle())
    assert len(spy.releases()) == 3 + 1023
    probe.release()
    close_all(dev, c)


def test_failed_marshalling_keeps_ownership_of_earlier_arguments(dev: Device) -> None:
    """quic-teec.md §2.2 ownership rule: only a successful invoke moves input callback
    objects to QTEE; when marshalling fails no ioctl is issued and the caller keeps them,
    so nothing may stay exported."""
    c, spy = client_with_spy(dev, workers=1)
    probe = open_probe(c)
    n_invokes = len(spy.invokes)
    with pytest.raises(TypeError):
        probe.invoke(KEEP15, Counter(), object())
    assert len(spy.invokes) == n_invokes
    try:
        assert c.exported() == 0
    finally:
        probe.release()
        close_all(dev, c)


# ------------------------------------------------------------------------------ rule 10


def test_context_manager_shutdown_leaves_no_threads(dev: Device) -> None:
    """quic-teec.md §2.4: on root release the supplicant joins all of its threads
    (MinkIPC: 4 threads); ``with Client(dev, workers=4)`` does the same."""
    before = supplicant_threads()
    with Client(dev, workers=4) as c:
        assert c.pool is not None and c.pool.alive() == 4
        assert len(supplicant_threads()) == len(before) + 4
        probe = open_probe(c)
        cb = Counter()
        assert call(probe, cb, CB_OK) == result(Result.OK)
        assert wait_until(lambda: c.exported() == 0)
        probe.release()
    assert c.pool.alive() == 0
    assert supplicant_threads() == before
    assert dev.leaks() == {}
