"""An invoke without arguments (a null call, a release) takes ``Client._invoke``'s short
path (issue 18): it must send what the general path sends -- the 24-byte header alone,
``ret`` zero -- and end the same way: ``[]``, the result's :class:`QteeError`, the errno's
:class:`DriverError`, a release that ignores ``ret``, and its argument block back in the
pool whatever happened.  Each case is run both ways: through the short path, and through
the general one (the same call with an argument list that is not a tuple, which it takes
for one with arguments)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from objects import DriverError, QteeError
from qtee import Device, uapi
from qtee._tee.core import _INVOKE_HEAD
from qtee.client import Client
from qtee.secure import QteeRoot, SecureWorld


class _Truthy(list[Any]):
    """An empty argument list the short path does not see as one (``not args`` is False)."""

    def __bool__(self) -> bool:
        return True


class _Spy:
    """The client's fd, recording each OBJECT_INVOKE's argument block as sent."""

    def __init__(self, client: Client) -> None:
        self.real = client.ctx
        self.mem = client.device.memory
        self.sent: list[bytes] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def ioctl(self, cmd: int, arg: bytearray) -> int:
        if cmd == uapi.TEE_IOC_OBJECT_INVOKE:
            ptr, size = uapi.BUF_DATA_STRUCT.unpack_from(arg)
            self.sent.append(self.mem.read(ptr, size))
        return self.real.ioctl(cmd, arg)


@pytest.fixture
def client() -> Iterator[Client]:
    c = Client(Device(SecureWorld(QteeRoot())), workers=1)
    yield c
    c.close()


def _outcome(client: Client, spy: _Spy, ident: int, op: int, args: Any) -> tuple[Any, ...]:
    blocks = len(client._blocks)
    spy.sent.clear()
    try:
        got: Any = ("ok", client._invoke(ident, op, args))
    except QteeError as exc:
        got = ("result", exc.result)
    except DriverError as exc:
        got = ("errno", exc.errno)
    assert len(client._blocks) == max(blocks, 1)  # the block went back to the pool
    return got, tuple(spy.sent)


def test_a_call_without_arguments_ends_as_the_general_path_does(client: Client) -> None:
    env = client.client_env()
    spy = _Spy(client)
    client.ctx = spy  # type: ignore[assignment]
    try:
        cases = [
            (env.id, 0xFFFE),  # RETAIN from userspace: EINVAL
            (env.id, 77),  # an op the client env does not have: a result
            (12345, 1),  # no such object: the errno channel
            (uapi.TEE_OBJREF_NULL, 9),  # the root, an op it refuses
        ]
        for ident, op in cases:
            short = _outcome(client, spy, ident, op, ())
            general = _outcome(client, spy, ident, op, _Truthy())
            assert short == general, (ident, op)
            assert short[1] == (_INVOKE_HEAD.pack(ident, op, 0, 0),)
        # A release: ret is not an error; done through both paths on two handles.
        other = client.client_env()
        for ident, args in ((env.id, ()), (other.id, _Truthy())):
            got = _outcome(client, spy, ident, 0xFFFF, args)
            assert got == (("ok", []), (_INVOKE_HEAD.pack(ident, 0xFFFF, 0, 0),))
        env.released = other.released = True
    finally:
        client.ctx = spy.real
