"""``qtee demo``: an end-to-end scenario through the public API, one line per crossing.

Register with credentials, FeatureVersions, Diagnostics, load a sample TA from a buffer
and from a memory object, add two numbers, let the TA call back into client objects with
a buffer and with an object, let it write a memory object, release everything, and
prove every table is empty.
"""

from __future__ import annotations

import os
import struct
import tempfile
import time

import qtee
from qtee import OUT_OBJECT, CallbackObject, Context, Out, op


class SampleTA(qtee.TrustedApp):
    """ISMCIExample-like: add, plus calls back into what the client passes."""

    @op(0, ib=(8,), ob=(4,))
    def add(self, pair: bytes) -> bytes:
        a, b = struct.unpack("<II", pair)
        return struct.pack("<I", a + b)

    @op(1, io=1, ob=(None,))
    def greet_back(self, cb: qtee.NsObject) -> bytes:
        res = cb.invoke(0, [b"TA"], [32])
        if res.result:
            raise qtee.QteeError(res.result)
        return res.ob[0]

    @op(2, io=1, ob=(4,))
    def object_back(self, cb: qtee.NsObject) -> bytes:
        res = cb.invoke(1, io=[self], n_oo=1)
        if res.result:
            raise qtee.QteeError(res.result)
        return struct.pack("<I", int(res.oo[0] is self))

    @op(3, io=1)
    def fill(self, mem: qtee.NsObject) -> None:
        m = self.world.map_region(mem)
        m.view[:11] = b"from the TA"
        m.unmap()


class Greeter(CallbackObject):
    @op(0, ib=(None,), ob=(None,))
    def greet(self, name: bytes) -> bytes:
        return b"hello " + name

    @op(1, io=1, oo=1)
    def echo(self, obj: object) -> object:
        return obj


def _scenario(client: qtee.Client, checks: list[tuple[str, bool]], where: str = "") -> None:
    """Services, a TA from a buffer and from a donated region, callbacks, shared memory."""
    env = client.client_env()
    with client.open_service(env, 2033) as fv:
        (v,) = fv.invoke(0, struct.pack("<I", 10), Out(4))
        (word,) = struct.unpack("<I", v)
        version = f"{word >> 22 & 0xFF}.{word >> 12 & 0xFF}.{word & 0xFFF}"
        print(f"-- {where}QTEE version {version}")
    with client.open_service(env, 143) as diag:
        (heap,) = diag.invoke(0, Out(24))
        print(f"-- {where}heap info {struct.unpack('<6I', heap)}")
    loader = client.open_service(env, 3)
    (ctrl,) = loader.invoke(0, qtee.ta_image("sample.add"), OUT_OBJECT)
    (app,) = ctrl.invoke(2, OUT_OBJECT)
    (total,) = app.invoke(0, struct.pack("<II", 1, 2), Out(4))
    checks.append((f"{where}add(1, 2) == 3", struct.unpack("<I", total)[0] == 3))
    (reply,) = app.invoke(1, Greeter(), Out(32))
    checks.append((f"{where}callback with a buffer", reply == b"hello TA"))
    (same,) = app.invoke(2, Greeter(), Out(4))
    checks.append((f"{where}callback with an object", same == b"\x01\x00\x00\x00"))
    with client.memory(64) as mem:
        app.invoke(3, mem)
        checks.append((f"{where}memory written by the TA", bytes(mem.view[:11]) == b"from the TA"))
    ctrl.invoke(1)  # unload, then load again from a donated memory object
    for ref in (app, ctrl):
        ref.release()
    image = qtee.ta_image("sample.add")
    mem = client.memory(len(image))
    mem.view[:] = image
    (ctrl,) = loader.invoke(1, mem, OUT_OBJECT)
    mem.release()  # donate
    (app,) = ctrl.invoke(2, OUT_OBJECT)
    (total,) = app.invoke(0, struct.pack("<II", 40, 2), Out(4))
    checks.append(
        (f"{where}TA from a region: add(40, 2) == 42", struct.unpack("<I", total)[0] == 42)
    )
    ctrl.invoke(1)
    for ref in (app, ctrl, loader, env):
        ref.release()


def _over_a_server(checks: list[tuple[str, bool]]) -> None:
    """The same client code against a device server on a Unix socket (``qtee.connect``)."""
    print("-- the same scenario against a device server (qtee serve / qtee.connect):")
    with (
        tempfile.TemporaryDirectory(prefix="qtee-demo-") as tmp,
        qtee.DeviceServer(os.path.join(tmp, "qtee.sock")) as server,
    ):
        server.device.trace = lambda line: print(f"   server | {line}")
        with qtee.Client(qtee.connect(server.path), workers=2) as client:
            _scenario(client, checks, "server: ")
        end = time.monotonic() + 5
        while server.connections and time.monotonic() < end:
            time.sleep(0.01)  # the server closes the fd when it sees the close frame
        leaks = server.device.leaks()
    checks.append(("server: every table empty", leaks == {}))


def run(device: qtee.Device | None = None, *, server: bool = True) -> int:
    """Run the scenario (on a fresh in-process device unless one is given, with nothing
    loaded or open on it), then, with ``server``, the same against a device server; 0
    when every check held."""
    qtee.register_ta("sample.add", SampleTA)
    if device is None:
        device = qtee.Device(qtee.SecureWorld(qtee.QteeRoot()))
    device.trace = print
    checks: list[tuple[str, bool]] = []
    with qtee.Client(device, workers=4) as client:
        _scenario(client, checks)
    ctx = client.ctx
    assert isinstance(ctx, Context)  # the in-process device
    empty = not device.world.live_ids() and not len(device.ns) and not len(device.shm)
    checks.append(("every table empty", empty and not len(ctx.objects)))
    tables = (
        f"tables: QTEE objects {len(device.world.live_ids())}, NS ids {len(device.ns)}, "
        f"shm {len(device.shm)}, context ids {len(ctx.objects)}, "
        f"requests {len(ctx.requests)}"
    )
    if server:
        _over_a_server(checks)
    for name, ok in checks:
        print(f"[{'ok' if ok else 'FAILED'}] {name}")
    print(tables)
    return 0 if all(ok for _, ok in checks) else 1
