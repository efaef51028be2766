"""GP TAs through QTEE's AppLoader: a GP TA's image loaded with IAppLoader
``loadFromBuffer`` (op 0) / ``loadFromRegion`` (op 1) becomes reachable through
IGPAppClient (0x199) by UUID, as a TA the device preloads is.

Sources (commits abbreviated to 12 digits):

* [LOADER] qualcomm-linux/pkg-minkipc:libmink/SDK/QTVM/idl/IAppLoader.idl@31fd4e774e2a --
  both loads return an ``IAppController``; a second load of a loaded app is
  ``ERROR_ALREADY_LOADED``.
* [CTRL] qualcomm-linux/pkg-minkipc:libmink/SDK/QTVM/idl/IAppController.idl@ec5b170f484f --
  ``unload`` "fails if the application is currently busy" (the caller tries again later):
  ``ERROR_APP_IN_USE``; the fifth error is ``ERROR_NOT_SUPPORTED``.
* [GPC] zyrao/minkipc:libminkteec/idl/IGPAppClient.idl@96ecea4b9e8f -- ``ERROR_APP_NOT_FOUND``
  is "No loaded application with the requested UUID": only a loaded GP TA is found.

Error values: ../shared/spec/quic-teec.md §5.3.  An unknown UUID stays GP
``TEEC_ERROR_ITEM_NOT_FOUND`` (origin TEE), the model's choice in ``qtee.secure._gpclient``.
"""

from __future__ import annotations

import hashlib
import uuid

import pytest

from objects import QteeError
from qtee import Device, GpParam, GpSession, GpTA, RemoteDevice, gp_ta_image
from qtee.client import OUT_OBJECT, Client, ObjRef
from qtee.gp import (
    TaFlag,
    TeecContext,
    TeecError,
    TeecOperation,
    TeecOrigin,
    TeecResult,
    TeecValue,
    param_types,
)
from qtee.gp import TeecParamType as P
from qtee.secure import APP_LOADER_UID, IAppController, IAppLoader

LOADED_UUID = uuid.UUID("6b1e9a53-2c4d-4e8f-9a01-00000000a10a")
FILE_UUID = uuid.UUID("6b1e9a53-2c4d-4e8f-9a01-00000000f11e")
SINGLE_UUID = uuid.UUID("6b1e9a53-2c4d-4e8f-9a01-000000005191")
ADD = 1
VALUE_INOUT = param_types(P.TEEC_VALUE_INOUT, P.TEEC_NONE, P.TEEC_NONE, P.TEEC_NONE)
NOT_FOUND = TeecResult.TEEC_ERROR_ITEM_NOT_FOUND
#: Bytes standing for a real GP TA file (the model matches files by SHA-256).
FILE_IMAGE = b"\x7fELF" + bytes(60) + b"a GP TA file the AppLoader takes"


class Loaded(GpTA):
    """ADD: p0.a += p0.b (VALUE_INOUT)."""

    UUID = LOADED_UUID

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
        params[0].a += params[0].b


class FromFile(Loaded):
    UUID = FILE_UUID


class Single(Loaded):
    """One instance for every session (SINGLE_INSTANCE | MULTI_SESSION)."""

    UUID = SINGLE_UUID
    FLAGS = TaFlag.TA_FLAG_SINGLE_INSTANCE | TaFlag.TA_FLAG_MULTI_SESSION


def add(ctx: TeecContext, ta: uuid.UUID, a: int, b: int) -> int:
    value = TeecValue(a, b)
    with ctx.open_session(ta) as session:
        origin = session.invoke_command(ADD, TeecOperation(VALUE_INOUT, [value]))
    assert origin == TeecOrigin.TEEC_ORIGIN_TRUSTED_APP
    return value.a


def open_fails(ctx: TeecContext, ta: uuid.UUID) -> tuple[int, int]:
    with pytest.raises(TeecError) as exc:
        ctx.open_session(ta)
    return exc.value.code, exc.value.origin


def load(client: Client, env: ObjRef, image: bytes) -> ObjRef:
    with client.open_service(env, APP_LOADER_UID) as loader:
        (ctrl,) = loader.invoke(0, image, OUT_OBJECT)
    return ctrl  # type: ignore[no-any-return]


def result_of(ref: ObjRef, op: int, *args: object) -> int:
    with pytest.raises(QteeError) as exc:
        ref.invoke(op, *args)
    return exc.value.result


@pytest.mark.qtee_gp_ta(Loaded, loadable=True)
@pytest.mark.qtee_modes("in-process", "server", "guest")
def test_a_loaded_gp_image_opens_through_igpappclient(
    qtee_device: Device | RemoteDevice, qtee_client: Client, qtee_env: ObjRef
) -> None:
    """A loadable-only GP TA is not found through IGPAppClient until its image is loaded
    with loadFromBuffer (IGPAppClient.idl: only *loaded* apps are found); then TEEC
    sessions reach it; ``unload`` with a session open is IAppController APP_IN_USE (13,
    IAppController.idl: unload fails while the app is busy) and the session still
    answers; after the close ``unload`` succeeds and the TA is not found again.  The
    same in process, through a device server and from a guest.  [GPC], [CTRL], [LOADER]."""
    with TeecContext(qtee_device) as ctx:
        assert open_fails(ctx, LOADED_UUID) == (NOT_FOUND, TeecOrigin.TEEC_ORIGIN_TEE)
        with load(qtee_client, qtee_env, gp_ta_image(LOADED_UUID)) as ctrl:
            assert add(ctx, LOADED_UUID, 40, 2) == 42
            value = TeecValue(1, 2)
            with ctx.open_session(LOADED_UUID) as session:
                assert result_of(ctrl, 1) == IAppController.ERROR_APP_IN_USE == 13
                session.invoke_command(ADD, TeecOperation(VALUE_INOUT, [value]))
            assert value.a == 3
            ctrl.invoke(1)  # unload: no session is open now
            assert open_fails(ctx, LOADED_UUID)[0] == NOT_FOUND
            assert result_of(ctrl, 2, OUT_OBJECT) == IAppController.ERROR_APP_UNLOADED == 12
        # Unloaded: the image loads again.
        with load(qtee_client, qtee_env, gp_ta_image(LOADED_UUID)) as ctrl:
            assert add(ctx, LOADED_UUID, 5, 6) == 11
            ctrl.invoke(1)


@pytest.mark.qtee_gp_ta(Loaded, loadable=True)
@pytest.mark.qtee_modes("in-process", "server", "guest")
def test_load_from_region_makes_a_gp_ta_reachable(
    qtee_device: Device | RemoteDevice, qtee_client: Client, qtee_env: ObjRef
) -> None:
    """loadFromRegion (op 1) takes the image in a memory object, page-rounded with
    zeros; the GP TA is then reachable through IGPAppClient as after loadFromBuffer.
    [LOADER] ``loadFromRegion``; [GPC]."""
    image = gp_ta_image(LOADED_UUID)
    with qtee_client.memory(4096) as mem:
        mem.view[: len(image)] = image
        with qtee_client.open_service(qtee_env, APP_LOADER_UID) as loader:
            (ctrl,) = loader.invoke(1, mem, OUT_OBJECT)
    with ctrl, TeecContext(qtee_device) as ctx:
        assert add(ctx, LOADED_UUID, 20, 22) == 42
        ctrl.invoke(1)
        assert open_fails(ctx, LOADED_UUID)[0] == NOT_FOUND


@pytest.mark.qtee_gp_ta(Loaded, loadable=True)
def test_a_loaded_gp_ta_is_loaded_once_and_has_no_app_object(
    qtee_client: Client, qtee_env: ObjRef
) -> None:
    """A second load of the same GP TA is IAppLoader ALREADY_LOADED (16); the
    controller's getAppObject is NOT_SUPPORTED (14): a GP TA is reached by UUID through
    IGPAppClient, not through a Mink app object (model choice).  [LOADER], [CTRL]."""
    with load(qtee_client, qtee_env, gp_ta_image(LOADED_UUID)) as ctrl:
        with qtee_client.open_service(qtee_env, APP_LOADER_UID) as loader:
            got = result_of(loader, 0, gp_ta_image(LOADED_UUID), OUT_OBJECT)
        assert got == IAppLoader.ERROR_ALREADY_LOADED == 16
        assert result_of(ctrl, 2, OUT_OBJECT) == IAppController.ERROR_NOT_SUPPORTED == 14
        ctrl.invoke(1)


@pytest.mark.qtee_gp_ta(Loaded, loadable=False)
def test_a_preloaded_gp_ta_is_already_loaded(qtee_client: Client, qtee_env: ObjRef) -> None:
    """A GP TA registered openable (the device preloads it) is loaded already: its
    image is IAppLoader ALREADY_LOADED (16), and a model image naming an unknown UUID
    is METADATA_INVALID (13), as for any image naming no TA.  [LOADER] (ALREADY_LOADED,
    METADATA_INVALID)."""
    with qtee_client.open_service(qtee_env, APP_LOADER_UID) as loader:
        assert result_of(loader, 0, gp_ta_image(LOADED_UUID), OUT_OBJECT) == 16
        stranger = gp_ta_image(uuid.UUID(int=0xBEEF))
        assert result_of(loader, 0, stranger, OUT_OBJECT) == IAppLoader.ERROR_METADATA_INVALID


@pytest.mark.qtee_gp_ta(Loaded, loadable=True)
def test_releasing_the_controller_unloads_but_open_sessions_go_on(
    qtee_device: Device, qtee_client: Client, qtee_env: ObjRef
) -> None:
    """Releasing the IAppController (the loader's client lets go of the app) unloads
    the GP TA: new sessions are ITEM_NOT_FOUND, while a session opened before keeps
    answering until it closes; the image then loads again.  [GPC] (only loaded apps are
    found); keeping open sessions alive is the model's choice (no source says more)."""
    with TeecContext(qtee_device) as ctx:
        ctrl = load(qtee_client, qtee_env, gp_ta_image(LOADED_UUID))
        session = ctx.open_session(LOADED_UUID)
        ctrl.release()
        assert open_fails(ctx, LOADED_UUID)[0] == NOT_FOUND
        value = TeecValue(7, 8)
        session.invoke_command(ADD, TeecOperation(VALUE_INOUT, [value]))
        assert value.a == 15
        session.close()
        with load(qtee_client, qtee_env, gp_ta_image(LOADED_UUID)) as again:
            assert add(ctx, LOADED_UUID, 1, 1) == 2
            again.invoke(1)


@pytest.mark.qtee_gp_ta(Single, loadable=True)
def test_a_released_single_instance_ta_takes_no_new_session(
    qtee_device: Device, qtee_client: Client, qtee_env: ObjRef
) -> None:
    """A single-instance multi-session TA whose controller was released while a session
    is open: that session's instance takes no new session (the TA is not loaded any
    more, [GPC]); the old session still answers.  Loaded again, a fresh instance."""
    with TeecContext(qtee_device) as ctx:
        ctrl = load(qtee_client, qtee_env, gp_ta_image(SINGLE_UUID))
        with ctx.open_session(SINGLE_UUID) as session:
            ctrl.release()
            assert open_fails(ctx, SINGLE_UUID)[0] == NOT_FOUND
            value = TeecValue(1, 1)
            session.invoke_command(ADD, TeecOperation(VALUE_INOUT, [value]))
            assert value.a == 2
        with load(qtee_client, qtee_env, gp_ta_image(SINGLE_UUID)) as again:
            assert add(ctx, SINGLE_UUID, 3, 4) == 7
            again.invoke(1)


@pytest.mark.qtee_ta_file(FromFile, sha256=hashlib.sha256(FILE_IMAGE).hexdigest())
@pytest.mark.qtee_modes("in-process", "server")
def test_a_real_gp_ta_file_loads_through_the_apploader(
    qtee_device: Device | RemoteDevice, qtee_client: Client, qtee_env: ObjRef
) -> None:
    """A real TA file registered (by SHA-256) for a GpTA class: loadFromBuffer of those
    bytes loads that GP TA, reachable through IGPAppClient; other bytes stay
    INVALID_BUFFER (10).  [LOADER] (``appElf``: the TA's ELF image), [GPC]."""
    with TeecContext(qtee_device) as ctx:
        assert open_fails(ctx, FILE_UUID)[0] == NOT_FOUND
        with load(qtee_client, qtee_env, FILE_IMAGE) as ctrl:
            assert add(ctx, FILE_UUID, 2, 3) == 5
            ctrl.invoke(1)
    with qtee_client.open_service(qtee_env, APP_LOADER_UID) as loader:
        got = result_of(loader, 0, FILE_IMAGE + b"!", OUT_OBJECT)
    assert got == IAppLoader.ERROR_INVALID_BUFFER
