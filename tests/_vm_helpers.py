"""Shared set-up of the VM tests: a monitor and a VMM, guests, and a TA that knows its partition.

``VmTA`` answers with the client id of the partition it runs in (0 = host), so every
test can say *whose* secure world served a call; ``Recorder`` is a guest-side callback
object that remembers what QTEE sent it.  ``vmm_env`` builds ``SecureMonitor`` + ``Vmm``
and, at the end, destroys every VM and checks that the VMM, the monitor and every guest
device hold nothing (the plugin's leak check also covers the devices).
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

from objects import QteeError, op
from qtee import OUT_OBJECT, CallbackObject, Client, NsObject, ObjRef, TrustedApp, ta_image
from qtee.secure import APP_LOADER_UID, Mapping, SecureMonitor, SecureObject
from qtee.vm import Guest, Vmm

TA_NAME = "vmta"
U32 = struct.Struct("<I")


class Gate:
    """Holds a TA call until the test lets it go (what the TA saw is kept)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.leave = threading.Event()
        self.seen: list[bytes] = []


class Vault(SecureObject):
    """A secret minted in one partition; op 0 reads it."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret

    @op(0, ob=(None,))
    def read(self) -> bytes:
        return self.secret


class VmTA(TrustedApp):
    """Tells which partition serves it; calls back, holds, maps and smuggles on request."""

    #: Held calls, by client id of the partition (set by a test before it calls ``hold``).
    gates: ClassVar[dict[int, Gate]] = {}
    #: An NS object stashed at class level: the cross-partition smuggling attempt.
    stash: ClassVar[NsObject | None] = None
    minted: ClassVar[int] = 0

    def _cid(self) -> int:
        return self.world.client_id

    @op(0, ib=(8,), ob=(4,))
    def add(self, pair: bytes) -> bytes:
        a, b = struct.unpack("<II", pair)
        return U32.pack((a + b) & 0xFFFF_FFFF)

    @op(1, ob=(4,))
    def whoami(self) -> bytes:
        return U32.pack(self._cid())

    @op(2, io=1, ob=(None,))
    def call_back(self, cb: NsObject) -> bytes:
        res = cb.invoke(0, [U32.pack(self._cid())], [64])
        if res.result:
            raise QteeError(res.result)
        return res.ob[0]

    @op(3, ib=(None,), ob=(None,))
    def hold(self, data: bytes) -> bytes:
        gate = VmTA.gates[self._cid()]
        gate.seen.append(data)
        gate.entered.set()
        gate.leave.wait(10)
        return data

    @op(4, ib=(None,), oo=1)
    def vault(self, secret: bytes) -> Vault:
        return Vault(U32.pack(self._cid()) + secret)

    @op(5, io=1, ob=(None,))
    def read_mem(self, mem: NsObject) -> bytes:
        mapping = self.world.map_region(mem)
        try:
            seen = bytes(mapping.view[:16])
            mapping.view[:7] = b"from TA"
            return seen
        finally:
            mapping.unmap()

    @op(6, io=1, ob=(8,))
    def map_keep(self, mem: NsObject) -> bytes:
        mapping = self.world.map_region(mem)
        self._maps().append(mapping)
        return struct.pack("<Q", mapping.paddr)

    @op(7)
    def unmap_all(self) -> None:
        maps = self._maps()
        while maps:
            maps.pop().unmap()

    @op(8, io=1)
    def stash_it(self, cb: NsObject) -> None:
        if VmTA.stash is not None:
            VmTA.stash.release()
        VmTA.stash = cb.retain()

    @op(9, ob=(None,))
    def use_stash(self) -> bytes:
        assert VmTA.stash is not None
        res = VmTA.stash.invoke(0, [U32.pack(self._cid())], [64])
        if res.result:
            raise QteeError(res.result)
        return res.ob[0]

    @op(10, io=1, oo=1)
    def give_back(self, cb: object) -> object:
        return cb

    @op(11)
    def drop_stash(self) -> None:
        if VmTA.stash is not None:
            VmTA.stash.release()
            VmTA.stash = None

    @op(12, ib=(4,), io=1)
    def call_op(self, raw_op: bytes, cb: NsObject) -> None:
        """Call ``cb`` with an op and no args (e.g. a callback that blocks)."""
        res = cb.invoke(U32.unpack(raw_op)[0])
        if res.result:
            raise QteeError(res.result)

    @op(13, ib=(4, None), ob=(None,))
    def listen(self, raw_id: bytes, data: bytes) -> bytes:
        """Ask a supplicant's listener (its shared buffer is mapped through MAP_REGION)."""
        return self.world.listeners.get(U32.unpack(raw_id)[0]).request(data)[: len(data) + 8]

    @op(14, io=1, ob=(4,))
    def fetch(self, cb: NsObject) -> bytes:
        """Ask ``cb`` (op 2) for an object; answer the result QTEE got."""
        res = cb.invoke(2, n_oo=1)
        for obj in res.oo:
            if isinstance(obj, NsObject):
                obj.release()
        return U32.pack(res.result & 0xFFFF_FFFF)

    def _maps(self) -> list[Mapping]:
        maps: list[Mapping] | None = getattr(self, "_kept_maps", None)
        if maps is None:
            maps = []
            self._kept_maps = maps
        return maps


class Recorder(CallbackObject):
    """A guest's callback object: remembers the IBs QTEE sent, answers ``seen:`` + IB."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []
        self.entered = threading.Event()
        self.leave = threading.Event()

    @op(0, ib=(None,), ob=(None,))
    def hello(self, data: bytes) -> bytes:
        self.seen.append(data)
        return b"seen:" + data

    @op(1)
    def block(self) -> None:
        self.entered.set()
        self.leave.wait(10)


@dataclass
class App:
    """A client with VmTA loaded: ``app`` is the TA's object."""

    client: Client
    env: ObjRef
    loader: ObjRef
    ctrl: ObjRef
    app: ObjRef
    extra: list[ObjRef] = field(default_factory=list)

    def close(self, *, dead: bool = False) -> None:
        """Release everything and close the client (``dead``: the VM is gone, so only
        the client's own threads are stopped)."""
        if not dead:
            for ref in self.extra:
                ref.release()
            self.app.release()
            self.ctrl.invoke(1)
            self.ctrl.release()
            self.loader.release()
            self.env.release()
        self.client.close()


def open_app(device: Any, *, workers: int = 2) -> App:
    """``Client(device)``, its client env, the AppLoader, and VmTA loaded."""
    client = Client(device, workers=workers)
    env = client.client_env()
    loader = client.open_service(env, APP_LOADER_UID)
    (ctrl,) = loader.invoke(0, ta_image(TA_NAME), OUT_OBJECT)
    (app,) = ctrl.invoke(2, OUT_OBJECT)
    return App(client, env, loader, ctrl, app)


def whoami(app: App) -> int:
    from qtee import Out

    (raw,) = app.app.invoke(1, Out(4))
    return int(U32.unpack(raw)[0])


@dataclass
class VmEnv:
    monitor: SecureMonitor
    vmm: Vmm

    def guest(self, name: str, tee: str = "qtee", **kw: Any) -> Guest:
        kw.setdefault("ram_size", 1 << 20)
        return self.vmm.create_vm(name, tee=tee, **kw)


@contextmanager
def vmm_env(**monitor_kw: Any) -> Iterator[VmEnv]:
    """A fresh monitor and VMM; every VM destroyed at the end, and nothing left anywhere."""
    monitor = SecureMonitor(**monitor_kw)
    vmm = Vmm(monitor)
    guests: list[Guest] = []
    try:
        yield VmEnv(monitor, vmm)
    finally:
        guests = vmm.guests()
        vmm.close()
        VmTA.gates.clear()
        if VmTA.stash is not None:
            VmTA.stash = None
    assert vmm.leaks() == {}, vmm.leaks()
    assert monitor.leaks() == {}, monitor.leaks()
    for guest in guests:
        assert guest.ram.closed
        if guest.device is not None:
            assert guest.device.leaks() == {}, (guest.name, guest.device.leaks())
