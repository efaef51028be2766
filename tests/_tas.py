"""The small TAs and client objects several suites load, written once.

* :class:`Adder`: ISMCIExample (quic-teec.md §5.3), op 0 add({u32, u32} -> u32).
* :class:`Through`: op 0 passes ``data`` through the caller's callback object, op 1 adds.
* :class:`Keeper` and :class:`Caller`: one TA keeps a callback object, another calls it
  (class level, so the second TA reaches what the first keeps).
* :class:`Echoer`: a client's callback object that answers ``tag + data`` reversed.
* :class:`Sleeper`: a client's callback object whose op 1 sleeps.

Each suite registers them under its own names (``qtee_ta`` markers, ``register_ta``), and
asserts what it checks itself; labels name the class (``TA 'adder' (Adder)``).
"""

from __future__ import annotations

import struct
import time

from objects import QteeError
from qtee import CallbackObject, NsObject, TrustedApp, op


class Adder(TrustedApp):
    """ISMCIExample (quic-teec.md §5.3): op 0 add({u32, u32} -> u32), modulo 2**32."""

    @op(0, ib=(8,), ob=(4,))
    def add(self, pair: bytes) -> bytes:
        a, b = struct.unpack("<II", pair)
        return struct.pack("<I", (a + b) & 0xFFFF_FFFF)


class Through(TrustedApp):
    """op 0: calls ``cb`` op 0 with ``data`` and returns its answer; op 1: adds."""

    @op(0, ib=(None,), io=1, ob=(None,))
    def through(self, data: bytes, cb: NsObject) -> bytes:
        res = cb.invoke(0, ib=[data], ob=[len(data) + 64])
        if res.result:
            raise QteeError(res.result)
        return res.ob[0]

    @op(1, ib=(8,), ob=(4,))
    def add(self, pair: bytes) -> bytes:
        a, b = struct.unpack("<II", pair)
        return struct.pack("<I", (a + b) & 0xFFFF_FFFF)


class Keeper(TrustedApp):
    """Keeps the callback object it is given (class level, so :class:`Caller` reaches it)."""

    kept: NsObject | None = None

    @op(0, io=1)
    def keep(self, cb: NsObject) -> None:
        Keeper.kept = cb.retain()


class Caller(TrustedApp):
    """op 0 calls op 1 of what :class:`Keeper` keeps; op 1 releases it."""

    @op(0)
    def call_kept(self) -> None:
        kept = Keeper.kept
        assert kept is not None
        res = kept.invoke(1)
        if res.result:
            raise QteeError(res.result)

    @op(1)
    def drop_kept(self) -> None:
        if Keeper.kept is not None:
            Keeper.kept.release()
            Keeper.kept = None


class Echoer(CallbackObject):
    """op 0 answers ``tag`` followed by ``data`` reversed."""

    def __init__(self, tag: bytes) -> None:
        self.tag = tag

    @op(0, ib=(None,), ob=(None,))
    def echo(self, data: bytes) -> bytes:
        return self.tag + data[::-1]


class Sleeper(CallbackObject):
    """op 1 sleeps ``seconds`` (a callback the TA waits on)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    @op(1)
    def nap(self) -> None:
        time.sleep(self.seconds)
