"""The client API end to end (qtee-kernel.md §6; quic-teec.md §1.4, §2.2)."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from objects import DriverError, QteeError, UsageError, op
from qtee import Device, Result
from qtee.addrspace import CheckedMemory, ProcessMemory
from qtee.client import OUT_OBJECT, CallbackObject, Client, Out
from qtee.secure import (
    NsObject,
    QteeRoot,
    SecureWorld,
    TrustedApp,
    register_ta,
    ta_image,
    unregister_ta,
)


class Greeter(CallbackObject):
    def __init__(self) -> None:
        self.calls = 0

    @op(0, ib=(None,), ob=(None,))
    def greet(self, name: bytes) -> bytes:
        self.calls += 1
        return b"hello " + name

    @op(1, io=1, oo=1)
    def echo(self, obj: object) -> object:
        return obj

    @op(2)
    def fail(self) -> None:
        raise QteeError(11)


class SampleTA(TrustedApp):
    @op(0, ib=(8,), ob=(4,))
    def add(self, pair: bytes) -> bytes:
        a, b = struct.unpack("<II", pair)
        return struct.pack("<I", a + b)

    @op(1, io=1, ob=(None,))
    def call_back(self, cb: NsObject) -> bytes:
        res = cb.invoke(0, [b"TA"], [32])
        if res.result:
            raise QteeError(res.result)
        return res.ob[0]

    @op(2, io=1)
    def call_fail(self, cb: NsObject) -> None:
        res = cb.invoke(2)
        raise QteeError(res.result)

    @op(3, io=1, ob=(4,))
    def object_round_trip(self, cb: NsObject) -> bytes:
        res = cb.invoke(1, io=[self], n_oo=1)
        if res.result:
            raise QteeError(res.result)
        return struct.pack("<I", 1 if res.oo[0] is self else 0)

    @op(4, io=1)
    def fill(self, mem: NsObject) -> None:
        m = self.world.map_region(mem)
        m.view[:4] = b"QTEE"
        m.unmap()

    @op(5, io=1)
    def keep(self, cb: NsObject) -> None:
        self.kept = cb.retain()

    @op(6, ob=(None,))
    def use_kept(self) -> bytes:
        res = self.kept.invoke(0, [b"later"], [32])
        self.kept.release()
        if res.result:
            raise QteeError(res.result)
        return res.ob[0]


@pytest.fixture(params=["checked", "process"])
def client(request: pytest.FixtureRequest) -> Iterator[Client]:
    register_ta("sample", SampleTA)
    memory = CheckedMemory() if request.param == "checked" else ProcessMemory()
    dev = Device(SecureWorld(QteeRoot()), memory=memory)
    c = Client(dev, workers=2)
    yield c
    c.close()
    unregister_ta("sample")


def load_sample(c: Client) -> tuple[object, ...]:
    env = c.client_env()
    loader = c.open_service(env, 3)
    (ctrl,) = loader.invoke(0, ta_image("sample"), OUT_OBJECT)
    (app,) = ctrl.invoke(2, OUT_OBJECT)
    return env, loader, ctrl, app


def test_feature_versions_and_unknown_uid(client: Client) -> None:
    with client.client_env() as env, client.open_service(env, 2033) as fv:
        (v,) = fv.invoke(0, struct.pack("<I", 10), Out(4))
        assert struct.unpack("<I", v)[0] >> 22 == 2
        with pytest.raises(QteeError) as exc:
            client.open_service(env, 12345)
        assert exc.value.result == 10


def test_ta_add_callbacks_objects_memory(client: Client) -> None:
    env, loader, ctrl, app = load_sample(client)
    assert app.invoke(0, struct.pack("<II", 2, 3), Out(4)) == [struct.pack("<I", 5)]  # type: ignore[attr-defined]
    g = Greeter()
    assert app.invoke(1, g, Out(32)) == [b"hello TA"]  # type: ignore[attr-defined]
    with pytest.raises(QteeError) as exc:
        app.invoke(2, g)  # type: ignore[attr-defined]
    assert exc.value.result == 11  # a positive user error passes unchanged
    assert app.invoke(3, g, Out(4)) == [struct.pack("<I", 1)]  # type: ignore[attr-defined]
    with client.memory(64) as mem:
        app.invoke(4, mem)  # type: ignore[attr-defined]
        assert bytes(mem.view[:4]) == b"QTEE"
    # Retained by the TA after the client forgot about it.
    app.invoke(5, Greeter())  # type: ignore[attr-defined]
    assert app.invoke(6, Out(32)) == [b"hello later"]  # type: ignore[attr-defined]
    for ref in (app, ctrl, loader, env):
        ref.release()  # type: ignore[attr-defined]
    assert g.calls == 1


def test_errno_channel(client: Client) -> None:
    env = client.client_env()
    with pytest.raises(DriverError):
        env.invoke(0xFFFE)  # RETAIN from userspace -> EINVAL
    env.release()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"deadline": 0}, "deadline must be > 0 seconds, not 0"),
        ({"deadline": "1"}, "deadline must be seconds"),
        ({"deadline": True}, "deadline must be seconds"),
        ({"deadline": 1.0, "workers": 0}, "a deadline is the workers'"),
    ],
)
def test_a_bad_deadline_is_refused_before_the_fd_opens(
    kwargs: dict[str, object], message: str
) -> None:
    """Issue 15: every public function names what was wrong; nothing is opened first."""
    device = Device()
    with pytest.raises(UsageError, match=message):
        Client(device, **kwargs)  # type: ignore[arg-type]
    assert device.leaks() == {} and not device.contexts


def test_a_client_deadline_answers_a_slow_handler_busy() -> None:
    """``Client(device, deadline=s)``: its pool answers a handler that runs longer BUSY,
    as the TA sees it."""
    import time

    class Caller(TrustedApp):
        @op(0, io=1)
        def call(self, obj: NsObject) -> None:
            got = obj.invoke(0)
            if got.result:
                raise QteeError(got.result)

    class Slow(CallbackObject):
        @op(0)
        def run(self) -> None:
            time.sleep(0.4)

    device = Device()
    device.register_ta("caller", Caller)
    with (
        Client(device, deadline=0.05) as client,
        client.client_env() as env,
        client.open_service(env, 3) as loader,
    ):
        (ctrl,) = loader.invoke(0, ta_image("caller"), OUT_OBJECT)
        with ctrl:
            (app,) = ctrl.invoke(2, OUT_OBJECT)
            with app, pytest.raises(QteeError) as caught:
                app.invoke(0, Slow())
    assert caught.value.result == Result.ERROR_BUSY
    assert device.leaks() == {}


@pytest.mark.parametrize(
    ("value", "article"), [(4, "an int"), (4.0, "a float"), ("s", "a str"), (Out, "a type")]
)
def test_an_argument_of_no_kind_names_the_kinds(
    qtee_client: Client, value: object, article: str
) -> None:
    """Issue 15: an argument that is none of the kinds says what it was and what an
    argument can be; nothing is sent and nothing is left behind."""
    env = qtee_client.client_env()
    try:
        with pytest.raises(TypeError) as caught:
            env.invoke(0, value)
    finally:
        env.release()
    assert str(caught.value) == (
        f"cannot pass {article} to QTEE: an argument is bytes (an input buffer), Out(n) (an "
        "output buffer of n bytes), OUT_OBJECT (an output object), or an ObjRef, "
        "CallbackObject, MemoryObject or None (an input object)"
    )
