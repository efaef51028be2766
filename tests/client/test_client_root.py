"""``Client.root``: QTEE's root object, public, for registering with one's own credentials.

quic-teec.md §1.3-§1.4: libqcomtee's root has ``tee_object_id`` = ``TEE_OBJREF_NULL``, and
a client registers by invoking it with op 2 (``register``) or op 5
(``registerWithCredentials``) and a credentials callback object (IIO: op 0 ``getLength``,
op 1 ``readAtOffset``, §1.6).  qtee-kernel.md §2.2, §2.5, §4.1: ``TEE_OBJREF_NULL`` as the
invoke target is the root; a RELEASE of it is ignored; as an input it is the NULL object.
"""

from __future__ import annotations

import errno
import struct
import threading

import pytest

from objects import DriverError, QteeError, UsageError, op
from qtee import OUT_OBJECT, CallbackObject, Client, Credentials, Device, ObjRef, Result, uapi
from qtee.credentials import CredentialKey
from tests._helpers import wait_until

ROOT_OP_REGISTER = 2
ROOT_OP_REG_WITH_CREDENTIALS = 5


class Creds(CallbackObject):
    """A credentials object of the user's own: IIO over a CBOR map, recording QTEE's reads."""

    def __init__(self, uid: int) -> None:
        self.data = Credentials({CredentialKey.UID: uid, CredentialKey.PKG_NAME: "mine"}).encode()
        self.calls: list[str] = []
        self.lock = threading.Lock()

    @op(0, ob=(8,))
    def get_length(self) -> bytes:
        with self.lock:
            self.calls.append("getLength")
        return struct.pack("<Q", len(self.data))

    @op(1, ib=(8,), ob=(None,))
    def read_at_offset(self, offset: bytes) -> bytes:
        with self.lock:
            self.calls.append("readAtOffset")
        (off,) = struct.unpack("<Q", offset)
        if off >= len(self.data):
            raise QteeError(Result.ERROR_INVALID)
        return self.data[off:]


class InvokeRecorder:
    """Wraps ``client.ctx.ioctl``: the (object id, op) of each OBJECT_INVOKE, and a count of
    every ioctl the client makes."""

    def __init__(self, client: Client) -> None:
        self.real = client.ctx.ioctl
        self.mem = client.device.memory
        self.invokes: list[tuple[int, int]] = []
        client.ctx.ioctl = self  # type: ignore[method-assign]

    def __call__(self, cmd: int, arg: bytearray | memoryview) -> int:
        if cmd == uapi.TEE_IOC_OBJECT_INVOKE:
            buf = uapi.BufData.unpack(arg)
            head, _params = uapi.unpack_arg(
                uapi.ObjectInvokeArg, self.mem.read(buf.buf_ptr, buf.buf_len)
            )
            self.invokes.append((head.id, head.op))
        return self.real(cmd, arg)


@pytest.mark.qtee_modes("in-process", "server", "guest")
@pytest.mark.parametrize("register_op", [ROOT_OP_REGISTER, ROOT_OP_REG_WITH_CREDENTIALS])
def test_root_registers_a_credentials_object_of_ones_own(
    qtee_client: Client, register_op: int
) -> None:
    """quic-teec.md §1.4 step 2 (and the kernel's op 5, QK §2.5): the root with [OI creds,
    OO env]; QTEE reads the credentials through IIO, keeps them while the env lives, and
    releases them with it (the callback id goes back: nothing stays exported)."""
    creds = Creds(uid=4242)
    (env,) = qtee_client.root.invoke(register_op, creds, OUT_OBJECT)
    try:
        assert isinstance(env, ObjRef) and env.id != uapi.TEE_OBJREF_NULL
        assert creds.calls[0] == "getLength" and "readAtOffset" in creds.calls
        assert qtee_client.exported() == 1  # QTEE keeps the credentials object
        (versions,) = env.invoke(0, struct.pack("<I", 2033), OUT_OBJECT)  # the env works
        versions.release()
    finally:
        env.release()
    assert wait_until(lambda: qtee_client.exported() == 0)


def test_the_root_is_the_null_target_on_the_wire(qtee_client: Client) -> None:
    """QK §2.2: the root is reachable only as ``TEE_IOC_OBJECT_INVOKE.id ==
    TEE_OBJREF_NULL``; ``client_env`` goes through the same public root."""
    rec = InvokeRecorder(qtee_client)
    (env,) = qtee_client.root.invoke(ROOT_OP_REGISTER, Creds(1), OUT_OBJECT)
    env.release()
    env2 = qtee_client.client_env()
    env2.release()
    assert rec.invokes == [
        (uapi.TEE_OBJREF_NULL, ROOT_OP_REGISTER),
        (env.id, 0xFFFF),
        (uapi.TEE_OBJREF_NULL, ROOT_OP_REGISTER),
        (env2.id, 0xFFFF),
    ]
    assert qtee_client.root is qtee_client.root  # one root per client


def test_releasing_the_root_is_refused_and_sends_nothing(qtee_client: Client) -> None:
    """quic-teec.md §1.3: the root lives as long as its namespace (closing the fd ends it);
    QK §4.1 step 2: the kernel would ignore a RELEASE of TEE_OBJREF_NULL, so the model
    refuses it with a reason and the root stays usable."""
    rec = InvokeRecorder(qtee_client)
    root = qtee_client.root
    with pytest.raises(UsageError, match=r"root object is not released.*close the Client"):
        root.release()
    with pytest.raises(UsageError, match="root object is not released"), root:
        pass
    assert rec.invokes == [] and not root.released
    env = qtee_client.client_env()  # still the root
    env.release()


def test_the_root_says_it_is_the_root(qtee_client: Client) -> None:
    """issue 15 ("objects visible"): the root's repr says what it is."""
    assert repr(qtee_client.root) == "<ObjRef root>"


def test_the_root_is_no_argument(qtee_client: Client) -> None:
    """QK §2.2: ``TEE_OBJREF_NULL`` as an OBJREF_INPUT is the NULL object, so the root
    passed as an argument would reach QTEE as NULL -- libqcomtee's marshalling refuses a
    ROOT object (quic-teec.md §2.1); the model names why, and sends nothing."""
    rec = InvokeRecorder(qtee_client)
    with pytest.raises(UsageError, match=r"root object cannot be passed.*NULL"):
        qtee_client.root.invoke(ROOT_OP_REGISTER, qtee_client.root, OUT_OBJECT)
    assert rec.invokes == []
    assert qtee_client.exported() == 0


def test_the_root_of_a_closed_client_is_ebadf(qtee_device: Device) -> None:
    """QK §4.5: after close every call on the fd fails EBADF, the root's too."""
    client = Client(qtee_device, workers=1)
    client.close()
    with pytest.raises(DriverError) as info:
        client.root.invoke(ROOT_OP_REGISTER, None, OUT_OBJECT)
    assert info.value.code == errno.EBADF


@pytest.mark.parametrize(
    ("uid", "exc", "says"),
    [
        ("3", TypeError, "uid must be an int, not str"),
        (3.0, TypeError, "uid must be an int, not float"),
        (True, TypeError, "uid must be an int, not bool"),
        (-1, UsageError, "uid -1 does not fit in u32"),
        (1 << 32, UsageError, "uid 4294967296 does not fit in u32"),
    ],
)
def test_open_service_names_a_bad_uid_or_env(
    qtee_client: Client, qtee_env: ObjRef, uid: object, exc: type[Exception], says: str
) -> None:
    """A class UID is a u32 (client_env op 0 reads 4 bytes): anything else is refused
    by name, not as a bare ``struct.error``; so is an env that is no handle."""
    with pytest.raises(exc, match=rf"^open_service: {says}$"):
        qtee_client.open_service(qtee_env, uid)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^open_service: env must be an ObjRef, not int$"):
        qtee_client.open_service(5, 3)  # type: ignore[arg-type]
