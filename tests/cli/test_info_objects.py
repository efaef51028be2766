"""``qtee info`` names live objects (issue 15, "objects visible"): per fd the QTEE objects
it holds with the secure world's labels, the callback objects QTEE holds of it with their
classes, its memory objects with their sizes; in process and over a served device
(``qtee info --connect``), exact lines for a known state.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

import qtee
from qtee import OUT_OBJECT, CallbackObject, Client, DeviceServer, NsObject, ObjRef, op
from qtee.__main__ import main
from qtee._cli.info import describe, fd_objects, format_info


class Keeper(qtee.TrustedApp):
    """Keeps what it is given (callback and memory objects) until its app is released."""

    def __init__(self) -> None:
        self.kept: list[NsObject] = []

    @op(0, io=1)
    def keep(self, obj: NsObject) -> None:
        self.kept.append(obj.retain())

    def on_release(self) -> None:
        while self.kept:
            self.kept.pop().release()


pytestmark = pytest.mark.qtee_ta("info.keeper", Keeper)


class Echo(CallbackObject):
    @op(0)
    def ping(self) -> None:
        return None


def _header() -> list[str]:
    return [
        f"version: {qtee.__version__}",
        "impl id: 4 (QTEE)",
        "impl caps: 0x0",
        "gen caps: 0x10 (OBJREF)",
    ]


class State:
    """A client holding env (0), loader (1), controller (2), app (3) and FeatureVersions
    (4); the TA keeps an Echo callback object and a 4 KiB shm; a 64-byte shm unshared."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.env = client.client_env()
        self.loader = client.open_service(self.env, 3)
        (self.ctrl,) = self.loader.invoke(0, qtee.ta_image("info.keeper"), OUT_OBJECT)
        (self.app,) = self.ctrl.invoke(2, OUT_OBJECT)
        self.fv = client.open_service(self.env, 2033)
        self.app.invoke(0, Echo())
        self.shared = client.memory(4096)
        self.app.invoke(0, self.shared)
        self.mem = client.memory(64)

    def release(self) -> None:
        self.mem.release()
        self.shared.release()
        self.fv.release()
        self.app.release()
        self.ctrl.invoke(1)
        self.ctrl.release()
        self.loader.release()
        self.env.release()


def _table(callback_class: str) -> list[str]:
    return [
        "    kind            | id | what",
        "    ----------------+----+" + "-" * 34,
        "    QTEE object     |  0 | ClientEnv",
        "    QTEE object     |  1 | service 0x3 AppLoader",
        "    QTEE object     |  2 | AppController of TA 'info.keeper'",
        "    QTEE object     |  3 | TA 'info.keeper' (Keeper)",
        "    QTEE object     |  4 | service 0x7f1 FeatureVersions",
        "    callback object |  1 | _Credentials",
        f"    callback object |  2 | {callback_class}",
        "    memory object   |  1 | 4096 bytes, QTEE holds 1",
        "    memory object   |  2 | 64 bytes",
    ]


def _tables() -> list[str]:
    return [
        "loaded TAs: info.keeper",
        "live objects:",
        "  secure objects: 5",
        "  ns ids: 3",
        "  shm ids: 2",
        "  physical regions: 2",
        "  context 0 objects: 5",
        "open fds:",
    ]


def test_info_in_process_names_each_object() -> None:
    """In process (``describe`` as ``qtee info`` runs it): five QTEE objects by the secure
    world's labels (qtee-kernel.md §2.2: ids per fd, lowest free), the two callback objects
    QTEE holds (the credentials, §4.2, and the Echo the TA kept) by class, and two shms by
    size, the one QTEE keeps (a memory object, §2.2) saying so."""
    device = qtee.Device(qtee.SecureWorld(qtee.QteeRoot()))
    with Client(device, workers=1) as client:
        state = State(client)
        try:
            lines = format_info(describe(device)).splitlines()
        finally:
            state.release()
    assert lines == [
        *_header(),
        *_tables(),
        "  fd 0: qtee objects 5, callback objects 2, shms 2, requests 0",
        *_table("Echo"),
    ]
    assert device.leaks() == {}


@pytest.fixture
def server() -> Iterator[DeviceServer]:
    d = tempfile.mkdtemp(prefix="qtee-")
    srv = DeviceServer(os.path.join(d, "s"), introspect=True).start()
    try:
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(d, ignore_errors=True)
    assert srv.device.leaks() == {}


def test_info_connect_names_each_object(
    server: DeviceServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """``qtee info --connect``: the same table for the client's connection; a callback
    object's class lives in the client's process, so the server shows ``?``."""
    with Client(qtee.connect(server.path), workers=1) as client:
        state = State(client)
        try:
            assert main(["info", "--connect", server.path]) == 0
            lines = capsys.readouterr().out.splitlines()
        finally:
            state.release()
    pid = os.getpid()
    assert lines == [
        *_header(),
        *_tables(),
        f"  conn-1 (qtee pid {pid}): qtee objects 5, callback objects 2, shms 2, requests 0",
        *[line.replace("_Credentials", "?") for line in _table("?")],
        f"  conn-2 (qtee pid {pid}): qtee objects 0, callback objects 0, shms 0, requests 0",
    ]


def test_a_connection_names_its_own_objects_without_introspection(
    qtee_server: DeviceServer,
) -> None:
    """The ``objects`` query (what ``repr(ObjRef)`` and the leak check ask a server) is
    answered for the asker's own fd even when the server refuses ``info`` (EACCES), and
    it is no ioctl: the fd's tables are as they were."""
    client = Client(qtee.connect(qtee_server.path), workers=1)
    try:
        env = client.client_env()
        fv = client.open_service(env, 2033)
        ctx = client.ctx
        assert isinstance(ctx, qtee.RemoteContext)
        before = qtee_server.device.leaks()
        assert ctx.held_objects() == {
            "objects": [[0, "ClientEnv"], [1, "service 0x7f1 FeatureVersions"]],
            "callbacks": [[1, "", 1]],
            "memory": [],
            "secure_world": True,
        }
        assert qtee_server.device.leaks() == before
        with pytest.raises(qtee.DriverError) as exc:
            ctx.info()
        assert exc.value.errno == 13  # EACCES: no introspection
        fv.release()
        env.release()
    finally:
        client.close()


@pytest.mark.qtee_modes("in-process", "guest")
def test_fd_objects_labels_in_a_guest_too(qtee_client: Client, qtee_env: ObjRef) -> None:
    """A guest's device has no world of its own: its partition (found through the VMM)
    labels the objects, as the host's world does."""
    fv = qtee_client.open_service(qtee_env, 2033)
    try:
        ctx = qtee_client.ctx
        assert isinstance(ctx, qtee.Context)
        assert fd_objects(ctx)["objects"] == [
            [0, "ClientEnv"],
            [1, "service 0x7f1 FeatureVersions"],
        ]
    finally:
        fv.release()
