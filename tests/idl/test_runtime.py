"""objects.idl.runtime: stubs and skeletons built from IDL records at run time.

Issue 19 point 4: each interface gives a stub (typed methods over an ``ObjRef`` or a
secure-side ``NsObject``) and a skeleton (a base class for a ``TrustedApp`` or a
``CallbackObject``, its op table from the IDL: wrong counts or fixed sizes -> INVALID),
errors as named constants.  The end-to-end tests cross the model with the plugin's
fixtures; its leak check then asserts every reference came back to zero.
"""

from __future__ import annotations

import inspect
import struct
import warnings
from pathlib import Path
from typing import Any

import pytest

from objects import PyObject, QteeError, UsageError
from objects.idl import IdlWarning, load, parse_idl
from objects.idl.runtime import Namespace, namespace
from qtee import CallbackObject, Client, ObjRef
from qtee._pytest_fixtures import AppLoaderHelper
from tests.idl._itest_impl import suite

DATA = Path(__file__).parent / "data"
SUCCESS_FLAG = 0xDEAD


def _itest() -> Namespace:
    """The compiler's tests/idl/ITest3.idl (and the ITest.idl it includes), as read."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IdlWarning)  # `break`, `switch`, `delete`
        return load(DATA / "ITest3.idl")


NS = _itest()
IMPLS = suite(NS)
TRUTH = IMPLS.suite.TRUTH
#: ITest1 after the compiler's test1.rs, both ends local (tests/idl/_itest_impl.py).
One = IMPLS.ITest1Local


def test_namespace_shape() -> None:
    """Issue 19 point 4: errors as an IntEnum named after the interface (each named as
    declared, from 10, inherited numbering), consts as attributes, op numbers, stub
    methods typed by the IDL's parameters (output arrays' capacities as ``<name>_len``)."""
    it1 = NS.ITest1
    assert it1.Errors.__name__ == "ITest1"
    assert [(e.name, e.value) for e in it1.Errors] == [
        ("CUSTOM_1", 10),
        ("CUSTOM_ME_ARE_TWO", 11),
        ("MISMATCH", 12),
    ]
    assert it1.MISMATCH is it1.Errors.MISMATCH
    assert NS.SUCCESS_FLAG == SUCCESS_FLAG
    assert (it1.OP_add_1000, it1.OP_no_args, it1.OP_derive_v2p2) == (0, 20, 26)
    assert [(e.name, e.value) for e in NS.ITest3.Errors] == [(e.name, e.value) for e in it1.Errors]
    sig = inspect.signature(it1.Stub.multiple_primitive)
    assert list(sig.parameters) == [
        "self", "unused", "input", "unused3", "input2", "unused2_len", "unused5_len",
    ]  # fmt: skip
    spec = One.__ops__[9]
    assert (spec.ib, spec.ob, spec.io, spec.oo) == ((6, None), (10, None, None), 1, 1)
    ic = namespace(parse_idl("interface IC { const uint32 LIMIT = 7; method m(); };", "c.idl"))
    assert (ic.IC.LIMIT, ic.IC.OP_m) == (7, 0)


def test_skeleton_refuses_what_the_c_skeleton_refuses() -> None:
    """invoke.rs: wrong counts or a fixed-size buffer of another size -> ERROR_INVALID,
    the method not called; a method left unimplemented answers ERROR_INVALID."""
    one = One()
    assert one.dispatch(0, (b"\x01\x00\x00\x00",), (4,), (), 0).ob == (struct.pack("<I", 1001),)
    assert one.dispatch(0, (b"\x01\x00\x00",), (4,), (), 0).result == 2
    assert one.dispatch(0, (b"\x01\x00\x00\x00",), (8,), (), 0).result == 2
    assert one.dispatch(0, (b"\x01\x00\x00\x00",), (4,), (None,), 0).result == 2
    assert one.dispatch(NS.ITest1.OP_no_args, (), (), (), 1).result == 2

    class Lazy(NS.ITest1.Skeleton):  # type: ignore[misc, name-defined]
        pass

    res = Lazy().dispatch(NS.ITest1.OP_no_args, (), (), (), 0)
    assert (res.result, res.detail) == (2, "Lazy.no_args is not implemented")


def test_output_longer_than_capacity_is_size_out() -> None:
    """_optable: an output array longer than the caller's capacity is ERROR_SIZE_OUT
    (Mink's answer for an output that does not fit); a capacity the stub cannot send,
    or a missing one, is the caller's UsageError before anything is invoked."""

    class Greedy(One):
        def single_primitive_in(self, unused: bytes, input: int, *, unused2_len: int) -> bytes:
            return b"x" * (unused2_len + 1)

    stub = NS.ITest1.Stub(Greedy())
    with pytest.raises(QteeError) as exc:
        stub.single_primitive_in(b"", SUCCESS_FLAG, unused2_len=2)
    assert exc.value.result == 4
    with pytest.raises(UsageError, match="length of unused2"):
        stub.single_primitive_in(b"", SUCCESS_FLAG, unused2_len=-1)
    with pytest.raises(UsageError, match="unused2_len"):
        stub.single_primitive_in(b"", SUCCESS_FLAG)


def test_stub_refuses_what_cannot_be_invoked() -> None:
    """A stub needs an object with a calling convention it knows."""
    with pytest.raises(UsageError, match="invoke"):
        NS.ITest1.Stub(object())


# ------------------------------------------------------------------ across the model
@pytest.mark.qtee_ta("itest2", IMPLS.ITest2Ta)
def test_stub_errors_from_qtee_are_named(qtee_client: Client, qtee_app: AppLoaderHelper) -> None:
    """A result from across the model is raised by the interface's name (ITest2 has
    my_custom_error = 10; a wrong op count through a raw ObjRef is ERROR_INVALID)."""
    app = qtee_app("itest2")
    with pytest.raises(QteeError) as exc:
        app.invoke(0)  # entrypoint without its object: the skeleton refuses the counts
    assert exc.value.result == 2
    assert NS.ITest2.my_custom_error == 10


def test_struct_classes_and_local_skeleton_is_a_pyobject() -> None:
    """Structs are frozen dataclasses named after them; a skeleton is a PyObject."""
    assert NS.Collection.__name__ == "Collection"
    assert issubclass(NS.ITest1.Skeleton, PyObject)
    with pytest.raises(AttributeError):
        TRUTH.a = 5


def test_classes_are_named_after_the_file_that_declares_them() -> None:
    """Reprs name the IDL file as the module (``ITest.Collection``, ``ITest3.ITest3.Stub``)
    where they said ``types`` or ``objects.idl.runtime``: the module ``qtee idl gen``
    writes for that file."""
    assert repr(NS.Collection) == "<class 'ITest.Collection'>"
    assert repr(NS.ITest3) == "<class 'ITest3.ITest3'>"
    assert repr(NS.ITest3.Stub) == "<class 'ITest3.ITest3.Stub'>"
    assert repr(NS.ITest3.Skeleton) == "<class 'ITest3.ITest3.Skeleton'>"
    assert NS.ITest1.Errors.__module__ == "ITest"


# ------------------------------------------------------------------ from the IDL file
@pytest.fixture(scope="module")
def itest() -> Namespace:
    from objects.idl import IdlWarning, load

    with pytest.warns(IdlWarning):  # `break`, `switch`, `delete`: renamed keywords
        return load(DATA / "ITest.idl")


def test_load_the_compilers_itest(itest: Namespace) -> None:
    """Issue 19 acceptance: the compiler's tests/idl/ITest.idl loads; its layouts follow
    the C backend's rules: ``bundled_with_unbundled`` bundles the small struct with the
    uint32 (8 bytes) before the big Collection (24); ``primitive_array_in_struct``'s
    out bundle puts the uint32 (align 4) before ArrInStruct (8 bytes, align 2);
    ``test_obj_array_in`` sends three objects."""
    lay = itest.ITest1.Stub.LAYOUTS
    assert lay["bundled_with_unbundled"].ib_sizes == (8, 24)
    assert lay["primitive_array_in_struct"].ob_sizes == (12,)
    assert [p.name for p in lay["primitive_array_in_struct"].bo[0].params] == [
        "input_b",
        "input_a",
    ]
    assert lay["test_obj_array_in"].counts == (0, 1, 3, 0)
    assert lay["objects_in_struct"].counts == (1, 1, 3, 3)
    assert itest.ITest1.OP_derive_v2p2 == lay["derive_v2p2"].op
    assert itest.ITest2.my_custom_error == 10
    assert itest.SUCCESS_FLAG == 0xDEAD
    assert itest._break(switch=1).switch == 1


def test_itest_file_round_trip(itest: Namespace) -> None:
    """Objects in structs, object arrays, structs holding arrays of structs and a float64
    travel through the stub and back out of the skeleton."""
    ns = itest

    class Impl(ns.ITest1.Skeleton):  # type: ignore[misc, name-defined]
        def test_obj_array_in(self, o_in: tuple[Any, ...]) -> int:
            return sum(o is not None for o in o_in)

        def test_obj_array_out(self) -> tuple[tuple[Any, ...], int]:
            return (self, None, self), 2

        def objects_in_struct(self, input: Any) -> Any:
            return input

        def primitive_array_in_struct(self) -> tuple[Any, int]:
            f2 = (ns.F2(a=9, b=7), ns.F2(a=8, b=9))
            return ns.ArrInStruct(a=(7, 8), c=f2, d=0xDEAD), 0xDEAD

        def delete(self, key: float) -> None:
            if key != 2.5:
                raise QteeError(ns.ITest1.MISMATCH)

    impl = Impl()
    stub = ns.ITest1.Stub(impl)
    assert stub.test_obj_array_in((impl, None, impl)) == 2
    objs, n = stub.test_obj_array_out()
    assert n == 2 and [type(o).__qualname__ for o in objs if o] == ["ITest1.Stub"] * 2
    assert objs[1] is None and objs[0].obj is impl
    inner = ns.ObjInStruct(p1=(1, 2, 3, 4), first_obj=impl, p2=(0,) * 4,
                           should_be_empty=None, p3=(5,) * 4, second_obj=impl)  # fmt: skip
    assert stub.objects_in_struct(inner) == inner
    arr, magic = stub.primitive_array_in_struct()
    assert (arr.a, arr.c[1].b, arr.d, magic) == ((7, 8), 9, 0xDEAD, 0xDEAD)
    stub.delete(2.5)
    with pytest.raises(QteeError, match=r"ITest1\.MISMATCH"):
        stub.delete(1.0)


def test_readme_example(tmp_path: Any) -> None:
    """The README's "Interfaces from IDL" example, as written there."""
    from objects.idl import load

    (tmp_path / "IGreeter.idl").write_text(
        "interface IGreeter {\n"
        "  error ERROR_TOO_LONG;\n"
        "  method greet(in buffer name, out buffer greeting);\n"
        "};\n"
    )
    idl = load(tmp_path / "IGreeter.idl")

    class Greeter(idl.IGreeter.Skeleton, CallbackObject):  # type: ignore[misc, name-defined]
        def greet(self, name: bytes, *, greeting_len: int) -> bytes:
            if len(name) > 16:
                raise QteeError(idl.IGreeter.ERROR_TOO_LONG)
            return b"hello " + name

    greeter = idl.IGreeter.Stub(Greeter())  # a local object: no TEE needed
    assert greeter.greet(b"mink", greeting_len=64) == b"hello mink"
    with pytest.raises(QteeError, match=r"IGreeter\.ERROR_TOO_LONG"):
        greeter.greet(b"x" * 17, greeting_len=64)


SERVICES_IDL = """\
interface IAppController {
  error ERROR_INVALID;
  error ERROR_UNLOADED;
  method openSession(in uint32 cancelCode);
  method unload();
  method getAppObject(out interface obj);
};

interface IAppLoader {
  error ERROR_INVALID_BUFFER;
  method loadFromBuffer(in buffer appElf, out IAppController appController);
};

interface IClientEnv {
  method open(in uint32 uid, out interface obj);
};
"""


@pytest.mark.qtee_modes("in-process", "server")
@pytest.mark.qtee_ta("itest1", IMPLS.ITest1Ta)
def test_stubs_drive_the_models_own_services(qtee_env: ObjRef) -> None:
    """Stubs over the client's ObjRefs agree with the model's hand-written op tables
    (quic-teec.md §5.3: IClientEnv.open, IAppLoader.loadFromBuffer, IAppController's
    unload and getAppObject), an output object of a named interface comes back as its
    stub, a service error by its IDL name; every handle released."""
    from objects.idl import parse_idl
    from qtee import ta_image

    svc = namespace(parse_idl(SERVICES_IDL, "services.idl"))
    env = svc.IClientEnv.Stub(qtee_env)
    with svc.IAppLoader.Stub(env.open(3)) as loader:
        with pytest.raises(QteeError) as exc:
            loader.loadFromBuffer(b"junk")
        assert (exc.value.result, exc.value.name) == (10, "IAppLoader.ERROR_INVALID_BUFFER")
        with loader.loadFromBuffer(ta_image("itest1")) as ctrl:
            assert type(ctrl).__qualname__ == "IAppController.Stub"
            with NS.ITest1.Stub(ctrl.getAppObject()) as one:
                assert one.add_1000(1) == 1001
            ctrl.unload()


def test_error_names_are_the_c_backends() -> None:
    """Issue 19 point 3 ("identical to the C backend"): the C backend writes ``error X;``
    of IFoo as ``#define IFoo_X``, so the Python name is ``IFoo.X`` with no prefix added:
    IDiagnostics.h's ``IDiagnostics_ERROR_APP_NOT_FOUND`` is
    ``IDiagnostics.ERROR_APP_NOT_FOUND``."""
    from importlib.resources import as_file, files

    from objects.idl import load

    with as_file(files("qtee") / "idl" / "IDiagnostics.idl") as path:
        diag = load(path).IDiagnostics
    assert [(e.name, e.value) for e in diag.Errors] == [
        ("ERROR_APP_NOT_FOUND", 10),
        ("ERROR_ARCH_NOT_SUPPORTED", 11),
        ("ERROR_RESTRICTED", 12),
    ]
