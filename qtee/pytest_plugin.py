"""qtee's pytest plugin: fixtures for testing TAs, and a leak check after every test.

Installing qtee registers it (entry point ``pytest11``, name ``qtee``); ``-p no:qtee``
turns it off.  Fixtures (all function-scoped):

* ``qtee_device`` -- a fresh standard ``qtee.Device()``, or in ``server``
  mode ``qtee.connect()`` to a fresh ``qtee_server`` (see modes below);
* ``qtee_server`` -- a ``DeviceServer`` on a socket in a temporary directory of its own
  (named after the pytest-xdist worker, if any, and short enough for ``sun_path``),
  stopped at teardown (its device is leak-checked like any other);
* ``qtee_guest`` -- a guest VM with QTEE behind a fresh monitor and VMM (``qtee.vm``),
  destroyed at teardown;
* ``qtee_client`` -- ``Client(qtee_device, workers=2)``, closed at teardown;
* ``qtee_env`` -- ``qtee_client.client_env()``, released at teardown;
* ``qtee_supplicant`` -- a ``supplicant.Supplicant`` on ``qtee_device``, stopped at
  teardown; its listeners come from ``@pytest.mark.qtee_supplicant(...)``;
* ``qtee_app`` -- ``qtee_app("name")`` loads that TA through the AppLoader (UID 3) and
  returns its app ``ObjRef``; everything it loaded is released and unloaded at teardown.

Modes: ``@pytest.mark.qtee_modes("in-process", "server", "guest")`` runs a test that uses
``qtee_device`` (or a fixture built on it) once per mode, unchanged; without the marker
``--qtee-mode=in-process|server|guest|all`` (default ``in-process``) decides.

Markers:

* ``@pytest.mark.qtee_ta("name", TAClass)`` registers a TA for the test (repeatable;
  the previous registration of that name, if any, is restored after the test);
* ``@pytest.mark.qtee_gp_ta(cls, loadable=False)`` registers the GP TA ``cls``
  (``qtee.register_gp_ta``, or ``qtee.register_loadable_ta`` with ``loadable=True``)
  for the test (repeatable; the previous registration of that UUID is restored).
  Write ``loadable=`` (or ``qtee_gp_ta.with_args(cls)``): given a lone class, pytest
  marks that class instead of the test;
* ``@pytest.mark.qtee_ta_file(cls, path=None, sha256=None)`` registers ``cls`` for a real
  TA file for the test (``qtee.register_ta_file``; repeatable; a relative ``path`` is
  taken from the test file's directory), unregistered after the test;
* ``@pytest.mark.qtee_supplicant(storage=False, time=True, ta_dirs=(), workers=4)``:
  ``storage=True`` serves ``tmp_path / "tzstorage"`` (or give a directory), ``ta_dirs``
  are TA-autoload directories (relative ones are taken from the test file's directory;
  ``True`` means ``tmp_path / "tas"``).  Without the marker: the time listener only.

The leak check (autouse): every ``qtee.Device`` and ``qtee.OpteeDevice`` built while a
test runs (in the test or its function-scoped fixtures) is recorded; after the test and
its fixtures have torn down, each one's ``leaks()`` must be ``{}``, or the test errors
at teardown with a table of what is still alive and where the device was built.  A test
that already failed (or was skipped, or xfailed) is not checked again.

It also errors when a test leaves ``ObjRef`` or ``MemoryObject`` handles or exported
callback objects unreleased for a client's ``close`` to free (``qtee_client``'s at
teardown, or the test's own): each is named by kind, id, what it refers to (the secure
world's label, the size, the class) and the ``file:line`` that made it.  What fixtures
own (``qtee_env``, ``qtee_app``'s apps) they release themselves.  A test about close
releasing things opts out with ``@pytest.mark.qtee_close_releases`` (the device tables
are still checked).

Importing this module imports only pytest and the standard library beyond the ``qtee``
package itself; the supplicant is imported when ``qtee_supplicant`` is first used.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Final

import pytest

if TYPE_CHECKING:
    from qtee import Client, Device, DeviceServer, ObjRef, RemoteDevice
    from qtee.client import Leftover
    from qtee.secure import TrustedApp
    from qtee.vm import Guest
    from supplicant import Supplicant

__all__ = ["CLOSE_MARKER", "TRACKED_DEVICES", "AppLoaderHelper", "format_leaks", "format_leftovers"]

#: Device classes the leak check records, as ``(module, class)``.  Each needs a
#: ``leaks() -> dict[str, int]`` method.  A device server's device is a ``Device``.
TRACKED_DEVICES: list[tuple[str, str]] = [
    ("qtee._qcomtee.core", "Device"),
    ("qtee._optee", "OpteeDevice"),
    ("qtee.secure._monitor", "SecureMonitor"),
    ("qtee.vm._framework", "Vmm"),
]

_SUPPLICANT_OPTIONS = frozenset({"storage", "time", "ta_dirs", "workers"})
#: Where ``qtee_device`` lives: this process, behind a device server's socket, or in a
#: guest VM whose SMCs go through the VMM-side mediator (``qtee.vm``).
MODES = ("in-process", "server", "guest")

# A device recorded by the leak check: [device, class name, where it was built], by id.
_Record = list[Any]
_RECORDS = pytest.StashKey[dict[int, _Record]]()
_ALREADY_FAILED = pytest.StashKey[bool]()
_TRACKER = pytest.StashKey[Any]()  # the test's ObjectTracker, or None
#: The marker of a test that leaves objects for the client's close on purpose.
CLOSE_MARKER = "qtee_close_releases"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("qtee").addoption(
        "--qtee-mode",
        choices=[*MODES, "all"],
        default="in-process",
        help="where qtee_device lives for tests without a qtee_modes marker (default: in-process)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"qtee_modes(*modes): run the test with qtee_device in each mode {MODES}",
    )
    config.addinivalue_line(
        "markers",
        "qtee_ta(name, cls): register the TrustedApp subclass cls as TA `name` for this test",
    )
    config.addinivalue_line(
        "markers",
        "qtee_gp_ta(cls, loadable=False): register the GpTA subclass cls for this test "
        "(loadable=True: found only through tee-supplicant's LOAD_TA; write loadable= "
        "even when False, or pytest takes a lone class for a class to mark)",
    )
    config.addinivalue_line(
        "markers",
        "qtee_ta_file(cls, path=None, sha256=None): register cls for a real TA file "
        "(by its SHA-256, or a GP TA by its UUID) for this test",
    )
    config.addinivalue_line(
        "markers",
        "qtee_supplicant(storage=False, time=True, ta_dirs=(), workers=4): listeners of "
        "the qtee_supplicant fixture (storage=True: a directory in tmp_path)",
    )
    config.addinivalue_line(
        "markers",
        f"{CLOSE_MARKER}: the test leaves ObjRefs, MemoryObjects or callback objects for "
        "a client's close to release (the leak check does not name them)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "qtee_device" not in metafunc.fixturenames:
        return
    mark = metafunc.definition.get_closest_marker("qtee_modes")
    if mark is not None:
        modes = tuple(mark.args)
        bad = [m for m in modes if m not in MODES]
        if not modes or bad or mark.kwargs:
            pytest.fail(
                f"{metafunc.definition.nodeid}: qtee_modes takes modes from {MODES}, "
                f"not {mark.args!r}",
                pytrace=False,
            )
    else:
        option = metafunc.config.getoption("qtee_mode", "in-process")
        modes = MODES if option == "all" else (option,)
    if modes != ("in-process",):
        metafunc.parametrize("qtee_device", modes, indirect=True)


# ------------------------------------------------------------------------ leak check
@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if (report.when == "call" and call.excinfo is not None) or (
        report.when == "setup" and report.failed
    ):  # failed, skipped or xfailed: a leak would only repeat it
        item.stash[_ALREADY_FAILED] = True
    return report


_OURS: Final = ("qtee", "objects", "supplicant")


@functools.cache
def _library_dirs(
    names: tuple[str, ...] = (*_OURS, "pytest", "_pytest", "pluggy"),
) -> tuple[str, ...]:
    """Directories whose frames never name where a device was built."""
    dirs = []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            dirs.append(os.path.dirname(os.path.realpath(spec.origin)) + os.sep)
    return tuple(dirs)


@functools.cache
def _is_library(filename: str) -> bool:
    path = os.path.realpath(filename)
    return path.startswith(_library_dirs()) or path == os.path.realpath(threading.__file__)


@functools.cache
def _is_ours(filename: str) -> bool:
    return os.path.realpath(filename).startswith(_library_dirs(_OURS))


def _where(frame: FrameType | None) -> str:
    """``file:line`` of the innermost frame outside qtee and pytest; when the whole stack is
    theirs (a thread qtee started), the outermost frame in qtee's own packages, where the
    thread entered them (else the innermost)."""
    first = frame
    entry = None
    while frame is not None:
        name = frame.f_code.co_filename
        if not _is_library(name):
            break
        if _is_ours(name):
            entry = frame
        frame = frame.f_back
    frame = frame or entry or first
    if frame is None:
        return "?"
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"


def format_leaks(kind: str, where: str, leaks: dict[str, int]) -> str:
    """One device's non-empty tables as a ``table | live`` table."""
    width = max(len("table"), *(len(name) for name in leaks))
    live = max(len("live"), *(len(str(n)) for n in leaks.values()))
    lines = [
        f"{kind} created at {where} still holds:",
        f"    {'table':<{width}} | {'live':>{live}}",
        f"    {'-' * width}-+-{'-' * live}",
    ]
    lines += [f"    {name:<{width}} | {count:>{live}}" for name, count in leaks.items()]
    return "\n".join(lines)


def format_leftovers(client: str, closed: bool, left: Sequence[Leftover]) -> str:
    """One client's leftovers as a ``kind | id | refers to | created at`` table."""
    from qtee._cli.info import format_table

    state = "unreleased when it was closed" if closed else "never closed, holds"
    rows = [[x.kind, x.ident, x.what, x.where] for x in left]
    return "\n".join(
        [
            f"client created at {client}: {state}:",
            *format_table(("kind", "id", "refers to", "created at"), rows),
        ]
    )


def _recording(cls: type, made: dict[int, _Record], lock: threading.Lock) -> Callable[..., None]:
    original: Callable[..., None] = cls.__init__  # type: ignore[misc]

    @functools.wraps(original)
    def recording_init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        where = _where(sys._getframe(1))
        with lock:  # recorded once, even through two tracked __init__s
            made.setdefault(id(self), [self, type(self).__name__, where])

    return recording_init


@pytest.fixture(autouse=True)
def qtee_leak_check(request: pytest.FixtureRequest) -> Iterator[None]:
    """Record the devices built during the test and what its clients hold; at teardown
    each device must have no leaks, and no client may have left handles for its close."""
    from qtee import client as client_module

    made: dict[int, _Record] = {}  # keeps the devices alive, so ids stay unique
    lock = threading.Lock()
    request.node.stash[_RECORDS] = made
    tracker = None
    if request.node.get_closest_marker(CLOSE_MARKER) is None:
        tracker = client_module.ObjectTracker(_where)
    request.node.stash[_TRACKER] = tracker
    with pytest.MonkeyPatch.context() as mp:
        for module, name in TRACKED_DEVICES:
            cls = getattr(importlib.import_module(module), name)
            mp.setattr(cls, "__init__", _recording(cls, made, lock))
        previous = client_module.track_objects(tracker)
        try:
            yield
        finally:
            client_module.track_objects(previous)
    request.node.stash[_TRACKER] = None  # the clients it keeps alive can go with the test
    if request.node.stash.get(_ALREADY_FAILED, False):
        return
    problems = [
        format_leaks(kind, where, leaks)
        for dev, kind, where in made.values()
        if (leaks := dev.leaks())
    ]
    left = tracker.report() if tracker is not None else []
    if left:
        problems.append(
            "objects left for a client's close to release (release them in the test, or "
            f"mark a test about close @pytest.mark.{CLOSE_MARKER}):\n"
            + "\n".join(format_leftovers(*client) for client in left)
        )
    if problems:
        pytest.fail("leak check: " + "\n".join(problems), pytrace=False)


def _label(request: pytest.FixtureRequest, device: object, where: str) -> None:
    """Name the place a fixture-built device comes from in the leak table."""
    rec = request.node.stash.get(_RECORDS, {}).get(id(device))
    if rec is not None and rec[0] is device:
        rec[2] = where


# ------------------------------------------------------------------------ TAs
@pytest.fixture(autouse=True)
def _qtee_ta_marker(request: pytest.FixtureRequest) -> Iterator[None]:
    """Register the TAs named by ``qtee_ta`` markers; restore the registry afterwards."""
    marks = list(request.node.iter_markers("qtee_ta"))
    if not marks:
        yield
        return
    from qtee.secure._registry import PROCESS_TAS

    wanted: dict[str, type[TrustedApp]] = {}
    for mark in reversed(marks):  # closest marker (the function's) wins
        if len(mark.args) != 2 or mark.kwargs:
            pytest.fail(
                f"{request.node.nodeid}: use @pytest.mark.qtee_ta(name, cls), not {mark!r}",
                pytrace=False,
            )
        name, cls = mark.args
        wanted[name] = cls
    saved: dict[str, type[TrustedApp] | None] = {}
    try:
        for name, cls in wanted.items():
            saved[name] = PROCESS_TAS.lookup(name, inherit=False)
            PROCESS_TAS.register(name, cls)
        yield
    finally:
        for name, previous in saved.items():
            if previous is not None:
                PROCESS_TAS.register(name, previous)
            elif PROCESS_TAS.lookup(name, inherit=False) is not None:
                PROCESS_TAS.unregister(name)


@pytest.fixture(autouse=True)
def _qtee_gp_ta_marker(request: pytest.FixtureRequest) -> Iterator[None]:
    """Register the GP TAs named by ``qtee_gp_ta`` markers; restore the registry after."""
    marks = list(request.node.iter_markers("qtee_gp_ta"))
    if not marks:
        yield
        return
    from uuid import UUID

    from qtee.secure import GpTA
    from qtee.secure._registry import PROCESS_TAS

    wanted: dict[tuple[bytes, bool], type[GpTA]] = {}
    for mark in reversed(marks):  # closest marker (the function's) wins
        cls = mark.args[0] if len(mark.args) == 1 else None
        loadable = mark.kwargs.get("loadable", False)
        if cls is None or set(mark.kwargs) - {"loadable"} or not isinstance(loadable, bool):
            pytest.fail(
                f"{request.node.nodeid}: use @pytest.mark.qtee_gp_ta(cls, loadable=False), "
                f"not {mark!r}",
                pytrace=False,
            )
        uuid = getattr(cls, "UUID", None)
        if not (isinstance(cls, type) and issubclass(cls, GpTA)) or not isinstance(uuid, UUID):
            pytest.fail(
                f"{request.node.nodeid}: qtee_gp_ta takes a GpTA subclass with a UUID, not {cls!r}",
                pytrace=False,
            )
        wanted[(uuid.bytes, loadable)] = cls
    saved: dict[tuple[bytes, bool], type[GpTA] | None] = {}

    def lookup(key: tuple[bytes, bool]) -> type[GpTA] | None:
        uuid, loadable = key
        if loadable:
            return PROCESS_TAS.lookup_loadable(uuid, inherit=False)
        return PROCESS_TAS.lookup_gp(uuid, inherit=False)

    try:
        for key, cls in wanted.items():
            saved[key] = lookup(key)
            PROCESS_TAS.register_gp(cls, loadable=key[1])
        yield
    finally:
        for key, previous in saved.items():
            if previous is not None:
                PROCESS_TAS.register_gp(previous, loadable=key[1])
            elif lookup(key) is not None:
                PROCESS_TAS.unregister_gp(key[0], loadable=key[1])


@pytest.fixture(autouse=True)
def _qtee_ta_file_marker(request: pytest.FixtureRequest) -> Iterator[None]:
    """Register the TA files named by ``qtee_ta_file`` markers; unregister afterwards."""
    marks = list(request.node.iter_markers("qtee_ta_file"))
    if not marks:
        yield
        return
    from qtee.secure import TaFileRegistration, register_ta_file

    regs: list[TaFileRegistration] = []
    try:
        for mark in reversed(marks):  # the closest (the function's) is registered last
            if len(mark.args) not in (1, 2) or set(mark.kwargs) - {"path", "sha256"}:
                pytest.fail(
                    f"{request.node.nodeid}: use @pytest.mark.qtee_ta_file(cls, path=None, "
                    f"sha256=None), not {mark!r}",
                    pytrace=False,
                )
            cls, *rest = mark.args
            path = rest[0] if rest else mark.kwargs.get("path")
            if path is not None:
                path = request.path.parent / path  # an absolute path stays as it is
            regs.append(register_ta_file(cls, path, sha256=mark.kwargs.get("sha256")))
        yield
    finally:
        for reg in reversed(regs):
            reg.unregister()


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
