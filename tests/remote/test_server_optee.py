"""The OP-TEE device server: ``qtee serve --tee optee`` (issue 14 item 5; optee.md §2, §3.3).

A client fd and tee-supplicant's privileged fd of one OP-TEE device, each a connection of
its own, behave as the in-process ``OpteeContext``/``OpteeSuppContext`` do: the same
ioctls give the same errno and bytes (a table of bad inputs, run on both), allocated
shms are shared pages, registered shms cross as the windows their memrefs name, and
tee-supplicant in another connection (or process) serves LOAD_TA and trusted storage,
with its payloads allocated or registered.  Replies that the kernel could not have given
fail EPROTO.  The served device's tables are empty at the end (the plugin's leak check,
and ``tables: empty`` from the CLI).
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import qtee
from objects import DriverError, UsageError
from qtee import DeviceServer, OpteeDevice, gp_ta_image, uapi
from qtee._remote.frames import FrameDecoder, Hello, Ioctl, IoctlReply, Region, Welcome, encode
from qtee._remote.server_optee import ServedOpteeDevice
from qtee.addrspace import TASK_SIZE, CheckedMemory
from qtee.gp import (
    TeecContext,
    TeecError,
    TeecOperation,
    TeecOrigin,
    TeecParamType,
    TeecRegisteredMemoryReference,
    TeecResult,
    TeecTempMemoryReference,
    TeecValue,
    calc_client_uuid,
    param_types,
)
from qtee.secure import QteeRoot, SecureWorld
from supplicant import OpteeSupplicant
from tests import _optee_tas as tas
from tests._helpers import eventually
from tests._optee_peer import RegisteringSupplicant
from tests._paths import REPO, TESTS

T = TeecParamType
PEER = TESTS / "_optee_peer.py"
OPEN_HEAD = struct.Struct("<16s16s6I")
INVOKE_HEAD = struct.Struct("<6I")
HEAD = struct.Struct("<2I")
PARAM = struct.Struct("<4Q")
NONE, VALUE_IN, VALUE_OUT = 0, 1, 2
MEMREF_IN, MEMREF_OUT, MEMREF_INOUT = 5, 6, 7
META = uapi.TEE_IOCTL_PARAM_ATTR_META
META_INOUT = META | 3
OPTEE_GEN_CAPS = uapi.TEE_GEN_CAP_GP | uapi.TEE_GEN_CAP_REG_MEM | uapi.TEE_GEN_CAP_MEMREF_NULL
LOGIN_USER = 1


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture
def installed() -> Iterator[None]:
    tas.install()
    yield
    tas.uninstall()


@pytest.fixture
def server(tmp_path: Path, installed: None) -> Iterator[DeviceServer]:
    srv = DeviceServer(tmp_path / "s", tee="optee").start()
    try:
        yield srv
    finally:
        srv.stop()
    assert srv.device.leaks() == {}


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """A TA directory holding the loadable TA's image, and an empty storage directory."""
    ta_dir, store = tmp_path / "ta", tmp_path / "store"
    ta_dir.mkdir()
    store.mkdir()
    (ta_dir / f"{tas.LOADABLE_UUID}.ta").write_bytes(gp_ta_image(tas.LOADABLE_UUID))
    return ta_dir, store


# ----------------------------------------------------------------------------- raw calls
def _buf(mem: CheckedMemory, block: bytearray) -> bytearray:
    return bytearray(uapi.BufData(mem.map(block), len(block)).pack())


def open_block(ta: uuid.UUID, params: list[tuple[int, int, int, int]], login: int = 0) -> bytearray:
    block = bytearray(OPEN_HEAD.pack(ta.bytes, bytes(16), login, 0, 0, 0, 0, len(params)))
    return block + b"".join(PARAM.pack(*p) for p in params)


def invoke_block(session: int, cmd: int, params: list[tuple[int, int, int, int]]) -> bytearray:
    block = bytearray(INVOKE_HEAD.pack(cmd, session, 0, 0, 0, len(params)))
    return block + b"".join(PARAM.pack(*p) for p in params)


def open_session(ctx: Any, mem: CheckedMemory, ta: uuid.UUID = tas.SAMPLE_UUID) -> int:
    block = open_block(ta, [(0, 0, 0, 0)] * 4)
    ctx.ioctl(uapi.TEE_IOC_OPEN_SESSION, _buf(mem, block))
    session, ret = OPEN_HEAD.unpack_from(block)[4:6]
    assert ret == 0, hex(ret)
    return int(session)


def shm_alloc(ctx: Any, size: int) -> int:
    arg = bytearray(uapi.ShmAllocData(size).pack())
    ctx.ioctl(uapi.TEE_IOC_SHM_ALLOC, arg)
    return uapi.ShmAllocData.unpack(arg).id


def shm_register(ctx: Any, mem: CheckedMemory, buf: bytearray) -> tuple[int, int]:
    addr = mem.map(buf)
    arg = bytearray(uapi.ShmRegisterData(addr, len(buf)).pack())
    ctx.ioctl(uapi.TEE_IOC_SHM_REGISTER, arg)
    return uapi.ShmRegisterData.unpack(arg).id, addr


def recv_block(n: int = 5, first: int = META) -> bytearray:
    params = [(first, 0, 0, 0)] + [(0, 0, 0, 0)] * (n - 1)
    return bytearray(HEAD.pack(0, n) + b"".join(PARAM.pack(*p) for p in params))


def send_block(ret: int, params: list[tuple[int, int, int, int]]) -> bytearray:
    return bytearray(HEAD.pack(ret, len(params)) + b"".join(PARAM.pack(*p) for p in params))


# ----------------------------------------------------------------------------- basics
def test_welcome_version_and_nodes(server: DeviceServer) -> None:
    """impl id 1 in the welcome and from VERSION, on both nodes, byte for byte as in
    process; the privileged node is tee-supplicant's: one at a time (EBUSY), free again
    when its connection goes."""
    device = qtee.connect(server.path)
    local = OpteeDevice(SecureWorld(QteeRoot()))
    want = bytearray(12)
    lctx = local.open()
    lctx.ioctl(uapi.TEE_IOC_VERSION, want)
    assert uapi.VersionData.unpack(want) == uapi.VersionData(
        1, uapi.TEE_OPTEE_CAP_TZ, OPTEE_GEN_CAPS
    )
    ctx = device.open()
    supp = device.open_supplicant()
    try:
        for c in (ctx, supp):
            assert (c.welcome.impl_id, c.welcome.gen_caps) == (1, OPTEE_GEN_CAPS)
            got = bytearray(12)
            c.ioctl(uapi.TEE_IOC_VERSION, got)
            assert got == want
        with pytest.raises(DriverError) as exc:
            device.open_supplicant()
        assert exc.value.errno == errno.EBUSY
        lsupp = local.open_supplicant()
        with pytest.raises(DriverError) as lexc:
            local.open_supplicant()
        assert lexc.value.errno == errno.EBUSY
        lsupp.close()
    finally:
        supp.close()
        ctx.close()
        lctx.close()
    again = qtee.connect(server.path)
    assert eventually(lambda: server.connections == 0)
    again.open_supplicant().close()


def test_a_qtee_server_has_no_privileged_node(tmp_path: Path) -> None:
    with DeviceServer(tmp_path / "q") as srv:
        with pytest.raises(DriverError) as exc:
            qtee.connect(srv.path).open_supplicant()
        assert exc.value.errno == errno.ENOENT
        assert eventually(lambda: srv.connections == 0)


def test_server_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="tee must be one of"):
        DeviceServer(tmp_path / "x", tee="sgx")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="ServedOpteeDevice"):
        DeviceServer(tmp_path / "x", OpteeDevice(SecureWorld(QteeRoot())))
    with pytest.raises(UsageError, match=r"qtee\.Device"):
        DeviceServer(tmp_path / "x", ServedOpteeDevice(SecureWorld(QteeRoot())), tee="qtee")
    with pytest.raises(UsageError, match="RegionMemory"):
        ServedOpteeDevice(SecureWorld(QteeRoot()), memory=CheckedMemory())  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="AddressSpace"):
        qtee.connect(tmp_path / "x", memory=bytearray(4))  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="node"):
        qtee.RemoteContext(qtee.RemoteDevice(tmp_path / "x"), node="tee0")


# ----------------------------------------------------------------------------- errno parity
@dataclass
class Side:
    """One device as a table row sees it: a client fd, tee-supplicant's fd (opened on
    first use) and the memory their pointers name."""

    open_supp: Callable[[], Any]
    ctx: Any
    mem: CheckedMemory
    _supp: Any = None
    extra: list[Any] = field(default_factory=list)

    @property
    def supp(self) -> Any:
        if self._supp is None:
            self._supp = self.open_supp()
        return self._supp

    def close(self) -> None:
        if self._supp is not None:
            self._supp.close()
        self.ctx.close()


Row = Callable[[Side], tuple[Any, int, Any, list[bytearray]]]


def _ro(arg: bytearray) -> memoryview:
    return memoryview(bytes(arg))


def _open_with(side: Side, params: list[tuple[int, int, int, int]], login: int = 0) -> Any:
    block = open_block(tas.SAMPLE_UUID, params, login)
    return side.ctx, uapi.TEE_IOC_OPEN_SESSION, _buf(side.mem, block), [block]


def _invoke_with(side: Side, cmd: int, params: list[tuple[int, int, int, int]]) -> Any:
    session = open_session(side.ctx, side.mem)
    block = invoke_block(session, cmd, params)
    return side.ctx, uapi.TEE_IOC_INVOKE, _buf(side.mem, block), [block]


def _registered(side: Side, data: bytes) -> tuple[bytearray, int]:
    buf = bytearray(data)
    shm_id, _addr = shm_register(side.ctx, side.mem, buf)
    side.extra.append(buf)
    return buf, shm_id


def _reg_bump(side: Side) -> Any:
    buf, shm_id = _registered(side, b"\x00abcdefgh\xff")
    ctx, cmd, arg, bufs = _invoke_with(side, tas.BUMP, [(MEMREF_INOUT, 2, 5, shm_id), *NULL4[1:]])
    return ctx, cmd, arg, [*bufs, buf]


def _reg_reverse(side: Side) -> Any:
    src, src_id = _registered(side, b"0123456789")
    dst, dst_id = _registered(side, b"." * 16)
    params = [(MEMREF_IN, 3, 4, src_id), (MEMREF_OUT, 8, 6, dst_id), (0, 0, 0, 0), (0, 0, 0, 0)]
    ctx, cmd, arg, bufs = _invoke_with(side, tas.REVERSE, params)
    return ctx, cmd, arg, [*bufs, src, dst]


def _short_buffer(side: Side) -> Any:
    dst, dst_id = _registered(side, b"." * 8)
    src_id = shm_alloc(side.ctx, 32)
    params = [(MEMREF_IN, 0, 20, src_id), (MEMREF_OUT, 0, 8, dst_id), (0, 0, 0, 0), (0, 0, 0, 0)]
    ctx, cmd, arg, bufs = _invoke_with(side, tas.REVERSE, params)
    return ctx, cmd, arg, [*bufs, dst]


def _send(side: Side, ret: int, params: list[tuple[int, int, int, int]]) -> Any:
    block = send_block(ret, params)
    return side.supp, uapi.TEE_IOC_SUPPL_SEND, _buf(side.mem, block), [block]


def _recv(side: Side, block: bytearray) -> Any:
    return side.supp, uapi.TEE_IOC_SUPPL_RECV, _buf(side.mem, block), [block]


def _foreign_shm(side: Side) -> Any:
    shm_id = shm_alloc(side.supp, 16)  # another fd's shm
    return _open_with(side, [(MEMREF_IN, 0, 4, shm_id)] + [(0, 0, 0, 0)] * 3)


def _past_registered(side: Side) -> Any:
    shm_id = _registered(side, b"x" * 8)[1]
    return _open_with(side, [(MEMREF_IN, 4, 5, shm_id)] + [(0, 0, 0, 0)] * 3)


NULL4 = [(0, 0, 0, 0)] * 4
ROWS: list[tuple[str, Row]] = [
    ("unknown ioctl", lambda s: (s.ctx, 0xA4FF, bytearray(16), [])),
    ("version short", lambda s: (s.ctx, uapi.TEE_IOC_VERSION, bytearray(8), [])),
    ("version read-only", lambda s: (s.ctx, uapi.TEE_IOC_VERSION, _ro(bytearray(12)), [])),
    (
        "version not bytes",
        lambda s: (s.ctx, uapi.TEE_IOC_VERSION, memoryview(bytearray(12)).cast("I"), []),
    ),
    (
        "shm_alloc flags",
        lambda s: (s.ctx, uapi.TEE_IOC_SHM_ALLOC, bytearray(uapi.ShmAllocData(8, 1).pack()), []),
    ),
    (
        "shm_alloc too big",
        lambda s: (s.ctx, uapi.TEE_IOC_SHM_ALLOC, bytearray(uapi.ShmAllocData(5 << 20).pack()), []),
    ),
    (
        "shm_alloc read-only",
        lambda s: (s.ctx, uapi.TEE_IOC_SHM_ALLOC, _ro(bytearray(uapi.ShmAllocData(8).pack())), []),
    ),
    (
        "shm_register flags",
        lambda s: (
            s.ctx,
            uapi.TEE_IOC_SHM_REGISTER,
            bytearray(uapi.ShmRegisterData(s.mem.map(bytearray(8)), 8, 1).pack()),
            [],
        ),
    ),
    (
        "shm_register empty",
        lambda s: (
            s.ctx,
            uapi.TEE_IOC_SHM_REGISTER,
            bytearray(uapi.ShmRegisterData(s.mem.map(bytearray(8)), 0).pack()),
            [],
        ),
    ),
    (
        "shm_register unmapped",
        lambda s: (
            s.ctx,
            uapi.TEE_IOC_SHM_REGISTER,
            bytearray(uapi.ShmRegisterData(0x7000_0000, 64).pack()),
            [],
        ),
    ),
    (
        "shm_register past the user space",
        lambda s: (
            s.ctx,
            uapi.TEE_IOC_SHM_REGISTER,
            bytearray(uapi.ShmRegisterData(TASK_SIZE - 8, 64).pack()),
            [],
        ),
    ),
    (
        "open unmapped block",
        lambda s: (
            s.ctx,
            uapi.TEE_IOC_OPEN_SESSION,
            bytearray(uapi.BufData(0x7000_0000, 56 + 128).pack()),
            [],
        ),
    ),
    (
        "open block of a wrong size",
        lambda s: (
            s.ctx,
            uapi.TEE_IOC_OPEN_SESSION,
            bytearray(uapi.BufData(s.mem.map(open_block(tas.SAMPLE_UUID, NULL4)), 60).pack()),
            [],
        ),
    ),
    ("open bad attr", lambda s: _open_with(s, [(0x8, 0, 0, 0), *NULL4[1:]])),
    ("open meta attr", lambda s: _open_with(s, [(META | 1, 0, 0, 0), *NULL4[1:]])),
    ("open another fd's shm", _foreign_shm),
    ("open past a registered shm", _past_registered),
    ("open kernel login", lambda s: _open_with(s, NULL4, login=0x8000_0000)),
    ("open user login", lambda s: _open_with(s, NULL4, login=LOGIN_USER)),
    (
        "open unknown TA",
        lambda s: (
            s.ctx,
            uapi.TEE_IOC_OPEN_SESSION,
            _buf(s.mem, block := open_block(uuid.UUID(int=7), NULL4)),
            [block],
        ),
    ),
    (
        "open read-only arg",
        lambda s: (
            s.ctx,
            uapi.TEE_IOC_OPEN_SESSION,
            _ro(_buf(s.mem, block := open_block(tas.SAMPLE_UUID, NULL4))),
            [block],
        ),
    ),
    (
        "invoke unknown session",
        lambda s: (
            s.ctx,
            uapi.TEE_IOC_INVOKE,
            _buf(s.mem, block := invoke_block(0x7777, 0, NULL4)),
            [block],
        ),
    ),
    (
        "invoke add",
        lambda s: _invoke_with(
            s, tas.ADD, [(VALUE_IN, 40, 2, 0), (VALUE_OUT, 9, 9, 9), *NULL4[2:]]
        ),
    ),
    ("invoke registered in/out window", _reg_bump),
    ("invoke registered in and out windows", _reg_reverse),
    ("invoke short buffer", _short_buffer),
    (
        "invoke memref null",
        lambda s: _invoke_with(
            s, tas.REVERSE, [(MEMREF_IN, 0, 0, uapi.TEE_MEMREF_NULL)] * 2 + NULL4[2:]
        ),
    ),
    (
        "cancel unknown session",
        lambda s: (s.ctx, uapi.TEE_IOC_CANCEL, bytearray(uapi.CancelArg(0, 0x7777).pack()), []),
    ),
    (
        "close unknown session",
        lambda s: (
            s.ctx,
            uapi.TEE_IOC_CLOSE_SESSION,
            bytearray(uapi.CloseSessionArg(0x7777).pack()),
            [],
        ),
    ),
    (
        "close read-only",
        lambda s: (
            s.ctx,
            uapi.TEE_IOC_CLOSE_SESSION,
            _ro(bytearray(uapi.CloseSessionArg(open_session(s.ctx, s.mem)).pack())),
            [],
        ),
    ),
    (
        "recv on the client node",
        lambda s: (s.ctx, uapi.TEE_IOC_SUPPL_RECV, _buf(s.mem, recv_block()), []),
    ),
    (
        "send on the client node",
        lambda s: (
            s.ctx,
            uapi.TEE_IOC_SUPPL_SEND,
            _buf(s.mem, send_block(0, [(META_INOUT, 1, 0, 0)])),
            [],
        ),
    ),
    ("recv a value param", lambda s: _recv(s, recv_block(first=VALUE_IN))),
    ("recv no params", lambda s: _recv(s, recv_block(n=0))),
    ("recv block of a wrong size", lambda s: _recv(s, recv_block() + bytearray(8))),
    ("send unknown request", lambda s: _send(s, 0, [(META_INOUT, 3, 0, 0)])),
    ("send no params", lambda s: _send(s, 0, [])),
    ("send without meta", lambda s: _send(s, 0, [(VALUE_IN, 1, 0, 0)])),
    (
        "supplicant shm_alloc",
        lambda s: (s.supp, uapi.TEE_IOC_SHM_ALLOC, bytearray(uapi.ShmAllocData(24).pack()), []),
    ),
]


def _outcome(side: Side, row: Row) -> tuple[int, bytes, list[bytes]]:
    fd, cmd, arg, bufs = row(side)
    try:
        fd.ioctl(cmd, arg)
        code = 0
    except DriverError as exc:
        code = exc.errno
    return code, bytes(arg), [bytes(b) for b in bufs]


@pytest.mark.parametrize("row", [r for _, r in ROWS], ids=[n for n, _ in ROWS])
def test_errno_parity(server: DeviceServer, row: Row) -> None:
    """The same ioctl on an in-process OP-TEE device and over the socket: the same errno,
    the same struct and the same memory afterwards."""
    local = OpteeDevice(SecureWorld(QteeRoot()), memory=CheckedMemory())
    assert isinstance(local.memory, CheckedMemory)
    lctx = local.open()
    in_process = Side(local.open_supplicant, lctx, local.memory)
    remote = qtee.connect(server.path)
    assert isinstance(remote.memory, CheckedMemory)
    over = Side(remote.open_supplicant, remote.open(), remote.memory)
    try:
        want = _outcome(in_process, row)
        got = _outcome(over, row)
        assert got == want
        assert not over.ctx.lost
    finally:
        in_process.close()
        over.close()
    assert local.leaks() == {}
    assert eventually(lambda: server.device.leaks() == {})


def test_recv_nowait_parity(server: DeviceServer) -> None:
    """The non-blocking RECV: EAGAIN with nothing queued, as in process; on the client
    node, what SUPPL_RECV gives (EINVAL)."""
    local = OpteeDevice(SecureWorld(QteeRoot()), memory=CheckedMemory())
    lsupp = local.open_supplicant()
    device = qtee.connect(server.path)
    supp, ctx = device.open_supplicant(), device.open()
    try:
        for fd, mem in ((lsupp, local.memory), (supp, device.memory)):
            block = recv_block()
            before = bytes(block)
            with pytest.raises(DriverError) as exc:
                fd.recv_nowait(_buf(mem, block))  # type: ignore[arg-type]
            assert exc.value.errno == errno.EAGAIN and bytes(block) == before
        with pytest.raises(DriverError) as exc:
            ctx.recv_nowait(_buf(device.memory, recv_block()))
        assert exc.value.errno == errno.EINVAL
    finally:
        supp.close()
        ctx.close()
        lsupp.close()


# ----------------------------------------------------------------------------- TEEC
def test_teec_client_over_the_socket(server: DeviceServer) -> None:
    """libteec's calls through ``qtee.gp.TeecContext(qtee.connect(path))``: values,
    temporary memrefs, allocated shared memory (the same pages in both processes) and
    registered memory (windows sent and written back), short buffers, the client UUID of
    LOGIN_USER from the caller's credentials."""
    device = qtee.connect(server.path)
    with TeecContext(device) as ctx:
        assert ctx.reg_mem
        session = ctx.open_session(tas.SAMPLE_UUID)
        op = TeecOperation(
            param_types(T.TEEC_VALUE_INPUT, T.TEEC_VALUE_OUTPUT, 0, 0),
            [TeecValue(40, 2), TeecValue(0, 0)],
        )
        session.invoke_command(tas.ADD, op)
        assert op.params[1].a == 42  # type: ignore[union-attr]

        out = bytearray(4)
        op = TeecOperation(
            param_types(T.TEEC_MEMREF_TEMP_INPUT, T.TEEC_MEMREF_TEMP_OUTPUT, 0, 0),
            [TeecTempMemoryReference(bytearray(b"hello")), TeecTempMemoryReference(out)],
        )
        with pytest.raises(TeecError) as exc:
            session.invoke_command(tas.REVERSE, op)
        assert exc.value.code == TeecResult.TEEC_ERROR_SHORT_BUFFER
        assert op.params[1].size == 5  # type: ignore[union-attr]

        shared = ctx.allocate_shared_memory(32, 3)
        shared.buffer[:6] = b"abcdef"
        mine = bytearray(b"registered-bytes")
        reg = ctx.register_shared_memory(mine, 3)
        op = TeecOperation(
            param_types(T.TEEC_MEMREF_PARTIAL_INPUT, T.TEEC_MEMREF_PARTIAL_OUTPUT, 0, 0),
            [
                TeecRegisteredMemoryReference(shared, 0, 6),
                TeecRegisteredMemoryReference(reg, 4, 8),
            ],
        )
        session.invoke_command(tas.REVERSE, op)  # the TA writes the window it was given
        assert bytes(mine) == b"regifedcba-bytes"
        assert op.params[1].size == 6  # type: ignore[union-attr]
        op = TeecOperation(
            param_types(T.TEEC_MEMREF_PARTIAL_INOUT, 0, 0, 0),
            [TeecRegisteredMemoryReference(reg, 0, 4)],
        )
        session.invoke_command(tas.BUMP, op)
        assert bytes(mine) == b"sfhjfedcba-bytes"
        reg.release()
        shared.release()

        who = bytearray(16)
        user = ctx.open_session(tas.SAMPLE_UUID, login=LOGIN_USER)
        op = TeecOperation(
            param_types(T.TEEC_MEMREF_TEMP_OUTPUT, 0, 0, 0), [TeecTempMemoryReference(who)]
        )
        user.invoke_command(tas.WHO, op)
        me = OpteeDevice(SecureWorld(QteeRoot())).cred()  # this process, as the kernel sees it
        assert bytes(who) == calc_client_uuid(LOGIN_USER, cred=me).bytes
        user.close()
        session.close()
    assert eventually(lambda: server.device.leaks() == {})


# ----------------------------------------------------------------------------- tee-supplicant
def _store_and_load(device: qtee.RemoteDevice, store: Path) -> None:
    """A session to the loadable TA (LOAD_TA through tee-supplicant), an add, and a
    trusted-storage round trip (FS RPCs with payloads in the supplicant's shms)."""
    with TeecContext(device) as ctx:
        session = ctx.open_session(tas.LOADABLE_UUID)
        op = TeecOperation(
            param_types(T.TEEC_VALUE_INPUT, T.TEEC_VALUE_OUTPUT, 0, 0),
            [TeecValue(7, 35), TeecValue(0, 0)],
        )
        session.invoke_command(tas.ADD, op)
        assert op.params[1].a == 42  # type: ignore[union-attr]
        data = bytes(range(256)) * 5
        back = bytearray(len(data))
        op = TeecOperation(
            param_types(T.TEEC_MEMREF_TEMP_INPUT, T.TEEC_MEMREF_TEMP_OUTPUT, 0, 0),
            [TeecTempMemoryReference(bytearray(data)), TeecTempMemoryReference(back)],
        )
        session.invoke_command(tas.STORE, op)
        assert bytes(back) == data
        session.close()
        with pytest.raises(TeecError) as exc:  # no image: tee-supplicant's ITEM_NOT_FOUND
            ctx.open_session(uuid.UUID(int=0x1234))
        assert (exc.value.code, exc.value.origin) == (
            TeecResult.TEEC_ERROR_ITEM_NOT_FOUND,
            TeecOrigin.TEEC_ORIGIN_TEE,
        )
    (obj,) = (store / str(tas.LOADABLE_UUID)).iterdir()
    assert obj.name == b"obj".hex() and obj.read_bytes() == data


@pytest.mark.parametrize("kind", [OpteeSupplicant, RegisteringSupplicant])
def test_supplicant_over_the_socket(
    server: DeviceServer, dirs: tuple[Path, Path], kind: type[OpteeSupplicant]
) -> None:
    """tee-supplicant on the privileged node of the same server: LOAD_TA of a ``<uuid>.ta``
    and trusted storage, with its payloads SHM_ALLOCated (shared pages) or
    SHM_REGISTERed (its own memory: the server's shadow and the RECV/SEND windows)."""
    ta_dir, store = dirs
    supp = kind(qtee.connect(server.path), ta_dir, store)  # type: ignore[arg-type]
    try:
        _store_and_load(qtee.connect(server.path), store)
        if isinstance(supp, RegisteringSupplicant):
            assert supp.registered > 0
    finally:
        supp.stop()
    assert eventually(lambda: server.connections == 0)


def test_a_call_waiting_on_the_supplicant_is_not_overdue(
    server: DeviceServer, dirs: tuple[Path, Path]
) -> None:
    """A client's deadline stands still while its call waits on tee-supplicant (LOAD_TA
    slower than ``call_timeout``), as it does while a QTEE call waits on a callback."""

    class Slow(OpteeSupplicant):
        def _load_ta(self, args: list[list[int]]) -> int:
            time.sleep(0.5)
            return super()._load_ta(args)

    ta_dir, store = dirs
    supp = Slow(qtee.connect(server.path), ta_dir, store)  # type: ignore[arg-type]
    try:
        with TeecContext(qtee.connect(server.path, call_timeout=0.2)) as ctx:
            ctx.open_session(tas.LOADABLE_UUID).close()
    finally:
        supp.stop()


def test_no_supplicant_then_one(server: DeviceServer) -> None:
    """Before any supplicant attached, an unknown UUID is ITEM_NOT_FOUND at once (as in
    process: the LOAD_TA hook comes with the first open of the privileged node); the
    supplicant's fd closing mid-LOAD_TA fails the open with COMMUNICATION."""
    with TeecContext(qtee.connect(server.path)) as ctx:
        with pytest.raises(TeecError) as exc:
            ctx.open_session(tas.LOADABLE_UUID)
        assert exc.value.code == TeecResult.TEEC_ERROR_ITEM_NOT_FOUND
    device = qtee.connect(server.path)
    supp = device.open_supplicant()
    outcome: list[object] = []

    def opener() -> None:
        try:
            with TeecContext(qtee.connect(server.path)) as ctx:
                ctx.open_session(tas.LOADABLE_UUID)
        except TeecError as err:
            outcome.append(err.code)

    t = threading.Thread(target=opener)
    t.start()
    block = recv_block()
    assert supp.ioctl(uapi.TEE_IOC_SUPPL_RECV, _buf(device.memory, block)) == 0
    assert HEAD.unpack_from(block)[0] == 0  # LOAD_TA
    supp.close()  # received, never answered
    t.join(10)
    assert outcome == [TeecResult.TEEC_ERROR_COMMUNICATION]


# ----------------------------------------------------------------------------- lies
class FakeOptee:
    """One connection of a lying OP-TEE server: welcomes the client as OP-TEE, then
    answers each ioctl with ``answer(request)`` (None: an honest echo of the arg)."""

    def __init__(self, path: str, answer: Callable[[Ioctl], IoctlReply | None]) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.answer = answer
        self.eof = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            dec = FrameDecoder(expect_increasing_seq=False)
            while not (first := (conn := self.listener.accept()[0]).recv(1 << 16)):
                conn.close()  # qtee.connect trying the path: closed unused
            dec.feed(first)
            with conn:
                while True:
                    while (msg := dec.next_message()) is None:
                        data = conn.recv(1 << 16)
                        if not data:
                            self.eof.set()
                            return
                        dec.feed(data)
                    if isinstance(msg, Hello):
                        welcome = Welcome(impl_id=1, gen_caps=OPTEE_GEN_CAPS, server="fake")
                        conn.sendall(encode(welcome))
                    elif isinstance(msg, Ioctl):
                        reply = self.answer(msg) or IoctlReply(seq=msg.seq, arg=msg.arg)
                        conn.sendall(encode(reply))
        except BaseException as exc:
            self.error = exc

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


def _block_of(req: Ioctl) -> tuple[int, bytearray]:
    ptr, _length = struct.unpack_from("<QQ", req.arg)
    (region,) = [r for r in req.regions if r.addr == ptr]
    return ptr, bytearray(region.data)


def _w(addr: int, data: bytes) -> Region:
    return Region(addr=addr, data=bytes(data), writable=True)


def _patched(req: Ioctl, offset: int, fmt: str, *values: int) -> IoctlReply:
    ptr, block = _block_of(req)
    struct.pack_into(fmt, block, offset, *values)
    return IoctlReply(seq=req.seq, arg=req.arg, written=(_w(ptr, block),))


@dataclass
class Client:
    """The client side of one lie: its fd, memory, a registered buffer (shm 5 at
    ``reg_addr``) and an untouched victim buffer."""

    ctx: Any
    mem: CheckedMemory
    reg: bytearray
    reg_addr: int
    victim: bytearray


def _register_honestly(req: Ioctl) -> IoctlReply:
    data = uapi.ShmRegisterData.unpack(req.arg)
    return IoctlReply(seq=req.seq, arg=uapi.ShmRegisterData(data.addr, data.length, 0, 5).pack())


def _invoke_call(c: Client) -> tuple[int, bytearray]:
    block = invoke_block(
        9, 1, [(MEMREF_IN, 0, 4, 5), (MEMREF_OUT, 8, 4, 5), (VALUE_IN, 1, 2, 3), (0, 0, 0, 0)]
    )
    return uapi.TEE_IOC_INVOKE, _buf(c.mem, block)


def _recv_call(c: Client) -> tuple[int, bytearray]:
    return uapi.TEE_IOC_SUPPL_RECV, _buf(c.mem, recv_block(n=3))


def _recv_reply(
    req: Ioctl, params: list[tuple[int, int, int, int]], windows: tuple[Region, ...]
) -> IoctlReply:
    ptr, block = _block_of(req)
    HEAD.pack_into(block, 0, 2, len(params))
    for i, p in enumerate(params):
        PARAM.pack_into(block, 8 + 32 * i, *p)
    return IoctlReply(seq=req.seq, arg=req.arg, written=(_w(ptr, block), *windows))


Lie = tuple[Callable[[Client], tuple[int, bytearray]], Callable[[Ioctl, Client], IoctlReply]]
LIES: list[tuple[str, Lie]] = [
    (
        "version of another device",
        (
            lambda c: (uapi.TEE_IOC_VERSION, bytearray(12)),
            lambda r, c: IoctlReply(seq=r.seq, arg=uapi.VersionData(4, 0, 0x10).pack()),
        ),
    ),
    (
        "register answered with another length",
        (
            lambda c: (
                uapi.TEE_IOC_SHM_REGISTER,
                bytearray(uapi.ShmRegisterData(c.mem.map(bytearray(64)), 64).pack()),
            ),
            lambda r, c: IoctlReply(
                seq=r.seq,
                arg=uapi.ShmRegisterData(
                    uapi.ShmRegisterData.unpack(r.arg).addr, 4096, 0, 6
                ).pack(),
            ),
        ),
    ),
    (
        "register answered with shm id 0",
        (
            lambda c: (
                uapi.TEE_IOC_SHM_REGISTER,
                bytearray(uapi.ShmRegisterData(c.mem.map(bytearray(64)), 64).pack()),
            ),
            lambda r, c: IoctlReply(seq=r.seq, arg=r.arg),
        ),
    ),
    (
        "close answered with another arg",
        (
            lambda c: (uapi.TEE_IOC_CLOSE_SESSION, bytearray(uapi.CloseSessionArg(9).pack())),
            lambda r, c: IoctlReply(seq=r.seq, arg=uapi.CloseSessionArg(10).pack()),
        ),
    ),
    (
        "open changes the TA uuid",
        (
            lambda c: (
                uapi.TEE_IOC_OPEN_SESSION,
                _buf(c.mem, open_block(tas.SAMPLE_UUID, NULL4)),
            ),
            lambda r, c: _patched(r, 0, "<16s", bytes(16)),
        ),
    ),
    ("invoke changes the function", (_invoke_call, lambda r, c: _patched(r, 0, "<I", 2))),
    ("invoke changes the count", (_invoke_call, lambda r, c: _patched(r, 20, "<I", 3))),
    (
        "invoke moves an output memref",
        (_invoke_call, lambda r, c: _patched(r, 24 + 32 + 8, "<Q", 0)),
    ),
    (
        "invoke changes an input value",
        (_invoke_call, lambda r, c: _patched(r, 24 + 64 + 8, "<Q", 9)),
    ),
    ("invoke changes an attr", (_invoke_call, lambda r, c: _patched(r, 24, "<Q", MEMREF_OUT))),
    (
        "invoke writes the input window",
        (
            _invoke_call,
            lambda r, c: IoctlReply(seq=r.seq, arg=r.arg, written=(_w(c.reg_addr, b"XXXX"),)),
        ),
    ),
    (
        "invoke writes past the output window",
        (
            _invoke_call,
            lambda r, c: IoctlReply(seq=r.seq, arg=r.arg, written=(_w(c.reg_addr + 8, b"X" * 8),)),
        ),
    ),
    (
        "send writes its block",
        (
            lambda c: (
                uapi.TEE_IOC_SUPPL_SEND,
                _buf(c.mem, send_block(0, [(META_INOUT, 1, 0, 0)])),
            ),
            lambda r, c: _patched(r, 0, "<I", 1),
        ),
    ),
    (
        "recv fills more params than slots",
        (_recv_call, lambda r, c: _patched(r, 0, "<2I", 2, 4)),
    ),
    (
        "recv writes a window no memref names",
        (
            _recv_call,
            lambda r, c: _recv_reply(
                r, [(META_INOUT, 1, 0, 0), (MEMREF_IN, 0, 4, 5)], (_w(c.reg_addr + 4, b"XXXX"),)
            ),
        ),
    ),
    (
        "recv writes an output memref's window",
        (
            _recv_call,
            lambda r, c: _recv_reply(
                r, [(META_INOUT, 1, 0, 0), (MEMREF_OUT, 0, 4, 5)], (_w(c.reg_addr, b"XXXX"),)
            ),
        ),
    ),
    (
        "recv writes into another fd's memory",
        (
            _recv_call,
            lambda r, c: _recv_reply(
                r,
                [(META_INOUT, 1, 0, 0), (MEMREF_IN, 0, 4, 6)],
                (_w(c.mem.map(bytearray(4)), b"XXXX"),),
            ),
        ),
    ),
]


def _lied_to(
    tmp_path: Path,
    call: Callable[[Client], tuple[int, bytearray]],
    answer: Callable[[Ioctl, Client], IoctlReply],
    want: int,
) -> Client:
    holder: list[Client] = []

    def respond(req: Ioctl) -> IoctlReply | None:
        if req.cmd == uapi.TEE_IOC_SHM_REGISTER and not holder:
            return _register_honestly(req)
        return answer(req, holder[0])

    fake = FakeOptee(str(tmp_path / "fake"), respond)
    try:
        device = qtee.connect(tmp_path / "fake")
        assert isinstance(device.memory, CheckedMemory)
        ctx = device.open()
        reg = bytearray(b"0123456789ab")
        shm_id, reg_addr = shm_register(ctx, device.memory, reg)
        assert shm_id == 5
        client = Client(ctx, device.memory, reg, reg_addr, bytearray(b"v" * 8))
        holder.append(client)
        cmd, arg = call(client)
        before = bytes(arg), bytes(reg)
        if want:
            with pytest.raises(DriverError) as exc:
                ctx.ioctl(cmd, arg)
            assert exc.value.errno == want, exc.value
            assert (bytes(arg), bytes(reg)) == before  # nothing written
            assert fake.eof.wait(5) and ctx.lost
        else:
            ctx.ioctl(cmd, arg)
        ctx.close()
    finally:
        fake.close()
    assert fake.error is None, fake.error
    return client


@pytest.mark.parametrize("lie", [lie for _, lie in LIES], ids=[name for name, _ in LIES])
def test_a_lying_optee_reply_fails_eproto_and_writes_nothing(tmp_path: Path, lie: Lie) -> None:
    _lied_to(tmp_path, *lie, want=errno.EPROTO)


def test_an_honest_recv_window_is_written(tmp_path: Path) -> None:
    """The window of an input memref on a registered shm of this fd, beside the RECV
    block: written into this process's memory."""
    answer = lambda r, c: _recv_reply(  # noqa: E731
        r, [(META_INOUT, 1, 0, 0), (MEMREF_INOUT, 2, 4, 5)], (_w(c.reg_addr + 2, b"WXYZ"),)
    )
    client = _lied_to(tmp_path, _recv_call, answer, want=0)
    assert bytes(client.reg) == b"01WXYZ6789ab"


# ----------------------------------------------------------------------------- processes
def _qtee(*args: str) -> list[str]:
    return [sys.executable, "-m", "qtee", *args]


@pytest.mark.parametrize("payloads", ["alloc", "register"])
def test_three_processes(tmp_path: Path, dirs: tuple[Path, Path], payloads: str) -> None:
    """``qtee serve --tee optee`` in one process with the TAs of ``--ta-module``,
    tee-supplicant (the model's) in a second one on the privileged node, serving LOAD_TA
    from a ``<uuid>.ta`` directory and trusted storage; a TEEC client in this one.  At
    the end ``qtee info --connect`` shows no live object and the server says ``tables:
    empty`` as it stops."""
    ta_dir, store = dirs
    sock = str(tmp_path / "optee.sock")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    serve = ["serve", "--tee", "optee", "--socket", sock, "--introspect"]
    server = subprocess.Popen(
        _qtee(*serve, "--ta-module", "tests._optee_tas_serve"),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    supp: subprocess.Popen[str] | None = None
    try:
        assert server.stdout is not None
        assert server.stdout.readline().startswith("serving on"), server.stderr
        extra = ["register"] if payloads == "register" else []
        supp = subprocess.Popen(
            [sys.executable, str(PEER), sock, str(ta_dir), str(store), *extra],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert supp.stdout is not None and supp.stdout.readline() == "READY\n"
        _store_and_load(qtee.connect(sock), store)
        info = subprocess.run(
            _qtee("info", "--connect", sock),
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert info.returncode == 0, info.stderr
        assert "impl id: 1 (OP-TEE)" in info.stdout
        assert "live objects: none" in info.stdout, info.stdout
        assert "on teepriv" in info.stdout  # the supplicant's fd
        assert supp.stdin is not None
        supp.stdin.close()
        assert supp.wait(10) == 0 and supp.stdout.read() == "STOPPED\n"
    finally:
        if supp is not None and supp.poll() is None:
            supp.kill()
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=30)
    assert server.returncode == 0, err
    assert "tables: empty" in out, (out, err)
