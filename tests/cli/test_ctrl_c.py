"""Ctrl-C of a client while a callback runs (issue 15, "CLI and plugin hygiene").

``tests/_sigint_client.py`` invokes a TA that calls back into a callback object whose
handler sleeps for a minute.  SIGINT while the handler runs must end the program within
a couple of seconds, the way any Python program ends on Ctrl-C: KeyboardInterrupt's
traceback, and death by SIGINT (status 130 in a shell).  The main thread is then
waiting for the callback's answer (in process: the request's completion; against a
server: the reply frame), and the client's close must not wait for the handler.

What the kernel does with the interrupted wait (qtee-kernel.md §4.2: "client killed
while waiting": a request being processed becomes a placeholder whose id stays reserved
until the supplicant's SEND for it, which gets EINVAL) is checked in process as well.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from objects import DriverError
from qtee import Context, Device, uapi
from qtee.addrspace import CheckedMemory
from qtee.secure import SecureWorld
from tests import _sigint_client
from tests._helpers import (
    META_OUT,
    OBJ_IN,
    OBJ_OUT,
    RELEASE,
    UB_OUT,
    USER,
    raw_invoke,
    recv,
    release,
    send,
    wait_until,
)

T = TypeVar("T")
CLIENT = Path(_sigint_client.__file__)
#: "within a couple of seconds" from SIGINT to the process gone
PROMPT = 3.0


def _interrupt_while_the_callback_sleeps(*argv: str) -> tuple[int, str, float]:
    """Run the client, SIGINT it once its handler sleeps: (status, stderr, seconds)."""
    proc = subprocess.Popen(
        [sys.executable, str(CLIENT), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "sleeping\n"
        time.sleep(0.1)  # the main thread is back in its wait
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=30)
        return proc.returncode, err, time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _assert_ended_by_keyboard_interrupt(status: int, err: str, seconds: float) -> None:
    assert status == -signal.SIGINT, err
    assert err.rstrip().splitlines()[-1] == "KeyboardInterrupt", err
    assert "During handling of the above exception" not in err, err
    assert "Exception ignored" not in err, err
    assert seconds < PROMPT, f"{seconds:.1f} s from SIGINT to exit"


def test_ctrl_c_in_process_while_a_callback_runs() -> None:
    """issue 15: the in-process device."""
    _assert_ended_by_keyboard_interrupt(*_interrupt_while_the_callback_sleeps())


@pytest.fixture
def served() -> Iterator[str]:
    """``qtee serve`` with the client's TA (``--ta-module`` the client's own file)."""
    sockdir = tempfile.mkdtemp(prefix="qtee-")
    path = os.path.join(sockdir, "s")
    server = subprocess.Popen(
        [sys.executable, "-m", "qtee", "serve", "--socket", path, "--ta-module", str(CLIENT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline() == f"serving on {path}\n"
        yield path
    finally:
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=30)
        shutil.rmtree(sockdir, ignore_errors=True)
    assert server.returncode == 0, err
    assert out.splitlines()[-1] == "tables: empty"  # the dead client's fd was torn down


def test_ctrl_c_against_a_server_while_a_callback_runs(served: str) -> None:
    """issue 15: against ``qtee serve`` (``qtee.connect``); the server then closes the
    client's fd and ends with its tables empty."""
    _assert_ended_by_keyboard_interrupt(*_interrupt_while_the_callback_sleeps(served))


# ------------------------------------------------------------------ the interrupted wait


class Interrupted(BaseException):
    """Stands for KeyboardInterrupt in the test process (pytest keeps its own)."""


@pytest.fixture
def env() -> Iterator[tuple[Device, Context, CheckedMemory]]:
    """A device whose root opens test_driver_callbacks' Caller (op 0: calls back op 5 of
    the object it is given, with ``b"hi"`` and an 8-byte output)."""
    from tests.qcomtee.test_driver_callbacks import Root

    mem = CheckedMemory()
    dev = Device(SecureWorld(Root()), memory=mem)
    ctx = dev.open()
    try:
        yield dev, ctx, mem
    finally:
        ctx.close()
    assert dev.leaks() == {}


def _interrupt_main_thread_after(step: Callable[[], T]) -> Callable[[], list[T]]:
    """Run ``step`` in a thread, then interrupt the main thread once with Interrupted
    (SIGUSR1 sent to it, as SIGINT reaches a Python program's main thread, until its
    handler has run: a signal that lands just before the thread blocks in a lock is only
    seen at the next one); returns a getter of what ``step`` gave."""
    main = threading.main_thread().ident
    assert main is not None
    got: list[T] = []
    fired: list[bool] = []

    def handler(_sig: int, _frame: object) -> None:
        if not fired:
            fired.append(True)
            raise Interrupted

    def run() -> None:
        got.append(step())
        while not fired:
            signal.pthread_kill(main, signal.SIGUSR1)
            time.sleep(0.05)

    previous = signal.signal(signal.SIGUSR1, handler)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def result() -> list[T]:
        thread.join(5)
        signal.signal(signal.SIGUSR1, previous)
        return got

    return result


def _callback_invoke(ctx: Context, mem: CheckedMemory, out: bytearray) -> None:
    raw_invoke(ctx, mem, uapi.TEE_OBJREF_NULL, 0, [uapi.Param(OBJ_OUT)])  # Caller, id 0
    raw_invoke(ctx, mem, 0, 0, [uapi.Param(OBJ_IN, 77, USER), uapi.Param(UB_OUT, mem.map(out), 8)])


def test_an_interrupted_wait_leaves_a_placeholder_until_the_send(
    env: tuple[Device, Context, CheckedMemory],
) -> None:
    """qtee-kernel.md §4.2, "client killed while waiting", request PROCESSING: the
    exception reaches the caller once QTEE has ended the call (the callback DEFUNCT), the
    callback object's release comes in that call's async tail, the request id stays
    taken, and the supplicant's SEND for it is EINVAL and frees it; every table ends
    empty."""
    _dev, ctx, mem = env
    taken = _interrupt_main_thread_after(lambda: recv(ctx, mem))
    with pytest.raises(Interrupted):
        _callback_invoke(ctx, mem, bytearray(8))
    ((_head, params, _scratch),) = taken()
    req_id = params[0].b
    head, note, _ = recv(ctx, mem)
    assert (head.func, note[0].a) == (RELEASE, 77)
    assert note[0].b != req_id  # the placeholder's id was not handed out again
    assert len(ctx.requests) == 1  # the placeholder keeps its id
    with pytest.raises(DriverError) as exc:
        send(ctx, mem, 0, [uapi.Param(META_OUT, req_id), params[1], params[2]])
    assert exc.value.errno == errno.EINVAL
    assert len(ctx.requests) == 0
    with pytest.raises(DriverError) as exc:  # and the id is gone for good
        send(ctx, mem, 0, [uapi.Param(META_OUT, req_id)])
    assert exc.value.errno == errno.EINVAL
    release(ctx, mem, 0)


def test_an_interrupted_wait_drops_a_queued_request(
    env: tuple[Device, Context, CheckedMemory],
) -> None:
    """qtee-kernel.md §4.2, "client killed while waiting", request still QUEUED: it is
    removed, so no RECV ever sees it; the next one gets the release notification of the
    callback object, which QTEE dropped when it ended the call."""
    _dev, ctx, mem = env
    queued = _interrupt_main_thread_after(lambda: wait_until(lambda: len(ctx.requests.fifo) == 1))
    with pytest.raises(Interrupted):
        _callback_invoke(ctx, mem, bytearray(8))
    assert queued() == [True]
    head, params, _ = recv(ctx, mem)
    assert (head.func, params[0].a, params[0].b) == (RELEASE, 77, 0)
    assert len(ctx.requests) == 0 and not ctx.requests.fifo
    release(ctx, mem, 0)
