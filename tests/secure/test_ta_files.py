"""Real TA files select Python TAs (issue 14 item 7): ``qtee.register_ta_file``.

QTEE: IAppLoader loadFromBuffer (op 0) / loadFromRegion (op 1) / loadEmbedded (op 2, the
supplicant's TA autoload) of bytes whose SHA-256 is registered load that TrustedApp; any
other non-model image is IAppLoader's ``ERROR_INVALID_BUFFER`` (10, spec quic-teec.md
§5.3: the loader's error for a buffer it cannot take).

OP-TEE: LOAD_TA of ``<uuid>.ta`` through the supplicant selects the GpTA registered for
the file's SHA-256, or for its UUID (any bytes).  The errors are OP-TEE's, as
``ree_fs_ta_open`` answers them
(OP-TEE/optee_os:core/kernel/ree_fs_ta.c@0422b1952fecee1f3682963282d220f927fae45b):
the supplicant's own answer when it has no file (tee-supplicant: ITEM_NOT_FOUND), and
``TEE_ERROR_SECURITY`` when ``shdr_alloc_and_copy`` fails (a header cut short), when
``shdr_verify_signature`` fails (bad magic or a signature it cannot verify:
OP-TEE/optee_os:core/crypto/signed_hdr.c@0762e33c26e963f9c73806489217559d2fbce940) --
the model's "image it has no class for" -- and when the ``shdr_bootstrap_ta`` UUID is not
the one asked for (layout:
OP-TEE/optee_os:core/include/signed_hdr.h@0bee0f9c38cd5210b6489769de968cbda8f5e693).
"""

from __future__ import annotations

import hashlib
import re
import struct
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import qtee
from objects import QteeError, UsageError, op
from qtee import (
    OUT_OBJECT,
    Client,
    OpteeDevice,
    Out,
    QteeRoot,
    SecureWorld,
    gp_ta_image,
    register_loadable_ta,
    unregister_loadable_ta,
)
from qtee.gp import (
    TeecContext,
    TeecError,
    TeecOperation,
    TeecOrigin,
    TeecResult,
    TeecValue,
    param_types,
)
from qtee.gp import TeecParamType as P
from qtee.secure import (
    APP_LOADER_UID,
    GpParam,
    GpSession,
    GpTA,
    GpTaError,
    TaFileRegistration,
    TrustedApp,
    register_ta_file,
    ta_image,
)
from qtee.secure._apps import ERROR_ALREADY_LOADED, ERROR_INVALID_BUFFER, ERROR_METADATA_INVALID
from qtee.secure._tafiles import (
    SHDR_ENCRYPTED_TA,
    SHDR_MAGIC,
    SHDR_SUBKEY,
    SHDR_TA,
    SignedHeaderError,
    elf_extent,
    signed_header_uuid,
    signed_ta_image,
)
from supplicant import OpteeSupplicant, Supplicant, format_uuid
from tests._paths import REPO
from tests._tas import Adder

pytest_plugins = ["pytester"]

SECURITY = TeecResult.TEEC_ERROR_SECURITY
NOT_FOUND = TeecResult.TEEC_ERROR_ITEM_NOT_FOUND
TEE = TeecOrigin.TEEC_ORIGIN_TEE

#: A stand-in for a signed QTEE ELF: what matters is that it is not a model image.
ELF64 = (
    b"\x7fELF\x02\x01\x01"
    + bytes(9)
    + struct.pack("<HHIQQQIHHHHHH", 3, 0xB7, 1, 0, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    + struct.pack("<IIQQQQQQ", 1, 5, 0, 0, 0, 200, 200, 0x1000)
    + bytes(range(256))[: 200 - 120]
)


class Subtracter(TrustedApp):
    @op(0, ib=(8,), ob=(4,))
    def add(self, pair: bytes) -> bytes:
        a, b = struct.unpack("<II", pair)
        return struct.pack("<I", (a - b) & 0xFFFF_FFFF)


# ----------------------------------------------------------------------------- QTEE


def load(client: Client, image: bytes | qtee.MemoryObject) -> int:
    """Load ``image`` (bytes: loadFromBuffer; a memory object: loadFromRegion), add 40 + 2
    through getAppObject, release everything (which unloads): the sum."""
    with client.client_env() as env, client.open_service(env, APP_LOADER_UID) as loader:
        if isinstance(image, bytes):
            (ctrl,) = loader.invoke(0, image, OUT_OBJECT)
        else:
            (ctrl,) = loader.invoke(1, image, OUT_OBJECT)
        with ctrl:
            (app,) = ctrl.invoke(2, OUT_OBJECT)
            with app:
                (total,) = app.invoke(0, struct.pack("<II", 40, 2), Out(4))
    return int(struct.unpack("<I", total)[0])


def load_error(client: Client, image: bytes) -> int:
    with (
        client.client_env() as env,
        client.open_service(env, APP_LOADER_UID) as loader,
        pytest.raises(QteeError) as exc,
    ):
        loader.invoke(0, image, OUT_OBJECT)
    return exc.value.result


@pytest.mark.parametrize("form", ["hex", "HEX", "bytes", "path"])
def test_a_real_image_loads_the_ta_registered_for_its_sha256(
    qtee_client: Client, tmp_path: Path, form: str
) -> None:
    digest = hashlib.sha256(ELF64).digest()
    path = tmp_path / "adder.mbn"
    path.write_bytes(ELF64)
    key = {"hex": digest.hex(), "HEX": digest.hex().upper(), "bytes": digest}.get(form)
    reg = register_ta_file(Adder, path) if form == "path" else register_ta_file(Adder, sha256=key)
    with reg:
        assert (reg.world, reg.kind, reg.key, reg.cls) == ("qtee", "sha256", digest, Adder)
        assert reg.name == f"sha256:{digest.hex()}"
        assert reg.size == (len(ELF64) if form == "path" else None)
        assert load(qtee_client, ELF64) == 42
    assert load_error(qtee_client, ELF64) == ERROR_INVALID_BUFFER


def test_an_image_that_matches_nothing_is_invalid_buffer(qtee_client: Client) -> None:
    """IAppLoader's INVALID_BUFFER (10) for bytes it cannot take; model images keep
    their own errors (a name nobody registered: METADATA_INVALID, 13)."""
    with register_ta_file(Adder, sha256=hashlib.sha256(ELF64).digest()):
        assert load_error(qtee_client, ELF64 + b"\x01") == ERROR_INVALID_BUFFER
        assert load_error(qtee_client, b"") == ERROR_INVALID_BUFFER
        assert load_error(qtee_client, b"QTEETA") == ERROR_INVALID_BUFFER  # a cut model header
        assert load_error(qtee_client, ta_image("nobody.registered")) == ERROR_METADATA_INVALID
    assert ERROR_INVALID_BUFFER == 10


@pytest.mark.qtee_ta("files.model", Subtracter)
def test_model_images_keep_working_beside_real_ones(qtee_client: Client) -> None:
    with register_ta_file(Adder, sha256=hashlib.sha256(ELF64).digest()):
        assert load(qtee_client, ta_image("files.model")) == 38
        assert load(qtee_client, ELF64) == 42


def region_load(client: Client, data: bytes, size: int = 4096) -> int:
    """loadFromRegion of a ``size``-byte memory object that starts with ``data``: the
    sum, or the QteeError result."""
    with client.memory(size) as mem:
        mem.view[: len(data)] = data
        try:
            return load(client, mem)
        except QteeError as exc:
            return exc.result


def test_load_from_region_of_a_memory_object_rounded_up(
    qtee_client: Client, tmp_path: Path
) -> None:
    """loadFromRegion maps the whole memory object: one longer than the file only by zero
    bytes holds the same image -- past the length of a file registered by path, or past
    the end of an ELF's contents (headers, tables, segments) for any registration."""
    assert elf_extent(ELF64) == len(ELF64)
    assert elf_extent(b"not an ELF") is None
    blob = b"not an ELF, just bytes"
    (tmp_path / "elf.mbn").write_bytes(ELF64)
    (tmp_path / "blob.mbn").write_bytes(blob)
    with register_ta_file(Adder, sha256=hashlib.sha256(ELF64).digest()):
        assert region_load(qtee_client, ELF64, len(ELF64)) == 42
        assert region_load(qtee_client, ELF64) == 42
        assert region_load(qtee_client, ELF64 + b"\x01") == ERROR_INVALID_BUFFER
    with register_ta_file(Adder, sha256=hashlib.sha256(blob).digest()):
        assert region_load(qtee_client, blob, len(blob)) == 42
        assert region_load(qtee_client, blob) == ERROR_INVALID_BUFFER  # no length known
    with register_ta_file(Adder, tmp_path / "blob.mbn"):
        assert region_load(qtee_client, blob) == 42
        assert region_load(qtee_client, blob + b"\x01") == ERROR_INVALID_BUFFER
    with register_ta_file(Adder, tmp_path / "elf.mbn"):
        assert region_load(qtee_client, ELF64) == 42


def test_a_loaded_file_is_loaded_once_at_a_time(qtee_client: Client) -> None:
    with (
        register_ta_file(Adder, sha256=hashlib.sha256(ELF64).hexdigest()),
        qtee_client.client_env() as env,
        qtee_client.open_service(env, APP_LOADER_UID) as loader,
    ):
        (ctrl,) = loader.invoke(0, ELF64, OUT_OBJECT)
        with ctrl, pytest.raises(QteeError) as exc:
            loader.invoke(0, ELF64, OUT_OBJECT)
        assert exc.value.result == ERROR_ALREADY_LOADED
        (again,) = loader.invoke(0, ELF64, OUT_OBJECT)  # released: unloaded
        again.release()


def test_ta_autoload_serves_a_real_mbn(qtee_client: Client, tmp_path: Path) -> None:
    """The supplicant's TA autoload reads ``<UUID>.mbn`` from disk; loadEmbedded of the
    UUID selects the TA registered for those bytes."""
    raw = uuid.UUID("0fd0d5b2-54e4-4a4c-a13d-0b2c1c3f9a11").bytes
    (tmp_path / f"{format_uuid(raw)}.mbn").write_bytes(ELF64)
    device = qtee_client.device
    with (
        register_ta_file(Adder, tmp_path / f"{format_uuid(raw)}.mbn"),
        Supplicant(device, ta_dirs=[tmp_path], time_service=False),
        qtee_client.client_env() as env,
        qtee_client.open_service(env, APP_LOADER_UID) as loader,
    ):
        (ctrl,) = loader.invoke(2, raw, OUT_OBJECT)
        with ctrl:
            (app,) = ctrl.invoke(2, OUT_OBJECT)
            with app:
                assert app.invoke(0, struct.pack("<II", 1, 2), Out(4)) == [b"\x03\0\0\0"]


# ----------------------------------------------------------------------------- registry


def test_registrations_shadow_and_unregister_in_any_order(qtee_client: Client) -> None:
    digest = hashlib.sha256(ELF64).digest()
    first = register_ta_file(Adder, sha256=digest)
    second = register_ta_file(Subtracter, sha256=digest)
    try:
        assert load(qtee_client, ELF64) == 38  # the later one shadows
        first.unregister()
        assert load(qtee_client, ELF64) == 38
        first.unregister()  # idempotent
        second.unregister()
        assert load_error(qtee_client, ELF64) == ERROR_INVALID_BUFFER
        third = register_ta_file(Adder, sha256=digest)
        fourth = register_ta_file(Subtracter, sha256=digest)
        fourth.unregister()
        assert load(qtee_client, ELF64) == 42  # the earlier one shows again
        third.unregister()
    finally:
        first.unregister()
        second.unregister()


def test_bad_registrations(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        register_ta_file(Adder)  # a QTEE file needs a key
    with pytest.raises(UsageError):
        register_ta_file(Adder, sha256="abc")
    with pytest.raises(UsageError):
        register_ta_file(Adder, sha256=ELF64)  # the image, not its digest
    with pytest.raises(UsageError):
        register_ta_file(Adder, tmp_path, sha256=bytes(32))
    with pytest.raises(TypeError):
        register_ta_file(int)  # type: ignore[arg-type]
    with pytest.raises(OSError):
        register_ta_file(Adder, tmp_path / "missing.mbn")

    class NoUuid(GpTA):
        pass

    with pytest.raises(UsageError):
        register_ta_file(NoUuid)
    other = tmp_path / f"{uuid.UUID(int=5)}.ta"
    other.write_bytes(b"anything")
    with pytest.raises(UsageError, match="is the file of TA"):
        register_ta_file(Echo, other)
    foreign = tmp_path / "foreign.ta"
    foreign.write_bytes(signed_ta_image(uuid.UUID(int=5)))
    with pytest.raises(UsageError, match="is signed for TA"):
        register_ta_file(Echo, foreign)


def test_the_marker_registers_for_one_test_only(pytester: pytest.Pytester) -> None:
    """``@pytest.mark.qtee_ta_file``: registered while the test runs, gone after it."""
    pytester.makepyfile(
        test_marked="""
import hashlib, pytest
from qtee.secure import TrustedApp
from qtee.secure._tafiles import lookup_by_sha256

class A(TrustedApp):
    pass

IMAGE = b"a real image"

@pytest.mark.qtee_ta_file(A, sha256=hashlib.sha256(IMAGE).hexdigest())
def test_marked():
    assert lookup_by_sha256("qtee", IMAGE)[0] is A

@pytest.mark.qtee_ta_file(A, "image.bin")
def test_by_path():
    assert lookup_by_sha256("qtee", IMAGE)[0] is A

def test_after():
    assert lookup_by_sha256("qtee", IMAGE) is None
"""
    )
    (pytester.path / "image.bin").write_bytes(b"a real image")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--strict-markers")
    result.assert_outcomes(passed=3)


# ----------------------------------------------------------------------------- OP-TEE

ECHO_UUID = uuid.UUID("7a1c3e5f-0b2d-4c6e-8f90-a1b2c3d4e5f6")


class Echo(GpTA):
    """Adds value[0].a and .b into value[1].a; value[1].b says which class answered."""

    UUID = ECHO_UUID
    TAG = 1

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
        if cmd != 0:
            raise GpTaError(TeecResult.TEEC_ERROR_NOT_SUPPORTED)
        params[1].a = params[0].a + params[0].b
        params[1].b = self.TAG


class EchoToo(Echo):
    TAG = 2


class Elsewhere(GpTA):
    UUID = uuid.UUID(int=5)


@pytest.fixture
def optee(tmp_path: Path) -> Iterator[tuple[OpteeDevice, Path]]:
    device = OpteeDevice(SecureWorld(QteeRoot()))
    (tmp_path / "ta").mkdir()
    (tmp_path / "store").mkdir()
    with OpteeSupplicant(device, tmp_path / "ta", tmp_path / "store"):
        yield device, tmp_path / "ta"


def run_echo(device: OpteeDevice, ta: uuid.UUID = ECHO_UUID) -> tuple[int, int]:
    """Open a session to ``ta`` and invoke 40 + 2: ``(sum, TAG)``."""
    with TeecContext(device) as ctx, ctx.open_session(ta) as session:
        operation = TeecOperation(
            param_types(P.TEEC_VALUE_INPUT, P.TEEC_VALUE_OUTPUT, 0, 0),
            [TeecValue(40, 2), TeecValue()],
        )
        session.invoke_command(0, operation)
        out = operation.params[1]
        assert isinstance(out, TeecValue)
        return out.a, out.b


def open_error(device: OpteeDevice, ta: uuid.UUID = ECHO_UUID) -> tuple[int, int]:
    with TeecContext(device) as ctx, pytest.raises(TeecError) as exc:
        ctx.open_session(ta)
    return exc.value.code, exc.value.origin


@pytest.mark.parametrize(
    "image",
    [signed_ta_image(ECHO_UUID), signed_ta_image(ECHO_UUID, b"\x7fELF\x02\x01 other bytes")],
)
def test_load_ta_of_a_uuid_file_selects_the_ta_registered_for_the_uuid(
    optee: tuple[OpteeDevice, Path], image: bytes
) -> None:
    """Any signed ``<uuid>.ta`` (SHDR_MAGIC first) loads the class registered for its UUID."""
    device, ta_dir = optee
    (ta_dir / f"{ECHO_UUID}.ta").write_bytes(image)
    with register_ta_file(Echo) as reg:
        assert (reg.world, reg.kind, reg.key) == ("optee", "uuid", ECHO_UUID.bytes)
        assert reg.name == f"uuid:{ECHO_UUID}"
        assert run_echo(device) == (42, 1)
    assert open_error(device) == (SECURITY, TEE)  # nobody's image now


@pytest.mark.parametrize("image", [b"\0", b"junk\n", b"\x7fELF\x02\x01", b"\0" * 10])
def test_a_uuid_registration_refuses_a_file_that_is_not_signed(
    optee: tuple[OpteeDevice, Path], image: bytes
) -> None:
    """OP-TEE/optee_os:core/crypto/signed_hdr.c ``shdr_verify_signature`` (master): a TA
    file whose first word is not SHDR_MAGIC fails verification (``ree_fs_ta_open`` ->
    TEE_ERROR_SECURITY, origin TEE), even with a class registered for its UUID."""
    device, ta_dir = optee
    (ta_dir / f"{ECHO_UUID}.ta").write_bytes(image)
    with register_ta_file(Echo):
        assert open_error(device) == (SECURITY, TEE)


def test_load_ta_by_sha256_is_that_file_only(optee: tuple[OpteeDevice, Path]) -> None:
    device, ta_dir = optee
    image = signed_ta_image(ECHO_UUID, b"\x7fELF version 1")
    path = ta_dir / f"{ECHO_UUID}.ta"
    path.write_bytes(image)
    with register_ta_file(EchoToo, path):
        assert run_echo(device) == (42, 2)
        with register_ta_file(Echo):  # by UUID: the fallback for other bytes
            assert run_echo(device) == (42, 2)  # the file's own registration wins
            path.write_bytes(signed_ta_image(ECHO_UUID, b"\x7fELF version 2"))
            assert run_echo(device) == (42, 1)
        assert open_error(device) == (SECURITY, TEE)  # not the registered bytes
    with register_ta_file(EchoToo, sha256=hashlib.sha256(b"plain").hexdigest()):
        path.write_bytes(b"plain")
        assert run_echo(device) == (42, 2)


def test_load_ta_errors_are_optee_s(optee: tuple[OpteeDevice, Path]) -> None:
    """No file: ITEM_NOT_FOUND (the supplicant's).  A signed header naming another UUID,
    one cut short, an image registered for another TA's UUID, an image of no registered
    TA: TEE_ERROR_SECURITY, origin TEE."""
    device, ta_dir = optee
    path = ta_dir / f"{ECHO_UUID}.ta"
    assert open_error(device) == (NOT_FOUND, TEE)
    path.write_bytes(b"\x7fELF unsigned, unknown")
    assert open_error(device) == (SECURITY, TEE)
    with register_ta_file(Echo):
        path.write_bytes(signed_ta_image(uuid.UUID(int=5)))
        assert open_error(device) == (SECURITY, TEE)
        path.write_bytes(signed_ta_image(ECHO_UUID)[:40])
        assert open_error(device) == (SECURITY, TEE)
        path.write_bytes(struct.pack("<I", SHDR_MAGIC))
        assert open_error(device) == (SECURITY, TEE)
    path.write_bytes(b"belongs to Elsewhere")
    with register_ta_file(Elsewhere, sha256=hashlib.sha256(b"belongs to Elsewhere").digest()):
        assert open_error(device) == (SECURITY, TEE)
    assert (int(SECURITY), int(NOT_FOUND)) == (0xFFFF000F, 0xFFFF0008)


def test_model_images_for_loadable_tas_are_unchanged(optee: tuple[OpteeDevice, Path]) -> None:
    """``gp_ta_image`` files: ``register_loadable_ta`` as before; a UUID registration
    also takes them; with neither, ITEM_NOT_FOUND; a model image naming another UUID is
    SECURITY even for a UUID registration."""
    device, ta_dir = optee
    path = ta_dir / f"{ECHO_UUID}.ta"
    path.write_bytes(gp_ta_image(ECHO_UUID))
    assert open_error(device) == (NOT_FOUND, TEE)
    register_loadable_ta(EchoToo)
    try:
        assert run_echo(device) == (42, 2)
    finally:
        unregister_loadable_ta(ECHO_UUID)
    with register_ta_file(Echo):
        assert run_echo(device) == (42, 1)
        path.write_bytes(gp_ta_image(uuid.UUID(int=5)))
        assert open_error(device) == (SECURITY, TEE)


# ----------------------------------------------------------------------------- headers


def _shdr(img_type: int, img_size: int, hash_size: int = 32, sig_size: int = 256) -> bytes:
    head = struct.pack("<4I2H", SHDR_MAGIC, img_type, img_size, 0x70414930, hash_size, sig_size)
    return head + bytes(hash_size + sig_size)


def test_signed_header_uuid() -> None:
    """``struct shdr`` (+ hash + signature), subkeys walked, then ``shdr_bootstrap_ta``."""
    ta = uuid.UUID("8aaaf200-2450-11e4-abe2-0002a5d5c51b")
    assert signed_header_uuid(signed_ta_image(ta)) == ta
    assert signed_header_uuid(b"\x7fELF") is None
    assert signed_header_uuid(b"") is None
    assert signed_header_uuid(_shdr(SHDR_TA, 4) + b"\x7fELF") is None  # UUID only in ELF
    enc = _shdr(SHDR_ENCRYPTED_TA, 0) + struct.pack("<16sI", ta.bytes, 1)
    assert signed_header_uuid(enc) == ta
    name = b"ns-name"
    subkey_body = struct.pack("<16s5I", bytes(16), len(name), 1, 0, 0, 0)
    chain = _shdr(SHDR_SUBKEY, len(subkey_body)) + subkey_body + name + signed_ta_image(ta)
    assert signed_header_uuid(chain) == ta
    for bad in (
        struct.pack("<I", SHDR_MAGIC),
        _shdr(1, 0)[:100],
        _shdr(1, 0),  # no bootstrap header after it
        _shdr(7, 0) + bytes(20),  # unknown image type
        _shdr(SHDR_SUBKEY, 1000),
    ):
        with pytest.raises(SignedHeaderError):
            signed_header_uuid(bad)


def test_registration_records_are_frozen() -> None:
    reg = register_ta_file(Adder, sha256=bytes(32))
    with reg, pytest.raises(AttributeError):
        reg.cls = Subtracter  # type: ignore[misc]
    assert isinstance(reg, TaFileRegistration)


# ----------------------------------------------------------------------------- README

README = REPO / "README.md"


def test_the_readme_ta_module_registers_on_import(tmp_path: Path) -> None:
    """The README's "Real TA files" module, imported as ``--ta-module my_tas`` would."""
    section = README.read_text().split("### Real TA files", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None
    (tmp_path / "my_tas.py").write_text(match.group(1))
    check = (
        "import my_tas\n"
        "from qtee.secure._tafiles import _TABLES, lookup_by_uuid\n"
        "assert lookup_by_uuid(my_tas.HelloWorld.UUID) is my_tas.HelloWorld\n"
        "(regs,) = _TABLES[('qtee', 'sha256')].values()\n"
        "assert regs[-1].cls is my_tas.SmciExample\n"
        "assert regs[-1].key.hex().startswith('a225fb554c2abdf8')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", check],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
