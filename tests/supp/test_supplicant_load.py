"""Load: many TA threads hammering the supplicant's time and storage listeners
(quic-teec.md §5.4: one shared buffer per listener, BUSY -> wait -> retry; §2.4 threads).

16 client threads each invoke a TA op that makes several listener requests; a Supplicant
with 4 workers serves them for a bounded time.  Every answer is checked, nothing may
deadlock, and every table is empty after stop.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qtee import Device
from qtee.secure import SecureWorld, register_ta, unregister_ta
from supplicant import Supplicant
from supplicant import fs_msg as fsm
from supplicant import time_msg as tm
from tests.supp.test_listeners import PROBE, ProbeTA, TaClient, fs_call, time_call

THREADS = 16
WORKERS = 4
DURATION = float(os.environ.get("QTEE_LISTENER_LOAD_SECONDS", "3"))
#: How long the threads may take to finish after DURATION before it counts as a deadlock.
JOIN_GRACE = 5.0
O_CREAT = fsm.FsOpenFlag.O_CREAT
O_WRONLY = fsm.FsOpenFlag.O_WRONLY
O_TRUNC = fsm.FsOpenFlag.O_TRUNC
O_RDONLY = fsm.FsOpenFlag.O_RDONLY


@pytest.fixture
def dev(qtee_device: Device) -> Iterator[Device]:
    register_ta(PROBE, ProbeTA)
    try:
        yield qtee_device
    finally:
        unregister_ta(PROBE)


def _round(world: SecureWorld, k: int, i: int) -> int:
    """One TA op's worth of requests: three time commands, then write, read back and
    verify this thread's own file.  Returns the number of requests made."""
    lo = int(time.time()) - 1
    utc = time_call(world, tm.GetUtcSecRequest())
    assert isinstance(utc, tm.TimeSpecResponse), utc
    assert utc.cmd_id == tm.TimeCmd.GET_UTC_SEC and utc.ret == 0, utc
    assert lo <= utc.tv_sec <= int(time.time()) + 1 and 0 <= utc.tv_nsec < 10**9, utc
    systime = time_call(world, tm.GetSystimeRequest())
    assert isinstance(systime, tm.SystimeResponse) and systime.ret == 0, systime
    assert systime.time.tm_year >= 123, systime
    ms = time_call(world, tm.GetTimeMsRequest())
    assert isinstance(ms, tm.TimeMsResponse), ms
    assert lo * 1000 <= ms.ms <= (int(time.time()) + 1) * 1000, ms

    name = f"t{k:02d}.bin"
    data = struct.pack("<II", k, i) * (1 + (k * 31 + i) % 200)
    F = fsm.FsCmd
    fd = fs_call(world, fsm.OpenRequest(path=name, flags=O_CREAT | O_WRONLY | O_TRUNC))
    assert isinstance(fd, fsm.StatusResponse) and fd.ret > 0, fd
    wr = fs_call(world, fsm.WriteRequest(fd=fd.ret, data=data))
    assert wr == fsm.StatusResponse(cmd_id=F.FILE_WRITE, ret=len(data)), wr
    cl = fs_call(world, fsm.CloseRequest(fd=fd.ret))
    assert cl == fsm.StatusResponse(cmd_id=F.FILE_CLOSE, ret=0), cl
    fd = fs_call(world, fsm.OpenRequest(path=name, flags=O_RDONLY))
    assert isinstance(fd, fsm.StatusResponse) and fd.ret > 0, fd
    rd = fs_call(world, fsm.ReadRequest(fd=fd.ret, count=fsm.MAX_DATA_LEN))
    assert rd == fsm.ReadResponse(data=data, ret=len(data)), (k, i)
    cl = fs_call(world, fsm.CloseRequest(fd=fd.ret))
    assert cl == fsm.StatusResponse(cmd_id=F.FILE_CLOSE, ret=0), cl
    return 9


@pytest.mark.slow
@pytest.mark.timeout(10)
def test_16_ta_threads_hammer_time_and_storage_through_4_workers(
    dev: Device, tmp_path: Path
) -> None:
    """§5.4: every request gets its own correct answer under contention (the busy/wait
    rule serialises each listener's shared buffer); no deadlock; nothing leaks."""
    started = time.monotonic()
    sup = Supplicant(dev, storage=tmp_path, workers=WORKERS)
    ta = TaClient(dev)
    stop_at = time.monotonic() + DURATION
    errors: list[BaseException] = []
    rounds = [0] * THREADS
    requests = [0] * THREADS
    last: list[bytes] = [b""] * THREADS

    def worker(k: int) -> None:
        try:
            i = 0
            while time.monotonic() < stop_at:
                requests[k] += ta.run(lambda w, k=k, i=i: _round(w, k, i))
                last[k] = struct.pack("<II", k, i) * (1 + (k * 31 + i) % 200)
                rounds[k] += 1
                i += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(THREADS)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, stop_at + JOIN_GRACE - time.monotonic()))
        stuck = [t.name for t in threads if t.is_alive()]
        served = {lid: lo.served for lid, lo in sup.listeners.items()}
    finally:
        ta.close()
        sup.stop()
    # Deadlocks, leaks and unexpected exceptions fail outright (pytest.fail is not an
    # AssertionError, so the xfail below does not cover them); wrong answers assert.
    if stuck:
        pytest.fail(f"deadlock: {len(stuck)} TA threads still running after the grace time")
    if dev.world.listeners.ids() != [] or dev.leaks() != {}:
        pytest.fail(f"after stop: listeners {dev.world.listeners.ids()}, leaks {dev.leaks()}")
    unexpected = [e for e in errors if not isinstance(e, AssertionError)]
    if unexpected:
        pytest.fail(f"TA threads raised: {unexpected[:3]!r}")
    wrong = sorted({str(e).splitlines()[0] for e in errors})
    assert wrong == [], f"{len(errors)} of {THREADS} threads got a wrong answer: {wrong[:4]}"
    assert all(r > 0 for r in rounds), rounds  # every thread made progress
    assert served == {0xA: 6 * sum(rounds), 0xB: 3 * sum(rounds)}
    assert sum(requests) == 9 * sum(rounds)
    for k in range(THREADS):
        assert (tmp_path / f"t{k:02d}.bin").read_bytes() == last[k]
    assert sorted(os.listdir(tmp_path)) == [f"t{k:02d}.bin" for k in range(THREADS)]
    assert time.monotonic() - started < 10
