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

import pytest

# pytest finds the plugin's hooks and fixtures in this module (the entry point's), so
# the ones its private modules define are imported here.
from qtee._pytest_fixtures import (
    AppLoaderHelper,
    qtee_app,  # noqa: F401
    qtee_client,  # noqa: F401
    qtee_device,  # noqa: F401
    qtee_env,  # noqa: F401
    qtee_guest,  # noqa: F401
    qtee_server,  # noqa: F401
    qtee_supplicant,  # noqa: F401
)
from qtee._pytest_leaks import (
    CLOSE_MARKER,
    TRACKED_DEVICES,
    format_leaks,
    format_leftovers,
    pytest_runtest_makereport,  # noqa: F401
    qtee_leak_check,  # noqa: F401
)
from qtee._pytest_markers import _qtee_ta_markers  # noqa: F401

__all__ = ["CLOSE_MARKER", "TRACKED_DEVICES", "AppLoaderHelper", "format_leaks", "format_leftovers"]

#: Where ``qtee_device`` lives: this process, behind a device server's socket, or in a
#: guest VM whose SMCs go through the VMM-side mediator (``qtee.vm``).
MODES = ("in-process", "server", "guest")


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
