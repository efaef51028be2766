"""Signed model TA images: OP-TEE's ``struct shdr`` layout for GP TAs and QTEE's model
layout, each verified at load with the device's key (``ta_key``).

Sources: ``OP-TEE/optee_os:core/crypto/signed_hdr.c@0762e33c26e963f9c73806489217559d2fbce940``
(``shdr_verify_signature``: magic, RSA algorithm, hash size, signature over the hash, every
failure TEE_ERROR_SECURITY) and
``OP-TEE/optee_os:scripts/sign_encrypt.py@9fe1ee2b62a00fbccf5e32323e4a32d3a3b4a1fe`` (the
header fields, the SHA-256 over header + bootstrap header + image, RSASSA PKCS#1 v1.5 or
PSS with a 32-byte salt over that prehashed digest); QTEE's IAppLoader errors are
``../shared/spec/quic-teec.md`` §5.3 (ELF_SIGNATURE_ERROR 12, INVALID_BUFFER 10).
"""

from __future__ import annotations

import hashlib
import struct
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from objects import QteeError, UsageError
from qtee import (
    Device,
    OpteeContext,
    OpteeDevice,
    gp_ta_image,
    register_loadable_ta,
    ta_image,
    unregister_loadable_ta,
)
from qtee.addrspace import CheckedMemory
from qtee.client import OUT_OBJECT, Client, ObjRef
from qtee.gp import Cred, TeecOrigin, TeecResult
from qtee.secure import (
    APP_LOADER_UID,
    TEE_ALG_RSASSA_PKCS1_PSS_MGF1_SHA256,
    TEE_ALG_RSASSA_PKCS1_V1_5_SHA256,
    IAppLoader,
    QteeRoot,
    SecureWorld,
    TrustedApp,
    default_model_key,
)
from qtee.secure._tafiles import signed_header_uuid
from supplicant import OpteeSupplicant
from tests.optee.test_optee_supplicant import LOADABLE_UUID, Loadable, close_session, open_session

SHDR = struct.Struct("<4I2H")
BOOT = struct.Struct("<16sI")
SECURITY = (TeecResult.TEEC_ERROR_SECURITY, TeecOrigin.TEEC_ORIGIN_TEE)
SIG_ERR, BUF_ERR = IAppLoader.ERROR_ELF_SIGNATURE_ERROR, IAppLoader.ERROR_INVALID_BUFFER


class Echo(TrustedApp):
    name = "signed.echo"


Env = tuple[OpteeDevice, OpteeContext, CheckedMemory, Path]


@pytest.fixture
def optee(tmp_path: Path) -> Iterator[Env]:
    """An OP-TEE device with tee-supplicant serving ``tmp_path/ta``; the loadable TA
    ``Loadable`` exists only as an image there."""
    register_loadable_ta(Loadable)
    (tmp_path / "ta").mkdir()
    (tmp_path / "store").mkdir()
    mem = CheckedMemory()
    dev = OpteeDevice(SecureWorld(QteeRoot()), memory=mem, cred=lambda: Cred(euid=0, egid=0))
    ctx = dev.open()
    supp = OpteeSupplicant(dev, tmp_path / "ta", tmp_path / "store", workers=1)
    try:
        yield dev, ctx, mem, tmp_path
    finally:
        supp.stop()
        ctx.close()
        unregister_loadable_ta(LOADABLE_UUID)
    assert dev.leaks() == {}


@pytest.fixture(scope="module")
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def flips(image: bytes) -> list[tuple[int, bytes]]:
    """One flipped bit in every byte of ``image`` (bit ``i % 8`` of byte ``i``)."""
    out = []
    for i in range(len(image)):
        bad = bytearray(image)
        bad[i] ^= 1 << (i % 8)
        out.append((i, bytes(bad)))
    return out


# ----------------------------------------------------------------------------- OP-TEE layout


@pytest.mark.parametrize(
    "algo", [TEE_ALG_RSASSA_PKCS1_V1_5_SHA256, TEE_ALG_RSASSA_PKCS1_PSS_MGF1_SHA256]
)
def test_gp_ta_image_is_a_struct_shdr_signed_image(algo: int) -> None:
    """signed_hdr.c / sign_encrypt.py: shdr (magic 0x4f545348, SHDR_BOOTSTRAP_TA, img_size,
    algo, hash_size 32, sig_size = the modulus' bytes), the SHA-256 of shdr + bootstrap
    header + image, the RSASSA signature of that digest (PKCS#1 v1.5 or PSS salt 32),
    then ``shdr_bootstrap_ta`` (UUID octets, version) and the image."""
    ta = uuid.UUID("8aaaf200-2450-11e4-abe2-0002a5d5c51b")
    image = gp_ta_image(ta, b"payload", algo=algo)
    magic, img_type, img_size, got_algo, hash_size, sig_size = SHDR.unpack_from(image)
    assert (magic, img_type, got_algo, hash_size, sig_size) == (0x4F545348, 1, algo, 32, 256)
    digest, sig = image[20:52], image[52:308]
    boot, body = image[308:328], image[328:]
    assert len(body) == img_size and body.endswith(b"payload")
    assert BOOT.unpack(boot) == (ta.bytes, 0)
    assert digest == hashlib.sha256(image[:20] + boot + body).digest()
    pub = default_model_key().public_key()
    pre = utils.Prehashed(hashes.SHA256())
    if algo == TEE_ALG_RSASSA_PKCS1_V1_5_SHA256:
        pub.verify(sig, digest, padding.PKCS1v15(), pre)
    else:
        pub.verify(sig, digest, padding.PSS(padding.MGF1(hashes.SHA256()), 32), pre)
    assert signed_header_uuid(image) == ta  # the real-file parser reads the same header


def test_gp_ta_image_checks_its_key() -> None:
    """OP-TEE's TA signature is RSA only (signed_hdr.c ``TEE_MAIN_ALGO_RSA``)."""
    with pytest.raises(UsageError, match="RSA"):
        gp_ta_image(LOADABLE_UUID, key=ec.generate_private_key(ec.SECP256R1()))  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="algorithm"):
        gp_ta_image(LOADABLE_UUID, algo=0x70004041)


def test_optee_signed_image_loads_and_any_flipped_bit_is_security(optee: Env) -> None:
    """ree_fs_ta.c / signed_hdr.c: a bit flipped anywhere -- header fields, hash,
    signature, bootstrap header (UUID), image -- fails the header checks, the signature
    or the hash: open_session is TEE_ERROR_SECURITY, origin TEE; the intact image
    loads."""
    _dev, ctx, mem, tmp = optee
    path = tmp / "ta" / f"{LOADABLE_UUID}.ta"
    image = gp_ta_image(LOADABLE_UUID, b"\x7fELF model payload")
    bad = flips(image)
    # Every header byte and every 7th byte after it (the whole image costs a session each).
    for i, flipped in [b for b in bad if b[0] < 60 or b[0] % 7 == 0]:
        path.write_bytes(flipped)
        assert open_session(ctx, mem, LOADABLE_UUID) == (0, *SECURITY), i
    path.write_bytes(image)
    session, ret, origin = open_session(ctx, mem, LOADABLE_UUID)
    assert (ret, origin) == (0, TeecOrigin.TEEC_ORIGIN_TRUSTED_APP)
    close_session(ctx, session)


def test_optee_every_flipped_bit_is_refused_by_the_loader(optee: Env) -> None:
    """The same for every byte of the image, on the LOAD_TA path's image check (the
    class lookup that follows tee-supplicant's answer): TEE_ERROR_SECURITY each time."""
    from qtee._optee.ta_image import _image_class
    from qtee.secure import GpTaError

    dev = optee[0]
    image = gp_ta_image(LOADABLE_UUID, b"\x7fELF model payload")
    tas, key = dev.runtime.world.tas, dev.runtime.ta_key
    assert _image_class(LOADABLE_UUID.bytes, image, tas, key) is not None
    for i, flipped in flips(image):
        with pytest.raises(GpTaError) as exc:
            _image_class(LOADABLE_UUID.bytes, flipped, tas, key)
        assert exc.value.code == TeecResult.TEEC_ERROR_SECURITY, i


def test_optee_device_key_is_replaceable(optee: Env, other_key: rsa.RSAPrivateKey) -> None:
    """A device trusts one key (its build's, as OP-TEE's ``ta_pub_key``): after
    ``runtime.ta_key = other`` an image signed with the default key is SECURITY and one
    signed with ``other`` loads, PKCS#1 v1.5 or PSS."""
    dev, ctx, mem, tmp = optee
    path = tmp / "ta" / f"{LOADABLE_UUID}.ta"
    dev.runtime.ta_key = other_key
    assert dev.runtime.world.ta_key is other_key
    path.write_bytes(gp_ta_image(LOADABLE_UUID))
    assert open_session(ctx, mem, LOADABLE_UUID) == (0, *SECURITY)
    for algo in (TEE_ALG_RSASSA_PKCS1_V1_5_SHA256, TEE_ALG_RSASSA_PKCS1_PSS_MGF1_SHA256):
        path.write_bytes(gp_ta_image(LOADABLE_UUID, key=other_key, algo=algo))
        session, ret, _ = open_session(ctx, mem, LOADABLE_UUID)
        assert ret == 0
        close_session(ctx, session)


def test_unsigned_or_foreign_model_images_are_security(optee: Env) -> None:
    """A loadable TA exists only as a signed image: the old unsigned layout (magic +
    name + payload), or a QTEE image naming its UUID but signed by another key, is
    TEE_ERROR_SECURITY."""
    _dev, ctx, mem, tmp = optee
    path = tmp / "ta" / f"{LOADABLE_UUID}.ta"
    name = str(LOADABLE_UUID).encode()
    path.write_bytes(b"QTEETA\x00\x01" + struct.pack("<H", len(name)) + name)
    assert open_session(ctx, mem, LOADABLE_UUID) == (0, *SECURITY)
    forged = ta_image(str(LOADABLE_UUID), key=rsa.generate_private_key(65537, 1024))
    path.write_bytes(forged)
    assert open_session(ctx, mem, LOADABLE_UUID) == (0, *SECURITY)


# ----------------------------------------------------------------------------- QTEE layout


def load_result(client: Client, env: ObjRef, image: bytes) -> int:
    """0 if loadFromBuffer takes ``image`` (the controller is released), else its error."""
    with client.open_service(env, APP_LOADER_UID) as loader:
        try:
            (ctrl,) = loader.invoke(0, image, OUT_OBJECT)
        except QteeError as exc:
            return exc.result
    ctrl.release()
    return 0


@pytest.mark.qtee_ta(Echo.name, Echo)
def test_qtee_any_flipped_bit_is_an_apploader_error(qtee_client: Client, qtee_env: ObjRef) -> None:
    """IAppLoader (quic-teec.md §5.3): a flipped bit in the magic makes the buffer no
    image (INVALID_BUFFER, 10); anywhere else -- lengths, algorithm, name, payload,
    signature -- the signature over everything before it fails, ELF_SIGNATURE_ERROR
    (12), unless a length no longer adds up (INVALID_BUFFER).  The intact image loads."""
    image = ta_image(Echo.name, b"some payload")
    assert load_result(qtee_client, qtee_env, image) == 0
    name_end = 20 + len(Echo.name)
    for i, flipped in flips(image):
        got = load_result(qtee_client, qtee_env, flipped)
        if i < 8:
            assert got == BUF_ERR, i
        elif i >= name_end:  # payload and signature
            assert got == SIG_ERR, i
        else:
            assert got in (BUF_ERR, SIG_ERR), i


@pytest.mark.qtee_ta(Echo.name, Echo)
def test_qtee_device_key_is_replaceable_rsa_or_ecdsa(
    qtee_device: Device, qtee_client: Client, qtee_env: ObjRef
) -> None:
    """``world.ta_key``: the device trusts only the key it is given; RSA (PKCS#1 v1.5,
    PSS) and P-256 ECDSA keys sign QTEE model images.  ELF_SIGNATURE_ERROR for the
    others."""
    ec_key = ec.generate_private_key(ec.SECP256R1())
    qtee_device.world.ta_key = ec_key
    assert load_result(qtee_client, qtee_env, ta_image(Echo.name)) == SIG_ERR
    assert load_result(qtee_client, qtee_env, ta_image(Echo.name, key=ec_key)) == 0
    rsa_key = rsa.generate_private_key(65537, 1024)
    qtee_device.world.ta_key = rsa_key
    assert load_result(qtee_client, qtee_env, ta_image(Echo.name, key=ec_key)) == SIG_ERR
    pss = ta_image(Echo.name, key=rsa_key, algo=TEE_ALG_RSASSA_PKCS1_PSS_MGF1_SHA256)
    assert load_result(qtee_client, qtee_env, pss) == 0
    # loadEmbedded by name signs with the device's own key: still loads.
    with qtee_client.open_service(qtee_env, APP_LOADER_UID) as loader:
        (ctrl,) = loader.invoke(2, Echo.name.encode(), OUT_OBJECT)
    ctrl.release()


def test_keys_are_checked() -> None:
    """Every public function validates its input: a key is a cryptography private key."""
    with pytest.raises(UsageError, match="signing key"):
        ta_image("x", key="not a key")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="P-256"):
        ta_image("x", key=ec.generate_private_key(ec.SECP384R1()))
    world = SecureWorld(QteeRoot())
    with pytest.raises(UsageError, match="signing key"):
        world.ta_key = default_model_key().public_key()  # type: ignore[assignment]
    assert world.ta_key is default_model_key()


# ----------------------------------------------------------------------------- qtee ta sign


def qtee_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qtee", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.qtee_ta(Echo.name, Echo)
def test_cli_sign_makes_images_each_flavour_loads(
    optee: Env, other_key: rsa.RSAPrivateKey, qtee_client: Client, qtee_env: ObjRef
) -> None:
    """``qtee ta sign`` (as ``sign_encrypt.py sign-enc --uuid --key --in --out``): an
    OP-TEE ``<uuid>.ta`` signed with the given PEM key loads on a device that trusts that
    key and is TEE_ERROR_SECURITY on one that trusts the default key; ``--name`` makes a
    QTEE image the AppLoader takes (signed_hdr.c; quic-teec.md §5.3)."""
    dev, ctx, mem, tmp = optee
    pem = tmp / "key.pem"
    pem.write_bytes(
        other_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp / "payload").write_bytes(b"\x7fELF payload")
    out = tmp / "ta" / f"{LOADABLE_UUID}.ta"
    done = qtee_cli(
        "ta", "sign", "--uuid", str(LOADABLE_UUID), "--in", str(tmp / "payload"),
        "--key", str(pem), "--algo", "pss", "--out", str(out),
    )  # fmt: skip
    assert (done.returncode, done.stderr) == (0, "")
    assert SHDR.unpack_from(out.read_bytes())[3] == TEE_ALG_RSASSA_PKCS1_PSS_MGF1_SHA256
    assert open_session(ctx, mem, LOADABLE_UUID) == (0, *SECURITY)
    dev.runtime.ta_key = other_key
    session, ret, _ = open_session(ctx, mem, LOADABLE_UUID)
    assert ret == 0
    close_session(ctx, session)
    qimage = tmp / "echo.img"
    done = qtee_cli("ta", "sign", "--name", Echo.name, "--out", str(qimage))
    assert done.returncode == 0
    assert load_result(qtee_client, qtee_env, qimage.read_bytes()) == 0


def test_cli_sign_refuses_bad_keys_and_uuids(tmp_path: Path) -> None:
    """Bad arguments exit 2 with a message naming what was wrong; nothing is written."""
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    out = tmp_path / "x.ta"
    for args, says in [
        (["--uuid", "not-a-uuid"], "not a UUID"),
        (["--uuid", str(LOADABLE_UUID), "--key", str(bad)], "PEM private key"),
        (["--uuid", str(LOADABLE_UUID), "--algo", "ecdsa"], "algorithm"),
        (["--name", "x", "--in", str(tmp_path / "missing")], "No such file"),
    ]:
        done = qtee_cli("ta", "sign", *args, "--out", str(out))
        assert done.returncode == 2 and says in done.stderr, (args, done.stderr)
        assert not out.exists()
