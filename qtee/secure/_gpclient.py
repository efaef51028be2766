"""QTEE's GP entry point: the ``IGPAppClient`` service and its ``IGPSession`` objects.

A normal-world GP client (libminkteec) reaches GP TAs through one service, class UID
``CGPAppClient_UID`` = 0x199, opened with ``IClientEnv.open``.  Here it runs on the
secure world's :class:`~qtee.secure._gp.GpRuntime` (created on first use as
``world.gp``, the same runtime the OP-TEE-flavoured device uses), so a TA registered
with :func:`~qtee.secure._gp.register_gp_ta` behaves the same through either front end.
:func:`install_gp_app_client` adds the service to a world's root (opt-in).

Wire layout (qualcomm/minkipc: the idlc-generated ``IGPAppClient.h``, and
``libminkteec/src/gp_teec.h`` / ``mink_params.h``, which restate the slot layout, the
packed scalar blocks and ``IGPSession_MemoryObjectParameters`` of ``IGPSession.idl``).
All integers are little-endian.

``IGPAppClient.openSession`` -- op 0, counts (6, 5, 5, 1), 17 slots:

====  =====  ==============================================================
slot  kind   content
====  =====  ==============================================================
0     BI     20 B: u32 cancelCode, connectionMethod, connectionData,
             paramTypes, exParamTypes (idlc bundles the scalars first)
1     BI     uuid: a ``TEEC_UUID`` struct as laid out in memory (u32 timeLow,
             u16 timeMid, u16 timeHiAndVersion little-endian, then 8 bytes) --
             Python's ``uuid.UUID.bytes_le``; another length ->
             ``IGPAppClient_ERROR_INVALID_UUID_LEN`` (10)
2-5   BI     i1..i4, one per GP param (below)
6     BO     24 B: u32 memrefOutSz1..4, retValue, retOrigin
7-10  BO     o1..o4, one per GP param (below)
11    OI     waitCBO (may be NULL)
12-15 OI     imem1..imem4: the memory object behind memref k, or NULL
16    OO     the new ``IGPSession``
====  =====  ==============================================================

``IGPAppClient.openSessionV2`` (op 1) is the same with a sixth input scalar,
``cancellationRequestTimeout``, after ``cancelCode`` (24 B).

``IGPSession.invokeCommand`` -- op 1, counts (5, 5, 4, 0): BI 20 B ``u32 commandID,
cancelCode, cancellationRequestTimeout, paramTypes, exParamTypes``; i1..i4; BO the same
24-byte block; o1..o4; imem1..imem4.  ``IGPSession.close`` is op 0 with no arguments.
``IGPSession`` errors: 10 ``CLOSED`` (any call after close).  ``IGPAppClient`` errors:
10 INVALID_UUID_LEN, 11 APP_NOT_FOUND, 12 APP_BLOCKED_ON_LISTENER, 13 APP_UNLOADED,
14 APP_RESTART_FAILED, 15 APP_AUTOLOAD_INVALID_BUFFER, 16 ACCESS_DENIED.

``paramTypes`` holds one ``TEE_PARAM_TYPE_*`` per nibble (libminkteec converts TEEC
memref types to TEE 5/6/7 before sending).  ``exParamTypes`` has one nibble per param:
0 NONE, 1 MEMREF_NULL, 2 MEMREF_DUP, 3 MEMREF_FORCE_RW.  Per param k:

* value (1/2/3): ik = 8 B ``{u32 a, u32 b}`` for INPUT/INOUT (empty otherwise); ok has
  room for 8 B for OUTPUT/INOUT and gets ``{a, b}`` back.
* memref backed by a memory object: imemk is the object, ik = 24 B
  ``{u64 size, u64 offset, u64 sharedObjIndex}``, ok empty.  The TA sees
  ``[offset, offset+size)`` of the mapped object.
* memref without a memory object ("temp"): ik carries the bytes (its length is the
  memref size, whatever the direction); ok has the same room and gets the bytes back.
* memrefOutSzk: the size the TA left in memref k (OUTPUT/INOUT), which is the
  required size after ``TEE_ERROR_SHORT_BUFFER``.

The GP result travels in retValue/retOrigin: whenever the method itself ran, it returns
``Object_OK`` and the output buffers (values, memref sizes, ret, origin) are written,
whatever the GP result -- an IDL-level error means no outputs at all.

Model choices, where the sources say nothing or a Python model cannot follow them:

* A NULL memref (exParamTypes nibble 1) carries its size in the same 24-byte
  descriptor with a NULL imemk (libminkteec sends a NULL pointer with a length, which a
  copy-in transport cannot carry).
* MEMREF_DUP: the memory object travels only in the slot of the first param that uses
  it; a later param on the same object has exParamTypes nibble 2, a NULL imemk and
  ``sharedObjIndex`` = the index of that first param (libminkteec passes the object in
  both slots and leaves the index at 0 on the wire).  FORCE_RW is accepted and ignored.
* A failed open returns a NULL session object (real QTEE hands one back when the TA
  refused, which libminkteec then releases).
* An unknown TA is GP ``TEEC_ERROR_ITEM_NOT_FOUND`` (origin TEE), as from OP-TEE,
  rather than the IDL error APP_NOT_FOUND, so a GP client sees a GP result.
* The client identity is the nil UUID for every login (QTEE derives it from the
  client's credentials; the GP runtime only records it).
* ``cancellationRequestTimeout`` (openSessionV2, invokeCommand) is honoured as a TA's
  ``TEE_OpenTASession``/``TEE_InvokeTACommand`` timeout is in OP-TEE: once it expires the
  session reads as cancelled while the TA has cancellation unmasked; openSession (V1)
  carries none (``TEE_TIMEOUT_INFINITE``).
* waitCBO is accepted and not used.  Real cancellation wakes a ``TEE_Wait`` that QTEE
  forwards to waitCBO's ``IWait.wait``; the Python TAs wait inside the GP runtime, so a
  model-only op, ``IGPSession`` op :data:`IGPSESSION_OP_REQUEST_CANCELLATION`
  (0x3FFF, BI 4 B cancelCode), flags the session instead (the GP runtime's cancel).
"""

from __future__ import annotations

import struct
import threading
import uuid as uuidlib
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, Final

from objects import QteeError, op
from qtee import _idl
from qtee._idl import idl_op
from qtee.gp import _codes as teec
from qtee.secure import _gp_why
from qtee.secure._gp import TEE_TIMEOUT_INFINITE, GpParam, GpRuntime
from qtee.secure._gp_params import (
    IN_VALUE_TYPES,
    MEMREF_TYPES,
    OUT_MEMREF_TYPES,
    OUT_VALUE_TYPES,
    TEE_NUM_PARAMS,
    VALUE_TYPES,
)
from qtee.secure._world import Mapping, NsObject, SecureObject, SecureWorld

__all__ = [
    "CGPAPPCLIENT_UID",
    "EX_PARAM_TYPE_MEMREF_DUP",
    "EX_PARAM_TYPE_MEMREF_FORCE_RW",
    "EX_PARAM_TYPE_MEMREF_NULL",
    "EX_PARAM_TYPE_NONE",
    "IGPAPPCLIENT_ERROR_ACCESS_DENIED",
    "IGPAPPCLIENT_ERROR_APP_NOT_FOUND",
    "IGPAPPCLIENT_ERROR_INVALID_UUID_LEN",
    "IGPAPPCLIENT_OP_OPEN_SESSION",
    "IGPAPPCLIENT_OP_OPEN_SESSION_V2",
    "IGPSESSION_ERROR_CLOSED",
    "IGPSESSION_OP_CLOSE",
    "IGPSESSION_OP_INVOKE_COMMAND",
    "IGPSESSION_OP_REQUEST_CANCELLATION",
    "IC_IN",
    "IGPAppClient",
    "IGPSession",
    "MEM_PARAMS",
    "OS_IN",
    "OS_IN_V2",
    "OUT_SCALARS",
    "VALUE",
    "GPAppClient",
    "GPSessionObject",
    "gp_runtime",
    "install_gp_app_client",
]

CGPAPPCLIENT_UID: Final = _idl.const("CGPAppClient", "CGPAppClient_UID")

IGPAPPCLIENT_OP_OPEN_SESSION: Final = _idl.op_number("IGPAppClient", "openSession")
IGPAPPCLIENT_OP_OPEN_SESSION_V2: Final = _idl.op_number("IGPAppClient", "openSessionV2")

#: IGPAppClient's and IGPSession's errors, from their shipped ``.idl`` (qualcomm/minkipc).
IGPAppClient = _idl.errors("IGPAppClient", __name__)
IGPSession = _idl.errors("IGPSession", __name__)

IGPAPPCLIENT_ERROR_INVALID_UUID_LEN: Final = IGPAppClient.ERROR_INVALID_UUID_LEN
IGPAPPCLIENT_ERROR_APP_NOT_FOUND: Final = IGPAppClient.ERROR_APP_NOT_FOUND
IGPAPPCLIENT_ERROR_ACCESS_DENIED: Final = IGPAppClient.ERROR_ACCESS_DENIED

IGPSESSION_OP_CLOSE: Final = _idl.op_number("IGPSession", "close")
IGPSESSION_OP_INVOKE_COMMAND: Final = _idl.op_number("IGPSession", "invokeCommand")
#: Model-only (not in IGPSession.idl): flag the session as cancelled.
IGPSESSION_OP_REQUEST_CANCELLATION: Final = 0x3FFF
IGPSESSION_ERROR_CLOSED: Final = IGPSession.ERROR_CLOSED

EX_PARAM_TYPE_NONE: Final = 0
EX_PARAM_TYPE_MEMREF_NULL: Final = 1
EX_PARAM_TYPE_MEMREF_DUP: Final = 2
EX_PARAM_TYPE_MEMREF_FORCE_RW: Final = 3

#: openSession's input scalars: cancelCode, connectionMethod, connectionData,
#: paramTypes, exParamTypes.
OS_IN: Final = struct.Struct("<5I")
#: openSessionV2's: cancelCode, cancellationRequestTimeout, connectionMethod,
#: connectionData, paramTypes, exParamTypes.
OS_IN_V2: Final = struct.Struct("<6I")
#: invokeCommand's: commandID, cancelCode, cancellationRequestTimeout, paramTypes,
#: exParamTypes.
IC_IN: Final = struct.Struct("<5I")
#: Both methods' output scalars: memrefOutSz1..4, retValue, retOrigin.
OUT_SCALARS: Final = struct.Struct("<6I")
#: ``IGPSession_MemoryObjectParameters``: size, offset, sharedObjIndex.
MEM_PARAMS: Final = struct.Struct("<3Q")
#: ``TEEC_Value``: a, b.
VALUE: Final = struct.Struct("<2I")

_NIL: Final = bytes(16)


def gp_runtime(world: SecureWorld) -> GpRuntime:
    """The world's GP runtime (``world.gp``), created and attached on first use."""
    runtime: GpRuntime = getattr(world, "gp", None) or GpRuntime(world)
    world.gp = runtime  # type: ignore[attr-defined]
    return runtime


def install_gp_app_client(world: SecureWorld) -> None:
    """Offer ``CGPAppClient_UID`` (0x199) through the client env of ``world``'s root."""
    services = getattr(world.root, "services", None)
    if not isinstance(services, dict):
        raise TypeError("the world's root has no service table")
    gp_runtime(world)
    services[CGPAPPCLIENT_UID] = lambda env: GPAppClient(world)


# ----------------------------------------------------------------------------- params


class _Marshalled:
    """One call's four params as the TA sees them, and the mappings to undo after."""

    def __init__(self) -> None:
        self.params: list[GpParam] = []
        self.types = 0
        self.error = teec.SUCCESS
        self.why = ""  # model-only: why ``error``
        self.temp: list[bytearray | None] = [None] * TEE_NUM_PARAMS
        self.stack = ExitStack()


def _nibble(word: int, i: int) -> int:
    return (word >> (4 * i)) & 0xF


def _bad(m: _Marshalled, why: str) -> None:
    """The call's params do not fit: BAD_PARAMETERS (the first reason is kept)."""
    if not m.error:
        m.error, m.why = teec.BAD_PARAMETERS, why


def _unmarshal(
    world: SecureWorld,
    types: int,
    ex_types: int,
    ins: Sequence[bytes],
    mems: Sequence[object],
) -> _Marshalled:
    """ik / imemk -> the GpParams of the call (``error`` set if they do not fit)."""
    m = _Marshalled()
    m.types = types
    try:
        _fill(world, m, ex_types, ins, mems)
    except BaseException:
        m.stack.close()  # a mapping failed: undo the ones already made
        raise
    return m


def _fill(
    world: SecureWorld,
    m: _Marshalled,
    ex_types: int,
    ins: Sequence[bytes],
    mems: Sequence[object],
) -> None:
    types = m.types
    mapped: dict[int, Mapping] = {}
    for i in range(TEE_NUM_PARAMS):
        t, ex, data, mem = _nibble(types, i), _nibble(ex_types, i), ins[i], mems[i]
        p = GpParam(t)
        if t == 0:
            pass
        elif t in VALUE_TYPES:
            if t in IN_VALUE_TYPES:
                if len(data) != VALUE.size:
                    _bad(m, f"param {i}: a value of {len(data)} bytes, not {VALUE.size}")
                else:
                    p.a, p.b = VALUE.unpack(data)
        elif t in MEMREF_TYPES:
            if isinstance(mem, NsObject) or ex in (
                EX_PARAM_TYPE_MEMREF_NULL,
                EX_PARAM_TYPE_MEMREF_DUP,
            ):
                if len(data) != MEM_PARAMS.size:
                    _bad(m, f"param {i}: a memref descriptor of {len(data)} bytes")
                    m.params.append(p)
                    continue
                size, offset, shared = MEM_PARAMS.unpack(data)
                p.size = size
                if isinstance(mem, NsObject):
                    region = m.stack.enter_context(_mapped(world, mem))
                    mapped[i] = region
                elif ex == EX_PARAM_TYPE_MEMREF_DUP:
                    found = mapped.get(shared) if shared < i else None
                    if found is None:
                        _bad(m, f"param {i}: MEMREF_DUP of param {shared}, no memory object")
                        m.params.append(p)
                        continue
                    region = found
                else:  # MEMREF_NULL: no buffer, any size (the size query)
                    m.params.append(p)
                    continue
                if offset + size > len(region.view):
                    _bad(m, f"param {i}: [{offset}, +{size}) outside {len(region.view)} bytes")
                else:
                    p.buffer = region.view[offset : offset + size]
            else:  # a temp memref: the bytes themselves
                buf = bytearray(data)
                m.temp[i] = buf
                p.buffer = memoryview(buf)
                p.size = len(buf)
        else:
            _bad(m, f"param {i}: {t} is no TEE param type")
        m.params.append(p)


@contextmanager
def _mapped(world: SecureWorld, mem: NsObject) -> Iterator[Mapping]:
    """Map a memory object for one call; unmapped (the mapping released) after it."""
    region = world.map_region(mem)
    try:
        yield region
    finally:
        region.unmap()


def _marshal_out(m: _Marshalled, ret: int, origin: int) -> tuple[bytes, ...]:
    """The GpParams after the call -> the 24-byte block and o1..o4."""
    sizes = [0] * TEE_NUM_PARAMS
    outs: list[bytes] = []
    for i in range(TEE_NUM_PARAMS):
        p = m.params[i] if i < len(m.params) else GpParam()
        t = _nibble(m.types, i)
        if t in OUT_VALUE_TYPES:
            outs.append(VALUE.pack(p.a & 0xFFFF_FFFF, p.b & 0xFFFF_FFFF))
        elif t in OUT_MEMREF_TYPES:
            sizes[i] = p.size & 0xFFFF_FFFF
            temp = m.temp[i]
            outs.append(b"" if temp is None else bytes(temp[: min(p.size, len(temp))]))
        else:
            outs.append(b"")
    return (OUT_SCALARS.pack(*sizes, ret & 0xFFFF_FFFF, origin), *outs)


def _uuid_from_wire(raw: bytes) -> bytes:
    if len(raw) != 16:
        raise QteeError(IGPAPPCLIENT_ERROR_INVALID_UUID_LEN, f"a {len(raw)}-byte TA UUID")
    return uuidlib.UUID(bytes_le=bytes(raw)).bytes


# ----------------------------------------------------------------------------- objects


class GPAppClient(SecureObject):
    """``IGPAppClient`` (one per ``IClientEnv.open``): opens GP sessions.

    The sessions it opens belong to it in the GP runtime (the runtime's ``owner``), and
    each is reachable only through the ``IGPSession`` object it returned, which the
    kernel keeps in the opening context's object table.
    """

    ERRORS = IGPAppClient

    def __init__(self, world: SecureWorld) -> None:
        self.world = world
        self.runtime = gp_runtime(world)

    # Dispatch passes each op the scalars, the TA's UUID, then ``params``: the four GP
    # params' input buffers, the wait object (unused) and the four params' memory objects.
    @idl_op("IGPAppClient", "openSession")
    def open_session(self, scalars: bytes, ta_uuid: bytes, *params: Any) -> tuple[object, ...]:
        cancel, method, data, types, ex_types = OS_IN.unpack(scalars)
        timeout = TEE_TIMEOUT_INFINITE
        return self._open(ta_uuid, cancel, timeout, method, data, types, ex_types, params)

    @idl_op("IGPAppClient", "openSessionV2")
    def open_session_v2(self, scalars: bytes, ta_uuid: bytes, *params: Any) -> tuple[object, ...]:
        cancel, timeout, method, data, types, ex_types = OS_IN_V2.unpack(scalars)
        return self._open(ta_uuid, cancel, timeout, method, data, types, ex_types, params)

    def _open(
        self,
        ta_uuid: bytes,
        cancel: int,
        timeout: int,
        method: int,
        data: int,
        types: int,
        ex_types: int,
        params: Sequence[Any],
    ) -> tuple[object, ...]:
        ins, mems = params[:TEE_NUM_PARAMS], params[TEE_NUM_PARAMS + 1 :]
        raw = _uuid_from_wire(ta_uuid)
        m = _unmarshal(self.world, types, ex_types, ins, mems)
        with m.stack:
            if m.error:
                sid, ret, origin = 0, m.error, teec.ORIGIN_TEE
                _gp_why.note(ret, f"openSession: {m.why}")
            else:
                sid, ret, origin = self.runtime.open_session(
                    raw,
                    method,
                    _NIL,
                    types,
                    m.params,
                    cancel_id=cancel,
                    owner=self,
                    timeout=timeout,
                )
            outs = _marshal_out(m, ret, origin)
        session = GPSessionObject(self, sid) if sid else None
        return (*outs, session)


class GPSessionObject(SecureObject):
    """``IGPSession``: one open GP session; releasing the last reference closes it."""

    ERRORS = IGPSession

    def __init__(self, client: GPAppClient, session_id: int) -> None:
        self.client = client
        self.session_id = session_id
        self._lock = threading.Lock()
        self._closed = False

    def _check(self) -> None:
        with self._lock:
            if self._closed:
                raise QteeError(IGPSESSION_ERROR_CLOSED, "the GP session is closed")

    @idl_op("IGPSession", "close")
    def close(self) -> None:
        with self._lock:
            if self._closed:
                raise QteeError(IGPSESSION_ERROR_CLOSED, "the GP session is closed")
            self._closed = True
        self.client.runtime.close_session(self.session_id, owner=self.client)

    @idl_op("IGPSession", "invokeCommand")
    def invoke_command(
        self,
        scalars: bytes,
        i1: bytes,
        i2: bytes,
        i3: bytes,
        i4: bytes,
        m1: object,
        m2: object,
        m3: object,
        m4: object,
    ) -> tuple[bytes, ...]:
        self._check()
        cmd, cancel, timeout, types, ex_types = IC_IN.unpack(scalars)
        m = _unmarshal(self.client.world, types, ex_types, (i1, i2, i3, i4), (m1, m2, m3, m4))
        with m.stack:
            if m.error:
                ret, origin = m.error, teec.ORIGIN_TEE
                _gp_why.note(ret, f"invokeCommand {cmd}: {m.why}")
            else:
                ret, origin = self.client.runtime.invoke(
                    self.session_id,
                    cmd,
                    types,
                    m.params,
                    cancel_id=cancel,
                    owner=self.client,
                    timeout=timeout,
                )
            return _marshal_out(m, ret, origin)

    @op(IGPSESSION_OP_REQUEST_CANCELLATION, ib=(4,))
    def request_cancellation(self, code: bytes) -> None:
        self._check()
        (cancel,) = struct.unpack("<I", code)
        self.client.runtime.cancel(self.session_id, cancel, owner=self.client)

    def on_release(self) -> None:
        with self._lock:
            closed, self._closed = self._closed, True
        if not closed:
            self.client.runtime.close_session(self.session_id, owner=self.client)

    def __repr__(self) -> str:
        return f"<IGPSession {self.session_id}{' closed' if self._closed else ''}>"
