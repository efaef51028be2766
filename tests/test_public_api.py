"""The public surface from a user's side (issue 15, "Defaults and one public API").

* ``qtee.Device()`` and ``qtee.OpteeDevice()`` with no arguments are working devices;
  a half-given guest device names what is missing.
* A GP TA is written against ``qtee`` alone (``GpTA``, ``GpParam``, ``GpTaError``,
  ``tee_param_types``, ``panic``, trusted storage) and reached with
  ``qtee.gp.TeecContext`` from an OP-TEE device, a QTEE device, a served device of
  either kind, or a ``Client``.
* ``panic()`` is ``TEE_Panic``: TARGET_DEAD, origin TEE, for that call and every later
  one on the instance (optee.md §4.4).
* TEEC results come back one way (optee.md §1.3): a :class:`~qtee.gp.TeecError` with
  ``code`` and ``origin`` on failure, the return origin as a ``TeecOrigin`` on success.
"""

from __future__ import annotations

import os
import struct
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar, Literal

import pytest

import qtee
from objects import UsageError
from qtee import (
    OUT_OBJECT,
    TEE_DATA_FLAG_ACCESS_READ,
    TEE_DATA_FLAG_ACCESS_WRITE,
    Client,
    Device,
    DeviceServer,
    GpParam,
    GpSession,
    GpTA,
    GpTaError,
    OpteeDevice,
    Out,
    QteeRoot,
    SecureWorld,
    TeeParamType,
    TrustedApp,
    gp_ta_image,
    op,
    panic,
    tee_param_types,
    trusted_storage,
)
from qtee.gp import (
    TeecContext,
    TeecError,
    TeecOperation,
    TeecOrigin,
    TeecResult,
    TeecTempMemoryReference,
    TeecValue,
    param_types,
)
from qtee.gp import TeecParamType as P
from qtee.secure import APP_LOADER_UID, CGPAPPCLIENT_UID
from supplicant import OpteeSupplicant

R, Origin = TeecResult, TeecOrigin
T = TeeParamType

# ----------------------------------------------------------------------------- a GP TA

COUNTER = uuid.UUID("5ca1ab1e-0000-4000-8000-000000000001")
CMD_ADD, CMD_PANIC, CMD_SWALLOW, CMD_STORE, CMD_REFUSE = 0, 1, 2, 3, 4
ADD_TYPES = tee_param_types(T.TEE_PARAM_TYPE_VALUE_INOUT)


class Counter(GpTA):
    """A GP TA written against ``qtee`` alone."""

    UUID = COUNTER

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
        if cmd == CMD_ADD:
            if types != ADD_TYPES:
                raise GpTaError(R.TEEC_ERROR_BAD_PARAMETERS)
            params[0].a += params[0].b
        elif cmd == CMD_PANIC:
            panic(0xDEAD)
        elif cmd == CMD_SWALLOW:
            try:
                panic(1)
            except Exception:  # TEE_Panic never returns: this catches nothing
                params[0].a = 0xBAD
        elif cmd == CMD_STORE:  # GP trusted storage, through the supplicant
            flags = TEE_DATA_FLAG_ACCESS_READ | TEE_DATA_FLAG_ACCESS_WRITE
            store = trusted_storage(self)
            store.create(b"counter", flags, struct.pack("<I", params[0].a)).close()
            handle = store.open(b"counter", flags)
            try:
                params[0].b = struct.unpack("<I", handle.read(4))[0]
            finally:
                handle.close()
        else:
            raise GpTaError(R.TEEC_ERROR_NOT_SUPPORTED)


def value_op(a: int = 0, b: int = 0) -> tuple[TeecOperation, TeecValue]:
    value = TeecValue(a, b)
    return TeecOperation(param_types(P.TEEC_VALUE_INOUT, 0, 0, 0), [value]), value


def outcome(call: Callable[[], object]) -> tuple[object, object]:
    """``(code, origin)`` of a TEEC call, the same way for success and failure."""
    try:
        got = call()
    except TeecError as exc:
        return exc.code, exc.origin
    origin = got.origin if hasattr(got, "origin") else got
    return R.TEEC_SUCCESS, origin


# ----------------------------------------------------------------------------- defaults


def test_device_with_no_arguments_is_the_standard_qtee() -> None:
    """``qtee.Device()``: the root and its services (FeatureVersions 2033 answers the
    QTEE version word, the app loader loads a TA), IGPAppClient (0x199) included."""

    class Echo(TrustedApp):
        @op(0, ib=(None,), ob=(None,))
        def echo(self, data: bytes) -> bytes:
            return data

    device = Device()
    device.register_ta("echo", Echo)
    with Client(device, workers=1) as client, client.client_env() as env:
        with client.open_service(env, 2033) as versions:
            assert versions.invoke(0, struct.pack("<I", 10), Out(4)) == [
                struct.pack("<I", (2 << 22) | (1 << 12))
            ]
        with client.open_service(env, APP_LOADER_UID) as loader:
            (ctrl,) = loader.invoke(0, qtee.ta_image("echo"), OUT_OBJECT)
            with ctrl:
                (app,) = ctrl.invoke(2, OUT_OBJECT)
                with app:
                    assert app.invoke(0, b"ping", Out(4)) == [b"ping"]
                ctrl.invoke(1)
        client.open_service(env, CGPAPPCLIENT_UID).release()
    assert device.leaks() == {}


@pytest.mark.parametrize(
    ("kwargs", "missing"),
    [({"phys": object()}, "conduit="), ({"conduit": type("C", (), {"smc": len})()}, "phys=")],
)
def test_a_half_given_guest_device_names_what_is_missing(
    kwargs: dict[str, object], missing: str
) -> None:
    """A guest's device needs both ``phys=`` and ``conduit=``: the error names the one
    missing and the forms that need neither."""
    with pytest.raises(UsageError, match=f"{missing} is missing.*Device\\(\\) alone"):
        Device(**kwargs)  # type: ignore[arg-type]


def test_optee_device_with_no_arguments_opens_a_registered_ta() -> None:
    """``qtee.OpteeDevice()`` has its own secure world and GP runtime: a GP TA
    registered on it answers through libteec's calls."""
    device = OpteeDevice()
    device.register_gp_ta(Counter)
    op_, value = value_op(40, 2)
    with TeecContext(device) as ctx, ctx.open_session(COUNTER) as session:
        session.invoke_command(CMD_ADD, op_)
    assert value.a == 42
    assert device.leaks() == {}


def test_optee_device_with_no_arguments_serves_its_supplicant_at_once(tmp_path: Path) -> None:
    """``qtee.OpteeDevice()`` comes with tee-supplicant's RPC queue ready: an
    ``OpteeSupplicant`` serves LOAD_TA (optee.md §3.2) of a loadable TA's image and the
    TA's trusted storage (FS RPCs) without further wiring."""
    device = OpteeDevice()
    device.register_gp_ta(Counter, loadable=True)
    (tmp_path / "ta").mkdir()
    (tmp_path / "ta" / f"{COUNTER}.ta").write_bytes(gp_ta_image(COUNTER))
    with OpteeSupplicant(device, tmp_path / "ta", tmp_path / "fs"):
        op_, value = value_op(7)
        with TeecContext(device) as ctx, ctx.open_session(COUNTER) as session:
            session.invoke_command(CMD_STORE, op_)
    assert (value.a, value.b) == (7, 7)
    assert (tmp_path / "fs" / str(COUNTER) / b"counter".hex()).read_bytes() == b"\x07\0\0\0"
    assert device.leaks() == {}


def test_an_open_before_the_supplicant_waits_for_it(tmp_path: Path) -> None:
    """With the queue ready from the start, a session to a TA only the supplicant has
    waits for tee-supplicant, as a user-space client's LOAD_TA does on Linux (optee.md
    §3.3 "No supplicant running"), and completes once one attaches."""
    device = OpteeDevice()
    device.register_gp_ta(Counter, loadable=True)
    (tmp_path / "ta").mkdir()
    (tmp_path / "ta" / f"{COUNTER}.ta").write_bytes(gp_ta_image(COUNTER))
    got: list[object] = []
    with TeecContext(device) as ctx:

        def open_() -> None:
            session = ctx.open_session(COUNTER)
            got.append(session.origin)
            session.close()

        thread = threading.Thread(target=open_, daemon=True)
        thread.start()
        thread.join(0.3)
        assert thread.is_alive() and not got  # waiting for a supplicant
        with OpteeSupplicant(device, tmp_path / "ta", tmp_path / "fs"):
            thread.join(10)
    assert got == [Origin.TEEC_ORIGIN_TRUSTED_APP]
    assert device.leaks() == {}


# ----------------------------------------------------------------------------- panic


@pytest.fixture
def counter_device() -> Iterator[OpteeDevice]:
    device = OpteeDevice(SecureWorld(QteeRoot()))
    device.register_gp_ta(Counter)
    yield device
    assert device.leaks() == {}


def test_panic_is_target_dead_for_that_call_and_every_later_one(
    counter_device: OpteeDevice,
) -> None:
    """``panic()`` (TEE_Panic): TARGET_DEAD, origin TEE; later calls on the instance
    too; a TA's ``except Exception`` does not stop it; a new session (a multi-instance
    TA) gets a new instance (optee.md §4.4)."""
    with TeecContext(counter_device) as ctx:
        for cmd in (CMD_PANIC, CMD_SWALLOW):
            with ctx.open_session(COUNTER) as session:
                op_, value = value_op(1, 1)
                assert outcome(lambda: session.invoke_command(cmd, op_)) == (  # noqa: B023
                    R.TEEC_ERROR_TARGET_DEAD,
                    Origin.TEEC_ORIGIN_TEE,
                )
                assert value.a != 0xBAD
                assert outcome(lambda: session.invoke_command(CMD_ADD, op_)) == (  # noqa: B023
                    R.TEEC_ERROR_TARGET_DEAD,
                    Origin.TEEC_ORIGIN_TEE,
                )
        with ctx.open_session(COUNTER) as session:
            op_, value = value_op(1, 1)
            assert session.invoke_command(CMD_ADD, op_) is Origin.TEEC_ORIGIN_TRUSTED_APP
            assert value.a == 2


def test_panic_outside_a_ta_or_with_a_bad_code_is_a_usage_error() -> None:
    """``panic`` works only inside a GP TA's entry, with a u32 code."""
    with pytest.raises(UsageError, match="inside a GP TA"):
        panic()
    with pytest.raises(UsageError, match="u32"):
        panic(-1)
    with pytest.raises(UsageError, match="u32"):
        panic("x")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- TeecContext


def test_teec_context_takes_a_client_and_leaves_it_open() -> None:
    """A ``Client`` is used as it is (IGPAppClient through it) and stays the caller's."""
    device = Device()
    device.register_gp_ta(Counter)
    with Client(device, workers=1) as client:
        op_, value = value_op(1, 2)
        with TeecContext(client) as ctx, ctx.open_session(COUNTER) as session:
            assert session.invoke_command(CMD_ADD, op_) is Origin.TEEC_ORIGIN_TRUSTED_APP
        assert value.a == 3
        client.client_env().release()  # still open
    assert device.leaks() == {}


def test_a_qtee_without_igpappclient_says_what_to_do() -> None:
    """A QTEE whose root offers no IGPAppClient is not a GP TEE: ITEM_NOT_FOUND (origin
    API, optee.md §1.1), with the reason and the way out; the client it tried is closed."""
    device = Device(SecureWorld(QteeRoot()))
    with pytest.raises(TeecError) as err:
        TeecContext(device)
    assert (err.value.code, err.value.origin) == (
        R.TEEC_ERROR_ITEM_NOT_FOUND,
        Origin.TEEC_ORIGIN_API,
    )
    assert "no IGPAppClient (UID 0x199)" in str(err.value)
    assert "install_gp_app_client" in str(err.value)
    assert device.leaks() == {}


@pytest.mark.parametrize("tee", ["qtee", "optee"])
def test_teec_context_takes_a_served_device_of_either_kind(tee: Literal["qtee", "optee"]) -> None:
    """``TeecContext(qtee.connect(path))``: an OP-TEE server's device by its impl id, a
    QTEE server's through IGPAppClient; the TA is the served world's."""
    tmp = tempfile.mkdtemp(prefix="qtee-")
    try:
        with DeviceServer(os.path.join(tmp, "s.sock"), tee=tee) as server:
            server.device.register_gp_ta(Counter)
            op_, value = value_op(5, 6)
            with (
                TeecContext(qtee.connect(server.path)) as ctx,
                ctx.open_session(COUNTER) as session,
            ):
                assert session.origin is Origin.TEEC_ORIGIN_TRUSTED_APP
                assert session.invoke_command(CMD_ADD, op_) is Origin.TEEC_ORIGIN_TRUSTED_APP
            assert value.a == 11
    finally:
        os.rmdir(tmp)


def test_teec_context_refuses_what_is_no_device() -> None:
    """Anything else is a TypeError naming what it takes."""
    with pytest.raises(TypeError, match=r"qtee Device.*qtee Client"):
        TeecContext(object())  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- results


def _optee() -> OpteeDevice:
    # No RPC queue: an unknown UUID is answered at once rather than waiting for a
    # supplicant, as on OpteeDevice() (see the test above).
    return OpteeDevice(SecureWorld(QteeRoot()))


@pytest.mark.parametrize("make", [_optee, Device], ids=["optee", "qtee"])
def test_results_come_back_one_way(make: Callable[[], OpteeDevice | Device]) -> None:
    """Every TEEC call reports ``(code, origin)`` as ``TeecResult``/``TeecOrigin``
    members: on success the origin (TRUSTED_APP when the TA ran, optee.md §1.3), on
    failure a TeecError whose origin says which layer answered -- API for libteec's own
    checks, TEE for the core (unknown TA), TRUSTED_APP for the TA's own error."""
    source = make()
    source.register_gp_ta(Counter)
    with TeecContext(source) as ctx:
        opened: list[object] = []

        def open_() -> object:
            session = ctx.open_session(COUNTER)
            opened.append(session)
            return session

        got = [outcome(open_)]
        (session,) = opened
        op_, _value = value_op(1, 1)
        bad = TeecOperation(param_types(P.TEEC_VALUE_INPUT, 0, 0, 0), [TeecValue()])
        temp = TeecOperation(0x9, [TeecTempMemoryReference(bytearray(4))])
        got += [
            outcome(lambda: session.invoke_command(CMD_ADD, op_)),  # type: ignore[attr-defined]
            outcome(lambda: session.invoke_command(CMD_ADD, bad)),  # type: ignore[attr-defined]
            outcome(lambda: session.invoke_command(99)),  # type: ignore[attr-defined]
            outcome(lambda: session.invoke_command(CMD_ADD, temp)),  # type: ignore[attr-defined]
            outcome(lambda: ctx.open_session(uuid.UUID(int=1))),
        ]
        session.close()  # type: ignore[attr-defined]
    assert got == [
        (R.TEEC_SUCCESS, Origin.TEEC_ORIGIN_TRUSTED_APP),
        (R.TEEC_SUCCESS, Origin.TEEC_ORIGIN_TRUSTED_APP),
        (R.TEEC_ERROR_BAD_PARAMETERS, Origin.TEEC_ORIGIN_TRUSTED_APP),
        (R.TEEC_ERROR_NOT_SUPPORTED, Origin.TEEC_ORIGIN_TRUSTED_APP),
        (R.TEEC_ERROR_BAD_PARAMETERS, Origin.TEEC_ORIGIN_API),
        (R.TEEC_ERROR_ITEM_NOT_FOUND, Origin.TEEC_ORIGIN_TEE),
    ]
    assert all(type(code) is TeecResult and type(origin) is TeecOrigin for code, origin in got)


CALLER = uuid.UUID("5ca1ab1e-0000-4000-8000-000000000002")


class Caller(GpTA):
    """Opens a session to Counter and invokes it (TEE_OpenTASession, TEE_InvokeTACommand)."""

    UUID = CALLER
    seen: ClassVar[list[tuple[object, object]]] = []

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
        inner, code, origin = self.open_ta_session(COUNTER, 0, [])
        Caller.seen.append((code, origin))
        assert inner is not None
        try:
            add = [GpParam(T.TEE_PARAM_TYPE_VALUE_INOUT, 1, 2)]
            Caller.seen.append(inner.invoke(CMD_ADD, ADD_TYPES, add))
            Caller.seen.append(inner.invoke(CMD_PANIC, 0, []))
        finally:
            inner.close()


def test_ta_to_ta_results_take_the_same_form() -> None:
    """TEE_OpenTASession / TEE_InvokeTACommand give ``(TEE_Result, origin)`` as the
    same ``TeecResult``/``TeecOrigin`` members a TEEC client sees (optee.md §4.4: the
    target's panic is TARGET_DEAD, origin TEE, and the caller goes on)."""
    device = OpteeDevice(SecureWorld(QteeRoot()))
    device.register_gp_ta(Counter)
    device.register_gp_ta(Caller)
    Caller.seen = []
    with TeecContext(device) as ctx, ctx.open_session(CALLER) as session:
        assert session.invoke_command(0) is Origin.TEEC_ORIGIN_TRUSTED_APP
    assert Caller.seen == [
        (R.TEEC_SUCCESS, Origin.TEEC_ORIGIN_TRUSTED_APP),
        (R.TEEC_SUCCESS, Origin.TEEC_ORIGIN_TRUSTED_APP),
        (R.TEEC_ERROR_TARGET_DEAD, Origin.TEEC_ORIGIN_TEE),
    ]
    assert all(type(c) is TeecResult and type(o) is TeecOrigin for c, o in Caller.seen)
    assert device.leaks() == {}
