"""The pytest plugin's fixtures: ``qtee_device``, ``qtee_server``, ``qtee_guest``,
``qtee_client``, ``qtee_env``, ``qtee_app`` and ``qtee_supplicant``.

See :mod:`qtee.pytest_plugin` for what each gives and tears down.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from qtee._pytest_leaks import _TRACKER, _label

if TYPE_CHECKING:
    from qtee import Client, Device, DeviceServer, ObjRef, RemoteDevice
    from qtee.vm import Guest
    from supplicant import Supplicant


__all__ = ["AppLoaderHelper"]

_SUPPLICANT_OPTIONS = frozenset({"storage", "time", "ta_dirs", "workers"})


@dataclass
class AppLoaderHelper:
    """``qtee_app``: loads TAs by name through the AppLoader, unloads them at teardown."""

    client: Client
    env: ObjRef
    _loader: ObjRef | None = field(default=None, init=False)
    _loaded: list[tuple[ObjRef, ObjRef]] = field(default_factory=list, init=False)

    def __call__(self, name: str, payload: bytes = b"") -> ObjRef:
        """loadFromBuffer(ta_image(name, payload)), then getAppObject: the app object."""
        from qtee import OUT_OBJECT, ta_image
        from qtee.secure import APP_LOADER_UID

        if self._loader is None:
            self._loader = self.client.open_service(self.env, APP_LOADER_UID)
        (ctrl,) = self._loader.invoke(0, ta_image(name, payload), OUT_OBJECT)
        try:
            (app,) = ctrl.invoke(2, OUT_OBJECT)
        except BaseException:
            ctrl.release()
            raise
        self._loaded.append((ctrl, app))
        return app  # type: ignore[no-any-return]

    def close(self) -> None:
        """Release every app object, unload every TA, release the loader."""
        while self._loaded:
            ctrl, app = self._loaded.pop()
            try:
                app.release()
                ctrl.invoke(1)  # unload
            finally:
                ctrl.release()
        if self._loader is not None:
            self._loader.release()
            self._loader = None


# ------------------------------------------------------------------------ fixtures
@pytest.fixture
def qtee_device(request: pytest.FixtureRequest, qtee_leak_check: None) -> Device | RemoteDevice:
    """A fresh in-process device, the standard ``qtee.Device()``; in ``server`` mode,
    ``qtee.connect`` to a fresh ``qtee_server``."""
    from qtee import Device, connect

    mode = getattr(request, "param", "in-process")
    if mode == "server":
        server: DeviceServer = request.getfixturevalue("qtee_server")
        return connect(server.path)
    if mode == "guest":
        guest: Device = request.getfixturevalue("qtee_guest").device
        return guest
    device = Device()
    _label(request, device, "fixture qtee_device")
    return device


@pytest.fixture
def qtee_server(request: pytest.FixtureRequest, qtee_leak_check: None) -> Iterator[DeviceServer]:
    """A ``DeviceServer`` on ``qtee.sock`` in a fresh temporary directory (see
    :func:`_socket_dir`); stopped at teardown, after every connection to it has closed,
    and its device leak-checked."""
    import shutil

    from qtee import DeviceServer

    tmp = _socket_dir()
    try:
        with DeviceServer(os.path.join(tmp, "qtee.sock")) as server:
            _label(request, server.device, "fixture qtee_server")
            yield server
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _socket_dir() -> str:
    """A fresh directory for one server's socket, its own even across pytest-xdist
    workers (``qtee-gw0-...``), in the temporary directory, or in ``/tmp`` when a long
    ``TMPDIR`` would put the socket past the 108 bytes of ``sun_path``."""
    import tempfile

    from qtee._remote.server import SUN_PATH_MAX

    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    prefix = f"qtee-{worker}-" if worker else "qtee-"
    # mkdtemp adds 8 characters, then "/qtee.sock"
    room = SUN_PATH_MAX - len(prefix) - len("12345678/qtee.sock")
    base = tempfile.gettempdir()
    if len(os.fsencode(os.path.join(base, ""))) > room:
        base = "/tmp"
    return tempfile.mkdtemp(prefix=prefix, dir=base)


@pytest.fixture
def qtee_guest(request: pytest.FixtureRequest, qtee_leak_check: None) -> Iterator[Guest]:
    """A guest VM with QTEE behind a fresh monitor and VMM (``qtee.vm``): ``.device`` is
    its own driver model, whose SMCs the mediator forwards to its partition (the standard
    QTEE, IGPAppClient included).  Destroyed at teardown; the
    monitor, the VMM and the guest's device are leak-checked."""
    from qtee.secure._monitor import SecureMonitor
    from qtee.vm import Vmm

    monitor = SecureMonitor()
    _label(request, monitor, "fixture qtee_guest")
    with Vmm(monitor) as vmm:
        _label(request, vmm, "fixture qtee_guest")
        guest = vmm.create_vm("qtee-guest", tee="qtee")
        _label(request, guest.device, "fixture qtee_guest")
        yield guest


@pytest.fixture
def qtee_client(
    request: pytest.FixtureRequest, qtee_device: Device | RemoteDevice
) -> Iterator[Client]:
    """``Client(qtee_device, workers=2)``, closed at teardown."""
    from qtee import Client

    client = Client(qtee_device, workers=2)
    tracker = request.node.stash.get(_TRACKER, None)
    if tracker is not None:
        tracker.name(client, "fixture qtee_client")
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def qtee_env(qtee_client: Client) -> Iterator[ObjRef]:
    """The client env of ``qtee_client`` (root op 2), released at teardown."""
    env = qtee_client.client_env()
    try:
        yield env
    finally:
        env.release()


@pytest.fixture
def qtee_app(qtee_client: Client, qtee_env: ObjRef) -> Iterator[AppLoaderHelper]:
    """``qtee_app("name")`` -> the app ObjRef of that TA (unloaded at teardown)."""
    helper = AppLoaderHelper(qtee_client, qtee_env)
    try:
        yield helper
    finally:
        helper.close()


def _supplicant_options(request: pytest.FixtureRequest, tmp: Path) -> dict[str, Any]:
    mark = request.node.get_closest_marker("qtee_supplicant")
    opts: dict[str, Any] = dict(mark.kwargs) if mark is not None else {}
    if mark is not None and mark.args:
        pytest.fail("qtee_supplicant marker: keyword arguments only", pytrace=False)
    unknown = set(opts) - _SUPPLICANT_OPTIONS
    if unknown:
        pytest.fail(
            f"qtee_supplicant marker: unknown option {', '.join(sorted(unknown))} "
            f"(options: {', '.join(sorted(_SUPPLICANT_OPTIONS))})",
            pytrace=False,
        )
    storage = opts.get("storage", False)
    if storage is True:
        storage = tmp / "tzstorage"
        storage.mkdir(exist_ok=True)
    elif storage is False:
        storage = None
    ta_dirs: bool | Sequence[str | os.PathLike[str]] = opts.get("ta_dirs", ())
    if ta_dirs is True:
        (tmp / "tas").mkdir(exist_ok=True)
        dirs = [tmp / "tas"]
    elif ta_dirs is False:
        dirs = []
    else:
        if isinstance(ta_dirs, str | os.PathLike):
            ta_dirs = [ta_dirs]
        dirs = [request.path.parent / d for d in ta_dirs]  # an absolute d stays as it is
    return {
        "storage": storage,
        "ta_dirs": dirs,
        "time_service": bool(opts.get("time", True)),
        "workers": opts.get("workers", 4),
    }


@pytest.fixture
def qtee_supplicant(
    request: pytest.FixtureRequest, qtee_device: Device | RemoteDevice, tmp_path: Path
) -> Iterator[Supplicant]:
    """A running ``supplicant.Supplicant`` on ``qtee_device`` (see ``qtee_supplicant`` marker)."""
    from supplicant import Supplicant

    with Supplicant(qtee_device, **_supplicant_options(request, tmp_path)) as supp:
        yield supp
