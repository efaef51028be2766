"""The Python TAs of the peer C programs (tests/peer_tas.py), driven from Python exactly as
the unmodified C programs drive them, without building any C.

* quic-teec ``qcomteetest -l DIR USE_MO 0`` (quic/quic-teec:tests/ta_load.c@61f6fab):
  client env, IAppLoader (UID 3) loadFromBuffer (op 0, the file's bytes) or
  loadFromRegion (op 1, a memory object of the file's size), IAppController
  getAppObject (op 2), ISMCIExample add (op 0, ``{u32, u32}`` < 100 -> u32), then
  releases (no unload).  The image is the real ``smcinvoke_skeleton_ta64.mbn``, taken
  from the archive in ``../shared/peers`` (or ``$QTEE_PEERS``).
* optee_examples hosts (linaro-swg/optee_examples@934c7ed ``*/host/main.c``): the same
  commands and params through ``qtee.gp.TeecContext`` over an in-process ``OpteeDevice``;
  secure_storage's TA is loaded by LOAD_TA from ``<uuid>.ta`` through
  ``supplicant.OpteeSupplicant``, which also serves its REE FS.
"""

from __future__ import annotations

import hashlib
import os
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import qtee
from objects import QteeError
from qtee import OUT_OBJECT, Client, OpteeDevice, Out, QteeRoot, Result, SecureWorld
from qtee.gp import (
    TeecContext,
    TeecError,
    TeecMemFlag,
    TeecOperation,
    TeecOrigin,
    TeecRegisteredMemoryReference,
    TeecResult,
    TeecSession,
    TeecTempMemoryReference,
    TeecValue,
    param_types,
)
from qtee.gp import TeecParamType as P
from qtee.secure import APP_LOADER_UID
from qtee.secure._apps import ERROR_INVALID_BUFFER
from supplicant import OpteeSupplicant
from tests import peer_tas
from tests._paths import REPO
from tests.peer_tas import SKELETON_MBN, SKELETON_SHA256, HelloWorld, Hotp, Random, SecureStorage

# The import registered the peer TAs for the whole process; each test here registers them
# again for itself (``registered`` below), so that other tests' registries stay theirs.
peer_tas.unregister()

QUIC_TEEC = "quic-teec-61f6fab.tar.gz"
SKELETON_MEMBER = f"quic-teec/tests/ta/smcinvoke_skeleton_ta/{SKELETON_MBN}"
BAD = TeecResult.TEEC_ERROR_BAD_PARAMETERS
TA_ORIGIN = TeecOrigin.TEEC_ORIGIN_TRUSTED_APP


@pytest.fixture(autouse=True)
def registered() -> Iterator[None]:
    undo = peer_tas.register()
    try:
        yield
    finally:
        undo()


def peers_dir() -> Path:
    return Path(os.environ.get("QTEE_PEERS") or REPO.parent / "shared" / "peers")


@pytest.fixture(scope="module")
def skeleton_mbn() -> bytes:
    """The real ``smcinvoke_skeleton_ta64.mbn``, read from quic-teec's archive."""
    archive = peers_dir() / QUIC_TEEC
    if not archive.is_file():
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(f"{archive} is missing (required in CI)", pytrace=False)
        pytest.skip(f"no peer sources: {archive} is missing")
    with tarfile.open(archive) as tar:
        member = tar.extractfile(SKELETON_MEMBER)
        assert member is not None
        return member.read()


def test_the_skeleton_ta_is_registered_for_the_archive_s_mbn(skeleton_mbn: bytes) -> None:
    assert skeleton_mbn.startswith(b"\x7fELF")
    assert hashlib.sha256(skeleton_mbn).hexdigest() == SKELETON_SHA256


# ----------------------------------------------------------------------------- QTEE


def skeleton_add(client: Client, image: bytes, use_mo: bool, a: int, b: int) -> int:
    """qcomteetest ``-l DIR USE_MO 0``: load, getAppObject, add ``a + b``, release."""
    with client.client_env() as env, client.open_service(env, APP_LOADER_UID) as loader:
        if use_mo:  # SHM_ALLOC of the file's size, mmap, read the file into it
            with client.memory(len(image)) as mem:
                mem.view[:] = image
                (ctrl,) = loader.invoke(1, mem, OUT_OBJECT)  # loadFromRegion
        else:
            (ctrl,) = loader.invoke(0, image, OUT_OBJECT)  # loadFromBuffer
        with ctrl:
            (app,) = ctrl.invoke(2, OUT_OBJECT)  # getAppObject
            with app:
                (total,) = app.invoke(0, struct.pack("<II", a, b), Out(4))
    return int(struct.unpack("<I", total)[0])


@pytest.mark.qtee_modes("in-process", "server")
@pytest.mark.parametrize("use_mo", [False, True], ids=["buffer", "region"])
def test_qcomteetest_load_ta_from_the_real_mbn(
    qtee_client: Client, skeleton_mbn: bytes, use_mo: bool
) -> None:
    for a, b in [(3, 4), (99, 99), (0, 0)]:
        assert skeleton_add(qtee_client, skeleton_mbn, use_mo, a, b) == a + b


def test_the_skeleton_adds_as_csmciexample_does(qtee_client: Client, skeleton_mbn: bytes) -> None:
    """Saturated at UINT32_MAX; the op table is ISMCIExample's (other shapes: INVALID)."""
    assert skeleton_add(qtee_client, skeleton_mbn, False, 0xFFFF_FFFF, 1) == 0xFFFF_FFFF
    assert skeleton_add(qtee_client, skeleton_mbn, False, 0xFFFF_FFFE, 1) == 0xFFFF_FFFF
    assert skeleton_add(qtee_client, skeleton_mbn, False, 0xFFFF_FFFD, 1) == 0xFFFF_FFFE
    env = qtee_client.client_env()
    with env, qtee_client.open_service(env, APP_LOADER_UID) as loader:
        (ctrl,) = loader.invoke(0, skeleton_mbn, OUT_OBJECT)
        with ctrl:
            (app,) = ctrl.invoke(2, OUT_OBJECT)
            with app:
                for args in [(b"\0" * 4, Out(4)), (b"\0" * 8, Out(2)), (b"\0" * 8,)]:
                    with pytest.raises(QteeError) as exc:
                        app.invoke(0, *args)
                    assert exc.value.result == Result.ERROR_INVALID
                with pytest.raises(QteeError):
                    app.invoke(1, b"\0" * 8, Out(4))


def test_a_modified_mbn_is_invalid_buffer(qtee_client: Client, skeleton_mbn: bytes) -> None:
    tampered = bytearray(skeleton_mbn)
    tampered[5000] ^= 1
    env = qtee_client.client_env()
    with env, qtee_client.open_service(env, APP_LOADER_UID) as loader:
        with pytest.raises(QteeError) as exc:
            loader.invoke(0, bytes(tampered), OUT_OBJECT)
        assert exc.value.result == ERROR_INVALID_BUFFER


def test_qtee_serve_ta_module_peer_tas(skeleton_mbn: bytes) -> None:
    """``qtee serve --ta-module peer_tas`` run in tests/ serves the skeleton TA for the
    real image to another process's client; the tables are empty at the end."""
    sockdir = tempfile.mkdtemp(prefix="qtee-")
    sock = os.path.join(sockdir, "s")
    proc = subprocess.Popen(
        [sys.executable, "-m", "qtee", "serve", "--socket", sock, "--ta-module", "peer_tas"],
        cwd=REPO / "tests",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == f"serving on {sock}", proc.stderr
        with Client(qtee.connect(sock), workers=1) as client:
            assert skeleton_add(client, skeleton_mbn, False, 40, 2) == 42
            assert skeleton_add(client, skeleton_mbn, True, 40, 2) == 42
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for name in os.listdir(sockdir):
            os.unlink(os.path.join(sockdir, name))
        os.rmdir(sockdir)
    assert proc.returncode == 0, err
    assert out.splitlines()[-1] == "tables: empty"


# ----------------------------------------------------------------------------- OP-TEE


@pytest.fixture
def device() -> OpteeDevice:
    return OpteeDevice(SecureWorld(QteeRoot()))


@pytest.fixture
def session_of(device: OpteeDevice) -> Iterator[object]:
    """``session_of(uuid)``: a PUBLIC session on a fresh TEEC context, both closed after."""
    with TeecContext(device) as ctx:

        def open_(ta: uuid.UUID) -> TeecSession:
            return ctx.open_session(ta)

        yield open_


def test_hello_world(session_of: object) -> None:
    """hello_world/host/main.c: VALUE_INOUT 42, INC_VALUE, prints 43."""
    with session_of(HelloWorld.UUID) as sess:  # type: ignore[operator]
        op = TeecOperation(param_types(P.TEEC_VALUE_INOUT, 0, 0, 0), [TeecValue(42)])
        assert sess.invoke_command(HelloWorld.CMD_INC_VALUE, op) == TA_ORIGIN
        assert op.params[0].a == 43
        sess.invoke_command(HelloWorld.CMD_DEC_VALUE, op)
        sess.invoke_command(HelloWorld.CMD_DEC_VALUE, op)
        assert op.params[0].a == 41
        zero = TeecOperation(param_types(P.TEEC_VALUE_INOUT, 0, 0, 0), [TeecValue(0)])
        sess.invoke_command(HelloWorld.CMD_DEC_VALUE, zero)
        assert zero.params[0].a == 0xFFFF_FFFF  # u32
        for cmd, bad in [
            (2, op),
            (0, TeecOperation(param_types(P.TEEC_VALUE_INPUT, 0, 0, 0), [TeecValue()])),
        ]:
            with pytest.raises(TeecError) as exc:
                sess.invoke_command(cmd, bad)
            assert (exc.value.code, exc.value.origin) == (BAD, TA_ORIGIN)


def test_hello_world_open_takes_no_params(device: OpteeDevice) -> None:
    with TeecContext(device) as ctx, pytest.raises(TeecError) as exc:
        ctx.open_session(
            HelloWorld.UUID,
            operation=TeecOperation(param_types(P.TEEC_VALUE_INPUT, 0, 0, 0), [TeecValue()]),
        )
    assert (exc.value.code, exc.value.origin) == (BAD, TA_ORIGIN)


def test_random(session_of: object) -> None:
    """random/host/main.c: a 16-byte TEMP_OUTPUT memref, GENERATE, prints it."""
    with session_of(Random.UUID) as sess:  # type: ignore[operator]
        seen = set()
        for _ in range(3):
            buf = bytearray(16)
            op = TeecOperation(
                param_types(P.TEEC_MEMREF_TEMP_OUTPUT, 0, 0, 0), [TeecTempMemoryReference(buf)]
            )
            sess.invoke_command(Random.CMD_GENERATE, op)
            assert op.params[0].size == 16
            seen.add(bytes(buf))
        assert len(seen) == 3 and bytes(16) not in seen
        with pytest.raises(TeecError) as exc:
            sess.invoke_command(1, op)
        assert exc.value.code == BAD


RFC4226_KEY = b"12345678901234567890"
RFC4226_HOTP = [755224, 287082, 359152, 969429, 338314, 254676, 287922, 162583, 399871, 520489]


def test_hotp(session_of: object) -> None:
    """hotp/host/main.c: the RFC 4226 key through a TEMP_INPUT memref (a temporary shared
    memory), then GET_HOTP ten times: the RFC's test values."""
    with session_of(Hotp.UUID) as sess:  # type: ignore[operator]
        key = TeecOperation(
            param_types(P.TEEC_MEMREF_TEMP_INPUT, 0, 0, 0),
            [TeecTempMemoryReference(bytearray(RFC4226_KEY))],
        )
        sess.invoke_command(Hotp.CMD_REGISTER_SHARED_KEY, key)
        got = []
        op = TeecOperation(param_types(P.TEEC_VALUE_OUTPUT, 0, 0, 0), [TeecValue()])
        for _ in RFC4226_HOTP:
            sess.invoke_command(Hotp.CMD_GET_HOTP, op)
            got.append(op.params[0].a)
        assert got == RFC4226_HOTP


def test_hotp_sessions_are_separate_and_keys_checked(device: OpteeDevice) -> None:
    """Each session has its own key and counter; a registered shared memory works as the
    temporary one does; no key (or one under 10 bytes) is BAD_PARAMETERS."""
    get = TeecOperation(param_types(P.TEEC_VALUE_OUTPUT, 0, 0, 0), [TeecValue()])
    with TeecContext(device) as ctx:
        first, second = ctx.open_session(Hotp.UUID), ctx.open_session(Hotp.UUID)
        shm = ctx.allocate_shared_memory(len(RFC4226_KEY), TeecMemFlag.TEEC_MEM_INPUT)
        shm.buffer[:] = RFC4226_KEY
        whole = TeecOperation(
            param_types(P.TEEC_MEMREF_WHOLE, 0, 0, 0), [TeecRegisteredMemoryReference(shm)]
        )
        with pytest.raises(TeecError) as exc:
            first.invoke_command(Hotp.CMD_GET_HOTP, get)
        assert exc.value.code == BAD
        for sess in (first, second):
            sess.invoke_command(Hotp.CMD_REGISTER_SHARED_KEY, whole)
        first.invoke_command(Hotp.CMD_GET_HOTP, get)
        assert get.params[0].a == RFC4226_HOTP[1]  # the failed call counted too
        second.invoke_command(Hotp.CMD_GET_HOTP, get)
        assert get.params[0].a == RFC4226_HOTP[0]
        short = TeecOperation(
            param_types(P.TEEC_MEMREF_TEMP_INPUT, 0, 0, 0),
            [TeecTempMemoryReference(bytearray(9))],
        )
        second.invoke_command(Hotp.CMD_REGISTER_SHARED_KEY, short)
        with pytest.raises(TeecError):
            second.invoke_command(Hotp.CMD_GET_HOTP, get)
        shm.release()
        first.close()
        second.close()


# ----------------------------------------------------------------------------- secure_storage

TEST_OBJECT_SIZE = 7000
OBJ2_DATA = b"This is data stored in the secure storage.\n\0"  # sizeof(data): with the NUL


def storage_call(sess: TeecSession, cmd: int, obj_id: bytes, data: bytearray | None) -> int:
    """The host's read/write/delete_secure_object: the TEEC result (0 for success)."""
    types = [P.TEEC_MEMREF_TEMP_INPUT, 0, 0, 0]
    params: list[TeecTempMemoryReference] = [TeecTempMemoryReference(bytearray(obj_id))]
    if data is not None:
        out = cmd == SecureStorage.CMD_READ_RAW
        types[1] = P.TEEC_MEMREF_TEMP_OUTPUT if out else P.TEEC_MEMREF_TEMP_INPUT
        params.append(TeecTempMemoryReference(data))
    op = TeecOperation(param_types(*types), params)
    try:
        sess.invoke_command(cmd, op)
    except TeecError as exc:
        return int(exc.code)
    return 0


def secure_storage_host(sess: TeecSession) -> str:
    """secure_storage/host/main.c's main, checks and all; what it did with object#2."""
    obj1 = bytearray(b"\xa1" * TEST_OBJECT_SIZE)
    assert storage_call(sess, SecureStorage.CMD_WRITE_RAW, b"object#1", obj1) == 0
    read = bytearray(TEST_OBJECT_SIZE)
    assert storage_call(sess, SecureStorage.CMD_READ_RAW, b"object#1", read) == 0
    assert read == obj1
    assert storage_call(sess, SecureStorage.CMD_DELETE, b"object#1", None) == 0
    res = storage_call(sess, SecureStorage.CMD_READ_RAW, b"object#2", read)
    if res == TeecResult.TEEC_ERROR_ITEM_NOT_FOUND:
        data = bytearray(OBJ2_DATA)
        assert storage_call(sess, SecureStorage.CMD_WRITE_RAW, b"object#2", data) == 0
        return "created"
    assert res == 0
    assert storage_call(sess, SecureStorage.CMD_DELETE, b"object#2", None) == 0
    return "deleted"


@pytest.fixture
def tee_supplicant(device: OpteeDevice, tmp_path: Path) -> Iterator[Path]:
    """tee-supplicant with ``--ta-path`` holding the TA files, ``--fs-parent-path`` the
    returned directory."""
    ta_dir, fs = tmp_path / "ta", tmp_path / "tee"
    ta_dir.mkdir()
    fs.mkdir()
    assert peer_tas.write_ta_files(ta_dir) == [ta_dir / f"{SecureStorage.UUID}.ta"]
    with OpteeSupplicant(device, ta_dir, fs):
        yield fs


def test_secure_storage(device: OpteeDevice, tee_supplicant: Path) -> None:
    """Two runs of the host: the first creates object#2, the second finds and deletes it;
    the objects are files in the supplicant's REE FS, under the TA's UUID."""
    with TeecContext(device) as ctx:
        with ctx.open_session(SecureStorage.UUID) as sess:
            assert secure_storage_host(sess) == "created"
        stored = tee_supplicant / str(SecureStorage.UUID) / b"object#2".hex()
        assert stored.read_bytes() == OBJ2_DATA
        with ctx.open_session(SecureStorage.UUID) as sess:
            assert secure_storage_host(sess) == "deleted"
        assert not stored.exists()


def test_secure_storage_errors(device: OpteeDevice, tee_supplicant: Path) -> None:
    """READ_RAW into a short buffer: SHORT_BUFFER and the size needed; a missing object:
    ITEM_NOT_FOUND; other types BAD_PARAMETERS, other commands NOT_SUPPORTED."""
    with TeecContext(device) as ctx, ctx.open_session(SecureStorage.UUID) as sess:
        assert storage_call(sess, SecureStorage.CMD_WRITE_RAW, b"k", bytearray(b"12345")) == 0
        short = TeecOperation(
            param_types(P.TEEC_MEMREF_TEMP_INPUT, P.TEEC_MEMREF_TEMP_OUTPUT, 0, 0),
            [TeecTempMemoryReference(bytearray(b"k")), TeecTempMemoryReference(bytearray(2))],
        )
        with pytest.raises(TeecError) as exc:
            sess.invoke_command(SecureStorage.CMD_READ_RAW, short)
        assert exc.value.code == TeecResult.TEEC_ERROR_SHORT_BUFFER
        assert short.params[1].size == 5
        read = bytearray(10)
        assert storage_call(sess, SecureStorage.CMD_READ_RAW, b"k", read) == 0
        assert read[:5] == b"12345"
        assert storage_call(sess, SecureStorage.CMD_DELETE, b"k", None) == 0
        assert storage_call(sess, SecureStorage.CMD_DELETE, b"k", None) == (
            TeecResult.TEEC_ERROR_ITEM_NOT_FOUND
        )
        assert storage_call(sess, SecureStorage.CMD_WRITE_RAW, b"k", None) == BAD
        assert storage_call(sess, 9, b"k", None) == TeecResult.TEEC_ERROR_NOT_SUPPORTED


def test_secure_storage_exists_only_as_a_ta_file(device: OpteeDevice, tmp_path: Path) -> None:
    """Not built in: with no ``<uuid>.ta`` in the supplicant's TA path, the open is the
    supplicant's ITEM_NOT_FOUND (origin TEE)."""
    (tmp_path / "ta").mkdir()
    (tmp_path / "tee").mkdir()
    with (
        OpteeSupplicant(device, tmp_path / "ta", tmp_path / "tee"),
        TeecContext(device) as ctx,
        pytest.raises(TeecError) as exc,
    ):
        ctx.open_session(SecureStorage.UUID)
    assert (exc.value.code, exc.value.origin) == (
        TeecResult.TEEC_ERROR_ITEM_NOT_FOUND,
        TeecOrigin.TEEC_ORIGIN_TEE,
    )
