"""What an ``@op`` declares is a contract, checked on both sides (issue 15, "Errors that
say what went wrong").

A Mink IDL skeleton packs exactly what the interface declares: a fixed-size output buffer
is always its size, an output object is an object (quic-teec.md §5.2, §5.3).  A method
that returns something else is the method's bug, and the call fails like every other
bug of a TA or a callback object: ``ERROR`` (1), with a detail naming the op, the slot
and what came back, the same in every mode, nothing leaked and one log line.  A
declaration or a class that cannot work is refused when the class is defined.
"""

from __future__ import annotations

import logging
import struct

import pytest

from objects import DispatchResult, DriverError, PyObject, QteeError, UsageError, op
from qtee import OUT_OBJECT, CallbackObject, Client, ObjRef, Out, Result, Transfer, uapi
from qtee.pytest_plugin import AppLoaderHelper
from qtee.secure import NsObject, SecureObject, TrustedApp
from tests._helpers import wait_until

MODES = pytest.mark.qtee_modes("in-process", "server", "guest")


class Child(SecureObject):
    """A sub-object a TA hands out."""

    @op(0, ob=(4,))
    def ping(self) -> bytes:
        return b"pong"


class Sloppy(TrustedApp):
    """Returns what its declarations do not allow."""

    @op(0, oo=1)
    def bytes_for_object(self) -> bytes:
        return b"x"

    @op(1, oo=2)
    def child_then_bytes(self) -> tuple[SecureObject, bytes]:
        return Child(), b"x"

    @op(2, io=1, oo=2)
    def echo_then_int(self, peer: NsObject) -> tuple[NsObject, int]:
        return peer, 7

    @op(3, ob=(4,))
    def short(self) -> bytes:
        return b"\x01"

    @op(4, ib=(4,), ob=(4,))
    def given(self, n: bytes) -> bytes:
        return b"\xab" * struct.unpack("<I", n)[0]

    @op(5, ob=(None,))
    def any_length(self) -> bytes:
        return b"\x01"

    @op(6, oo=1)
    def child(self) -> SecureObject:
        return Child()


class Peer(CallbackObject):
    """A client object that answers QTEE with what its declarations do not allow."""

    def __init__(self, ref: ObjRef | None = None) -> None:
        self.ref = ref

    @op(0, oo=1)
    def bytes_for_object(self) -> bytes:
        return b"x"

    @op(1, ob=(4,))
    def short(self) -> bytes:
        return b"\x01"

    @op(2, ob=(None,), oo=1)
    def too_long_and_a_transfer(self) -> tuple[bytes, Transfer]:
        assert self.ref is not None
        return b"\x00" * 8, Transfer(self.ref)


class Asker(TrustedApp):
    """Calls back into the client object it is given; returns what QTEE saw."""

    @op(0, ib=(8,), io=1, ob=(8,))
    def ask(self, how: bytes, peer: NsObject) -> bytes:
        op_, cap = struct.unpack("<II", how)
        n_oo = 1 if op_ in (0, 2) else 0
        res = peer.invoke(op_, ob=[cap] if op_ else [], n_oo=n_oo)
        for obj in res.oo:
            if isinstance(obj, NsObject):
                obj.release()
        size = len(res.ob[0]) if res.ob else 0
        return struct.pack("<iI", res.result, size)


def problems(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# ----------------------------------------------------------------- 1. output objects
@MODES
@pytest.mark.qtee_ta("sloppy", Sloppy)
def test_bytes_for_an_output_object_is_error_with_a_detail(
    qtee_app: AppLoaderHelper, caplog: pytest.LogCaptureFixture
) -> None:
    """Was a ``UsageError`` out of the client's invoke (in process, guest) and EIO with a
    server traceback (server); now ERROR with the op, the slot and the kind, one line."""
    app = qtee_app("sloppy")
    with pytest.raises(QteeError) as exc:
        app.invoke(0, OUT_OBJECT)
    why = (
        "Sloppy.bytes_for_object returned a bytes for oo[0]; "
        "op 0 takes SecureObject, NsObject or None there"
    )
    assert (exc.value.result, exc.value.name, exc.value.detail) == (Result.ERROR, "ERROR", why)
    assert problems(caplog) == [why]
    (child,) = app.invoke(6, OUT_OBJECT)  # the TA and the client go on
    with child:
        assert child.invoke(0, Out(4)) == [b"pong"]


@MODES
@pytest.mark.qtee_ta("sloppy", Sloppy)
def test_an_object_in_another_slot_is_not_exported(
    qtee_app: AppLoaderHelper, caplog: pytest.LogCaptureFixture
) -> None:
    """The sub-object returned next to the bad slot never enters QTEE's table (it used to
    stay there, exported to nobody: the leak check after the test counts it)."""
    app = qtee_app("sloppy")
    with pytest.raises(QteeError) as exc:
        app.invoke(1, OUT_OBJECT, OUT_OBJECT)
    assert exc.value.result == Result.ERROR
    assert exc.value.detail == (
        "Sloppy.child_then_bytes returned a bytes for oo[1]; "
        "op 1 takes SecureObject, NsObject or None there"
    )
    assert len(problems(caplog)) == 1


@MODES
@pytest.mark.qtee_ta("sloppy", Sloppy)
def test_an_input_returned_next_to_a_bad_slot_is_released_once(
    qtee_client: Client, qtee_app: AppLoaderHelper, caplog: pytest.LogCaptureFixture
) -> None:
    """The client's callback object given as input and handed back next to an int: QTEE
    drops its proxy once (async release), the client's export goes away."""
    app = qtee_app("sloppy")
    before = qtee_client.exported()  # the credentials object QTEE keeps
    with pytest.raises(QteeError) as exc:
        app.invoke(2, Peer(), OUT_OBJECT, OUT_OBJECT)
    assert exc.value.result == Result.ERROR
    assert exc.value.detail == (
        "Sloppy.echo_then_int returned an int for oo[1]; "
        "op 2 takes SecureObject, NsObject or None there"
    )
    app.invoke(6, OUT_OBJECT)[0].release()  # a return that carries the async tail
    wait_until(lambda: qtee_client.exported() == before)
    assert len(problems(caplog)) == 1


@MODES
@pytest.mark.qtee_ta("asker", Asker)
def test_a_callback_object_answering_bytes_for_an_object(
    qtee_app: AppLoaderHelper, caplog: pytest.LogCaptureFixture
) -> None:
    """The TA sees ERROR (1); the client logs the handler's bug once, by op and slot."""
    app = qtee_app("asker")
    (got,) = app.invoke(0, struct.pack("<II", 0, 0), Peer(), Out(8))
    assert struct.unpack("<iI", got) == (Result.ERROR, 0)
    assert problems(caplog) == [
        "Peer.bytes_for_object returned a bytes for oo[0]; "
        "op 0 takes CallbackObject, ObjRef, MemoryObject, Transfer or None there"
    ]


@MODES
@pytest.mark.qtee_ta("asker", Asker)
def test_a_failed_answer_still_releases_its_transfer(
    qtee_client: Client, qtee_env: ObjRef, qtee_app: AppLoaderHelper
) -> None:
    """A handler's ``Transfer`` is released exactly once whatever the answer: here its
    buffer does not fit (ERROR_SIZE_OUT), and the ObjRef used to stay unreleased."""
    app = qtee_app("asker")
    ref = qtee_client.open_service(qtee_env, 3)
    (got,) = app.invoke(0, struct.pack("<II", 2, 4), Peer(ref), Out(8))
    assert struct.unpack("<iI", got) == (Result.ERROR_SIZE_OUT, 0)
    assert wait_until(lambda: ref.released)  # the worker releases it after its SEND


# ----------------------------------------------------------------- 2. output sizes
@MODES
@pytest.mark.qtee_ta("sloppy", Sloppy)
def test_a_fixed_size_output_of_another_length_is_error(
    qtee_app: AppLoaderHelper, caplog: pytest.LogCaptureFixture
) -> None:
    """ob=(4,) and 1 byte returned: it used to reach the client as 1 byte with OK."""
    app = qtee_app("sloppy")
    with pytest.raises(QteeError) as exc:
        app.invoke(3, Out(4))
    why = "Sloppy.short returned 1 byte for ob[0]; op 3 declares 4"
    assert (exc.value.result, exc.value.detail) == (Result.ERROR, why)
    assert problems(caplog) == [why]


@MODES
@pytest.mark.qtee_ta("sloppy", Sloppy)
@pytest.mark.parametrize(("given", "result"), [(4, Result.OK), (3, 1), (0, 1), (5, 4)])
def test_fixed_sizes_exact_more_than_the_capacity_is_size_out(
    qtee_app: AppLoaderHelper, given: int, result: int
) -> None:
    """Exactly 4 passes; shorter is ERROR; longer than the capacity (which a fixed size
    is) stays ERROR_SIZE_OUT (4), the rule that applies first."""
    app = qtee_app("sloppy")
    if result == Result.OK:
        assert app.invoke(4, struct.pack("<I", given), Out(4)) == [b"\xab" * 4]
        return
    with pytest.raises(QteeError) as exc:
        app.invoke(4, struct.pack("<I", given), Out(4))
    assert exc.value.result == result


@MODES
@pytest.mark.qtee_ta("sloppy", Sloppy)
def test_any_length_up_to_the_capacity_is_kept(qtee_app: AppLoaderHelper) -> None:
    """``None`` sizes are not fixed: 1 byte into Out(16) is 1 byte, OK."""
    assert qtee_app("sloppy").invoke(5, Out(16)) == [b"\x01"]


@MODES
@pytest.mark.qtee_ta("asker", Asker)
def test_a_callback_objects_fixed_size_output_is_enforced(
    qtee_app: AppLoaderHelper, caplog: pytest.LogCaptureFixture
) -> None:
    """The TA used to get OK with 1 byte for a 4-byte output."""
    app = qtee_app("asker")
    (got,) = app.invoke(0, struct.pack("<II", 1, 4), Peer(), Out(8))
    assert struct.unpack("<iI", got) == (Result.ERROR, 0)
    assert problems(caplog) == ["Peer.short returned 1 byte for ob[0]; op 1 declares 4"]


# ----------------------------------------------------------------- 3. one method per op
def test_two_methods_with_one_op_number_are_refused() -> None:
    with pytest.raises(UsageError) as exc:

        class Twice(PyObject):
            @op(0)
            def f(self) -> None: ...

            @op(0)
            def g(self) -> None: ...

    assert str(exc.value).startswith("Twice: op 0 is declared by both Twice.f and Twice.g")


class Base(PyObject):
    @op(0, ob=(4,))
    def f(self) -> bytes:
        return b"base"

    @op(1)
    def g(self) -> None: ...


def test_a_subclass_takes_an_inherited_number_only_by_the_methods_name() -> None:
    with pytest.raises(UsageError) as exc:

        class Other(Base):
            @op(0)
            def h(self) -> None: ...

    assert str(exc.value).startswith("Other: op 0 is declared by both Base.f and Other.h")
    assert "overriding the method of the same name" in str(exc.value)


def test_overriding_keeps_or_replaces_the_declaration() -> None:
    """Without ``@op`` only the implementation changes; with one, the new declaration
    replaces the old (here: f moves to op 2, op 0 is gone)."""

    class Plain(Base):
        def f(self) -> bytes:
            return b"plai"

    class Moved(Base):
        @op(2, ob=(None,))
        def f(self) -> bytes:
            return b"moved"

    assert Plain().dispatch(0, (), (4,), (), 0) == DispatchResult(Result.OK, (b"plai",))
    assert sorted(Moved.__ops__) == [1, 2]
    assert Moved().dispatch(2, (), (8,), (), 0).ob == (b"moved",)
    assert sorted(Base.__ops__) == [0, 1]


# ----------------------------------------------------------------- 4. op()'s arguments
@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"ib": 4}, "ib is a tuple of sizes (int or None), e.g. ib=(4,)"),
        ({"ob": 8}, "ob is a tuple of sizes (int or None), e.g. ob=(4,)"),
        ({"ib": b"\x04"}, "ib is a tuple of sizes"),
        ({"ib": (-1,)}, "ib[0] is -1; a size is an int in 0..0xffffffff or None"),
        ({"ob": (4, "8")}, "ob[1] is '8'; a size is an int"),
        ({"ib": (True,)}, "ib[0] is True"),
        ({"ib": (1 << 32,)}, "ib[0] is 4294967296"),
        ({"ib": (None,) * 16}, "at most 15 ib arguments"),
        ({"io": -1}, "io is a number of objects, an int in 0..15"),
        ({"oo": 16}, "oo is a number of objects, an int in 0..15"),
        ({"oo": "1"}, "oo is a number of objects"),
        ({"io": 1.0}, "io is a number of objects"),
    ],
)
def test_op_arguments_are_checked_and_explained(kwargs: dict[str, object], says: str) -> None:
    with pytest.raises(UsageError) as exc:
        op(0, **kwargs)  # type: ignore[arg-type]
    assert says in str(exc.value)
    assert str(exc.value).startswith("@op(0): ")


@pytest.mark.parametrize("number", [-1, 0x10000, 1 << 32, True, "0", 1.0])
def test_op_numbers_are_16_bits(number: object) -> None:
    """qtee-kernel.md §3.5: an op with a bit above 15 is EINVAL at the ioctl."""
    with pytest.raises(UsageError, match=r"an op number is an int in 0\.\.0xfffd"):
        op(number)  # type: ignore[arg-type]


@pytest.mark.parametrize("number", [0xFFFE, 0xFFFF])
def test_retain_and_release_are_no_op_numbers(number: int) -> None:
    with pytest.raises(UsageError, match="reserved for retain/release"):
        op(number)


# ----------------------------------------------------------------- 5. signatures
@pytest.mark.parametrize(
    ("decl", "source"),
    [
        ({"ib": (4,)}, "def f(self): ..."),
        ({"io": 2}, "def f(self, a): ..."),
        ({}, "def f(self, a): ..."),
        ({"ib": (4,)}, "def f(): ..."),
        ({"ib": (4,), "ob": (4,), "capacities": True}, "def f(self, *, capacities): ..."),
    ],
)
def test_a_method_that_cannot_take_its_arguments_is_refused(
    decl: dict[str, object], source: str
) -> None:
    space: dict[str, object] = {}
    exec(source, space)
    with pytest.raises(UsageError) as exc:
        op(0, **decl)(space["f"])  # type: ignore[arg-type]
    text = str(exc.value)
    assert "cannot be op 0's method: dispatch calls it with self and" in text


def test_the_refusal_says_what_dispatch_passes() -> None:
    with pytest.raises(UsageError) as exc:

        class Narrow(PyObject):
            @op(3, ib=(4, None), io=1)
            def f(self, a: bytes) -> None: ...

    assert str(exc.value) == (
        "test_the_refusal_says_what_dispatch_passes.<locals>.Narrow.f(self, a: 'bytes') -> "
        "'None' cannot be op 3's method: dispatch calls it with self and ib[0], ib[1], io[0] "
        "(too many positional arguments)"
    )


@pytest.mark.parametrize(
    "source",
    [
        "def f(self, a, b): ...",
        "def f(self, *args): ...",
        "def f(self, a, b, c=None): ...",
        "def f(self, *args, **kw): ...",
    ],
)
def test_signatures_that_fit_are_accepted(source: str) -> None:
    space: dict[str, object] = {}
    exec(source, space)
    fn = op(0, ib=(4,), io=1)(space["f"])  # type: ignore[arg-type]
    assert fn is space["f"]


# ----------------------------------------------------------------- errno text
@MODES
def test_an_errno_from_the_server_is_said_once(qtee_client: Client) -> None:
    """An errno across the socket used to read ``[EINVAL] Invalid argument: Invalid
    argument``; the strerror is said once (with the driver's detail where it has one)."""
    with pytest.raises(DriverError) as exc:
        qtee_client.ctx.ioctl(uapi.TEE_IOC_OBJECT_INVOKE, bytearray(16))
    assert exc.value.code == 22
    text = str(exc.value)
    assert text.startswith("[EINVAL] Invalid argument")
    assert text.count("Invalid argument") == 1
