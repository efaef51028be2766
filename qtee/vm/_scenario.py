"""The invoke-loop scenario as a workload: what ``qtee vm`` runs in the host and each guest.

:func:`run_invoke_loop` opens a client on a device (a host ``Device`` or a guest's),
loads the scenario TA, and repeats one round -- add two numbers, a callback with buffers,
an object out and back through a callback, shared memory written by the TA -- counting
rounds that held and calls that failed, until ``iterations`` rounds are done or ``stop``
is set.  A call failing because the VM went away ends the loop (counted, not raised).
"""

from __future__ import annotations

import contextlib
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from objects import DriverError, QteeBaseError, QteeError, UsageError, op
from qtee.client import OUT_OBJECT, CallbackObject, Client, Out
from qtee.gp import TeecError, TeecResult
from qtee.secure import NsObject, TrustedApp, register_ta, ta_image
from qtee.secure._gp import GpParam, GpSession, GpTA, GpTaError, register_gp_ta

__all__ = ["GP_SCENARIO_UUID", "SCENARIO_TA", "ScenarioStats", "run_gp_loop", "run_invoke_loop"]

#: The name the scenario TA is registered under.
SCENARIO_TA = "qtee.vm.scenario"
#: The UUID of the GP scenario TA (what an OP-TEE guest's loop opens sessions to).
GP_SCENARIO_UUID = uuid.UUID("8aaaf200-2450-11e4-abe2-0002a5d5c51b")
_GP_ADD, _GP_FILL = 0, 1
_GP_GREETING = b"hello from OP-TEE"


class _ScenarioTA(TrustedApp):
    @op(0, ib=(8,), ob=(4,))
    def add(self, pair: bytes) -> bytes:
        a, b = struct.unpack("<II", pair)
        return struct.pack("<I", (a + b) & 0xFFFF_FFFF)

    @op(1, io=1, ob=(None,))
    def call_back(self, cb: NsObject) -> bytes:
        res = cb.invoke(0, [b"TA"], [32])
        if res.result:
            raise QteeError(res.result)
        return res.ob[0]

    @op(2, io=1, ob=(4,))
    def object_round_trip(self, cb: NsObject) -> bytes:
        res = cb.invoke(1, io=[self], n_oo=1)
        if res.result:
            raise QteeError(res.result)
        return struct.pack("<I", 1 if res.oo[0] is self else 0)

    @op(3, io=1, ib=(4,))
    def fill(self, tag: bytes, mem: NsObject) -> None:
        mapping = self.world.map_region(mem)
        try:
            mapping.view[:8] = b"TA wrote"
            mapping.view[8:12] = tag
        finally:
            mapping.unmap()


class _Peer(CallbackObject):
    def __init__(self, hook: Callable[[int], None] | None) -> None:
        self.hook = hook
        self.round = 0

    @op(0, ib=(None,), ob=(None,))
    def greet(self, name: bytes) -> bytes:
        if self.hook is not None:
            self.hook(self.round)  # inside a callback: the TA's call is in flight
        return b"hello " + name

    @op(1, io=1, oo=1)
    def echo(self, obj: object) -> object:
        return obj


class _GpScenarioTA(GpTA):
    """ADD two values; FILL an output memref with a greeting."""

    UUID = GP_SCENARIO_UUID

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
        if cmd == _GP_ADD:
            params[1].a = (params[0].a + params[0].b) & 0xFFFF_FFFF
        elif cmd == _GP_FILL:
            buf = params[0].buffer
            if buf is None or params[0].size < len(_GP_GREETING):
                params[0].size = len(_GP_GREETING)
                raise GpTaError(TeecResult.TEEC_ERROR_SHORT_BUFFER)
            buf[: len(_GP_GREETING)] = _GP_GREETING
            params[0].size = len(_GP_GREETING)
        else:
            raise GpTaError(TeecResult.TEEC_ERROR_NOT_SUPPORTED)


register_ta(SCENARIO_TA, _ScenarioTA)
register_gp_ta(_GpScenarioTA)


@dataclass(slots=True)
class ScenarioStats:
    """What one loop did: rounds that held, rounds with a wrong answer, failed calls by
    error, and the error that ended it early (None when it ran to the end)."""

    rounds: int = 0
    wrong: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    ended_by: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Every round held and the loop was not cut short."""
        return self.wrong == 0 and not self.errors and self.ended_by is None


def _error_name(exc: BaseException) -> str:
    if isinstance(exc, TeecError):
        return f"TEEC {exc.code:#x} origin {exc.origin}"
    if isinstance(exc, QteeError):
        return f"result {exc.result}"
    if isinstance(exc, DriverError):
        return f"errno {exc.code}"
    return type(exc).__name__


def run_invoke_loop(
    device: Any,
    iterations: int,
    *,
    stop: threading.Event | None = None,
    workers: int = 2,
    in_callback: Callable[[int], None] | None = None,
) -> ScenarioStats:
    """Run the scenario on ``device`` for ``iterations`` rounds (or until ``stop``).

    ``in_callback(round)`` runs in each round's callback, while the TA's call waits on it
    (``qtee vm --destroy`` destroys a VM from there, mid-call)."""
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 0:
        raise UsageError(f"iterations must be an int >= 0, not {iterations!r}")
    stats = ScenarioStats()
    t0 = time.monotonic()
    try:
        client = Client(device, workers=workers)
    except (QteeBaseError, OSError) as exc:
        stats.ended_by = _error_name(exc)
        return stats
    refs = []
    try:
        env = client.client_env()
        refs.append(env)
        loader = client.open_service(env, 3)
        refs.append(loader)
        (ctrl,) = loader.invoke(0, ta_image(SCENARIO_TA), OUT_OBJECT)
        refs.append(ctrl)
        (app,) = ctrl.invoke(2, OUT_OBJECT)
        refs.append(app)
        peer = _Peer(in_callback)
        with client.memory(64) as mem:
            for n in range(iterations):
                if stop is not None and stop.is_set():
                    break
                peer.round = n
                (total,) = app.invoke(0, struct.pack("<II", n, 7), Out(4))
                (hello,) = app.invoke(1, peer, Out(32))
                (same,) = app.invoke(2, peer, Out(4))
                tag = struct.pack("<I", n)
                app.invoke(3, mem, tag)
                good = (
                    struct.unpack("<I", total)[0] == n + 7
                    and hello == b"hello TA"
                    and same == b"\x01\x00\x00\x00"
                    and bytes(mem.view[:12]) == b"TA wrote" + tag
                )
                if good:
                    stats.rounds += 1
                else:
                    stats.wrong += 1
        ctrl.invoke(1)  # unload, so the next loop on this TEE can load it again
    except (QteeBaseError, OSError) as exc:
        stats.errors[_error_name(exc)] += 1
        stats.ended_by = _error_name(exc)
    finally:
        for ref in reversed(refs):
            with contextlib.suppress(QteeBaseError, OSError):  # the VM went, with them
                ref.release()
        client.close()
        stats.seconds = time.monotonic() - t0
    return stats


def run_gp_loop(
    device: Any, iterations: int, *, stop: threading.Event | None = None
) -> ScenarioStats:
    """The GP counterpart on an OP-TEE device (a host ``OpteeDevice`` or a guest's): each
    round opens a session, adds two values, fills an output buffer, closes the session."""
    from qtee.gp import (
        TeecContext,
        TeecOperation,
        TeecParamType,
        TeecTempMemoryReference,
        TeecValue,
        param_types,
    )

    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 0:
        raise UsageError(f"iterations must be an int >= 0, not {iterations!r}")
    t = TeecParamType
    stats = ScenarioStats()
    t0 = time.monotonic()
    ctx = None
    try:
        ctx = TeecContext(device)
        for n in range(iterations):
            if stop is not None and stop.is_set():
                break
            with ctx.open_session(GP_SCENARIO_UUID) as session:
                add = TeecOperation(
                    param_types(t.TEEC_VALUE_INPUT, t.TEEC_VALUE_OUTPUT, 0, 0),
                    [TeecValue(n, 7), TeecValue()],
                )
                session.invoke_command(_GP_ADD, add)
                got = bytearray(32)
                out = TeecTempMemoryReference(got)
                fill = TeecOperation(param_types(t.TEEC_MEMREF_TEMP_OUTPUT, 0, 0, 0), [out])
                session.invoke_command(_GP_FILL, fill)
            total = add.params[1]
            good = (
                isinstance(total, TeecValue)
                and total.a == n + 7
                and bytes(got[: out.size]) == _GP_GREETING
            )
            if good:
                stats.rounds += 1
            else:
                stats.wrong += 1
    except (QteeBaseError, OSError) as exc:
        stats.errors[_error_name(exc)] += 1
        stats.ended_by = _error_name(exc)
    finally:
        if ctx is not None:
            with contextlib.suppress(QteeBaseError, OSError):
                ctx.finalize()
        stats.seconds = time.monotonic() - t0
    return stats
