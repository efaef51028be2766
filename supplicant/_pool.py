"""The supplicant worker pool: threads that serve callback requests of one context.

Each worker loops on SUPPL_RECV, dispatches the request to the callback object it names
and answers with SUPPL_SEND, following libqcomtee's ``qcomtee_object_process_one``:

1. no exported object with that id -> ``DEFUNCT`` (-90) in the SEND ``ret``;
2. an op the object's table does not have -> ``BADOBJ`` (-92), without dispatching;
3. arguments that cannot be unmarshalled -> ``UNAVAIL`` (-96);
4. a release notification (op 0xFFFF) drops one reference and is never answered;
5. otherwise the object's method runs; a :class:`objects.QteeError` it raises is its
   result; any other exception, or outputs its ``@op`` does not allow (an output object
   of another kind, a fixed-size output buffer of another length), is ``ERROR`` (1) and
   is logged once with the object and op.

Output objects: a callback object returned gets a callback id that QTEE holds (one
reference per send, given back by a release notification); an :class:`~qtee.ObjRef` or
:class:`~qtee.MemoryObject` returned stays the handler's, unless it comes in a
:class:`~qtee.Transfer`, which the worker releases exactly once after SUPPL_SEND returns
(what libqcomtee leaves to ``error()``, called after the response is submitted), also
when the answer is a failure.  If the answer never reaches QTEE -- the outputs cannot be
marshalled, SUPPL_SEND fails, or the watchdog answered first -- the callback ids taken
for it are given back at once: the kernel made no object of them, so no release
notification will come.

The kernel passes a negative ``ret`` to QTEE through ``qcomtee_msg_set_result``, so QTEE
sees -90/-92/-96 as ``ERROR``; positive results pass unchanged (qtee-kernel.md §3.6).

A worker never dies from a handler.  With ``deadline`` set, a request whose handler runs
longer is answered ``-EBUSY`` (QTEE sees ``ERROR_BUSY``) by a watchdog, and the late
answer is dropped.  :meth:`WorkerPool.stop` closes the context -- queued and in-flight
requests complete with ``DEFUNCT`` for the TA, blocked receivers wake -- and joins every
thread.
"""

from __future__ import annotations

import errno
import itertools
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Final

from objects import DriverError, UsageError
from qtee import Result, uapi
from qtee.client import ArgBlock, CallbackObject, MemoryObject, ObjRef, Transfer
from qtee.uapi import PARAM_STRUCT as _PARAM
from qtee.uapi import SUPP_ARG_STRUCT as _SUPP_HEAD
from qtee.uapi import params_struct as _params_struct

if TYPE_CHECKING:
    from qtee.client import Client

__all__ = ["WorkerPool"]

log = logging.getLogger("qtee.supplicant")

#: 1 meta + QCOMTEE_OBJECT_PARAMS_MAX (10) params per RECV, as libqcomtee.
RECV_PARAMS: Final = 11
#: Bytes of the scratch buffer input buffers are copied into (libqcomtee: 1024 on the stack).
SCRATCH_SIZE: Final = 4096
OP_RELEASE: Final = 0xFFFF
#: What a callback object's method may return as an output object (besides None); the
#: dispatch refuses anything else as the handler's bug (ERROR, logged once).
OUTPUT_KINDS: Final = (CallbackObject, ObjRef, MemoryObject, Transfer)


_P = tuple[int, int, int, int]  # one struct tee_ioctl_param: attr, a, b, c
_META_IN: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_INOUT | uapi.TEE_IOCTL_PARAM_ATTR_META
_META_OUT: Final = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_OUTPUT | uapi.TEE_IOCTL_PARAM_ATTR_META


_SUPPL_RECV: Final = uapi.TEE_IOC_SUPPL_RECV
_SUPPL_SEND: Final = uapi.TEE_IOC_SUPPL_SEND
_HEAD_SIZE: Final = _SUPP_HEAD.size

#: The SEND blocks a worker writes: 1 meta + up to RECV_PARAMS - 1 params, by count.
_REPLY_STRUCTS: Final = tuple(_params_struct(n) for n in range(RECV_PARAMS + 1))


class _InFlight:
    """One request being dispatched; answered exactly once (by its worker or the watchdog)."""

    __slots__ = ("answered", "due", "obj", "op", "req")

    def __init__(self, req: int, obj: object, op: int, due: float) -> None:
        self.req = req
        self.obj = obj
        self.op = op
        self.due = due
        self.answered = False


class WorkerPool:
    """``workers`` threads serving the callback objects a :class:`qtee.Client` exports."""

    def __init__(self, client: Client, workers: int = 4, *, deadline: float | None = None) -> None:
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise UsageError(f"workers must be an int >= 1, not {workers!r}")
        if deadline is not None and (not isinstance(deadline, int | float) or deadline <= 0):
            raise UsageError(f"deadline must be a number of seconds > 0, not {deadline!r}")
        self.client = client
        self.deadline = deadline
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._in_flight: list[_InFlight] = []
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._serve, name=f"qtee-supplicant-{i}", daemon=True)
            for i in range(workers)
        ]
        if deadline is not None:
            self._threads.append(
                threading.Thread(
                    target=self._watchdog, name="qtee-supplicant-watchdog", daemon=True
                )
            )
        for t in self._threads:
            t.start()

    @property
    def workers(self) -> int:
        """Number of worker threads."""
        return sum(1 for t in self._threads if not t.name.endswith("watchdog"))

    def alive(self) -> int:
        """Threads of this pool still running (0 after :meth:`stop`)."""
        return sum(1 for t in self._threads if t.is_alive())

    # ----------------------------------------------------------------- lifecycle
    def stop(self, timeout: float = 5.0, *, wait: bool = True) -> None:
        """Close the context (pending requests -> DEFUNCT) and join every thread.

        ``wait=False`` (the process is going down: Ctrl-C) joins none: the threads are
        daemons, a RECV ends at once with EINTR, and a handler still running ends with
        its own code, its answer refused on the closed fd."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        self.client.ctx.close()
        if not wait:
            return
        end = time.monotonic() + timeout
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(max(0.0, end - time.monotonic()))
        left = [t.name for t in self._threads if t.is_alive()]
        if left:
            raise UsageError(f"supplicant threads still running after {timeout}s: {left}")

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- workers
    def _serve(self) -> None:
        client = self.client
        mem = client.device.memory
        scratch = bytearray(SCRATCH_SIZE)
        base = mem.pin(scratch)
        recv = client.new_block()
        send = client.new_block()
        size = _SUPP_HEAD.size + 32 * RECV_PARAMS
        request = _SUPP_HEAD.pack(0, RECV_PARAMS) + _params_struct(RECV_PARAMS).pack(
            _META_IN, base, SCRATCH_SIZE, 0, *(0,) * (4 * (RECV_PARAMS - 1))
        )
        buf = recv.buf
        busy = 0.0
        try:
            while not self._stopping:
                buf[:size] = request
                try:
                    client.call(_SUPPL_RECV, recv, size)
                except DriverError as exc:
                    if exc.code == errno.EBUSY:  # a device server's cap on waiting RECVs
                        if not busy:
                            log.warning("SUPPL_RECV: %s; retrying", exc)
                        busy = min(busy * 2, 1.0) if busy else 0.01
                        time.sleep(busy)
                        continue
                    if exc.code not in (errno.EINTR, errno.EBADF):
                        log.error("SUPPL_RECV failed: %s", exc)
                    return
                busy = 0.0
                func, num = _SUPP_HEAD.unpack_from(buf)
                got = list(_PARAM.iter_unpack(buf[_HEAD_SIZE : _HEAD_SIZE + 32 * num]))
                try:
                    self._handle(func, got, send, scratch, base)
                except DriverError as exc:
                    log.warning("callback request %d: %s", got[0][2], exc)
                except Exception:  # never let a request take the worker down
                    log.exception("callback request %d (op %d) failed", got[0][2], func)
        finally:
            recv.close()
            send.close()
            mem.unpin(base)

    def _handle(
        self, func: int, p: list[_P], send: ArgBlock, scratch: bytearray, base: int
    ) -> None:
        client = self.client
        uid, req = p[0][1], p[0][2]
        if func == OP_RELEASE:
            client.exports.unexport(uid)  # release notification: never answered
            return
        obj = client.exports.get(uid)
        if obj is None:
            self._reply(send, Result.ERROR_DEFUNCT, [(_META_OUT, req, 0, 0)])
            return
        if not obj.supports(func):
            log.warning(
                "%s has no op %d (its ops: %s): answered BADOBJ",
                type(obj).__name__,
                func,
                ", ".join(str(n) for n in sorted(type(obj).__ops__)) or "none",
            )
            self._reply(send, Result.ERROR_BADOBJ, [(_META_OUT, req, 0, 0)])
            return
        args = p[1:]
        if args:
            try:
                ib, ob, io, n_oo = self._unmarshal(args, scratch, base)
            except Exception as exc:  # any failure here is UNAVAIL
                log.warning("request %d for %r op %d: cannot unmarshal: %s", req, obj, func, exc)
                self._reply(send, Result.ERROR_UNAVAIL, [(_META_OUT, req, 0, 0)])
                return
        else:  # a request without arguments (the common callback)
            ib = ob = io = ()
            n_oo = 0
        deadline = self.deadline
        entry = None if deadline is None else self._begin(req, obj, func, deadline)
        pins: list[int] = []
        sent: list[int] = []  # callback ids exported for the answer
        transfers: list[Transfer] = []
        delivered = False
        try:
            res = obj.dispatch(func, ib, ob, io, n_oo, oo_kinds=OUTPUT_KINDS)
            reply: list[_P] = [(_META_OUT, req, 0, 0)]
            result = res.result
            if result == 0:
                if args or res.oo:
                    result = self._marshal(args, res.ob, res.oo, reply, pins, sent, transfers)
                    if result:
                        reply = reply[:1]
            elif res.oo:  # what the handler returned goes nowhere: its Transfers end here too
                transfers += [o for o in res.oo if isinstance(o, Transfer)]
            if entry is None or self._finish(entry):
                self._reply(send, result, reply)
                delivered = result == 0
            else:
                log.warning("request %d for %r op %d answered after its deadline", req, obj, func)
        finally:
            if not delivered:  # QTEE never got the objects: nothing will release the ids
                for uid in sent:
                    client.exports.unexport(uid)
            for addr in pins:
                client.device.memory.unpin(addr)
            for t in transfers:  # after the SEND, whatever it did: exactly once
                try:
                    t.release()
                except Exception:
                    log.exception("request %d: releasing the transferred %r failed", req, t.obj)
            for ref in io:  # input objects the handler did not keep are dropped
                client.drop_input(ref)

    def _unmarshal(
        self, args: list[_P], scratch: bytearray, base: int
    ) -> tuple[tuple[bytes, ...], tuple[int, ...], tuple[Any, ...], int]:
        client = self.client
        mem = client.device.memory
        ib: list[bytes] = []
        ob: list[int] = []
        io: list[Any] = []
        n_oo = 0
        try:
            for attr, a, b, _c in args:
                if attr == uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_INPUT:
                    off = a - base
                    if 0 <= off <= len(scratch) - b:  # in this worker's own scratch buffer
                        ib.append(bytes(scratch[off : off + b]))
                    else:
                        ib.append(mem.read(a, b))
                elif attr == uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_OUTPUT:
                    ob.append(b)
                elif attr == uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_INPUT:
                    io.append(client.from_param(a, b))
                elif attr == uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_OUTPUT:
                    n_oo += 1
                else:
                    raise UsageError(f"unexpected param attr {attr:#x}")
        except BaseException:
            for ref in io:
                client.drop_input(ref)
            raise
        return tuple(ib), tuple(ob), tuple(io), n_oo

    def _marshal(
        self,
        args: list[_P],
        ob_data: tuple[bytes, ...],
        oo: tuple[object, ...],
        reply: list[_P],
        pins: list[int],
        sent: list[int],
        transfers: list[Transfer],
    ) -> int:
        """Outputs -> reply params (index-aligned with the request); UNAVAIL on failure.
        Callback ids exported go to ``sent``, :class:`~qtee.Transfer` s to ``transfers``
        (all of them, even when a later output fails)."""
        client = self.client
        mem = client.device.memory
        transfers += [o for o in oo if isinstance(o, Transfer)]
        obs, oos = iter(ob_data), iter(oo)
        try:
            for x in args:
                if x[0] == uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_OUTPUT:
                    data = bytes(next(obs))
                    addr = 0
                    if data:
                        addr = mem.pin(data)
                        pins.append(addr)
                    reply.append((uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_OUTPUT, addr, len(data), 0))
                elif x[0] == uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_OUTPUT:
                    value = next(oos)
                    if isinstance(value, Transfer):
                        value = value.obj
                    _attr, a, b, _c = client.to_param(value, sent)
                    reply.append((uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_OUTPUT, a, b, 0))
                else:
                    reply.append(x)
        except Exception as exc:  # libqcomtee: marshalling out fails -> UNAVAIL
            log.warning("cannot marshal the outputs: %s", exc)
            return Result.ERROR_UNAVAIL
        return 0

    def _reply(self, send: ArgBlock, ret: int, reply: list[_P]) -> None:
        n = len(reply)
        buf = send.buf
        _SUPP_HEAD.pack_into(buf, 0, ret & 0xFFFF_FFFF, n)
        if n == 1:  # (the common answer: the meta param alone)
            _PARAM.pack_into(buf, _HEAD_SIZE, *reply[0])
        else:
            layout = _REPLY_STRUCTS[n] if n <= RECV_PARAMS else _params_struct(n)
            layout.pack_into(buf, _HEAD_SIZE, *itertools.chain.from_iterable(reply))
        self.client.call(_SUPPL_SEND, send, _HEAD_SIZE + 32 * n)

    # ----------------------------------------------------------------- deadlines
    def _begin(self, req: int, obj: CallbackObject, op: int, deadline: float) -> _InFlight:
        """Put the request under the watchdog, due ``deadline`` seconds from now."""
        entry = _InFlight(req, obj, op, time.monotonic() + deadline)
        with self._wake:
            self._in_flight.append(entry)
            self._wake.notify()
        return entry

    def _finish(self, entry: _InFlight) -> bool:
        """True when the worker may answer (the watchdog has not)."""
        with self._wake:
            if entry.answered:
                return False
            entry.answered = True
            self._in_flight.remove(entry)
            return True

    def _watchdog(self) -> None:
        send = self.client.new_block()
        try:
            while True:
                with self._wake:
                    if self._stopping:
                        return
                    now = time.monotonic()
                    late = [e for e in self._in_flight if e.due <= now]
                    for e in late:
                        e.answered = True
                        self._in_flight.remove(e)
                    if not late:
                        nxt = min((e.due for e in self._in_flight), default=now + 1.0)
                        self._wake.wait(max(0.0, nxt - now))
                        continue
                for e in late:
                    log.warning(
                        "request %d for %r op %d missed its %.3fs deadline: BUSY",
                        e.req,
                        e.obj,
                        e.op,
                        self.deadline,
                    )
                    try:
                        self._reply(send, -errno.EBUSY, [(_META_OUT, e.req, 0, 0)])
                    except DriverError as exc:
                        log.warning("deadline answer for request %d failed: %s", e.req, exc)
        finally:
            send.close()
