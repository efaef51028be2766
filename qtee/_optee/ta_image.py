"""Which GP TA class an image tee-supplicant sends for LOAD_TA is (sans-IO).

**LOAD_TA** (cmd 0; :func:`attach_rpc` installs the runtime's ``load_ta`` hook).  A
session to a UUID that no :func:`qtee.secure.register_gp_ta` TA answers asks the
supplicant as ``ree_fs_ta.c`` does: value[0] = the UUID octets (``a`` = octets 0-7,
``b`` = 8-15, little-endian words), memref[1] NULL → the image size; then an APPL
payload of that size and LOAD_TA again.  Any non-zero answer is the open's result
(ITEM_NOT_FOUND when the supplicant has no image, COMMUNICATION when it goes away),
origin TEE.  **How an image names a GP TA:** a model image is a
:func:`gp_ta_image` image (OP-TEE's signed ``struct shdr`` layout with the UUID in its
bootstrap header; :mod:`qtee.secure._signing`) or a :func:`qtee.secure.ta_image` image
named ``str(uuid)``, and must verify with the device key (``runtime.ta_key``); its
Python class is one registered with :func:`register_loadable_ta` (a registry of TAs
that exist only as images, never found without the supplicant) or
:func:`qtee.secure.register_ta_file` by UUID.  A model image that does not verify (a
bit flipped anywhere, another key), names another UUID, or any other image for a
loadable TA, is ``TEE_ERROR_SECURITY`` (``signed_hdr.c``); one whose TA the model has no
class for, ITEM_NOT_FOUND.  Any other image is a TA file as users have them (``struct shdr``, then
the ELF): the class :func:`~qtee.secure.register_ta_file` registered for its SHA-256,
else for its UUID (any signed image: one without ``SHDR_MAGIC`` is SECURITY).  Every
lookup asks the loading world's registry first
(``world.tas``, :class:`~qtee.secure.TaRegistry`), then the process-wide one.  As
``ree_fs_ta.c`` ``ree_fs_ta_open`` answers, a signed header that names another UUID
(``shdr_bootstrap_ta``), or that is cut short, and an image the model has no class for
(OP-TEE could not verify its signature) are ``TEE_ERROR_SECURITY``; no file at all is
the supplicant's ITEM_NOT_FOUND.  Each new instance loads the image again (no cache),
as OP-TEE does.
"""

from __future__ import annotations

import uuid as uuidlib
from typing import TYPE_CHECKING

from qtee.gp import _codes as teec
from qtee.secure._gp import GpTA, GpTaError

if TYPE_CHECKING:
    from qtee.secure._registry import TaRegistry
    from qtee.secure._signing import SigningKey

__all__: list[str] = []


# register_loadable_ta, unregister_loadable_ta, lookup_loadable_ta and gp_ta_image live
# with the GP TA registry (qtee.secure._gp).


def _image_class(
    raw: bytes, image: bytes, tas: TaRegistry | None = None, key: SigningKey | None = None
) -> type[GpTA] | None:
    """The class of the image tee-supplicant sent for the UUID ``raw`` (None: the model
    has none, ITEM_NOT_FOUND); :class:`GpTaError` (SECURITY) where OP-TEE's checks of
    the image would fail.  See "How an image names a GP TA" in the module docstring.
    ``tas`` is the registry of the world that loads (default: the process-wide one),
    ``key`` the key it trusts for model images (default: the process's model key)."""
    from qtee.secure._apps import TA_MAGIC
    from qtee.secure._registry import PROCESS_TAS
    from qtee.secure._signing import (
        ImageFormatError,
        ImageSignatureError,
        default_model_key,
        is_optee_model,
        verify_optee_model,
        verify_qtee_model,
    )
    from qtee.secure._tafiles import SignedHeaderError, is_signed_image, signed_header_uuid

    if tas is None:
        tas = PROCESS_TAS
    if key is None:
        key = default_model_key()

    want = uuidlib.UUID(bytes=bytes(raw))
    if is_optee_model(image) or image.startswith(TA_MAGIC):  # a model image: verify it
        try:
            if is_optee_model(image):
                name = str(verify_optee_model(image, key)[0])
            else:
                name = verify_qtee_model(image, key)[0]
        except (ImageFormatError, ImageSignatureError) as exc:
            raise GpTaError(teec.SECURITY, f"the image for {want}: {exc}") from None
        if name != str(want):
            raise GpTaError(teec.SECURITY, f"the image for {want} is {name!r}")
        return tas.lookup_loadable(want) or tas.file_by_uuid(want)
    try:  # ree_fs_ta_open: the signed header first, its UUID against the one asked for
        inside, bad = signed_header_uuid(image), ""
    except SignedHeaderError as exc:
        inside, bad = None, str(exc)
    if inside is not None and inside != want:
        raise GpTaError(teec.SECURITY, f"the image for {want} is signed for {inside}")
    found = tas.file_by_sha256("optee", image)
    if found is not None:
        cls: type[GpTA] = found[0]
        if want != cls.UUID:
            raise GpTaError(teec.SECURITY, f"the image for {want} is registered as {cls.UUID}")
        return cls
    if tas.lookup_loadable(want) is not None:  # it exists only as a model image
        raise GpTaError(teec.SECURITY, f"the image for {want} is not a signed model image")
    if bad:
        raise GpTaError(teec.SECURITY, f"the image for {want}: {bad}")
    if not is_signed_image(image):  # shdr_verify_signature: no SHDR_MAGIC, no TA
        raise GpTaError(teec.SECURITY, f"the image for {want} is not a signed TA (no SHDR magic)")
    cls_by_name = tas.file_by_uuid(want)
    if cls_by_name is None:  # OP-TEE cannot verify an image it has no key for
        raise GpTaError(teec.SECURITY, f"no TA is registered for the image of {want}")
    return cls_by_name
