"""TA autoload: where the supplicant finds the image QTEE asks for by UUID.

QTEE calls ``IRequestTABuffer.get(uuid)`` on the supplicant's callback object when a
client opens a TA that is not loaded yet.  The facts below come from
``qualcomm-linux/pkg-minkipc:listeners/libtaautoload/src/`` (``CRequestTABuffer.cpp``
and ``.h``, ``TaAutoLoad.cpp``) and the ``taImageReader.cpp`` the same code uses.  Only
facts were taken: names, order and layout.

**UUID to name** (:func:`format_uuid`).  The 16 bytes are a ``TEEC_UUID`` in memory:
``u32 timeLow, u16 timeMid, u16 timeHiAndVersion, u8 clockSeqAndNode[8]``, read in the
machine's byte order, which is little-endian on aarch64.  The name is
``"%08X-%04X-%04X-%02X%02X-%02X%02X%02X%02X%02X%02X"``: uppercase, 8-4-4-4-12.  So the
first three groups show their bytes reversed and the last two as stored::

    DA C9 02 FD 6C 30 C7 48 A4 9C BB D8 27 AE 86 EE
    -> FD02C9DA-306C-48C7-A49C-BBD827AE86EE

Any length other than 16 is refused (the real ``get`` answers ``Object_ERROR``); here
it is :class:`TaUuidError`.

**Search order** (:func:`search_dirs`).  The real list is ``/data`` then
``/lib/qtee-tas``.  Each gets a trailing ``/``.  A root whose path contains
``qtee-tas`` is not searched itself: it is replaced by one directory per entry of the
device tree's ``compatible`` property (NUL-terminated strings, in order), with the
vendor prefix (everything up to the first comma) removed when the comma is not the
last character.  ``qcom,qcs6490-rb3gen2`` gives ``/lib/qtee-tas/qcs6490-rb3gen2/``.  If
the property is missing or empty, no ``qtee-tas`` directory is searched.

**File names** (:class:`TaDirectory`).  In each directory in turn, the first of these
that exists wins, and later directories are not looked at:

1. ``<UUID>.mbn``: the whole image, returned as is.
2. ``<UUID>.b00``: a split image.  ``.b00`` holds the ELF header and program headers;
   segment *i* (1 <= *i* < ``e_phnum``) is in ``<UUID>.bNN`` (*NN* = *i*, two decimal
   digits) and is copied to its ``p_offset``.  The image grows to cover every segment,
   and gaps are zero.

**Differences from the real service**, each chosen on purpose:

* The real code follows any symlink.  Here a symlink (or a path) that resolves outside
  its search directory is refused with :class:`TaSymlinkEscapeError`; one that stays
  inside is followed (the resolved path is opened with ``O_NOFOLLOW``, so a last
  component swapped for a link in between fails instead).  A dangling link inside the
  directory counts as absent.  Only regular files are read (a FIFO never blocks).
* Images larger than ``max_size`` (16 MiB by default) are refused with
  :class:`TaImageTooLargeError`; the real code has no limit.
* When an image is present but cannot be read, or a split image is broken (a bad ELF
  header, a program header table outside ``.b00``, a missing segment file), the real
  code quietly tries the next directory.  Here it raises :class:`TaImageError` (or
  :class:`TaSplitImageError`), because the first directory that has the image is the one
  that answers.
* The real split reader takes ``e_phnum`` from the 64-bit header even for a 32-bit
  ELF, and names segments past 9 by overwriting one character.  Here each class uses
  its own header fields, and segment files have two-digit numbers (the same names for
  segments 1 to 9).
* A ``compatible`` entry that is empty, ``.``, ``..`` or contains ``/`` gives no
  directory (the real code would build the path anyway).
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from objects import UsageError
from supplicant._errno import ErrnoFailure

__all__ = [
    "COMPATIBLE_PATH",
    "DEFAULT_MAX_SIZE",
    "TA_PATH_LIST",
    "TaDirectory",
    "TaImageError",
    "TaImageTooLargeError",
    "TaSplitImageError",
    "TaSymlinkEscapeError",
    "TaUuidError",
    "UUID_LEN",
    "format_uuid",
    "search_dirs",
]

UUID_LEN: Final = 16  # sizeof(TEEC_UUID)
TA_PATH_LIST: Final = ("/data", "/lib/qtee-tas")
COMPATIBLE_PATH: Final = "/sys/firmware/devicetree/base/compatible"
DEFAULT_MAX_SIZE: Final = 16 * 1024 * 1024
_SPLIT_MARKER: Final = "qtee-tas"
_MAX_SEGMENTS: Final = 100  # two-digit segment names: .b00 to .b99

_UUID = struct.Struct("<IHH8s")
_U16: Final = struct.Struct("<H")


@dataclass(frozen=True, slots=True)
class _ElfClass:
    """Where an ELF class keeps what a split image's rebuild reads: ``e_phoff`` and
    ``p_offset`` are one ``word`` wide, ``e_phnum`` a u16."""

    word: struct.Struct
    phoff_at: int
    phnum_at: int
    phentsize: int
    p_offset_at: int


_ELF_CLASSES: Final = {
    1: _ElfClass(struct.Struct("<I"), phoff_at=28, phnum_at=44, phentsize=32, p_offset_at=4),
    2: _ElfClass(struct.Struct("<Q"), phoff_at=32, phnum_at=56, phentsize=56, p_offset_at=8),
}


class TaUuidError(UsageError):
    """The uuid given to ``get`` is not exactly 16 bytes (or not bytes at all)."""


class TaImageError(ErrnoFailure):
    """A TA image is present but cannot be served (the errno says why)."""


class TaSymlinkEscapeError(TaImageError):
    """An image path resolves outside its search directory (errno EACCES)."""


class TaImageTooLargeError(TaImageError):
    """An image is larger than the directory's ``max_size`` (errno EFBIG)."""


class TaSplitImageError(TaImageError):
    """A split image (``.b00`` and its segments) is malformed or incomplete (ENOEXEC)."""


def format_uuid(raw: bytes | bytearray | memoryview) -> str:
    """The file-name stem for a 16-byte ``TEEC_UUID``: uppercase 8-4-4-4-12."""
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise TaUuidError(f"uuid must be bytes-like, not {type(raw).__name__}")
    data = bytes(raw)
    if len(data) != UUID_LEN:
        raise TaUuidError(f"uuid is {len(data)} bytes; a TEEC_UUID is exactly {UUID_LEN}")
    time_low, time_mid, time_hi, node = _UUID.unpack(data)
    seq, rest = bytes(node[:2]).hex().upper(), bytes(node[2:]).hex().upper()
    return f"{time_low:08X}-{time_mid:04X}-{time_hi:04X}-{seq}-{rest}"


def _compatible_names(compatible: bytes) -> list[str]:
    names = []
    # Only NUL-terminated entries count; bytes after the last NUL are ignored.
    for entry in compatible.split(b"\0")[:-1]:
        comma = entry.find(b",")
        name = entry[comma + 1 :] if 0 <= comma < len(entry) - 1 else entry
        text = os.fsdecode(name)
        if text in ("", ".", "..") or "/" in text:
            continue
        names.append(text)
    return names


def search_dirs(compatible: bytes | None, roots: Sequence[str] = TA_PATH_LIST) -> list[str]:
    """The directories the real service searches, in order, for this ``compatible``.

    ``compatible`` is the raw device-tree property (read it from :data:`COMPATIBLE_PATH`),
    or ``None`` if it could not be read.
    """
    if compatible is not None and not isinstance(compatible, bytes):
        raise UsageError(f"compatible must be bytes or None, not {type(compatible).__name__}")
    if isinstance(roots, str) or not all(isinstance(r, str) and r for r in roots):
        raise UsageError("roots must be a sequence of non-empty str paths")
    dirs: list[str] = []
    for root in roots:
        base = root if root.endswith("/") else root + "/"
        if _SPLIT_MARKER not in base:
            dirs.append(base)
            continue
        names = _compatible_names(compatible or b"")
        if not names:
            break  # the real code stops building the list here
        dirs.extend(f"{base}{name}/" for name in names)
    return dirs


class TaDirectory:
    """The TA images in an ordered list of directories, found by UUID."""

    __slots__ = ("_dirs", "_max_size")

    def __init__(
        self,
        dirs: Sequence[str | os.PathLike[str]],
        *,
        max_size: int = DEFAULT_MAX_SIZE,
    ) -> None:
        if isinstance(dirs, str | bytes | os.PathLike):
            raise UsageError("dirs must be a sequence of paths, not one path")
        checked: list[str] = []
        for d in dirs:
            if not isinstance(d, str | os.PathLike):
                raise UsageError(f"a search dir must be a str or PathLike, not {type(d).__name__}")
            path = os.fspath(d)
            if not isinstance(path, str) or not path:
                raise UsageError(f"search dir {d!r} must be a non-empty str path")
            checked.append(path)
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
            raise UsageError(f"max_size must be a positive int, not {max_size!r}")
        self._dirs = tuple(checked)
        self._max_size = max_size

    @property
    def dirs(self) -> tuple[str, ...]:
        """The search directories, in search order."""
        return self._dirs

    def find(self, raw_uuid: bytes | bytearray | memoryview) -> bytes | None:
        """The image for ``raw_uuid`` from the first directory that has one; ``None`` if none."""
        name = format_uuid(raw_uuid)
        for d in self._dirs:
            image = self._read(d, name + ".mbn")
            if image is not None:
                return image
            header = self._read(d, name + ".b00")
            if header is not None:
                return self._join_split(d, name, header)
        return None

    # ------------------------------------------------------------------ reading

    def _read(self, d: str, filename: str, *, limit: int | None = None) -> bytes | None:
        """The contents of ``d/filename``; ``None`` if there is no such entry."""
        limit = self._max_size if limit is None else limit
        path = os.path.join(d, filename)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            return None
        except OSError as exc:
            raise TaImageError(exc.errno or errno.EIO, f"{path}: {exc.strerror}") from None
        real_dir = os.path.realpath(d)
        real = os.path.realpath(path)
        if real == real_dir or os.path.commonpath([real_dir, real]) != real_dir:
            raise TaSymlinkEscapeError(
                errno.EACCES, f"{path} resolves to {real}, outside {real_dir}"
            )
        if stat.S_ISLNK(st.st_mode) and not os.path.lexists(real):
            return None  # a dangling link inside the directory: no image
        flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(real, flags | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TaImageError(exc.errno or errno.EIO, f"{path}: {exc.strerror}") from None
        try:
            fst = os.fstat(fd)
            if not stat.S_ISREG(fst.st_mode):
                raise TaImageError(errno.EINVAL, f"{path} is not a regular file")
            if fst.st_size > limit:
                raise TaImageTooLargeError(
                    errno.EFBIG, f"{path} is {fst.st_size} bytes; the limit is {limit}"
                )
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(limit + 1)
        finally:
            os.close(fd)
        if len(data) > limit:
            raise TaImageTooLargeError(
                errno.EFBIG, f"{path} grew past the {limit}-byte limit while read"
            )
        return data

    def _join_split(self, d: str, name: str, header: bytes) -> bytes:
        """Rebuild a split image from its ``.b00`` header file and its segment files."""
        where = os.path.join(d, name + ".b00")
        if len(header) < 64 or header[:4] != b"\x7fELF":
            raise TaSplitImageError(errno.ENOEXEC, f"{where} does not start with an ELF header")
        elf = _ELF_CLASSES.get(header[4])  # EI_CLASS
        if elf is None:
            raise TaSplitImageError(errno.ENOEXEC, f"{where} has unknown ELF class {header[4]}")
        (phoff,) = elf.word.unpack_from(header, elf.phoff_at)
        (phnum,) = _U16.unpack_from(header, elf.phnum_at)
        phentsize = elf.phentsize
        if phnum > _MAX_SEGMENTS:
            raise TaSplitImageError(
                errno.ENOEXEC, f"{where} has {phnum} segments; at most {_MAX_SEGMENTS}"
            )
        if phnum and phoff + phnum * phentsize > len(header):
            raise TaSplitImageError(
                errno.ENOEXEC, f"{where}: the program headers lie outside the file"
            )
        image = bytearray(header)
        for seg in range(1, phnum):
            (offset,) = elf.word.unpack_from(header, phoff + seg * phentsize + elf.p_offset_at)
            if offset >= self._max_size:
                raise TaImageTooLargeError(
                    errno.EFBIG,
                    f"{where}: segment {seg} at offset {offset} passes the {self._max_size}"
                    "-byte limit",
                )
            part = self._read(d, f"{name}.b{seg:02d}", limit=self._max_size - offset)
            if part is None:
                raise TaSplitImageError(errno.ENOEXEC, f"{name}.b{seg:02d} is missing from {d}")
            end = offset + len(part)
            if end > len(image):
                image.extend(bytes(end - len(image)))
            image[offset:end] = part
        return bytes(image)
