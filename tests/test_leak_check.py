"""The suite-wide leak check in conftest.py fails a leaking test and passes a clean one
(HABITS.md "Tests" recipe 1: teardown asserts every table is empty)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()

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
"""


def test_a_leaking_test_fails_and_a_clean_one_passes(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_inner=LEAKY_AND_CLEAN)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    # The leak is reported as an error in the leaking test's teardown, nowhere else.
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaks_a_client_env*",
            "*leak check: device created at test_inner.py:5 still holds:*",
            "*secure objects*1*",
            "*ns ids*1*",
            "*context 0 objects*1*",
        ]
    )
    assert "test_releases_and_closes" not in "\n".join(
        line for line in result.stdout.lines if "ERROR" in line
    )


def test_a_failing_test_is_not_reported_twice(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_inner="""
from qtee import Client, Device, QteeRoot, SecureWorld


def test_fails_while_holding_a_client_env():
    client = Client(Device(SecureWorld(QteeRoot())), workers=1)
    client.client_env()
    assert False, "the test's own failure"
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    assert "leak check" not in result.stdout.str()
