"""Errors that say what went wrong (issue 15, "Errors that say what went wrong").

A failed invocation raises a ``QteeError`` that names the interface error
(``IAppLoader.ERROR_METADATA_INVALID``, not ``USERBASE+3``) and carries the secure side's
reason ("no TA named 'kv.stor' (registered TAs: ...)", "op 7 not in Adder's table",
"ib[0] is 5 bytes, op 0 takes 8"), in process, over a device server and from a guest.
The name and the reason are model-only: the result on the wire and in ``ret`` is the
number QTEE answers (qtee-kernel.md §3.6, quic-teec.md §5.2-§5.3).
"""

from __future__ import annotations

import enum
import pickle
import re
import struct
import threading

import pytest

import qtee
import qtee.secure
from objects import DispatchResult, PyObject, QteeError, UsageError, op, result_name
from qtee import OUT_OBJECT, Client, Out, Result, _reason
from qtee._remote.frames import (
    MAX_WHY_DETAIL,
    FrameDecoder,
    FrameError,
    IoctlReply,
    encode,
    encode_reply,
)
from qtee.secure import (
    IIO,
    IAppController,
    IAppLoader,
    IDiagnostics,
    IGPAppClient,
    IGPSession,
    IOpener,
    IRegisterListenerCBO,
    IRegisterTABufCBO,
    TrustedApp,
    _apps,
    _gpclient,
    _listeners,
    _services,
    ta_image,
)
from tests._tas import Adder

MODES = pytest.mark.qtee_modes("in-process", "server", "guest")
#: The loader's reason for an image naming no registered TA: the names registered (the
#: test's, and the process's, which other test modules' imports add to), how to add one.
NO_KV_STOR = re.compile(
    r"no TA named 'kv\.stor' \(registered TAs: (?P<names>[^)]*)\); "
    r"@pytest\.mark\.qtee_ta\(name, cls\), device\.register_ta\(name, cls\) or "
    r"qtee\.register_ta\(name, cls\) registers one"
)


def _names_of_no_kv_stor(detail: str) -> list[str]:
    """The registered names a NO_KV_STOR detail lists (fails on any other detail)."""
    m = NO_KV_STOR.fullmatch(detail)
    assert m is not None, detail
    return m["names"].split(", ")


class KvError(enum.IntEnum):
    """A TA author's own interface errors."""

    ERROR_NO_KEY = 10
    ERROR_FULL = 11


class KvStore(TrustedApp):
    """A TA that declares its errors: plain numbers and members are both named."""

    ERRORS = KvError

    @op(0, ib=(None,), ob=(None,))
    def get(self, key: bytes) -> bytes:
        raise QteeError(10, f"no key {key.decode()!r}")

    @op(1, ib=(None, None))
    def put(self, key: bytes, value: bytes) -> None:
        raise QteeError(KvError.ERROR_FULL, f"{len(value)} bytes do not fit")

    @op(2)
    def unnamed(self) -> None:
        raise QteeError(42, "a code KvError does not have")

    @op(3)
    def crash(self) -> None:
        raise ZeroDivisionError("division by zero")


# --------------------------------------------------------------------------- the enums


@pytest.mark.parametrize(
    ("enum_cls", "values"),
    [
        (
            IAppLoader,
            {
                "ERROR_INVALID_BUFFER": 10,
                "ERROR_METADATA_INVALID": 13,
                "ERROR_APP_UNTRUSTED_CLIENT": 21,
            },
        ),
        (
            IAppController,
            {"ERROR_APP_SUSPENDED": 10, "ERROR_APP_UNLOADED": 12, "ERROR_APP_IN_USE": 13},
        ),
        (IOpener, {"ERROR_NOT_FOUND": 10, "ERROR_PRIVILEGE": 11, "ERROR_NOT_SUPPORTED": 12}),
        (IIO, {"ERROR_OFFSET_OUT_OF_BOUNDS": 10, "ERROR_INVALID_BUFFER_AND_OFFSET": 12}),
        (IDiagnostics, {"ERROR_APP_NOT_FOUND": 10, "ERROR_RESTRICTED": 12}),
        (
            IRegisterListenerCBO,
            {
                "ERROR_MAX_REGISTERED": 10,
                "ERROR_ID_RESERVED": 13,
                "ERROR_REG_NOT_ALLOWED_FROM_CURRENT_VM": 14,
            },
        ),
        (IRegisterTABufCBO, {"ERROR_ALREADY_REGISTERED": 10}),
        (
            IGPAppClient,
            {"ERROR_INVALID_UUID_LEN": 10, "ERROR_APP_NOT_FOUND": 11, "ERROR_ACCESS_DENIED": 16},
        ),
        (IGPSession, {"ERROR_CLOSED": 10}),
    ],
)
def test_every_interface_has_its_errors_as_a_public_enum(
    enum_cls: type[enum.IntEnum], values: dict[str, int]
) -> None:
    """quic-teec.md §5.3: each interface's errors, numbered from 10, under their IDL names,
    exported from ``qtee.secure`` and ``qtee``."""
    assert issubclass(enum_cls, enum.IntEnum)
    assert getattr(qtee, enum_cls.__name__) is enum_cls
    assert getattr(qtee.secure, enum_cls.__name__) is enum_cls
    for name, value in values.items():
        assert enum_cls[name] == value
    assert min(enum_cls) == 10
    assert all(m.name.startswith("ERROR_") for m in enum_cls)


def test_the_old_constant_names_are_the_enum_members() -> None:
    """The Final names from before the enums keep their values (nothing breaks)."""
    assert _apps.ERROR_INVALID_BUFFER is IAppLoader.ERROR_INVALID_BUFFER == 10
    assert _apps.ERROR_METADATA_INVALID is IAppLoader.ERROR_METADATA_INVALID == 13
    assert _apps.ERROR_ALREADY_LOADED is IAppLoader.ERROR_ALREADY_LOADED == 16
    assert _apps.ERROR_EMBEDDED_IMAGE_NOT_FOUND is IAppLoader.ERROR_EMBEDDED_IMAGE_NOT_FOUND
    assert _apps.ERROR_APP_UNLOADED is IAppController.ERROR_APP_UNLOADED == 12
    assert _services.IOPENER_ERROR_NOT_FOUND is IOpener.ERROR_NOT_FOUND
    assert qtee.secure.IOPENER_ERROR_NOT_FOUND == 10
    assert _listeners.ERROR_MAX_REGISTERED is IRegisterListenerCBO.ERROR_MAX_REGISTERED
    assert _listeners.ERROR_ALIGNMENT == 11 and _listeners.ERROR_ID_IN_USE == 12
    assert _listeners.ERROR_ID_RESERVED == 13
    assert _listeners.ERROR_ALREADY_REGISTERED is IRegisterTABufCBO.ERROR_ALREADY_REGISTERED
    assert _gpclient.IGPAPPCLIENT_ERROR_INVALID_UUID_LEN is IGPAppClient.ERROR_INVALID_UUID_LEN
    assert _gpclient.IGPAPPCLIENT_ERROR_APP_NOT_FOUND == 11
    assert _gpclient.IGPAPPCLIENT_ERROR_ACCESS_DENIED == 16
    assert _gpclient.IGPSESSION_ERROR_CLOSED is IGPSession.ERROR_CLOSED


def test_qtee_error_names_an_interface_error() -> None:
    """A member of an interface's enum names itself; a generic result keeps its name;
    ``result_name`` still works; pickling keeps result, detail and name."""
    e = QteeError(IAppLoader.ERROR_INVALID_BUFFER, "not a TA image")
    assert e.result == 10 and e.name == "IAppLoader.ERROR_INVALID_BUFFER"
    assert str(e) == "QTEE result 10 (IAppLoader.ERROR_INVALID_BUFFER): not a TA image"
    assert str(QteeError(Result.ERROR_INVALID)) == "QTEE result 2 (ERROR_INVALID)"
    assert QteeError(13).name == "USERBASE+3" == result_name(13)
    given = QteeError(13, "why", name="IMine.ERROR_X")
    assert str(given) == "QTEE result 13 (IMine.ERROR_X): why"
    for exc in (e, given, QteeError(-96, "gone")):
        back = pickle.loads(pickle.dumps(exc))
        assert (back.result, back.detail, back.name) == (exc.result, exc.detail, exc.name)


@pytest.mark.parametrize(
    ("errors", "why"),
    [
        (dict, "must be an IntEnum"),
        (enum.IntEnum("Low", {"ERROR_LOW": 2}), "ERROR_LOW = 2 is not an interface error"),
        (enum.IntEnum("Neg", {"ERROR_NEG": -5}), "ERROR_NEG = -5 is not an interface error"),
    ],
)
def test_errors_must_be_an_intenum_of_interface_errors(errors: object, why: str) -> None:
    """Interface errors are numbered from 10 (quic-teec.md §5.2)."""
    with pytest.raises(UsageError, match=why):
        type("Bad", (PyObject,), {"ERRORS": errors})


# --------------------------------------------------------------------------- in every mode


@MODES
@pytest.mark.qtee_ta("adder", Adder)
def test_loader_errors_are_named_with_their_reason(
    qtee_client: Client, qtee_env: qtee.ObjRef
) -> None:
    """Issue 15: ``IAppLoader.ERROR_INVALID_BUFFER`` with the loader's reason, not
    ``USERBASE+...``; the result is still the IDL number."""
    with qtee_client.open_service(qtee_env, 3) as loader:
        with pytest.raises(QteeError) as exc:
            loader.invoke(0, ta_image("kv.stor"), OUT_OBJECT)
        assert exc.value.result == 13
        assert exc.value.name == "IAppLoader.ERROR_METADATA_INVALID"
        assert "adder" in _names_of_no_kv_stor(exc.value.detail)
        assert str(exc.value) == (
            f"QTEE result 13 (IAppLoader.ERROR_METADATA_INVALID): {exc.value.detail}"
        )
        with pytest.raises(QteeError) as exc:
            loader.invoke(0, b"junk", OUT_OBJECT)
        assert (exc.value.result, exc.value.name) == (10, "IAppLoader.ERROR_INVALID_BUFFER")
        assert exc.value.detail.startswith("no TA is registered for this 4-byte image")
        with pytest.raises(QteeError) as exc:
            loader.invoke(2, b"kv.stor", OUT_OBJECT)
        assert exc.value.name == "IAppLoader.ERROR_EMBEDDED_IMAGE_NOT_FOUND"
        (ctrl,) = loader.invoke(0, ta_image("adder"), OUT_OBJECT)
        with ctrl:
            with pytest.raises(QteeError) as exc:
                loader.invoke(0, ta_image("adder"), OUT_OBJECT)
            assert exc.value.name == "IAppLoader.ERROR_ALREADY_LOADED"
            assert exc.value.detail == "adder is already loaded"
            ctrl.invoke(1)  # unload
            with pytest.raises(QteeError) as exc:
                ctrl.invoke(2, OUT_OBJECT)
            assert (exc.value.result, exc.value.name) == (12, "IAppController.ERROR_APP_UNLOADED")
            assert exc.value.detail == "adder was unloaded"
    with pytest.raises(QteeError) as exc:
        qtee_client.open_service(qtee_env, 999)
    assert str(exc.value) == "QTEE result 10 (IOpener.ERROR_NOT_FOUND): no service with UID 999"


@MODES
@pytest.mark.qtee_ta("adder", Adder)
@pytest.mark.parametrize(
    ("args", "detail"),
    [
        ((7,), "op 7 not in Adder's table (ops: 0)"),
        ((0, b"12345", Out(4)), "ib[0] is 5 bytes, op 0 (add) takes 8"),
        ((0, bytes(8), Out(8)), "ob[0] has room for 8 bytes, op 0 (add) gives 4"),
        ((0, bytes(8)), "op 0 (add) takes 1 output buffer, not 0"),
        ((0, bytes(8), bytes(8), Out(4)), "op 0 (add) takes 1 input buffer, not 2"),
        ((0, bytes(8), Out(4), None), "op 0 (add) takes 0 input objects, not 1"),
        ((0, bytes(8), Out(4), OUT_OBJECT), "op 0 (add) takes 0 output objects, not 1"),
    ],
)
def test_op_table_checks_say_which_one_failed(
    qtee_app: qtee.pytest_plugin.AppLoaderHelper, args: tuple[object, ...], detail: str
) -> None:
    """quic-teec.md §5.2: the skeleton's checks answer ERROR_INVALID (2) without calling
    the method; the reason names the check."""
    app = qtee_app("adder")
    with pytest.raises(QteeError) as exc:
        app.invoke(*args)
    assert (exc.value.result, exc.value.name, exc.value.detail) == (2, "ERROR_INVALID", detail)
    assert app.invoke(0, struct.pack("<II", 2, 3), Out(4)) == [struct.pack("<I", 5)]


@MODES
@pytest.mark.qtee_ta("kv", KvStore)
def test_a_ta_declares_its_own_errors(qtee_app: qtee.pytest_plugin.AppLoaderHelper) -> None:
    """A TA's ``ERRORS`` enum names what it raises, as a number or as a member; a number
    it does not have keeps the generic name; a crash is ERROR with the exception."""
    app = qtee_app("kv")
    with pytest.raises(QteeError) as exc:
        app.invoke(0, b"k1", Out(16))
    assert str(exc.value) == "QTEE result 10 (KvError.ERROR_NO_KEY): no key 'k1'"
    with pytest.raises(QteeError) as exc:
        app.invoke(1, b"k", b"v" * 9)
    assert (exc.value.result, exc.value.name) == (11, "KvError.ERROR_FULL")
    assert exc.value.detail == "9 bytes do not fit"
    with pytest.raises(QteeError) as exc:
        app.invoke(2)
    assert (exc.value.result, exc.value.name) == (42, "USERBASE+32")
    with pytest.raises(QteeError) as exc:
        app.invoke(3)
    assert (exc.value.result, exc.value.name) == (1, "ERROR")
    assert exc.value.detail == "KvStore.crash raised ZeroDivisionError: division by zero"


# --------------------------------------------------------------------------- model-only


@pytest.mark.qtee_ta("adder", Adder)
def test_the_reason_never_changes_the_wire(
    monkeypatch: pytest.MonkeyPatch, qtee_device: qtee.Device
) -> None:
    """The same failing calls with the secure side's notes switched off give the same
    inbound bytes and the same results: the reason is the model's alone (QK §3.6)."""
    world = qtee_device.world
    real = world.invoke
    runs = []
    for noting in (True, False):
        if not noting:
            monkeypatch.setattr(_reason, "note", lambda *a, **k: None)
        seen: list[tuple[bytes, int]] = []

        def invoke(inbound, outbound, serve, seen=seen):  # type: ignore[no-untyped-def]
            result = real(inbound, outbound, serve)
            seen.append((bytes(inbound), result))  # the message as QTEE left it
            return result

        monkeypatch.setattr(world, "invoke", invoke)
        with (
            Client(qtee_device) as client,
            client.client_env() as env,
            client.open_service(env, 3) as loader,
        ):
            with pytest.raises(QteeError):
                loader.invoke(0, ta_image("kv.stor"), OUT_OBJECT)
            (ctrl,) = loader.invoke(0, ta_image("adder"), OUT_OBJECT)
            with ctrl:
                (app,) = ctrl.invoke(2, OUT_OBJECT)
                with app, pytest.raises(QteeError) as exc:
                    app.invoke(0, b"12345", Out(4))
                ctrl.invoke(1)
        assert exc.value.detail == ("ib[0] is 5 bytes, op 0 (add) takes 8" if noting else "")
        runs.append([(data, result) for data, result in seen if result])
    assert runs[0] == runs[1]
    assert [result for _, result in runs[0]] == [13, Result.ERROR_INVALID]


def test_a_note_for_another_result_or_call_is_not_used(qtee_device: qtee.Device) -> None:
    """The client clears the thread's note before each invoke and uses one only for the
    result ``ret`` carries."""
    _reason.note(13, "IStale.ERROR_OLD", "stale")
    assert str(_reason.error_for(2)) == "QTEE result 2 (ERROR_INVALID)"
    _reason.note(-96, "IStale.ERROR_OLD", "stale")
    assert _reason.error_for(0xFFFF_FFA0).detail == "stale"  # ret is the u32 form
    _reason.note(13, "IStale.ERROR_OLD", "stale")
    with Client(qtee_device) as client, client.client_env():
        pass
    assert _reason.take() is None


def test_notes_are_per_thread() -> None:
    """A note lives on the thread the secure side answered on."""
    _reason.note(13, "A", "here")
    other: list[object] = []
    t = threading.Thread(target=lambda: other.append(_reason.take()))
    t.start()
    t.join()
    assert other == [None]
    assert _reason.take() == _reason.Reason(13, "A", "here")
    assert _reason.take() is None


def test_dispatch_result_carries_name_and_detail() -> None:
    """A failed dispatch names its result; a successful one carries no reason."""
    res = Adder().dispatch(0, (b"1",), (4,), (), 0)
    assert res == DispatchResult(2, (), (), "ERROR_INVALID", "ib[0] is 1 byte, op 0 (add) takes 8")
    ok = Adder().dispatch(0, (bytes(8),), (4,), (), 0)
    assert (ok.name, ok.detail) == ("", "")


# --------------------------------------------------------------------------- the frame


WHY = (
    13,
    "IAppLoader.ERROR_METADATA_INVALID",
    "no TA named 'kv.stor' (registered TAs: none); @pytest.mark.qtee_ta(name, cls), "
    "device.register_ta(name, cls) or qtee.register_ta(name, cls) registers one",
)


def test_reply_why_round_trips_and_is_optional() -> None:
    """Frame protocol 4: ``reply.why`` is optional; a reply without it has exactly the old
    keys; with it, the record and the fast encoder give the same bytes."""
    frame = encode(IoctlReply(seq=7, arg=b"ab", why=WHY))
    assert frame == encode_reply(7, 0, b"ab", why=WHY)
    dec = FrameDecoder()
    dec.feed(frame + encode_reply(8, 0, b"ab"))
    first, second = dec.next_message(), dec.next_message()
    assert first == IoctlReply(seq=7, arg=b"ab", why=WHY)
    assert second == IoctlReply(seq=8, arg=b"ab") and second.why is None
    assert b"why" not in encode_reply(8, 0, b"ab")


@pytest.mark.parametrize(
    ("why", "match"),
    [
        ((0, "", ""), "non-zero s32"),
        ((1 << 31, "", ""), "non-zero s32"),
        ((2, b"x", ""), "must be a str"),
        ((2, "", "x" * (MAX_WHY_DETAIL + 1)), "over 1000 characters"),
        ((2, ""), r"\(result, name, detail\)"),
    ],
)
def test_a_bad_why_is_refused(why: object, match: str) -> None:
    """A why the sender cannot build is a UsageError; one the peer sends is a FrameError."""
    with pytest.raises(UsageError, match=match):
        IoctlReply(seq=1, why=why)  # type: ignore[arg-type]


def test_a_why_on_a_failed_reply_is_a_frame_error() -> None:
    """Nothing but the errno comes back from a failed ioctl (QK §1.5)."""
    import msgpack

    body = msgpack.packb(
        {
            "v": 4,
            "t": "reply",
            "seq": 1,
            "errno": 22,
            "arg": b"",
            "written": [],
            "why": {"result": 2, "name": "", "detail": ""},
        },
        use_bin_type=True,
    )
    dec = FrameDecoder()
    dec.feed(len(body).to_bytes(4, "big") + body)
    with pytest.raises(FrameError, match="has no why"):
        dec.next_message()


def test_the_server_sends_the_note_only_with_a_failed_invoke(
    monkeypatch: pytest.MonkeyPatch, qtee_server: qtee.DeviceServer
) -> None:
    """Over a served device the reason comes in the reply of the call that failed, and
    only there: the calls that succeed carry none."""
    put: list[_reason.Reason | None] = []
    real = _reason.put
    monkeypatch.setattr(_reason, "put", lambda r: (put.append(r), real(r)))
    with (
        Client(qtee.connect(qtee_server.path)) as client,
        client.client_env() as env,
        client.open_service(env, 3) as loader,
    ):
        with pytest.raises(QteeError) as exc:
            loader.invoke(0, ta_image("kv.stor"), OUT_OBJECT)
        assert exc.value.name == "IAppLoader.ERROR_METADATA_INVALID"
        assert _reason.take() is None  # the client took it
    assert [(r.result, r.name) for r in put] == [WHY[:2]]
    _names_of_no_kv_stor(put[0].detail)
