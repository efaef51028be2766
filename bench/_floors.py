"""Floor prototypes: the least work each benchmarked path must do, built from qtee's primitives.

Each floor does what no faithful implementation can skip, and nothing else: the real bytes
(the QTEE wire message through ``qtee.wire``'s encoders and decoders, the ioctl argument
blocks packed and unpacked with ``qtee.uapi``'s structs, device-server frames in their real
encoding), the real number of threads or processes, and the cheapest handoff between them
(a bare ``threading.Lock`` released by one thread and acquired by the other).  No checks,
no tables, no records.  A benchmark reports the floor's ratio beside qtee's, against the
same baseline in the same run: the distance between the two is what qtee could still save.

* :func:`null_invoke`: a null OBJECT_INVOKE, client block -> driver -> QTEE -> back.
* :class:`CallbackFloor`: an invoke whose TA calls back into a client object once, served
  by a second thread doing SUPPL_RECV / SUPPL_SEND (all four argument structs), which then
  gets the RELEASE notification of that object.
* :class:`SocketFloor`: the same two calls over a Unix socket to a child process
  (``python bench/_floors.py --serve FD``): a lean codec for the device server's frames,
  the server answering on its reading thread, the caller reading its own reply.
  ``SocketFloor(driver=True)`` (``--serve-driver FD``) is the *driver floor* of both: the
  same lean frames, but the server runs each ioctl through qtee's own driver and secure
  world, so what lies between it and qtee's figure is the device server's and the remote
  client's own work (frame checks, records, region mapping, leader/follower reading), not
  the model's.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

if __name__ == "__main__":  # bench/supplicant.py would shadow the package: bench/ goes last
    _HERE = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != _HERE] + [_HERE]

import qtee
from qtee import uapi, wire
from qtee._remote.frames import PROTOCOL_VERSION, encode_call, encode_reply

#: ``struct tee_ioctl_object_invoke_arg``'s head (id, op, ret, num_params).
_HEAD = uapi.ObjectInvokeArg._S
_BUF = uapi.BUF_DATA_STRUCT
_PARAM = uapi.PARAM_STRUCT
_SUPP = uapi.SUPP_ARG_STRUCT
_LEN = struct.Struct(">I")

#: A worker's SUPPL_RECV block: one meta param and ten for the request (libqcomtee's).
RECV_PARAMS = 11
SCRATCH = 4096
_RECV = uapi.params_struct(RECV_PARAMS)
_META_IN = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_INOUT | uapi.TEE_IOCTL_PARAM_ATTR_META
_META_OUT = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_OUTPUT | uapi.TEE_IOCTL_PARAM_ATTR_META
_OBJ_IN = uapi.TEE_IOCTL_PARAM_ATTR_TYPE_OBJREF_INPUT
_EMPTY = (0,) * (4 * (RECV_PARAMS - 1))

#: Made-up user addresses of the blocks (the floors never dereference them).
_BLOCK_ADDR = 0x7F00_0000_1000
_RECV_ADDR = 0x7F00_0000_2000
_SEND_ADDR = 0x7F00_0000_3000
_SCRATCH_ADDR = 0x7F00_0001_0000
_TA_ID = 5  # QTEE's id of the TA object
_CB_ID = 1  # the client's id of its callback object
_NS_ID = wire.QCOMTEE_MSG_OBJECT_NS_BIT | 0x10  # the driver's wire id of that object
_RELEASE = wire.QCOMTEE_MSG_OBJECT_OP_RELEASE
#: QTEE's async RELEASE of the callback object, in the final return's outbound page.
_ASYNC_RELEASE = wire.encode_async_release((_NS_ID,))


_PAGE = bytearray(wire.MAX_OUTBOUND_BUFFER_SIZE)  # an outbound page no callback wrote to


def _qtee_null(oid: int, op: int) -> None:
    """Driver -> QTEE -> driver for a call with no arguments (and the driver's read of the
    async region QTEE may have written at the head of the outbound page)."""
    msg_buf = wire.encode_invoke(oid, op)
    msg = wire.decode_invoke(msg_buf)
    wire.write_invoke_response(msg_buf, msg, (), ())
    wire.decode_invoke_response(msg_buf)
    wire.decode_async(_PAGE, 0)


def null_invoke() -> Callable[[], None]:
    """One null OBJECT_INVOKE: the client packs its block, the driver reads it and builds
    QTEE's message, QTEE decodes it and writes the (empty) response, the driver reads it and
    writes ``ret`` back, the client reads ``ret``."""
    block = bytearray(_HEAD.size)
    arg = bytearray(_BUF.size)

    def one() -> None:
        _HEAD.pack_into(block, 0, _TA_ID, 0, 0, 0)
        _BUF.pack_into(arg, 0, _BLOCK_ADDR, _HEAD.size)
        _BUF.unpack_from(arg)
        oid, op, _ret, n = _HEAD.unpack_from(block)
        _qtee_null(oid, op)
        _HEAD.pack_into(block, 0, oid, op, 0, n)
        _HEAD.unpack_from(block)

    return one


def null_invoke_with_table(live: int) -> Callable[[], None]:
    """:func:`null_invoke` plus the lookups a table of ``live`` objects costs (a list indexed
    by id, as the driver's and QTEE's tables are): its floor ratio shows that the lookup's
    cost does not grow with the table."""
    table: list[object | None] = [object() for _ in range(live)]
    last = live - 1
    base = null_invoke()

    def one() -> None:
        if table[last] is None:  # the driver's lookup of the target
            raise LookupError(last)
        base()
        if table[last] is None:  # QTEE's
            raise LookupError(last)

    return one


class CallbackFloor:
    """Invoke + one callback: the caller's thread is the client, the driver and QTEE (as in
    qtee, the callback is served on the invoking thread); a worker thread posts SUPPL_RECV,
    gets the request, answers with SUPPL_SEND and posts its next RECV, which gets the RELEASE
    notification of the callback object (QTEE releases it in the invoke's final return, as
    the real TA's dropped reference does); it posts another.  The threads hand off through
    bare locks.  Use as a context manager; :meth:`one` is one round trip."""

    def __init__(self) -> None:
        self._queued = threading.Lock()  # released: a request is there for the worker
        self._answered = threading.Lock()  # released: the worker's SEND has landed
        self._notified = threading.Lock()  # released: the worker has read the RELEASE
        self._queued.acquire()
        self._answered.acquire()
        self._stop = False
        self._request: wire.CallbackMsg | None = None
        self._result = 0
        self._block = bytearray(_HEAD.size + _PARAM.size)
        self._arg = bytearray(_BUF.size)
        self._out = bytearray(wire.MAX_OUTBOUND_BUFFER_SIZE)
        self._thread = threading.Thread(target=self._worker, name="floor-worker", daemon=True)

    def __enter__(self) -> CallbackFloor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._notified.acquire()  # the worker has read the last RELEASE
        self._stop = True
        self._queued.release()
        self._thread.join(10)

    def _worker(self) -> None:
        recv = bytearray(_SUPP.size + _PARAM.size * RECV_PARAMS)
        send = bytearray(_SUPP.size + _PARAM.size)
        while True:
            # userspace posts SUPPL_RECV; the driver reads the block and waits for a request
            _SUPP.pack_into(recv, 0, 0, RECV_PARAMS)
            _RECV.pack_into(recv, _SUPP.size, _META_IN, _SCRATCH_ADDR, SCRATCH, 0, *_EMPTY)
            _SUPP.unpack_from(recv)
            _RECV.unpack_from(recv, _SUPP.size)
            self._queued.acquire()
            if self._stop:
                return
            msg = self._request
            # the driver writes the request (object, request id, op) into the block
            _SUPP.pack_into(recv, 0, _RELEASE if msg is None else msg.op, 1)
            _PARAM.pack_into(recv, _SUPP.size, _META_IN, _CB_ID, 0, 0)
            # userspace reads it; a RELEASE is never answered: it posts its next RECV
            func, _n = _SUPP.unpack_from(recv)
            _attr, _uid, req, _c = _PARAM.unpack_from(recv, _SUPP.size)
            if func == _RELEASE:
                self._notified.release()
                continue
            # it runs the (empty) op and answers with SUPPL_SEND
            _SUPP.pack_into(send, 0, 0, 1)
            _PARAM.pack_into(send, _SUPP.size, _META_OUT, req, 0, 0)
            # the driver reads the answer and wakes the caller
            ret, _n = _SUPP.unpack_from(send)
            _PARAM.unpack_from(send, _SUPP.size)
            self._result = ret
            self._answered.release()

    def one(self) -> None:
        """Client block -> driver -> QTEE, whose TA calls the client object once -> back."""
        block, out = self._block, self._out
        # the client: OBJECT_INVOKE on the TA, op 1, one input object (its callback object)
        _HEAD.pack_into(block, 0, _TA_ID, 1, 0, 1)
        _PARAM.pack_into(block, _HEAD.size, _OBJ_IN, _CB_ID, uapi.QCOMTEE_OBJREF_FLAG_USER, 0)
        _BUF.pack_into(self._arg, 0, _BLOCK_ADDR, len(block))
        # the driver: read the block, build QTEE's message
        _BUF.unpack_from(self._arg)
        oid, op, _ret, _n = _HEAD.unpack_from(block)
        _PARAM.unpack_from(block, _HEAD.size)
        inbound = wire.encode_invoke(oid, op, (), (), (_NS_ID,))
        # QTEE: decode it; the TA calls the object: a callback request in the outbound page
        msg = wire.decode_invoke(inbound)
        sent = wire.encode_callback_msg(out, msg.io[0], 0)
        # the driver (same thread): read the request, queue it for the worker (once it has
        # read the last round trip's RELEASE: a queue of one), wait
        self._notified.acquire()
        self._request = wire.decode_callback(out)
        wire.decode_async(out, self._request.size)  # the release tail after the request
        self._queued.release()
        self._answered.acquire()
        # the driver writes the worker's answer; QTEE reads it, the TA returns
        wire.write_callback_response(out, self._request, self._result)
        wire.decode_callback_response(out, sent)
        wire.write_invoke_response(inbound, msg, (), ())
        # the final return: QTEE releases the callback object in the outbound page's async
        # region; the driver reads it and queues the RELEASE notification for the worker
        wire.write_async(out, 0, (_ASYNC_RELEASE,))
        wire.decode_async(out)
        self._request = None
        self._queued.release()
        # the driver reads the response and writes ret back; the client reads it
        wire.decode_invoke_response(inbound)
        _HEAD.pack_into(block, 0, oid, op, 0, 1)
        _HEAD.unpack_from(block)


# --------------------------------------------------------------------------- over a socket


def _read(sock: socket.socket, pending: bytearray) -> dict[str, Any] | None:
    """The next frame's map (``pending`` keeps what arrived past it); None at end of stream."""
    while True:
        if len(pending) >= 4:
            end = 4 + _LEN.unpack_from(pending)[0]
            if len(pending) >= end:
                body = msgpack.unpackb(memoryview(pending)[4:end], raw=False)
                del pending[:end]
                if type(body) is not dict or body.get("v") != PROTOCOL_VERSION:
                    raise ValueError("not a frame")
                return body
        data = sock.recv(1 << 16)
        if not data:
            return None
        pending += data


def _block_of(frame: dict[str, Any]) -> bytes:
    """The argument block: the first region (where ``arg``'s buf_ptr points)."""
    region = frame["regions"][0]
    if _BUF.unpack(frame["arg"])[0] != region["addr"]:
        raise ValueError("arg does not point at the first region")
    data: bytes = region["data"]
    return data


class _Served:
    """The floor's server side of one connection: answers on its reading thread; an invoke
    that calls back runs on a second thread, which waits for the client's SEND."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.send_lock = threading.Lock()
        self.call_ready = threading.Lock()  # released: an invoke to run
        self.recv_posted = threading.Lock()  # released: the client posted a SUPPL_RECV
        self.send_landed = threading.Lock()  # released: the client's SUPPL_SEND arrived
        for lock in (self.call_ready, self.recv_posted, self.send_landed):
            lock.acquire()
        self.call: dict[str, Any] | None = None
        self.recv: dict[str, Any] | None = None
        self.result = 0

    def _send(self, frame: bytes) -> None:
        with self.send_lock:
            self.sock.sendall(frame)

    def serve(self) -> None:
        caller = threading.Thread(target=self._calls, daemon=True)
        caller.start()
        pending = bytearray()
        while (frame := _read(self.sock, pending)) is not None:
            cmd = frame["cmd"]
            if cmd == uapi.TEE_IOC_SUPPL_RECV:
                _block_of(frame)
                self.recv = frame
                self.recv_posted.release()
            elif cmd == uapi.TEE_IOC_SUPPL_SEND:
                block = _block_of(frame)
                ret, _n = _SUPP.unpack_from(block)
                _PARAM.unpack_from(block, _SUPP.size)
                self.result = ret
                self._send(encode_reply(frame["seq"], 0, frame["arg"]))
                self.send_landed.release()
            else:
                block = _block_of(frame)
                oid, op, _ret, n = _HEAD.unpack_from(block)
                if n:  # it calls back: its own thread, while this one reads on
                    self.call = frame
                    self.call_ready.release()
                    continue
                _qtee_null(oid, op)
                out = _HEAD.pack(oid, op, 0, n)
                self._send(encode_reply(frame["seq"], 0, frame["arg"], [(_BLOCK_ADDR, out)]))
        self.call = None
        self.call_ready.release()
        self.recv = None  # (the last RELEASE may wait for a RECV that never comes)
        if self.recv_posted.locked():
            self.recv_posted.release()
        caller.join(10)

    def _calls(self) -> None:
        out = bytearray(wire.MAX_OUTBOUND_BUFFER_SIZE)
        while True:
            self.call_ready.acquire()
            frame = self.call
            if frame is None:
                return
            block = _block_of(frame)
            oid, op, _ret, n = _HEAD.unpack_from(block)
            _PARAM.unpack_from(block, _HEAD.size)
            inbound = wire.encode_invoke(oid, op, (), (), (_NS_ID,))
            msg = wire.decode_invoke(inbound)
            sent = wire.encode_callback_msg(out, msg.io[0], 0)
            request = wire.decode_callback(out)
            wire.decode_async(out, request.size)
            self._answer_recv(request.op)  # the client's posted SUPPL_RECV gets the request
            self.send_landed.acquire()
            wire.write_callback_response(out, request, self.result)
            wire.decode_callback_response(out, sent)
            wire.write_invoke_response(inbound, msg, (), ())
            # the final return releases the callback object (async, in the outbound page):
            # the RELEASE notification is queued for the worker's next RECV
            wire.write_async(out, 0, (_ASYNC_RELEASE,))
            wire.decode_async(out)
            wire.decode_invoke_response(inbound)
            reply = _HEAD.pack(oid, op, 0, n)
            self._send(encode_reply(frame["seq"], 0, frame["arg"], [(_BLOCK_ADDR, reply)]))
            self._answer_recv(_RELEASE)

    def _answer_recv(self, func: int) -> None:
        """Answer the worker's posted SUPPL_RECV with a request for its callback object."""
        self.recv_posted.acquire()
        recv = self.recv
        if recv is None:  # the connection closed
            return
        written = bytearray(_SUPP.size + _PARAM.size)
        _SUPP.pack_into(written, 0, func, 1)
        _PARAM.pack_into(written, _SUPP.size, _META_IN, _CB_ID, 0, 0)
        self._send(encode_reply(recv["seq"], 0, recv["arg"], [(_RECV_ADDR, bytes(written))]))


def serve(fd: int) -> None:
    """The floor server's child process: serve one connection until it closes."""
    with socket.socket(fileno=fd) as sock:
        _Served(sock).serve()


class _DriverServed:
    """The driver floor's server side: each frame's blocks are copied into mapped memory and
    the ioctl runs on qtee's own driver (one in-process fd, the same for the caller's and the
    worker's ioctls, as a QTEE fd is).  A null invoke and a SUPPL_SEND run on the reading
    thread; an invoke that calls back runs on a call thread (it waits for the SEND), a posted
    SUPPL_RECV on a receiving thread (it waits for a request); each sends its own reply."""

    def __init__(self, sock: socket.socket, ctx: Any, bufs: dict[str, bytearray]) -> None:
        self.sock, self.ctx, self.bufs = sock, ctx, bufs
        self.send_lock = threading.Lock()
        self.call_ready = threading.Lock()  # released: an invoke that calls back to run
        self.recv_posted = threading.Lock()  # released: a SUPPL_RECV to run
        self.call_ready.acquire()
        self.recv_posted.acquire()
        self.call: dict[str, Any] | None = None
        self.recv: dict[str, Any] | None = None

    def _run(self, frame: dict[str, Any], name: str) -> None:
        """Copy the frame's block into ``name``'s mapping, run the ioctl, send the reply with
        the block as the driver left it."""
        region = frame["regions"][0]
        buf, data = self.bufs[name], region["data"]
        buf[: len(data)] = data
        arg = bytearray(frame["arg"])
        self.ctx.ioctl(frame["cmd"], arg)
        written = [(region["addr"], bytes(buf[: len(data)]))]
        reply = encode_reply(frame["seq"], 0, bytes(arg), written)
        with self.send_lock:
            self.sock.sendall(reply)

    def _loop(self, ready: threading.Lock, attr: str, name: str) -> None:
        while True:
            ready.acquire()
            frame = getattr(self, attr)
            if frame is None:
                return
            try:
                self._run(frame, name)
            except (qtee.DriverError, OSError):  # the fd or the connection closed under it
                return

    def serve(self) -> None:
        threads = [
            threading.Thread(target=self._loop, args=args, daemon=True)
            for args in ((self.call_ready, "call", "block"), (self.recv_posted, "recv", "recv"))
        ]
        for t in threads:
            t.start()
        pending = bytearray()
        while (frame := _read(self.sock, pending)) is not None:
            cmd = frame["cmd"]
            if cmd == uapi.TEE_IOC_SUPPL_RECV:
                self.recv = frame
                self.recv_posted.release()
            elif cmd == uapi.TEE_IOC_SUPPL_SEND:
                self._run(frame, "send")
            elif _HEAD.unpack_from(frame["regions"][0]["data"])[3]:  # it calls back
                self.call = frame
                self.call_ready.release()
            else:
                self._run(frame, "block")
        self.call = self.recv = None
        for lock in (self.call_ready, self.recv_posted):
            if lock.locked():
                lock.release()
        self.ctx.close()  # a RECV still waiting fails: its thread ends
        for t in threads:
            t.join(10)


class _Nop(qtee.CallbackObject):
    @qtee.op(0)
    def nop(self) -> None:
        return None


def serve_driver(fd: int) -> None:
    """The driver floor's child process: each frame runs through qtee's own driver and secure
    world (an in-process ``Device``; the blocks copied into mapped memory, the ioctl on the
    fd, the blocks copied back), with the lean codec and no checks, records or tables of the
    server's own.  It first sends ``{"ta": id, "block": a, "recv": a, "send": a, "scratch":
    a}``: the TA object's id in its fd and the addresses of the blocks' mappings."""
    from _ipc_tas import NAME  # the TA of bench/ipc.py (registered on import)

    device = qtee.Device(qtee.SecureWorld(qtee.QteeRoot()))
    with qtee.Client(device, workers=1) as client, socket.socket(fileno=fd) as sock:
        env = client.client_env()  # (its worker serves the credentials object's reads)
        loader = client.open_service(env, 3)
        (ctrl,) = loader.invoke(0, qtee.ta_image(NAME), qtee.OUT_OBJECT)
        (app,) = ctrl.invoke(2, qtee.OUT_OBJECT)
        # The client's worker answers one more callback and ends, its last SEND done: from
        # now on only this floor's thread posts SUPPL_RECVs on the fd.  (The RELEASE of that
        # callback object is the first thing the floor's worker gets: it posts its next RECV.)
        assert client.pool is not None
        client.pool._stopping = True
        app.invoke(1, _Nop())
        bufs = {
            "block": bytearray(_HEAD.size + _PARAM.size),
            "recv": bytearray(_SUPP.size + _PARAM.size * RECV_PARAMS),
            "send": bytearray(_SUPP.size + _PARAM.size),
            "scratch": bytearray(SCRATCH),
        }
        addrs = {name: device.memory.pin(buf) for name, buf in bufs.items()}
        body = msgpack.packb({"v": PROTOCOL_VERSION, "ta": app.id, **addrs})
        sock.sendall(_LEN.pack(len(body)) + body)
        try:
            _DriverServed(sock, client.ctx, bufs).serve()
        finally:
            for addr in addrs.values():
                device.memory.unpin(addr)
            for ref in (app, ctrl, loader, env):
                with contextlib.suppress(qtee.DriverError):
                    ref.release()


class SocketFloor:
    """The client end of the socket floor, and its server child.  :meth:`null` is a null
    invoke (one frame pair); :meth:`callback` an invoke + one callback (the invoke, the
    worker's pending RECV answered with the request, its SEND, its next RECV answered with
    the RELEASE notification of the callback object, one more RECV posted: four pairs and a
    frame, as qtee's).  The caller reads the socket while its call is open and hands the
    worker its replies through a bare lock."""

    def __init__(self, driver: bool = False) -> None:
        self.sock, there = socket.socketpair()
        serve = "--serve-driver" if driver else "--serve"
        self.child = subprocess.Popen(
            [sys.executable, __file__, serve, str(there.fileno())], pass_fds=[there.fileno()]
        )
        there.close()
        self._pending = bytearray()
        self._driver = driver
        self._ta_id = _TA_ID
        self._addr = {
            "block": _BLOCK_ADDR,
            "recv": _RECV_ADDR,
            "send": _SEND_ADDR,
            "scratch": _SCRATCH_ADDR,
        }
        if driver:  # the driver floor's child names its TA object and its blocks' addresses
            hello = _read(self.sock, self._pending)
            if hello is None:
                raise EOFError("the driver floor's server did not start")
            self._ta_id = hello["ta"]
            self._addr = {name: hello[name] for name in self._addr}
        self._send_lock = threading.Lock()
        self._seq = 0
        self._worker_seq = -1
        self._for_worker = threading.Lock()
        self._for_worker.acquire()
        self._worker_reply: dict[str, Any] | None = None
        self._block = bytearray(_HEAD.size + _PARAM.size)
        self._worker: threading.Thread | None = None

    def __enter__(self) -> SocketFloor:
        self.null()  # the child has started and answers
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.shutdown(socket.SHUT_WR)
        self.child.wait(10)
        self.sock.close()
        if self._worker is not None:
            self._worker_reply = None
            self._for_worker.release()
            self._worker.join(10)

    def _next(self) -> int:
        with self._send_lock:
            self._seq += 1
            return self._seq

    def _call(
        self, cmd: int, block: bytes, addr: int, extra: tuple[Any, ...] = (), worker: bool = False
    ) -> int:
        seq = self._next()
        if worker:  # before it is sent: the caller may read its reply at once
            self._worker_seq = seq
        regions = [(addr, block, True), *extra]
        frame = encode_call(seq, cmd, _BUF.pack(addr, len(block)), regions)
        with self._send_lock:
            self.sock.sendall(frame)
        return seq

    def _wait(self, seq: int) -> dict[str, Any]:
        """Read replies until this call's; hand the worker its own."""
        while True:
            reply = _read(self.sock, self._pending)
            if reply is None:
                raise EOFError("the floor server went away")
            if reply["seq"] == seq:
                return reply
            if reply["seq"] != self._worker_seq:
                raise ValueError(f"reply {reply['seq']} for no call")
            self._worker_reply = reply
            self._for_worker.release()

    def _invoke(self, op: int, params: int) -> None:
        block = self._block
        _HEAD.pack_into(block, 0, self._ta_id, op, 0, params)
        if params:
            _PARAM.pack_into(block, _HEAD.size, _OBJ_IN, _CB_ID, uapi.QCOMTEE_OBJREF_FLAG_USER, 0)
        data = bytes(block[: _HEAD.size + _PARAM.size * params])
        reply = self._wait(self._call(uapi.TEE_IOC_OBJECT_INVOKE, data, self._addr["block"]))
        if reply["errno"]:
            raise OSError(reply["errno"], "floor invoke")
        (region,) = reply["written"]
        block[: len(region["data"])] = region["data"]
        if _HEAD.unpack_from(block)[2]:
            raise RuntimeError("floor invoke failed")

    def null(self) -> None:
        self._invoke(0, 0)

    def callback(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._serve_callbacks, daemon=True)
            self._worker.start()
        self._invoke(1, 1)

    def _post_recv(self, recv: bytearray) -> None:
        _SUPP.pack_into(recv, 0, 0, RECV_PARAMS)
        addr = self._addr
        _RECV.pack_into(recv, _SUPP.size, _META_IN, addr["scratch"], SCRATCH, 0, *_EMPTY)
        scratch = (addr["scratch"], bytes(SCRATCH), True)
        self._call(uapi.TEE_IOC_SUPPL_RECV, bytes(recv), addr["recv"], (scratch,), worker=True)

    def _serve_callbacks(self) -> None:
        with contextlib.suppress(OSError):  # the connection closed under a RECV being posted
            self._callbacks()

    def _callbacks(self) -> None:
        recv = bytearray(_SUPP.size + _PARAM.size * RECV_PARAMS)
        send = bytearray(_SUPP.size + _PARAM.size)
        self._post_recv(recv)
        while True:
            self._for_worker.acquire()
            reply = self._worker_reply
            if reply is None:
                return
            region = reply["written"][0]["data"]
            recv[: len(region)] = region
            func, _n = _SUPP.unpack_from(recv)
            _attr, _uid, req, _c = _PARAM.unpack_from(recv, _SUPP.size)
            if func != _RELEASE:  # a request, answered with SUPPL_SEND (a RELEASE never is)
                _SUPP.pack_into(send, 0, 0, 1)
                _PARAM.pack_into(send, _SUPP.size, _META_OUT, req, 0, 0)
                self._call(uapi.TEE_IOC_SUPPL_SEND, bytes(send), self._addr["send"], worker=True)
                self._for_worker.acquire()
                if self._worker_reply is None or self._worker_reply["errno"]:
                    return
            self._post_recv(recv)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(int(sys.argv[2]))
    elif sys.argv[1:2] == ["--serve-driver"]:
        serve_driver(int(sys.argv[2]))
    else:
        raise SystemExit(f"usage: {Path(__file__).name} --serve|--serve-driver FD")
