"""TA autoload lookup (supplicant/_autoload.py): UUID naming, search order, file reading.

Checked against pkg-minkipc ``listeners/libtaautoload`` (spec quic-teec.md §5.4): the
16-byte TEEC_UUID becomes an uppercase 8-4-4-4-12 name, ``<UUID>.mbn`` is tried before
the split ``<UUID>.b00``, ``/data`` before ``/lib/qtee-tas/<compatible>/``.
"""

from __future__ import annotations

import errno
import os
import pickle
import struct
import uuid
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from objects import UsageError
from supplicant import TaDirectory, format_uuid
from supplicant._autoload import (
    DEFAULT_MAX_SIZE,
    TA_PATH_LIST,
    TaImageError,
    TaImageTooLargeError,
    TaSplitImageError,
    TaSymlinkEscapeError,
    TaUuidError,
    search_dirs,
)

PKCS11 = bytes.fromhex("DAC902FD 6C30 C748 A49C BBD827AE86EE")
PKCS11_NAME = "FD02C9DA-306C-48C7-A49C-BBD827AE86EE"
SEQ = bytes(range(16))
SEQ_NAME = "03020100-0504-0706-0809-0A0B0C0D0E0F"


# --------------------------------------------------------------------------- format_uuid


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        (PKCS11, PKCS11_NAME),
        (SEQ, SEQ_NAME),
        (bytes(16), "00000000-0000-0000-0000-000000000000"),
        (b"\xff" * 16, "FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF"),
        (
            bytes.fromhex("abcdef01 2345 6789 0a0b 0c0d0e0f1011"),
            "01EFCDAB-4523-8967-0A0B-0C0D0E0F1011",
        ),
    ],
)
def test_format_uuid_golden(raw: bytes, name: str) -> None:
    assert format_uuid(raw) == name
    assert format_uuid(bytearray(raw)) == name
    assert format_uuid(memoryview(raw)) == name


@given(st.binary(min_size=16, max_size=16))
def test_format_uuid_is_teec_uuid_in_little_endian_memory(raw: bytes) -> None:
    # A TEEC_UUID in aarch64 memory is exactly Python's "bytes_le" layout.
    assert format_uuid(raw) == str(uuid.UUID(bytes_le=raw)).upper()


@pytest.mark.parametrize("size", [0, 1, 15, 17, 32])
def test_format_uuid_wrong_length(size: int) -> None:
    with pytest.raises(TaUuidError) as info:
        format_uuid(bytes(size))
    assert str(info.value) == f"uuid is {size} bytes; a TEEC_UUID is exactly 16"
    assert isinstance(info.value, UsageError)
    assert isinstance(info.value, ValueError)


def test_format_uuid_wrong_type() -> None:
    with pytest.raises(TaUuidError, match=r"^uuid must be bytes-like, not str$"):
        format_uuid(PKCS11_NAME)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- search_dirs


def test_search_dirs_real_order() -> None:
    compatible = b"qcom,qcs6490-rb3gen2\0qcom,qcm6490\0"
    assert TA_PATH_LIST == ("/data", "/lib/qtee-tas")
    assert search_dirs(compatible) == [
        "/data/",
        "/lib/qtee-tas/qcs6490-rb3gen2/",
        "/lib/qtee-tas/qcm6490/",
    ]


def test_search_dirs_without_compatible_searches_no_qtee_tas_dir() -> None:
    assert search_dirs(None) == ["/data/"]
    assert search_dirs(b"") == ["/data/"]
    assert search_dirs(b"qcom,unterminated") == ["/data/"]


def test_search_dirs_prefix_rules() -> None:
    compatible = b"plain\0qcom,\0a,b,c\0qcom,../etc\0qcom,x/y\0..\0\0last\0tail"
    assert search_dirs(compatible, roots=("/r/qtee-tas/",)) == [
        "/r/qtee-tas/plain/",
        "/r/qtee-tas/qcom,/",
        "/r/qtee-tas/b,c/",
        "/r/qtee-tas/last/",
    ]


def test_search_dirs_custom_roots() -> None:
    assert search_dirs(b"qcom,sm8650\0", roots=("/a", "/b/", "/c/qtee-tas-x")) == [
        "/a/",
        "/b/",
        "/c/qtee-tas-x/sm8650/",
    ]


def test_search_dirs_usage_errors() -> None:
    with pytest.raises(UsageError, match=r"^compatible must be bytes or None, not str$"):
        search_dirs("qcom,x\0")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"^roots must be a sequence of non-empty str paths$"):
        search_dirs(None, roots="/data")
    with pytest.raises(UsageError, match=r"^roots must be a sequence of non-empty str paths$"):
        search_dirs(None, roots=("",))


# --------------------------------------------------------------------------- TaDirectory


def put(d: Path, name: str, data: bytes) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    path = d / name
    path.write_bytes(data)
    return path


def test_find_mbn(tmp_path: Path) -> None:
    put(tmp_path / "data", PKCS11_NAME + ".mbn", b"MBN-IMAGE")
    tas = TaDirectory([tmp_path / "data"])
    assert tas.dirs == (str(tmp_path / "data"),)
    assert tas.find(PKCS11) == b"MBN-IMAGE"
    assert tas.find(bytearray(PKCS11)) == b"MBN-IMAGE"
    assert tas.find(SEQ) is None


def test_lowercase_name_is_not_found(tmp_path: Path) -> None:
    put(tmp_path, PKCS11_NAME.lower() + ".mbn", b"x")
    put(tmp_path, PKCS11_NAME + ".elf", b"x")
    put(tmp_path, PKCS11_NAME, b"x")
    assert TaDirectory([tmp_path]).find(PKCS11) is None


def test_first_directory_wins(tmp_path: Path) -> None:
    first, second = tmp_path / "data", tmp_path / "qtee-tas" / "soc"
    put(first, SEQ_NAME + ".mbn", b"from-first")
    put(second, SEQ_NAME + ".mbn", b"from-second")
    put(second, PKCS11_NAME + ".mbn", b"only-second")
    tas = TaDirectory([str(first), second])
    assert tas.find(SEQ) == b"from-first"
    assert tas.find(PKCS11) == b"only-second"
    assert TaDirectory([second, first]).find(SEQ) == b"from-second"


def test_missing_everywhere(tmp_path: Path) -> None:
    put(tmp_path / "a", "other.mbn", b"x")
    tas = TaDirectory([tmp_path / "a", tmp_path / "absent", tmp_path / "a" / "other.mbn"])
    assert tas.find(PKCS11) is None
    assert TaDirectory([]).find(PKCS11) is None


def test_find_refuses_bad_uuid(tmp_path: Path) -> None:
    with pytest.raises(TaUuidError, match=r"^uuid is 15 bytes; a TEEC_UUID is exactly 16$"):
        TaDirectory([tmp_path]).find(bytes(15))


def test_symlink_escaping_the_directory_is_refused(tmp_path: Path) -> None:
    outside = put(tmp_path / "elsewhere", "secret", b"SECRET")
    d = tmp_path / "data"
    d.mkdir()
    (d / (PKCS11_NAME + ".mbn")).symlink_to(outside)
    put(tmp_path / "later", PKCS11_NAME + ".mbn", b"later")
    with pytest.raises(TaSymlinkEscapeError) as info:
        TaDirectory([d, tmp_path / "later"]).find(PKCS11)
    assert info.value.code == errno.EACCES
    link = d / (PKCS11_NAME + ".mbn")
    assert info.value.detail == f"{link} resolves to {outside}, outside {d}"
    assert isinstance(info.value, TaImageError)
    assert isinstance(info.value, OSError)


def test_relative_symlink_escape_and_dangling_escape_are_refused(tmp_path: Path) -> None:
    d = tmp_path / "data"
    d.mkdir()
    (d / (SEQ_NAME + ".mbn")).symlink_to("../nowhere")  # dangling, and outside
    with pytest.raises(TaSymlinkEscapeError):
        TaDirectory([d]).find(SEQ)
    (d / (PKCS11_NAME + ".b00")).symlink_to(Path("..") / ".." / "etc" / "passwd")
    with pytest.raises(TaSymlinkEscapeError):
        TaDirectory([d]).find(PKCS11)


def test_symlink_inside_the_directory_is_followed(tmp_path: Path) -> None:
    d = tmp_path / "data"
    put(d / "store", "real.bin", b"INSIDE")
    (d / (PKCS11_NAME + ".mbn")).symlink_to(Path("store") / "real.bin")
    assert TaDirectory([d]).find(PKCS11) == b"INSIDE"


def test_dangling_symlink_inside_is_absent(tmp_path: Path) -> None:
    d = tmp_path / "data"
    d.mkdir()
    (d / (PKCS11_NAME + ".mbn")).symlink_to("missing.bin")
    put(tmp_path / "next", PKCS11_NAME + ".mbn", b"NEXT")
    assert TaDirectory([d, tmp_path / "next"]).find(PKCS11) == b"NEXT"


def test_search_dir_that_is_a_symlink_is_fine(tmp_path: Path) -> None:
    put(tmp_path / "real", PKCS11_NAME + ".mbn", b"VIA-LINKED-DIR")
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    assert TaDirectory([tmp_path / "linked"]).find(PKCS11) == b"VIA-LINKED-DIR"


def test_size_limit(tmp_path: Path) -> None:
    put(tmp_path, PKCS11_NAME + ".mbn", b"x" * 101)
    put(tmp_path, SEQ_NAME + ".mbn", b"y" * 100)
    tas = TaDirectory([tmp_path], max_size=100)
    assert tas.find(SEQ) == b"y" * 100
    with pytest.raises(TaImageTooLargeError) as info:
        tas.find(PKCS11)
    assert info.value.code == errno.EFBIG
    assert (
        info.value.detail == f"{tmp_path / (PKCS11_NAME + '.mbn')} is 101 bytes; the limit is 100"
    )
    assert DEFAULT_MAX_SIZE == 16 * 1024 * 1024


def test_not_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / (PKCS11_NAME + ".mbn")).mkdir()
    with pytest.raises(TaImageError) as info:
        TaDirectory([tmp_path]).find(PKCS11)
    assert type(info.value) is TaImageError
    assert info.value.code == errno.EINVAL
    assert info.value.detail == f"{tmp_path / (PKCS11_NAME + '.mbn')} is not a regular file"
    os.mkfifo(tmp_path / (SEQ_NAME + ".mbn"))  # must not block
    with pytest.raises(TaImageError, match=r"is not a regular file$"):
        TaDirectory([tmp_path]).find(SEQ)


def test_errors_pickle() -> None:
    err = TaSymlinkEscapeError(errno.EACCES, "a -> b")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is TaSymlinkEscapeError
    assert (back.code, back.detail) == (errno.EACCES, "a -> b")


def test_constructor_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"^dirs must be a sequence of paths, not one path$"):
        TaDirectory(str(tmp_path))
    with pytest.raises(UsageError, match=r"^dirs must be a sequence of paths, not one path$"):
        TaDirectory(tmp_path)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"^a search dir must be a str or PathLike, not int$"):
        TaDirectory([3])  # type: ignore[list-item]
    with pytest.raises(UsageError, match=r"^search dir '' must be a non-empty str path$"):
        TaDirectory([""])
    with pytest.raises(UsageError, match=r"^max_size must be a positive int, not 0$"):
        TaDirectory([tmp_path], max_size=0)


# --------------------------------------------------------------------------- split images


def elf64_b00(offsets: list[int]) -> bytes:
    """An ELF64 header + program headers: phdr 0 describes .b00, phdr i has p_offset."""
    phnum = len(offsets) + 1
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    ehdr = ident + struct.pack("<HHIQQQIHHHHHH", 2, 183, 1, 0, 64, 0, 0, 64, 56, phnum, 0, 0, 0)
    assert len(ehdr) == 64
    phdrs = struct.pack("<IIQQQQQQ", 0, 0, 0, 0, 0, 0, 0, 0)
    for off in offsets:
        phdrs += struct.pack("<IIQQQQQQ", 1, 5, off, 0, 0, 0, 0, 0x1000)
    return ehdr + phdrs


def elf32_b00(offsets: list[int]) -> bytes:
    phnum = len(offsets) + 1
    ident = b"\x7fELF" + bytes([1, 1, 1]) + bytes(9)
    ehdr = ident + struct.pack("<HHIIIIIHHHHHH", 2, 40, 1, 0, 52, 0, 0, 52, 32, phnum, 0, 0, 0)
    assert len(ehdr) == 52
    phdrs = struct.pack("<8I", 0, 0, 0, 0, 0, 0, 0, 0)
    for off in offsets:
        phdrs += struct.pack("<8I", 1, off, 0, 0, 0, 0, 5, 0x1000)
    return ehdr + phdrs


def test_split_image_elf64(tmp_path: Path) -> None:
    b00 = elf64_b00([0x200, 0x300])
    assert len(b00) == 64 + 3 * 56
    put(tmp_path, PKCS11_NAME + ".b00", b00)
    put(tmp_path, PKCS11_NAME + ".b01", b"A" * 16)
    put(tmp_path, PKCS11_NAME + ".b02", b"BB")
    image = TaDirectory([tmp_path]).find(PKCS11)
    assert image == b00 + bytes(0x200 - len(b00)) + b"A" * 16 + bytes(0x300 - 0x210) + b"BB"
    assert image is not None
    assert len(image) == 0x302


def test_split_image_elf32_segment_overwrites_inside_b00(tmp_path: Path) -> None:
    b00 = elf32_b00([0x10])  # segment 1 lands inside the header file's bytes
    assert len(b00) == 52 + 2 * 32
    put(tmp_path, SEQ_NAME + ".b00", b00)
    put(tmp_path, SEQ_NAME + ".b01", b"\xee" * 8)
    assert TaDirectory([tmp_path]).find(SEQ) == b00[:0x10] + b"\xee" * 8 + b00[0x18:]


def test_split_image_with_one_segment_is_the_b00(tmp_path: Path) -> None:
    b00 = elf64_b00([])
    put(tmp_path, SEQ_NAME + ".b00", b00)
    assert TaDirectory([tmp_path]).find(SEQ) == b00


def test_split_segment_names_use_two_digits(tmp_path: Path) -> None:
    offsets = [0x400 + 0x10 * i for i in range(11)]  # segments 1 to 11
    put(tmp_path, SEQ_NAME + ".b00", elf64_b00(offsets))
    for i in range(1, 12):
        put(tmp_path, f"{SEQ_NAME}.b{i:02d}", bytes([i]) * 0x10)
    image = TaDirectory([tmp_path]).find(SEQ)
    assert image is not None
    assert image[0x400:] == b"".join(bytes([i]) * 0x10 for i in range(1, 12))


def test_mbn_beats_b00_in_the_same_directory(tmp_path: Path) -> None:
    put(tmp_path, SEQ_NAME + ".b00", b"not even an ELF")
    put(tmp_path, SEQ_NAME + ".mbn", b"MBN")
    assert TaDirectory([tmp_path]).find(SEQ) == b"MBN"


def test_split_in_first_directory_beats_mbn_in_second(tmp_path: Path) -> None:
    b00 = elf64_b00([])
    put(tmp_path / "one", SEQ_NAME + ".b00", b00)
    put(tmp_path / "two", SEQ_NAME + ".mbn", b"MBN")
    assert TaDirectory([tmp_path / "one", tmp_path / "two"]).find(SEQ) == b00


def test_split_missing_segment(tmp_path: Path) -> None:
    put(tmp_path, SEQ_NAME + ".b00", elf64_b00([0x200, 0x300]))
    put(tmp_path, SEQ_NAME + ".b01", b"A")
    with pytest.raises(TaSplitImageError) as info:
        TaDirectory([tmp_path]).find(SEQ)
    assert info.value.code == errno.ENOEXEC
    assert info.value.detail == f"{SEQ_NAME}.b02 is missing from {tmp_path}"


@pytest.mark.parametrize(
    ("b00", "why"),
    [
        (b"\x7fELF" + bytes([2]) + bytes(50), " does not start with an ELF header"),
        (b"\x7fELG" + bytes([2]) + bytes(100), " does not start with an ELF header"),
        (b"\x7fELF" + bytes([3]) + bytes(100), " has unknown ELF class 3"),
        (elf64_b00([0x200])[:100], ": the program headers lie outside the file"),
    ],
)
def test_split_malformed_header(tmp_path: Path, b00: bytes, why: str) -> None:
    put(tmp_path, SEQ_NAME + ".b00", b00)
    with pytest.raises(TaSplitImageError) as info:
        TaDirectory([tmp_path]).find(SEQ)
    assert info.value.detail == f"{tmp_path / (SEQ_NAME + '.b00')}{why}"


def test_split_image_size_limit(tmp_path: Path) -> None:
    put(tmp_path, SEQ_NAME + ".b00", elf64_b00([0x3F0]))
    put(tmp_path, SEQ_NAME + ".b01", b"z" * 0x10)
    assert TaDirectory([tmp_path], max_size=0x400).find(SEQ) is not None
    with pytest.raises(TaImageTooLargeError, match=r"is 16 bytes; the limit is 15$"):
        TaDirectory([tmp_path], max_size=0x3FF).find(SEQ)
    with pytest.raises(TaImageTooLargeError, match=r"segment 1 at offset 1008 passes"):
        TaDirectory([tmp_path], max_size=0x3F0).find(SEQ)
