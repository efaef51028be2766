"""The qtee pytest plugin (qtee/pytest_plugin.py): fixtures, markers and the leak check.

Tests that need a test session of their own (a leaking test, the README example, what a
marker leaves behind after its test) run one with ``pytester`` in a subprocess, which gets
the plugin from its ``pytest11`` entry point like any project that installs qtee; the rest
use the fixtures directly, in this suite's own session.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import pytest

import qtee
from qtee import Client, Device, DeviceServer, ObjRef, Out, TrustedApp, op
from qtee.pytest_plugin import AppLoaderHelper, format_leaks
from qtee.secure import _apps
from supplicant import FS_LISTENER_ID, TIME_LISTENER_ID, Supplicant
from tests._paths import REPO, TESTS

pytest_plugins = ["pytester"]

README = REPO / "README.md"


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "--strict-markers", *args)


# ---------------------------------------------------------------------- README example
def readme_example() -> str:
    """The Python block of the README's "Testing TAs with pytest" section."""
    section = README.read_text().split("## Testing TAs with pytest", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None
    return match.group(1)


def test_the_readme_example_is_ten_lines_and_passes(pytester: pytest.Pytester) -> None:
    code = readme_example()
    assert len([line for line in code.splitlines() if line.strip()]) <= 11
    pytester.makepyfile(test_tas=code)
    result = _run(pytester, "-W", "error")
    result.assert_outcomes(passed=1)


# ---------------------------------------------------------------------- the leak check
LEAKY_AND_CLEAN = """
from qtee import Client, Device, QteeRoot, SecureWorld


def test_leaks_a_client_env():
    dev = Device(SecureWorld(QteeRoot()))
    client = Client(dev, workers=1)
    client.client_env()  # never released, context never closed


def test_releases_and_closes():
    dev = Device(SecureWorld(QteeRoot()))
    client = Client(dev, workers=1)
    client.client_env().release()
    client.close()


def test_leaks_through_the_device_fixture(qtee_device):
    Client(qtee_device, workers=1).client_env()


def test_clean_with_every_fixture(qtee_device, qtee_client, qtee_env, qtee_app):
    assert qtee_client.device is qtee_device


def test_leaks_on_an_optee_device():
    from qtee import OpteeDevice, QteeRoot, SecureWorld
    from qtee.gp import TeecContext, TeecSharedMemory

    ctx = TeecContext(OpteeDevice(SecureWorld(QteeRoot())))
    TeecSharedMemory.allocate(ctx, 64, 1)  # never released, context never finalized
"""


def test_a_leaking_test_errors_with_a_table_and_a_clean_one_passes(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_inner=LEAKY_AND_CLEAN)
    result = _run(pytester)
    # Each leak is an error in the leaking test's teardown, nowhere else.
    result.assert_outcomes(passed=5, errors=3)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaks_a_client_env*",
            "leak check: Device created at test_inner.py:5 still holds:",
            "    table             | live",
            "    ------------------+-----",
            "    secure objects    |    1",
            "    ns ids            |    1",
            "    context 0 objects |    1",
            "*ERROR at teardown of test_leaks_through_the_device_fixture*",
            "leak check: Device created at fixture qtee_device still holds:",
            "*ERROR at teardown of test_leaks_on_an_optee_device*",
            "leak check: OpteeDevice created at test_inner.py:29 still holds:",
            "    table   | live",
            "*shm ids*|*1",
        ]
    )
    errors = "\n".join(line for line in result.stdout.lines if line.startswith("ERROR"))
    assert "test_releases_and_closes" not in errors
    assert "test_clean_with_every_fixture" not in errors


def test_a_failing_test_is_not_reported_twice(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_inner="""
import pytest
from qtee import Client


def test_fails_while_holding_a_client_env(qtee_device):
    Client(qtee_device, workers=1).client_env()
    assert False, "the test's own failure"


@pytest.mark.xfail(strict=True)
def test_xfails_while_holding_a_client_env(qtee_device):
    Client(qtee_device, workers=1).client_env()
    assert False
"""
    )
    result = _run(pytester)
    result.assert_outcomes(failed=1, xfailed=1)
    assert "leak check" not in result.stdout.str()


def test_format_leaks_is_a_table() -> None:
    assert format_leaks("Device", "t.py:3", {"ns ids": 2, "context 0 request ids": 12}) == (
        "Device created at t.py:3 still holds:\n"
        "    table                 | live\n"
        "    ----------------------+-----\n"
        "    ns ids                |    2\n"
        "    context 0 request ids |   12"
    )


def test_the_plugin_comes_from_the_entry_point_once(pytestconfig: pytest.Config) -> None:
    import qtee.pytest_plugin

    pm = pytestconfig.pluginmanager
    assert pm.get_plugin("qtee") is qtee.pytest_plugin
    assert [p for p in pm.get_plugins() if p is qtee.pytest_plugin] == [qtee.pytest_plugin]


def test_the_conftest_loads_the_plugin_when_autoload_is_off(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeconftest((TESTS / "conftest.py").read_text())
    pytester.makepyfile(test_inner=LEAKY_AND_CLEAN)
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    result = _run(pytester, "-p", "no:timeout")
    result.assert_outcomes(passed=5, errors=3)


# ---------------------------------------------------------------------- markers
REGISTRY_AFTER_THE_TEST = """
import pytest
from qtee import TrustedApp, register_ta
from qtee.secure import _apps


class First(TrustedApp):
    pass


class Second(TrustedApp):
    pass


register_ta("inner.kept", First)


@pytest.mark.qtee_ta("inner.new", First)
@pytest.mark.qtee_ta("inner.kept", Second)
def test_marked():
    assert _apps._REGISTRY["inner.new"] is First
    assert _apps._REGISTRY["inner.kept"] is Second


def test_after():
    assert "inner.new" not in _apps._REGISTRY
    assert _apps._REGISTRY["inner.kept"] is First


@pytest.mark.qtee_ta("inner.bad")
def test_misused_ta_marker():
    pass


@pytest.mark.qtee_supplicant(sotrage=True)
def test_misspelt_supplicant_option(qtee_supplicant):
    pass
"""


def test_the_ta_marker_unregisters_after_the_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner=REGISTRY_AFTER_THE_TEST)
    result = _run(pytester)
    result.assert_outcomes(passed=2, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*test_misused_ta_marker: use @pytest.mark.qtee_ta(name, cls), not Mark(*",
            "*qtee_supplicant marker: unknown option sotrage (options: storage, ta_dirs, *",
        ]
    )


class Echo(TrustedApp):
    @op(0, ib=(None,), ob=(None,))
    def echo(self, data: bytes) -> bytes:
        return data


class Clock(TrustedApp):
    @op(0, ob=(16,))
    def utc(self) -> bytes:  # GET_UTC_SEC through the time listener
        return self.world.listeners.get(TIME_LISTENER_ID).request(struct.pack("<I", 0x302))[:16]


@pytest.mark.qtee_ta("plugin.echo", Echo)
def test_the_ta_marker_registers_for_the_test(qtee_app: AppLoaderHelper) -> None:
    assert _apps._REGISTRY["plugin.echo"] is Echo
    assert qtee_app("plugin.echo").invoke(0, b"ping", Out(8)) == [b"ping"]


@pytest.mark.qtee_ta("plugin.echo", Echo)
class TestClassMarker:
    def test_a_class_marker_registers_too(self) -> None:
        assert _apps._REGISTRY["plugin.echo"] is Echo


def test_without_the_marker_nothing_is_registered() -> None:
    assert "plugin.echo" not in _apps._REGISTRY


# ---------------------------------------------------------------------- fixtures
def test_the_client_fixtures_share_one_device(
    qtee_device: Device, qtee_client: Client, qtee_env: ObjRef
) -> None:
    assert qtee_client.device is qtee_device
    assert qtee_client.pool is not None and qtee_client.pool.workers == 2
    assert not qtee_env.released


@pytest.mark.qtee_ta("plugin.echo", Echo)
@pytest.mark.qtee_ta("plugin.echo2", Echo)
def test_qtee_app_loads_and_unloads(
    qtee_device: Device, qtee_client: Client, qtee_env: ObjRef
) -> None:
    before = set(qtee_device.world.live_ids())
    helper = AppLoaderHelper(qtee_client, qtee_env)
    first, second = helper("plugin.echo"), helper("plugin.echo2", b"payload")
    assert first.invoke(0, b"a", Out(1)) == [b"a"] and second.invoke(0, b"b", Out(1)) == [b"b"]
    assert len(qtee_device.world.live_ids()) > len(before)
    helper.close()
    assert set(qtee_device.world.live_ids()) == before
    assert first.released and second.released
    helper("plugin.echo")  # unloaded, so it loads again (not ALREADY_LOADED)
    helper.close()


def test_the_supplicant_defaults_to_the_time_listener(
    qtee_supplicant: Supplicant, qtee_device: Device
) -> None:
    assert qtee_supplicant.client.device is qtee_device
    assert qtee_device.world.listeners.ids() == [TIME_LISTENER_ID]
    assert qtee_device.world.listeners.ta_buffer is None


@pytest.mark.qtee_supplicant(storage=True, time=False)
def test_storage_only(qtee_supplicant: Supplicant, qtee_device: Device, tmp_path: Path) -> None:
    assert qtee_device.world.listeners.ids() == [FS_LISTENER_ID]
    assert (tmp_path / "tzstorage").is_dir()


@pytest.mark.qtee_supplicant(storage=True, time=True, ta_dirs=True)
def test_every_listener(qtee_supplicant: Supplicant, qtee_device: Device, tmp_path: Path) -> None:
    assert qtee_device.world.listeners.ids() == [FS_LISTENER_ID, TIME_LISTENER_ID]
    assert qtee_device.world.listeners.ta_buffer is not None
    assert (tmp_path / "tas").is_dir()


@pytest.mark.qtee_supplicant(time=False, ta_dirs=["."])
def test_relative_ta_dirs_and_no_listener(qtee_supplicant: Supplicant, qtee_device: Device) -> None:
    assert qtee_device.world.listeners.ids() == []
    assert qtee_device.world.listeners.ta_buffer is not None


@pytest.mark.qtee_ta("plugin.clock", Clock)
def test_a_ta_reaches_the_supplicant(
    qtee_supplicant: Supplicant, qtee_app: AppLoaderHelper
) -> None:
    (answer,) = qtee_app("plugin.clock").invoke(0, Out(16))
    assert len(answer) == 16
    assert qtee_supplicant.listeners[TIME_LISTENER_ID].served == 1


# ---------------------------------------------------------------------- modes and the server
MODES = """
import struct
import pytest
from qtee import Out, TrustedApp, op


class Adder(TrustedApp):
    @op(0, ib=(8,), ob=(4,))
    def add(self, pair):
        return struct.pack("<I", sum(struct.unpack("<II", pair)))


@pytest.mark.qtee_ta("adder", Adder)
@pytest.mark.qtee_modes("in-process", "server")
def test_both(qtee_app):
    assert qtee_app("adder").invoke(0, struct.pack("<II", 2, 3), Out(4)) == [b"\\x05\\0\\0\\0"]


@pytest.mark.qtee_ta("adder", Adder)
def test_by_option(qtee_device, qtee_app):
    assert qtee_app("adder").invoke(0, struct.pack("<II", 1, 1), Out(4)) == [b"\\x02\\0\\0\\0"]
    print("DEVICE", type(qtee_device).__name__)
"""


@pytest.mark.parametrize(
    ("option", "ids", "device"),
    [
        ((), ["test_both[in-process]", "test_both[server]", "test_by_option "], "Device"),
        (("--qtee-mode=server",), ["test_both[in-process]", "test_by_option[server]"], "Remote"),
        (("--qtee-mode=guest",), ["test_both[server]", "test_by_option[guest]"], "Device"),
        (
            ("--qtee-mode=all",),
            ["test_by_option[in-process]", "test_by_option[server]", "test_by_option[guest]"],
            None,
        ),
    ],
    ids=["default", "server", "guest", "all"],
)
def test_modes_run_one_test_in_process_and_against_a_server(
    pytester: pytest.Pytester, option: tuple[str, ...], ids: list[str], device: str | None
) -> None:
    """The qtee_modes marker parametrizes qtee_device (and every fixture on it); without
    it, --qtee-mode decides."""
    pytester.makepyfile(test_modes=MODES)
    result = _run(pytester, "-v", "-s", *option)
    result.assert_outcomes(passed=5 if "--qtee-mode=all" in option else 3)
    for name in ids:
        assert any(name in line for line in result.outlines), name
    if device is not None:
        assert f"DEVICE {device}" in result.stdout.str()


def test_a_misused_modes_marker_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_bad="""
import pytest

@pytest.mark.qtee_modes("cloud")
def test_x(qtee_device):
    pass
"""
    )
    result = _run(pytester)
    assert result.ret == pytest.ExitCode.INTERRUPTED  # an error while collecting
    result.stdout.fnmatch_lines(
        ["*qtee_modes takes modes from ('in-process', 'server', 'guest'), not ('cloud',)*"]
    )


SERVER_LEAK = """
import pytest
from qtee import Client, NsObject, TrustedApp, op


class Hoarder(TrustedApp):
    kept = []

    @op(0, io=1)
    def keep(self, cb: NsObject) -> None:
        Hoarder.kept.append(cb.retain())  # never released


@pytest.mark.qtee_ta("hoarder", Hoarder)
@pytest.mark.qtee_modes("server")
def test_leaks_in_the_server(qtee_app, qtee_env):
    from qtee import CallbackObject
    qtee_app("hoarder").invoke(0, CallbackObject())
"""


def test_a_leak_in_the_server_fails_the_test_with_its_table(pytester: pytest.Pytester) -> None:
    """The server's device is leak-checked like an in-process one, named by its fixture."""
    pytester.makepyfile(test_server_leak=SERVER_LEAK)
    result = _run(pytester)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        ["*leak check: Device created at fixture qtee_server still holds:*", "*ns ids |    1"]
    )


def test_the_server_fixture_serves_a_fresh_device(qtee_server: DeviceServer) -> None:
    assert len(qtee_server.path) < 108 and os.path.exists(qtee_server.path)
    with Client(qtee.connect(qtee_server.path), workers=1) as client, client.client_env():
        assert qtee_server.connections == 1
        assert qtee_server.device.leaks().get("context 0 objects") == 1
