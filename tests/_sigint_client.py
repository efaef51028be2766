"""A client whose TA calls back into a callback object that sleeps, for the Ctrl-C tests.

``python tests/_sigint_client.py [SOCKET]``: on an in-process device, or on the device of
the server at SOCKET (``qtee serve --ta-module tests/_sigint_client.py``: importing this
file registers the TA there).  It prints ``sleeping`` once the callback object's handler
runs, then waits for the TA's answer; the test sends SIGINT meanwhile, and the program
must end promptly with KeyboardInterrupt, as any Python program does on Ctrl-C.
"""

from __future__ import annotations

import sys
import time

import qtee
from qtee import OUT_OBJECT, CallbackObject, Out, op

TA_NAME = "sigint.sleeper"
#: How long the callback sleeps: far longer than the test waits for the exit.
NAP = 60.0


class CallsBack(qtee.TrustedApp):
    """Op 0 calls op 0 of the client's object and returns what it answered."""

    @op(0, io=1, ob=(None,))
    def call_back(self, cb: qtee.NsObject) -> bytes:
        res = cb.invoke(0, [b"TA"], [8])
        if res.result:
            raise qtee.QteeError(res.result)
        return res.ob[0]


qtee.register_ta(TA_NAME, CallsBack)


class Sleeper(CallbackObject):
    @op(0, ib=(None,), ob=(None,))
    def nap(self, _name: bytes) -> bytes:
        print("sleeping", flush=True)
        time.sleep(NAP)
        return b"late"


def main(argv: list[str]) -> int:
    device: qtee.Device | qtee.RemoteDevice
    if len(argv) > 1:
        device = qtee.connect(argv[1])
    else:
        device = qtee.Device(qtee.SecureWorld(qtee.QteeRoot()))
    with qtee.Client(device, workers=1) as client:
        env = client.client_env()
        loader = client.open_service(env, 3)
        (ctrl,) = loader.invoke(0, qtee.ta_image(TA_NAME), OUT_OBJECT)
        (app,) = ctrl.invoke(2, OUT_OBJECT)
        (reply,) = app.invoke(0, Sleeper(), Out(8))
        print(f"answered {reply!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
