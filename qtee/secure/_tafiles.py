"""Python TAs for TA files as users have them: real images select a Python class.

A model image (:func:`qtee.secure.ta_image`) names its TA.  A real TA file does not name
anything the model can run: QTEE's loader gets a signed ELF (``*.mbn``) through
IAppLoader ``loadFromBuffer``/``loadFromRegion``, and OP-TEE gets the bytes of
``<uuid>.ta`` (a signed header, ``struct shdr``, then the ELF) from tee-supplicant's
LOAD_TA.  :func:`register_ta_file` says which Python class such a file stands for:

* a QTEE :class:`~qtee.secure.TrustedApp` by the image's SHA-256 (``sha256=`` a hex
  string or the 32-byte digest, or ``path=`` a file whose bytes are hashed);
* an OP-TEE :class:`~qtee.secure._gp.GpTA` by the same SHA-256 keys, or, with neither,
  by its ``UUID``: whatever ``<uuid>.ta`` tee-supplicant hands over for that UUID is
  this class, unless the image's signed header names another UUID.  (A UUID that a
  :func:`~qtee.secure._gp.register_gp_ta` TA answers never reaches LOAD_TA: OP-TEE's
  early TAs are found first too.)

**Scope.**  Like :func:`~qtee.secure.register_ta` and
:func:`~qtee.secure.register_gp_ta`, :func:`register_ta_file` registers process-wide (a
``--ta-module`` registers on import and stays); ``world.tas.register_file(...)``
registers for one secure world only (:class:`~qtee.secure.TaRegistry`), and a world's
loaders look there first.  Each table is a :class:`TaFileTable`.  Each call returns a
:class:`TaFileRegistration`; a later registration of the same key shadows an earlier
one, and :meth:`TaFileRegistration.unregister` (or leaving it as a ``with`` block)
removes exactly that registration, in any order.  The pytest plugin's
``@pytest.mark.qtee_ta_file(cls, path=None, sha256=None)`` registers for one test and
unregisters after it.

**Matching.**  An image matches a SHA-256 registration when its bytes hash to it, or
when it is longer only by zero bytes (a memory object rounded up to pages): past the
length of a file registered by ``path``, or past the end of its ELF contents (the last
program or section header table, or segment).  What the loaders do with an image that
matches nothing is theirs (:mod:`qtee.secure._apps`, :mod:`qtee._optee.ta_image`).
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

from objects import UsageError

if TYPE_CHECKING:
    from qtee.secure._apps import TrustedApp
    from qtee.secure._gp import GpTA

__all__ = [
    "SHDR_BOOTSTRAP_TA",
    "SHDR_ENCRYPTED_TA",
    "SHDR_MAGIC",
    "SHDR_SUBKEY",
    "SHDR_TA",
    "SignedHeaderError",
    "TaFileRegistration",
    "TaFileTable",
    "elf_extent",
    "lookup_by_sha256",
    "lookup_by_uuid",
    "register_ta_file",
    "signed_header_uuid",
    "signed_ta_image",
]

World = Literal["qtee", "optee"]
Kind = Literal["sha256", "uuid"]

# ------------------------------------------------------------------ OP-TEE's signed header
# OP-TEE/optee_os:core/include/signed_hdr.h@0bee0f9c38cd5210b6489769de968cbda8f5e693
SHDR_MAGIC: Final = 0x4F545348
SHDR_TA: Final = 0
SHDR_BOOTSTRAP_TA: Final = 1
SHDR_ENCRYPTED_TA: Final = 2
SHDR_SUBKEY: Final = 3
_SHDR: Final = struct.Struct("<4I2H")  # magic, img_type, img_size, algo, hash_size, sig_size
_SUBKEY: Final = struct.Struct("<16s2I")  # shdr_subkey: uuid, name_size, subkey_version
_BOOTSTRAP: Final = struct.Struct("<16sI")  # shdr_bootstrap_ta: uuid, ta_version


class SignedHeaderError(ValueError):
    """The image starts with ``SHDR_MAGIC`` but its headers do not hold together."""


def _shdr_at(image: bytes, offs: int) -> tuple[int, int, int]:
    """``(img_type, img_size, header size)`` of the ``struct shdr`` at ``offs``."""
    if offs + _SHDR.size > len(image):
        raise SignedHeaderError(f"no room for a signed header at {offs}")
    magic, img_type, img_size, _algo, hash_size, sig_size = _SHDR.unpack_from(image, offs)
    if magic != SHDR_MAGIC:
        raise SignedHeaderError(f"no SHDR_MAGIC at {offs}")
    size = _SHDR.size + hash_size + sig_size
    if offs + size > len(image):
        raise SignedHeaderError("the signed header runs past the image")
    return img_type, img_size, size


def is_signed_image(image: bytes) -> bool:
    """Whether ``image`` starts with ``SHDR_MAGIC`` (OP-TEE refuses any other TA file)."""
    return len(image) >= 4 and struct.unpack_from("<I", image)[0] == SHDR_MAGIC


def signed_header_uuid(image: bytes) -> uuidlib.UUID | None:
    """The TA UUID in an OP-TEE signed image's headers, as ``ree_fs_ta_open`` reads it.

    None if ``image`` does not start with ``SHDR_MAGIC`` (not a signed image) or its TA
    header carries no UUID (``SHDR_TA``: the UUID is only in the ELF).  Subkey headers
    (``SHDR_SUBKEY``: ``shdr``, ``shdr_subkey`` and its name, then the next ``shdr``) are
    walked to the TA's header; ``SHDR_BOOTSTRAP_TA`` and ``SHDR_ENCRYPTED_TA`` are
    followed by ``struct shdr_bootstrap_ta``, whose first 16 bytes are the UUID octets.
    Raises :class:`SignedHeaderError` for a signed image whose headers are cut short or
    of an unknown type.
    """
    image = bytes(image)
    if len(image) < 4 or struct.unpack_from("<I", image)[0] != SHDR_MAGIC:
        return None
    offs = 0
    img_type, img_size, size = _shdr_at(image, offs)
    offs += size
    for _ in range(16):  # a chain of subkeys; OP-TEE bounds it by max_depth
        if img_type != SHDR_SUBKEY:
            break
        if offs + _SUBKEY.size > len(image):
            raise SignedHeaderError("the subkey header runs past the image")
        _uuid, name_size, _version = _SUBKEY.unpack_from(image, offs)
        offs += img_size + name_size
        img_type, img_size, size = _shdr_at(image, offs)
        offs += size
    if img_type == SHDR_TA:
        return None
    if img_type not in (SHDR_BOOTSTRAP_TA, SHDR_ENCRYPTED_TA):
        raise SignedHeaderError(f"signed header of image type {img_type}")
    if offs + _BOOTSTRAP.size > len(image):
        raise SignedHeaderError("the bootstrap TA header runs past the image")
    raw, _version = _BOOTSTRAP.unpack_from(image, offs)
    return uuidlib.UUID(bytes=raw)  # tee_uuid_from_octets: RFC 4122 byte order


#: ``TEE_ALG_RSASSA_PKCS1_V1_5_SHA256``, the algorithm of OP-TEE's default signing key.
_ALG_RSA_SHA256: Final = 0x7041_4930


def signed_ta_image(ta_uuid: uuidlib.UUID, elf: bytes = b"\x7fELF", version: int = 0) -> bytes:
    """A ``<uuid>.ta`` laid out as OP-TEE's signed format (``SHDR_BOOTSTRAP_TA``), for
    tests: ``struct shdr``, the SHA-256 over that header, the bootstrap header and the
    ELF (what ``ree_fs_ta.c`` checks), a zero 2048-bit signature that nothing verifies,
    ``struct shdr_bootstrap_ta`` (the UUID octets, ``version``), then ``elf``.  The model
    loads it for a TA registered by UUID or by its SHA-256; OP-TEE would refuse it."""
    elf = bytes(elf)
    head = _SHDR.pack(SHDR_MAGIC, SHDR_BOOTSTRAP_TA, len(elf), _ALG_RSA_SHA256, 32, 256)
    bootstrap = _BOOTSTRAP.pack(ta_uuid.bytes, version)
    digest = hashlib.sha256(head + bootstrap + elf).digest()
    return head + digest + bytes(256) + bootstrap + elf


# ------------------------------------------------------------------ ELF contents
_ELF_MAGIC: Final = b"\x7fELF"


def elf_extent(image: bytes) -> int | None:
    """Where an ELF file's contents end (headers, header tables, segments), or None."""
    if len(image) < 0x34 or not image.startswith(_ELF_MAGIC):
        return None
    cls, data = image[4], image[5]
    if data not in (1, 2) or cls not in (1, 2):
        return None
    e = "<" if data == 1 else ">"
    try:
        if cls == 2:  # ELF64
            phoff, shoff = struct.unpack_from(e + "QQ", image, 0x20)
            phentsize, phnum, shentsize, shnum = struct.unpack_from(e + "4H", image, 0x36)
            seg = struct.Struct(e + "IIQQQQQQ")
            off_i, filesz_i, end = 2, 5, 0x40
        else:  # ELF32
            phoff, shoff = struct.unpack_from(e + "II", image, 0x1C)
            phentsize, phnum, shentsize, shnum = struct.unpack_from(e + "4H", image, 0x2A)
            seg = struct.Struct(e + "8I")
            off_i, filesz_i, end = 1, 4, 0x34
        end = max(end, phoff + phentsize * phnum, shoff + shentsize * shnum if shnum else 0)
        if phnum and phentsize >= seg.size:
            for i in range(phnum):
                fields = seg.unpack_from(image, phoff + i * phentsize)
                end = max(end, fields[off_i] + fields[filesz_i])
    except struct.error:
        return None
    return int(end)


# ------------------------------------------------------------------ the registry


@dataclass(frozen=True, slots=True, eq=False)
class TaFileRegistration:
    """One :func:`register_ta_file`: the class ``cls`` for images with ``key``.

    ``world`` is ``"qtee"`` (IAppLoader) or ``"optee"`` (LOAD_TA); ``kind`` is
    ``"sha256"`` (``key`` the 32-byte digest) or ``"uuid"`` (``key`` the 16 UUID octets:
    any ``<uuid>.ta``); ``size`` is the length of the file it was read from, if any.
    """

    world: World
    kind: Kind
    key: bytes
    cls: type[Any]
    size: int | None = None
    _gone: list[bool] = field(default_factory=lambda: [False], repr=False)
    _table: TaFileTable | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        """``sha256:<hex>`` or ``uuid:<uuid>``: what the registration matches."""
        if self.kind == "uuid":
            return f"uuid:{uuidlib.UUID(bytes=self.key)}"
        return f"sha256:{self.key.hex()}"

    def unregister(self) -> None:
        """Remove this registration (an earlier one for the same key shows again).
        Idempotent."""
        table = self._table if self._table is not None else _DEFAULT
        table._remove(self)

    def __enter__(self) -> TaFileRegistration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unregister()


class TaFileTable:
    """One layer of TA-file registrations: SHA-256 keys per loader, GP UUIDs, and the
    lengths of the files registered by path (see Matching)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tables: dict[tuple[World, Kind], dict[bytes, list[TaFileRegistration]]] = {
            ("qtee", "sha256"): {},
            ("optee", "sha256"): {},
            ("optee", "uuid"): {},
        }
        #: Lengths of the files registered by path, per world (with a count each).
        self._sizes: dict[World, dict[int, int]] = {"qtee": {}, "optee": {}}

    def entries(self) -> list[TaFileRegistration]:
        """The registrations that are live now (the newest for each key first)."""
        with self._lock:
            return [
                reg
                for table in self._tables.values()
                for regs in table.values()
                for reg in reversed(regs)
            ]

    def register(
        self,
        cls: type[TrustedApp] | type[GpTA],
        path: str | os.PathLike[str] | None = None,
        *,
        sha256: str | bytes | None = None,
    ) -> TaFileRegistration:
        """:func:`register_ta_file` into this table."""
        reg = _registration(cls, path, sha256, self)
        with self._lock:
            self._tables[(reg.world, reg.kind)].setdefault(reg.key, []).append(reg)
            if reg.size is not None:
                sizes = self._sizes[reg.world]
                sizes[reg.size] = sizes.get(reg.size, 0) + 1
        return reg

    def _remove(self, reg: TaFileRegistration) -> None:
        with self._lock:
            if reg._gone[0]:
                return
            reg._gone[0] = True
            table = self._tables[(reg.world, reg.kind)]
            stack = table.get(reg.key, [])
            if reg in stack:
                stack.remove(reg)
            if not stack:
                table.pop(reg.key, None)
            if reg.size is not None:
                sizes = self._sizes[reg.world]
                sizes[reg.size] -= 1
                if not sizes[reg.size]:
                    del sizes[reg.size]

    def __len__(self) -> int:
        with self._lock:
            return sum(len(stack) for t in self._tables.values() for stack in t.values())

    def _candidates(self, world: World, image: bytes) -> list[bytes]:
        """The image, and its prefixes that leave only zero bytes behind (see Matching)."""
        out = [image]
        with self._lock:
            lengths = [n for n in self._sizes[world] if 0 < n < len(image)]
        extent = elf_extent(image)
        if extent is not None and 0 < extent < len(image):
            lengths.append(extent)
        for n in sorted(set(lengths), reverse=True):
            if not image[n:].strip(b"\0"):
                out.append(image[:n])
        return out

    def by_sha256(self, world: World, image: bytes) -> tuple[type[Any], bytes] | None:
        """The class registered here for ``image`` (or a zero-padded copy of it) and the
        digest it matched, or None."""
        image = bytes(image)
        table = self._tables[(world, "sha256")]
        with self._lock:
            if not table:
                return None
        for candidate in self._candidates(world, image):
            digest = hashlib.sha256(candidate).digest()
            with self._lock:
                stack = table.get(digest)
                if stack:
                    return stack[-1].cls, digest
        return None

    def by_uuid(self, uuid: uuidlib.UUID) -> type[GpTA] | None:
        """The GP TA registered here for any ``<uuid>.ta`` file, or None."""
        with self._lock:
            stack = self._tables[("optee", "uuid")].get(uuid.bytes)
            return stack[-1].cls if stack else None


#: The process-wide layer (what :func:`register_ta_file` fills).
_DEFAULT = TaFileTable()
# Its tables, under the names older code reads.
_LOCK = _DEFAULT._lock
_TABLES = _DEFAULT._tables
_SIZES = _DEFAULT._sizes


def _digest(sha256: str | bytes) -> bytes:
    if isinstance(sha256, str):
        try:
            raw = bytes.fromhex(sha256)
        except ValueError:
            raw = b""
        if len(raw) != 32:
            raise UsageError(f"a SHA-256 in hex is 64 hex digits, not {sha256!r}")
        return raw
    if isinstance(sha256, bytes | bytearray) and len(sha256) == 32:
        return bytes(sha256)
    raise UsageError("sha256= is the digest (64 hex digits or 32 bytes); pass path= to hash a file")


def register_ta_file(
    cls: type[TrustedApp] | type[GpTA],
    path: str | os.PathLike[str] | None = None,
    *,
    sha256: str | bytes | None = None,
) -> TaFileRegistration:
    """Make ``cls`` the TA of a real TA file (see the module docstring).

    * ``cls`` a :class:`~qtee.secure.TrustedApp`: give ``path`` (its bytes are hashed
      now) or ``sha256``; ``loadFromBuffer``/``loadFromRegion`` of those bytes load it.
    * ``cls`` a :class:`~qtee.secure._gp.GpTA`: ``path`` or ``sha256`` as above, for
      exactly that ``<uuid>.ta``; with neither, any ``<cls.UUID>.ta`` file.  A ``path``
      whose name is ``<uuid>.ta`` must name ``cls.UUID``, and its signed header, if it
      names a UUID, too (tee-supplicant would never hand it over for ``cls``).

    Returns the :class:`TaFileRegistration` (``unregister()``, or use it as a ``with``
    block).  Raises ``TypeError`` for another class, :class:`~objects.UsageError` for
    bad keys, ``OSError`` for a file that cannot be read.  Process-wide; one world's
    own: ``world.tas.register_file(...)``.
    """
    return _DEFAULT.register(cls, path, sha256=sha256)


def _registration(
    cls: type[TrustedApp] | type[GpTA],
    path: str | os.PathLike[str] | None,
    sha256: str | bytes | None,
    table: TaFileTable,
) -> TaFileRegistration:
    """Check the arguments of a registration and build it (not yet in ``table``)."""
    from qtee.secure._apps import TrustedApp
    from qtee.secure._gp import GpTA

    if path is not None and sha256 is not None:
        raise UsageError("give path or sha256, not both")
    world: World
    if isinstance(cls, type) and issubclass(cls, TrustedApp):
        world = "qtee"
        if path is None and sha256 is None:
            raise UsageError("a QTEE TA file is registered by path= or sha256=")
    elif isinstance(cls, type) and issubclass(cls, GpTA):
        world = "optee"
        if not isinstance(getattr(cls, "UUID", None), uuidlib.UUID):
            raise UsageError(f"{cls.__name__}.UUID must be a uuid.UUID")
    else:
        raise TypeError("a TA file's class is a TrustedApp or a GpTA subclass")
    size: int | None = None
    kind: Kind
    if path is not None:
        with open(path, "rb") as f:
            data = f.read()
        if world == "optee":
            _check_gp_file(cls, os.fspath(path), data)
        key, kind, size = hashlib.sha256(data).digest(), "sha256", len(data)
    elif sha256 is not None:
        key, kind = _digest(sha256), "sha256"
    else:
        key, kind = cls.UUID.bytes, "uuid"  # type: ignore[union-attr]
    return TaFileRegistration(world, kind, key, cls, size, _table=table)


def _check_gp_file(cls: type, path: str, data: bytes) -> None:
    want: uuidlib.UUID = cls.UUID  # type: ignore[attr-defined]
    stem, ext = os.path.splitext(os.path.basename(path))
    try:
        named = uuidlib.UUID(stem) if ext == ".ta" else None
    except ValueError:
        named = None
    if named is not None and named != want:
        raise UsageError(f"{path} is the file of TA {named}, not {cls.__name__} ({want})")
    try:
        inside = signed_header_uuid(data)
    except SignedHeaderError as exc:
        raise UsageError(f"{path}: {exc}") from None
    if inside is not None and inside != want:
        raise UsageError(f"{path} is signed for TA {inside}, not {cls.__name__} ({want})")


def lookup_by_sha256(world: World, image: bytes) -> tuple[type[Any], bytes] | None:
    """The class registered process-wide for ``image`` (or a zero-padded copy of it) and
    the digest it matched, or None."""
    return _DEFAULT.by_sha256(world, image)


def lookup_by_uuid(uuid: uuidlib.UUID) -> type[GpTA] | None:
    """The GP TA registered process-wide for any ``<uuid>.ta`` file, or None."""
    return _DEFAULT.by_uuid(uuid)
