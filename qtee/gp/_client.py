"""The GlobalPlatform TEE Client API, as libteec implements it (optee.md §1).

Every TEEC type and function has a Python counterpart a GP user will recognise:

=================================  ===============================================
``TEEC_Context``                   :class:`TeecContext` (``TEEC_InitializeContext``
                                   is the constructor, ``TEEC_FinalizeContext``
                                   :meth:`~TeecContext.finalize` / ``with``)
``TEEC_Session``                   :class:`TeecSession` (``TEEC_OpenSession`` is
                                   :meth:`TeecContext.open_session`,
                                   ``TEEC_InvokeCommand``
                                   :meth:`~TeecSession.invoke_command`,
                                   ``TEEC_CloseSession`` :meth:`~TeecSession.close`)
``TEEC_SharedMemory``              :class:`TeecSharedMemory` (``allocate``,
                                   ``register``, ``release``)
``TEEC_Operation``                 :class:`TeecOperation`
``TEEC_Value``                     :class:`TeecValue`
``TEEC_TempMemoryReference``       :class:`TeecTempMemoryReference`
``TEEC_RegisteredMemoryReference`` :class:`TeecRegisteredMemoryReference`
``TEEC_RequestCancellation``       :meth:`TeecContext.request_cancellation`
=================================  ===============================================

A ``TEEC_Result`` other than SUCCESS is raised as :class:`~qtee.gp.TeecError` with its
``code`` and ``origin`` (the ``returnOrigin`` out-param): origin API for what libteec
refuses itself (before any ioctl), COMMS for a failed ioctl (errno mapped by
:func:`~qtee.gp.errno_to_result`), and otherwise what the TEE answered.  When the TEE
answered, the operation's outputs (values, memref sizes, shadow bytes) are written back
*before* the error is raised, so a ``TEEC_ERROR_SHORT_BUFFER`` carries the size it
needs (§1.4).  Passing the wrong Python type (a :class:`TeecValue` where the param type
says memref, say) is a programming error: ``UsageError``/``TypeError``, as C would not
compile or would misread the union.

**Results, one way.**  Every call either succeeds or raises :class:`~qtee.gp.TeecError`
(``code`` and ``origin``: :class:`~qtee.gp.TeecResult` and :class:`~qtee.gp.TeecOrigin`
members for known values, plain ints otherwise).  A call that reached the TEE also
reports its return origin on success, in the same form: ``TEEC_InvokeCommand``'s is what
:meth:`TeecSession.invoke_command` returns, ``TEEC_OpenSession``'s is the new session's
:attr:`TeecSession.origin` (TRUSTED_APP whenever the TA ran).

The API talks only to a :class:`~qtee.gp.GpTransport` (the kernel's ioctls).
:class:`TeecContext` makes one from what it is given: an OP-TEE device
(:class:`qtee.OpteeDevice`, or a served one from :func:`qtee.connect`) gets a context of
its own; a QTEE device (:class:`qtee.Device`, or a served one) gets a
:class:`qtee.Client` of its own that speaks IGPAppClient (0x199); a
:class:`qtee.Client` is used as it is (and stays the caller's).
"""

from __future__ import annotations

import logging
import threading
import uuid as uuidlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from objects import DriverError, UsageError
from qtee import uapi
from qtee.gp._defs import _U32, TeecLogin, TeecOrigin, TeecResult, _known
from qtee.gp._identity import gid_connection_data
from qtee.gp._operation import TeecOperation, _Call, _TempShm
from qtee.gp._shared_memory import _MAX_ALLOC, TeecSharedMemory, _register_pages, _shm_failure
from qtee.gp._teec_errors import _api, _bad, _is_int
from qtee.gp._transport import GpTransport, OpteeTransport

if TYPE_CHECKING:
    from qtee._optee.core import OpteeDevice
    from qtee._qcomtee.core import Device
    from qtee._remote.remote import RemoteDevice
    from qtee.client import Client

__all__ = [
    "TEEC_MAX_DEV_SEQ",
    "TeecContext",
    "TeecSession",
]

log = logging.getLogger("qtee.gp.client")

#: libteec tries ``/dev/tee0`` .. ``/dev/tee9``: at most this many devices.
TEEC_MAX_DEV_SEQ: Final = 10
#: The one name ``TEEC_InitializeContext`` recognises.
_OPTEE_TZ: Final = "optee-tz"

#: libteec's ``teec_mutex``: guards ``TEEC_Operation.imp.session`` for cancellation.
_teec_mutex = threading.Lock()


# ----------------------------------------------------------------------------- context


class _Unqualified(Exception):
    """A candidate device that is no GP TEE (``teec_open_dev`` skips it)."""


def _as_transport(source: object) -> GpTransport:
    """A candidate device -> its transport.

    An OP-TEE device gets a new context (a served one is asked its impl id first); a
    QTEE device gets a new :class:`~qtee.client.Client` (owned by the transport) that
    speaks IGPAppClient; a Client is used as it is.  A QTEE without IGPAppClient raises
    :class:`_Unqualified`."""
    from qtee._optee.core import OpteeDevice
    from qtee._qcomtee.core import Device
    from qtee._remote.remote import RemoteDevice
    from qtee.client import Client

    if isinstance(source, OpteeDevice):
        return OpteeTransport(source.open(), source.memory)
    if isinstance(source, RemoteDevice):
        ctx = source.open()
        try:
            arg = bytearray(uapi.VersionData.SIZE)
            ctx.ioctl(uapi.TEE_IOC_VERSION, arg)
            impl_id = uapi.VersionData.unpack(arg).impl_id
        except BaseException:
            ctx.close()
            raise
        if impl_id == uapi.TEE_IMPL_ID_OPTEE:
            return OpteeTransport(ctx, source.memory)  # type: ignore[arg-type]
        ctx.close()
        return _qtee_transport(Client(source, workers=1), owned=True)
    if isinstance(source, Device):
        return _qtee_transport(Client(source, workers=1), owned=True)
    if isinstance(source, Client):
        return _qtee_transport(source, owned=False)
    if isinstance(source, GpTransport):
        return source
    raise TypeError(
        "TeecContext takes a GpTransport, an OpteeDevice, a qtee Device, a connected "
        f"device (qtee.connect) or a qtee Client, not {source!r}"
    )


def _qtee_transport(client: Client, *, owned: bool) -> GpTransport:
    """IGPAppClient of ``client``'s QTEE (``owned``: closed with the transport)."""
    from objects import QteeError
    from qtee.gp._qtee_transport import QteeGpTransport
    from qtee.secure._gpclient import CGPAPPCLIENT_UID

    try:
        return QteeGpTransport(client, owns_client=owned)
    except BaseException as exc:
        if owned:
            client.close()
        if isinstance(exc, QteeError):
            raise _Unqualified(
                f"this QTEE offers no IGPAppClient (UID {CGPAPPCLIENT_UID:#x}): qtee.Device() "
                "offers it, or call qtee.secure.install_gp_app_client(world) before use"
            ) from None
        raise


class TeecContext:
    """``TEEC_Context``: one open TEE device, found as ``TEEC_InitializeContext`` does.

    ``transport_or_device`` is a :class:`~qtee.gp.GpTransport`; an
    :class:`~qtee.OpteeDevice` (a new context of it is opened); a QTEE
    :class:`~qtee.Device` (a new :class:`~qtee.Client` of it, closed with the context,
    speaks IGPAppClient); a :class:`~qtee.Client` (used as it is: it stays the
    caller's); a device from :func:`qtee.connect` (either kind, by its impl id); or a
    sequence of them standing for ``/dev/tee0`` .. ``/dev/tee9`` (only the first
    :data:`TEEC_MAX_DEV_SEQ` are tried).  The first that reports ``TEE_GEN_CAP_GP`` (and
    for ``name == "optee-tz"``, impl id OP-TEE with ``TEE_OPTEE_CAP_TZ``) is used; a
    device that does not qualify is closed again.  Any other name matches nothing.  No
    device: ``TEEC_ERROR_ITEM_NOT_FOUND`` (origin API).  The context owns the transport
    it uses: :meth:`finalize` closes it, and with it every session still open (the
    kernel closes them with the fd) and every shared memory.
    """

    def __init__(
        self,
        transport_or_device: (
            GpTransport
            | OpteeDevice
            | Device
            | RemoteDevice
            | Client
            | Sequence[GpTransport | OpteeDevice | Device | RemoteDevice | Client]
        ),
        name: str | None = None,
    ) -> None:
        if name is not None and not isinstance(name, str):
            raise TypeError(f"a context name is a str or None, not {type(name).__name__}")
        source = transport_or_device
        candidates: Sequence[object] = (
            source[:TEEC_MAX_DEV_SEQ] if isinstance(source, Sequence) else [source]
        )
        self.name = name
        self._lock = threading.Lock()
        self._sessions: set[TeecSession] = set()
        self._shms: set[TeecSharedMemory] = set()
        self.closed = False
        why: list[str] = []
        for candidate in candidates:
            found = self._try(candidate, name, why)
            if found is not None:
                self.transport, gen_caps = found
                #: ``imp.reg_mem``: the TEE can share client pages (``TEE_GEN_CAP_REG_MEM``).
                self.reg_mem = bool(gen_caps & uapi.TEE_GEN_CAP_REG_MEM)
                #: ``imp.memref_null``: a NULL memref can be sent (``TEE_GEN_CAP_MEMREF_NULL``).
                self.memref_null = bool(gen_caps & uapi.TEE_GEN_CAP_MEMREF_NULL)
                return
        detail = f"no TEE device matches {name!r}" if name is not None else "no GP TEE device"
        raise _api(
            TeecResult.TEEC_ERROR_ITEM_NOT_FOUND, "; ".join([detail, *why]) if why else detail
        )

    @staticmethod
    def _try(candidate: object, name: str | None, why: list[str]) -> tuple[GpTransport, int] | None:
        """``teec_open_dev``: the transport and its gen caps if it qualifies (else why
        not, in ``why`` when there is more to say than its caps)."""
        try:
            transport = _as_transport(candidate)
        except _Unqualified as exc:
            why.append(str(exc))
            return None
        try:
            impl_id, impl_caps, gen_caps = transport.version()
        except DriverError as exc:
            log.info("TEE_IOC_VERSION failed: %s", exc)
            gen_caps = impl_id = impl_caps = 0
        except BaseException:
            transport.close()
            raise
        ok = bool(gen_caps & uapi.TEE_GEN_CAP_GP)  # only GP TEEs
        if ok and name is not None:
            ok = (
                name == _OPTEE_TZ
                and impl_id == uapi.TEE_IMPL_ID_OPTEE
                and bool(impl_caps & uapi.TEE_OPTEE_CAP_TZ)
            )
        if not ok:
            transport.close()
            return None
        return transport, gen_caps

    # ------------------------------------------------------------------ lifetime
    def finalize(self) -> None:
        """``TEEC_FinalizeContext``: close the device.  Idempotent.

        The kernel closes every session still open on it and frees its shms; the
        :class:`TeecSession` and :class:`TeecSharedMemory` objects become closed and
        released.
        """
        with self._lock:
            if self.closed:
                return
            self.closed = True
            sessions, self._sessions = list(self._sessions), set()
            shms, self._shms = list(self._shms), set()
        for session in sessions:
            session._dropped()
        for shm in shms:
            shm._dropped()
        self.transport.close()

    def __enter__(self) -> TeecContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finalize()

    # ------------------------------------------------------------------ shared memory
    def allocate_shared_memory(self, size: int, flags: int) -> TeecSharedMemory:
        """``TEEC_AllocateSharedMemory`` (see :meth:`TeecSharedMemory.allocate`)."""
        return TeecSharedMemory.allocate(self, size, flags)

    def register_shared_memory(
        self, buffer: bytearray | memoryview | bytes, flags: int, size: int | None = None
    ) -> TeecSharedMemory:
        """``TEEC_RegisterSharedMemory`` (see :meth:`TeecSharedMemory.register`)."""
        return TeecSharedMemory.register(self, buffer, flags, size)

    def _track_shm(self, shm: TeecSharedMemory) -> None:
        with self._lock:
            closed = self.closed
            if not closed:
                self._shms.add(shm)
        if closed:  # finalized while it was being made: the kernel already freed it
            shm._dropped()

    def _forget_shm(self, shm: TeecSharedMemory, shm_id: int) -> None:
        with self._lock:
            self._shms.discard(shm)
            if self.closed:
                return
        try:
            self.transport.shm_free(shm_id)
        except DriverError as exc:
            log.warning("freeing shm %d failed: %s", shm_id, exc)

    def _temp_shm(self, size: int) -> _TempShm:
        """A temporary shm for a temp memref (libteec's per-call register or allocate)."""
        if size > _MAX_ALLOC:
            raise _api(TeecResult.TEEC_ERROR_OUT_OF_MEMORY, f"cannot share {size} bytes")
        try:
            if self.reg_mem:
                return _TempShm(*_register_pages(self.transport, size))
            return _TempShm(*self.transport.shm_alloc(size))
        except DriverError as exc:
            code = _shm_failure(exc, self.reg_mem)
            raise _api(code, f"temporary shared memory: {exc}") from exc
        except MemoryError as exc:
            raise _api(TeecResult.TEEC_ERROR_OUT_OF_MEMORY, "temporary shared memory") from exc

    def _free_temp(self, temp: _TempShm) -> None:
        if self.closed:
            return
        try:
            self.transport.shm_free(temp.id)
        except DriverError as exc:
            log.warning("freeing temporary shm %d failed: %s", temp.id, exc)

    # ------------------------------------------------------------------ sessions
    def open_session(
        self,
        uuid: uuidlib.UUID | bytes,
        login: int = TeecLogin.TEEC_LOGIN_PUBLIC,
        connection_data: int | None = None,
        operation: TeecOperation | None = None,
    ) -> TeecSession:
        """``TEEC_OpenSession``: a session with the TA ``uuid``.

        ``login`` is the ``TEEC_LOGIN_*`` connection method; for GROUP and
        GROUP_APPLICATION ``connection_data`` is the gid (libteec copies the ``gid_t``
        into ``clnt_uuid``), for the others it is ignored.  An OpenSession cannot be
        cancelled through libteec (``cancel_id`` 0, the operation's session not set).
        Raises :class:`TeecError`; on SUCCESS the session's ``origin`` is the return
        origin, a :class:`TeecOrigin` (TRUSTED_APP when the TA ran).
        """
        if isinstance(uuid, uuidlib.UUID):
            uuid16 = uuid.bytes
        elif isinstance(uuid, bytes | bytearray) and len(uuid) == 16:
            uuid16 = bytes(uuid)
        else:
            raise UsageError(f"a TA UUID is a uuid.UUID or 16 bytes, not {uuid!r}")
        if not _is_int(login) or not 0 <= login <= _U32:
            raise UsageError(f"a connection method is a u32, not {login!r}")
        clnt = bytes(16)
        if login in (TeecLogin.TEEC_LOGIN_GROUP, TeecLogin.TEEC_LOGIN_GROUP_APPLICATION):
            if connection_data is None:
                raise _bad("a GROUP login needs the gid as connection data")
            clnt = gid_connection_data(connection_data)
        transport = self.transport
        call = _Call(self, operation)
        opened: list[TeecSession] = []

        def ioctl(params: list[uapi.Param]) -> tuple[int, int, list[uapi.Param]]:
            sid, ret, origin, back = transport.open_session(uuid16, clnt, login, 0, params)
            if ret == TeecResult.TEEC_SUCCESS:
                opened.append(self._adopt(sid, origin))
            return ret, origin, back

        call.run(ioctl)
        return opened[0]

    def _adopt(self, session_id: int, origin: int) -> TeecSession:
        session = TeecSession(self, session_id, origin)
        with self._lock:
            if not self.closed:
                self._sessions.add(session)
                return session
        session._dropped()  # finalized meanwhile: the kernel closed it with the fd
        return session

    def _forget(self, session: TeecSession) -> bool:
        """Drop a closing session; False if the context is already finalized."""
        with self._lock:
            self._sessions.discard(session)
            return not self.closed

    def request_cancellation(self, operation: TeecOperation) -> None:
        """``TEEC_RequestCancellation``: cancel the invoke ``operation`` was last used with.

        Issues ``TEE_IOC_CANCEL {session, cancel_id=0}`` on that session's own context;
        an operation never passed to :meth:`TeecSession.invoke_command` is not cancelled
        (libteec never records an OpenSession's).  The outcome shows in the invoke's
        result (typically ``TEEC_ERROR_CANCEL`` from a TA that unmasked cancellation);
        an ioctl error is only logged, as libteec does.
        """
        with _teec_mutex:
            session = operation._session
        if session is None:
            return
        ctx = session.context
        if ctx.closed:
            return
        try:
            ctx.transport.cancel(session.session_id, 0)
        except DriverError as exc:
            log.warning("TEE_IOC_CANCEL failed: %s", exc)

    def __repr__(self) -> str:
        state = "finalized" if self.closed else f"sessions={len(self._sessions)}"
        return f"<TeecContext {state}>"


class TeecSession:
    """``TEEC_Session``: an open session (``session_id`` 0 once closed).

    ``origin`` is the return origin of the OpenSession that made it.
    """

    __slots__ = ("__weakref__", "_lock", "context", "origin", "session_id")

    def __init__(self, context: TeecContext, session_id: int, origin: int) -> None:
        self.context = context
        self.session_id = session_id
        #: The return origin of the OpenSession that made it (a :class:`TeecOrigin`
        #: when it is a known one, as a :class:`TeecError`'s ``origin`` is).
        self.origin = _known(TeecOrigin, origin)
        self._lock = threading.Lock()

    def invoke_command(self, command_id: int, operation: TeecOperation | None = None) -> int:
        """``TEEC_InvokeCommand``: run ``command_id`` in the TA; returns the return origin
        (a :class:`TeecOrigin` when it is a known one; a failure is a :class:`TeecError`
        with its own).

        Records the session in ``operation`` first (under libteec's mutex) so that
        :meth:`TeecContext.request_cancellation` can reach this call.  On a closed session
        the ioctl goes out with session 0, which the driver refuses (EINVAL:
        BAD_PARAMETERS, origin COMMS), as it refuses a closed session's id.
        """
        if not _is_int(command_id) or not 0 <= command_id <= _U32:
            raise UsageError(f"a command id is a u32, not {command_id!r}")
        if operation is not None:
            with _teec_mutex:
                operation._session = self
        ctx = self.context
        transport = ctx.transport
        session_id = self.session_id

        def ioctl(params: list[uapi.Param]) -> tuple[int, int, list[uapi.Param]]:
            return transport.invoke(session_id, command_id, 0, params)

        return _Call(ctx, operation).run(ioctl)

    def close(self) -> None:
        """``TEEC_CloseSession``: idempotent; an ioctl error is only logged."""
        with self._lock:
            session_id, self.session_id = self.session_id, 0
        if not session_id or not self.context._forget(self):
            return
        try:
            self.context.transport.close_session(session_id)
        except DriverError as exc:
            log.warning("TEE_IOC_CLOSE_SESSION %#x failed: %s", session_id, exc)

    def _dropped(self) -> None:
        with self._lock:
            self.session_id = 0

    def __enter__(self) -> TeecSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<TeecSession {self.session_id:#x}>" if self.session_id else "<TeecSession closed>"
