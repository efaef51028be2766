"""TA registries scoped to a secure world (issue 15, "Defaults and one public API": TA
registries are scoped to a device/world).

Every world has its own :class:`qtee.secure.TaRegistry` (``world.tas``), looked up
before the process-wide one that ``register_ta``/``register_gp_ta``/
``register_loadable_ta``/``register_ta_file`` fill.  Two devices in one process can run
two classes under one TA name; a guest's QTEE partition (a world of the monitor) falls
back on the host partition's registry; a device server loads from the world it serves.
The answers themselves are the loaders' (quic-teec.md §5.3 IAppLoader: an unknown model
image is METADATA_INVALID 13, an unknown buffer INVALID_BUFFER 10; optee.md §4: an
unknown UUID is ITEM_NOT_FOUND, origin TEE).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from pathlib import Path

import pytest

import qtee
from objects import QteeError, UsageError, op
from qtee import (
    OUT_OBJECT,
    Client,
    Device,
    DeviceServer,
    GpParam,
    GpSession,
    GpTA,
    ObjRef,
    OpteeDevice,
    Out,
    QteeRoot,
    SecureWorld,
    TrustedApp,
    gp_ta_image,
    ta_image,
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
from qtee.secure import APP_LOADER_UID, SecureMonitor, TaRegistry
from supplicant import OpteeSupplicant

pytest_plugins = ["pytester"]

METADATA_INVALID = 13  # IAppLoader: a model image naming no TA this world knows
INVALID_BUFFER = 10  # IAppLoader: a buffer it cannot take


class Named(TrustedApp):
    """Answers op 0 with its class's NAME: which class a load found."""

    NAME = b"?"

    @op(0, ob=(1,))
    def which(self) -> bytes:
        return self.NAME


class KvA(Named):
    NAME = b"A"


class KvB(Named):
    NAME = b"B"


class KvProcess(Named):
    NAME = b"P"


def load(client: Client, env: ObjRef, image: bytes) -> bytes:
    """Load ``image`` with IAppLoader loadFromBuffer, ask op 0, unload: the TA's NAME."""
    with client.open_service(env, APP_LOADER_UID) as loader:
        (ctrl,) = loader.invoke(0, image, OUT_OBJECT)
        with ctrl:
            (app,) = ctrl.invoke(2, OUT_OBJECT)
            with app:
                (name,) = app.invoke(0, Out(1))
            ctrl.invoke(1)
    assert isinstance(name, bytes)
    return name


def load_on(device: Device | qtee.RemoteDevice, image: bytes) -> bytes | int:
    """:func:`load` on a client of its own; a QTEE result comes back as the int."""
    with Client(device, workers=1) as client, client.client_env() as env:
        try:
            return load(client, env, image)
        except QteeError as exc:
            return int(exc.result)


# ----------------------------------------------------------------------------- QTEE TAs


def test_two_devices_run_two_classes_under_one_name() -> None:
    """Each device's world loads its own class for ``kv``; a device without one falls
    back on the process-wide registration, and an unregistered name is METADATA_INVALID."""
    a, b, plain = Device(), Device(), Device()
    a.register_ta("kv", KvA)
    b.world.tas.register("kv", KvB)
    assert load_on(a, ta_image("kv")) == b"A"
    assert load_on(b, ta_image("kv")) == b"B"
    assert load_on(plain, ta_image("kv")) == METADATA_INVALID
    qtee.register_ta("kv", KvProcess)
    try:
        assert [load_on(d, ta_image("kv")) for d in (a, b, plain)] == [b"A", b"B", b"P"]
        b.world.tas.unregister("kv")  # the world's own goes: the process's shows
        assert load_on(b, ta_image("kv")) == b"P"
    finally:
        qtee.unregister_ta("kv")


def test_load_embedded_by_name_asks_the_world_registry(qtee_device: Device) -> None:
    """IAppLoader loadEmbedded (op 2) of a name finds the world's own TA; another
    world's name is EMBEDDED_IMAGE_NOT_FOUND (17)."""
    other = Device()
    other.register_ta("only.there", KvB)
    qtee_device.register_ta("only.here", KvA)
    with (
        Client(qtee_device, workers=1) as client,
        client.client_env() as env,
        client.open_service(env, APP_LOADER_UID) as loader,
    ):
        (ctrl,) = loader.invoke(2, b"only.here", OUT_OBJECT)
        ctrl.release()
        with pytest.raises(QteeError) as err:
            loader.invoke(2, b"only.there", OUT_OBJECT)
    assert err.value.result == 17


def test_ta_files_per_world() -> None:
    """``world.tas.register_file``: that world's loadFromBuffer of the file's bytes loads
    the class; another world's is INVALID_BUFFER, as for any unknown buffer."""
    image = b"\x7fELF" + bytes(60) + b"not a model image"
    a, b = Device(), Device()
    reg = a.world.tas.register_file(KvA, sha256=hashlib.sha256(image).digest())
    assert load_on(a, image) == b"A"
    assert load_on(b, image) == INVALID_BUFFER
    reg.unregister()
    assert load_on(a, image) == INVALID_BUFFER


def test_a_guest_partition_falls_back_on_the_host_partition() -> None:
    """A guest's QTEE partition is a world of the monitor: its own registry first, then
    the host partition's, then the process's."""
    from qtee.vm import Vmm

    monitor = SecureMonitor()
    host = Device(monitor.host)
    monitor.host.tas.register("kv", KvA)
    with Vmm(monitor) as vmm:
        guest = vmm.create_vm("g", tee="qtee")
        partition = monitor.partition(guest.client_id)
        assert partition is not None and partition is not monitor.host
        assert load_on(guest.device, ta_image("kv")) == b"A"
        partition.tas.register("kv", KvB)
        assert load_on(guest.device, ta_image("kv")) == b"B"
        assert load_on(host, ta_image("kv")) == b"A"
        with pytest.raises(UsageError, match="secure world"):
            guest.device.register_ta("kv", KvB)  # a guest's device sees no world


def test_a_device_server_loads_from_the_world_it_serves() -> None:
    """``qtee serve``'s device loads what its own world registers; a device in the
    client's process does not see it."""
    tmp = tempfile.mkdtemp(prefix="qtee-")
    with DeviceServer(os.path.join(tmp, "q.sock")) as server:
        server.device.register_ta("served.kv", KvB)
        assert load_on(qtee.connect(server.path), ta_image("served.kv")) == b"B"
        assert load_on(Device(), ta_image("served.kv")) == METADATA_INVALID
    os.rmdir(tmp)


def test_registry_checks_what_it_is_given() -> None:
    """Bad names and classes fail at once, naming what is wrong; nothing is kept."""
    tas = TaRegistry()
    with pytest.raises(UsageError, match="non-empty string"):
        tas.register("", KvA)
    with pytest.raises(TypeError, match="TrustedApp subclass"):
        tas.register("kv", object)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="GpTA subclass"):
        tas.register_gp(KvA)  # type: ignore[type-var]
    with pytest.raises(UsageError, match=r"UUID must be a uuid\.UUID"):
        tas.register_gp(GpTA)
    with pytest.raises(UsageError, match="no TA is registered as 'kv'"):
        tas.unregister("kv")
    with pytest.raises(UsageError, match="no GP TA"):
        tas.unregister_gp(uuid.uuid4())
    with pytest.raises(UsageError, match="a TA UUID"):
        tas.lookup_gp("not a uuid")  # type: ignore[arg-type]
    assert tas.names() == {"qtee": [], "gp": [], "loadable": []}
    with pytest.raises(TypeError):
        TaRegistry(parent=object())  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- GP TAs

SHARED = uuid.UUID("7a1f0e3c-0000-4000-8000-00000000c0de")
VALUE_OUT = param_types(P.TEEC_VALUE_OUTPUT, P.TEEC_NONE, P.TEEC_NONE, P.TEEC_NONE)


class GpNamed(GpTA):
    UUID = SHARED
    ANSWER = 0

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
        params[0].a = self.ANSWER


class GpA(GpNamed):
    ANSWER = 0xA


class GpB(GpNamed):
    ANSWER = 0xB


def ask(source: object) -> int:
    """Open a session to SHARED through TeecContext, invoke, close: the TA's answer."""
    value = TeecValue()
    with TeecContext(source) as ctx, ctx.open_session(SHARED) as session:  # type: ignore[arg-type]
        session.invoke_command(0, TeecOperation(VALUE_OUT, [value]))
    return value.a


def test_two_optee_devices_one_uuid_two_gp_tas() -> None:
    """GP TAs by UUID per world (optee.md §4: the TA manager finds a registered TA
    first); a world without one answers ITEM_NOT_FOUND, origin TEE."""
    a, b = OpteeDevice(SecureWorld(QteeRoot())), OpteeDevice(SecureWorld(QteeRoot()))
    a.register_gp_ta(GpA)
    b.register_gp_ta(GpB)
    assert (ask(a), ask(b)) == (0xA, 0xB)
    plain = OpteeDevice(SecureWorld(QteeRoot()))
    with pytest.raises(TeecError) as err:
        ask(plain)
    assert (err.value.code, err.value.origin) == (
        TeecResult.TEEC_ERROR_ITEM_NOT_FOUND,
        TeecOrigin.TEEC_ORIGIN_TEE,
    )


def test_qtee_devices_reach_their_own_gp_tas_through_igpappclient() -> None:
    """The same lookup behind IGPAppClient (0x199): each QTEE device its own class."""
    a, b = Device(), Device()
    a.register_gp_ta(GpA)
    b.register_gp_ta(GpB)
    assert (ask(a), ask(b)) == (0xA, 0xB)


def test_loadable_tas_per_world(tmp_path: Path) -> None:
    """Loadable GP TAs per world: the same ``<uuid>.ta`` image (optee.md §3.2 LOAD_TA)
    loads each device's own class; a world with none is ITEM_NOT_FOUND, origin TEE."""
    tas = tmp_path / "ta"
    tas.mkdir()
    (tas / f"{SHARED}.ta").write_bytes(gp_ta_image(SHARED))
    answers: list[object] = []
    for cls in (GpA, GpB, None):
        dev = OpteeDevice()
        if cls is not None:
            dev.register_gp_ta(cls, loadable=True)
            assert dev.world is not None and dev.world.tas.lookup_gp(SHARED) is None
        with OpteeSupplicant(dev, tas, tmp_path / cls.__name__ if cls else tmp_path / "n"):
            try:
                answers.append(ask(dev))
            except TeecError as exc:
                answers.append((exc.code, exc.origin))
    assert answers == [
        0xA,
        0xB,
        (TeecResult.TEEC_ERROR_ITEM_NOT_FOUND, TeecOrigin.TEEC_ORIGIN_TEE),
    ]


# ----------------------------------------------------------------------------- the marker

GP_MARKER = """
import uuid

import pytest

from qtee import GpTA, register_gp_ta
from qtee.secure._registry import PROCESS_TAS

U = uuid.UUID("7a1f0e3c-0000-4000-8000-0000000000aa")


class Before(GpTA):
    UUID = U


class Marked(GpTA):
    UUID = U


register_gp_ta(Before)


@pytest.mark.qtee_gp_ta(Marked, loadable=False)
def test_marked():
    assert PROCESS_TAS.lookup_gp(U) is Marked


@pytest.mark.qtee_gp_ta(Marked, loadable=True)
def test_loadable():
    assert PROCESS_TAS.lookup_loadable(U) is Marked
    assert PROCESS_TAS.lookup_gp(U) is Before


def test_after():
    assert PROCESS_TAS.lookup_gp(U) is Before
    assert PROCESS_TAS.lookup_loadable(U) is None


@pytest.mark.qtee_gp_ta(Marked, lodable=True)
def test_misused():
    pass


@pytest.mark.qtee_gp_ta(object, loadable=False)
def test_not_a_gp_ta():
    pass
"""


def test_the_gp_ta_marker_registers_for_the_test(pytester: pytest.Pytester) -> None:
    """``@pytest.mark.qtee_gp_ta(cls, loadable=False)`` registers for its test only and
    puts back what was there; a misused marker errors naming the right form."""
    pytester.makepyfile(test_gp_marker=GP_MARKER)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--strict-markers")
    result.assert_outcomes(passed=3, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*test_misused: use @pytest.mark.qtee_gp_ta(cls, loadable=False), not Mark(*",
            "*test_not_a_gp_ta: qtee_gp_ta takes a GpTA subclass with a UUID, not *",
        ]
    )


def test_markers_lists_the_gp_ta_marker(pytester: pytest.Pytester) -> None:
    """``pytest --markers`` names the marker and its arguments."""
    result = pytester.runpytest_subprocess("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.qtee_gp_ta(cls, loadable=False): *"])


@pytest.mark.qtee_gp_ta.with_args(GpA)
def test_the_marker_serves_every_device() -> None:
    """A marker's registration is process-wide: any device's world falls back on it."""
    assert ask(OpteeDevice(SecureWorld(QteeRoot()))) == 0xA
    assert ask(Device()) == 0xA


def test_the_gp_marker_given_a_lone_class_says_how_to_write_it(
    pytester: pytest.Pytester,
) -> None:
    """pytest takes ``mark(cls)`` as "mark this class": the TA class is then called with
    the test function, and says how to write the marker instead of a bare TypeError."""
    pytester.makepyfile(
        test_lone="""
        import uuid
        import pytest
        from qtee import GpTA

        class Lone(GpTA):
            UUID = uuid.UUID("00000000-0000-4000-8000-00000000abcd")

        @pytest.mark.qtee_gp_ta(Lone)
        def test_never_runs():
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(
        [
            "*Lone was called with the function test_never_runs(): a pytest marker given a lone "
            "class marks that class instead of the test; write "
            "@pytest.mark.qtee_gp_ta(Lone, loadable=False)*"
        ]
    )
    assert result.ret == pytest.ExitCode.INTERRUPTED


def test_the_ta_file_marker_given_a_lone_class_says_how_to_write_it(
    pytester: pytest.Pytester,
) -> None:
    """The same trap with ``qtee_ta_file(cls)`` and a QTEE TA class."""
    pytester.makepyfile(
        test_lone="""
        import pytest
        from qtee import TrustedApp

        class Lone(TrustedApp):
            pass

        @pytest.mark.qtee_ta_file(Lone)
        def test_never_runs():
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(
        [
            "*Lone was called with the function test_never_runs(): "
            "*@pytest.mark.qtee_ta_file(Lone, path=...)*"
        ]
    )
    assert result.ret == pytest.ExitCode.INTERRUPTED
