"""Build the C peers (quic-teec, optee_client, optee_examples) that tests run against qtee.

The peers are unmodified upstream source archives kept outside the project
(``../shared/peers``, or ``$QTEE_PEERS``; see the README there).  Nothing from them is
copied into the project: each archive is unpacked and built under
``build/peers/<archive stem>/`` (``build/`` is git-ignored), once, and reused while the
archive's SHA-256 and :data:`RECIPE` stay the same, so a cached run costs a few
milliseconds.  Builds run in a temporary folder that is renamed into place, under a
``flock`` so two pytest processes never build the same thing at once.

When the archives or a build tool are missing, the functions here skip the calling test
with one line -- except in CI (``$CI`` set) or with ``QTEE_REQUIRE_PEERS=1``, where they
fail instead, so a CI run can never pass by skipping.  A build that fails raises
:class:`PeerBuildError` with the last lines of its log and the log's path.

API::

    peers_source() -> Path | None     the archives' folder, or None
    require_peers() -> Path           the same, or skip (fail in CI)
    quic_teec() -> QuicTeec           libqcomtee.so + qcomteetest + the skeleton TA image
    optee_client() -> OpteeClient     libteec.so + tee-supplicant
    optee_examples() -> OpteeExamples every optee_examples host program
    optee_example(name) -> Path       one host program, e.g. "hello_world"
    compile_c(sources, out, against="libqcomtee"|"libteec") -> Path
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, NoReturn

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILD_ROOT = REPO / "build" / "peers"
DEFAULT_PEERS = REPO.parent / "shared" / "peers"

# Bump when a build recipe below changes: every cached build is then redone once.
RECIPE = 2

# Flags for everything compiled here outside cmake (optee_examples hosts, compile_c):
# what the examples' own Makefiles use (-Wall), optimised and with debug info.
CFLAGS = ("-O2", "-g", "-Wall", "-pthread")

LOG_TAIL = 30
EXAMPLES = ("hello_world", "random", "secure_storage", "aes", "hotp")  # built at least


class PeerBuildError(RuntimeError):
    """A peer's build failed; the message has the tail of the log and the log's path."""


# -- skip or fail ------------------------------------------------------------------------


def strict() -> bool:
    """True in CI (``$CI`` set) or with ``QTEE_REQUIRE_PEERS=1``: missing peers fail."""
    ci = os.environ.get("CI", "").strip().lower()
    return ci not in ("", "0", "false", "no") or os.environ.get("QTEE_REQUIRE_PEERS") == "1"


def unavailable(reason: str) -> NoReturn:
    """Skip the calling test with ``reason`` (one line), or fail it under :func:`strict`."""
    if strict():
        pytest.fail(f"{reason} (required here: CI or QTEE_REQUIRE_PEERS=1)", pytrace=False)
    pytest.skip(reason)


def peers_source() -> Path | None:
    """The folder of peer archives (``$QTEE_PEERS`` or ``../shared/peers``), or None."""
    env = os.environ.get("QTEE_PEERS")
    folder = Path(env).expanduser() if env else DEFAULT_PEERS
    return folder.resolve() if folder.is_dir() else None


def require_peers() -> Path:
    """:func:`peers_source`, or skip the test (fail under :func:`strict`) when absent."""
    folder = peers_source()
    if folder is None:
        where = os.environ.get("QTEE_PEERS") or str(DEFAULT_PEERS)
        unavailable(f"peer sources not found at {where}; set QTEE_PEERS")
    return folder


def _archive(project: str) -> Path:
    matches = sorted(require_peers().glob(f"{project}-*.tar.gz"))
    if len(matches) != 1:
        found = ", ".join(p.name for p in matches) or "none"
        unavailable(f"expected one {project}-*.tar.gz in {require_peers()}, found {found}")
    return matches[0]


def tool(*names: str) -> str:
    """The first of ``names`` on PATH, or skip (fail under :func:`strict`) naming it."""
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    unavailable(f"{' or '.join(names)} not found on PATH (needed to build the C peers)")


def c_compiler() -> str:
    """``$CC`` if set and found, else ``cc`` or ``gcc``."""
    cc = os.environ.get("CC")
    if cc and shutil.which(cc):
        return str(shutil.which(cc))
    return tool("cc", "gcc")


def _require_libcbor(cc: str) -> None:
    probe = subprocess.run(
        [cc, "-E", "-x", "c", "-", "-o", os.devnull],
        input="#include <cbor.h>\n",
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        unavailable("libcbor headers not found (cbor.h): apt-get install libcbor-dev")


# -- the cache ---------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([RECIPE, *parts]).encode()).hexdigest()


def _stamp(folder: Path) -> str | None:
    try:
        return (folder / ".stamp").read_text()
    except OSError:
        return None


@contextlib.contextmanager
def _locked(lock: Path) -> Iterator[None]:
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


Builder = Callable[[Path, Path, IO[str]], None]


def cached_build(root: Path, stem: str, key: str, build: Builder) -> Path:
    """``root/stem`` built by ``build(tmp, final, log)`` unless its stamp already says ``key``.

    ``build`` fills ``tmp``, which is renamed to ``final`` afterwards (so anything it
    bakes in must be relative to the folder, or name ``final``).  Its output goes to
    ``root/stem.log``; if it raises, :class:`PeerBuildError` carries the log's tail.
    """
    final = root / stem
    if _stamp(final) == key:
        return final
    with _locked(root / f".{stem}.lock"):
        if _stamp(final) == key:  # another process built it while we waited
            return final
        for stale in root.glob(f".{stem}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{stem}.tmp-", dir=root))
        log_path = root / f"{stem}.log"
        started = time.monotonic()
        try:
            with log_path.open("w") as log:
                log.write(f"# building {stem} (key {key})\n")
                log.flush()
                build(tmp, final, log)
                log.write(f"# built in {time.monotonic() - started:.1f} s\n")
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if not isinstance(exc, Exception):  # a skip, a failure, ^C: not a build error
                raise
            if isinstance(exc, subprocess.CalledProcessError):
                exc_text = f"{Path(exc.cmd[0]).name} exited {exc.returncode}"
            else:
                exc_text = str(exc)
            lines = log_path.read_text(errors="replace").splitlines()[-LOG_TAIL:]
            tail = "\n".join(lines)
            where = f"last {len(lines)} lines of {log_path}"
            raise PeerBuildError(f"building {stem} failed ({exc_text}); {where}:\n{tail}") from exc
        (tmp / ".stamp").write_text(key)
        tmp.chmod(0o755)  # mkdtemp made it private
        if final.exists():
            old = root / f".{stem}.tmp-old-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        return final


def _run(argv: Sequence[str], log: IO[str], cwd: Path | None = None) -> None:
    log.write(f"$ {shlex.join(argv)}\n")
    log.flush()
    subprocess.run(
        argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=True
    )
    log.flush()


def _unpack(archive: Path, dest: Path) -> None:
    """Extract ``archive`` (one top-level folder) as ``dest``."""
    with tarfile.open(archive) as tar:
        tops = {m.name.split("/", 1)[0] for m in tar.getmembers()}
        if len(tops) != 1:
            raise PeerBuildError(f"{archive.name}: expected one top-level folder, got {tops}")
        scratch = dest.parent / ".unpack"
        tar.extractall(scratch, filter="data")
    (scratch / tops.pop()).rename(dest)
    scratch.rmdir()


def _prefix_map(tmp: Path, final: Path) -> str:
    """Debug info and ``__FILE__`` name the final folder, not the temporary one."""
    return f"-ffile-prefix-map={tmp}={final}"


def _cmake(
    src: Path, build: Path, log: IO[str], options: Sequence[str], targets: Sequence[str]
) -> None:
    cc = c_compiler()
    cmake = tool("cmake")
    _run(
        [cmake, "-S", str(src), "-B", str(build), "-G", "Unix Makefiles",
         f"-DCMAKE_C_COMPILER={cc}", f"-DCMAKE_MAKE_PROGRAM={tool('make', 'gmake')}",
         "-DCMAKE_BUILD_TYPE=", "-DBUILD_SHARED_LIBS=ON",
         # $ORIGIN-relative RUNPATHs: the tree still works once renamed into place.
         "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON", *options],
        log,
    )  # fmt: skip
    jobs = str(os.cpu_count() or 2)
    _run([cmake, "--build", str(build), "-j", jobs, "--target", *targets], log)


# -- the peers ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QuicTeec:
    """quic-teec built: libqcomtee (shared) and its test program ``qcomteetest``."""

    root: Path
    lib_dir: Path  # libqcomtee.so, .so.0, .so.0.1.0
    qcomteetest: Path
    skeleton_ta: Path  # tests/ta/smcinvoke_skeleton_ta/smcinvoke_skeleton_ta64.mbn
    include_dirs: tuple[Path, ...]  # qcomtee_object*.h; then the <linux/tee.h> quic-teec ships


@dataclass(frozen=True, slots=True)
class OpteeClient:
    """optee_client built: libteec (shared) and ``tee-supplicant``."""

    root: Path
    lib_dir: Path  # libteec.so, .so.2, .so.2.0.0
    tee_supplicant: Path
    include_dirs: tuple[Path, ...]  # tee_client_api.h; then the <linux/tee.h> it ships


@dataclass(frozen=True, slots=True)
class OpteeExamples:
    """optee_examples' host programs (``optee_example_<name>``), linked to :class:`OpteeClient`."""

    root: Path
    src: Path  # the unpacked tree: <name>/ta/include/<name>_ta.h has UUIDs and command ids
    bin_dir: Path
    names: tuple[str, ...]

    def host(self, name: str) -> Path:
        if name not in self.names:
            raise ValueError(f"no optee_examples host {name!r}; built: {', '.join(self.names)}")
        return self.bin_dir / f"optee_example_{name}"

    def ta_include(self, name: str) -> Path:
        return self.src / name / "ta" / "include"


def _quic_teec_key() -> tuple[Path, str]:
    archive = _archive("quic-teec")
    return archive, _key("quic-teec", _sha256(archive))


@functools.cache
def quic_teec() -> QuicTeec:
    """Build (once) and return quic-teec; skips when the peers, tools or libcbor are absent."""
    archive, key = _quic_teec_key()
    stem = archive.name.removesuffix(".tar.gz")

    def build(tmp: Path, final: Path, log: IO[str]) -> None:
        _require_libcbor(c_compiler())
        _unpack(archive, tmp / "src")
        # Its tests print size_t with %u: -Werror=format fails them on 64-bit hosts.
        # No QCBOR on Debian, so libqcomtee falls back to libcbor (a cmake warning says so).
        flags = f"-O2 -g -Wno-error=format {_prefix_map(tmp, final)}"
        opts = ["-DBUILD_UNITTEST=ON", f"-DCMAKE_C_FLAGS={flags}"]
        _cmake(tmp / "src", tmp / "build", log, opts, ["qcomtee", "qcomteetest"])

    root = cached_build(BUILD_ROOT, stem, key, build)
    lib = root / "src" / "libqcomtee"
    return QuicTeec(
        root=root,
        lib_dir=root / "build" / "libqcomtee",
        qcomteetest=root / "build" / "tests" / "qcomteetest",
        skeleton_ta=root / "src/tests/ta/smcinvoke_skeleton_ta/smcinvoke_skeleton_ta64.mbn",
        include_dirs=(lib / "include", lib / "src"),
    )


def _optee_client_key() -> tuple[Path, str]:
    archive = _archive("optee_client")
    return archive, _key("optee_client", _sha256(archive))


@functools.cache
def optee_client() -> OpteeClient:
    """Build (once) and return optee_client's libteec and tee-supplicant."""
    archive, key = _optee_client_key()
    stem = archive.name.removesuffix(".tar.gz")

    def build(tmp: Path, final: Path, log: IO[str]) -> None:
        _unpack(archive, tmp / "src")
        # libteeacl needs uuid-dev through pkg-config, and nothing here uses it.
        opts = ["-DWITH_TEEACL=OFF", f"-DCMAKE_C_FLAGS=-O2 -g {_prefix_map(tmp, final)}"]
        _cmake(tmp / "src", tmp / "build", log, opts, ["teec", "tee-supplicant"])

    root = cached_build(BUILD_ROOT, stem, key, build)
    return OpteeClient(
        root=root,
        lib_dir=root / "build" / "libteec",
        tee_supplicant=root / "build" / "tee-supplicant" / "tee-supplicant",
        include_dirs=(root / "src" / "libteec" / "include", root / "src" / "libteec" / "src"),
    )


@functools.cache
def optee_examples() -> OpteeExamples:
    """Build (once) every optee_examples host program against :func:`optee_client`."""
    client = optee_client()
    archive = _archive("optee_examples")
    stem = archive.name.removesuffix(".tar.gz")
    key = _key("optee_examples", _sha256(archive), _stamp(client.root), CFLAGS)

    def build(tmp: Path, final: Path, log: IO[str]) -> None:
        cc = c_compiler()
        src = tmp / "src"
        _unpack(archive, src)
        names = sorted(p.parent.parent.name for p in src.glob("*/host/main.c"))
        missing = set(EXAMPLES) - set(names)
        if missing:
            raise PeerBuildError(f"no host/main.c for {sorted(missing)}")
        (tmp / "bin").mkdir()
        # Relative to where the binaries will live, so the rename keeps them working.
        rpath = "$ORIGIN/" + os.path.relpath(client.lib_dir, final / "bin")

        def one(name: str) -> None:
            example = src / name
            argv = [
                cc, *CFLAGS, _prefix_map(tmp, final),
                f"-I{example / 'ta' / 'include'}", f"-I{example / 'include'}",
                *(f"-I{d}" for d in client.include_dirs[:1]),
                str(example / "host" / "main.c"),
                "-o", str(tmp / "bin" / f"optee_example_{name}"),
                f"-L{client.lib_dir}", "-lteec", f"-Wl,-rpath,{rpath}",
            ]  # fmt: skip
            out = subprocess.run(argv, capture_output=True, text=True, check=False)
            log.write(f"$ {shlex.join(argv)}\n{out.stdout}{out.stderr}")
            if out.returncode != 0:
                raise PeerBuildError(f"optee_example_{name}: cc exited {out.returncode}")

        with ThreadPoolExecutor() as pool:
            list(pool.map(one, names))
        (tmp / "names").write_text("\n".join(names) + "\n")

    root = cached_build(BUILD_ROOT, stem, key, build)
    return OpteeExamples(
        root=root,
        src=root / "src",
        bin_dir=root / "bin",
        names=tuple((root / "names").read_text().split()),
    )


def optee_example(name: str) -> Path:
    """The built host program ``optee_example_<name>`` (e.g. ``"hello_world"``)."""
    return optee_examples().host(name)


# -- the project's own C -----------------------------------------------------------------


def compile_c(
    sources: Sequence[str | Path],
    out: str | Path | None = None,
    *,
    against: Literal["libqcomtee", "libteec"] = "libqcomtee",
    cflags: Sequence[str] = (),
) -> Path:
    """Compile and link a test's own C program against the built libqcomtee or libteec.

    ``.c`` files are compiled; list the test's own headers too (they are hashed, not
    compiled, and their folders are on the include path) so that editing one rebuilds.
    Flags: :data:`CFLAGS` + ``cflags``, the library's include dirs (its own
    ``<linux/tee.h>``, not the system's), and an absolute RUNPATH to the library.  The
    binary is cached under ``build/peers/cc/<content hash>/`` and copied to ``out``
    (when given); the returned path is ``out``, or the cached binary.
    """
    if against == "libqcomtee":
        peer = quic_teec()
        include_dirs, lib_dir, lib, dep = peer.include_dirs, peer.lib_dir, "qcomtee", peer.root
    elif against == "libteec":
        client = optee_client()
        include_dirs, lib_dir, lib, dep = client.include_dirs, client.lib_dir, "teec", client.root
    else:
        raise ValueError(f"against must be 'libqcomtee' or 'libteec', not {against!r}")
    cc = c_compiler()
    paths = [Path(s).resolve() for s in sources]
    c_files = [p for p in paths if p.suffix == ".c"]
    if not c_files:
        raise ValueError(f"no .c file among {[str(p) for p in paths]}")
    own_dirs = list(dict.fromkeys(p.parent for p in paths))
    argv = [
        cc, *CFLAGS, *cflags,
        *(f"-I{d}" for d in (*own_dirs, *include_dirs)),
        *map(str, c_files),
        f"-L{lib_dir}", f"-l{lib}", f"-Wl,-rpath,{lib_dir}",
    ]  # fmt: skip
    name = Path(out).name if out is not None else c_files[0].stem
    # The key is the files' names and contents, not where they are (a test's tmp_path).
    contents = [(p.name, _sha256(p)) for p in paths]
    recipe = [cc, *CFLAGS, *cflags, *map(str, include_dirs), str(lib_dir), lib]
    key = _key("cc", recipe, contents, _stamp(dep))

    def build(tmp: Path, _final: Path, log: IO[str]) -> None:
        _run([*argv, "-o", str(tmp / name)], log)

    binary = cached_build(BUILD_ROOT / "cc", f"{name}-{key[:16]}", key, build) / name
    if out is None:
        return binary
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}")
    shutil.copy2(binary, partial)
    partial.replace(target)
    return target
