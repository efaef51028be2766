"""TAs of the server soak (tests/remote/test_server_soak.py), registered on import so that
``qtee serve --ta-module tests._soak_tas`` serves them.

``soak.good.<k>`` (one per well-behaved client, a TA is loaded once per world at a time):
op 0 passes ``data`` through the caller's callback object, op 1 adds.
``soak.hostile.<k>`` (one per hostile connection): op 0 sleeps ``ms``, op 1 calls back the
caller's object (op 1) and ignores what it answers.
"""

from __future__ import annotations

import struct
import time
from typing import Final

import qtee
from qtee import NsObject, op
from tests._tas import Through

GOOD: Final = 16
HOSTILE: Final = 64


class Hostile(qtee.TrustedApp):
    @op(0, ib=(4,))
    def nap(self, ms: bytes) -> None:
        time.sleep(struct.unpack("<I", ms)[0] / 1000)

    @op(1, io=1)
    def call_back(self, cb: NsObject) -> None:
        cb.invoke(1)  # DEFUNCT once the caller hung up: ignored


for _k in range(GOOD):
    qtee.register_ta(f"soak.good.{_k}", Through)
for _k in range(HOSTILE):
    qtee.register_ta(f"soak.hostile.{_k}", Hostile)
