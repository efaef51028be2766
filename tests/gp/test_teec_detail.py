"""A TeecError says why, where the model knows (issue 15, "Errors that say what went
wrong": a model-only detail that never changes the bytes on the wire).

The result and origin are the TEE's (optee.md §4: a UUID no TA answers is
``TEEC_ERROR_ITEM_NOT_FOUND``, origin TEE; a TA's own error has origin TRUSTED_APP; a
panic is ``TEEC_ERROR_TARGET_DEAD``, origin TEE).  The ``detail`` is the secure side's
note on the calling thread (``qtee._reason``), carried by a device server's reply as a
QTEE invocation's reason is: the same text in process, through a server and in a guest,
for the QTEE transport (IGPAppClient) and the OP-TEE device alike.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import qtee
from qtee import (
    Device,
    DeviceServer,
    GpParam,
    GpSession,
    GpTA,
    GpTaError,
    OpteeDevice,
    QteeRoot,
    RemoteDevice,
    SecureWorld,
    panic,
)
from qtee.gp import (
    TeecContext,
    TeecError,
    TeecOperation,
    TeecOrigin,
    TeecResult,
    TeecValue,
    param_types,
)
from qtee.gp import TeecParamType as P
from supplicant import OpteeSupplicant

ACC_UUID = uuid.UUID("5e0c1d2a-7f3b-4c6e-9a10-0000000de7a1")
NOBODY = uuid.UUID("00000000-0000-4000-8000-0000000b0d1e")
ADD, PANIC = 1, 2
VALUE_INOUT = param_types(P.TEEC_VALUE_INOUT, P.TEEC_NONE, P.TEEC_NONE, P.TEEC_NONE)
VALUE_INPUT = param_types(P.TEEC_VALUE_INPUT, P.TEEC_NONE, P.TEEC_NONE, P.TEEC_NONE)
NOT_FOUND = TeecResult.TEEC_ERROR_ITEM_NOT_FOUND
BAD = TeecResult.TEEC_ERROR_BAD_PARAMETERS
TEE = TeecOrigin.TEEC_ORIGIN_TEE
TA = TeecOrigin.TEEC_ORIGIN_TRUSTED_APP
ALL_MODES = pytest.mark.qtee_modes("in-process", "server", "guest")


class Acc(GpTA):
    """ADD takes VALUE_INOUT (else BAD_PARAMETERS, with why); PANIC panics."""

    UUID = ACC_UUID

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
        if cmd == PANIC:
            panic(0xDEAD)
        if types != VALUE_INOUT:
            raise GpTaError(BAD, "ADD takes one VALUE_INOUT")
        params[0].a += params[0].b


def fails(source: object, ta: uuid.UUID, cmd: int | None = None, types: int = 0) -> TeecError:
    """Open a session to ``ta`` (and invoke ``cmd``): the TeecError it raises."""
    ctx = TeecContext(source)  # type: ignore[arg-type]
    with ctx, pytest.raises(TeecError) as err, ctx.open_session(ta) as session:
        value = TeecValue(1, 2)
        session.invoke_command(cmd or 0, TeecOperation(types, [value] if types else []))
    return err.value


@pytest.mark.qtee_gp_ta(Acc, loadable=False)
@ALL_MODES
def test_an_unknown_uuid_names_itself_and_what_is_registered(
    qtee_device: Device | RemoteDevice,
) -> None:
    """optee.md §4: ITEM_NOT_FOUND, origin TEE, as before; the detail names the UUID,
    the GP TAs this world finds (the marker's among them) and how to register one."""
    err = fails(qtee_device, NOBODY)
    assert (err.code, err.origin) == (NOT_FOUND, TEE)
    assert f"no TA with UUID {NOBODY}" in err.detail
    assert str(ACC_UUID) in err.detail and "registered" in err.detail
    assert "@pytest.mark.qtee_gp_ta" in err.detail and "register_gp_ta" in err.detail
    assert err.detail in str(err)


@pytest.mark.qtee_gp_ta(Acc, loadable=True)
@ALL_MODES
def test_a_loadable_ta_without_a_supplicant_says_so(qtee_device: Device | RemoteDevice) -> None:
    """A loadable TA is found only through tee-supplicant's LOAD_TA (optee.md §3.2);
    with no supplicant to ask, the open is ITEM_NOT_FOUND and the detail says that the
    UUID is registered as loadable and nothing served LOAD_TA."""
    err = fails(qtee_device, ACC_UUID)
    assert (err.code, err.origin) == (NOT_FOUND, TEE)
    assert "loadable" in err.detail and "Acc" in err.detail
    assert "no tee-supplicant" in err.detail


@pytest.mark.qtee_gp_ta(Acc, loadable=False)
@ALL_MODES
def test_a_ta_error_carries_the_ta_reason(qtee_device: Device | RemoteDevice) -> None:
    """A TA's GpTaError is its result, origin TRUSTED_APP (optee.md §4); its text, the
    command and the param types the TA got are the detail."""
    err = fails(qtee_device, ACC_UUID, ADD, VALUE_INPUT)
    assert (err.code, err.origin) == (BAD, TA)
    assert "ADD takes one VALUE_INOUT" in err.detail
    assert "command 1" in err.detail and "VALUE_INPUT" in err.detail


@pytest.mark.qtee_gp_ta(Acc, loadable=False)
@ALL_MODES
def test_a_panic_says_which_ta_panicked(qtee_device: Device | RemoteDevice) -> None:
    """optee.md §4.4: a panic is TARGET_DEAD, origin TEE; the detail names the TA and
    its panic code."""
    err = fails(qtee_device, ACC_UUID, PANIC)
    assert (err.code, err.origin) == (TeecResult.TEEC_ERROR_TARGET_DEAD, TEE)
    assert "Acc" in err.detail and "TEE_Panic(0x0000DEAD)" in err.detail


@pytest.mark.qtee_gp_ta(Acc, loadable=False)
def test_the_optee_device_in_process_says_why() -> None:
    """The OP-TEE device (the GP runtime on the caller's thread): the same detail."""
    err = fails(OpteeDevice(SecureWorld(QteeRoot())), NOBODY)
    assert (err.code, err.origin) == (NOT_FOUND, TEE)
    assert f"no TA with UUID {NOBODY}" in err.detail and str(ACC_UUID) in err.detail


@pytest.mark.qtee_gp_ta(Acc, loadable=True)
def test_a_supplicant_without_the_image_says_so(tmp_path: Path) -> None:
    """tee-supplicant answers LOAD_TA ITEM_NOT_FOUND when it has no ``<uuid>.ta``
    (optee.md §3.2): the open's result, origin TEE; the detail says the supplicant has
    no image and that the class is registered as loadable."""
    device = OpteeDevice()
    with OpteeSupplicant(device, tmp_path / "ta", tmp_path / "store", workers=1):
        err = fails(device, ACC_UUID)
    assert (err.code, err.origin) == (NOT_FOUND, TEE)
    assert "tee-supplicant" in err.detail and "no image" in err.detail
    assert "Acc" in err.detail and "loadable" in err.detail


@pytest.fixture
def optee_server() -> Iterator[DeviceServer]:
    tmp = tempfile.mkdtemp(prefix="qtee-")
    try:
        with DeviceServer(os.path.join(tmp, "o.sock"), tee="optee") as server:
            yield server
    finally:
        os.rmdir(tmp)


@pytest.mark.qtee_gp_ta(Acc, loadable=False)
def test_the_optee_device_over_a_server_says_why(optee_server: DeviceServer) -> None:
    """A served OP-TEE device: the server's reply carries the secure side's note for
    OPEN_SESSION and INVOKE as it does for a QTEE invocation (model-only)."""
    err = fails(qtee.connect(optee_server.path), NOBODY)
    assert (err.code, err.origin) == (NOT_FOUND, TEE)
    assert f"no TA with UUID {NOBODY}" in err.detail
    err = fails(qtee.connect(optee_server.path), ACC_UUID, ADD, VALUE_INPUT)
    assert (err.code, err.origin) == (BAD, TA) and "ADD takes one VALUE_INOUT" in err.detail


def test_the_detail_is_model_only() -> None:
    """The detail never changes the code or origin, and survives pickling."""
    err = TeecError(NOT_FOUND, TEE, "why")
    assert (err.code, err.origin, err.detail) == (NOT_FOUND, TEE, "why")
    back = pickle.loads(pickle.dumps(err))
    assert (back.code, back.origin, back.detail) == (NOT_FOUND, TEE, "why")
    assert TeecError(NOT_FOUND, TEE).detail == ""
