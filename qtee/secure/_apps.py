"""The app loader (UID 3), app controllers, and TAs written in Python.

A TA is a :class:`TrustedApp` subclass registered under a name with :func:`register_ta`
(process-wide) or ``world.tas.register`` (one world's, looked up first:
:mod:`qtee.secure._registry`).
Its *image* names it and is signed (:mod:`qtee.secure._signing`: magic, lengths, name,
payload, then a signature over all of them; :func:`ta_image` builds one).  The loader
checks the signature with the device key (``world.ta_key``): a layout that does not
add up is ``ERROR_INVALID_BUFFER``, a signature that does not verify (a bit flipped
anywhere after the magic) ``ERROR_ELF_SIGNATURE_ERROR`` (12), IAppLoader's error for
an image whose signature fails; a GP TA's image (:func:`~qtee.secure.gp_ta_image`, OP-TEE's
signed layout) failing its checks is ELF_SIGNATURE_ERROR too.
``loadFromBuffer`` (op 0) takes the image bytes;
``loadFromRegion`` (op 1) takes a memory object and maps it with MAP_REGION;
``loadEmbedded`` (op 2) takes a TA name, or a 16-byte UUID that the supplicant's
TA-autoload service resolves to an image.  Both
return an IAppController: ``getAppObject`` (op 2) gives the TA's app object, ``unload``
(op 1) unloads it.  Errors are IAppLoader's and IAppController's (quic-teec.md §5.3).

Any other image is a real TA file (a signed ELF such as ``smcinvoke_skeleton_ta64.mbn``):
it loads the TA that :func:`qtee.secure.register_ta_file` registered for its SHA-256
(:mod:`qtee.secure._tafiles`; a memory object longer by zero bytes matches too).  An
image that matches nothing is ``ERROR_INVALID_BUFFER`` (10), IAppLoader's answer for a
buffer it cannot take; a model image naming no registered TA stays METADATA_INVALID.

**GP TAs.**  An image of a GP TA -- a model image named ``str(uuid)``
(:func:`~qtee.secure.gp_ta_image`) whose class is registered as a GP TA, a loadable GP TA
or a TA file by UUID, or a real file registered by SHA-256 for a :class:`~qtee.secure.GpTA` class --
loads it into the world's GP runtime: from then on IGPAppClient (0x199) finds it by
UUID, as it finds the TAs a device preloads (the ones :func:`~qtee.secure.register_gp_ta` registers;
their image is ALREADY_LOADED, like a second load).  The answer is a
:class:`GpAppController`: ``unload`` is IAppController ``APP_IN_USE`` while a session to
the TA is open (IAppController.idl: unload fails while the app is busy, to be tried
again later); ``getAppObject`` is ``NOT_SUPPORTED`` (model choice: a GP TA is reached by
UUID, not through a Mink object); releasing the controller unloads the TA, and sessions
open by then go on until they close.
"""

from __future__ import annotations

import hashlib
import threading
import uuid as uuidlib
from typing import TYPE_CHECKING, Any, ClassVar, Final, Self

from objects import QteeError, UsageError
from qtee import _idl
from qtee._idl import idl_op
from qtee.secure._registry import PROCESS_TAS, refuse_marker_call
from qtee.secure._signing import (
    QTEE_MAGIC,
    ImageFormatError,
    ImageSignatureError,
    SigningKey,
    check_signing_key,
    default_model_key,
    is_optee_model,
    qtee_model_image,
    verify_optee_model,
    verify_qtee_model,
)
from qtee.secure._world import NsObject, SecureObject

if TYPE_CHECKING:
    from qtee.secure._gp import GpRuntime, GpTA
    from qtee.secure._world import SecureWorld

__all__ = [
    "APP_LOADER_UID",
    "AppController",
    "AppLoader",
    "IAppController",
    "IAppLoader",
    "TrustedApp",
    "register_ta",
    "ta_image",
    "unregister_ta",
]

APP_LOADER_UID: Final = _idl.const("CAppLoader", "CAppLoader_UID")
TA_MAGIC: Final = QTEE_MAGIC


#: IAppLoader's and IAppController's errors, from their shipped ``.idl`` (quic-teec.md
#: §5.3).  IAppController's 14 NOT_SUPPORTED is the model's: the fifth error of a later
#: IAppController.idl (qualcomm-linux/pkg-minkipc), absent from the file qtee ships
#: (checked against minkipc's generated header), which a GP TA's controller answers to
#: getAppObject.
IAppLoader = _idl.errors("IAppLoader", __name__)
IAppController = _idl.errors("IAppController", __name__, {"ERROR_NOT_SUPPORTED": 14})


# The names these errors had before their enums (kept: the same values).
ERROR_INVALID_BUFFER: Final = IAppLoader.ERROR_INVALID_BUFFER
ERROR_METADATA_INVALID: Final = IAppLoader.ERROR_METADATA_INVALID
ERROR_ALREADY_LOADED: Final = IAppLoader.ERROR_ALREADY_LOADED
ERROR_EMBEDDED_IMAGE_NOT_FOUND: Final = IAppLoader.ERROR_EMBEDDED_IMAGE_NOT_FOUND
ERROR_APP_UNLOADED: Final = IAppController.ERROR_APP_UNLOADED

# The process-wide layer's table of QTEE TAs, under the names older code reads.
_REGISTRY = PROCESS_TAS._qtee
_REG_LOCK = PROCESS_TAS._lock


class TrustedApp(SecureObject):
    """Base class of TAs written in Python; declare ops with :func:`objects.op`."""

    #: The secure world the TA runs in (set when it is loaded).
    world: SecureWorld
    name: ClassVar[str] = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        refuse_marker_call(cls, args, kwargs)
        return super().__new__(cls, *args, **kwargs)


def _no_ta(world: SecureWorld, name: str) -> str:
    """Why no QTEE TA has ``name``: the names that are registered, and how to add one."""
    tas = world.tas
    return (
        f"no TA named {name!r} (registered TAs: {tas.listed(tas.qtee_names())}); "
        "@pytest.mark.qtee_ta(name, cls), device.register_ta(name, cls) or "
        "qtee.register_ta(name, cls) registers one"
    )


def register_ta(name: str, cls: type[TrustedApp]) -> None:
    """Make ``cls`` loadable from images named ``name``, in every world (process-wide;
    one world's own: ``world.tas.register``)."""
    PROCESS_TAS.register(name, cls)


def unregister_ta(name: str) -> None:
    """Forget the TA registered process-wide as ``name``."""
    with _REG_LOCK:
        if _REGISTRY.pop(name, None) is None:
            raise UsageError(f"no TA is registered as {name!r}")


def ta_image(
    name: str, payload: bytes = b"", *, key: SigningKey | None = None, algo: int | None = None
) -> bytes:
    """The signed image that selects the TA registered as ``name``
    (:func:`~qtee.secure._signing.qtee_model_image`), signed with ``key`` (an RSA or
    P-256 ECDSA private key; default: the process's default model key, which every world
    trusts unless given another ``ta_key``)."""
    if not isinstance(name, str):
        raise UsageError(f"a TA name is a str, not {type(name).__name__}")
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise UsageError(f"a TA payload is bytes, not {type(payload).__name__}")
    signing = default_model_key() if key is None else check_signing_key(key)
    return qtee_model_image(name, bytes(payload), signing, algo)


def _verified(world: SecureWorld, image: bytes, padded: bool) -> str:
    """The TA name of a model image the device key signed: a layout that does not hold
    together is INVALID_BUFFER, a signature that does not verify ELF_SIGNATURE_ERROR."""
    try:
        return verify_qtee_model(image, world.ta_key, padded=padded)[0]
    except ImageFormatError as exc:
        raise QteeError(ERROR_INVALID_BUFFER, str(exc)) from None
    except ImageSignatureError as exc:
        raise QteeError(IAppLoader.ERROR_ELF_SIGNATURE_ERROR, str(exc)) from None


class AppController(SecureObject):
    """IAppController of one loaded TA."""

    ERRORS = IAppController

    def __init__(self, loader: AppLoader, name: str, app: TrustedApp) -> None:
        self.loader = loader
        self.name = name
        self.app: TrustedApp | None = app

    @idl_op("IAppController", "unload")
    def unload(self) -> None:
        self._unload()

    @idl_op("IAppController", "getAppObject")
    def get_app_object(self) -> TrustedApp:
        if self.app is None:
            raise QteeError(ERROR_APP_UNLOADED, f"{self.name} was unloaded")
        return self.app

    def _unload(self) -> None:
        if self.app is not None:
            self.app = None
            self.loader.loaded.discard(self.name)

    def on_release(self) -> None:
        self._unload()


class GpAppController(SecureObject):
    """IAppController of a GP TA that IAppLoader loaded: the TA is reachable through
    IGPAppClient (by UUID) until ``unload`` (op 1), which fails with ``APP_IN_USE`` while a
    session to it is open.  Releasing the controller unloads it too (sessions already
    open keep running until they close).  ``getAppObject`` (op 2) is ``NOT_SUPPORTED``:
    a GP TA offers no Mink object of its own."""

    ERRORS = IAppController

    def __init__(self, runtime: GpRuntime, cls: type[GpTA]) -> None:
        self.runtime = runtime
        self.cls = cls
        self.loaded = True
        self._lock = threading.Lock()

    @idl_op("IAppController", "unload")
    def unload(self) -> None:
        with self._lock:
            if not self.loaded:
                return
            if not self.runtime.unload_app(self.cls.UUID.bytes):
                raise QteeError(
                    IAppController.ERROR_APP_IN_USE, f"GP TA {self.cls.UUID} has open sessions"
                )
            self.loaded = False

    @idl_op("IAppController", "getAppObject")
    def get_app_object(self) -> SecureObject:
        if not self.loaded:
            raise QteeError(ERROR_APP_UNLOADED, f"GP TA {self.cls.UUID} was unloaded")
        raise QteeError(
            IAppController.ERROR_NOT_SUPPORTED,
            f"GP TA {self.cls.UUID} has no app object: open a session through IGPAppClient",
        )

    def on_release(self) -> None:
        with self._lock:
            loaded, self.loaded = self.loaded, False
        if loaded:
            self.runtime.unload_app(self.cls.UUID.bytes, force=True)

    def __repr__(self) -> str:
        return f"<GP app {self.cls.__name__} {self.cls.UUID}{'' if self.loaded else ' unloaded'}>"


class AppLoader(SecureObject):
    """IAppLoader (UID 3)."""

    ERRORS = IAppLoader

    def __init__(self, world: SecureWorld, loaded: set[str]) -> None:
        self.world = world
        self.loaded = loaded

    def _load(self, image: bytes, padded: bool = False) -> AppController | GpAppController:
        """Load ``image``; ``padded``: it comes from a memory region, which may hold zeros
        after it."""
        cls: type[TrustedApp] | None
        if is_optee_model(image):  # a GP TA's model image (gp_ta_image)
            try:
                ta_uuid = verify_optee_model(image, self.world.ta_key, padded=padded)[0]
            except (ImageFormatError, ImageSignatureError) as exc:
                raise QteeError(IAppLoader.ERROR_ELF_SIGNATURE_ERROR, str(exc)) from None
            gp_cls = self._gp_class(str(ta_uuid))
            if gp_cls is None:
                raise QteeError(ERROR_METADATA_INVALID, f"no GP TA {ta_uuid}")
            return self._load_gp(gp_cls)
        if image.startswith(TA_MAGIC):  # a model image: it names its TA
            name = _verified(self.world, image, padded)
            cls = self.world.tas.lookup(name)
            if cls is None:
                gp = self._gp_class(name)
                if gp is None:
                    raise QteeError(ERROR_METADATA_INVALID, _no_ta(self.world, name))
                return self._load_gp(gp)
        else:  # a real image (a signed ELF): the TA registered for its SHA-256
            found = self.world.tas.file_by_sha256("qtee", image)
            if found is None:
                gp_found = self.world.tas.file_by_sha256("optee", image)
                if gp_found is not None:  # a GP TA's file
                    return self._load_gp(gp_found[0])
                raise QteeError(
                    ERROR_INVALID_BUFFER,
                    f"no TA is registered for this {len(image)}-byte image "
                    f"(sha256 {hashlib.sha256(image).hexdigest()})",
                )
            cls, digest = found
            name = f"sha256:{digest.hex()}"
        if name in self.loaded:
            raise QteeError(ERROR_ALREADY_LOADED, f"{name} is already loaded")
        app = cls()
        app.world = self.world
        self.loaded.add(name)
        return AppController(self, name, app)

    def _gp_class(self, name: str) -> type[GpTA] | None:
        """The GP TA a model image named ``str(uuid)`` stands for (a GP, loadable GP or
        by-UUID file registration), or None."""
        try:
            want = uuidlib.UUID(name)
        except ValueError:
            return None
        if str(want) != name:  # only the canonical lowercase form, as gp_ta_image writes
            return None
        tas = self.world.tas
        return tas.lookup_gp(want) or tas.lookup_loadable(want) or tas.file_by_uuid(want)

    def _load_gp(self, cls: type[GpTA]) -> GpAppController:
        from qtee.secure._gpclient import gp_runtime

        runtime = gp_runtime(self.world)
        if not runtime.load_app(cls):
            raise QteeError(ERROR_ALREADY_LOADED, f"GP TA {cls.UUID} is already loaded")
        return GpAppController(runtime, cls)

    @idl_op("IAppLoader", "loadFromBuffer")
    def load_from_buffer(self, image: bytes) -> AppController | GpAppController:
        return self._load(image)

    @idl_op("IAppLoader", "loadEmbedded")
    def load_embedded(self, name: bytes) -> AppController | GpAppController:
        """``loadEmbedded``: a 16-byte name is a TA UUID, fetched through the supplicant's
        TA-autoload callback (IRequestTABuffer) when one is registered; any other name is
        a registered TA's name.  Nothing found: EMBEDDED_IMAGE_NOT_FOUND."""
        from qtee.secure._listeners import fetch_ta_image

        if len(name) == 16:
            image = fetch_ta_image(self.world, name)
            if image is None:
                raise QteeError(ERROR_EMBEDDED_IMAGE_NOT_FOUND, f"no TA image for {name.hex()}")
            return self._load(image)
        try:
            text = name.decode()
        except UnicodeDecodeError:
            raise QteeError(ERROR_EMBEDDED_IMAGE_NOT_FOUND, "TA name is not UTF-8") from None
        if self.world.tas.lookup(text) is None:
            raise QteeError(ERROR_EMBEDDED_IMAGE_NOT_FOUND, _no_ta(self.world, text))
        return self._load(ta_image(text, key=self.world.ta_key))

    @idl_op("IAppLoader", "loadFromRegion")
    def load_from_region(self, mem: NsObject | None) -> AppController | GpAppController:
        if not isinstance(mem, NsObject):
            raise QteeError(ERROR_INVALID_BUFFER, "no memory object")
        try:
            mapping = self.world.map_region(mem)
        except QteeError:
            raise QteeError(ERROR_INVALID_BUFFER, "memory object could not be mapped") from None
        try:
            return self._load(bytes(mapping.view), padded=True)
        finally:
            mapping.unmap()
