"""Callback requests to userspace objects over SUPPL_RECV/SEND (qtee-kernel.md §4.2-§4.5)."""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterator

import pytest

from objects import DriverError, op
from qtee import Context, Device, Result, uapi
from qtee.addrspace import CheckedMemory
from qtee.secure import NsObject, SecureObject, SecureWorld
from tests._helpers import (
    META_IN,
    META_OUT,
    OBJ_IN,
    OBJ_OUT,
    UB_IN,
    UB_OUT,
    USER,
    InvokeThread,
    raw_invoke,
    recv,
    send,
    wait_until,
)


class Caller(SecureObject):
    @op(0, io=1, ob=(None,))
    def call(self, cb: NsObject) -> bytes:
        res = cb.invoke(5, [b"hi"], [8])
        if res.result != Result.OK:
            from objects import QteeError

            raise QteeError(res.result)
        return res.ob[0]


class Giver(SecureObject):
    @op(0, io=1)
    def give(self, cb: NsObject) -> None:
        res = cb.invoke(6, io=[self])
        if res.result != Result.OK:
            from objects import QteeError

            raise QteeError(res.result)


class Root(SecureObject):
    @op(0, oo=1)
    def open(self) -> SecureObject:
        return Caller()

    @op(1, oo=1)
    def open_giver(self) -> SecureObject:
        return Giver()


@pytest.fixture
def env() -> Iterator[tuple[Device, Context, CheckedMemory]]:
    mem = CheckedMemory()
    dev = Device(SecureWorld(Root()), memory=mem)
    ctx = dev.open()
    yield dev, ctx, mem
    ctx.close()


def test_callback_round_trip_and_release_notification(
    env: tuple[Device, Context, CheckedMemory],
) -> None:
    _, ctx, mem = env
    raw_invoke(ctx, mem, uapi.TEE_OBJREF_NULL, 0, [uapi.Param(OBJ_OUT)])
    out = bytearray(16)
    t = InvokeThread(
        ctx, mem, 0, 0, [uapi.Param(OBJ_IN, 77, USER), uapi.Param(UB_OUT, mem.map(out), 16)]
    )
    head, params, scratch = recv(ctx, mem)
    # §4.3: func = op; meta a = user id, b = request id; IB packed at the scratch end.
    assert head.func == 5 and head.num_params == 3
    assert (params[0].attr, params[0].a, params[0].b) == (META_IN, 77, 0)
    assert params[1].attr == UB_IN and params[1].b == 2
    assert scratch[248:250] == b"hi"
    assert (params[2].attr, params[2].a, params[2].b) == (UB_OUT, 0, 8)
    reply = bytearray(b"pong")
    send(
        ctx,
        mem,
        0,
        [
            uapi.Param(META_OUT, params[0].b),
            uapi.Param(UB_IN, params[1].a, 2),
            uapi.Param(UB_OUT, mem.map(reply), 4),
        ],
    )
    ihead, iparams = t.outcome()
    assert ihead.ret == 0 and iparams[1].b == 4 and out[:4] == b"pong"
    # QTEE dropped the callback object: a release notification, never answered.
    head, params, _ = recv(ctx, mem)
    assert head.func == 0xFFFF and head.num_params == 1
    assert (params[0].a, params[0].b) == (77, 0)
    assert len(ctx.requests) == 0
    raw_invoke(ctx, mem, 0, 0xFFFF, [])


def test_supplicant_error_maps_to_result(env: tuple[Device, Context, CheckedMemory]) -> None:
    _, ctx, mem = env
    raw_invoke(ctx, mem, uapi.TEE_OBJREF_NULL, 0, [uapi.Param(OBJ_OUT)])
    out = bytearray(16)
    t = InvokeThread(
        ctx, mem, 0, 0, [uapi.Param(OBJ_IN, 5, USER), uapi.Param(UB_OUT, mem.map(out), 16)]
    )
    _, params, _ = recv(ctx, mem)
    # §3.6: a supplicant's ret of (u32)-96 is "any other negative" -> ERROR (1); 12 passes.
    send(ctx, mem, 12, [uapi.Param(META_OUT, params[0].b)])
    assert t.outcome()[0].ret == 12
    # An unknown request id -> EINVAL.
    with pytest.raises(DriverError) as exc:
        send(ctx, mem, 0, [uapi.Param(META_OUT, 99)])
    assert exc.value.errno == errno.EINVAL
    recv(ctx, mem)  # release notification
    raw_invoke(ctx, mem, 0, 0xFFFF, [])


def test_close_with_callback_in_flight_gives_defunct(
    env: tuple[Device, Context, CheckedMemory],
) -> None:
    dev, client_ctx, mem = env
    supp = dev.open()
    raw_invoke(client_ctx, mem, uapi.TEE_OBJREF_NULL, 0, [uapi.Param(OBJ_OUT)])
    # The callback object is the supplicant context's... passed by the client here, so
    # requests go to the client's own context; closing a second context with a blocked
    # RECV must wake it with an error instead of hanging.
    errs: list[int] = []

    def waiter() -> None:
        try:
            recv(supp, mem)
        except DriverError as exc:
            errs.append(exc.code)

    t = threading.Thread(target=waiter)
    t.start()
    supp.close()
    t.join(5)
    assert not t.is_alive() and errs == [errno.EINTR]
    # A request to a context closed under the caller -> DEFUNCT (-90).
    out = bytearray(16)
    t = InvokeThread(
        client_ctx,
        mem,
        0,
        0,
        [uapi.Param(OBJ_IN, 5, USER), uapi.Param(UB_OUT, mem.map(out), 16)],
    )
    assert wait_until(lambda: bool(client_ctx.requests.fifo))
    client_ctx.requests.close()
    assert t.outcome()[0].ret == (Result.ERROR_DEFUNCT & 0xFFFFFFFF)
    raw_invoke(client_ctx, mem, 0, 0xFFFF, [])


def test_qtee_object_passed_to_a_supplicant_section_4_3(
    env: tuple[Device, Context, CheckedMemory],
) -> None:
    dev, ctx, mem = env
    raw_invoke(ctx, mem, uapi.TEE_OBJREF_NULL, 1, [uapi.Param(OBJ_OUT)])
    t = InvokeThread(ctx, mem, 0, 0, [uapi.Param(OBJ_IN, 9, USER)])
    head, params, _ = recv(ctx, mem)
    assert head.func == 6
    # A new id in this fd's IDR (lowest free: 1), flags TEE; the supplicant owns it.
    assert (params[1].attr, params[1].a, params[1].b) == (OBJ_IN, 1, uapi.QCOMTEE_OBJREF_FLAG_TEE)
    send(ctx, mem, 0, [uapi.Param(META_OUT, params[0].b), uapi.Param(OBJ_IN, 1, 1)])
    assert t.outcome()[0].ret == 0
    assert len(dev.world.live_ids()) == 2  # the client's handle and the supplicant's
    raw_invoke(ctx, mem, 1, 0xFFFF, [])  # supplicant drops its copy -> RELEASE to QTEE
    assert len(dev.world.live_ids()) == 1
    recv(ctx, mem)  # the callback object's release notification
    raw_invoke(ctx, mem, 0, 0xFFFF, [])
