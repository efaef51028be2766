"""Shared timing helper for the benchmarks: best-of-N ops/s of a callable."""

from __future__ import annotations

import os
import time
from collections.abc import Callable


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
    """Loops of ``fn`` that take about ``min_time`` seconds."""
    n = 1
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
    return max(_rate(fn, loops) for _ in range(repeats))


def paired_ops_per_sec(
    base: Callable[[], object],
    fn: Callable[[], object],
    *,
    min_time: float = 0.2,
    repeats: int = 7,
) -> tuple[float, float]:
    """Best rates of ``base`` and ``fn``, their runs taken in turns (base, fn, base, ...):
    a slow stretch of the machine hits both sides, not only the one measured then."""
    loops_base = _calibrate(base, min_time)
    loops_fn = _calibrate(fn, min_time)
    best_base = best_fn = 0.0
    for _ in range(repeats):
        best_base = max(best_base, _rate(base, loops_base))
        best_fn = max(best_fn, _rate(fn, loops_fn))
    return best_base, best_fn


def report(
    name: str, rate: float, baseline: float | None = None, target: float | None = None
) -> None:
    """One line: name, ops/s, and the cost ratio against the baseline (time / baseline time)."""
    line = f"{name:<48} {rate:>12,.0f} ops/s"
    if baseline:
        ratio = baseline / rate
        line += f"   {ratio:5.2f}x baseline"
        if target is not None:
            line += f"  (target <= {target}x: {'ok' if ratio <= target else 'MISSED'})"
    print(line)
