"""The device server: one driver model and secure world on a Unix socket.

Each connection is one open fd: of a QTEE device (a :class:`qtee.Context`, the default),
or with ``tee="optee"`` of an OP-TEE device (an :class:`qtee.OpteeContext`, or on the
privileged node tee-supplicant's :class:`qtee._optee.supp.OpteeSuppContext`; see
:mod:`qtee._remote.server_optee`).  Frames are those of
:mod:`qtee._remote.frames`: a Hello/Welcome handshake, then Ioctl requests answered by
IoctlReply.  Addresses do not cross processes, so an Ioctl carries the caller's memory
the call may touch (the argument block, buffers, the RECV scratch) as regions; the
server maps them at the same addresses for that call only and sends back the regions the
driver wrote.  Each request runs on a request thread of its connection, a new one only
when all are busy (a SUPPL_RECV may block for a long time).  A malformed, oversized or
out-of-order frame closes that connection with a logged reason; other connections go on.
A connection that ends is an fd close: its pending callbacks complete DEFUNCT, its QTEE
objects are released.

No client can take the server down or wedge it for others:

* a waiting SUPPL_RECV holds no thread: it is parked, and the connection's one receiver
  thread serves the parked RECVs in turn as requests are queued (a non-blocking RECV in
  the driver); past :data:`RECV_LIMIT` parked ones, a SUPPL_RECV is answered EBUSY;
* a connection has at most :data:`THREAD_LIMIT` request threads; past it an
  OBJECT_INVOKE is answered EBUSY at once (nothing blocks), and the other ioctls (which
  never block) run in the thread that read them;
* the accept loop, each connection's reader and each trace sender outlive resource
  errors (no thread, EMFILE/ENFILE/ENOMEM, MemoryError): they log, pause
  (:data:`BACKOFF_FIRST` doubling to :data:`BACKOFF_MAX`) and go on, never holding a lock;
* a client that leaves the server's frames unread for :data:`SEND_TIMEOUT` seconds with its
  socket buffer full is disconnected;
* a client may ``probe`` a call it has waited on past its deadline: the ``status``
  answer says whether the call is waiting on a callback (the driver's
  ``Device.on_callback`` hook), so the client's deadline stands still meanwhile.

A client may ``watch`` its fd: the server then sends it a ``ready`` frame whenever a
request is queued for its SUPPL_RECV (the queue's ``on_ready`` hook wakes a notifier
thread of the connection; the TA thread that queues never waits on the socket), so a
client can wait for work outside Python and take it with ``recv_nowait``.

The pieces: :mod:`qtee._remote.region_memory` (the served device's address space),
:mod:`qtee._remote.server_conn` (one connection's threads), this module (the listener, the QTEE
flavour, the trace fan-out) and :mod:`qtee._remote.server_optee` (the OP-TEE flavour).

Shared memory is real shared memory: the server's shms live in memory files, and the fd
of each goes to the client that allocated it (a ``shm`` frame, SCM_RIGHTS), which maps
the same pages.  ``query`` frames ask for a description of the device (``qtee info
--connect``) or a live stream of its crossings (``qtee trace --connect``); both show
every connection's labels and calls, so a server answers them only when started with
``introspect=True`` (``qtee serve --introspect``) and refuses them (EACCES) otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import socket
import stat
import struct
import threading
from typing import TYPE_CHECKING, Any, Final, Literal

from objects import DriverError, UsageError
from qtee import uapi
from qtee._cli.info import describe
from qtee._cli.trace import TraceRecord
from qtee._qcomtee.call import Context
from qtee._qcomtee.core import Device
from qtee._remote.frames import MAX_FRAME
from qtee._remote.region_memory import CallRegions, RegionMemory
from qtee._remote.served import (
    BACKOFF_FIRST,
    BACKOFF_MAX,
    NO_THREAD,
    RECV_LIMIT,
    SEND_TIMEOUT,
    THREAD_LIMIT,
    Flavour,
    Peer,
    ReadyQueue,
    backoff,
)
from qtee._remote.server_conn import Connection
from qtee._remote.server_watch import LeadWatch
from qtee._remote.trace_stream import TraceStream
from qtee._tee.shm import memfd_backing

if TYPE_CHECKING:
    from qtee._optee.core import OpteeDevice

__all__ = [
    "BACKOFF_FIRST",
    "BACKOFF_MAX",
    "RECV_LIMIT",
    "SEND_TIMEOUT",
    "SHUTDOWN",
    "SUN_PATH_MAX",
    "THREAD_LIMIT",
    "TEES",
    "DeviceServer",
    "RegionMemory",
]

log = logging.getLogger("qtee.server")

#: The kinds of device a server can serve.
TEES: Final = ("qtee", "optee")
#: The ``bye`` every client gets at :meth:`DeviceServer.stop`; a client's calls then fail
#: EBADF with "the server at PATH said bye: shutting down".
SHUTDOWN: Final = "shutting down"
# Older names, for the tests that reach in.
_TraceStream = TraceStream
_Connection = Connection
_SO_PEERGROUPS: Final = getattr(socket, "SO_PEERGROUPS", 59)


class _QteeFile:
    """A QTEE context as a connection serves it."""

    __slots__ = ("ctx", "queue")
    plain = True  # before and after do nothing

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.queue: ReadyQueue = ctx.requests

    def pending(self) -> bool:
        q = self.ctx.requests
        return bool(q.fifo) or q.released

    def shm_fd(self, shm_id: int) -> int | None:
        return self.ctx.shms[shm_id].take_fd()

    def before(self, cmd: int, arg: bytes, call: CallRegions) -> None:
        pass

    def after(self, cmd: int, arg: bytes, call: CallRegions) -> list[tuple[int, bytes]]:
        return []


class _QteeFlavour:
    """A QTEE device: one node (``/dev/tee0``: qcomtee registers no privileged one)."""

    impl_id = uapi.TEE_IMPL_ID_QTEE
    gen_caps = uapi.TEE_GEN_CAP_OBJREF
    server = "qtee server"
    traces = True

    def __init__(self, device: Device) -> None:
        self.device = device

    def open(self, node: str, label: str) -> _QteeFile:
        if node != "tee":
            raise DriverError(errno.ENOENT, f"a QTEE device has no {node} node")
        ctx = self.device.open()
        ctx.label = label
        return _QteeFile(ctx)

    def describe(self) -> dict[str, Any]:
        return describe(self.device)

    def leaks(self) -> dict[str, int]:
        return self.device.leaks()


class _TraceFanout:
    """The device's ``trace_records`` hook while any connection streams the trace."""

    def __init__(self, device: Any) -> None:
        self.device = device  # a Device (an OP-TEE device records no crossings)
        self._streams: tuple[TraceStream, ...] = ()
        self._lock = threading.Lock()

    def add(self, stream: TraceStream) -> None:
        with self._lock:
            self._streams = (*self._streams, stream)
            self.device.trace_records = self

    def discard(self, stream: TraceStream) -> None:
        with self._lock:
            self._streams = tuple(s for s in self._streams if s is not stream)
            if not self._streams and self.device.trace_records is self:
                self.device.trace_records = None

    def __call__(self, record: TraceRecord) -> None:
        for stream in self._streams:
            stream(record)


def _peer_of(sock: socket.socket) -> Peer | None:
    """The credentials of the process at the other end (None if the system says nothing)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
    except OSError:
        return None
    groups: frozenset[int] = frozenset()
    with contextlib.suppress(OSError):  # Linux >= 4.13; ERANGE past 1024 groups
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4096)
        groups = frozenset(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    return Peer(pid, uid, gid, groups)


#: Bytes of a Unix socket path (``sun_path``; the kernel does not need a NUL at the end).
SUN_PATH_MAX: Final = 108


def _clear_stale_socket(path: str) -> None:
    """Make room to bind ``path``: nothing there, or a socket nobody answers on (removed).
    A live server's socket, a socket that cannot be probed, or any other file is a
    UsageError naming the path and why, and stays."""
    size = len(os.fsencode(path))
    if size > SUN_PATH_MAX:
        raise UsageError(
            f"{path}: a Unix socket path is at most {SUN_PATH_MAX} bytes, this one is {size}"
        )
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"{path} exists and is not a socket: not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # stale: its server is gone
        return
    except (TimeoutError, BlockingIOError):  # a full backlog: someone listens
        pass
    except OSError as exc:  # EACCES, EPROTOTYPE (a datagram socket)...
        why = exc.strerror or exc
        raise UsageError(
            f"{path} is a socket that cannot be probed ({why}): not replacing it"
        ) from None
    finally:
        probe.close()
    raise UsageError(f"a server is already listening on {path}: not replacing it")


def _limit(value: object, what: str, lo: int) -> int:
    if type(value) is not int or value < lo:
        raise UsageError(f"{what} must be an int >= {lo}, not {value!r}")
    return value


class DeviceServer:
    """Serve a device on the Unix socket ``path``: a fresh QTEE device (``tee="qtee"``, the
    default) or OP-TEE device (``tee="optee"``), or ``device``.  A QTEE ``Device`` given
    here must be built with ``memory=RegionMemory()`` and ``shm_backing=memfd_backing``;
    an OP-TEE one must be a :class:`qtee._remote.server_optee.ServedOpteeDevice`.

    ``introspect``: answer ``query`` frames (``qtee info``/``qtee trace --connect``), which
    show every connection's labels and calls; off by default (refused with EACCES).
    ``recv_limit``/``thread_limit``: per-connection caps (:data:`RECV_LIMIT`,
    :data:`THREAD_LIMIT`).  The server sets the device's ``on_callback`` hook (to answer
    probes).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        device: Device | OpteeDevice | None = None,
        *,
        tee: Literal["qtee", "optee"] | None = None,
        max_frame: int = MAX_FRAME,
        introspect: bool = False,
        recv_limit: int = RECV_LIMIT,
        thread_limit: int = THREAD_LIMIT,
    ) -> None:
        if type(introspect) is not bool:
            raise UsageError(f"introspect must be a bool, not {introspect!r}")
        if tee is not None and tee not in TEES:
            raise UsageError(f"tee must be one of {TEES}, not {tee!r}")
        if type(max_frame) is not int or not 1 <= max_frame <= 0xFFFF_FFFF:
            raise UsageError(f"max_frame must be an int in [1, 2**32 - 1], not {max_frame!r}")
        self.recv_limit = _limit(recv_limit, "recv_limit", 1)
        self.thread_limit = _limit(thread_limit, "thread_limit", 2)
        self.path = os.fspath(path)
        self.memory = RegionMemory()
        #: The device served: a :class:`qtee.Device` or a ``ServedOpteeDevice``.
        self.device: Any
        self.flavour: Flavour
        if tee == "optee" or (
            tee is None and device is not None and not isinstance(device, Device)
        ):
            self.device, self.flavour = self._optee(device)
        else:
            self.device, self.flavour = self._qtee(device)
        self.max_frame = max_frame
        #: Whether ``query`` frames are answered (see the class docstring).
        self.introspect = introspect
        self._sock: socket.socket | None = None
        self._bound: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket bound
        self._accept: threading.Thread | None = None
        self._lock = threading.Lock()
        self._conns: set[Connection] = set()
        self._traces = _TraceFanout(self.device)
        self._count = 0  # connections accepted
        self._opened = 0  # hellos seen
        self._stopping = False
        self._stopped = threading.Event()  # wakes the accept loop's pauses
        #: Takes the reading back from leaders running long ioctls (``server_conn``).
        self.lead_watch = LeadWatch()

    def _qtee(self, device: Device | OpteeDevice | None) -> tuple[Device, Flavour]:
        if device is None:  # the standard QTEE (IGPAppClient included)
            device = Device(memory=self.memory, shm_backing=memfd_backing)
        elif not isinstance(device, Device):
            raise UsageError(f"tee='qtee' serves a qtee.Device, not a {type(device).__name__}")
        elif not isinstance(device.memory, RegionMemory):
            raise UsageError("a served Device must be built with memory=RegionMemory()")
        elif device.shm_backing is not memfd_backing:
            raise UsageError("a served Device must be built with shm_backing=memfd_backing")
        else:
            self.memory = device.memory
        device.on_callback = self.memory.on_callback
        return device, _QteeFlavour(device)

    def _optee(self, device: Device | OpteeDevice | None) -> tuple[OpteeDevice, Flavour]:
        from qtee._remote.server_optee import OpteeFlavour, ServedOpteeDevice
        from qtee.secure import QteeRoot, SecureWorld

        if device is None:
            device = ServedOpteeDevice(SecureWorld(QteeRoot()), memory=self.memory)
        elif not isinstance(device, ServedOpteeDevice):
            raise UsageError(
                f"tee='optee' serves a qtee._remote.server_optee.ServedOpteeDevice, "
                f"not a {type(device).__name__}"
            )
        else:
            self.memory = device.memory
        device.on_callback = self.memory.on_callback
        return device, OpteeFlavour(device)

    @property
    def tee(self) -> str:
        """``"qtee"`` or ``"optee"``: the kind of device served."""
        return "qtee" if isinstance(self.device, Device) else "optee"

    @property
    def connections(self) -> int:
        """Connections open now: those whose hello opened a device node (an fd).  A
        connection that has not said hello (``qtee.connect`` checking the path) is not
        counted."""
        with self._lock:
            return sum(1 for conn in self._conns if conn.ctx is not None)

    def start(self) -> DeviceServer:
        """Bind and listen; connections are served by background threads.

        A socket left at ``path`` by a server that is gone is replaced; anything else
        there -- a live server's socket, a file -- is a :class:`UsageError`, and stays."""
        _clear_stale_socket(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            st = os.stat(self.path)
            self._bound = (st.st_dev, st.st_ino)
            sock.listen(64)
            self._sock = sock
            self._accept = threading.Thread(
                target=self._accept_loop, name="qtee-server", daemon=True
            )
            self._accept.start()
        except BaseException:
            sock.close()
            self._sock = None
            raise
        return self

    def _accept_loop(self) -> None:
        """Accept until stopped.  A failed accept (EMFILE, ENFILE, ENOMEM...) or a new
        connection that gets no thread is logged, and the loop pauses (BACKOFF_FIRST,
        doubling to BACKOFF_MAX) and goes on; the pause ends early at :meth:`stop`."""
        listener = self._sock
        assert listener is not None
        delay = 0.0
        while not self._stopping:
            try:
                sock, _ = listener.accept()
            except OSError as exc:
                if self._stopping or listener.fileno() < 0:
                    return
                delay = backoff(delay)
                log.warning("accept failed (%s); again in %.2f s", exc, delay)
                self._stopped.wait(delay)
                continue
            try:
                self._serve_new(sock)
            except (*NO_THREAD, OSError) as exc:
                with contextlib.suppress(OSError):
                    sock.close()  # the client sees the end of the stream
                delay = backoff(delay)
                log.warning("a new connection was closed unserved (%s); pause %.2f s", exc, delay)
                self._stopped.wait(delay)
                continue
            delay = 0.0

    def _serve_new(self, sock: socket.socket) -> None:
        """File a new connection and start its first thread."""
        sec = math.floor(SEND_TIMEOUT)
        timeval = struct.pack("@ll", sec, int((SEND_TIMEOUT - sec) * 1_000_000))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        peer = _peer_of(sock)
        with self._lock:
            self._count += 1  # a number of its own once its hello opens a node (_named)
            conn = Connection(self, sock, f"conn-new{self._count}", peer)
            self._conns.add(conn)
        try:
            threading.Thread(target=conn.run, name=conn.name, daemon=True).start()
        except BaseException:
            self._forget(conn)
            raise

    def _named(self) -> str:
        """The name of a connection whose hello opens a node: ``conn-1``, ``conn-2``... in
        the order of the hellos (one that never says hello, as ``qtee.connect`` trying
        the path, takes no number)."""
        with self._lock:
            self._opened += 1
            return f"conn-{self._opened}"

    def _forget(self, conn: Connection) -> None:
        with self._lock:
            self._conns.discard(conn)

    def stop(self) -> None:
        """Stop accepting, close every connection (their contexts close), remove the socket.
        Each client is told first (a ``bye``): its calls in flight and its next ones fail
        EBADF saying that the server shut down."""
        self._stopping = True
        self._stopped.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:  # each client's calls fail saying so (EBADF, as a lost fd)
            conn.say_bye(SHUTDOWN)
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        for conn in conns:
            conn.closed.wait(5)
        self.lead_watch.stop()
        if self._accept is not None:
            self._accept.join(5)
        try:  # only the socket this server bound: another may have taken the path since
            st = os.stat(self.path)
        except OSError:
            return
        if (st.st_dev, st.st_ino) == self._bound and stat.S_ISSOCK(st.st_mode):
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def __enter__(self) -> DeviceServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
