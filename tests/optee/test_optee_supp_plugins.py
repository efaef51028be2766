"""tee-supplicant plugins (OPTEE_RPC_CMD_SUPP_PLUGIN) on the OP-TEE device.

A GP TA calls :func:`qtee.invoke_supp_plugin` (libutee's ``tee_invoke_supp_plugin``);
:class:`supplicant.OpteeSupplicant` serves the RPC with the Python callables registered
by UUID.  Sources (read for behaviour only):

* OP-TEE/optee_os:core/include/optee_rpc_cmd.h@c725f8635b803d2f89d027a892a5dd8fd2f90c92
  (cmd 12, INVOKE 0, the param layout and UUID words),
* OP-TEE/optee_os:core/tee/tee_supp_plugin_rpc.c@11f5b73143c239af59f8a7d05353fea2d9822c91
  (the payload, the out length, the copy back to a user TA's buffer),
* OP-TEE/optee_os:core/pta/system.c@3dd5cda28504178b68f7e90ff55d26d0c73f37bc and
  OP-TEE/optee_os:lib/libutee/tee_system_pta.c@1dd4fb00bcb5f721e2e2592231e06acf7d0be1fb
  (the TA-side call),
* OP-TEE/optee_client:tee-supplicant/src/plugin.c@0fc6ef70a70d38628ded06590aefb7bc23364d99
  (param checks, ITEM_NOT_FOUND, the plugin's result passed back as is).
"""

from __future__ import annotations

import struct
import sys
import threading
import types
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import qtee
from objects import UsageError
from qtee import DeviceServer, OpteeContext, OpteeDevice, invoke_supp_plugin, uapi
from qtee._optee.supp import (
    OpteeRpcCmd,
    RpcParam,
    attach_rpc,
)
from qtee.addrspace import CheckedMemory
from qtee.gp import Cred, TeecContext, TeecOrigin, TeecResult
from qtee.secure import (
    GpParam,
    GpSession,
    GpTA,
    GpTaError,
    QteeRoot,
    SecureWorld,
    register_gp_ta,
    unregister_gp_ta,
)
from supplicant import OpteeSupplicant, plugin_from_spec
from tests._optee_peer import RegisteringSupplicant

TA_UUID = uuid.UUID("5e1f4a2c-7b0d-4c8e-9a61-3f2b8d7c6e50")
PLUGIN = uuid.UUID("f07bfc66-958c-4a15-99c0-260e4e7375dd")
OTHER = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff")
OPEN_HEAD = struct.Struct("<16s16s6I")
INVOKE_HEAD = struct.Struct("<6I")
_PLUGIN = OpteeRpcCmd.OPTEE_RPC_CMD_SUPP_PLUGIN
HEAD = struct.Struct("<2I")
PARAM = struct.Struct("<4Q")
META, VALUE_IN, VALUE_INOUT, MEMREF_INOUT = 0x100, 1, 3, 7
TA_ORIGIN = TeecOrigin.TEEC_ORIGIN_TRUSTED_APP
OK = int(TeecResult.TEEC_SUCCESS)
NOT_FOUND = int(TeecResult.TEEC_ERROR_ITEM_NOT_FOUND)
BAD = int(TeecResult.TEEC_ERROR_BAD_PARAMETERS)
GENERIC = int(TeecResult.TEEC_ERROR_GENERIC)
NOT_SUPPORTED = int(TeecResult.TEEC_ERROR_NOT_SUPPORTED)
BAD_FORMAT = 0xFFFF_0005

Script = Callable[[GpTA], object]


class Caller(GpTA):
    """Runs the test's script inside an invoke entry; the script's outcome is kept."""

    UUID = TA_UUID
    script: Script | None = None
    results: list[object] = []  # noqa: RUF012

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
        script = type(self).script
        if script is None:
            raise GpTaError(TeecResult.TEEC_ERROR_NOT_SUPPORTED)
        try:
            type(self).results.append(script(self))
        except GpTaError as exc:
            type(self).results.append(("error", exc.code))


Env = tuple[OpteeDevice, OpteeContext, CheckedMemory, Path]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    register_gp_ta(Caller)
    Caller.script, Caller.results = None, []
    (tmp_path / "ta").mkdir()
    (tmp_path / "store").mkdir()
    mem = CheckedMemory()
    dev = OpteeDevice(SecureWorld(QteeRoot()), memory=mem, cred=lambda: Cred(euid=1000, egid=1000))
    ctx = dev.open()
    yield dev, ctx, mem, tmp_path
    ctx.close()
    unregister_gp_ta(TA_UUID)
    assert dev.leaks() == {}
    assert attach_rpc(dev).counts() == {"queued": 0, "in flight": 0}


@pytest.fixture
def supp(env: Env) -> Iterator[OpteeSupplicant]:
    dev, _ctx, _mem, tmp = env
    s = OpteeSupplicant(dev, tmp / "ta", tmp / "store", workers=2)
    yield s
    s.stop()
    assert not s.ctx.shms  # every payload went back (SHM_FREE)


def _buf(mem: CheckedMemory, block: bytearray) -> bytearray:
    return bytearray(uapi.BufData(mem.map(block), len(block)).pack())


def run(env: Env, script: Script) -> tuple[int, int, object]:
    """Open a session to the caller TA and run ``script`` in an invoke: (ret, origin,
    the script's outcome)."""
    _dev, ctx, mem, _tmp = env
    block = bytearray(OPEN_HEAD.pack(TA_UUID.bytes, bytes(16), 0, 0, 0, 0, 0, 4)) + bytes(128)
    ctx.ioctl(uapi.TEE_IOC_OPEN_SESSION, _buf(mem, block))
    session, ret = OPEN_HEAD.unpack_from(block)[4:6]
    assert (ret, session != 0) == (0, True)
    Caller.script, Caller.results = script, []
    try:
        inv = bytearray(INVOKE_HEAD.pack(0, session, 0, 0, 0, 4)) + bytes(128)
        ctx.ioctl(uapi.TEE_IOC_INVOKE, _buf(mem, inv))
        head = INVOKE_HEAD.unpack_from(inv)
    finally:
        ctx.ioctl(uapi.TEE_IOC_CLOSE_SESSION, bytearray(struct.pack("<I", session)))
    return head[3], head[4], Caller.results[0] if Caller.results else None


# ----------------------------------------------------------------------------- the call


def test_plugin_gets_cmd_sub_cmd_and_data_and_fills_the_buffer(
    env: Env, supp: OpteeSupplicant
) -> None:
    """plugin.c: the plugin gets (cmd, sub_cmd, data of in_len bytes); its out length comes
    back in value[2].b and tee_supp_plugin_rpc.c copies the whole payload (len bytes)
    over the user TA's buffer when it is non-zero.

    Sources:
    OP-TEE/optee_client:tee-supplicant/src/plugin.c@0fc6ef70a70d38628ded06590aefb7bc23364d99;
    OP-TEE/optee_os:core/tee/tee_supp_plugin_rpc.c@11f5b73143c239af59f8a7d05353fea2d9822c91;
    OP-TEE/optee_os:core/pta/system.c@3dd5cda28504178b68f7e90ff55d26d0c73f37bc.
    """
    seen: list[tuple[int, int, bytes]] = []

    def plugin(cmd: int, sub_cmd: int, data: bytes) -> tuple[int, bytes]:
        seen.append((cmd, sub_cmd, data))
        return 0, data[::-1][:3] + b"!"

    supp.register_plugin(PLUGIN, plugin)

    def script(ta: GpTA) -> object:
        buf = bytearray(b"abcdefgh")
        outlen = invoke_supp_plugin(ta, PLUGIN, 0x1234_5678, 0xFFFF_FFFF, buf)
        return outlen, bytes(buf)

    assert run(env, script) == (0, TA_ORIGIN, (4, b"hgf!efgh"))
    assert seen == [(0x1234_5678, 0xFFFF_FFFF, b"abcdefgh")]


def test_unknown_plugin_is_item_not_found(env: Env, supp: OpteeSupplicant) -> None:
    """plugin.c plugin_invoke: no plugin with the UUID → TEEC_ERROR_ITEM_NOT_FOUND, which
    the TA's tee_invoke_supp_plugin returns (the buffer stays as it was).

    Sources:
    OP-TEE/optee_client:tee-supplicant/src/plugin.c@0fc6ef70a70d38628ded06590aefb7bc23364d99;
    OP-TEE/optee_os:lib/libutee/tee_system_pta.c@1dd4fb00bcb5f721e2e2592231e06acf7d0be1fb.
    """
    supp.register_plugin(PLUGIN, lambda c, s, d: (0, b"x"))

    def script(ta: GpTA) -> object:
        buf = bytearray(b"keep")
        try:
            invoke_supp_plugin(ta, OTHER, 1, 2, buf)
        except GpTaError as exc:
            return exc.code, bytes(buf)
        return None

    assert run(env, script) == (0, TA_ORIGIN, (NOT_FOUND, b"keep"))


def test_plugin_failure_is_its_result_unless_it_reports_output(
    env: Env, supp: OpteeSupplicant
) -> None:
    """plugin.c returns the plugin's result as the RPC's; tee_supp_plugin_rpc.c keeps it
    when the out length is 0, but with a buffer and a non-zero out length the result of
    copy_to_user (SUCCESS) replaces it and the buffer is the plugin's.

    Sources:
    OP-TEE/optee_client:tee-supplicant/src/plugin.c@0fc6ef70a70d38628ded06590aefb7bc23364d99;
    OP-TEE/optee_os:core/tee/tee_supp_plugin_rpc.c@11f5b73143c239af59f8a7d05353fea2d9822c91.
    """
    supp.register_plugin(PLUGIN, lambda c, s, d: (BAD_FORMAT, b"" if c == 0 else b"XY"))

    def script(ta: GpTA) -> object:
        out = []
        for cmd in (0, 1):
            buf = bytearray(b"1234")
            try:
                n = invoke_supp_plugin(ta, PLUGIN, cmd, 0, buf)
            except GpTaError as exc:
                out.append(("error", exc.code, bytes(buf)))
            else:
                out.append(("ok", n, bytes(buf)))
        return out

    assert run(env, script) == (
        0,
        TA_ORIGIN,
        [("error", BAD_FORMAT, b"1234"), ("ok", 2, b"XY34")],
    )


def test_no_buffer_and_an_out_length_larger_than_the_buffer(
    env: Env, supp: OpteeSupplicant
) -> None:
    """tee_supp_plugin_rpc.c: no buffer → a NULL memref (the plugin sees no data, its
    result stands) and the out length is reported as the plugin set it, also beyond
    the buffer (only the buffer's bytes are written).

    Sources:
    OP-TEE/optee_os:core/tee/tee_supp_plugin_rpc.c@11f5b73143c239af59f8a7d05353fea2d9822c91;
    OP-TEE/optee_os:lib/libutee/tee_system_pta.c@1dd4fb00bcb5f721e2e2592231e06acf7d0be1fb.
    """
    seen: list[bytes] = []

    def plugin(cmd: int, sub_cmd: int, data: bytes) -> tuple[int, bytes]:
        seen.append(data)
        return (BAD_FORMAT if cmd == 0 else 0), b"0123456789"

    supp.register_plugin(str(PLUGIN), plugin)

    def script(ta: GpTA) -> object:
        try:
            invoke_supp_plugin(ta, PLUGIN.bytes, 0, 0)
        except GpTaError as exc:
            first: object = exc.code
        buf = bytearray(4)
        n = invoke_supp_plugin(ta, PLUGIN, 1, 0, buf)
        return first, n, bytes(buf), invoke_supp_plugin(ta, PLUGIN, 1, 0)

    assert run(env, script) == (0, TA_ORIGIN, (BAD_FORMAT, 10, b"0123", 10))
    assert seen == [b"", b"\0" * 4, b""]


def test_plugin_that_raises_or_answers_garbage_is_generic(
    env: Env, supp: OpteeSupplicant, caplog: pytest.LogCaptureFixture
) -> None:
    """A plugin whose call fails has no result of its own: the supplicant answers
    TEEC_ERROR_GENERIC (as its loop does for any failed request), out length 0.

    Sources:
    OP-TEE/optee_client:tee-supplicant/src/plugin.c@0fc6ef70a70d38628ded06590aefb7bc23364d99.
    """

    def plugin(cmd: int, sub_cmd: int, data: bytes) -> tuple[int, bytes]:
        if cmd == 0:
            raise RuntimeError("boom")
        if cmd == 1:
            return -1, b""
        return 0, "text"  # type: ignore[return-value]

    supp.register_plugin(PLUGIN, plugin)

    def script(ta: GpTA) -> object:
        codes = []
        for cmd in (0, 1, 2):
            buf = bytearray(b"ab")
            try:
                invoke_supp_plugin(ta, PLUGIN, cmd, 0, buf)
            except GpTaError as exc:
                codes.append((exc.code, bytes(buf)))
        return codes

    assert run(env, script) == (0, TA_ORIGIN, [(GENERIC, b"ab")] * 3)
    assert "boom" in caplog.text


def test_unregistered_plugin_is_not_found_again(env: Env, supp: OpteeSupplicant) -> None:
    """register_plugin/unregister_plugin change what plugin_invoke finds.

    Sources:
    OP-TEE/optee_client:tee-supplicant/src/plugin.c@0fc6ef70a70d38628ded06590aefb7bc23364d99.
    """
    supp.register_plugin(PLUGIN, lambda c, s, d: (0, b""))
    assert supp.unregister_plugin(PLUGIN) is True
    assert supp.unregister_plugin(PLUGIN) is False

    def script(ta: GpTA) -> object:
        try:
            return invoke_supp_plugin(ta, PLUGIN, 0, 0)
        except GpTaError as exc:
            return exc.code

    assert run(env, script) == (0, TA_ORIGIN, NOT_FOUND)


@pytest.mark.parametrize("kind", [OpteeSupplicant, RegisteringSupplicant])
def test_plugin_of_a_supplicant_over_the_socket(
    tmp_path: Path, kind: type[OpteeSupplicant]
) -> None:
    """A served OP-TEE device, tee-supplicant as another client of it (payloads
    SHM_ALLOCated, or its own memory SHM_REGISTERed): the INOUT memref's bytes reach the
    plugin and come back to the TA (tee_supp_plugin_rpc.c, plugin.c).

    Sources:
    OP-TEE/optee_os:core/tee/tee_supp_plugin_rpc.c@11f5b73143c239af59f8a7d05353fea2d9822c91;
    OP-TEE/optee_client:tee-supplicant/src/plugin.c@0fc6ef70a70d38628ded06590aefb7bc23364d99.
    """
    register_gp_ta(Caller)
    (tmp_path / "ta").mkdir()
    (tmp_path / "store").mkdir()
    server = DeviceServer(tmp_path / "s", tee="optee").start()
    try:
        supp = kind(
            qtee.connect(server.path),  # type: ignore[arg-type]
            tmp_path / "ta",
            tmp_path / "store",
            plugins={PLUGIN: lambda c, s, d: (0, bytes(b ^ c for b in d))},
        )
        try:

            def script(ta: GpTA) -> object:
                buf = bytearray(b"plugin data")
                return invoke_supp_plugin(ta, PLUGIN, 0x20, 0, buf), bytes(buf)

            Caller.script, Caller.results = script, []
            with TeecContext(qtee.connect(server.path)) as ctx:
                ctx.open_session(TA_UUID).invoke_command(0)
            assert Caller.results == [(11, b"PLUGIN\0DATA")]
        finally:
            supp.stop()
    finally:
        server.stop()
        unregister_gp_ta(TA_UUID)
    assert server.device.leaks() == {}


# ----------------------------------------------------------------------------- the wire


def test_rpc_layout_on_the_wire(env: Env) -> None:
    """optee_rpc_cmd.h: func 12; value[0] IN = (INVOKE 0, d1, d2), value[1] IN = (d3, d4,
    cmd), value[2] INOUT = (sub_cmd, 0, 0), memref[3] INOUT of the buffer's size; d1..d4
    are the UUID's octets as little-endian words.  The supplicant's value[2].b is the out
    length, its ret the TA's result.

    Sources:
    OP-TEE/optee_os:core/include/optee_rpc_cmd.h@c725f8635b803d2f89d027a892a5dd8fd2f90c92;
    OP-TEE/optee_os:core/tee/tee_supp_plugin_rpc.c@11f5b73143c239af59f8a7d05353fea2d9822c91.
    """
    dev, _ctx, mem, _tmp = env
    sctx = dev.open_supplicant()
    got: list[object] = []

    def script(ta: GpTA) -> object:
        try:
            return invoke_supp_plugin(ta, PLUGIN, 7, 9)
        except GpTaError as exc:
            return exc.code

    t = threading.Thread(target=lambda: got.append(run(env, script)), daemon=True)
    t.start()
    slots = [(META, 0, 0, 0)] + [(0, 0, 0, 0)] * 4
    block = bytearray(HEAD.pack(0, 5) + b"".join(PARAM.pack(*p) for p in slots))
    sctx.ioctl(uapi.TEE_IOC_SUPPL_RECV, _buf(mem, block))
    func, num = HEAD.unpack_from(block)
    params = [PARAM.unpack_from(block, 8 + 32 * i) for i in range(num)]
    d = struct.unpack("<4I", PLUGIN.bytes)
    assert (func, num) == (_PLUGIN, 5)
    assert params[1:] == [
        (VALUE_IN, 0, d[0], d[1]),
        (VALUE_IN, d[2], d[3], 7),
        (VALUE_INOUT, 9, 0, 0),
        (MEMREF_INOUT, 0, 0, uapi.TEE_MEMREF_NULL),
    ]
    answer = [(META | VALUE_INOUT, params[0][1], 0, 0), *params[1:3]]
    answer += [(VALUE_INOUT, 9, 123, 0), params[4]]
    out = bytearray(HEAD.pack(NOT_SUPPORTED, 5) + b"".join(PARAM.pack(*p) for p in answer))
    sctx.ioctl(uapi.TEE_IOC_SUPPL_SEND, _buf(mem, out))
    t.join(5)
    assert got == [(0, TA_ORIGIN, NOT_SUPPORTED)]
    sctx.close()


def test_supplicant_checks_the_params(env: Env, supp: OpteeSupplicant) -> None:
    """plugin.c plugin_process: anything but value IN, value IN, value INOUT, memref INOUT
    is BAD_PARAMETERS; value[0].a other than OPTEE_RPC_SUPP_PLUGIN_INVOKE is
    NOT_SUPPORTED; a known UUID is found from the little-endian words.

    Sources:
    OP-TEE/optee_client:tee-supplicant/src/plugin.c@0fc6ef70a70d38628ded06590aefb7bc23364d99.
    """
    dev, _ctx, _mem, _tmp = env
    queue = attach_rpc(dev)
    supp.register_plugin(PLUGIN, lambda c, s, d: (0x42, b"ab"))
    d = struct.unpack("<4I", PLUGIN.bytes)

    def params(op: int = 0, last: int = MEMREF_INOUT) -> list[RpcParam]:
        return [
            RpcParam(VALUE_IN, op, d[0], d[1]),
            RpcParam(VALUE_IN, d[2], d[3], 5),
            RpcParam(VALUE_INOUT, 6, 0, 0),
            RpcParam(last, 0, 0),
        ]

    good = params()
    assert queue.request(_PLUGIN, good) == 0x42
    assert good[2].b == 2
    assert queue.request(_PLUGIN, params(op=1)) == NOT_SUPPORTED
    assert queue.request(_PLUGIN, params(last=6)) == BAD
    assert queue.request(_PLUGIN, params()[:3]) == BAD
    wrong = params()
    wrong[1].attr = VALUE_INOUT
    assert queue.request(_PLUGIN, wrong) == BAD


# ----------------------------------------------------------------------------- the API


def test_plugin_from_spec(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``UUID=module:function`` names a plugin the way the option to load one does.

    Sources:
    OP-TEE/optee_client:tee-supplicant/src/plugin.c@0fc6ef70a70d38628ded06590aefb7bc23364d99
    (plugin_load_all: a plugin is found by its UUID).
    """
    mod = types.ModuleType("qtee_test_plugin_mod")

    def echo(cmd: int, sub_cmd: int, data: bytes) -> tuple[int, bytes]:
        return 0, data

    mod.echo = echo  # type: ignore[attr-defined]
    mod.answer = 42  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "qtee_test_plugin_mod", mod)
    assert plugin_from_spec(f"{PLUGIN}=qtee_test_plugin_mod:echo") == (PLUGIN, echo)
    for bad in ("nope", f"{PLUGIN}=qtee_test_plugin_mod", f"{PLUGIN}=:echo"):
        with pytest.raises(ValueError, match="not UUID=MODULE:FUNCTION"):
            plugin_from_spec(bad)
    with pytest.raises(ValueError, match="is not a UUID"):
        plugin_from_spec("xyz=qtee_test_plugin_mod:echo")
    with pytest.raises(ValueError, match="not a callable"):
        plugin_from_spec(f"{PLUGIN}=qtee_test_plugin_mod:answer")
    with pytest.raises(UsageError, match="qtee_no_such_module_here: no such module"):
        plugin_from_spec(f"{PLUGIN}=qtee_no_such_module_here:echo")
    # A module name is looked for in the current directory first, as --ta-module's is.
    (tmp_path / "qtee_cwd_plugin.py").write_text("def double(c, s, d):\n    return 0, d * 2\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "qtee_cwd_plugin", raising=False)
    uuid, fn = plugin_from_spec(f"{PLUGIN}=qtee_cwd_plugin:double")
    assert uuid == PLUGIN and fn(0, 0, b"ab") == (0, b"abab")
    sys.modules.pop("qtee_cwd_plugin", None)


def test_argument_checks(env: Env, supp: OpteeSupplicant) -> None:
    """Wrong arguments name what was wrong (nothing reaches the supplicant).

    Sources: OP-TEE/optee_os:lib/libutee/tee_system_pta.c@1dd4fb00bcb5f721e2e2592231e06acf7d0be1fb
    (BAD_PARAMETERS for a NULL UUID or a length without a buffer; here a TypeError/ValueError
    names the argument).
    """
    with pytest.raises(TypeError, match="must be callable"):
        supp.register_plugin(PLUGIN, 5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="plugin UUID"):
        supp.register_plugin(7, lambda c, s, d: (0, b""))  # type: ignore[arg-type]
    dev, _ctx, _mem, tmp = env
    with pytest.raises(TypeError, match="must be callable"):  # before it opens teepriv (EBUSY)
        OpteeSupplicant(dev, tmp / "ta", tmp / "store", plugins={PLUGIN: 5})  # type: ignore[dict-item]

    def script(ta: GpTA) -> object:
        errors = []
        for args in (
            ("not a uuid", 0, 0, None),
            (PLUGIN, -1, 0, None),
            (PLUGIN, 0, 1 << 32, None),
            (PLUGIN, 0, 0, b"immutable"),
        ):
            try:
                invoke_supp_plugin(ta, *args)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc).split(" ", 1)[0])
        return errors

    assert run(env, script) == (0, TA_ORIGIN, ["plugin", "cmd", "sub_cmd", "buf"])
