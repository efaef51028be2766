"""Who reads the socket (issue 18, "Performance": client-side leader/follower, the server
answering on the reading thread).

On the client a caller reads its own reply unless another thread already reads, and no
thread reads for nobody: a connection has no reader thread of its own, one is kept only
while a query or a ``watch`` needs it.  On the server the thread that read an ioctl runs
it and answers it, keeping the lead; the reading goes to a waiting thread only when the
call waits on a callback or runs long, so another call on the same fd still gets in.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time

import pytest

import qtee
from qtee import OUT_OBJECT, CallbackObject, DeviceServer, NsObject, QteeError, TrustedApp, op, uapi
from tests._helpers import eventually

#: The server threads that ran ``Recorder.where``, in order.
THREADS: list[int] = []


class Recorder(TrustedApp):
    """op 0: notes the thread running it; op 1: runs 1 s; op 2: calls ``cb`` op 0."""

    @op(0)
    def where(self) -> None:
        THREADS.append(threading.get_ident())

    @op(1)
    def slow(self) -> None:
        time.sleep(1.0)

    @op(2, io=1)
    def through(self, cb: NsObject) -> None:
        res = cb.invoke(0)
        if res.result:
            raise QteeError(res.result)


class Nop(CallbackObject):
    @op(0)
    def nop(self) -> None:
        return None


RECORDER = pytest.mark.qtee_ta("lead.recorder", Recorder)


def _readers() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "qtee-remote")


def test_plain_calls_start_no_reader_thread(qtee_server: DeviceServer) -> None:
    """The caller reads its own reply: opening a connection and calling on it starts no
    thread here; a query keeps a reader only until its answer is in.  (Before, each
    connection had a reader thread from its open to its close.)"""
    before = _readers()
    ctx = qtee.connect(qtee_server.path).open()
    try:
        version = bytearray(12)
        assert ctx.ioctl(uapi.TEE_IOC_VERSION, version) == 0
        assert uapi.VersionData.unpack(version).impl_id == uapi.TEE_IMPL_ID_QTEE
        assert _readers() == before
        assert ctx.held_objects()["objects"] == []
        assert eventually(lambda: _readers() == before)
        assert ctx.ioctl(uapi.TEE_IOC_VERSION, version) == 0
        assert not ctx.lost
    finally:
        ctx.close()
    assert _readers() == before


@RECORDER
def test_the_server_answers_on_the_thread_that_read_the_call(qtee_server: DeviceServer) -> None:
    """A quick invoke runs on the server thread that read it, which goes on reading: one
    thread serves a run of calls (before, the reader woke a follower to read before
    running each call, so the calls alternated between two threads).  A slow machine may
    take the lead away now and then (a call past LEND), not at every call."""
    THREADS.clear()
    with qtee.Client(qtee.connect(qtee_server.path), workers=1) as client:
        env = client.client_env()
        with env, client.open_service(env, 3) as loader:
            (ctrl,) = loader.invoke(0, qtee.ta_image("lead.recorder"), OUT_OBJECT)
            with ctrl, ctrl.invoke(2, OUT_OBJECT)[0] as app:
                for _ in range(40):
                    app.invoke(0)
    changes = sum(1 for a, b in itertools.pairwise(THREADS) if a != b)
    assert len(THREADS) == 40
    assert changes <= 5, changes  # (before: 10 to 24 of the 39)


@RECORDER
def test_a_long_call_does_not_hold_up_the_fd(qtee_server: DeviceServer) -> None:
    """While one thread's invoke runs 1 s in the TA, another thread's calls on the same fd
    (a quick invoke, one with a callback) are read and answered at once: the server hands
    the reading on from a leader whose call runs long or waits on a callback."""
    with qtee.Client(qtee.connect(qtee_server.path), workers=1) as client:
        env = client.client_env()
        with env, client.open_service(env, 3) as loader:
            (ctrl,) = loader.invoke(0, qtee.ta_image("lead.recorder"), OUT_OBJECT)
            with ctrl, ctrl.invoke(2, OUT_OBJECT)[0] as app:
                slow = threading.Thread(target=app.invoke, args=(1,))
                t0 = time.monotonic()
                slow.start()
                time.sleep(0.1)
                app.invoke(0)
                app.invoke(2, Nop())
                quick = time.monotonic() - t0
                slow.join(5)
                assert not slow.is_alive()
                assert quick < 0.8, quick


def test_closing_a_watched_connection_ends_its_reader_at_once(qtee_server: DeviceServer) -> None:
    """The reader kept for ``ready`` frames (a ``watch``, as a worker pool's) ends when
    the stream does: the close returns at once and leaves no reader thread behind.  (The
    kept reader once took the end of the stream for its own answer and waited for that
    answer for ever, so the close sat out its 5 s join.)"""
    before = _readers()
    ctx = qtee.connect(qtee_server.path).open()
    ctx.on_ready = lambda: None  # a watch: a reader is kept for the ready frames
    assert eventually(lambda: _readers() > before)
    t0 = time.monotonic()
    ctx.close()
    assert time.monotonic() - t0 < 2.0
    assert eventually(lambda: _readers() == before, 2.0)


def test_a_parked_recv_tries_again_on_the_regions_it_came_with() -> None:
    """The receiver's next try of a parked SUPPL_RECV reuses the regions of its first try
    (``Connection._resume``) only as they came: mapped again in the thread, filed for
    probes, with the bytes a new mapping would have; one its try wrote to gets new ones."""
    from types import SimpleNamespace

    from qtee._remote.frames import Ioctl, Region
    from qtee._remote.region_memory import CallRegions, RegionMemory
    from qtee._remote.server_conn import Connection

    mem = RegionMemory()
    a, b = socket.socketpair()
    try:
        conn = Connection(SimpleNamespace(max_frame=1 << 16, memory=mem), a, "c")  # type: ignore[arg-type]
        regions = (
            Region(addr=0x1000, data=bytes(range(16)), writable=True),
            Region(addr=0x3000, data=b"\x05" * 8, writable=True),
        )
        req = Ioctl(seq=7, cmd=uapi.TEE_IOC_SUPPL_RECV, arg=b"", regions=regions)
        first = conn._begin(req)
        assert mem.read(0x1004, 4) == bytes(range(4, 8))  # a would-wait try only reads
        mem.end()
        del conn._calls[7]
        again = conn._resume(req, first)
        fresh = CallRegions(regions)
        assert again is first and mem.current() is first and conn._calls[7] is first
        assert again.bufs == fresh.bufs and not again.written and not again.callbacks
        mem.write(0x3000, b"\x09")  # a try that wrote: the next one starts afresh
        mem.end()
        renewed = conn._resume(req, again)
        assert renewed is not again and mem.current() is renewed and conn._calls[7] is renewed
        assert renewed.bufs == fresh.bufs and not renewed.written
        mem.end()
    finally:
        a.close()
        b.close()
