"""TAs for the bridge's cross-process tests (registered on import; a ``--ta-module``).

``tests.park``: op 0 keeps the callback object it is given (a C supplicant parks its own
there).  ``tests.call``: op 0 calls the parked object's op 0 with the input buffer and
returns its output; op 1 calls its op 1 (a callback that never returns until its
supplicant dies); op 2 lets the parked object go.  The slot is shared by the two TAs.
"""

from __future__ import annotations

import qtee
from qtee import NsObject, QteeError, op

PARKED: list[NsObject] = []


class Park(qtee.TrustedApp):
    @op(0, io=1)
    def park(self, cb: NsObject) -> None:
        PARKED.append(cb.retain())


class Call(qtee.TrustedApp):
    @op(0, ib=(None,), ob=(None,))
    def echo(self, data: bytes) -> bytes:
        res = PARKED[-1].invoke(0, ib=[data], ob=[64])
        if res.result:
            raise QteeError(res.result)
        return res.ob[0]

    @op(1)
    def stall(self) -> None:
        res = PARKED[-1].invoke(1)
        if res.result:
            raise QteeError(res.result)

    @op(2)
    def drop(self) -> None:
        while PARKED:
            PARKED.pop().release()


qtee.register_ta("tests.park", Park)
qtee.register_ta("tests.call", Call)
