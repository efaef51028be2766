"""Two guests and the host run the invoke-loop scenario suite at the same time.

Every test function of tests/remote/test_scenarios.py runs, unchanged, on three devices at once:
the host's ``Device`` on the monitor, and the own driver models of two QTEE guests behind
the VMM-side mediator, each in its own thread with its own client and client env (what
the plugin's fixtures would give it).  All green, every table empty afterwards: the host
device, both guests' devices, the monitor's partitions and the VMM (issue 7 acceptance;
optee.md §6; qtee-kernel.md §4).  ``qtee vm`` is checked at the end.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from typing import Any

import pytest

import qtee
from qtee.__main__ import main
from qtee.secure import SecureMonitor
from qtee.vm import Vmm
from tests.remote import test_scenarios as suite

SCENARIOS: list[tuple[str, Callable[..., None]]] = [
    (name, fn)
    for name, fn in inspect.getmembers(suite, inspect.isfunction)
    if name.startswith("test_")
]


def _run_suite(device: Any, failures: list[str], where: str) -> None:
    for name, fn in SCENARIOS:
        params = inspect.signature(fn).parameters
        client = qtee.Client(device, workers=2)
        try:
            env = client.client_env() if "qtee_env" in params else None
            kwargs = {"qtee_device": device, "qtee_client": client, "qtee_env": env}
            try:
                fn(**{k: kwargs[k] for k in params})
            except BaseException as exc:
                failures.append(f"{where}: {name}: {type(exc).__name__}: {exc}")
            finally:
                if env is not None:
                    env.release()
        finally:
            client.close()


@pytest.mark.qtee_ta("scenario", suite.ScenarioTA)
@pytest.mark.qtee_ta("scenario.peer", suite.ScenarioTA)
def test_host_and_two_guests_run_the_scenario_suite_at_once() -> None:
    monitor = SecureMonitor(guest_limit=2)
    host = qtee.Device(monitor.host)
    failures: list[str] = []
    with Vmm(monitor) as vmm:
        guests = [vmm.create_vm(f"vm{i}", tee="qtee") for i in (1, 2)]
        devices = {"host": host, "vm1": guests[0].device, "vm2": guests[1].device}
        assert len({id(d) for d in devices.values()}) == 3
        threads = [
            threading.Thread(target=_run_suite, args=(dev, failures, where), name=where)
            for where, dev in devices.items()
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not any(t.is_alive() for t in threads), "a suite did not finish"
        assert failures == []
        assert suite.ScenarioTA.kept == {}
        for guest in guests:
            assert guest.device.leaks() == {}
            vmm.destroy_vm(guest)
        assert all(r.state == "destroyed" for r in vmm.rows())
        assert sum(r.calls_ok for r in vmm.rows()) > 0
    assert host.leaks() == {}
    assert monitor.leaks() == {}
    assert vmm.leaks() == {}
    assert len(SCENARIOS) >= 8  # the whole suite ran, not a part of it


def test_qtee_vm_destroys_one_guest_mid_call_and_prints_the_table(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``qtee vm``: a third QTEE guest is refused at the limit, vm1 is destroyed from inside
    one of its callbacks and its call fails DEFUNCT (-90) within a second, the host, vm2 and
    an OP-TEE guest (GP sessions) stay green, a ``none`` guest has no TEE, and every table
    ends empty (optee.md §6.1, §6.2)."""
    argv = ["vm", "--tee", "qtee,qtee,qtee,none,optee", "--iterations", "40", "--destroy", "vm1"]
    rc = main(argv)
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = out.splitlines()
    assert lines[0].split() == [
        "vm", "client", "tee", "state", "ok", "failed", "callbacks", "pins", "now/peak", "rounds",
    ]  # fmt: skip
    rows = {line.split()[0]: line.split() for line in lines[1:7]}
    assert rows["host"][1:4] == ["0", "qtee", "running"] and rows["host"][-1] == "40"
    assert rows["vm1"][2:4] == ["qtee", "destroyed"] and rows["vm1"][5] == "1"
    assert rows["vm2"][2:4] == ["qtee", "running"] and rows["vm2"][-1] == "40"
    assert rows["vm3"][1:4] == ["-", "qtee", "refused"]
    assert rows["vm4"][2:4] == ["none", "running"]
    assert rows["vm5"][2:4] == ["optee", "running"] and rows["vm5"][-1] == "40"
    assert "[ok] vm5: 40 rounds, all correct" in out  # GP sessions in the OP-TEE guest
    assert "vm3 (qtee) was refused at creation:" in out and "guest limit 2 reached" in out
    assert "[ok] vm1: destroyed mid-call, its call failed (result -90)" in out
    assert "[ok] every table empty (monitor, host device, VMM)" in out
    assert "[FAILED]" not in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tee", "qtee,cloud"], "--tee: cloud: not a TEE (none, qtee or optee)"),
        (["--tee", "foo"], "qtee vm: --tee: foo: not a TEE (none, qtee or optee)"),
        (["--tee", "qtee,,none"], "one TEE per guest, comma-separated (none, qtee or optee)"),
        (["--destroy", "vm9"], "--destroy vm9: no such VM (they are vm1, vm2, vm3)"),
        (["--iterations", "0"], "--iterations >= 1"),
        (["--tee", "optee", "--destroy", "vm1"], "--destroy vm1: only a QTEE guest"),
    ],
)
def test_qtee_vm_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["vm", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
