"""Shared timing helpers for the benchmarks: best-of-N ops/s of a callable, runs paired or
alternated, and the report line.  ``QTEE_BENCH_QUICK=1`` makes every run tiny (a smoke
test of the benchmarks' code and output, not a measurement)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

#: Tiny runs: checks that a benchmark runs and what it prints, measures nothing.
QUICK = os.environ.get("QTEE_BENCH_QUICK") == "1"


def pin_to_one_cpu() -> str:
    """Run this process on one CPU; returns a line saying which.

    Python threads take turns on the GIL, so a second CPU adds nothing but cross-CPU
    wake-ups, whose cost swings 10x on a VM from run to run.  On one CPU a thread
    handoff costs what the interpreter makes it cost, for the baselines and for qtee.
    """
    if not hasattr(os, "sched_setaffinity"):
        return "cpu affinity: not supported here, figures are noisier"
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return f"pinned to cpu {cpu} (see bench/_timing.py)"


def _calibrate(fn: Callable[[], object], min_time: float) -> int:
    """Loops of ``fn`` that take about ``min_time`` seconds.  One call first, untimed: a
    first call that waits (for a child process still starting, say) would otherwise make
    the count 1, and every run a single call's wake-up latency."""
    fn()
    n = 1
    if QUICK:
        min_time = 0.002
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        if dt >= min_time / 4:
            break
        n *= 2
    return max(1, int(n * min_time / max(dt, 1e-9)))


def _rate(fn: Callable[[], object], loops: int) -> float:
    t0 = time.perf_counter()
    for _ in range(loops):
        fn()
    return loops / (time.perf_counter() - t0)


def ops_per_sec(fn: Callable[[], object], *, min_time: float = 0.2, repeats: int = 5) -> float:
    """Best observed rate over ``repeats`` runs of at least ``min_time`` seconds each."""
    loops = _calibrate(fn, min_time)
    return max(_rate(fn, loops) for _ in range(1 if QUICK else repeats))


def paired_ops_per_sec(
    base: Callable[[], object],
    fn: Callable[[], object],
    *,
    min_time: float = 0.2,
    repeats: int = 7,
) -> tuple[float, float]:
    """Best rates of ``base`` and ``fn``, their runs taken in turns (base, fn, base, ...):
    a slow stretch of the machine hits both sides, not only the one measured then."""
    best_base, best_fn = rotated_ops_per_sec(base, fn, min_time=min_time, repeats=repeats)
    return best_base, best_fn


def rotated_ops_per_sec(
    *fns: Callable[[], object], min_time: float = 0.2, repeats: int = 7
) -> tuple[float, ...]:
    """Best rate of each of ``fns``, their runs taken in turns (a baseline, qtee's code and
    its floor prototype measured through the same stretches of the machine)."""
    loops = [_calibrate(fn, min_time) for fn in fns]
    best = [0.0] * len(fns)
    for _ in range(1 if QUICK else repeats):
        for i, fn in enumerate(fns):
            best[i] = max(best[i], _rate(fn, loops[i]))
    return tuple(best)


def alternated_ops_per_sec(
    fn: Callable[[], object],
    enter: Callable[[], object],
    leave: Callable[[], object],
    *,
    min_time: float = 0.2,
    repeats: int = 7,
) -> tuple[float, float]:
    """Best rates of ``fn`` without and with a state that ``enter`` sets up and ``leave``
    takes down, the runs alternated (without, enter, with, leave, without, ...): for a
    state that cannot exist beside its absence (connections open on one server).  Each
    change gets ``settle`` seconds (threads started or ended by it finish first)."""
    loops = _calibrate(fn, min_time)
    settle = 0.0 if QUICK else 0.05
    best_without = best_with = 0.0
    for _ in range(1 if QUICK else repeats):
        best_without = max(best_without, _rate(fn, loops))
        enter()
        try:
            time.sleep(settle)
            best_with = max(best_with, _rate(fn, loops))
        finally:
            leave()
            time.sleep(settle)
    return best_without, best_with


def report(
    name: str,
    rate: float,
    baseline: float | None = None,
    target: float | None = None,
    *,
    floor: float | None = None,
) -> None:
    """One line: name, ops/s, the cost ratio against the baseline (time / baseline time),
    the floor prototype's ratio to the same baseline (``floor``), and the target with
    ok/MISSED."""
    line = f"{name:<48} {rate:>12,.0f} ops/s"
    if baseline:
        ratio = baseline / rate
        line += f"   {ratio:5.2f}x baseline"
        if floor is not None:
            line += f"  floor {floor:5.2f}x"
        if target is not None:
            line += f"  (target <= {target}x: {'ok' if ratio <= target else 'MISSED'})"
    print(line)
