"""An acknowledged RPMB write survives kill -9 of tee-supplicant (issue 16 point 5).

The OP-TEE device is served (``qtee serve --tee optee``'s :class:`qtee.DeviceServer`, in
this process, with the TA); ``qtee supplicant --tee optee --connect PATH --rpmb-file F``
runs in its own process.  The TA's ``TEE_STORAGE_PRIVATE_RPMB`` write returns, the
supplicant is killed with SIGKILL, a new one starts on the same file, and the TA reads
the data back (``OP-TEE/optee_client:tee-supplicant/src/rpmb.c@44289ee`` keeps the
emulated partition only in memory; ``--rpmb-file`` is the model's durable variant).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import qtee
from qtee import (
    TEE_DATA_FLAG_ACCESS_READ,
    TEE_DATA_FLAG_ACCESS_WRITE,
    TEE_DATA_FLAG_OVERWRITE,
    TEE_STORAGE_PRIVATE_RPMB,
    DeviceServer,
    trusted_storage,
)
from qtee.gp import (
    TeecContext,
    TeecOperation,
    TeecParamType,
    TeecTempMemoryReference,
    param_types,
)
from qtee.secure import GpParam, GpSession, GpTA, GpTaError, register_gp_ta, unregister_gp_ta
from supplicant import EmulatedRpmb
from tests._helpers import eventually
from tests._paths import REPO

T = TeecParamType
WRITE, READ = 0, 1
RPMB = TEE_STORAGE_PRIVATE_RPMB
RW = TEE_DATA_FLAG_ACCESS_READ | TEE_DATA_FLAG_ACCESS_WRITE


class KeepTA(GpTA):
    """WRITE: memref[0] id, memref[1] data → an RPMB object; READ: memref[1] ← its data."""

    UUID = uuid.UUID("5e17e5e0-0000-4000-8000-0000000000c1")

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
        oid = bytes(params[0].buffer or b"")
        store = trusted_storage(self)
        if cmd == WRITE:
            data = bytes(params[1].buffer or b"")
            store.create(oid, RW | TEE_DATA_FLAG_OVERWRITE, data, RPMB).close()
        elif cmd == READ:
            handle = store.open(oid, TEE_DATA_FLAG_ACCESS_READ, RPMB)
            try:
                back = handle.read(params[1].size)
            finally:
                handle.close()
            assert params[1].buffer is not None
            params[1].buffer[: len(back)] = back
            params[1].size = len(back)
        else:
            raise GpTaError(0xFFFF000A)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[DeviceServer]:
    register_gp_ta(KeepTA)
    srv = DeviceServer(tmp_path / "s", tee="optee").start()
    try:
        yield srv
    finally:
        srv.stop()
        unregister_gp_ta(KeepTA.UUID)
    assert srv.device.leaks() == {}


def _supplicant(server: DeviceServer, rpmb: Path, store: Path) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "qtee", "supplicant", "--tee", "optee"]
    argv += ["--connect", str(server.path), "--rpmb-file", str(rpmb), "--storage", str(store)]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line == "tee-supplicant attached\n", (line, proc.poll())
    return proc


def _call(ctx: TeecContext, cmd: int, oid: bytes, buf: bytearray) -> bytes:
    op = TeecOperation(
        param_types(T.TEEC_MEMREF_TEMP_INPUT, T.TEEC_MEMREF_TEMP_INOUT, 0, 0),
        [TeecTempMemoryReference(bytearray(oid)), TeecTempMemoryReference(buf)],
    )
    with ctx.open_session(KeepTA.UUID) as session:
        session.invoke_command(cmd, op)
    return bytes(buf[: op.params[1].size])  # type: ignore[union-attr]


def test_acknowledged_write_survives_kill_9_of_the_supplicant(
    server: DeviceServer, tmp_path: Path
) -> None:
    """Issue 16 point 5: every accepted frame is on disk before its answer, so after
    SIGKILL a new supplicant on the same ``--rpmb-file`` serves the same partition (key,
    counter, blocks): the secure side's counter check passes and the data reads back."""
    rpmb, store = tmp_path / "rpmb.bin", tmp_path / "store"
    data = bytes(range(256)) * 3 + b"end"
    first = _supplicant(server, rpmb, store)
    try:
        with TeecContext(qtee.connect(server.path)) as ctx:
            _call(ctx, WRITE, b"kept", bytearray(data))  # acknowledged
            os.kill(first.pid, signal.SIGKILL)
            assert first.wait(10) == -signal.SIGKILL
            assert eventually(lambda: server.connections == 1, timeout=10)  # only the client's
            second = _supplicant(server, rpmb, store)
            try:
                assert _call(ctx, READ, b"kept", bytearray(1000)) == data
            finally:
                second.terminate()
                assert second.wait(10) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)
    dev = EmulatedRpmb(rpmb)  # the file is the device's state: programmed, counted
    assert dev.key_programmed and dev.write_counter > 0
    dev.close()


def test_cli_options_are_checked(tmp_path: Path) -> None:
    """``--plugin`` is tee-supplicant's (``--tee optee``), which needs ``--connect``; a
    ``--rpmb-file`` that is not an RPMB state file is named, for either flavour (exit 2)."""
    base = [sys.executable, "-m", "qtee", "supplicant"]
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a partition")
    for extra, says in [
        (["--plugin", "x=y:z"], "add --tee optee"),
        (["--rpmb-file", str(junk)], "not an RPMB state file"),
        (["--tee", "optee"], "give --connect"),
        (
            [
                "--tee",
                "optee",
                "--connect",
                str(tmp_path / "s"),
                "--plugin",
                f"{uuid.UUID(int=7)}=nomod_q:f",
            ],
            "nomod_q: no such module",
        ),
        (
            ["--tee", "optee", "--connect", str(tmp_path / "s"), "--rpmb-file", str(junk)],
            "not an RPMB state file",
        ),
    ]:
        out = subprocess.run(
            [*base, *extra], cwd=REPO, capture_output=True, text=True, check=False, timeout=60
        )
        assert out.returncode == 2 and says in out.stderr, out


def test_a_qtee_supplicant_on_an_optee_server_says_add_tee_optee(server: DeviceServer) -> None:
    """The QTEE supplicant needs a QTEE device (its listeners are QTEE objects); given an
    OP-TEE server (impl id 1 in the welcome) it says which option was forgotten, exit 2,
    and leaves no connection behind."""
    out = subprocess.run(
        [sys.executable, "-m", "qtee", "supplicant", "--connect", server.path],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert out.returncode == 2, out
    assert out.stderr == (
        f"qtee supplicant: the server at {server.path} serves an OP-TEE device: add --tee optee\n"
    )
    assert eventually(lambda: server.connections == 0, timeout=10)
