"""Signed model TA images: the model signing keys and the two signed layouts.

**OP-TEE** (:func:`optee_model_image`, what :func:`~qtee.secure.gp_ta_image` makes) follows
``struct shdr`` as optee_os's ``scripts/sign_encrypt.py`` writes it and
``core/crypto/signed_hdr.c`` / ``ree_fs_ta.c`` check it, with a ``SHDR_BOOTSTRAP_TA``
header so the UUID travels in the image::

    struct shdr           magic 0x4f545348, img_type 1, img_size, algo, hash_size 32, sig_size
    hash                  SHA-256 over shdr (20 bytes) + shdr_bootstrap_ta + body
    signature             sig_size bytes, RSASSA over the hash (PKCS#1 v1.5 or PSS, salt 32)
    shdr_bootstrap_ta     uuid (16 octets), ta_version (u32)
    body                  img_size bytes: b"QTEEGPTA" + payload (a real file has its ELF here)

The loader refuses (``TEE_ERROR_SECURITY``) a header whose magic, type, algorithm (RSA
only, as ``shdr_verify_signature``), hash size or signature size (the key's modulus) is
wrong, a length that does not add up, a signature that does not verify, and a hash that
is not the one of the bytes.

**QTEE** (:func:`qtee_model_image`, what :func:`~qtee.secure.ta_image` makes) is the model's
own layout with the same properties (everything before the signature is signed)::

    magic      8  b"QTEETA\\x00\\x02"
    name_len   u16   algo  u32   payload_len  u32   sig_len  u16
    name, payload, signature over SHA-256(all the bytes before it)

``algo`` is one of :data:`TEE_ALG_RSASSA_PKCS1_V1_5_SHA256`,
:data:`TEE_ALG_RSASSA_PKCS1_PSS_MGF1_SHA256` or :data:`TEE_ALG_ECDSA_SHA256` (P-256, the
signature as r || s, 32 bytes each).

**Keys.**  A world trusts one key (``SecureWorld.ta_key``; ``GpRuntime.ta_key`` is its
world's): by default the process's *default model key*, a fixed published RSA-2048 key
(as OP-TEE's development ``keys/default_ta.pem``), so an image made in one process loads
in a world of another (``qtee server``).  Assign another private key to a world to make it
trust only images signed with that key.  Signatures come from the ``cryptography``
package.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import uuid as uuidlib
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from objects import UsageError

__all__ = [
    "TEE_ALG_ECDSA_SHA256",
    "TEE_ALG_RSASSA_PKCS1_PSS_MGF1_SHA256",
    "TEE_ALG_RSASSA_PKCS1_V1_5_SHA256",
    "ImageFormatError",
    "ImageSignatureError",
    "SigningKey",
    "check_signing_key",
    "default_model_key",
    "is_optee_model",
    "optee_model_image",
    "qtee_model_image",
    "verify_optee_model",
    "verify_qtee_model",
    "QTEE_MAGIC",
]

TEE_ALG_RSASSA_PKCS1_V1_5_SHA256: Final = 0x7000_4830
TEE_ALG_RSASSA_PKCS1_PSS_MGF1_SHA256: Final = 0x7041_4930
TEE_ALG_ECDSA_SHA256: Final = 0x7000_4041
_RSA_ALGS: Final = (TEE_ALG_RSASSA_PKCS1_V1_5_SHA256, TEE_ALG_RSASSA_PKCS1_PSS_MGF1_SHA256)

SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
_VerifyKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

QTEE_MAGIC: Final = b"QTEETA\x00\x02"
_QHEAD: Final = struct.Struct("<8sHIIH")  # magic, name_len, algo, payload_len, sig_len
GP_BODY_MAGIC: Final = b"QTEEGPTA"
SHDR_MAGIC: Final = 0x4F545348
SHDR_BOOTSTRAP_TA: Final = 1
_SHDR: Final = struct.Struct("<4I2H")  # magic, img_type, img_size, algo, hash_size, sig_size
_BOOTSTRAP: Final = struct.Struct("<16sI")  # uuid, ta_version
_HASH: Final = 32


class ImageFormatError(Exception):
    """The image's layout does not hold together (lengths, magic)."""


class ImageSignatureError(Exception):
    """The image is laid out right but is not signed by the trusted key."""


# A fixed key made for this model (not OP-TEE's): the default every world trusts.
_DEFAULT_PEM: Final = b"""\
-----BEGIN PRIVATE KEY-----
MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC1c9gbCDZ/1i6A
MQGlqNw9iWcccPzTozGnx50eh+3yDRC5q8tqgtBgBx6b6vho0aWITamqMjINSELb
x8Hr0oU4alx9qQEY42IwPAU+7zur8i0JbBGBIoEtChxIs+WMaZEjOk8p9NzWUU5h
myleW89DnO0DzJ3mVeIaoGfrJzSq6qrM759HBgCW5OEFIRZWOPOQss86WRWd985r
lyquy3cydBdxmQl/tJUiLGO6aIubsGrdSI5BTSaf0sgTFxSfQcAMPgDZ+E0TtmJN
lEBFk7Sxd2b66dobRxZbdaOcMBLiMPmujUFeIlpfKNR9p/4fDE+0l4wcsMV5buEi
3h48ST99AgMBAAECggEADIivAdcEZLo3xhUchwPuCrYmEDnhzQC12mAYg1ZiYljy
sdCjIX1dxXRYce6+MAdjRtIOiTokaPR34dSfmZmWKDp4nxmAgOacDrbmqd0+ovb8
k20KnH/0qlbLc14x2gwkwWkytLQ8WPWO04EzT1hKLeJ2INAOjC2ci7hO1ViE89Va
IfJMzrpvt2IOhEYf4LXbOeYG13Xq6sRV5WvvkK6hhX72F5HUrB8jHR+GV3apZPRV
AiesEw4abm4OgsN/ocFf8ajgUG+wD5L6LlL86gx+rHMLQxA9FDLPSOEi/KwFnO+y
G8Z+hcjXWISNOuiunZQS5XwWd/V8fSgvFXl9Tb3CpQKBgQDfDRduKz3byO60Q4rp
caAy01CndhcNCKk02jsNqNRRkuuuI9AYqwanxug4sVD+C7XKzFlHVgf/WkjZPG/F
tw3J6o12l48p2MLH9DBSCKWItk7LB3XUdxSQsPMQuP77VoGysAYRiuHMBYE1xUK7
RhBbjFIRRNr1zFj0gJlnl7HmZwKBgQDQQahr3Kie2UjMqOUNr9nYVba2L/+febJQ
29hag6oAdoHRfqXsQMGmUMS8T+RTu+CAXu9DmRfxWYeeJwKOkUkvPqc1+5xJcWgb
4yK3KBjTbXYZM8dBRsiiTDfSoTKoxHFo1z+iffRu1PBM7G0XhBB0UtqpCp6JdjHK
KG2cgQSUewKBgHJqssQuplKh5eDObOmHAdhQkaT1bKmg8btM3tII8rDNntv7PvoI
cSeLXwAF5TgMJbrbzEhNl1ijpY7Z87QGTKpxCRP2dtfOe0w6tLa//Ln+WrjHIOhW
FVSLkIPZgeLH40wYA2ToSx9vC3Lbt3l9XVK4zjhRi8hehJsXhJmhNP6tAoGBALzf
X0z7oZ33ODQM1TfVjX/LNNsEqxPKPjNhP1XP5WVoFRKXhwm+LSKWS+bxmgVq9g/W
ia7H8NP9u6ZugL4l+7ayXtnxqOtew+nO1JRB9EoEE0CGGicUeC/hahtIAPbYunY4
CUlobD/8NTe+kK3sIzQsVI1MyT2oCT3r7oUq6alzAoGAE6ouFqNk7WS9kkagoYdu
0fLyh+oXYH8SWBslHP5qmpjhsScV8bJi0Xe6UqAc8CzEyu2esLWkMYiR+VNne3iy
1sn4CaOjP3bQgKIs6kf3U5SjN1dyR0TV1/T0eYSOlZAIHeKKiGw6RrT+OTdblUT3
5TGfkx+6LlzAa6PHCwNFflw=
-----END PRIVATE KEY-----

"""
_default: list[rsa.RSAPrivateKey] = []
_default_lock = threading.Lock()


def default_model_key() -> rsa.RSAPrivateKey:
    """The process's default model signing key (loaded at first use)."""
    with _default_lock:
        if not _default:
            key = serialization.load_pem_private_key(_DEFAULT_PEM, password=None)
            assert isinstance(key, rsa.RSAPrivateKey)
            _default.append(key)
        return _default[0]


def check_signing_key(key: object, *, rsa_only: bool = False) -> SigningKey:
    """``key`` if it is a private key images can be signed with, else UsageError."""
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 1024:
            raise UsageError(f"an RSA signing key has at least 1024 bits, not {key.key_size}")
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey) and not rsa_only:
        if not isinstance(key.curve, ec.SECP256R1):
            raise UsageError(f"an ECDSA signing key is on P-256, not {key.curve.name}")
        return key
    if rsa_only:  # OP-TEE's struct shdr carries RSA signatures only
        raise UsageError(
            f"an OP-TEE TA image (gp_ta_image) is signed with an RSA private key "
            f"(cryptography), not {type(key).__name__}"
        )
    raise UsageError(
        f"a TA signing key is an RSA or P-256 ECDSA private key (cryptography), "
        f"not {type(key).__name__}"
    )


def _default_algo(key: SigningKey) -> int:
    if isinstance(key, rsa.RSAPrivateKey):
        return TEE_ALG_RSASSA_PKCS1_V1_5_SHA256
    return TEE_ALG_ECDSA_SHA256


def _algo_name(algo: int) -> str:
    """``algo``'s GP name and number (TEE_ALG_ECDSA_SHA256 (0x70004041))."""
    names = {
        TEE_ALG_RSASSA_PKCS1_V1_5_SHA256: "TEE_ALG_RSASSA_PKCS1_V1_5_SHA256",
        TEE_ALG_RSASSA_PKCS1_PSS_MGF1_SHA256: "TEE_ALG_RSASSA_PKCS1_PSS_MGF1_SHA256",
        TEE_ALG_ECDSA_SHA256: "TEE_ALG_ECDSA_SHA256",
    }
    return f"{names[algo]} ({algo:#x})"


def _check_algo(key: SigningKey, algo: int | None) -> int:
    if algo is None:
        return _default_algo(key)
    ok = _RSA_ALGS if isinstance(key, rsa.RSAPrivateKey) else (TEE_ALG_ECDSA_SHA256,)
    if algo not in (*_RSA_ALGS, TEE_ALG_ECDSA_SHA256):
        raise UsageError(
            f"algorithm {algo!r} is none of TEE_ALG_RSASSA_PKCS1_V1_5_SHA256, "
            "TEE_ALG_RSASSA_PKCS1_PSS_MGF1_SHA256 or TEE_ALG_ECDSA_SHA256"
        )
    if algo not in ok:
        kind = "an RSA key" if isinstance(key, rsa.RSAPrivateKey) else "a P-256 ECDSA key"
        wants = "a P-256 ECDSA key" if algo == TEE_ALG_ECDSA_SHA256 else "an RSA key"
        raise UsageError(
            f"algorithm {_algo_name(algo)} signs with {wants}, and the key given is {kind}"
        )
    return algo


def _sig_size(key: SigningKey) -> int:
    if isinstance(key, rsa.RSAPrivateKey):
        return (key.key_size + 7) // 8
    return 64  # ECDSA P-256: r || s


def _sign(key: SigningKey, digest: bytes, algo: int) -> bytes:
    pre = utils.Prehashed(hashes.SHA256())
    if isinstance(key, ec.EllipticCurvePrivateKey):  # r || s, 32 bytes each
        r, s = utils.decode_dss_signature(key.sign(digest, ec.ECDSA(pre)))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")
    if algo == TEE_ALG_RSASSA_PKCS1_PSS_MGF1_SHA256:
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=_HASH)
        return key.sign(digest, pss, pre)
    return key.sign(digest, padding.PKCS1v15(), pre)


def _verifies(pub: _VerifyKey, digest: bytes, sig: bytes, algo: int) -> bool:
    pre = utils.Prehashed(hashes.SHA256())
    try:
        if isinstance(pub, ec.EllipticCurvePublicKey):
            if algo != TEE_ALG_ECDSA_SHA256 or len(sig) != 64:
                return False
            r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
            pub.verify(utils.encode_dss_signature(r, s), digest, ec.ECDSA(pre))
        elif algo == TEE_ALG_RSASSA_PKCS1_PSS_MGF1_SHA256:
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=_HASH)
            pub.verify(sig, digest, pss, pre)
        elif algo == TEE_ALG_RSASSA_PKCS1_V1_5_SHA256:
            pub.verify(sig, digest, padding.PKCS1v15(), pre)
        else:
            return False
    except InvalidSignature:
        return False
    return True


# ----------------------------------------------------------------------------- QTEE layout
def qtee_model_image(name: str, payload: bytes, key: SigningKey, algo: int | None = None) -> bytes:
    """The QTEE model image of the TA ``name`` (see the module docstring)."""
    raw = name.encode()
    if len(raw) > 0xFFFF:
        raise UsageError(f"a TA name is at most 65535 bytes, not {len(raw)}")
    algo = _check_algo(key, algo)
    payload = bytes(payload)
    head = _QHEAD.pack(QTEE_MAGIC, len(raw), algo, len(payload), _sig_size(key))
    signed = head + raw + payload
    return signed + _sign(key, hashlib.sha256(signed).digest(), algo)


def _unpad(image: bytes, size: int, padded: bool) -> bytes:
    """``image`` cut to ``size`` when ``padded`` and all it has beyond is zeros (a memory
    region rounded up to pages)."""
    if padded and len(image) > size and not any(image[size:]):
        return image[:size]
    return image


def verify_qtee_model(image: bytes, key: SigningKey, *, padded: bool = False) -> tuple[str, bytes]:
    """``(name, payload)`` of a QTEE model image signed by ``key``; ImageFormatError
    when it is not one (magic, lengths, name), ImageSignatureError when the signature
    does not verify.  ``padded``: zeros after the image are allowed (a memory region)."""
    if len(image) < _QHEAD.size or not image.startswith(QTEE_MAGIC):
        raise ImageFormatError("not a model TA image (magic or header cut short)")
    _m, name_len, algo, payload_len, sig_len = _QHEAD.unpack_from(image)
    end = _QHEAD.size + name_len + payload_len
    image = _unpad(image, end + sig_len, padded)
    if end + sig_len != len(image):
        raise ImageFormatError(
            f"a {len(image)}-byte image whose header adds up to {end + sig_len} bytes"
        )
    digest = hashlib.sha256(image[:end]).digest()
    if not _verifies(key.public_key(), digest, image[end:], algo):
        raise ImageSignatureError("the image's signature does not verify with the device key")
    try:
        name = image[_QHEAD.size : _QHEAD.size + name_len].decode()
    except UnicodeDecodeError:  # pragma: no cover - signed names are UTF-8
        raise ImageFormatError("the TA name is not UTF-8") from None
    return name, image[_QHEAD.size + name_len : end]


# ----------------------------------------------------------------------------- OP-TEE layout
def optee_model_image(
    ta_uuid: uuidlib.UUID,
    payload: bytes,
    key: SigningKey,
    algo: int | None = None,
    version: int = 0,
) -> bytes:
    """The ``<uuid>.ta`` of the model GP TA ``ta_uuid`` (see the module docstring)."""
    key = check_signing_key(key, rsa_only=True)
    algo = _check_algo(key, algo)
    body = GP_BODY_MAGIC + bytes(payload)
    sig_size = _sig_size(key)
    head = _SHDR.pack(SHDR_MAGIC, SHDR_BOOTSTRAP_TA, len(body), algo, _HASH, sig_size)
    boot = _BOOTSTRAP.pack(ta_uuid.bytes, version)
    digest = hashlib.sha256(head + boot + body).digest()
    return head + digest + _sign(key, digest, algo) + boot + body


def is_optee_model(image: bytes) -> bool:
    """Whether ``image`` is laid out as an OP-TEE model image (not whether it verifies)."""
    if len(image) < _SHDR.size:
        return False
    magic, img_type, _size, _algo, hash_size, sig_size = _SHDR.unpack_from(image)
    at = _SHDR.size + hash_size + sig_size + _BOOTSTRAP.size
    return (
        magic == SHDR_MAGIC
        and img_type == SHDR_BOOTSTRAP_TA
        and image[at : at + len(GP_BODY_MAGIC)] == GP_BODY_MAGIC
    )


def verify_optee_model(
    image: bytes, key: SigningKey, *, padded: bool = False
) -> tuple[uuidlib.UUID, bytes]:
    """``(uuid, payload)`` of an OP-TEE model image signed by ``key``, checked in the
    order of ``shdr_verify_signature`` and ``ree_fs_ta.c``; ImageFormatError for a
    header that does not hold together, ImageSignatureError for a signature or hash
    that does not match (both are TEE_ERROR_SECURITY to a GP client)."""
    if len(image) < _SHDR.size:
        raise ImageFormatError("the signed header is cut short")
    magic, img_type, img_size, algo, hash_size, sig_size = _SHDR.unpack_from(image)
    if magic != SHDR_MAGIC or img_type != SHDR_BOOTSTRAP_TA:
        raise ImageFormatError(f"signed header magic {magic:#x} type {img_type}")
    if algo not in _RSA_ALGS or hash_size != _HASH:
        raise ImageFormatError(f"signed header algorithm {algo:#x} hash size {hash_size}")
    pub = key.public_key()
    if not isinstance(pub, rsa.RSAPublicKey) or sig_size != (pub.key_size + 7) // 8:
        raise ImageSignatureError(f"signature size {sig_size} does not fit the device key")
    boot_at = _SHDR.size + hash_size + sig_size
    image = _unpad(image, boot_at + _BOOTSTRAP.size + img_size, padded)
    if boot_at + _BOOTSTRAP.size + img_size != len(image):
        raise ImageFormatError(f"a {len(image)}-byte image whose header says otherwise")
    digest = image[_SHDR.size : _SHDR.size + hash_size]
    if not _verifies(pub, digest, image[_SHDR.size + hash_size : boot_at], algo):
        raise ImageSignatureError("the signature does not verify with the device key")
    if hashlib.sha256(image[: _SHDR.size] + image[boot_at:]).digest() != digest:
        raise ImageSignatureError("the image's hash does not match its bytes")
    raw_uuid, _version = _BOOTSTRAP.unpack_from(image, boot_at)
    body = image[boot_at + _BOOTSTRAP.size :]
    if not body.startswith(GP_BODY_MAGIC):
        raise ImageFormatError("not a model TA body")
    return uuidlib.UUID(bytes=raw_uuid), body[len(GP_BODY_MAGIC) :]
