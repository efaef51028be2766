"""A :class:`~qtee.gp._transport.GpTransport` through QTEE objects (libminkteec's way).

On a QTEE device there are no GP ioctls: libminkteec opens the ``IGPAppClient`` service
(``CGPAppClient_UID`` 0x199) through the client env and speaks its IDL, one
``IGPSession`` object per session (wire layout: :mod:`qtee.secure._gpclient`).
:class:`QteeGpTransport` offers the kernel-shaped calls libteec makes on top of that, so
the same GP client code runs on either TEE:

* ``version()`` reports ``(TEE_IMPL_ID_QTEE = 4, 0, TEE_GEN_CAP_GP |
  TEE_GEN_CAP_MEMREF_NULL)``: GP-capable, NULL memrefs supported, no REG_MEM
  (``shm_register`` fails with EOPNOTSUPP, so libteec falls back to shadow buffers).
* ``shm_alloc`` is a memory object (``Client.memory``); its shm id is the
  MemoryObject's id.  A memref param naming it travels as that memory object plus the
  ``{size, offset, sharedObjIndex}`` descriptor; QTEE maps it for the call.
* A session is an ``IGPSession`` object held by this transport's client; the session
  number handed out is a key into this transport's table (from 1).  A key this
  transport does not have is EINVAL, as the kernel answers for a session that is not
  in the fd's list -- and another client's session object is unusable anyway, since
  object ids are per context.
* An IDL-level failure (the method did not run) becomes a GP result the way
  libminkteec's ``map_err`` does it: DEFUNCT -> TARGET_DEAD, BUSY -> BUSY, KMEM and
  NOSLOTS -> OUT_OF_MEMORY, all origin TEE; anything else GENERIC, origin COMMS for
  openSession and TEE for invokeCommand (libminkteec's override, kept as it is).  The
  QTEE error (its name and reason) is noted as the model-only detail of the client's
  :class:`~qtee.gp.TeecError` (:mod:`qtee.secure._gp_why`).
* ``cancel`` flags the session with the model-only ``IGPSession`` op 0x3FFF (see
  :mod:`qtee.secure._gpclient`); ``cancel_id`` travels as the cancelCode.
* ``close`` releases every session object and memory object this transport still
  holds and the ``IGPAppClient`` itself; the :class:`~qtee.client.Client` (the fd)
  belongs to the caller and stays open, unless the transport was made ``owns_client``.
"""

from __future__ import annotations

import errno
import itertools
import struct
import threading
import uuid as uuidlib
from typing import Any, Final

from objects import DriverError, QteeError, UsageError
from qtee import uapi
from qtee._qcomtee_msg import Result
from qtee.client import OUT_OBJECT, Client, MemoryObject, ObjRef, Out
from qtee.gp import _codes as teec
from qtee.gp._defs import _U32, TEEC_CONFIG_PAYLOAD_REF_COUNT, TeecResult
from qtee.secure import _gp_why
from qtee.secure._gp_params import (
    IN_VALUE_TYPES,
    MEMREF_TYPES,
    OUT_MEMREF_TYPES,
    OUT_VALUE_TYPES,
    VALUE_TYPES,
)
from qtee.secure._gpclient import (
    CGPAPPCLIENT_UID,
    EX_PARAM_TYPE_MEMREF_DUP,
    EX_PARAM_TYPE_MEMREF_FORCE_RW,
    EX_PARAM_TYPE_MEMREF_NULL,
    IC_IN,
    IGPAPPCLIENT_OP_OPEN_SESSION,
    IGPSESSION_OP_CLOSE,
    IGPSESSION_OP_INVOKE_COMMAND,
    IGPSESSION_OP_REQUEST_CANCELLATION,
    MEM_PARAMS,
    OS_IN,
    OUT_SCALARS,
    VALUE,
)

__all__ = ["QTEE_GEN_CAPS", "QteeGpTransport", "map_idl_error"]

#: What ``version()`` reports besides impl id QTEE.
QTEE_GEN_CAPS: Final = uapi.TEE_GEN_CAP_GP | uapi.TEE_GEN_CAP_MEMREF_NULL
_GROUP_LOGINS: Final = frozenset(
    {uapi.TEE_IOCTL_LOGIN_GROUP, uapi.TEE_IOCTL_LOGIN_GROUP_APPLICATION}
)
_LOGINS: Final = frozenset({0, 1, 2, 4, 5, 6})
_INFINITE: Final = 0xFFFF_FFFF


def _einval(why: str) -> DriverError:
    return DriverError(errno.EINVAL, why)


def map_idl_error(result: int, *, invoke: bool) -> tuple[int, int]:
    """An IDL-level result (the GP method did not run) -> ``(TEEC_Result, origin)``."""
    if result == Result.ERROR_DEFUNCT:
        return int(TeecResult.TEEC_ERROR_TARGET_DEAD), teec.ORIGIN_TEE
    if result == Result.ERROR_BUSY:
        return int(TeecResult.TEEC_ERROR_BUSY), teec.ORIGIN_TEE
    if result in (Result.ERROR_KMEM, Result.ERROR_NOSLOTS):
        return int(TeecResult.TEEC_ERROR_OUT_OF_MEMORY), teec.ORIGIN_TEE
    return int(TeecResult.TEEC_ERROR_GENERIC), teec.ORIGIN_TEE if invoke else teec.ORIGIN_COMMS


class _Call:
    """The IGPAppClient/IGPSession arguments for four kernel-shaped params."""

    def __init__(self) -> None:
        self.types = 0
        self.ex_types = 0
        self.ins: list[bytes] = []
        self.outs: list[Out] = []
        self.mems: list[MemoryObject | None] = []


class _Session:
    __slots__ = ("closing", "inflight", "ref")

    def __init__(self, ref: ObjRef) -> None:
        self.ref = ref
        self.inflight = 0
        self.closing = False


class QteeGpTransport:
    """:class:`~qtee.gp._transport.GpTransport` over ``IGPAppClient`` of ``client``.

    ``env`` is a client env of ``client`` (``client.client_env()``; None: one is made
    for this and released again); the service is opened once, here, and ``env`` is not
    kept.  A QTEE that offers no IGPAppClient fails here with IOpener's NOT_FOUND
    (:class:`~objects.QteeError`).  ``owns_client``: :meth:`close` closes ``client`` too
    (what :class:`~qtee.gp.TeecContext` does with the client it makes for a device).
    """

    def __init__(
        self, client: Client, env: ObjRef | None = None, *, owns_client: bool = False
    ) -> None:
        if not isinstance(client, Client):
            raise TypeError("QteeGpTransport needs a qtee Client")
        self.client = client
        self.owns_client = owns_client
        if env is None:
            with client.client_env() as made:
                self.app: ObjRef = client.open_service(made, CGPAPPCLIENT_UID)
        else:
            self.app = client.open_service(env, CGPAPPCLIENT_UID)
        self._lock = threading.Lock()
        self._shm: dict[int, MemoryObject] = {}
        self._sessions: dict[int, _Session] = {}
        self._keys = itertools.count(1)
        self._closed = False

    # ------------------------------------------------------------------ info
    def version(self) -> tuple[int, int, int]:
        """``(TEE_IMPL_ID_QTEE, 0, GP | MEMREF_NULL)``."""
        self._check_open()
        return uapi.TEE_IMPL_ID_QTEE, 0, QTEE_GEN_CAPS

    def _check_open(self) -> None:
        if self._closed:
            raise DriverError(errno.EBADF, "the transport is closed")

    # ------------------------------------------------------------------ shared memory
    def shm_alloc(self, size: int) -> tuple[int, memoryview]:
        """A memory object of ``size`` bytes: ``(its id, its bytes)``."""
        self._check_open()
        try:
            mem = self.client.memory(size)
        except UsageError as exc:  # does not fit the u64 size field
            raise DriverError(errno.ENOMEM, f"cannot allocate {size} bytes") from exc
        with self._lock:
            self._shm[mem.id] = mem
        return mem.id, mem.view

    def shm_register(self, buf: bytearray) -> int:
        """Not offered (no ``TEE_GEN_CAP_REG_MEM``): EOPNOTSUPP."""
        raise DriverError(errno.EOPNOTSUPP, "QTEE GP transport: no SHM_REGISTER")

    def shm_free(self, shm_id: int) -> None:
        """Release the memory object (QTEE's mappings live on until it unmaps them)."""
        with self._lock:
            mem = self._shm.pop(shm_id, None)
        if mem is None:
            raise _einval(f"no shm {shm_id}")
        mem.release()

    # ------------------------------------------------------------------ params
    def _marshal(self, params: list[uapi.Param]) -> _Call:
        if len(params) > TEEC_CONFIG_PAYLOAD_REF_COUNT:
            raise _einval(
                f"{len(params)} params; IGPAppClient carries {TEEC_CONFIG_PAYLOAD_REF_COUNT}"
            )
        call = _Call()
        first: dict[int, int] = {}  # shm id -> index of the first memref naming it
        for i in range(TEEC_CONFIG_PAYLOAD_REF_COUNT):
            p = params[i] if i < len(params) else uapi.Param(0)
            if p.attr & ~uapi.TEE_IOCTL_PARAM_ATTR_TYPE_MASK:
                raise _einval(f"param {i}: attr {p.attr:#x}")
            t = p.type
            data, out, mem, ex = b"", Out(0), None, 0
            if t == 0:
                pass
            elif t in VALUE_TYPES:
                if t in IN_VALUE_TYPES:
                    data = VALUE.pack(p.a & _U32, p.b & _U32)
                if t in OUT_VALUE_TYPES:
                    out = Out(VALUE.size)
            elif t in MEMREF_TYPES:
                if p.c == uapi.TEE_MEMREF_NULL:
                    data, ex = MEM_PARAMS.pack(p.b, 0, 0), EX_PARAM_TYPE_MEMREF_NULL
                else:
                    with self._lock:
                        shm = self._shm.get(p.c)
                    if shm is None:
                        raise _einval(f"param {i}: no shm {p.c} in this context")
                    if p.a + p.b > len(shm.view):
                        raise _einval(f"param {i}: [{p.a}, +{p.b}) outside shm {p.c}")
                    j = first.get(p.c)
                    if j is None:
                        first[p.c] = i
                        data, mem = MEM_PARAMS.pack(p.b, p.a, 0), shm
                    else:
                        data, ex = MEM_PARAMS.pack(p.b, p.a, j), EX_PARAM_TYPE_MEMREF_DUP
                        if t in OUT_MEMREF_TYPES:
                            call.ex_types |= EX_PARAM_TYPE_MEMREF_FORCE_RW << (4 * j)
            else:
                raise _einval(f"param {i}: type {t}")
            call.types |= t << (4 * i)
            call.ex_types |= ex << (4 * i)
            call.ins.append(data)
            call.outs.append(out)
            call.mems.append(mem)
        return call

    @staticmethod
    def _params_back(
        params: list[uapi.Param], scalars: bytes, outs: list[Any]
    ) -> tuple[int, int, list[uapi.Param]]:
        *sizes, ret, origin = OUT_SCALARS.unpack(scalars)
        back: list[uapi.Param] = []
        for i, p in enumerate(params):
            if p.type in OUT_VALUE_TYPES and len(outs[i]) == VALUE.size:
                a, b = VALUE.unpack(outs[i])
                back.append(uapi.Param(p.attr, a, b, 0))
            elif p.type in OUT_MEMREF_TYPES:
                back.append(uapi.Param(p.attr, p.a, sizes[i], p.c))
            else:
                back.append(p)
        return ret, origin, back

    # ------------------------------------------------------------------ sessions
    def open_session(
        self,
        uuid16: bytes,
        clnt_uuid16: bytes,
        login: int,
        cancel_id: int,
        params: list[uapi.Param],
    ) -> tuple[int, int, int, list[uapi.Param]]:
        """``IGPAppClient.openSession``: ``(session key or 0, ret, origin, params_back)``."""
        self._check_open()
        if len(uuid16) != 16 or len(clnt_uuid16) != 16:
            raise _einval("a UUID is 16 bytes")
        if uapi.TEE_IOCTL_LOGIN_REE_KERNEL_MIN <= login <= uapi.TEE_IOCTL_LOGIN_REE_KERNEL_MAX:
            raise DriverError(errno.EPERM, "REE kernel logins are not for userspace")
        if login not in _LOGINS:
            raise _einval(f"login method {login:#x}")
        conn_data = struct.unpack_from("<I", clnt_uuid16)[0] if login in _GROUP_LOGINS else 0
        call = self._marshal(params)
        scalars = OS_IN.pack(cancel_id & _U32, login, conn_data, call.types, call.ex_types)
        try:
            res = self.app.invoke(
                IGPAPPCLIENT_OP_OPEN_SESSION,
                scalars,
                uuidlib.UUID(bytes=bytes(uuid16)).bytes_le,
                *call.ins,
                Out(OUT_SCALARS.size),
                *call.outs,
                None,  # waitCBO
                *call.mems,
                OUT_OBJECT,
            )
        except QteeError as exc:
            ret, origin = map_idl_error(exc.result, invoke=False)
            _gp_why.note(ret, f"IGPAppClient.openSession failed: {exc}")  # model-only
            return 0, ret, origin, list(params)
        ret, origin, back = self._params_back(params, res[0], res[1:5])
        session = res[5]
        if not isinstance(session, ObjRef):
            return 0, ret, origin, back
        if ret != teec.SUCCESS:  # not expected from this QTEE, but libminkteec drops it too
            session.release()
            return 0, ret, origin, back
        with self._lock:
            key = next(self._keys)
            self._sessions[key] = _Session(session)
        return key, ret, origin, back

    def _hold(self, session: int) -> _Session:
        self._check_open()
        with self._lock:
            entry = self._sessions.get(session)
            if entry is None or entry.closing:
                raise _einval(f"session {session} is not open on this transport")
            entry.inflight += 1
            return entry

    def _unhold(self, entry: _Session) -> None:
        with self._lock:
            entry.inflight -= 1
            last = entry.closing and entry.inflight == 0
        if last:
            entry.ref.release()

    def invoke(
        self, session: int, func: int, cancel_id: int, params: list[uapi.Param]
    ) -> tuple[int, int, list[uapi.Param]]:
        """``IGPSession.invokeCommand``: ``(ret, origin, params_back)``."""
        call = self._marshal(params)
        entry = self._hold(session)
        try:
            scalars = IC_IN.pack(
                func & _U32, cancel_id & _U32, _INFINITE, call.types, call.ex_types
            )
            try:
                res = entry.ref.invoke(
                    IGPSESSION_OP_INVOKE_COMMAND,
                    scalars,
                    *call.ins,
                    Out(OUT_SCALARS.size),
                    *call.outs,
                    *call.mems,
                )
            except QteeError as exc:
                ret, origin = map_idl_error(exc.result, invoke=True)
                _gp_why.note(ret, f"IGPSession.invokeCommand failed: {exc}")  # model-only
                return ret, origin, list(params)
            return self._params_back(params, res[0], res[1:5])
        finally:
            self._unhold(entry)

    def cancel(self, session: int, cancel_id: int) -> None:
        """Flag the session as cancelled (model-only IGPSession op 0x3FFF)."""
        entry = self._hold(session)
        try:
            entry.ref.invoke(
                IGPSESSION_OP_REQUEST_CANCELLATION, struct.pack("<I", cancel_id & _U32)
            )
        except QteeError:
            pass  # closed meanwhile: nothing to cancel
        finally:
            self._unhold(entry)

    def close_session(self, session: int) -> None:
        """``IGPSession.close``, then the object is released (after calls in flight)."""
        self._check_open()
        with self._lock:
            entry = self._sessions.pop(session, None)
            if entry is None:
                raise _einval(f"session {session} is not open on this transport")
            entry.closing = True
            entry.inflight += 1
        try:
            entry.ref.invoke(IGPSESSION_OP_CLOSE)
        except QteeError:
            pass  # already closed
        finally:
            self._unhold(entry)

    # ------------------------------------------------------------------ close
    def close(self) -> None:
        """Release the sessions, memory objects and the app client still held."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sessions, self._sessions = list(self._sessions.values()), {}
            shms, self._shm = list(self._shm.values()), {}
            last = []
            for entry in sessions:
                entry.closing = True
                if entry.inflight == 0:
                    last.append(entry)
        for entry in last:
            entry.ref.release()  # the last reference closes the GP session
        try:
            for mem in shms:
                mem.release()
            self.app.release()
        finally:
            if self.owns_client:
                self.client.close()

    def __repr__(self) -> str:
        return f"<QteeGpTransport sessions={len(self._sessions)} closed={self._closed}>"
