"""The benchmarks run and print each figure beside its floor (issue 18, "Build", first point;
"Acceptance", second point).

``bench/invoke.py`` and ``bench/ipc.py`` run as ``make bench`` runs them, with
``QTEE_BENCH_QUICK=1`` (tiny runs: their code and output are checked, nothing is measured).
Each figure with a target prints its name, qtee's ratio to the baseline, the floor
prototype's ratio to the same baseline, the target and ok/MISSED, in one line.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests._paths import REPO

#: name, ops/s, qtee's ratio, the floor's ratio, the target and its verdict.
LINE = re.compile(
    r"^(?P<name>\S.*?)\s+[\d,]+ ops/s\s+(?P<ratio>\d+\.\d\d)x baseline"
    r"  floor\s+(?P<floor>\d+\.\d\d)x  \(target <= (?P<target>\d+(\.\d+)?)x: (ok|MISSED)\)$"
)

FIGURES = {
    "invoke.py": {
        "null invoke client -> TA -> client": "2.0",
        "invoke + callback through the worker": "6.0",
        "null invoke, 1,000 live objects (paired)": "1.1",
    },
    "ipc.py": {
        "null invoke over the socket": "3.0",
        "invoke + 1 callback over the socket": "4.0",
        "null invoke, 32 idle connections (alternated)": "1.1",
    },
}


def _run(script: str) -> str:
    env = {**os.environ, "QTEE_BENCH_QUICK": "1"}
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done.stdout


@pytest.mark.parametrize("script", sorted(FIGURES))
def test_each_figure_prints_its_floor_beside_it(script: str) -> None:
    """Issue 18 "Build": each bench prints its floor prototype's ratio beside qtee's, with
    the new targets (<= 2x, 6x, 1.1x in process; <= 3x, 4x, 1.1x over the socket)."""
    out = _run(script)
    found = {}
    for line in out.splitlines():
        m = LINE.match(line)
        if m:
            found[m["name"]] = m["target"]
            assert float(m["ratio"]) > 0 and float(m["floor"]) > 0, line
    assert found == FIGURES[script], out


SPREAD = re.compile(
    r"^(?P<name>\S.*?)\s+[\d,]+ ops/s\s+(?P<median>\d+\.\d\d)x "
    r"\((?P<lo>\d+\.\d\d)-(?P<hi>\d+\.\d\d)\)"
    r"   floor\s+\d+\.\d\dx \(\d+\.\d\d-\d+\.\d\d\)"
    r"   target <= (?P<target>\d+(\.\d+)?)x: (ok|MISSED) \((?P<met>\d)/2 runs\)$"
)


def test_spread_gives_each_targeted_figure_its_median_and_range() -> None:
    """Issue 18 "Acceptance": "the README states each figure's spread across 5 runs";
    ``make bench-spread`` runs the two benches N times and prints, per targeted figure,
    the median ratio, its lowest and highest, the floor's, and how many runs met it."""
    env = {**os.environ, "QTEE_BENCH_QUICK": "1"}
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "_spread.py"), "--runs", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    found = {}
    for line in done.stdout.splitlines():
        m = SPREAD.match(line)
        if m:
            assert float(m["lo"]) <= float(m["median"]) <= float(m["hi"]), line
            found[m["name"]] = m["target"]
    assert found == {**FIGURES["invoke.py"], **FIGURES["ipc.py"]}, done.stdout
    assert done.stderr.count("run 1/2") == 2 and done.stderr.count("run 2/2") == 2


def test_spread_refuses_fewer_than_one_run() -> None:
    """A run count below one is named, not run."""
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "_spread.py"), "--runs", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "--runs must be at least 1, not 0" in done.stderr
