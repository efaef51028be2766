"""The model inside a C program: the Python side of the preload bridge.

``libqtee_preload.so`` (``preload.c``, ``embed.c``) starts an interpreter in the program
on its first open of a device node and calls :func:`start`; then each hooked call on a
bridged fd lands in a :class:`Bridge` method, which returns what the syscall returns
(``>= 0``) or ``-errno``, and never raises.

* ``open`` of a node makes a context (one open file) and hands C an eventfd
  (semaphore mode, non-blocking) as its fd: the context's request queue writes a token
  to it for each request queued and a flood at close, so a C thread waiting in
  SUPPL_RECV polls it instead of blocking here.
* ``ioctl`` copies the ioctl's struct in from the C pointer (``_IOC_SIZE`` bytes, EFAULT
  if unmapped), runs the context's ioctl (SUPPL_RECV without blocking: EAGAIN when
  nothing is queued), and copies the struct back when the driver wrote it.  Pointers
  inside the struct are raw process memory (:class:`qtee.addrspace.ProcessMemory`).
  SHM_ALLOC returns the shm's memory file as a new fd, SHM_REGISTER a new fd for the
  registration, as the kernel does.
* ``close`` and ``dup`` keep the numbers of each open file: the context closes when its
  last number does (the kernel's ``release``), a shm is freed when its fd is closed.
* ``report`` runs at exit: every open file is closed, as the process's exit does, and
  what the device still holds is written to ``QTEE_BRIDGE_REPORT/<pid>.json`` for
  ``qtee run``; a snapshot is also written every :data:`SNAPSHOT_PERIOD` seconds while
  tables change, so a program killed by a signal still has its tables reported.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Final

from objects import DriverError, QteeBaseError, UsageError
from qtee import uapi
from qtee._cli.ta_modules import import_ta_module
from qtee._optee.core import OpteeContext, OpteeDevice, _GpShm
from qtee._qcomtee.call import Context
from qtee._qcomtee.core import Device
from qtee._remote.remote import RemoteContext, RemoteDevice
from qtee._tee.shm import MemfdShm, memfd_backing
from qtee.addrspace import TASK_SIZE, ProcessMemory

__all__ = ["SNAPSHOT_PERIOD", "Bridge", "BridgeConfig", "start"]

log = logging.getLogger("qtee.bridge")

#: Seconds between snapshots of the tables while they change.
SNAPSHOT_PERIOD: Final = 0.2
_FLOOD: Final = 1 << 40  # tokens written at close: every waiter wakes
_EFD_FLAGS: Final = os.EFD_SEMAPHORE | os.EFD_NONBLOCK
_KNOWN: Final = frozenset(uapi.IOCTL_NAMES)
_RECV: Final = uapi.TEE_IOC_SUPPL_RECV
_SHM_ALLOC: Final = uapi.TEE_IOC_SHM_ALLOC
_SHM_REGISTER: Final = uapi.TEE_IOC_SHM_REGISTER
_NO_SYSCALL: Final = (errno.ENOSYS, errno.EPERM)


@dataclass(frozen=True, slots=True, kw_only=True)
class BridgeConfig:
    """What the model in the program is (``qtee run``'s options, as JSON in
    ``QTEE_BRIDGE_CONFIG``)."""

    tee: str = "qtee"
    ta_modules: tuple[str, ...] = ()
    storage: str | None = None
    ta_dir: str | None = None
    connect: str | None = None
    trace: bool = False
    report_dir: str | None = None
    #: tee-supplicant plugins, ``UUID=MODULE:FUNCTION`` (OP-TEE only).
    plugins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.tee not in ("qtee", "optee"):
            raise UsageError(f"tee must be 'qtee' or 'optee', not {self.tee!r}")
        for spec in self.plugins:
            if not isinstance(spec, str) or "=" not in spec:
                raise UsageError(f"a plugin is UUID=MODULE:FUNCTION, not {spec!r}")
        if self.plugins and self.tee != "optee":
            raise UsageError("plugins are tee-supplicant's: they need tee 'optee'")
        for name in self.ta_modules:
            if not isinstance(name, str) or not name:
                raise UsageError(f"a TA module is a module name or a .py file, not {name!r}")

    @classmethod
    def from_json(cls, text: str) -> BridgeConfig:
        """Parse ``QTEE_BRIDGE_CONFIG``; a UsageError names what is wrong."""
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise UsageError(f"QTEE_BRIDGE_CONFIG is not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise UsageError("QTEE_BRIDGE_CONFIG is not a JSON object")
        keys = {
            "tee",
            "ta_modules",
            "storage",
            "ta_dir",
            "connect",
            "trace",
            "report_dir",
            "plugins",
        }
        unknown = set(raw) - keys
        if unknown:
            raise UsageError(f"QTEE_BRIDGE_CONFIG has unknown keys: {sorted(unknown)}")
        raw["ta_modules"] = tuple(raw.get("ta_modules", ()))
        raw["plugins"] = tuple(raw.get("plugins", ()))
        return cls(**raw)

    def to_json(self) -> str:
        """The form ``QTEE_BRIDGE_CONFIG`` carries."""
        return json.dumps(
            {
                "tee": self.tee,
                "ta_modules": list(self.ta_modules),
                "storage": self.storage,
                "ta_dir": self.ta_dir,
                "connect": self.connect,
                "trace": self.trace,
                "report_dir": self.report_dir,
                "plugins": list(self.plugins),
            }
        )


class BridgeMemory(ProcessMemory):
    """The program's memory as the bridge reaches it.

    In a program run through the preload library, reads and writes go through its
    ``_qtee_bridge`` module (``process_vm_readv``/``writev`` on the program itself): one
    syscall a copy, EFAULT for an unmapped range and for a write to a read-only page, as
    ``copy_from_user``/``copy_to_user`` (which may also have written the part before a
    fault).  Elsewhere (tests of this module in plain Python) it is ``ProcessMemory``."""

    __slots__ = ("_read", "_write")

    def __init__(self) -> None:
        super().__init__()
        try:
            import _qtee_bridge  # type: ignore[import-not-found]
        except ImportError:
            self._read = self._write = None
        else:
            self._read = _qtee_bridge.read
            self._write = _qtee_bridge.write

    def read(self, addr: int, size: int) -> bytes:
        """``copy_from_user``."""
        view = self._pinned.get(addr)
        if self._read is None or (view is not None and 0 <= size <= len(view)):
            return super().read(addr, size)
        if addr < 0 or size < 0 or addr + size > TASK_SIZE:  # (access_ok, inline)
            self.check(addr, size)  # EFAULT, saying why
        try:
            data: bytes = self._read(addr, size)
        except OSError as exc:
            if exc.errno in _NO_SYSCALL:  # a sandbox without process_vm_*: /proc/self/mem
                self._read = self._write = None
                return super().read(addr, size)
            raise DriverError(errno.EFAULT, f"user range {addr:#x}+{size} is not mapped") from exc
        return data

    def write(self, addr: int, data: bytes) -> None:
        """``copy_to_user``."""
        size = len(data)
        view = self._pinned.get(addr)
        if self._write is None or (view is not None and size <= len(view)):
            super().write(addr, data)
            return
        if addr < 0 or addr + size > TASK_SIZE:  # (access_ok, inline)
            self.check(addr, size)  # EFAULT, saying why
        try:
            self._write(addr, data)
        except OSError as exc:
            if exc.errno in _NO_SYSCALL:
                self._read = self._write = None
                super().write(addr, data)
                return
            raise DriverError(errno.EFAULT, f"user range {addr:#x}+{size} is not writable") from exc


class _MemfdOpteeDevice(OpteeDevice):
    """An OP-TEE device whose allocated shms live in memory files, so the fd SHM_ALLOC
    returns maps the pages the TA sees (registered shms stay the caller's memory)."""

    def _shm_backing(self, size: int, addr: int | None) -> tuple[bytearray | memoryview, object]:
        if addr is not None:
            return bytearray(), None
        return MemfdShm.allocate(size)

    def _shm_release(self, shm: _GpShm) -> None:
        handle = shm.handle
        if isinstance(handle, MemfdShm):
            handle.close()

    def _shm_pin(self, addr: int, size: int) -> memoryview | None:
        """The kernel's checks (EFAULT, ENOMEM), but the program's registered memory is
        copied per call through the bridge, not lent (a known departure)."""
        super()._shm_pin(addr, size)
        return None


@dataclass(eq=False)
class _File:
    """One open file of a device node: its context and the fd numbers naming it."""

    ctx: Context | OpteeContext | RemoteContext
    wake: int  # this side's own dup of the eventfd handed to C
    numbers: set[int] = field(default_factory=set)


@dataclass(eq=False)
class _ShmFile:
    """The fd of a shm: the file of the context it belongs to, and the shm id."""

    owner: _File
    shm_id: int
    numbers: set[int] = field(default_factory=set)


class Bridge:
    """The bridged fds of this process and the devices behind them."""

    def __init__(self, config: BridgeConfig) -> None:
        self.config = config
        self.memory = BridgeMemory()
        for name in config.ta_modules:
            import_ta_module(name)  # a module name or a .py file; it registers its TAs
        self.qtee: Device | None = None
        self.optee: OpteeDevice | None = None
        #: The device of a running server (``--connect``): its tables are the server's.
        self.remote: RemoteDevice | None = None
        self._services: list[Any] = []
        self._scratches: list[str] = []
        from qtee.secure import QteeRoot, SecureWorld

        if config.connect is not None:  # each open connects (and says why it cannot)
            from qtee._remote.remote import RemoteDevice

            self.remote = RemoteDevice(config.connect, memory=self.memory)
        elif config.tee == "qtee":
            self.qtee = Device(
                SecureWorld(QteeRoot()), memory=self.memory, shm_backing=memfd_backing
            )
            if config.trace:
                self.qtee.trace = _trace_line
        else:
            self.optee = _MemfdOpteeDevice(SecureWorld(QteeRoot()), memory=self.memory)
        if self.remote is None and (
            config.storage is not None or config.ta_dir is not None or config.plugins
        ):
            self._start_supplicant(config.storage, config.ta_dir, config.plugins)
        self._lock = threading.Lock()
        self._fds: dict[int, _File | _ShmFile] = {}
        self._pid = os.getpid()
        self._dirty = True
        self._opened = False  # a device was opened (what qtee run reports on)
        self._tried = False  # an open reached the bridge
        self._said: set[str] = set()  # connection failures already told
        # One report file written at a time; once the final one is written no snapshot
        # may replace it (a snapshot taken while report() released the fds would).
        self._report_lock = threading.Lock()
        self._reported = False
        self._snapshots: threading.Thread | None = None
        if config.report_dir is not None:
            self._snapshots = threading.Thread(
                target=self._snapshot_loop, name="qtee-bridge-snapshots", daemon=True
            )
            self._snapshots.start()

    def _start_supplicant(
        self, storage: str | None, ta_dir: str | None, plugins: tuple[str, ...] = ()
    ) -> None:
        """The model's own supplicant (Python threads in this process): file storage
        from ``storage`` (made if missing, as tee-supplicant makes its root), TA images
        from ``ta_dir``, the OP-TEE one's ``plugins`` (``UUID=MODULE:FUNCTION``)."""
        if storage is not None:
            os.makedirs(storage, exist_ok=True)
        if self.qtee is not None:
            from supplicant import Supplicant

            dirs = [ta_dir] if ta_dir is not None else []
            self._services.append(Supplicant(self.qtee, storage=storage, ta_dirs=dirs))
            return
        from supplicant import OpteeSupplicant, plugin_from_spec

        assert self.optee is not None
        found = dict(plugin_from_spec(spec) for spec in plugins)
        store = storage if storage is not None else self._scratch("storage")
        tas = ta_dir if ta_dir is not None else self._scratch("tas")
        self._services.append(OpteeSupplicant(self.optee, tas, store, plugins=found))

    def _scratch(self, name: str) -> str:
        """An empty directory for what the configuration leaves out (removed at exit)."""
        import tempfile

        path = tempfile.mkdtemp(prefix=f"qtee-bridge-{name}-")
        self._scratches.append(path)
        return path

    # ------------------------------------------------------------------ hooks
    def open(self, path: str, flags: int) -> int:
        """``open`` of a device node: a new context; its fd (an eventfd) or -errno."""
        self._tried = True
        try:
            ctx = self._open_context(path)
        except DriverError as exc:
            if self.remote is not None and exc.errno != errno.EBUSY:
                self._say_once(f"qtee bridge: {path}: {exc.detail or exc.strerror}")
            return -(exc.errno or errno.EIO)
        efd_flags = _EFD_FLAGS | (os.EFD_CLOEXEC if flags & os.O_CLOEXEC else 0)
        try:
            fd = os.eventfd(0, efd_flags)
            wake = os.dup(fd)
        except OSError as exc:
            ctx.close()
            return -(exc.errno or errno.EMFILE)
        entry = _File(ctx, wake, {fd})
        self._watch(entry)
        with self._lock:
            self._fds[fd] = entry
            self._dirty = True
            first = not self._opened
            self._opened = True
        if first:  # a program killed right away still has its tables reported
            with contextlib.suppress(OSError):
                self._write_report(final=False)
        return fd

    def _say_once(self, line: str) -> None:
        """One stderr line, the first time it is to be said."""
        if line not in self._said:
            self._said.add(line)
            os.write(2, f"{line}\n".encode())

    def _open_context(self, path: str) -> Context | OpteeContext | RemoteContext:
        node = os.path.basename(path)
        if self.remote is not None:  # the server says ENOENT for a node it does not have
            if node == "tee0":
                return self.remote.open()
            if node == "teepriv0":
                return self.remote.open_supplicant()
            raise DriverError(errno.ENOENT, f"no such device: {path}")
        if self.qtee is not None:
            if node != "tee0":  # qcomtee registers one device, with no privileged node
                raise DriverError(errno.ENOENT, f"no such device: {path}")
            return self.qtee.open()
        assert self.optee is not None
        if node == "tee0":
            return self.optee.open()
        if node == "teepriv0":
            return self.optee.open_supplicant()
        raise DriverError(errno.ENOENT, f"no such device: {path}")

    def _watch(self, entry: _File) -> None:
        """Tokens on the eventfd: one per queued request, a flood when the queue ends."""
        ctx = entry.ctx
        wake = entry.wake
        if isinstance(ctx, RemoteContext):
            remote = ctx

            def remote_ready() -> None:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_write(wake, _FLOOD if remote.lost or remote.closed else 1)

            if ctx.node == "teepriv" or ctx.welcome.impl_id == uapi.TEE_IMPL_ID_QTEE:
                ctx.on_ready = remote_ready  # fds that SUPPL_RECV (asks the server to watch)
            return
        if isinstance(ctx, Context):
            requests = ctx.requests

            def ready() -> None:
                with contextlib.suppress(BlockingIOError):  # full of tokens already
                    os.eventfd_write(wake, _FLOOD if requests.released else 1)

            requests.on_ready = ready
            return
        supp = getattr(ctx, "supp", None)
        if supp is not None:

            def supp_ready() -> None:
                with contextlib.suppress(BlockingIOError):  # full of tokens already
                    os.eventfd_write(wake, _FLOOD if supp.ctx is not ctx else 1)

            supp.on_ready = supp_ready

    def ioctl(self, fd: int, cmd: int, arg: int, nowait: int) -> int:
        """One ioctl on a bridged fd: 0 (or a new fd) or -errno."""
        entry = self._fds.get(fd)
        if not isinstance(entry, _File):
            return -errno.EBADF
        ctx = entry.ctx
        self._dirty = True
        try:
            if cmd not in _KNOWN:
                buf = bytearray()  # the TEE core's switch answers before any copy
            else:
                buf = bytearray(self.memory.read(arg, (cmd >> 16) & 0x3FFF))
            before = bytes(buf)
            recv_nowait = getattr(ctx, "recv_nowait", None) if nowait else None
            if recv_nowait is not None:
                recv_nowait(buf)
            else:  # an fd with no RECV queue (an OP-TEE client's): what the ioctl says
                ctx.ioctl(cmd, buf)
            if buf != before:
                self.memory.write(arg, bytes(buf))
            if cmd == _SHM_ALLOC:
                return self._shm_fd(entry, uapi.ShmAllocData.unpack(buf).id, buf)
            if cmd == _SHM_REGISTER:
                return self._shm_fd(entry, uapi.ShmRegisterData.unpack(buf).id, buf)
            return 0
        except DriverError as exc:
            return -(exc.errno or errno.EIO)
        except Exception:
            log.exception("qtee bridge: ioctl %#x on fd %d failed", cmd, fd)
            return -errno.EIO

    def _shm_fd(self, entry: _File, shm_id: int, buf: bytearray) -> int:
        """The fd of a new shm: its memory file (SHM_ALLOC), or a new eventfd standing for
        a registration (SHM_REGISTER of the caller's memory: nothing to map)."""
        ctx = entry.ctx
        fd: int | None = None
        if isinstance(ctx, RemoteContext):
            with contextlib.suppress(DriverError):  # a registration has no memory file
                fd = ctx.take_shm_fd(shm_id)
        elif isinstance(ctx, Context):
            fd = ctx.shms[shm_id].take_fd()
        else:
            handle = ctx.shms[shm_id].handle
            if isinstance(handle, MemfdShm):
                fd = handle.take_fd()
        if fd is None:
            fd = os.eventfd(0, os.EFD_CLOEXEC)
        os.set_inheritable(fd, False)
        with self._lock:
            self._fds[fd] = _ShmFile(entry, shm_id, {fd})
        return fd

    def close(self, fd: int) -> int:
        """``close`` of a bridged fd: the file goes with its last number."""
        with self._lock:
            entry = self._fds.pop(fd, None)
            if entry is None:
                return -errno.EBADF
            entry.numbers.discard(fd)
            last = not entry.numbers
            self._dirty = True
        if last:
            self._release(entry)
        return 0

    def dup(self, oldfd: int, newfd: int) -> int:
        """A new number for an open file (dup, dup2, dup3, F_DUPFD)."""
        with self._lock:
            entry = self._fds.get(oldfd)
            if entry is None:
                return -errno.EBADF
            entry.numbers.add(newfd)
            self._fds[newfd] = entry
        return newfd

    def _release(self, entry: _File | _ShmFile) -> None:
        if isinstance(entry, _ShmFile):
            with contextlib.suppress(DriverError):  # a closed context: the shm went with it
                entry.owner.ctx.shm_free(entry.shm_id)
            return
        ctx = entry.ctx
        ctx.close()  # the queue's end floods the eventfd: waiters wake
        if isinstance(ctx, RemoteContext):
            ctx.on_ready = None
        elif isinstance(ctx, Context):
            ctx.requests.on_ready = None
        else:
            supp = getattr(ctx, "supp", None)
            if supp is not None and supp.on_ready is not None:
                supp.on_ready = None
        os.close(entry.wake)

    # ------------------------------------------------------------------ report
    def leaks(self) -> dict[str, int]:
        """What the device still holds (see ``Device.leaks``; nothing here for a
        server's device: its tables are the server's)."""
        device: Device | OpteeDevice | None = self.qtee or self.optee
        return device.leaks() if device is not None else {}

    def report(self) -> None:
        """At exit: close what is open (as the process's exit does), then write the
        report of what is left."""
        if os.getpid() != self._pid:
            return
        with self._lock:
            entries = {id(e): e for e in self._fds.values()}
            self._fds.clear()
        files = [e for e in entries.values() if isinstance(e, _File)]
        for e in entries.values():
            if isinstance(e, _ShmFile):
                self._release(e)
        for f in files:
            self._release(f)
        for service in self._services:
            service.stop()
        self._write_report(final=True)
        import shutil

        for path in self._scratches:
            shutil.rmtree(path, ignore_errors=True)

    def _write_report(self, *, final: bool) -> None:
        if self.config.report_dir is None:
            return
        with self._report_lock:
            if self._reported:
                return
            self._reported = final
            data: dict[str, Any] = {
                "pid": self._pid,
                "final": final,
                "time": time.time(),
                "opened": self._opened,
                "tried": self._tried,
                "leaks": self.leaks(),
                "server": self.config.connect,
            }
            _write_json(self.config.report_dir, self._pid, data)

    def _snapshot_loop(self) -> None:
        while True:
            time.sleep(SNAPSHOT_PERIOD)
            if self._dirty:
                self._dirty = False
                try:
                    self._write_report(final=False)
                except OSError:
                    return


def _trace_line(line: str) -> None:
    os.write(2, f"qtee: {line}\n".encode())


def _write_json(folder: str, pid: int, data: dict[str, Any]) -> None:
    """``folder/<pid>.json``, replaced whole."""
    path = os.path.join(folder, f"{pid}.json")
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def start() -> Bridge | None:
    """The bridge of this process, from ``QTEE_BRIDGE_CONFIG``; None when the model cannot
    start: one stderr line says why (:func:`_reason`), the report for ``qtee run`` carries
    it, and the C side fails every open with ENOENT, as for a missing device."""
    text = os.environ.get("QTEE_BRIDGE_CONFIG")
    logging.basicConfig(stream=sys.stderr, format="%(message)s", level=logging.WARNING)
    try:
        config = BridgeConfig.from_json(text) if text else BridgeConfig()
        return Bridge(config)
    except Exception as exc:
        why = _reason(exc)
        folder = _report_dir(text)
        if folder is not None:
            with contextlib.suppress(OSError):
                _write_json(folder, os.getpid(), {"pid": os.getpid(), "error": why})
        with contextlib.suppress(OSError):
            os.write(2, f"qtee bridge: cannot start the model: {why}\n".encode())
        return None


def _reason(exc: Exception) -> str:
    """Why the model did not start, in one line: an OS error as ``PATH: strerror`` (what
    ``qtee run``'s checks could not foresee), the package's own errors by their message,
    anything else (a TA module's own code) with its type."""
    if isinstance(exc, DriverError):
        text = exc.detail or exc.strerror or str(exc)
    elif isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror if exc.filename is None else f"{exc.filename}: {exc.strerror}"
    elif isinstance(exc, QteeBaseError):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


def _report_dir(text: str | None) -> str | None:
    """``report_dir`` of a configuration that may be otherwise wrong."""
    try:
        folder = json.loads(text or "{}").get("report_dir")
    except (ValueError, AttributeError):
        return None
    return folder if isinstance(folder, str) else None
