"""A memory object that comes back from QTEE is a ``MemoryObject``, not a bare shm id.

qtee-kernel.md §2.3: a memory object coming back to userspace (OO, or IO of a callback)
is reported as (shm id, flags 4), and only for the fd that owns the shm.  quic-teec.md
§1.7: libqcomtee finds it by shm id in its namespace and takes a reference the receiver
releases; if the owner has released its copy, the lookup fails and the call's result is
UNAVAIL, with the output objects made so far released (§1.3).  issue 15 ("Secure
objects"): the same lifetime rules as a memory object the client made.
"""

from __future__ import annotations

import threading

import pytest

from objects import QteeError, UsageError, op
from qtee import (
    OUT_OBJECT,
    CallbackObject,
    Client,
    Device,
    MemoryObject,
    NsObject,
    Out,
    Result,
    SecureObject,
    TrustedApp,
)
from qtee.pytest_plugin import AppLoaderHelper
from tests._helpers import wait_until

TA = "memout.echo"


class Echo(TrustedApp):
    """Gives memory objects back."""

    def __init__(self) -> None:
        self.kept: NsObject | None = None

    @op(0, io=1, oo=1)
    def echo(self, mem: NsObject) -> NsObject:
        """The memory object it was given, as an output object."""
        return mem

    @op(1, io=1)
    def keep(self, mem: NsObject) -> None:
        self.kept = mem.retain()

    @op(2, oo=2)
    def give_back(self) -> tuple[SecureObject, NsObject]:
        """Itself (a new QTEE object for the client) and the memory object it kept."""
        assert self.kept is not None
        kept, self.kept = self.kept, None
        kept.release()  # the kernel takes its own reference on the output
        return self, kept

    @op(3, io=2, ob=(4,))
    def hand_to(self, cb: NsObject, mem: NsObject) -> bytes:
        """Pass the memory object to the client's callback object."""
        return cb.invoke(0, io=[mem]).result.to_bytes(4, "little", signed=True)


class Reader(CallbackObject):
    """Receives a memory object in a callback; keeps it if asked."""

    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.got: list[MemoryObject] = []
        self.seen: list[bytes] = []
        self.ids: list[int] = []
        self.lock = threading.Lock()

    @op(0, io=1)
    def read(self, mem: MemoryObject) -> None:
        with self.lock:
            self.got.append(mem.keep() if self.keep else mem)
            self.seen.append(bytes(mem.view[:4]))
            self.ids.append(mem.id)


@pytest.mark.qtee_ta(TA, Echo)
@pytest.mark.qtee_modes("in-process", "server", "guest")
def test_a_returned_memory_object_is_a_memory_object(
    qtee_client: Client, qtee_app: AppLoaderHelper
) -> None:
    """QK §2.3 / quic-teec.md §1.7: (shm id, MEM) back is a new handle on the same
    memory; each handle is released once, and the shm goes with the last one."""
    app = qtee_app(TA)
    mem = qtee_client.memory(32)
    mem.view[:4] = b"abcd"
    (back,) = app.invoke(0, mem, OUT_OBJECT)
    assert isinstance(back, MemoryObject) and back is not mem
    assert back.id == mem.id and back.client is qtee_client
    back.view[4:8] = b"efgh"  # the same pages
    assert bytes(mem.view[:8]) == b"abcdefgh"
    mem.release()  # the owner's handle: the returned one still holds the shm
    assert bytes(back.view[:8]) == b"abcdefgh"
    (again,) = app.invoke(0, back, OUT_OBJECT)  # still passable: the fd owns it
    again.release()
    back.release()
    back.release()  # once
    assert not qtee_client._shms


@pytest.mark.qtee_ta(TA, Echo)
def test_the_last_handle_frees_the_shm(
    qtee_device: Device, qtee_client: Client, qtee_app: AppLoaderHelper
) -> None:
    """The fd's copy (SHM free) goes only with the client's last handle on it."""
    app = qtee_app(TA)
    before = qtee_device.leaks()
    mem = qtee_client.memory(16)
    (back,) = app.invoke(0, mem, OUT_OBJECT)
    back.release()
    assert mem.id in qtee_client.ctx.shms  # the owner's handle holds it
    mem.release()
    assert mem.id == -1 and not qtee_client.ctx.shms
    assert wait_until(lambda: qtee_device.leaks() == before)


@pytest.mark.qtee_ta(TA, Echo)
def test_memory_the_client_released_comes_back_unavailable(
    qtee_device: Device, qtee_client: Client, qtee_app: AppLoaderHelper
) -> None:
    """quic-teec.md §1.7: the owner released its copy, so libqcomtee cannot find it: the
    call's result is UNAVAIL and every output object already made is released (§1.3)."""
    app = qtee_app(TA)
    before = qtee_device.leaks()
    mem = qtee_client.memory(16)
    app.invoke(1, mem)  # QTEE keeps it
    mem.release()
    with pytest.raises(QteeError) as info:
        app.invoke(2, OUT_OBJECT, OUT_OBJECT)
    assert info.value.result == Result.ERROR_UNAVAIL
    assert "memory object" in str(info.value) and "released" in str(info.value)
    assert wait_until(lambda: qtee_device.leaks() == before)  # the app's new id went too


@pytest.mark.qtee_ta(TA, Echo)
@pytest.mark.parametrize("keep", [False, True])
def test_a_callback_gets_a_memory_object_handle(
    qtee_client: Client, qtee_app: AppLoaderHelper, keep: bool
) -> None:
    """QK §4.3: a memory object as a callback's input is (shm id, MEM); the handler gets
    a MemoryObject, released when it returns unless it keeps it (as for an ObjRef)."""
    app = qtee_app(TA)
    reader = Reader(keep)
    with qtee_client.memory(16) as mem:
        mem.view[:4] = b"wxyz"
        assert app.invoke(3, reader, mem, Out(4)) == [bytes(4)]
        (got,) = reader.got
        assert reader.seen == [b"wxyz"] and reader.ids == [mem.id] and got is not mem
        assert (got.id == -1) is not keep
        if keep:
            got.release()
    assert not qtee_client._shms


def test_a_released_memory_object_is_no_argument(qtee_client: Client) -> None:
    """A released handle would travel as TEE_OBJREF_NULL (id -1): refused, with why."""
    mem = qtee_client.memory(8)
    mem.release()
    with pytest.raises(UsageError, match="memory object was released"):
        qtee_client.root.invoke(2, mem, OUT_OBJECT)
