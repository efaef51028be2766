"""The plugin's leak check names what a test leaves for a client's close (issue 15, "Leaks
named"): ObjRefs, MemoryObjects and callback objects QTEE holds, each by kind, id, what it
refers to and the line that made it; ``qtee_close_releases`` opts a test out.

Each scenario runs in a test session of its own (``pytester``, in a subprocess that gets
the plugin from its entry point), as tests/plugin/test_pytest_plugin.py does.
"""

from __future__ import annotations

import pytest

from qtee._tracker import Leftover
from qtee.pytest_plugin import format_leftovers

pytest_plugins = ["pytester"]


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "--strict-markers", *args)


# After "leak check: ", or after the device tables when a device leaked too.
HEADER = (
    "*objects left for a client's close to release (release them in the test, "
    "or mark a test about close @pytest.mark.qtee_close_releases):"
)

TAS = """
import pytest
from qtee import OUT_OBJECT, CallbackObject, Client, NsObject, TrustedApp, op, ta_image


class Keeper(TrustedApp):
    \"\"\"Keeps the callback objects it is given until its app object is released.\"\"\"

    def __init__(self):
        self.kept = []

    @op(0, io=1)
    def keep(self, cb: NsObject) -> None:
        self.kept.append(cb.retain())

    def on_release(self) -> None:
        while self.kept:
            self.kept.pop().release()


class Echo(CallbackObject):
    @op(0)
    def ping(self) -> None:
        return None


def load(client, env, name):
    loader = client.open_service(env, 3)
    (ctrl,) = loader.invoke(0, ta_image(name), OUT_OBJECT)
    (app,) = ctrl.invoke(2, OUT_OBJECT)
    loader.release()
    return ctrl, app
"""

LEAVES = (
    TAS
    + """

@pytest.mark.qtee_ta("keeper", Keeper)
def test_leaves_one_of_each_kind(qtee_client, qtee_env):
    ctrl, app = load(qtee_client, qtee_env, "keeper")
    app.invoke(0, Echo())
    mem = qtee_client.memory(4096)


@pytest.mark.qtee_close_releases
@pytest.mark.qtee_ta("keeper", Keeper)
def test_about_close(qtee_client, qtee_env):
    ctrl, app = load(qtee_client, qtee_env, "keeper")
    app.invoke(0, Echo())
    mem = qtee_client.memory(4096)


@pytest.mark.qtee_ta("keeper", Keeper)
def test_releases_everything(qtee_client, qtee_env):
    ctrl, app = load(qtee_client, qtee_env, "keeper")
    app.invoke(0, Echo())
    mem = qtee_client.memory(4096)
    mem.release()
    app.release()
    ctrl.invoke(1)
    ctrl.release()


def test_a_client_of_its_own(qtee_device):
    with Client(qtee_device, workers=1) as client:
        env = client.client_env()
        fv = client.open_service(env, 2033)
        fv.release()
"""
)


def test_leftovers_are_named_by_kind_id_label_and_line(pytester: pytest.Pytester) -> None:
    """An app controller, an app object, a shm and a callback object a TA keeps, all left
    for ``qtee_client``'s close (which frees them: the device tables end empty): one error
    naming each (qtee-kernel.md §2.2 ids: env 0, loader 1 released, controller 2, app 3;
    callback id 2, after the credentials object's 1).  The opt-out marker, a test that
    releases everything, and a client of the test's own closed by ``with``."""
    pytester.makepyfile(test_inner=LEAVES)
    result = _run(pytester)
    result.assert_outcomes(passed=4, errors=2)  # two pass, then error at teardown
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaves_one_of_each_kind*",
            HEADER,
            "client created at fixture qtee_client: unreleased when it was closed:",
            "    kind            | id | refers to                    | created at",
            "    ----------------+----+------------------------------+-----------------",
            "    ObjRef          |  2 | AppController of TA 'keeper' | test_inner.py:28",
            "    ObjRef          |  3 | TA 'keeper' (Keeper)         | test_inner.py:29",
            "    MemoryObject    |  1 | 4096 bytes                   | test_inner.py:38",
            "    callback object |  2 | Echo                         | test_inner.py:37",
            "*ERROR at teardown of test_a_client_of_its_own*",
            HEADER,
            "client created at test_inner.py:61: unreleased when it was closed:",
            "    kind   | id | refers to | created at",
            "    -------+----+-----------+-----------------",
            "    ObjRef |  0 | ClientEnv | test_inner.py:62",
        ]
    )
    out = result.stdout.str()
    assert "Device created at" not in out  # close freed it all: only the handles are named
    errors = "\n".join(line for line in result.stdout.lines if line.startswith("ERROR"))
    assert "test_about_close" not in errors and "test_releases_everything" not in errors


NEVER_CLOSED = """
from qtee import Client


def test_never_closes(qtee_device):
    client = Client(qtee_device, workers=1)
    env = client.client_env()
    mem = client.memory(64)
"""


def test_a_client_never_closed_names_what_it_holds(pytester: pytest.Pytester) -> None:
    """A client the test never closes: the device's tables, and the client's own handles
    by name beside them."""
    pytester.makepyfile(test_inner=NEVER_CLOSED)
    result = _run(pytester)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "leak check: Device created at fixture qtee_device still holds:",
            "*context 0 objects |    1",
            HEADER,
            "client created at test_inner.py:5: never closed, holds:",
            "    kind         | id | refers to | created at",
            "    -------------+----+-----------+----------------",
            "    ObjRef       |  0 | ClientEnv | test_inner.py:6",
            "    MemoryObject |  1 | 64 bytes  | test_inner.py:7",
        ]
    )


MODES = """
import pytest


@pytest.mark.qtee_modes("in-process", "server", "guest")
def test_leaves_a_service(qtee_client, qtee_env):
    qtee_client.open_service(qtee_env, 2033)
"""


def test_every_mode_names_the_leftover_by_its_label(pytester: pytest.Pytester) -> None:
    """The same leftover in process, over a device server (the server names the fd's
    objects: the ``objects`` query) and in a guest (the guest's partition labels it)."""
    pytester.makepyfile(test_inner=MODES)
    result = _run(pytester)
    result.assert_outcomes(errors=3, passed=3)
    lines = result.stdout.lines
    # The ERRORS section only: with CI set, pytest's short summary repeats whole messages.
    errors = lines[: lines.index(next(x for x in lines if "short test summary info" in x))]
    row = "    ObjRef |  1 | service 0x7f1 FeatureVersions | test_inner.py:6"
    assert errors.count(row) == 3, result.stdout.str()
    for mode in ("in-process", "server", "guest"):
        assert any(f"test_leaves_a_service[{mode}]" in line for line in lines), mode


KEPT = (
    TAS
    + """

class Giver(TrustedApp):
    \"\"\"Calls the client's callback object back with an env of its own (a QTEE object).\"\"\"

    @op(0, io=1)
    def give(self, cb: NsObject) -> None:
        from qtee.secure import FeatureVersions

        res = cb.invoke(0, io=[FeatureVersions()])
        assert res.result == 0


class Taker(CallbackObject):
    def __init__(self):
        self.got = None

    @op(0, io=1)
    def take(self, obj) -> None:
        self.got = obj.keep()  # kept past the callback, never released


@pytest.mark.qtee_ta("giver", Giver)
def test_keeps_an_input(qtee_client, qtee_env):
    ctrl, app = load(qtee_client, qtee_env, "giver")
    app.invoke(0, Taker())
    app.release()
    ctrl.invoke(1)
    ctrl.release()
"""
)


def test_an_input_object_kept_by_a_handler_is_named_where_it_was_kept(
    pytester: pytest.Pytester,
) -> None:
    """A QTEE object a callback received and kept (``keep()``): made by a worker thread, so
    the line named is the handler's ``keep()`` (quic-teec.md §4: input objects are released
    after the callback unless kept)."""
    pytester.makepyfile(test_inner=KEPT)
    result = _run(pytester)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "client created at fixture qtee_client: unreleased when it was closed:",
            "    kind   | id | refers to       | created at",
            "    -------+----+-----------------+-----------------",
            "    ObjRef |  1 | FeatureVersions | test_inner.py:51",
        ]
    )


def test_the_marker_is_listed(pytester: pytest.Pytester) -> None:
    """``pytest --markers`` lists the opt-out (registered in pytest_configure)."""
    result = _run(pytester, "--markers")
    result.stdout.fnmatch_lines(
        ["@pytest.mark.qtee_close_releases: the test leaves ObjRefs, MemoryObjects*"]
    )


def test_format_leftovers_is_a_table() -> None:
    left = [
        Leftover("ObjRef", 12, "TA 'adder' (Adder)", "t.py:3"),
        Leftover("callback object", 1, "Echo", "t.py:10"),
    ]
    assert format_leftovers("fixture qtee_client", True, left).splitlines() == [
        "client created at fixture qtee_client: unreleased when it was closed:",
        "    kind            | id | refers to          | created at",
        "    ----------------+----+--------------------+-----------",
        "    ObjRef          | 12 | TA 'adder' (Adder) | t.py:3",
        "    callback object |  1 | Echo               | t.py:10",
    ]
