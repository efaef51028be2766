"""``qtee vm``: guests with their own TEE settings, the invoke loop in each, per-VM tables.

One :class:`~qtee.secure.SecureMonitor` (QTEE, with OP-TEE's entry beside it), a host
:class:`~qtee.Device` on it, and a :class:`~qtee.vm.Vmm` whose guests are created from
``--tee`` (``vm1``, ``vm2``, ... in order; a refusal at the guest limit is a row, not a
failure).  The host and every guest with QTEE run the invoke-loop scenario at the same
time, each in its own thread (an OP-TEE guest runs GP sessions: open, invoke, close);
``--destroy NAME`` destroys that VM from inside one of its
callbacks, halfway through its loop, and the time its pending call took to fail is shown.
Exit 0 when every check held: the host and the surviving guests green, the destroyed
VM's call failed within a second, and every table empty at the end.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from typing import Any

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``vm`` verb's options."""
    parser.add_argument(
        "--tee",
        default="qtee,qtee,none",
        metavar="LIST",
        help="one TEE per guest, comma-separated: none, qtee or optee (default qtee,qtee,none)",
    )
    parser.add_argument(
        "--guest-limit",
        type=int,
        default=2,
        metavar="N",
        help="guests the TEE accepts (default 2; a VM beyond it is refused at creation)",
    )
    parser.add_argument(
        "--iterations", type=int, default=200, metavar="N", help="rounds per loop (default 200)"
    )
    parser.add_argument(
        "--destroy", metavar="NAME", help="destroy this VM (e.g. vm1) mid-call, halfway through"
    )
    parser.add_argument("--no-host", action="store_true", help="do not run the loop in the host")


def _fail(parser_error: str) -> int:
    print(f"qtee vm: {parser_error}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Build, run, destroy, print; 0 when every check held (see the module docstring).
    ^C: the rounds in flight end, the VMs are destroyed, one line says so, status 130."""
    try:
        return _run(args)
    except KeyboardInterrupt:  # before or after the loops (during them, _run handles it)
        print("qtee vm: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    import qtee
    from qtee._qcomtee_msg import Result
    from qtee.secure._monitor import SecureMonitor
    from qtee.secure._optee_entry import OpteeEntry
    from qtee.vm import (
        VmError,
        Vmm,
        _optee_backend,  # noqa: F401  (registers the optee backend)
    )
    from qtee.vm._scenario import ScenarioStats, run_gp_loop, run_invoke_loop

    kinds = [k.strip() for k in args.tee.split(",")] if args.tee else []
    bad = [k for k in kinds if k not in ("none", "qtee", "optee")]
    if not kinds or "" in kinds:
        return _fail(
            f"--tee {args.tee!r}: one TEE per guest, comma-separated (none, qtee or optee)"
        )
    if bad:
        return _fail(f"--tee: {', '.join(bad)}: not a TEE (none, qtee or optee)")
    if args.guest_limit < 0 or args.iterations < 1:
        return _fail("--guest-limit must be >= 0 and --iterations >= 1")
    names = [f"vm{i + 1}" for i in range(len(kinds))]
    if args.destroy is not None and args.destroy not in names:
        return _fail(f"--destroy {args.destroy}: no such VM (they are {', '.join(names)})")
    if args.destroy is not None and kinds[names.index(args.destroy)] != "qtee":
        return _fail(f"--destroy {args.destroy}: only a QTEE guest (it is destroyed mid-callback)")

    if not logging.getLogger().handlers:  # a destroyed VM's workers say why they stop
        logging.basicConfig(format="%(name)s: %(message)s", level=logging.WARNING)
    monitor = SecureMonitor(guest_limit=args.guest_limit)
    OpteeEntry(monitor, guest_limit=args.guest_limit)
    host = qtee.Device(monitor.host)
    checks: list[tuple[str, bool]] = []
    interrupted = False
    refused: list[tuple[str, str, str]] = []
    results: dict[str, ScenarioStats] = {}
    destroy_report: list[Any] = []
    destroy_error: list[BaseException] = []
    with Vmm(monitor) as vmm:
        guests = {}
        for name, kind in zip(names, kinds, strict=True):
            try:
                guests[name] = vmm.create_vm(name, tee=kind)
            except VmError as exc:
                refused.append((name, kind, str(exc)))
        runs: dict[str, Any] = {}
        if not args.no_host:
            runs["host"] = host
        gp = set()
        for name, guest in guests.items():
            if guest.tee in ("qtee", "optee"):
                runs[name] = guest.device
            if guest.tee == "optee":
                gp.add(name)
        victim = guests.get(args.destroy) if args.destroy else None
        if victim is not None and victim.tee != "qtee":
            print(
                f"qtee vm: --destroy {args.destroy}: only a QTEE guest, mid-callback",
                file=sys.stderr,
            )
            return 2
        fired = threading.Event()

        def destroy_in_callback(n: int) -> None:
            if victim is None or fired.is_set() or n < args.iterations // 2:
                return
            fired.set()

            def kill() -> None:
                try:
                    destroy_report.append(vmm.destroy_vm(victim))
                except BaseException as exc:
                    destroy_error.append(exc)

            killer = threading.Thread(target=kill, name="qtee-vm-destroy")
            killer.start()
            killer.join(5)  # this callback is the call in flight the destroy must fail

        threads = []
        stop = threading.Event()  # set by ^C: every loop ends after its round
        for name, device in runs.items():
            hook = destroy_in_callback if victim is not None and name == args.destroy else None

            def loop(name: str = name, device: Any = device, hook: Any = hook) -> None:
                if name in gp:  # an OP-TEE guest: GP sessions instead of QTEE objects
                    results[name] = run_gp_loop(device, args.iterations, stop=stop)
                else:
                    results[name] = run_invoke_loop(
                        device, args.iterations, stop=stop, in_callback=hook
                    )

            threads.append(threading.Thread(target=loop, name=f"qtee-vm-{name}"))
        t0 = time.monotonic()
        for t in threads:
            t.start()
        try:
            for t in threads:
                t.join(600)
        except KeyboardInterrupt:  # ^C: the rounds in flight finish, the VMs are destroyed
            stop.set()
            for t in threads:
                t.join(60)
            print("qtee vm: interrupted", file=sys.stderr)
            interrupted = True
        elapsed = time.monotonic() - t0
        for name, stats in results.items():
            if name == args.destroy:
                ended = stats.ended_by or ""
                defunct = f"result {int(Result.ERROR_DEFUNCT)}"
                checks.append(
                    (f"{name}: destroyed mid-call, its call failed ({ended or 'nothing'})",
                     ended in (defunct, "errno 19", "errno 9")),
                )  # fmt: skip
            else:
                checks.append((f"{name}: {stats.rounds} rounds, all correct", stats.ok))
        if victim is not None:
            ok = bool(destroy_report) and destroy_report[0].seconds < 1.0
            secs = f"{destroy_report[0].seconds * 1000:.0f} ms" if destroy_report else "failed"
            checks.append((f"{args.destroy}: destroyed, pending calls failed in {secs}", ok))
            if destroy_error:
                print(f"qtee vm: destroy failed: {destroy_error[0]}", file=sys.stderr)
        rows = vmm.rows()
        _print_table(rows, refused, results, elapsed)
    # every VM left is destroyed by the Vmm's close
    leaks = {**monitor.leaks(), **host.leaks(), **vmm.leaks()}
    checks.append(("every table empty (monitor, host device, VMM)", not leaks))
    for name, ok in checks:
        print(f"[{'ok' if ok else 'FAILED'}] {name}")
    if leaks:
        print(f"left: {leaks}")
    if interrupted:
        return 130
    return 0 if all(ok for _, ok in checks) else 1


def _print_table(
    rows: list[Any], refused: list[tuple[str, str, str]], results: dict[str, Any], elapsed: float
) -> None:
    head = ("vm", "client", "tee", "state", "ok", "failed", "callbacks", "pins now/peak", "rounds")
    lines = [head]
    host = results.get("host")
    if host is not None:
        lines.append(("host", "0", "qtee", "running", "-", "-", "-", "-", str(host.rounds)))
    for r in rows:
        stats = results.get(r.name)
        lines.append(
            (
                r.name,
                str(r.client_id),
                r.tee,
                r.state,
                str(r.calls_ok),
                str(r.calls_failed),
                str(r.callbacks),
                f"{r.pinned_now}/{r.pinned_peak}",
                str(stats.rounds) if stats is not None else "-",
            )
        )
    for name, kind, _ in refused:
        lines.append((name, "-", kind, "refused", "-", "-", "-", "-", "-"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    for name, kind, why in refused:
        print(f"{name} ({kind}) was refused at creation: {why}")
    print(f"loops ran {elapsed:.2f} s")
