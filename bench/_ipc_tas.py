"""The TA of bench/ipc.py, importable by the server process (``--ta-module bench._ipc_tas``)."""

from __future__ import annotations

import qtee
from qtee import op

NAME = "bench.ipc"


class IpcTA(qtee.TrustedApp):
    @op(0)
    def null(self) -> None:
        return None

    @op(1, io=1)
    def call(self, cb: qtee.NsObject) -> None:
        res = cb.invoke(0)
        if res.result:
            raise qtee.QteeError(res.result)


qtee.register_ta(NAME, IpcTA)
