"""Run the benches with targets N times and print each figure's spread (``make bench-spread``).

A ratio from one run of a shared machine is one draw; the README states each targeted
figure as the median of five runs with its lowest and highest.  Each run is a fresh
process (``bench/invoke.py``, ``bench/ipc.py``), so nothing warms up across runs.  Reads
the lines ``_timing.report`` prints: ``name  ops/s  R x baseline  floor F x  (target ...)``.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ("invoke.py", "ipc.py")
_LINE = re.compile(
    r"^(?P<name>.+?)\s+(?P<rate>[\d,]+) ops/s\s+(?P<ratio>[\d.]+)x baseline"
    r"(?:\s+floor\s+(?P<floor>[\d.]+)x)?(?:\s+\(target <= (?P<target>[\d.]+)x)?"
)


Figure = tuple[float, float | None, float | None, float]


def parse(text: str) -> dict[str, Figure]:
    """name -> (ratio, floor, target, ops/s) for each report line with a baseline."""
    out: dict[str, Figure] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m is None:
            continue
        floor = float(m["floor"]) if m["floor"] else None
        target = float(m["target"]) if m["target"] else None
        rate = float(m["rate"].replace(",", ""))
        out[m["name"].strip()] = (float(m["ratio"]), floor, target, rate)
    return out


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):5.2f}x ({min(values):.2f}-{max(values):.2f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each bench (default 5)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, not {args.runs}")
    if os.environ.get("QTEE_BENCH_QUICK") == "1":
        print("QTEE_BENCH_QUICK is set: tiny runs, the figures mean nothing")
    seen: dict[str, list[Figure]] = {}
    for bench in BENCHES:
        for run in range(1, args.runs + 1):
            print(f"== {bench} run {run}/{args.runs}", file=sys.stderr, flush=True)
            done = subprocess.run(
                [sys.executable, str(HERE / bench)], capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                sys.stderr.write(done.stdout + done.stderr)
                return done.returncode
            for name, figure in parse(done.stdout).items():
                seen.setdefault(name, []).append(figure)
    print(f"{'figure':<48} median ops/s and ratio (min-max) of {args.runs} runs")
    for name, figures in seen.items():
        ratios = [f[0] for f in figures]
        rate = statistics.median(f[3] for f in figures)
        line = f"{name:<48} {rate:>9,.0f} ops/s  {_spread(ratios)}"
        floors = [f[1] for f in figures if f[1] is not None]
        if floors:
            line += f"   floor {_spread(floors)}"
        target = figures[0][2]
        if target is not None:
            status = "ok" if statistics.median(ratios) <= target else "MISSED"
            met = sum(r <= target for r in ratios)
            line += f"   target <= {target}x: {status} ({met}/{len(ratios)} runs)"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
