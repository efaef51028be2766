"""The client's handles: what :meth:`ObjRef.invoke` takes and gives back.

An :class:`ObjRef` is one id in the fd's object table (release() drops it, as libqcomtee's
``tee_object_id`` is dropped with op 0xFFFF); the root is :data:`~qtee.uapi.TEE_OBJREF_NULL`;
a :class:`MemoryObject` is one reference on an SHM_ALLOC buffer; :class:`Out` and
:data:`OUT_OBJECT` mark outputs; :class:`Transfer` hands a callback's output object over with
its reference.  :mod:`qtee.client` re-exports them all.
"""

from __future__ import annotations

import errno
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from objects import DriverError, PyObject, UsageError
from qtee import uapi

if TYPE_CHECKING:
    from qtee.client import Client

__all__ = ["OUT_OBJECT", "CallbackObject", "MemoryObject", "ObjRef", "Out", "Transfer"]


@dataclass(frozen=True, slots=True)
class Out:
    """An output buffer of ``size`` bytes."""

    size: int

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 0:
            raise UsageError(f"Out size must be an int >= 0, not {self.size!r}")


class _OutObject:
    __slots__ = ()

    def __repr__(self) -> str:
        return "OUT_OBJECT"


#: Marks an output-object argument.
OUT_OBJECT: Final = _OutObject()


class CallbackObject(PyObject):
    """An object hosted by this client that QTEE can call back (ops via :func:`op`)."""


class ObjRef:
    """A handle on a QTEE object held by this client's context; release() drops it.

    Its repr says what it refers to (:attr:`label`), e.g. ``<ObjRef 3: service 0x3
    AppLoader>`` or ``<ObjRef 5: TA 'adder' (Adder)>``; a released one says so.
    """

    __slots__ = ("_about", "_how", "client", "id", "kept", "released")

    def __init__(self, client: Client, ident: int) -> None:
        self.client = client
        self.id = ident
        self.released = False
        self.kept = False
        # The label once known, else the ObjRef this one came out of (and _how: op, index).
        self._about: str | ObjRef | None = None
        self._how = 0
        track = client._track
        if track is not None and ident != uapi.TEE_OBJREF_NULL:
            track.made(self, sys._getframe(1))

    def keep(self) -> ObjRef:
        """In a callback: keep an input object past the call (otherwise it is released)."""
        self.kept = True
        track = self.client._track
        if track is not None:  # the handler that kept it is where it comes from
            track.made(self, sys._getframe(1))
        return self

    def invoke(self, op: int, *args: Any) -> list[Any]:
        """Invoke ``op``; see the module docstring for arguments and results."""
        if self.released:
            raise UsageError(f"object {self.id} was released")
        outs = self.client._invoke(self.id, op, args)
        if outs:
            for i, out in enumerate(outs):
                if type(out) is ObjRef and out._about is None:
                    out._about = self  # how it was obtained, for a label nobody knows
                    out._how = op << 8 | i
        return outs

    def release(self) -> None:
        """Drop this handle (op 0xFFFF, handled by the driver).  On an fd that is closed
        or a connection that is lost (EBADF) there is nothing left to drop: the fd's close
        released every object it held, this one with them."""
        if not self.released:
            self.released = True
            track = self.client._track
            if track is not None:
                track.gone(self)
            try:
                self.client._invoke(self.id, 0xFFFF, ())
            except DriverError as exc:
                if exc.errno != errno.EBADF:
                    raise

    @property
    def label(self) -> str:
        """What this handle refers to, as the model knows it (model-only: the secure
        world's label of the object, see :meth:`qtee.secure.SecureWorld.label`; over a
        device server, the server's).  When no label is known: how the handle was obtained
        (``out 0 of op 0 on <ObjRef 2: ClientEnv>``)."""
        about = self._about
        if type(about) is str:
            return about
        if self.id == uapi.TEE_OBJREF_NULL:
            return "root"
        if not self.released:
            text = self.client._label(self.id)
            if text:
                self._about = text
                return text
        if isinstance(about, ObjRef):
            return f"out {self._how & 0xFF} of op {self._how >> 8} on {about!r}"
        return "no label"

    def _named(self, label: str) -> None:
        """The label, as the client learnt it (before a close took the object away)."""
        if label:
            self._about = label

    def __enter__(self) -> ObjRef:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        if self.id == uapi.TEE_OBJREF_NULL:
            return "<ObjRef root>"
        if self.released:
            state = " released"
        elif getattr(self.client.ctx, "closed", False):
            state = " (its fd is closed)"
        else:
            state = ""
        return f"<ObjRef {self.id}{state}: {self.label}>"


class _Root(ObjRef):
    """The client's handle on QTEE's root object.

    libqcomtee gives the root ``tee_object_id`` = ``TEE_OBJREF_NULL``, which the kernel
    turns into QTEE's root (QK §2.2, §2.5).  It lives as long as the client: it has no
    id in the fd's table, so there is nothing to release, and it cannot be passed as an
    argument (``TEE_OBJREF_NULL`` as an input is the NULL object).
    """

    __slots__ = ()

    def release(self) -> None:
        """Refused: the root has no id to release; closing the client ends it."""
        raise UsageError(
            "the root object is not released: it has no id in the fd's table (the kernel "
            "ignores a RELEASE of TEE_OBJREF_NULL); close the Client to end it"
        )

    def __repr__(self) -> str:
        return "<ObjRef root>"


class MemoryObject:
    """Shared memory from SHM_ALLOC with a writable :attr:`view`.

    Each handle is one reference of this client on the shm, released once with
    :meth:`release`; the fd's copy goes with the last handle.  A memory object that comes
    back from QTEE (an output object, or an input of a callback) is a new handle on the
    same memory, as libqcomtee takes a reference when it finds it in its namespace
    (quic-teec.md §1.7).
    """

    __slots__ = ("client", "id", "kept", "size", "view")

    def __init__(self, client: Client, shm_id: int) -> None:
        self.client = client
        self.view = client._mem_hold(shm_id)
        self.id = shm_id
        self.kept = False
        #: The size asked for (the view's length).
        self.size = len(self.view)
        track = client._track
        if track is not None:
            track.made(self, sys._getframe(1))

    def keep(self) -> MemoryObject:
        """In a callback: keep an input memory object past the call (otherwise it is
        released when the handler returns)."""
        self.kept = True
        return self

    def __repr__(self) -> str:
        if self.id < 0:
            return f"<MemoryObject released: {self.size} bytes>"
        return f"<MemoryObject {self.id}: {self.size} bytes>"

    def release(self) -> None:
        """Drop this handle.  The last handle closes the owner's copy (QTEE's copies live
        on until QTEE releases them).  As for :meth:`ObjRef.release`, nothing is left to
        close once the fd is gone."""
        if self.id >= 0:
            track = self.client._track
            if track is not None:
                track.gone(self)
            shm_id, self.id = self.id, -1
            self.client._mem_drop(shm_id)

    def __enter__(self) -> MemoryObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass(frozen=True, slots=True)
class Transfer:
    """A callback's output object whose reference goes with it.

    A :class:`CallbackObject` method that returns an :class:`ObjRef` or a
    :class:`MemoryObject` it has no further use for returns ``Transfer(obj)``: the worker
    sends it, then releases it, exactly once, after SUPPL_SEND returns -- whether the send
    succeeded (QTEE holds its own reference by then: QK §2.3) or failed (then nobody else
    holds it).  This is what libqcomtee leaves to the object's ``error()`` notification,
    which runs after the response is submitted (quic-teec.md §2.3).  A plain return keeps
    the handler's reference: it releases the object itself, later.
    """

    obj: ObjRef | MemoryObject

    def __post_init__(self) -> None:
        if isinstance(self.obj, CallbackObject):
            raise UsageError(
                "a CallbackObject is returned as it is, not in a Transfer: QTEE's reference "
                "is its only one, and its release comes back as a release notification"
            )
        if isinstance(self.obj, _Root):
            raise UsageError("the root object cannot be transferred")
        if not isinstance(self.obj, ObjRef | MemoryObject):
            raise UsageError(
                f"Transfer takes an ObjRef or a MemoryObject, not a {type(self.obj).__name__}"
            )

    def release(self) -> None:
        """Release the transferred object (once; a second call does nothing)."""
        self.obj.release()
