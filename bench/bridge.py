"""A null invoke from C through the preload bridge vs the same invoke from Python.

The C side (bench/c/bridge_bench.c, compiled here with the system C compiler) opens
/dev/tee0 in a program run with ``qtee.bridge.environment``, loads the TA with the raw
uAPI and times rounds of OBJECT_INVOKE of op 0 with no params; the Python side times
``ObjRef.invoke(0)`` of the same TA on an in-process Device.  Runs taken in turns (C,
Python, C, ...), best of each; target: C <= 1.5x Python.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
import supplicant  # noqa: F401 - the package is cached before bench/ can shadow it

sys.path.append(str(_HERE))

from _bridge_tas import NAME
from _timing import ops_per_sec, pin_to_one_cpu, report

import qtee
from qtee import OUT_OBJECT
from qtee.bridge import LIBRARY, BridgeConfig, environment

ROUNDS = 5
TURNS = 3


def build_c() -> Path:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise SystemExit("bench/bridge.py: no C compiler")
    out = _HERE.parent / "build" / "bench" / "bridge_bench"
    src = _HERE / "c" / "bridge_bench.c"
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([cc, "-O2", "-Wall", "-o", str(out), str(src)], check=True)
    return out


def c_rate(program: Path, image: Path, n: int) -> float:
    env = environment(BridgeConfig(ta_modules=("_bridge_tas",)), search_first=str(_HERE))
    run = subprocess.run(
        [str(program), str(image), str(n), str(ROUNDS)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(run.stdout.split()[1])


def python_rate() -> float:
    device = qtee.Device(qtee.SecureWorld(qtee.QteeRoot()))
    with (
        qtee.Client(device, workers=1) as client,
        client.client_env() as env,
        client.open_service(env, 3) as loader,
    ):
        (ctrl,) = loader.invoke(0, qtee.ta_image(NAME), OUT_OBJECT)
        (app,) = ctrl.invoke(2, OUT_OBJECT)
        rate = ops_per_sec(lambda: app.invoke(0), repeats=ROUNDS)
        app.release()
        ctrl.release()
    return rate


def main() -> None:
    print(pin_to_one_cpu())
    if not LIBRARY.is_file():
        print("bridge: not built (make bridge): skipped")
        return
    program = build_c()
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "null.img"
        image.write_bytes(qtee.ta_image(NAME))
        best_c = best_py = 0.0
        for _ in range(TURNS):
            best_c = max(best_c, c_rate(program, image, 20000))
            best_py = max(best_py, python_rate())
    report("null invoke from Python (ObjRef.invoke)", best_py)
    report("null invoke from C through the bridge", best_c, best_py, 1.5)


if __name__ == "__main__":
    main()
