"""Suite-wide fixtures: every test leaves every device it created empty.

The leak check is the teardown half of HABITS.md "Tests" recipe 1 ("teardown closes
everything and asserts the tables are empty"), applied to every test instead of being
repeated at the end of each module's fixture: each ``qtee.Device`` built while a test
runs is recorded, and after the test and all its fixtures have torn down,
``Device.leaks()`` must be ``{}`` for each one.  A test whose body raised (a
failure, or an expected xfail) is not checked again: the leak would only repeat it.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from qtee import _driver

_TESTS_DIR = Path(__file__).resolve().parent
_CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call" and call.excinfo is not None:  # failed, or xfailed as expected
        item.stash[_CALL_FAILED] = True
    return report


def _where(stack: traceback.StackSummary) -> str:
    """The innermost frame in the test suite that built the device (or the innermost)."""
    for frame in reversed(stack):
        if Path(frame.filename).resolve().is_relative_to(
            _TESTS_DIR
        ) and not frame.filename.endswith("conftest.py"):
            return f"{Path(frame.filename).name}:{frame.lineno}"
    frame = stack[-1]
    return f"{Path(frame.filename).name}:{frame.lineno}"


def format_leaks(where: str, leaks: dict[str, int]) -> str:
    """One device's non-empty tables as an aligned table."""
    width = max(len(name) for name in leaks)
    rows = "\n".join(f"    {name:<{width}}  {count}" for name, count in leaks.items())
    return f"device created at {where} still holds:\n{rows}"


@pytest.fixture(autouse=True)
def device_leak_check(request: pytest.FixtureRequest) -> Iterator[None]:
    """Record every Device built during the test; at teardown each must have no leaks."""
    made: list[tuple[_driver.Device, str]] = []
    original: Callable[..., None] = _driver.Device.__init__

    def recording_init(self: _driver.Device, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        made.append((self, _where(traceback.extract_stack()[:-1])))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_driver.Device, "__init__", recording_init)
        yield
    if request.node.stash.get(_CALL_FAILED, False):
        return
    problems = [format_leaks(where, leaks) for dev, where in made if (leaks := dev.leaks())]
    if problems:
        pytest.fail("leak check: " + "\n".join(problems), pytrace=False)
