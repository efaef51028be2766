"""The compiler's own cross-backend suite, in Python: ITest1..ITest4 after its Rust tests.

Issue 19 acceptance: "ITest1 and ITest2 implemented in Python after the compiler's
test1.rs/test2.rs: ITest2's entry point in a TA drives ITest1 served by a client callback
object across the model, and the reverse; every check of the Rust test passes".

The compiler's ``tests/idl/ITest.idl`` and ``ITest3.idl`` (copied to ``data/``) are read
with ``read_idl`` and turned into Python two ways: ``objects.idl.load`` (a namespace at run
time, also with the legacy by-size packing order) and ``objects.idl.gen.generate`` (a
module written to ``tmp_path`` and imported).
The implementations (``_itest_impl.py``) subclass each one's skeletons; every test runs
over each, and the ones that cross the model in every mode of the plugin (in-process,
server, guest).  The plugin's leak check then asserts every reference came back to zero.

Checks, each a distinct assertion (paths in mink-idl-compiler/tests/src/):

``test_singular_object`` (``Suite.singular_object``), made on every ITest1 driven:
  implementation/mod.rs:390-392 None is BADOBJ; :393 single_in(SUCCESS_FLAG);
  :394-397 single_primitive_in with empty buffers; :398-410 multiple_primitive answers
  (SUCCESS_FLAG as u16, None, SUCCESS_FLAG as u64); :411-420 bundled_with_unbundled;
  :421-429 primitive_plus_struct_in; :430 in_struct(TRUTH); :431 in_small_struct(TRUTH2);
  :432 add_1000(5) == 1005; :433 struct_array_in([TRUTH, TRUTH]); :437 struct_array_out
  with room for 2; :438 its lenout is 2; :439 s_out[0] == TRUTH; :440 s_out[1] == TRUTH;
  :441 primitive_array_in_struct; :442 a == [7, 8]; :443 c[0] == F2{9, 7};
  :444 c[1] == F2{8, 9}; :445 d == SUCCESS_FLAG as u16; :446 magic == SUCCESS_FLAG;
  :448 single_out; :449-452 single_primitive_out; :453-461 primitive_plus_struct_out;
  :462 out_struct == TRUTH; :463 out_small_struct == TRUTH2; :465 well_documented_method;
  :467-472 api_version == IDLVersion(2, 0, 0) (1.0 for an ITest3 or ITest4).
``ITest2::entrypoint`` (``Suite.entrypoint``):
  implementation/test2.rs:330 test_singular_object(o); :332-337 test_obj_array_in([new(1),
  None, new(2)]) == SUCCESS_FLAG; :338 test_obj_array_out; :339 its flag; :340-342
  test_singular_object on each of its 3 objects; :344-354 objects_in_struct; :355 p1;
  :356 p2; :357 p3; :358 first_obj passes test_singular_object; :359 should_be_empty is
  None; :360 second_obj passes.
The ITest1 implementation's own checks (``ITest1Methods``), run when the driver calls it:
  implementation/test1.rs:194 test_obj_array_in runs test_singular_object on each object
  given; :217-224 objects_in_struct on first_obj and second_obj; :225 should_be_empty is
  None; :227-229 p1 (p2, p3) all SUCCESS_FLAG; and each MISMATCH refusal, one assertion
  each in ``test_itest1_refuses_what_the_rust_refuses``: :24-28 in_struct, :42-46
  in_small_struct, :61-65 single_in, :69-77 single_primitive_in, :99-101
  multiple_primitive (input, input2), :112-116 primitive_plus_struct_in, :148-152
  bundled_with_unbundled (each of its three), :160-165 struct_array_in, :182-185
  well_documented_method.
ITest3 (tests/main.rs:25-33, tests/c.rs:25-32, test1.rs:287-301): :27 single_in(0xdead) on
  an ITest3; test1.rs:296-298 extra_test3 == SUCCESS_FLAG; :28-33 api_version ==
  IDLVersion(1, 0, 0).  ITest4 has no Rust implementation: ours answers
  extra_test4 as extra_test3, to check two levels of inheritance through the stubs.
The drivers of tests/main.rs: :46-53 to_rust and :55-60 implementation_and_invoke (both
  ends local); :62-75 implementation_and_invoke_sync (10 threads on one ITest2 and one
  ITest1).

``api_version`` (mod.rs:467-472) is the compiler's version op, ``Object_OP_version``
(0x7FFF), which every backend generates: ``objects.idl.runtime`` answers it in every
skeleton and calls it from every stub (``test_api_version`` checks the op itself).
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from objects import ObjectResult, QteeError
from objects.idl import IdlWarning, load, read_idl
from objects.idl.gen import generate
from objects.idl.runtime import Namespace
from qtee import Client, ObjRef, register_ta, unregister_ta
from qtee._pytest_fixtures import AppLoaderHelper
from tests.idl._itest_impl import BADOBJ, Impls, idl_version, release, suite

DATA = Path(__file__).parent / "data"
MODES = ("in-process", "server", "guest")


def _read(name: str) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IdlWarning)  # `break`, `switch`, `delete`
        return read_idl(DATA / name)


@pytest.fixture(scope="module")
def loaded() -> Namespace:
    """ITest3.idl (which includes ITest.idl) through read_idl + load."""
    return load(_read("ITest3.idl"))


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """ITest3.idl through objects.idl.gen.generate, imported from the written file."""
    out = tmp_path_factory.mktemp("itest_gen")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IdlWarning)
        path = generate(DATA / "ITest3.idl", out)
    name = "_itest_generated_ITest3"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[name]


@pytest.fixture(scope="module", params=["load", "load-by-size", "gen"])
def impls(request: pytest.FixtureRequest, loaded: Namespace) -> Impls:
    """The implementations over the loaded namespace, the same packed in the legacy
    by-size order, then over the generated module."""
    if request.param == "load":
        return suite(loaded)
    if request.param == "load-by-size":
        return suite(load(_read("ITest3.idl"), by_size=True))
    return suite(request.getfixturevalue("generated"))


@pytest.fixture
def tas(impls: Impls) -> Iterator[Impls]:
    """The TAs of this namespace registered as itest1..itest4 for one test."""
    names = {
        "itest1": impls.ITest1Ta,
        "itest2": impls.ITest2Ta,
        "itest3": impls.ITest3Ta,
        "itest4": impls.ITest4Ta,
    }
    for name, cls in names.items():
        register_ta(name, cls)
    try:
        yield impls
    finally:
        for name in names:
            unregister_ta(name)


# ------------------------------------------------------------------ the files
def test_itest_files_load_and_generate(loaded: Namespace, generated: Any) -> None:
    """Issue 19 acceptance: the compiler's ITest.idl and ITest3.idl load and generate;
    both ways give the same op numbers and errors (ITest3 extends ITest1: its own method
    numbered after ITest1's 27; ITest4's after ITest3's)."""
    itest = load(_read("ITest.idl"))
    assert {"ITest1", "ITest2"} <= set(vars(itest)) and not hasattr(itest, "ITest3")
    for ns in (loaded, generated):
        assert ns.ITest1.OP_derive_v2p2 == 26
        assert ns.ITest3.OP_extra_test3 == 27
        assert ns.ITest4.OP_extra_test3 == 27 and ns.ITest4.OP_extra_test4 == 28
        assert ns.ITest2.OP_entrypoint == 0
        assert int(ns.ITest1.MISMATCH) == 12 and int(ns.ITest3.MISMATCH) == 12
        assert int(ns.ITest2.my_custom_error) == 10
        assert ns.SUCCESS_FLAG == 0xDEAD


# ------------------------------------------------------------------ both ends local
def test_to_rust_both_local(impls: Impls) -> None:
    """tests/main.rs:46-60 (to_rust, implementation_and_invoke): ITest2's entry point
    drives a local ITest1 (stub -> skeleton dispatch, both ways); mod.rs:390-392: no
    object is BADOBJ."""
    ns = impls.suite.ns
    ns.ITest2.Stub(impls.ITest2Local()).entrypoint(impls.ITest1Local())
    assert impls.suite.singular_object(None) == BADOBJ


def test_itest3_local(impls: Impls) -> None:
    """tests/main.rs:25-27 and test1.rs:287-301: an ITest3 answers ITest1's methods
    (every check of test_singular_object, through ITest3's stub and ITest1's; its
    api_version is its own, 1.0: main.rs:28-33) and extra_test3."""
    ns = impls.suite.ns
    three = ns.ITest3.Stub(impls.ITest3Local())
    assert three.single_in(0xDEAD) is None  # main.rs:27
    assert three.extra_test3() == impls.suite.SUCCESS_FLAG  # test1.rs:296-298
    assert impls.suite.singular_object(three, (1, 0)) == 0
    assert impls.suite.singular_object(ns.ITest1.Stub(three), (1, 0)) == 0


def test_invoke_sync_ten_threads(impls: Impls) -> None:
    """tests/main.rs:62-75 (implementation_and_invoke_sync): ten threads call one ITest2's
    entry point with one ITest1 at once; every call passes."""
    ns = impls.suite.ns
    two = ns.ITest2.Stub(impls.ITest2Local())
    one = impls.ITest1Local()
    assert _in_ten_threads(lambda: two.entrypoint(one)) == []


def _in_ten_threads(call: Callable[[], object]) -> list[BaseException]:
    """Run ``call`` in ten threads at once; what they raised."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def _mismatch(call: Any) -> None:
    with pytest.raises(QteeError) as exc:
        call()
    assert (exc.value.result, exc.value.name) == (12, "ITest1.MISMATCH")


def _refusals(impls: Impls, o: Any) -> None:
    """Each MISMATCH of test1.rs, one assertion each (the values the checks refuse)."""
    s = impls.suite
    ns = s.ns
    f = s.SUCCESS_FLAG
    bad = ns.Collection(a=0, b=1, c=2, d=4)
    _mismatch(lambda: o.in_struct(bad))  # test1.rs:24-28
    _mismatch(lambda: o.in_small_struct(ns.SingleEncapsulated(inner=1)))  # :42-46
    _mismatch(lambda: o.single_in(0xBEEF))  # :61-65
    _mismatch(lambda: o.single_primitive_in(b"", 0xBEEF, unused2_len=0))  # :69-77
    _mismatch(  # :99-101, input
        lambda: o.multiple_primitive(b"", 0xBEEF, None, f, unused2_len=0, unused5_len=0)
    )
    _mismatch(  # :99-101, input2
        lambda: o.multiple_primitive(b"", f, None, 0xBEEF, unused2_len=0, unused5_len=0)
    )
    _mismatch(lambda: o.primitive_plus_struct_in(ns.SingleEncapsulated(inner=1), f))  # :112
    _mismatch(lambda: o.primitive_plus_struct_in(ns.SingleEncapsulated(inner=f), 1))  # :112
    one = ns.SingleEncapsulated(inner=f)
    _mismatch(lambda: o.bundled_with_unbundled(ns.SingleEncapsulated(inner=1), f, s.TRUTH))
    _mismatch(lambda: o.bundled_with_unbundled(one, 1, s.TRUTH))  # :148-152
    _mismatch(lambda: o.bundled_with_unbundled(one, f, bad))  # :148-152
    _mismatch(lambda: o.struct_array_in((s.TRUTH, bad)))  # :160-165
    _mismatch(lambda: o.well_documented_method(1))  # :182-185


def test_itest1_refuses_what_the_rust_refuses(impls: Impls) -> None:
    """test1.rs's MISMATCH answers, each raised by its IDL name (ITest1.MISMATCH =
    12) through the stub; no_args, delete and the versioned methods answer as test1.rs
    does (:12-14, :241-264)."""
    o = impls.suite.ns.ITest1.Stub(impls.ITest1Local())
    _refusals(impls, o)
    assert o.no_args() is None
    assert o.delete(2.5) is None
    assert (o.derive_v0(1), o.derive_v1(1), o.derive_v2(1), o.derive_v2p2(1)) == (None,) * 4
    assert o.derive_v255() == 0xDEAD


def test_api_version(impls: Impls) -> None:
    """implementation/mod.rs:467-472 (ITest1 is at 2.0: derive_v2p2) and tests/main.rs:28-33
    (ITest3's own methods carry no version: 1.0); the op is Object_OP_version (0x7FFF), and
    the skeleton refuses it with other counts or another buffer size (the C skeleton's
    version case: ERROR_INVALID)."""
    ns = impls.suite.ns
    assert idl_version(2, 0, 0) == 0x0080_0000
    impls.suite.api_version_check(ns.ITest1.Stub(impls.ITest1Local()), 2, 0)
    impls.suite.api_version_check(ns.ITest3.Stub(impls.ITest3Local()), 1, 0)
    impls.suite.api_version_check(ns.ITest2.Stub(impls.ITest2Local()), 1, 0)
    one = impls.ITest1Local()
    assert one.dispatch(0x7FFF, (), (4,), (), 0).ob == (b"\x00\x00\x80\x00",)
    assert one.dispatch(0x7FFF, (), (8,), (), 0).result == ObjectResult.ERROR_INVALID
    assert one.dispatch(0x7FFF, (b"",), (4,), (), 0).result == ObjectResult.ERROR_INVALID


# ------------------------------------------------------------------ across the model
@pytest.mark.qtee_modes(*MODES)
def test_ta_entrypoint_drives_a_client_callback_object(
    tas: Impls, qtee_app: AppLoaderHelper
) -> None:
    """Issue 19 acceptance: ITest2's entry point in a TA drives ITest1 served by a client
    callback object (test2.rs:326-363 over an NsObject: every call a callback), and the
    ITest1 objects it makes are secure objects the callback drives in turn (test1.rs:194,
    :217-224: invocations from inside callbacks); every check passes."""
    ns = tas.suite.ns
    with ns.ITest2.Stub(qtee_app("itest2")) as two:
        two.entrypoint(tas.ITest1Cb())


@pytest.mark.qtee_modes(*MODES)
def test_client_entrypoint_drives_an_itest1_in_a_ta(tas: Impls, qtee_app: AppLoaderHelper) -> None:
    """Issue 19 acceptance, the reverse: ITest2's entry point in the client drives an
    ITest1 served by a TA; the objects it hands over are callback objects the TA drives
    (test1.rs:194, :217-224), the ones it gets back (test_obj_array_out, objects_in_struct)
    are ObjRefs, checked and released."""
    ns = tas.suite.ns
    with ns.ITest1.Stub(qtee_app("itest1")) as one:
        ns.ITest2.Stub(tas.ITest2Client()).entrypoint(one)
        _refusals(tas, one)


@pytest.mark.qtee_modes(*MODES)
def test_client_drives_the_itest1_objects_a_ta_gives(
    tas: Impls, qtee_client: Client, qtee_app: AppLoaderHelper
) -> None:
    """test2.rs:338-342 from the client: the three ITest1 a TA's test_obj_array_out gives
    arrive as ITest1 stubs over ObjRefs; each passes test_singular_object and is
    released (the leak check sees none left)."""
    ns = tas.suite.ns
    with ns.ITest1.Stub(qtee_app("itest1")) as one:
        objects, flag = one.test_obj_array_out()
        assert flag == tas.suite.SUCCESS_FLAG
        for obj in objects:
            assert type(obj).__qualname__ == "ITest1.Stub" and isinstance(obj.obj, ObjRef)
            assert tas.suite.singular_object(obj) == 0
            release(obj)


@pytest.mark.qtee_modes(*MODES)
def test_itest3_itest4_inheritance_across_the_model(tas: Impls, qtee_app: AppLoaderHelper) -> None:
    """tests/main.rs:25-27, test1.rs:287-301 in a TA: ITest3's stub answers ITest1's
    methods and extra_test3; ITest1's stub over the same object is the upcast; its
    api_version is its own, 1.0 (main.rs:28-33).  ITest4 (ITest3.idl, no Rust
    implementation): two levels of inheritance, extra_test3 and extra_test4."""
    ns = tas.suite.ns
    f = tas.suite.SUCCESS_FLAG
    with ns.ITest3.Stub(qtee_app("itest3")) as three:
        assert three.single_in(0xDEAD) is None  # main.rs:27
        assert three.extra_test3() == f  # test1.rs:296-298
        assert tas.suite.singular_object(three, (1, 0)) == 0
        assert tas.suite.singular_object(ns.ITest1.Stub(three), (1, 0)) == 0
    with ns.ITest4.Stub(qtee_app("itest4")) as four:
        assert four.extra_test4() == f
        assert four.extra_test3() == f
        assert tas.suite.singular_object(four, (1, 0)) == 0
        with pytest.raises(QteeError) as exc:  # ITest3's stub has no op 28: ask raw
            four.obj.invoke(ns.ITest4.OP_extra_test4 + 1)
        assert exc.value.result == ObjectResult.ERROR_INVALID


@pytest.mark.qtee_modes("in-process", "server")
def test_ta_entrypoint_from_ten_threads(tas: Impls, qtee_app: AppLoaderHelper) -> None:
    """tests/main.rs:62-75 (implementation_and_invoke_sync) across the model: ten client
    threads call one TA's ITest2 entry point with one client ITest1 at once; every
    call passes (the client's two workers serve the callbacks as they come).  Not in
    guest mode: there the mediator holds a VM to the TEE's thread count of calls at once
    and answers ERROR_BUSY past it (qtee.vm's QTEE backend, step 1), as it should."""
    ns = tas.suite.ns
    one = tas.ITest1Cb()
    with ns.ITest2.Stub(qtee_app("itest2")) as two:
        errors = _in_ten_threads(lambda: two.entrypoint(one))
    assert errors == []


@pytest.mark.qtee_modes(*MODES)
def test_loaded_client_and_generated_ta_agree(
    loaded: Namespace, generated: Any, qtee_app: AppLoaderHelper
) -> None:
    """Issue 19 point 4: both ways to get Python code are one interface: a client on the
    loaded namespace drives TAs built on the generated module, both directions
    (test2.rs:326-363 in the TA over a callback object, and in the client over the TA)."""
    client, secure = suite(loaded), suite(generated)
    register_ta("itest1-gen", secure.ITest1Ta)
    register_ta("itest2-gen", secure.ITest2Ta)
    try:
        with loaded.ITest2.Stub(qtee_app("itest2-gen")) as two:
            two.entrypoint(client.ITest1Cb())
        with loaded.ITest1.Stub(qtee_app("itest1-gen")) as one:
            loaded.ITest2.Stub(client.ITest2Client()).entrypoint(one)
    finally:
        unregister_ta("itest1-gen")
        unregister_ta("itest2-gen")
