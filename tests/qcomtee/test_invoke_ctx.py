"""One record per call (issue 17: the kernel's ``qcomtee_object_invoke_ctx``): what one
invocation holds travels with it, so calls running at once or inside each other never
see each other's (qtee-kernel.md §4.1 step 6, §4.3: a QTEE object a callback answers with
is lent to QTEE for that call; its temporary reference goes when that call is over)."""

from __future__ import annotations

import threading

from objects import op
from qtee import Device
from qtee.client import OUT_OBJECT, CallbackObject, Client, ObjRef, Out
from qtee.secure import NsObject, SecureObject, SecureWorld
from tests._helpers import wait_until

ASK, NESTED = 0, 1


class Token(SecureObject):
    """What the callback hands back: a QTEE object the client holds."""

    @op(0, ob=(4,))
    def name(self) -> bytes:
        return b"tokn"


class Asker(SecureObject):
    """op 0: ask the callback for an object and invoke what comes back."""

    @op(ASK, io=1, ob=(4,))
    def ask(self, cb: NsObject) -> bytes:
        res = cb.invoke(0, n_oo=1)
        (got,) = res.oo
        assert isinstance(got, Token), got
        return got.name()


class Root(SecureObject):
    def __init__(self) -> None:
        self.asker = Asker()
        self.token = Token()

    @op(0, oo=2)
    def open(self) -> tuple[SecureObject, SecureObject]:
        return self.asker, self.token


class Giver(CallbackObject):
    """Answers each request with the client's handle on the token; the first answer
    first makes a call of its own with the same token (a call inside the callback)."""

    def __init__(self, token: ObjRef, asker: ObjRef) -> None:
        self.token = token
        self.asker = asker
        self.inner: list[bytes] = []

    @op(0, oo=1)
    def give(self) -> ObjRef:
        if not self.inner:
            self.inner.append(b"")  # once: the inner call asks this same object again
            (name,) = self.asker.invoke(ASK, self, Out(4))
            self.inner[0] = name
        return self.token


def test_qtee_object_lent_in_a_callback_answer_is_held_per_call() -> None:
    """§4.3: the callback answers with a QTEE object; QTEE gets its own object back and
    uses it at once, in the outer call and in a call made inside the callback.  Each
    call drops only its own temporary references: afterwards the client's handle still
    works and every table is as before."""
    device = Device(SecureWorld(Root()))
    with Client(device, workers=2) as client:
        asker, token = client.root.invoke(0, OUT_OBJECT, OUT_OBJECT)
        before = device.leaks()
        giver = Giver(token, asker)
        (name,) = asker.invoke(ASK, giver, Out(4))
        assert name == b"tokn" and giver.inner == [b"tokn"]
        assert token.invoke(0, Out(4)) == [b"tokn"]
        assert wait_until(lambda: device.leaks() == before)  # workers take the notifications
        asker.release()
        token.release()


def test_calls_at_once_keep_their_own_records() -> None:
    """Two threads asking at once: each call's lent references are its own."""
    device = Device(SecureWorld(Root()))
    with Client(device, workers=4) as client:
        asker, token = client.root.invoke(0, OUT_OBJECT, OUT_OBJECT)
        before = device.leaks()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                for _ in range(50):
                    giver = Giver(token, asker)
                    giver.inner.append(b"done")  # no inner call here
                    assert asker.invoke(ASK, giver, Out(4)) == [b"tokn"]
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=run) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors and not any(t.is_alive() for t in threads)
        assert wait_until(lambda: device.leaks() == before)
        asker.release()
        token.release()
