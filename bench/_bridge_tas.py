"""The TA both sides of bench/bridge.py invoke: op 0 does nothing (registered on import,
for the C program's embedded model through ``--ta-module``-style configuration)."""

from __future__ import annotations

import qtee
from qtee import op

NAME = "bench.null"


class NullTA(qtee.TrustedApp):
    @op(0)
    def null(self) -> None:
        return None


qtee.register_ta(NAME, NullTA)
