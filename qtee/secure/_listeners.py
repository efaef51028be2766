"""Listener registration in QTEE, and how secure code reaches a listener.

A supplicant registers a *listener* -- a callback object (IListenerCBO) and a memory
object for the shared buffer -- with the IRegisterListenerCBO service, under a listener
id (time 0xB, file storage 0xA, ...; quic-teec.md §5.4).  Secure code then calls
:meth:`ListenerHandle.request`: the request bytes go into the shared buffer, QTEE
invokes the listener's ``request`` (op 0), and the answer is read back from the buffer.
QTEE threads take turns on one listener's buffer; a listener that is busy anyway (its
supplicant serving a request from elsewhere) answers BUSY, and the caller then
``wait``s (op 1) and tries again (the busy/wait rule of §5.4).

The TA-autoload service (IRegisterTABufCBO) takes one IRequestTABuffer callback object;
the app loader asks it for the image of a TA by UUID when a client loads a TA that is
not registered (``loadEmbedded``).

**Ownership.**  Every ``IClientEnv.open`` of UID 87 or 88 gives a fresh service object,
and a registration belongs to the service object it was made through (so to the client
that opened it; DESIGN.md "Ownership").  Another client cannot remove or replace it: a
register for a listener id in use is ``ERROR_ID_IN_USE`` whoever asks, its NULL too
unless it is the owner's; a TA-autoload register or NULL while another client's
callback is registered is ``IRegisterTABufCBO.ERROR_ALREADY_REGISTERED``.  The owner's NULL
unregisters (qtee's way, used on deinit; QTEE keeps registrations otherwise), and the
owner may replace its own TA-autoload callback.  A registration ends when its service
object's last reference goes (released, or the owner's fd closed: the kernel then
releases the context's QTEE objects), and when its callback object answers DEFUNCT.  A
listener request in flight keeps its registration's buffer and callback object until
it is done; the table forgets the registration at once.

Service UIDs: Qualcomm's sources never give ``CRegisterListenerCBO_UID``'s value (a
third-party kernel test uses 87); qtee uses 87 for it and 88 for IRegisterTABufCBO.
"""

from __future__ import annotations

import enum
import struct
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from objects import QteeError, UsageError, op
from qtee import _idl
from qtee._idl import idl_op
from qtee._qcomtee_msg import Result
from qtee.secure._world import Mapping, NsObject, SecureObject

if TYPE_CHECKING:
    from qtee.secure._world import SecureWorld

__all__ = [
    "ERROR_ALREADY_REGISTERED",
    "IRegisterListenerCBO",
    "IRegisterTABufCBO",
    "MAX_LISTENERS",
    "REGISTER_LISTENER_UID",
    "REGISTER_TA_BUF_UID",
    "ListenerHandle",
    "Listeners",
    "RegisterListener",
    "RegisterTABuffer",
]

REGISTER_LISTENER_UID: Final = 87
REGISTER_TA_BUF_UID: Final = 88
#: Listeners QTEE accepts at once (qtee's figure; past it: MAX_REGISTERED).
MAX_LISTENERS: Final = 16
#: How many BUSY -> wait -> retry rounds a request makes before giving up with BUSY.
MAX_BUSY_RETRIES: Final = 50


#: IRegisterListenerCBO's errors, from its shipped ``.idl`` (quic-teec.md §5.3).
IRegisterListenerCBO = _idl.errors("IRegisterListenerCBO", __name__)


class IRegisterTABufCBO(enum.IntEnum):
    """IRegisterTABufCBO's errors.  The model's own: Qualcomm publishes none, and 10 is
    the first service-defined result."""

    #: Another client's TA-autoload callback is registered.
    ERROR_ALREADY_REGISTERED = 10


# The names these errors had before their enums (kept: the same values).
ERROR_MAX_REGISTERED: Final = IRegisterListenerCBO.ERROR_MAX_REGISTERED
ERROR_ALIGNMENT: Final = IRegisterListenerCBO.ERROR_ALIGNMENT
ERROR_ID_IN_USE: Final = IRegisterListenerCBO.ERROR_ID_IN_USE
ERROR_ID_RESERVED: Final = IRegisterListenerCBO.ERROR_ID_RESERVED
#: IRegisterTABufCBO: another client's TA-autoload callback is registered.
ERROR_ALREADY_REGISTERED: Final = IRegisterTABufCBO.ERROR_ALREADY_REGISTERED

#: Capacity QTEE offers for request's "embedded offsets" output (u32 each).
OFFSETS_CAPACITY: Final = 16

# IListenerCBO ops
LISTENER_OP_REQUEST: Final = _idl.op_number("IListenerCBO", "request")
LISTENER_OP_WAIT: Final = _idl.op_number("IListenerCBO", "wait")
# IRequestTABuffer ops
TA_BUF_OP_GET: Final = 0

_PAGE: Final = 4096


@dataclass(slots=True)
class _Registration:
    listener_id: int
    #: The RegisterListener service object the registration was made through.
    owner: object
    cbo: NsObject
    mem: NsObject | None
    mapping: Mapping | None
    #: One request at a time owns the shared buffer (write, call, read back).
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Requests using the buffer now; ``removed``: out of the table.  The last of the
    #: two to end drops the registration (both guarded by the table's lock).
    users: int = 0
    removed: bool = False

    def drop(self) -> None:
        if self.mapping is not None:
            self.mapping.unmap()
        if self.mem is not None:
            self.mem.release()
        self.cbo.release()


class Listeners:
    """QTEE's table of registered listeners and the TA-autoload callback (one per world)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[int, _Registration] = {}
        self.ta_buffer: NsObject | None = None
        #: The RegisterTABuffer service object ``ta_buffer`` was registered through.
        self.ta_owner: object | None = None

    def ids(self) -> list[int]:
        """Listener ids registered now."""
        with self._lock:
            return sorted(self._by_id)

    def get(self, listener_id: int) -> ListenerHandle:
        """The listener registered under ``listener_id``; NOT_FOUND-like ERROR if none."""
        with self._lock:
            reg = self._by_id.get(listener_id)
        if reg is None:
            raise QteeError(Result.ERROR_DEFUNCT, f"no listener {listener_id:#x} is registered")
        return ListenerHandle(self, reg)

    def _add(self, reg: _Registration) -> None:
        with self._lock:
            old = self._by_id.get(reg.listener_id)
            if old is not None:
                raise QteeError(ERROR_ID_IN_USE, f"listener {reg.listener_id:#x} is registered")
            if len(self._by_id) >= MAX_LISTENERS:
                raise QteeError(ERROR_MAX_REGISTERED, f"{MAX_LISTENERS} listeners registered")
            self._by_id[reg.listener_id] = reg

    def _take(self, regs: list[_Registration]) -> list[_Registration]:
        """Out of the table (lock held); those no request is using are returned to drop."""
        idle = []
        for reg in regs:
            del self._by_id[reg.listener_id]
            reg.removed = True
            if not reg.users:
                idle.append(reg)
        return idle

    def _unregister(self, listener_id: int, owner: object) -> None:
        """The NULL register: only the owner's removes; another client's is ID_IN_USE."""
        with self._lock:
            cur = self._by_id.get(listener_id)
            if cur is None:
                return
            if cur.owner is not owner:
                raise QteeError(ERROR_ID_IN_USE, f"listener {listener_id:#x} is another's")
            idle = self._take([cur])
        for reg in idle:
            reg.drop()

    def _remove(self, reg: _Registration) -> None:
        """Drop ``reg`` if it is still registered (its listener answered DEFUNCT)."""
        with self._lock:
            idle = self._take([reg]) if self._by_id.get(reg.listener_id) is reg else []
        for r in idle:
            r.drop()

    def _release_owner(self, owner: object) -> None:
        """``owner``'s last reference is gone: every registration made through it ends."""
        with self._lock:
            idle = self._take([r for r in self._by_id.values() if r.owner is owner])
            ta = None
            if self.ta_owner is owner:
                ta, self.ta_buffer, self.ta_owner = self.ta_buffer, None, None
        for reg in idle:
            reg.drop()
        if ta is not None:
            ta.release()

    def _use(self, reg: _Registration) -> None:
        """A request starts using ``reg``'s buffer; DEFUNCT if it was removed meanwhile."""
        with self._lock:
            if reg.removed:
                raise QteeError(Result.ERROR_DEFUNCT, f"listener {reg.listener_id:#x} is gone")
            reg.users += 1

    def _unuse(self, reg: _Registration) -> None:
        with self._lock:
            reg.users -= 1
            last = reg.removed and not reg.users
        if last:
            reg.drop()

    def clear(self) -> None:
        """Drop every registration (QTEE shutting down)."""
        with self._lock:
            idle = self._take(list(self._by_id.values()))
            ta, self.ta_buffer, self.ta_owner = self.ta_buffer, None, None
        for reg in idle:
            reg.drop()
        if ta is not None:
            ta.release()


class ListenerHandle:
    """Secure code's view of one listener: :meth:`request` with the busy/wait rule."""

    def __init__(self, table: Listeners, reg: _Registration) -> None:
        self._table = table
        self._reg = reg

    @property
    def buffer_size(self) -> int:
        """Bytes of the shared buffer (0 when registered without one)."""
        return len(self._reg.mapping.view) if self._reg.mapping is not None else 0

    def request(self, data: bytes) -> bytes:
        """Put ``data`` in the shared buffer, call the listener, return the buffer after it.

        BUSY -> ``wait`` -> retry; a listener that answers DEFUNCT is dropped.  Any other
        failure is raised as :class:`QteeError` with the listener's result.
        """
        reg = self._reg
        if reg.mapping is None:
            raise QteeError(Result.ERROR_INVALID, "listener has no shared buffer")
        view = reg.mapping.view
        if len(data) > len(view):
            raise QteeError(Result.ERROR_SIZE_IN, f"{len(data)} B request, buffer {len(view)} B")
        self._table._use(reg)  # the buffer stays mapped until this request is done
        try:
            with reg.lock:  # QTEE threads take turns on the shared buffer
                return self._request(reg, view, data)
        finally:
            self._table._unuse(reg)

    def _request(self, reg: _Registration, view: memoryview, data: bytes) -> bytes:
        for _ in range(MAX_BUSY_RETRIES):
            view[: len(data)] = data
            view[len(data) :] = bytes(len(view) - len(data))
            res = reg.cbo.invoke(LISTENER_OP_REQUEST, ob=[OFFSETS_CAPACITY, 4], n_oo=4)
            for obj in res.oo:
                if isinstance(obj, NsObject):
                    obj.release()
            if res.result == Result.OK:
                return bytes(view)
            if res.result == Result.ERROR_BUSY:
                reg.cbo.invoke(LISTENER_OP_WAIT)
                continue
            if res.result == Result.ERROR_DEFUNCT:
                self._table._remove(reg)
            raise QteeError(res.result, f"listener {reg.listener_id:#x} answered {res.result}")
        raise QteeError(Result.ERROR_BUSY, f"listener {reg.listener_id:#x} stayed busy")


class RegisterListener(SecureObject):
    """IRegisterListenerCBO: op 0 register(u32 listenerId; OI cbo; OI memRegion or NULL).

    One instance per ``IClientEnv.open``: the registrations made through it are its own.
    """

    ERRORS = IRegisterListenerCBO

    def __init__(self, world: SecureWorld) -> None:
        self.world = world

    @idl_op("IRegisterListenerCBO", "register")
    def register(self, raw_id: bytes, cbo: NsObject | None, mem: NsObject | None) -> None:
        (listener_id,) = struct.unpack("<I", raw_id)
        table = self.world.listeners
        if listener_id == 0:
            raise QteeError(ERROR_ID_RESERVED, "listener id 0 is reserved")
        if cbo is None:  # NULL: the owner unregisters
            table._unregister(listener_id, self)
            return
        if not isinstance(cbo, NsObject) or (mem is not None and not isinstance(mem, NsObject)):
            raise QteeError(Result.ERROR_INVALID, "listener and buffer must be NS objects")
        mapping = None
        if mem is not None:
            mapping = self.world.map_region(mem)
            if mapping.paddr % _PAGE:
                mapping.unmap()
                raise QteeError(ERROR_ALIGNMENT, "listener buffer is not page aligned")
        reg = _Registration(listener_id, self, cbo.retain(), mem.retain() if mem else None, mapping)
        try:
            table._add(reg)
        except QteeError:
            reg.drop()
            raise

    def on_release(self) -> None:
        self.world.listeners._release_owner(self)


class RegisterTABuffer(SecureObject):
    """IRegisterTABufCBO: op 0 register(OI IRequestTABuffer or NULL to unregister).

    One instance per ``IClientEnv.open``; the registration belongs to the instance that
    made it, and only it may replace or unregister it.
    """

    ERRORS = IRegisterTABufCBO

    def __init__(self, world: SecureWorld) -> None:
        self.world = world

    @op(0, io=1)
    def register(self, cbo: NsObject | None) -> None:
        if cbo is not None and not isinstance(cbo, NsObject):
            raise QteeError(Result.ERROR_INVALID, "the TA-buffer callback must be an NS object")
        table = self.world.listeners
        with table._lock:
            if table.ta_owner is not None and table.ta_owner is not self:
                raise QteeError(ERROR_ALREADY_REGISTERED, "another client's TA autoload")
            old = table.ta_buffer
            if cbo is None:
                table.ta_buffer = table.ta_owner = None
            else:
                table.ta_buffer, table.ta_owner = cbo.retain(), self
        if old is not None:
            old.release()

    def on_release(self) -> None:
        self.world.listeners._release_owner(self)


def fetch_ta_image(world: SecureWorld, uuid: bytes) -> bytes | None:
    """Ask the TA-autoload callback for the image of ``uuid`` (None: none registered or
    the supplicant has no such TA)."""
    if len(uuid) != 16:
        raise UsageError(f"a TA UUID is 16 bytes, not {len(uuid)}")
    table = world.listeners
    with table._lock:
        cbo = table.ta_buffer.retain() if table.ta_buffer is not None else None
    if cbo is None:
        return None
    try:
        res = cbo.invoke(TA_BUF_OP_GET, ib=[uuid], n_oo=1)
        if res.result != Result.OK:
            if res.result == Result.ERROR_DEFUNCT:  # the supplicant is gone: forget it
                with table._lock:
                    stale = table.ta_buffer is cbo
                    if stale:
                        table.ta_buffer = table.ta_owner = None
                if stale:
                    cbo.release()
            return None
        mem = res.oo[0]
        if not isinstance(mem, NsObject):
            return None
        try:
            mapping = world.map_region(mem)
            try:
                return bytes(mapping.view)
            finally:
                mapping.unmap()
        finally:
            mem.release()
    finally:
        cbo.release()
