"""``qtee ta sign``: sign a model TA image, as OP-TEE's ``sign_encrypt.py sign-enc`` does
for a real TA.

``--uuid UUID`` makes a GP TA's ``<uuid>.ta`` (OP-TEE's ``struct shdr`` layout,
:func:`~qtee.secure.gp_ta_image`); ``--name NAME`` a QTEE model image
(:func:`~qtee.secure.ta_image`).  ``--in FILE`` is the payload (default: none), ``--key
PEM`` an unencrypted PEM private key (default: the process's default model key, which
every world trusts), ``--algo`` the signature algorithm.  Errors in the arguments or the
key exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
import uuid as uuidlib
from pathlib import Path

__all__ = ["add_arguments", "run"]

_ALGOS = ("pkcs1", "pss", "ecdsa")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``qtee ta`` verbs (``sign``)."""
    verbs = parser.add_subparsers(dest="ta_verb", metavar="VERB")  # none: a usage error
    sign = verbs.add_parser(
        "sign",
        help="sign a model TA image (OP-TEE <uuid>.ta or QTEE image)",
        description="Write a signed model TA image: with --uuid OP-TEE's signed header "
        "(struct shdr) for a GP TA, with --name QTEE's model layout.",
    )
    which = sign.add_mutually_exclusive_group(required=True)
    which.add_argument("--uuid", help="the GP TA's UUID: an OP-TEE <uuid>.ta image")
    which.add_argument("--name", help="the QTEE TA's registered name: a QTEE model image")
    sign.add_argument("--in", dest="payload", metavar="FILE", help="the payload (default: empty)")
    sign.add_argument("--out", required=True, metavar="FILE", help="where to write the image")
    sign.add_argument(
        "--key", metavar="PEM", help="unencrypted PEM private key (default: the model key)"
    )
    sign.add_argument(
        "--algo",
        choices=_ALGOS,
        default=None,
        help="pkcs1 (RSA default), pss (RSA), ecdsa (P-256 key, QTEE images only)",
    )


def _fail(message: str) -> int:
    print(f"qtee ta sign: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Run ``qtee ta sign``; 0 when the image is written, 2 for a bad argument or key."""
    from cryptography.hazmat.primitives import serialization

    from objects import UsageError
    from qtee.secure import (
        TEE_ALG_ECDSA_SHA256,
        TEE_ALG_RSASSA_PKCS1_PSS_MGF1_SHA256,
        TEE_ALG_RSASSA_PKCS1_V1_5_SHA256,
        gp_ta_image,
        ta_image,
    )

    algo = {
        None: None,
        "pkcs1": TEE_ALG_RSASSA_PKCS1_V1_5_SHA256,
        "pss": TEE_ALG_RSASSA_PKCS1_PSS_MGF1_SHA256,
        "ecdsa": TEE_ALG_ECDSA_SHA256,
    }[args.algo]
    try:
        payload = Path(args.payload).read_bytes() if args.payload else b""
        key = None
        if args.key:
            key = serialization.load_pem_private_key(Path(args.key).read_bytes(), password=None)
    except OSError as exc:
        return _fail(f"{exc.filename}: {exc.strerror}")
    except (ValueError, TypeError) as exc:
        return _fail(f"{args.key}: not an unencrypted PEM private key ({exc})")
    if args.uuid is not None and args.algo == "ecdsa":  # OP-TEE's shdr: RSA only
        return _fail(
            "--algo ecdsa: algorithm TEE_ALG_ECDSA_SHA256 signs QTEE images (--name) only; an "
            "OP-TEE <uuid>.ta is signed with an RSA key (--algo pkcs1 or pss)"
        )
    if key is None and args.algo == "ecdsa":  # the default model key is RSA
        return _fail(
            "--algo ecdsa: algorithm TEE_ALG_ECDSA_SHA256 signs with a P-256 ECDSA key, and "
            "the default model key is RSA: give --key PEM with an EC P-256 private key"
        )
    try:
        if args.uuid is not None:
            try:
                ta = uuidlib.UUID(args.uuid)
            except ValueError:
                return _fail(f"{args.uuid!r} is not a UUID")
            image = gp_ta_image(ta, payload, key=key, algo=algo)  # type: ignore[arg-type]
        else:
            image = ta_image(args.name, payload, key=key, algo=algo)  # type: ignore[arg-type]
    except UsageError as exc:
        return _fail(str(exc))
    try:
        Path(args.out).write_bytes(image)
    except OSError as exc:
        return _fail(f"{exc.filename}: {exc.strerror}")
    return 0
