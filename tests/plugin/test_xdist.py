"""The pytest plugin under pytest-xdist, and the markers it documents (issue 15, "CLI and
plugin hygiene": "the plugin works under pytest-xdist (``pytest -n 4``: devices, servers
and socket paths per worker); ``--markers`` lists every mode").

The inner sessions run with ``pytester`` in a subprocess, which gets the plugin from its
``pytest11`` entry point like any project that installs qtee.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qtee import _pytest_fixtures, _pytest_leaks, _pytest_markers, pytest_plugin

pytest_plugins = ["pytester"]

#: A suite for two workers: every test records where its server listened and which
#: worker ran it; the server-mode tests hold their server a while so both workers run
#: servers at the same time.
XDIST_SUITE = """
import os
import struct
import time

import pytest

import qtee
from qtee import Out, TrustedApp, op


class Adder(TrustedApp):
    @op(0, ib=(8,), ob=(4,))
    def add(self, pair):
        a, b = struct.unpack("<II", pair)
        return struct.pack("<I", a + b)


def _note(what, path):
    worker = os.environ.get("PYTEST_XDIST_WORKER", "none")
    with open(os.path.join(os.environ["QTEE_XDIST_LOG"], f"{worker}-{os.getpid()}"), "a") as f:
        f.write(f"{what} {path}\\n")


@pytest.mark.qtee_ta("xdist.adder", Adder)
@pytest.mark.qtee_modes("in-process", "server")
@pytest.mark.parametrize("n", range(4))
def test_add_in_each_mode(qtee_device, qtee_app, n):
    app = qtee_app("xdist.adder")
    (out,) = app.invoke(0, struct.pack("<II", n, 40), Out(4))
    assert struct.unpack("<I", out) == (n + 40,)
    if isinstance(qtee_device, qtee.RemoteDevice):
        _note("server", qtee_device.path)
        time.sleep(0.2)
    app.release()


@pytest.mark.parametrize("n", range(4))
def test_a_server_of_its_own(qtee_server, n):
    _note("server", qtee_server.path)
    assert len(os.fsencode(qtee_server.path)) <= 108
    client = qtee.Client(qtee.connect(qtee_server.path), workers=1)
    client.client_env().release()
    client.close()
    time.sleep(0.2)


@pytest.mark.qtee_supplicant(storage=True)
@pytest.mark.qtee_modes("server")
def test_supplicant_in_server_mode(qtee_supplicant, qtee_device):
    assert qtee_supplicant.listeners
    _note("server", qtee_device.path)
"""


def test_the_plugin_under_xdist_gives_each_worker_its_own_servers(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 15: ``pytest -n 2`` with ``qtee_device`` in server mode, ``qtee_server``, and
    the ``qtee_ta``/``qtee_modes``/``qtee_supplicant`` markers: every test passes, both
    workers run tests, every server has a socket path of its own, named after its
    worker, within the 108 bytes of ``sun_path`` even under a long ``TMPDIR``, and the
    leak check runs in each worker (no test reports a leak)."""
    log = tmp_path / "log"
    log.mkdir()
    deep = tmp_path / ("t" * 100)  # a socket under it would not fit in sun_path
    deep.mkdir()
    monkeypatch.setenv("QTEE_XDIST_LOG", str(log))
    monkeypatch.setenv("TMPDIR", str(deep))
    pytester.makepyfile(test_inner=XDIST_SUITE)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--strict-markers", "-n", "2", "-p", "xdist"
    )
    result.assert_outcomes(passed=13)
    notes = {f.name: f.read_text().split("\n")[:-1] for f in log.iterdir()}
    workers = {name.split("-")[0] for name in notes}
    assert workers == {"gw0", "gw1"}, notes
    paths = [line.split(" ", 1)[1] for lines in notes.values() for line in lines]
    assert len(paths) == 9  # 4 server-mode adds, 4 qtee_server, 1 supplicant
    assert len(set(paths)) == len(paths), paths  # no two servers shared a path
    assert all(len(p.encode()) <= 108 for p in paths)
    for name, lines in notes.items():
        worker = name.split("-")[0]
        assert all(f"/qtee-{worker}-" in line for line in lines), lines


def test_markers_lists_every_mode_and_every_qtee_marker(pytester: pytest.Pytester) -> None:
    """issue 15: ``pytest --markers`` lists each qtee marker the plugin reads, and the
    ``qtee_modes`` line names every mode of ``qtee_device``."""
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--markers")
    assert result.ret == 0
    listed = {
        m.group(1): line
        for line in result.outlines
        if (m := re.match(r"@pytest\.mark\.(qtee_\w+)", line))
    }
    plugin = (pytest_plugin, _pytest_fixtures, _pytest_leaks, _pytest_markers)
    source = "".join(Path(str(m.__file__)).read_text() for m in plugin)
    read = set(
        re.findall(r"""(?:iter_markers|get_closest_marker)\(\s*["'](qtee_\w+)["']""", source)
    )
    assert {"qtee_modes", "qtee_ta", "qtee_ta_file", "qtee_supplicant"} <= read
    assert read <= set(listed), f"markers read but not listed: {read - set(listed)}"
    for mode in pytest_plugin.MODES:
        assert f"'{mode}'" in listed["qtee_modes"], listed["qtee_modes"]
