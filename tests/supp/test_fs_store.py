"""The FS listener: its codec (supplicant/fs_msg.py) and its backend (supplicant/_fs.py).

Numbers and layouts are checked against pkg-minkipc ``listeners/libfsservice/fs/fs_msg.h``
(spec quic-teec.md §5.4: FS commands start at 0x201, listener id 0xA, 20 KiB buffer).

Fuzz invariant: decoding any bytes, and handling any bytes, either succeeds or raises
FsDecodeError, and nothing else.
Model invariant: after every step, FileStore agrees with a dict of committed and pending
contents.  Every fd number, read, offset and errno matches, and a restart shows exactly
the committed contents.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from objects import DecodeError
from supplicant import FileStore, FsError
from supplicant._fs_paths import TEMP_PREFIX
from supplicant.fs_msg import (
    MAX_DATA_LEN,
    CloseRequest,
    CreatRequest,
    DirCloseRequest,
    Dirent,
    DirOpenRequest,
    DirOpenResponse,
    DirReadRequest,
    DirReadResponse,
    EndRequest,
    FsCmd,
    FsDecodeError,
    FsOpenFlag,
    FsRequest,
    FsResponse,
    FsResult,
    FsUsageError,
    GetErrnoRequest,
    LseekRequest,
    MkdirRequest,
    OpenRequest,
    ReadRequest,
    ReadResponse,
    RemoveRequest,
    RenameRequest,
    StatusResponse,
    SyncRequest,
    UnlinkRequest,
    UnsupportedRequest,
    WriteRequest,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    response_size,
)

RD, WR, RW = 0, 1, 2
CREAT, EXCL, TRUNC, APPEND = 0o100, 0o200, 0o1000, 0o2000


def errno_of(exc: pytest.ExceptionInfo[FsError]) -> str:
    return errno.errorcode[exc.value.errno or 0]


def wire(s: FileStore, req: FsRequest) -> FsResponse:
    return decode_response(s.handle(encode_request(req)))


def pending_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(TEMP_PREFIX)]


# ============================================================================ codec: facts


def test_command_numbers_match_fs_msg_h() -> None:
    # tz_fs_msg_cmd_type counts up from TZ_FS_MSG_CMD_FILE_START = 0x201.
    expected = {
        "FILE_OPEN": 0x202, "FILE_CREAT": 0x206, "FILE_READ": 0x207, "FILE_WRITE": 0x208,
        "FILE_CLOSE": 0x209, "FILE_LSEEK": 0x20A, "FILE_UNLINK": 0x20C, "FILE_FSTAT": 0x20E,
        "FILE_MKDIR": 0x210, "FILE_REMOVE": 0x213, "FILE_SYNC": 0x216, "FILE_RENAME": 0x217,
        "DIR_OPEN": 0x219, "DIR_READ": 0x21A, "DIR_CLOSE": 0x21B, "FILE_GET_ERRNO": 0x21C,
        "FILE_END": 0x21D,
    }  # fmt: skip
    for name, value in expected.items():
        assert FsCmd[name] == value
    assert [int(c) for c in FsCmd] == list(range(0x201, 0x21E))
    assert int(FsResult.DIR_NOT_EXIST) == -3


def test_golden_request_bytes() -> None:
    path = b"dir/f".ljust(256, b"\0")
    assert encode_request(OpenRequest(path="dir/f", flags=0o102)) == (
        b"\x02\x02\x00\x00" + path + b"\x42\x00\x00\x00"
    )
    w = encode_request(WriteRequest(fd=3, data=b"xyz"))
    assert len(w) == 20012
    assert w[:11] == b"\x08\x02\x00\x00\x03\x00\x00\x00xyz"
    assert w[11:20008] == bytes(19997)
    assert w[20008:] == b"\x03\x00\x00\x00"
    assert encode_request(ReadRequest(fd=3, count=100)) == struct.pack("<IiI", 0x207, 3, 100)
    assert encode_request(LseekRequest(fd=1, offset=-2, whence=2)) == struct.pack(
        "<Iiii", 0x20A, 1, -2, 2
    )
    r = encode_request(RenameRequest(old="a", new="b"))
    assert r == struct.pack("<I", 0x217) + b"a".ljust(256, b"\0") + b"b".ljust(256, b"\0")
    assert encode_request(DirReadRequest(pdir=7)) == struct.pack("<IQ", 0x21A, 7)
    assert encode_request(GetErrnoRequest()) == b"\x1c\x02\x00\x00"
    assert len(encode_request(CreatRequest(path="a", mode=0o644))) == 264
    assert len(encode_request(MkdirRequest(path="a", mode=0o700))) == 264
    assert len(encode_request(UnlinkRequest(path="a"))) == 260


def test_golden_response_bytes() -> None:
    assert (
        encode_response(StatusResponse(cmd_id=0x209, ret=-1)) == b"\x09\x02\x00\x00" + b"\xff" * 4
    )
    rr = encode_response(ReadResponse(data=b"ab", ret=2))
    assert len(rr) == 20008 == response_size(FsCmd.FILE_READ)
    assert rr[:6] == b"\x07\x02\x00\x00ab" and rr[-4:] == b"\x02\x00\x00\x00"
    assert encode_response(DirOpenResponse(pdir=1, ret=0)) == struct.pack("<IQi", 0x219, 1, 0)
    entry = Dirent(ino=9, off=1, reclen=24, type=8, name="f")
    dr = encode_response(DirReadResponse(entry=entry, ret=0))
    assert len(dr) == 283 == 4 + (8 + 8 + 2 + 1 + 256) + 4
    assert dr[:23] == struct.pack("<IQqHB", 0x21A, 9, 1, 24, 8) and dr[23:25] == b"f\0"
    end = encode_response(DirReadResponse(entry=None, ret=0))
    assert decode_response(end) == DirReadResponse(entry=None, ret=0)


def test_decode_accepts_the_whole_shared_buffer() -> None:
    buf = bytearray(20 * 1024)
    buf[:264] = encode_request(OpenRequest(path="x", flags=0))
    assert decode_request(buf) == OpenRequest(path="x", flags=0)


def test_write_count_is_clamped_like_the_real_service() -> None:
    raw = bytearray(encode_request(WriteRequest(fd=1, data=b"a" * MAX_DATA_LEN)))
    raw[-4:] = struct.pack("<I", 0xFFFF_FFFF)
    assert decode_request(bytes(raw)) == WriteRequest(fd=1, data=b"a" * MAX_DATA_LEN)


@pytest.mark.parametrize(
    ("raw", "what"),
    [
        (b"", "command id"),
        (b"\x02\x02", "command id"),
        (b"\x02\x02\x00\x00" + b"x" * 100, "FILE_OPEN request is 104 bytes"),
        (b"\x02\x02\x00\x00" + b"x" * 260, "no NUL"),
        (struct.pack("<I", 0x217) + b"a".ljust(256, b"\0") + b"b" * 256, "new path has no NUL"),
        (struct.pack("<Ii", 0x208, 1), "FILE_WRITE request"),
    ],
)
def test_malformed_requests_raise_fs_decode_error(raw: bytes, what: str) -> None:
    with pytest.raises(FsDecodeError, match=what) as exc:
        decode_request(raw)
    assert isinstance(exc.value, DecodeError)


def test_unknown_ids_decode_to_unsupported() -> None:
    assert decode_request(struct.pack("<I", 0x20E)) == UnsupportedRequest(cmd_id=0x20E)
    assert decode_request(b"\xff\xff\xff\x7f") == UnsupportedRequest(cmd_id=0x7FFFFFFF)


def test_records_validate_their_fields() -> None:
    with pytest.raises(FsUsageError, match="OPEN path is 256 bytes"):
        OpenRequest(path="a" * 256, flags=0)
    with pytest.raises(FsUsageError, match="NUL"):
        UnlinkRequest(path="a\0b")
    with pytest.raises(FsUsageError, match="WRITE data is 20001 bytes"):
        WriteRequest(fd=1, data=bytes(20001))
    with pytest.raises(FsUsageError, match="READ fd must be an int"):
        ReadRequest(fd="1", count=1)  # type: ignore[arg-type]
    with pytest.raises(FsUsageError, match="is supported"):
        UnsupportedRequest(cmd_id=0x202)
    with pytest.raises(FsUsageError, match="ret is 3"):
        ReadResponse(data=b"ab", ret=3)
    with pytest.raises(FsUsageError, match="own response record"):
        StatusResponse(cmd_id=FsCmd.FILE_READ, ret=0)
    with pytest.raises(FsUsageError, match="one non-empty path component"):
        Dirent(ino=1, off=0, reclen=0, type=0, name="a/b")
    with pytest.raises(FsUsageError, match="not an FS request"):
        encode_request("open")  # type: ignore[arg-type]


# ============================================================================ codec: properties

paths = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=60)
i32 = st.integers(-(2**31), 2**31 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
requests = st.one_of(
    st.builds(OpenRequest, path=paths, flags=i32),
    st.builds(CreatRequest, path=paths, mode=u32),
    st.builds(ReadRequest, fd=i32, count=u32),
    st.builds(WriteRequest, fd=i32, data=st.binary(max_size=300)),
    st.builds(CloseRequest, fd=i32),
    st.builds(SyncRequest, fd=i32),
    st.builds(LseekRequest, fd=i32, offset=i32, whence=i32),
    st.builds(UnlinkRequest, path=paths),
    st.builds(RemoveRequest, path=paths),
    st.builds(MkdirRequest, path=paths, mode=u32),
    st.builds(RenameRequest, old=paths, new=paths),
    st.builds(DirOpenRequest, path=paths),
    st.builds(DirReadRequest, pdir=u64),
    st.builds(DirCloseRequest, pdir=u64),
    st.just(GetErrnoRequest()),
    st.just(EndRequest()),
    st.builds(UnsupportedRequest, cmd_id=u32.filter(lambda c: not 0x202 <= c <= 0x21D)),
)
names = st.text(st.characters(codec="utf-8", exclude_characters="\0/"), min_size=1, max_size=40)
responses = st.one_of(
    st.builds(
        StatusResponse,
        cmd_id=u32.filter(lambda c: c not in (0x207, 0x219, 0x21A)),
        ret=i32,
    ),
    st.binary(max_size=200).map(lambda d: ReadResponse(data=d, ret=len(d))),
    st.integers(-(2**31), -1).map(lambda r: ReadResponse(data=b"", ret=r)),
    st.builds(DirOpenResponse, pdir=u64, ret=i32),
    st.builds(
        DirReadResponse,
        entry=st.builds(
            Dirent,
            ino=st.integers(1, 2**64 - 1),
            off=st.integers(-(2**63), 2**63 - 1),
            reclen=st.integers(0, 0xFFFF),
            type=st.integers(0, 255),
            name=names,
        ),
        ret=st.just(0),
    ),
    st.builds(DirReadResponse, entry=st.none(), ret=i32),
)


@given(requests, st.binary(max_size=16))
def test_request_round_trip(req: FsRequest, tail: bytes) -> None:
    assert decode_request(encode_request(req) + tail) == req


@given(responses)
def test_response_round_trip(rsp: FsResponse) -> None:
    raw = encode_response(rsp)
    assert len(raw) == response_size(int.from_bytes(raw[:4], "little"))
    assert decode_response(raw) == rsp


@settings(max_examples=300)
@given(st.binary(max_size=600))
def test_fuzz_decoders_raise_only_fs_decode_error(raw: bytes) -> None:
    for decode in (decode_request, decode_response):
        with contextlib.suppress(FsDecodeError):
            decode(raw)


@settings(max_examples=100)
@given(requests, st.data())
def test_fuzz_mutated_and_truncated_requests(req: FsRequest, data: st.DataObject) -> None:
    raw = bytearray(encode_request(req))
    for i in data.draw(st.lists(st.integers(0, len(raw) - 1), max_size=4)):
        raw[i] = data.draw(st.integers(0, 255))
    for cut in {0, 1, 3, 4, len(raw) // 2, len(raw) - 1, len(raw)}:
        with contextlib.suppress(FsDecodeError):
            decode_request(bytes(raw[:cut]))


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cmd=st.integers(0x200, 0x21E), body=st.binary(max_size=600))
def test_fuzz_handle_raises_only_fs_decode_error(tmp_path: Path, cmd: int, body: bytes) -> None:
    s = FileStore(tmp_path)
    try:
        raw = s.handle(struct.pack("<I", cmd) + body)
    except FsDecodeError:
        return
    finally:
        s.close_all()
    assert decode_response(raw) is not None


# ============================================================================ operations


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


@pytest.fixture
def fs(root: Path) -> Iterator[FileStore]:
    s = FileStore(root)
    yield s
    s.close_all()


def test_open_create_write_read_close(fs: FileStore, root: Path) -> None:
    fd = fs.open("a", RW | CREAT)
    assert fd == 1
    assert (root / "a").read_bytes() == b""  # O_CREAT makes the empty file durable at once
    assert fs.write(fd, b"hello world") == 11
    assert (root / "a").read_bytes() == b""  # not acknowledged yet
    assert fs.lseek(fd, 6, os.SEEK_SET) == 6
    assert fs.read(fd, 100) == b"world"  # pending contents are visible
    assert fs.read(fd, 100) == b""
    fs.close(fd)
    assert (root / "a").read_bytes() == b"hello world"
    assert pending_files(root) == []


def test_fds_are_lowest_free_from_one(fs: FileStore) -> None:
    a, b, c = (fs.open(n, WR | CREAT) for n in "abc")
    assert (a, b, c) == (1, 2, 3)
    fs.close(b)
    assert fs.open("b", RD) == 2
    with pytest.raises(FsError) as exc:
        fs.open("missing", RD)  # a failure consumes no fd
    assert errno_of(exc) == "ENOENT"
    assert fs.open("c", RD) == 4


@pytest.mark.parametrize(
    ("setup", "path", "flags", "err"),
    [
        (False, "nope", RD, "ENOENT"),
        (False, "no/dir", RD, "ENOENT"),
        (True, "f", WR | CREAT | EXCL, "EEXIST"),
        (True, "f", RD | TRUNC, "EINVAL"),
        (True, "f", 3, "EINVAL"),
        (True, "f", RD | 0o40000, "EINVAL"),  # O_DIRECTORY is not served
        (True, "d", RD, "EISDIR"),
        (True, ".", RD, "EISDIR"),
        (True, "f/x", RD | CREAT, "ENOTDIR"),
        (False, "", RD, "ENOENT"),
        (False, "a" * 256, RD, "ENAMETOOLONG"),
        (False, "a\0b", RD, "EINVAL"),
    ],
)
def test_open_errors(
    fs: FileStore, root: Path, setup: bool, path: str, flags: int, err: str
) -> None:
    if setup:
        (root / "f").write_bytes(b"x")
        (root / "d").mkdir()
    with pytest.raises(FsError) as exc:
        fs.open(path, flags)
    assert errno_of(exc) == err
    assert fs.open("z", WR | CREAT) == 1


def test_open_creates_missing_parents_like_the_real_service(fs: FileStore, root: Path) -> None:
    fs.close(fs.open("x/y/z", WR | CREAT))
    assert (root / "x/y/z").is_file()


def test_truncate_append_and_sparse_writes(fs: FileStore, root: Path) -> None:
    (root / "f").write_bytes(b"0123456789")
    fd = fs.open("f", WR | APPEND)
    fs.lseek(fd, 0, os.SEEK_SET)
    fs.write(fd, b"AB")  # O_APPEND writes at the end whatever the position
    assert fs.lseek(fd, 0, os.SEEK_CUR) == 12
    fs.close(fd)
    assert (root / "f").read_bytes() == b"0123456789AB"
    fd = fs.open("f", RW | TRUNC)
    assert fs.lseek(fd, 0, os.SEEK_END) == 0
    assert (root / "f").read_bytes() == b"0123456789AB"  # truncation is pending too
    fs.lseek(fd, 3, os.SEEK_SET)
    fs.write(fd, b"z")
    fs.close(fd)
    assert (root / "f").read_bytes() == b"\0\0\0z"


def test_lseek_errors(fs: FileStore) -> None:
    fd = fs.open("f", RW | CREAT)
    for off, whence in [(-1, os.SEEK_SET), (0, 3), (2**31, os.SEEK_SET)]:
        with pytest.raises(FsError) as exc:
            fs.lseek(fd, off, whence)
        assert errno_of(exc) == "EINVAL"
    assert fs.lseek(fd, 0, os.SEEK_CUR) == 0


def test_access_mode_is_enforced(fs: FileStore) -> None:
    w = fs.open("f", WR | CREAT)
    r = fs.open("f", RD)
    with pytest.raises(FsError) as exc:
        fs.read(w, 1)
    assert errno_of(exc) == "EBADF"
    with pytest.raises(FsError) as exc:
        fs.write(r, b"x")
    assert errno_of(exc) == "EBADF"
    with pytest.raises(FsError) as exc:
        fs.close(99)
    assert errno_of(exc) == "EBADF"


def test_every_fd_on_a_path_sees_pending_contents(fs: FileStore, root: Path) -> None:
    w = fs.open("f", WR | CREAT)
    r = fs.open("f", RD)
    fs.write(w, b"new")
    assert fs.read(r, 10) == b"new"
    fs.close(r)
    assert (root / "f").read_bytes() == b""
    fs.close(w)
    assert (root / "f").read_bytes() == b"new"


def test_fsync_acknowledges_and_keeps_the_fd_usable(fs: FileStore, root: Path) -> None:
    fd = fs.open("f", WR | CREAT)
    fs.write(fd, b"one")
    fs.fsync(fd)
    assert (root / "f").read_bytes() == b"one"
    fs.write(fd, b"two")
    assert (root / "f").read_bytes() == b"one"
    fs.close(fd)
    assert (root / "f").read_bytes() == b"onetwo"


def test_close_all_discards_unacknowledged_writes(root: Path) -> None:
    (root / "f").write_bytes(b"old")
    fs = FileStore(root)
    fd = fs.open("f", WR | TRUNC)
    fs.write(fd, b"new")
    fs.close_all()
    assert (root / "f").read_bytes() == b"old"
    assert pending_files(root) == []
    assert fs.open("f", RD) == 1


def test_file_mode_keeps_owner_read_write(fs: FileStore, root: Path) -> None:
    fs.close(fs.open("m", WR | CREAT, 0o640))
    assert (root / "m").stat().st_mode & 0o777 == 0o640
    fs.close(fs.open("z", WR | CREAT, 0o000))
    assert (root / "z").stat().st_mode & 0o777 == 0o600
    fd = fs.open("m", WR)
    fs.write(fd, b"x")
    fs.close(fd)
    assert (root / "m").stat().st_mode & 0o777 == 0o640  # the rewrite keeps the mode


def test_unlink_remove_rename_mkdir(fs: FileStore, root: Path) -> None:
    fs.mkdir("d/e")
    fs.mkdir("d/e")  # like the real mkdir_h: no error if it exists
    fs.close(fs.open("d/f", WR | CREAT))
    assert fs.listdir("d") == ["e", "f"]
    for call, args, err in [
        (fs.unlink, ("d",), "EISDIR"),
        (fs.remove, ("d",), "ENOTEMPTY"),
        (fs.unlink, ("d/nope",), "ENOENT"),
        (fs.rename, ("nope", "x"), "ENOENT"),
        (fs.rename, ("d/f", "no/x"), "ENOENT"),
        (fs.remove, (".",), "EBUSY"),
        (fs.rename, ("d", ""), "ENOENT"),
    ]:
        with pytest.raises(FsError) as exc:
            call(*args)  # type: ignore[operator]
        assert errno_of(exc) == err, (call, args)
    fs.rename("d/f", "g")
    assert sorted(os.listdir(root)) == ["d", "g"]
    fs.unlink("g")
    fs.remove("d/e")
    fs.remove("d")
    assert os.listdir(root) == []


def test_open_paths_are_busy(fs: FileStore) -> None:
    fd = fs.open("d/f", WR | CREAT)
    fs.close(fs.open("other", WR | CREAT))
    for call, args in [
        (fs.unlink, ("d/f",)),
        (fs.remove, ("d",)),
        (fs.rename, ("d", "e")),
        (fs.rename, ("other", "d/f")),
        (fs.rename, ("d/f", "x")),
    ]:
        with pytest.raises(FsError) as exc:
            call(*args)  # type: ignore[operator]
        assert errno_of(exc) == "EBUSY", (call, args)
    fs.close(fd)
    fs.rename("d/f", "x")


def test_directory_streams(fs: FileStore, root: Path) -> None:
    fs.close(fs.open("b", WR | CREAT))
    fs.mkdir("a")
    keep = fs.open("b", WR)  # its temp file is in root, and is not listed
    assert pending_files(root)
    h = fs.opendir(".")
    got = []
    while (e := fs.readdir(h)) is not None:
        got.append((e.name, e.type, e.off))
    assert got == [(".", 4, 1), ("..", 4, 2), ("a", 4, 3), ("b", 8, 4)]
    assert fs.readdir(h) is None
    fs.closedir(h)
    with pytest.raises(FsError) as exc:
        fs.readdir(h)
    assert errno_of(exc) == "EBADF"
    assert fs.listdir(".") == ["a", "b"]
    fs.close(keep)


def test_sweep_removes_crash_leftovers(root: Path) -> None:
    (root / "d").mkdir()
    (root / "d" / (TEMP_PREFIX + "dead")).write_bytes(b"half")
    (root / "f").write_bytes(b"ok")
    assert FileStore(root, sweep=False).listdir("d") == []
    assert pending_files(root)
    FileStore(root)
    assert pending_files(root) == []
    assert (root / "f").read_bytes() == b"ok"


def test_python_api_type_errors(fs: FileStore) -> None:
    with pytest.raises(FsUsageError, match="path must be a str"):
        fs.open(b"a", RD)  # type: ignore[arg-type]
    with pytest.raises(FsUsageError, match="flags must be an int"):
        fs.open("a", "r")  # type: ignore[arg-type]
    with pytest.raises(FsUsageError, match="data must be bytes-like"):
        fs.write(1, "x")  # type: ignore[arg-type]
    with pytest.raises(FsUsageError, match="count must be >= 0"):
        fs.read(1, -1)
    with pytest.raises(FsUsageError, match="root must be a str"):
        FileStore(3)  # type: ignore[arg-type]
    with pytest.raises(FsError) as exc:
        FileStore(__file__)  # a file, not a directory
    assert errno_of(exc) == "ENOTDIR"


# ============================================================================ confinement

ESCAPES = ["../x", "/etc/passwd", "a/../../x", "..", "./../x", "a/b/../../../x"]


@pytest.mark.parametrize("path", ESCAPES)
def test_escaping_paths_are_refused_with_eacces(fs: FileStore, path: str) -> None:
    for call in (
        lambda: fs.open(path, RD),
        lambda: fs.open(path, WR | CREAT),
        lambda: fs.unlink(path),
        lambda: fs.remove(path),
        lambda: fs.rename(path, "y"),
        lambda: fs.mkdir(path),
        lambda: fs.listdir(path),
    ):
        with pytest.raises(FsError) as exc:
            call()
        assert errno_of(exc) == "EACCES"


def test_inner_dotdot_that_stays_inside_is_allowed(fs: FileStore, root: Path) -> None:
    fs.close(fs.open("a/../b", WR | CREAT))
    assert (root / "b").is_file()


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    o = tmp_path / "outside"
    o.mkdir()
    (o / "secret").write_bytes(b"secret")
    return o


def test_symlink_to_outside_file_is_refused(fs: FileStore, root: Path, outside: Path) -> None:
    (root / "link").symlink_to(outside / "secret")
    for flags in (RD, WR, RW | CREAT, WR | TRUNC):
        with pytest.raises(FsError) as exc:
            fs.open("link", flags)
        assert errno_of(exc) == "EACCES"
    unlink_link: Callable[[], None] = lambda: fs.unlink("link")  # noqa: E731
    rename_link: Callable[[], None] = lambda: fs.rename("link", "x")  # noqa: E731
    for call in (unlink_link, rename_link):
        with pytest.raises(FsError) as exc:
            call()
        assert errno_of(exc) == "EACCES"
    fs.close(fs.open("f", WR | CREAT))
    with pytest.raises(FsError) as exc:
        fs.rename("f", "link")  # replacing a symlink is refused too
    assert errno_of(exc) == "EACCES"
    assert (outside / "secret").read_bytes() == b"secret"


def test_symlinked_directory_in_the_middle_is_refused(
    fs: FileStore, root: Path, outside: Path
) -> None:
    (root / "d").mkdir()
    (root / "d" / "sub").symlink_to(outside)
    for call in (
        lambda: fs.open("d/sub/secret", RD),
        lambda: fs.open("d/sub/new", WR | CREAT),
        lambda: fs.open("d/sub/deeper/new", WR | CREAT),
        lambda: fs.listdir("d/sub"),
        lambda: fs.opendir("d/sub"),
        lambda: fs.unlink("d/sub/secret"),
        lambda: fs.mkdir("d/sub/x"),
        lambda: fs.rename("d/sub/secret", "stolen"),
    ):
        with pytest.raises(FsError) as exc:
            call()
        assert errno_of(exc) == "EACCES"
    assert sorted(os.listdir(outside)) == ["secret"]


def test_symlink_pointing_inside_is_refused_too(fs: FileStore, root: Path) -> None:
    (root / "real").write_bytes(b"x")
    (root / "alias").symlink_to(root / "real")
    with pytest.raises(FsError) as exc:
        fs.open("alias", RD)
    assert errno_of(exc) == "EACCES"


def test_temp_names_are_reserved(fs: FileStore) -> None:
    with pytest.raises(FsError) as exc:
        fs.open(TEMP_PREFIX + "x", WR | CREAT)
    assert errno_of(exc) == "EACCES"


def test_symlink_swapped_in_after_open_is_not_followed(
    fs: FileStore, root: Path, outside: Path
) -> None:
    (root / "d").mkdir()
    fd = fs.open("d/f", WR | CREAT)
    fs.write(fd, b"data")
    (root / "d").rename(root / "d-moved")
    (root / "d").symlink_to(outside)
    fs.close(fd)  # the commit goes through the directory fd held since open
    assert (root / "d-moved" / "f").read_bytes() == b"data"
    assert sorted(os.listdir(outside)) == ["secret"]


# ============================================================================ the listener


def test_wire_errors_answer_minus_one_and_get_errno(fs: FileStore) -> None:
    assert wire(fs, GetErrnoRequest()) == StatusResponse(cmd_id=0x21C, ret=0)
    assert wire(fs, OpenRequest(path="nope", flags=RD)) == StatusResponse(cmd_id=0x202, ret=-1)
    assert wire(fs, GetErrnoRequest()) == StatusResponse(cmd_id=0x21C, ret=errno.ENOENT)
    assert wire(fs, OpenRequest(path="../x", flags=RD)).ret == -1
    assert wire(fs, GetErrnoRequest()) == StatusResponse(cmd_id=0x21C, ret=errno.EACCES)
    assert wire(fs, ReadRequest(fd=42, count=1)) == ReadResponse(data=b"", ret=-1)
    assert fs.last_errno == errno.EBADF
    assert wire(fs, UnsupportedRequest(cmd_id=0x20E)) == StatusResponse(cmd_id=0x20E, ret=-1)
    assert fs.last_errno == errno.ENOSYS  # FSTAT: known but not implemented
    assert wire(fs, UnsupportedRequest(cmd_id=0x999)) == StatusResponse(cmd_id=0x999, ret=-1)
    assert fs.last_errno == errno.ENOSYS  # unknown id: errno untouched, as in fs.c
    assert wire(fs, DirOpenRequest(path="nope")) == DirOpenResponse(pdir=0, ret=-3)
    assert wire(fs, DirReadRequest(pdir=0)) == DirReadResponse(entry=None, ret=-2)
    assert fs.last_errno == errno.EINVAL
    assert wire(fs, DirCloseRequest(pdir=5)) == StatusResponse(cmd_id=0x21B, ret=-2)
    assert fs.last_errno == errno.EBADF
    assert wire(fs, EndRequest()) == StatusResponse(cmd_id=0x21D, ret=0)


def test_wire_session(fs: FileStore, root: Path) -> None:
    F = FsOpenFlag
    fd = wire(fs, OpenRequest(path="ta/obj", flags=F.O_RDWR | F.O_CREAT)).ret
    assert fd == 1
    assert wire(fs, WriteRequest(fd=fd, data=b"x" * MAX_DATA_LEN)).ret == MAX_DATA_LEN
    assert wire(fs, LseekRequest(fd=fd, offset=-5, whence=2)).ret == MAX_DATA_LEN - 5
    assert wire(fs, ReadRequest(fd=fd, count=0xFFFF_FFFF)) == ReadResponse(data=b"xxxxx", ret=5)
    assert wire(fs, SyncRequest(fd=fd)) == StatusResponse(cmd_id=0x216, ret=0)
    assert (root / "ta/obj").stat().st_size == MAX_DATA_LEN
    assert wire(fs, CloseRequest(fd=fd)) == StatusResponse(cmd_id=0x209, ret=0)
    fd = wire(fs, CreatRequest(path="ta/obj", mode=0o600)).ret
    assert wire(fs, CloseRequest(fd=fd)).ret == 0
    assert (root / "ta/obj").read_bytes() == b""
    assert wire(fs, RenameRequest(old="ta/obj", new="ta/obj2")).ret == 0
    assert wire(fs, MkdirRequest(path="ta/sub", mode=0o700)).ret == 0
    h = wire(fs, DirOpenRequest(path="ta"))
    assert h == DirOpenResponse(pdir=1, ret=0)
    seen = []
    while True:
        r = wire(fs, DirReadRequest(pdir=1))
        assert isinstance(r, DirReadResponse)
        if r.entry is None:
            break
        seen.append(r.entry.name)
    assert seen == [".", "..", "obj2", "sub"]
    assert wire(fs, DirCloseRequest(pdir=1)).ret == 0
    assert wire(fs, UnlinkRequest(path="ta/obj2")).ret == 0
    assert wire(fs, RemoveRequest(path="ta/sub")).ret == 0
    assert os.listdir(root / "ta") == []


# ============================================================================ model-based

FILES = ["a", "b", "d/c"]
FLAG_SETS = [RD, WR | CREAT | TRUNC, RW | CREAT, RW, WR | APPEND | CREAT, RW | CREAT | EXCL]


class FileStoreMachine(RuleBasedStateMachine):
    """FileStore against a dict model: committed contents, pending contents, open fds."""

    fds = Bundle("fds")

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.tmp = tempfile.TemporaryDirectory()
        self.root = self.tmp.name
        self.fs = FileStore(self.root)
        self.committed: dict[str, bytes] = {}
        self.current: dict[str, bytes] = {}
        self.dirs: set[str] = set()
        self.open_fds: dict[int, list[object]] = {}  # fd -> [path, pos, readable, writable, append]

    def teardown(self) -> None:
        self.fs.close_all()
        assert not pending_files(Path(self.root))
        self.tmp.cleanup()

    def expect(self, err: int | None, call: object, *args: object) -> object:
        if err is None:
            return call(*args)  # type: ignore[operator]
        with pytest.raises(FsError) as exc:
            call(*args)  # type: ignore[operator]
        assert exc.value.errno == err, (call, args, exc.value)
        return None

    def busy(self, path: str) -> bool:
        return any(o[0] == path or str(o[0]).startswith(path + "/") for o in self.open_fds.values())

    def writers(self, path: str) -> int:
        return sum(1 for o in self.open_fds.values() if o[0] == path and o[3])

    @rule(target=fds, path=st.sampled_from(FILES), flags=st.sampled_from(FLAG_SETS))
    def open(self, path: str, flags: int) -> int:
        exists = path in self.current
        parent_ok = "/" not in path or path.split("/", maxsplit=1)[0] in self.dirs
        err = None
        if flags & CREAT and flags & EXCL and exists:
            err = errno.EEXIST
        elif not exists and not flags & CREAT:
            err = errno.ENOENT
        fd = self.expect(err, self.fs.open, path, flags)
        if err is not None:
            return -1
        expected_fd = min(set(range(1, 100)) - set(self.open_fds))
        assert fd == expected_fd
        if not parent_ok:
            self.dirs.add(path.split("/", maxsplit=1)[0])
        if not exists:
            self.committed[path] = self.current[path] = b""
        if flags & TRUNC:
            self.current[path] = b""
        acc = flags & 3
        self.open_fds[expected_fd] = [path, 0, acc != WR, acc != RD, bool(flags & APPEND)]
        return expected_fd

    @rule(fd=fds, data=st.binary(max_size=40))
    def write(self, fd: int, data: bytes) -> None:
        o = self.open_fds.get(fd)
        err = None if o is not None and o[3] else errno.EBADF
        n = self.expect(err, self.fs.write, fd, data)
        if err is None:
            assert o is not None
            path = str(o[0])
            cur = self.current[path]
            pos = len(cur) if o[4] else int(o[1])  # type: ignore[call-overload]
            if data:
                cur = cur.ljust(pos, b"\0")
                self.current[path] = cur[:pos] + data + cur[pos + len(data) :]
            o[1] = pos + len(data)
            assert n == len(data)

    @rule(fd=fds, n=st.integers(0, 50))
    def read(self, fd: int, n: int) -> None:
        o = self.open_fds.get(fd)
        err = None if o is not None and o[2] else errno.EBADF
        got = self.expect(err, self.fs.read, fd, n)
        if err is None:
            assert o is not None
            pos = int(o[1])  # type: ignore[call-overload]
            want = self.current[str(o[0])][pos : pos + n]
            assert got == want
            o[1] = pos + len(want)

    @rule(fd=fds, off=st.integers(-20, 60), whence=st.sampled_from([0, 1, 2, 7]))
    def lseek(self, fd: int, off: int, whence: int) -> None:
        o = self.open_fds.get(fd)
        if o is None:
            self.expect(errno.EBADF, self.fs.lseek, fd, off, whence)
            return
        base = {0: 0, 1: int(o[1]), 2: len(self.current[str(o[0])])}.get(whence)  # type: ignore[call-overload]
        if base is None or base + off < 0:
            self.expect(errno.EINVAL, self.fs.lseek, fd, off, whence)
            return
        assert self.fs.lseek(fd, off, whence) == base + off
        o[1] = base + off

    @rule(fd=fds)
    def fsync(self, fd: int) -> None:
        o = self.open_fds.get(fd)
        self.expect(None if o is not None else errno.EBADF, self.fs.fsync, fd)
        if o is not None and o[3]:
            self.committed[str(o[0])] = self.current[str(o[0])]

    @rule(fd=fds)
    def close(self, fd: int) -> None:
        o = self.open_fds.pop(fd, None)
        self.expect(None if o is not None else errno.EBADF, self.fs.close, fd)
        if o is not None and o[3]:
            self.committed[str(o[0])] = self.current[str(o[0])]

    @rule(path=st.sampled_from([*FILES, "d", "zz"]))
    def remove(self, path: str) -> None:
        if self.busy(path):
            err: int | None = errno.EBUSY
        elif path == "d" and "d" in self.dirs:
            err = errno.ENOTEMPTY if "d/c" in self.current else None
        elif path not in self.current:
            err = errno.ENOENT
        else:
            err = None
        self.expect(err, self.fs.remove, path)
        if err is None:
            if path == "d":
                self.dirs.discard("d")
            else:
                del self.current[path]
                del self.committed[path]

    @rule(old=st.sampled_from(FILES), new=st.sampled_from(FILES))
    def rename(self, old: str, new: str) -> None:
        if self.busy(old) or self.busy(new):
            err: int | None = errno.EBUSY
        elif old not in self.current or ("/" in new and "d" not in self.dirs):
            err = errno.ENOENT
        else:
            err = None
        self.expect(err, self.fs.rename, old, new)
        if err is None and old != new:
            self.current[new] = self.current.pop(old)
            self.committed[new] = self.committed.pop(old)

    @rule()
    def restart(self) -> None:
        """Shutdown (pending contents lost) and a new FileStore on the same root."""
        self.fs.close_all()
        self.open_fds.clear()
        self.current = dict(self.committed)
        self.fs = FileStore(self.root)

    @invariant()
    def listing_matches(self) -> None:
        top = {p for p in self.current if "/" not in p} | self.dirs
        assert self.fs.listdir(".") == sorted(top)
        if "d" in self.dirs:
            assert self.fs.listdir("d") == sorted(p[2:] for p in self.current if "/" in p)

    @invariant()
    def disk_holds_committed_contents(self) -> None:
        for path, data in self.committed.items():
            with open(os.path.join(self.root, path), "rb") as f:
                assert f.read() == data, path


TestFileStoreMachine = FileStoreMachine.TestCase
TestFileStoreMachine.settings = settings(max_examples=50, stateful_step_count=30, deadline=None)


def test_a_missing_root_is_made_as_tee_supplicant_makes_its_own(tmp_path: Path) -> None:
    """tee-supplicant creates its --fs-parent-path (mkpath) before it serves the REE FS:
    the store makes its root, and its parents, when they are missing."""
    root = tmp_path / "var" / "lib" / "tee"
    store = FileStore(root)
    assert root.is_dir() and store.root == str(root)
