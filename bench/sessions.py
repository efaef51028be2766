"""GP sessions against QTEE object invokes of the same payload (two u32 in, one u32 out).

1. Invoke on an open GP session (OP-TEE device, TEE_IOC_INVOKE with VALUE_INPUT and
   VALUE_OUTPUT) vs ``ObjRef.invoke`` of a QTEE TA op adding the same two numbers.
2. Open session + invoke + close session of a loaded TA vs the same object invoke.
"""

from __future__ import annotations

import struct
import sys
import uuid
from pathlib import Path

# bench/supplicant.py shares its name with the supplicant package: bench/ goes last.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
import supplicant  # noqa: F401 - the package is cached before bench/ can shadow it

sys.path.append(str(_HERE))

from _timing import ops_per_sec, pin_to_one_cpu, report

import qtee
from qtee import OUT_OBJECT, Out, op, uapi
from qtee._optee.core import OpteeContext, OpteeDevice
from qtee.secure._gp import GpParam, GpSession, GpTA, register_gp_ta, unregister_gp_ta

ADD_UUID = uuid.UUID("5b9e0e40-2636-11e1-ad9e-0002a5d5c51b")
OPEN_HEAD = struct.Struct("<16s16s6I")
INVOKE_HEAD = struct.Struct("<6I")
PARAM = struct.Struct("<4Q")


class AddGp(GpTA):
    UUID = ADD_UUID
    FLAGS = 0b1100  # SINGLE_INSTANCE | MULTI_SESSION: open reuses the loaded instance

    def invoke(self, session: GpSession, cmd: int, types: int, params: list[GpParam]) -> None:
        params[1].a = (params[0].a + params[0].b) & 0xFFFF_FFFF


class AddQtee(qtee.TrustedApp):
    @op(0, ib=(8,), ob=(4,))
    def add(self, pair: bytes) -> bytes:
        a, b = struct.unpack("<II", pair)
        return struct.pack("<I", (a + b) & 0xFFFF_FFFF)


class RawGp:
    """A C-like caller: argument blocks pinned once, ioctls with the kernel's structs."""

    def __init__(self, ctx: OpteeContext, device: OpteeDevice) -> None:
        self.ctx = ctx
        self.mem = device.memory
        self.block = bytearray(uapi.TEE_MAX_ARG_SIZE)
        self.addr = self.mem.pin(self.block)
        self.arg = bytearray(16)

    def _call(self, cmd: int, size: int) -> None:
        struct.pack_into("<QQ", self.arg, 0, self.addr, size)
        self.ctx.ioctl(cmd, self.arg)

    def open(self) -> int:
        OPEN_HEAD.pack_into(self.block, 0, ADD_UUID.bytes, bytes(16), 0, 0, 0, 0, 0, 4)
        self.block[56 : 56 + 128] = bytes(128)
        self._call(uapi.TEE_IOC_OPEN_SESSION, 56 + 128)
        session: int = OPEN_HEAD.unpack_from(self.block)[4]
        return session

    def add(self, session: int, a: int, b: int) -> int:
        INVOKE_HEAD.pack_into(self.block, 0, 0, session, 0, 0, 0, 4)
        PARAM.pack_into(self.block, 24, 1, a, b, 0)
        PARAM.pack_into(self.block, 56, 2, 0, 0, 0)
        self.block[88:152] = bytes(64)
        self._call(uapi.TEE_IOC_INVOKE, 24 + 128)
        total: int = PARAM.unpack_from(self.block, 56)[1]
        return total

    def close(self, session: int) -> None:
        self.ctx.ioctl(uapi.TEE_IOC_CLOSE_SESSION, bytearray(struct.pack("<I", session)))

    def release(self) -> None:
        self.mem.unpin(self.addr)


def main() -> None:
    print(pin_to_one_cpu())
    qtee.register_ta("bench.add", AddQtee)
    register_gp_ta(AddGp)
    world = qtee.SecureWorld(qtee.QteeRoot())
    device = qtee.Device(world)
    with qtee.Client(device, workers=1) as client:
        env = client.client_env()
        loader = client.open_service(env, 3)
        (ctrl,) = loader.invoke(0, qtee.ta_image("bench.add"), OUT_OBJECT)
        (app,) = ctrl.invoke(2, OUT_OBJECT)
        pair = struct.pack("<II", 40, 2)
        assert app.invoke(0, pair, Out(4)) == [struct.pack("<I", 42)]
        base = ops_per_sec(lambda: app.invoke(0, pair, Out(4)))
        report("QTEE object invoke (2 x u32 in, u32 out)", base)

        gp_dev = OpteeDevice(world)
        ctx = gp_dev.open()
        raw = RawGp(ctx, gp_dev)
        keep = raw.open()  # keeps the single instance loaded
        assert raw.add(keep, 40, 2) == 42
        inv = ops_per_sec(lambda: raw.add(keep, 40, 2))
        report("GP invoke on an open session", inv, base, target=1.5)

        def open_invoke_close() -> None:
            s = raw.open()
            raw.add(s, 40, 2)
            raw.close(s)

        full = ops_per_sec(open_invoke_close)
        report("GP open + invoke + close (TA loaded)", full, base, target=4.0)
        raw.close(keep)
        raw.release()
        ctx.close()
        for r in (app, ctrl, loader, env):
            r.release()
    unregister_gp_ta(ADD_UUID)
    qtee.secure.unregister_ta("bench.add")


if __name__ == "__main__":
    main()
