"""Listener callback objects and the supplicant that registers them with QTEE.

:class:`ListenerObject` is CListenerCBO (quic-teec.md §5.4): ``request`` (op 0) copies
the shared buffer, runs the service's handler on the copy and writes the answer back;
a listener already serving a request answers BUSY at once; ``wait`` (op 1) returns as
soon as the listener is free, or after 4.5 s anyway (the caller then retries).

The real CListenerCBO returns ``Object_ERROR_BUSY`` (-99), which the Linux driver turns
into ERROR on its way to QTEE (only -EBUSY/-ENOSPC map to BUSY, qtee-kernel.md §3.6).
qtee's listener answers ``-EBUSY`` so that QTEE sees BUSY and the busy/wait rule works
through the driver.

:class:`TaBufferObject` is CRequestTABuffer: ``get(uuid)`` (op 0) returns the TA image
of that UUID from the TA directories as a memory object; ``cleanup`` (op 1) does nothing.

:class:`Supplicant` is the daemon: its own context, worker pool and client env, the time
(0xB), file-storage (0xA), GPFS (0x7000) and RPMB (0x2000) listeners and TA autoload
registered at start, unregistered at :meth:`Supplicant.stop`.  Each listener's buffer
has the size its real service allocates (quic-teec.md §5.4).
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Final

from objects import DriverError, QteeError, UsageError, op
from qtee._idl import idl_op
from qtee.client import CallbackObject, Client, MemoryObject, ObjRef
from qtee.credentials import Credentials
from qtee.secure import REGISTER_LISTENER_UID, REGISTER_TA_BUF_UID
from supplicant._gpfs import GpfsService
from supplicant._rpmb import EmulatedRpmb
from supplicant._rpmb_listener import RpmbService

__all__ = [
    "FS_LISTENER_ID",
    "GPFS_BUFFER_SIZE",
    "GPFS_LISTENER_ID",
    "LISTENER_BUFFER_SIZE",
    "RPMB_BUFFER_SIZE",
    "RPMB_LISTENER_ID",
    "TIME_LISTENER_ID",
    "ListenerObject",
    "Supplicant",
    "TaBufferObject",
]

log = logging.getLogger("qtee.supplicant")

TIME_LISTENER_ID: Final = 0xB
FS_LISTENER_ID: Final = 0xA
#: Shared buffer of the time and FS listeners (time_msg.h, fs_msg.h: 20 KiB).
LISTENER_BUFFER_SIZE: Final = 20 * 1024
GPFS_LISTENER_ID: Final = 0x7000
#: The GPFS listener's buffer (gpfs_msg.h: GPFILE_SERVICE_BUF_LEN, 504 KiB).
GPFS_BUFFER_SIZE: Final = 504 * 1024
RPMB_LISTENER_ID: Final = 0x2000
#: The RPMB listener's buffer (rpmb_service.c: TZ_MAX_BUF_LEN, 20000 + 40 bytes).
RPMB_BUFFER_SIZE: Final = 20000 + 40
#: How long ``wait`` blocks before returning OK anyway (CListenerCBO: ~4.5 s).
WAIT_TIMEOUT: Final = 4.5

Handler = Callable[[bytes], bytes]


class ListenerObject(CallbackObject):
    """CListenerCBO: one listener service behind a shared buffer."""

    def __init__(self, listener_id: int, buffer: MemoryObject, handler: Handler) -> None:
        if not isinstance(listener_id, int) or not 0 < listener_id <= 0xFFFF_FFFF:
            raise UsageError(f"listener id must be a u32 > 0, not {listener_id!r}")
        if not callable(handler):
            raise UsageError("handler must be callable: request bytes -> answer bytes")
        self.listener_id = listener_id
        self.buffer = buffer
        self.handler = handler
        self._free = threading.Condition()
        self._busy = False
        self.served = 0

    def __repr__(self) -> str:
        return f"<ListenerObject {self.listener_id:#x}>"

    @idl_op("IListenerCBO", "request")
    def request(self) -> tuple[bytes, bytes, None, None, None, None]:
        """Serve the request in the shared buffer; BUSY if one is being served."""
        with self._free:
            if self._busy:
                raise QteeError(-errno.EBUSY, f"listener {self.listener_id:#x} is busy")
            self._busy = True
        try:
            view = self.buffer.view
            answer = self.handler(bytes(view))
            if len(answer) > len(view):
                raise UsageError(f"answer of {len(answer)} B does not fit the buffer")
            view[: len(answer)] = answer
            self.served += 1
        finally:
            with self._free:
                self._busy = False
                self._free.notify()
        return b"", struct.pack("<I", 1), None, None, None, None

    @idl_op("IListenerCBO", "wait")
    def wait(self) -> None:
        """Return once the listener is free (OK after the timeout too)."""
        with self._free:
            self._free.wait_for(lambda: not self._busy, timeout=WAIT_TIMEOUT)


class TaBufferObject(CallbackObject):
    """CRequestTABuffer: TA images by UUID, as memory objects."""

    def __init__(self, client: Client, find: Callable[[bytes], bytes | None]) -> None:
        self.client = client
        self.find = find
        self._sent: list[MemoryObject] = []
        self._lock = threading.Lock()

    @op(0, ib=(16,), oo=1)
    def get(self, uuid: bytes) -> MemoryObject:
        """The image of ``uuid`` in a fresh memory object; ERROR when there is none."""
        image = self.find(uuid)
        if image is None:
            raise QteeError(1, f"no TA image for {uuid.hex()}")
        mem = self.client.memory(len(image))
        mem.view[:] = image
        with self._lock:  # our copy of earlier images is no longer needed
            old, self._sent = self._sent, [mem]
        for m in old:
            m.release()
        return mem

    @op(1)
    def cleanup(self) -> None:
        """Drop this side's copies of the images handed out."""
        self.close()

    def close(self) -> None:
        """Release the owner's copies of every image handed out."""
        with self._lock:
            old, self._sent = self._sent, []
        for m in old:
            m.release()


class Supplicant:
    """The listener daemon: registers listeners and TA autoload, serves them, unregisters.

    ``storage`` (a directory) enables the file-storage listener, ``gpfs`` (a directory) the
    GPFS listener, ``rpmb`` (an :class:`~supplicant.EmulatedRpmb`, or the path of its state
    file) the RPMB listener, ``ta_dirs`` the TA autoload service; the time listener is
    always there unless ``time_service`` is False.  An RPMB device opened from a path is
    closed at :meth:`stop`; one passed in stays the caller's.
    It keeps its IRegisterListenerCBO and IRegisterTABufCBO objects until :meth:`stop`:
    its registrations are theirs and end when they are released (or its fd closes).
    """

    def __init__(
        self,
        device: object,
        *,
        storage: str | os.PathLike[str] | None = None,
        gpfs: str | os.PathLike[str] | None = None,
        rpmb: EmulatedRpmb | str | os.PathLike[str] | None = None,
        ta_dirs: Sequence[str | os.PathLike[str]] = (),
        time_service: bool = True,
        workers: int = 4,
        credentials: Credentials | None = None,
    ) -> None:
        from qtee import Device, RemoteDevice

        if not isinstance(device, Device | RemoteDevice):  # what Client takes
            raise TypeError("Supplicant needs a qtee.Device or a connected device (qtee.connect)")
        self.client = Client(device, workers=workers)
        self.listeners: dict[int, ListenerObject] = {}
        self._memories: list[MemoryObject] = []
        self._env: ObjRef | None = None
        self._register: ObjRef | None = None
        self._ta_register: ObjRef | None = None
        self._ta_object: TaBufferObject | None = None
        self.store: object | None = None
        self.gpfs: GpfsService | None = None
        self.rpmb: EmulatedRpmb | None = None
        self._own_rpmb = False
        if rpmb is not None and not isinstance(rpmb, EmulatedRpmb | str | os.PathLike):
            raise UsageError(f"rpmb must be an EmulatedRpmb or a path, not {type(rpmb).__name__}")
        try:
            self._env = self.client.client_env(credentials)
            self._register = self.client.open_service(self._env, REGISTER_LISTENER_UID)
            if time_service:
                from supplicant._time import TimeService

                self.add_listener(TIME_LISTENER_ID, TimeService().handle)
            if storage is not None:
                from supplicant._fs import FileStore

                store = FileStore(storage)
                self.store = store
                self.add_listener(FS_LISTENER_ID, store.handle)
            if gpfs is not None:
                self.gpfs = GpfsService(gpfs)
                self.add_listener(GPFS_LISTENER_ID, self.gpfs.handle, GPFS_BUFFER_SIZE)
            if rpmb is not None:
                if isinstance(rpmb, EmulatedRpmb):
                    self.rpmb = rpmb
                else:
                    self.rpmb, self._own_rpmb = EmulatedRpmb(rpmb), True
                service = RpmbService(self.rpmb)
                self.add_listener(RPMB_LISTENER_ID, service.handle, RPMB_BUFFER_SIZE)
            if ta_dirs:
                from supplicant._autoload import TaDirectory

                tas = TaDirectory(list(ta_dirs))
                self._ta_object = TaBufferObject(self.client, tas.find)
                self._ta_register = self.client.open_service(self._env, REGISTER_TA_BUF_UID)
                self._ta_register.invoke(0, self._ta_object)
        except BaseException:
            self.stop()
            raise

    def add_listener(
        self, listener_id: int, handler: Handler, size: int = LISTENER_BUFFER_SIZE
    ) -> ListenerObject:
        """Register a listener served by ``handler`` (request bytes -> answer bytes)."""
        if self._register is None:
            raise UsageError("the supplicant is stopped")
        mem = self.client.memory(size)
        self._memories.append(mem)
        listener = ListenerObject(listener_id, mem, handler)
        self._register.invoke(0, struct.pack("<I", listener_id), listener, mem)
        self.listeners[listener_id] = listener
        return listener

    def stop(self) -> None:
        """Unregister everything, close the context, join the workers (idempotent).

        On a connection that is already gone (the server said bye, or died) there is
        nothing to unregister from: the server's fd close ended the registrations."""
        try:
            if self._register is not None:
                for lid in list(self.listeners):
                    self._register.invoke(0, struct.pack("<I", lid), None, None)
                self.listeners.clear()
            if self._ta_register is not None:
                self._ta_register.invoke(0, None)
        except DriverError as exc:
            if not self.client.fd_gone(exc):
                raise
            self.listeners.clear()
        finally:
            for ref in (self._ta_register, self._register, self._env):
                if ref is not None:
                    ref.release()
            self._ta_register = self._register = self._env = None
            if self._ta_object is not None:
                self._ta_object.close()
            for mem in self._memories:
                mem.release()
            self._memories.clear()
            close_all = getattr(self.store, "close_all", None)
            if callable(close_all):
                close_all()
            if self.gpfs is not None:
                self.gpfs.close_all()
            if self.rpmb is not None and self._own_rpmb:
                self.rpmb.close()
            self.client.close()

    def __enter__(self) -> Supplicant:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve_forever(self, stop: threading.Event | None = None) -> None:
        """Block until ``stop`` is set (the daemon's main loop); the workers do the work."""
        while not (stop.is_set() if stop is not None else False):
            time.sleep(0.2)
