"""``@op`` handlers see output-buffer capacities (issue 15, "Secure objects").

A Mink skeleton's implementation writes into the output buffer it is given, up to its
size; a method declared ``capacities=True`` is told each output buffer's capacity (what
the caller's ``Out(n)`` offers).  Returning more than the capacity is ``ERROR_SIZE_OUT``
(4) and nothing comes back: the driver copies out only on success and leaves the
caller's buffer and param as they were (qtee-kernel.md §4.1 step 8, §3.4).
"""

from __future__ import annotations

import struct

import pytest

import qtee
from objects import QteeError, UsageError, op
from qtee import OUT_OBJECT, CallbackObject, Client, Out, Result, uapi
from qtee.addrspace import CheckedMemory
from qtee.secure import NsObject, QteeRoot, SecureWorld, TrustedApp, ta_image
from tests._helpers import UB_OUT, raw_invoke

MODES = pytest.mark.qtee_modes("in-process", "server", "guest")


class Filler(TrustedApp):
    """Fills output buffers up to their capacity, or past it."""

    @op(0, ob=(None,), capacities=True)
    def fill(self, *, capacities: tuple[int, ...]) -> bytes:
        return bytes((i * 7 + 1) & 0xFF for i in range(capacities[0]))

    @op(1, ib=(4,), ob=(None,))
    def give(self, n: bytes) -> bytes:
        (count,) = struct.unpack("<I", n)
        return b"\xab" * count

    @op(2, ob=(None, 8), capacities=True)
    def both(self, *, capacities: tuple[int, ...]) -> tuple[bytes, bytes]:
        return struct.pack("<I", capacities[0]), struct.pack("<II", *capacities)

    @op(3, ob=(None,), io=1, capacities=True)
    def ask(self, peer: NsObject, *, capacities: tuple[int, ...]) -> bytes:
        """Call back into a client object with this call's capacity as its own."""
        res = peer.invoke(0, ob=[capacities[0]])
        if res.result:
            raise QteeError(res.result, "the callback failed")
        return res.ob[0]


class Echoes(CallbackObject):
    """A client object whose op fills what QTEE offers it."""

    @op(0, ob=(None,), capacities=True)
    def fill(self, *, capacities: tuple[int, ...]) -> bytes:
        return b"cb" * (capacities[0] // 2)


def pattern(n: int) -> bytes:
    return bytes((i * 7 + 1) & 0xFF for i in range(n))


@MODES
@pytest.mark.qtee_ta("filler", Filler)
@pytest.mark.parametrize("size", [0, 1, 7, 64, 4096])
def test_a_handler_fills_out_up_to_its_capacity(
    qtee_app: qtee.pytest_plugin.AppLoaderHelper, size: int
) -> None:
    """The handler is told ``Out(n)``'s n and the client gets exactly n bytes back."""
    app = qtee_app("filler")
    assert app.invoke(0, Out(size)) == [pattern(size)]


@MODES
@pytest.mark.qtee_ta("filler", Filler)
def test_capacities_of_every_output_buffer_in_order(
    qtee_app: qtee.pytest_plugin.AppLoaderHelper,
) -> None:
    app = qtee_app("filler")
    assert app.invoke(2, Out(12), Out(8)) == [struct.pack("<I", 12), struct.pack("<II", 12, 8)]


@MODES
@pytest.mark.qtee_ta("filler", Filler)
@pytest.mark.parametrize(("cap", "given"), [(4, 5), (0, 1), (16, 4096)])
def test_more_than_the_capacity_is_size_out(
    qtee_app: qtee.pytest_plugin.AppLoaderHelper, cap: int, given: int
) -> None:
    """Mink's ERROR_SIZE_OUT (4): the output does not fit, nothing is returned."""
    app = qtee_app("filler")
    with pytest.raises(QteeError) as exc:
        app.invoke(1, struct.pack("<I", given), Out(cap))
    assert exc.value.result == Result.ERROR_SIZE_OUT
    returned = f"{given} byte" if given == 1 else f"{given} bytes"
    assert exc.value.detail == f"ob[0]: Filler.give returned {returned}, capacity {cap}"
    assert app.invoke(1, struct.pack("<I", cap), Out(cap)) == [b"\xab" * cap]  # it fits


@pytest.mark.qtee_ta("filler", Filler)
def test_size_out_writes_nothing_back() -> None:
    """At the ioctl: ``ret`` is 4, the UBUF_OUTPUT param keeps the caller's size and the
    caller's buffer is untouched (QK §4.1 step 8: outputs are copied only on success);
    a fit writes the bytes and the size."""
    mem = CheckedMemory()
    device = qtee.Device(SecureWorld(QteeRoot()), memory=mem)
    with (
        Client(device) as client,
        client.client_env() as env,
        client.open_service(env, 3) as loader,
    ):
        (ctrl,) = loader.invoke(0, ta_image("filler"), OUT_OBJECT)
        with ctrl:
            (app,) = ctrl.invoke(2, OUT_OBJECT)
            with app:
                count = bytearray(struct.pack("<I", 6))
                out = bytearray(b"\xee" * 5)
                params = [
                    uapi.Param(uapi.TEE_IOCTL_PARAM_ATTR_TYPE_UBUF_INPUT, mem.map(count), 4),
                    uapi.Param(UB_OUT, mem.map(out), 5),
                ]
                head, back = raw_invoke(client.ctx, mem, app.id, 1, params)
                assert head.ret == Result.ERROR_SIZE_OUT
                assert back[1] == params[1]
                assert out == b"\xee" * 5
                count[:] = struct.pack("<I", 3)
                head, back = raw_invoke(client.ctx, mem, app.id, 1, params)
                assert head.ret == 0
                assert back[1].b == 3 and out == b"\xab" * 3 + b"\xee" * 2
            ctrl.invoke(1)


@MODES
@pytest.mark.qtee_ta("filler", Filler)
@pytest.mark.parametrize("size", [0, 2, 9])
def test_a_callback_object_sees_what_qtee_offers(
    qtee_app: qtee.pytest_plugin.AppLoaderHelper, size: int
) -> None:
    """A ``CallbackObject`` op declared ``capacities=True`` is told the OB size QTEE asks
    for (the RECV's UBUF_OUTPUT ``b``, QK §4.3)."""
    app = qtee_app("filler")
    assert app.invoke(3, Echoes(), Out(size)) == [b"cb" * (size // 2)]


def test_capacities_needs_output_buffers_and_the_keyword() -> None:
    """The declaration is checked when the class is written, not at the first call."""
    with pytest.raises(UsageError, match="needs output buffers"):

        class NoOb(TrustedApp):
            @op(0, capacities=True)
            def f(self, *, capacities: tuple[int, ...]) -> None: ...

    with pytest.raises(UsageError, match="needs a 'capacities' parameter"):

        class NoKeyword(TrustedApp):
            @op(0, ob=(None,), capacities=True)
            def f(self) -> bytes:
                return b""

    with pytest.raises(UsageError, match="capacities must be a bool"):
        op(0, ob=(None,), capacities=1)(lambda self, **kw: b"")  # type: ignore[arg-type]

    class Kwargs(TrustedApp):
        @op(0, ob=(None,), capacities=True)
        def f(self, **kw: object) -> bytes:
            return repr(kw).encode()

    assert Kwargs().dispatch(0, (), (64,), (), 0).ob == (b"{'capacities': (64,)}",)
