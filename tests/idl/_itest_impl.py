"""ITest1, ITest2, ITest3 and ITest4 in Python, after mink-idl-compiler's Rust tests.

The compiler checks its backends against each other with one test suite
(``tests/src/implementation/{mod,test1,test2}.rs``): an ITest1 that answers every method
with known values and refuses other inputs with ``MISMATCH``, an ITest2 whose entry point
drives a given ITest1 through every method (``test_singular_object``, then object arrays
and a struct holding objects), and an ITest3 (ITest1 plus ``extra_test3``).  This module
writes the same over any namespace of ITest.idl/ITest3.idl: the one ``objects.idl.load``
builds, or a module ``objects.idl.gen.generate`` wrote (:func:`suite`).

Where an implementation makes another ITest1 (``ITest1::new`` in test1.rs:205-207,
233/237, test2.rs:333-352) it makes one of its own side's kind (:attr:`ITest1Methods.NEW`):
a ``SecureObject`` in a TA, a ``CallbackObject`` in a client, a plain ``PyObject`` when
both ends are local.  Objects that come back as outputs are released once checked (Rust
drops them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from objects import PyObject, QteeError
from objects.idl.runtime import StubBase
from qtee import CallbackObject, SecureObject, TrustedApp

#: ``IDLVersion::new(major, minor, patch)`` packed as the Rust backend packs it
#: (idlc_codegen_rust/src/interface/mod.rs: 10 bits major at 22, 10 minor at 12, 12 patch).
VERSION_MAJOR_SHIFT = 22
VERSION_MINOR_SHIFT = 12
#: Mink's transport error for a null object (object.h ``Object_ERROR_BADOBJ``; the Rust
#: suite's ``transport::BADOBJ``, src/object/error.rs:86).
BADOBJ = -92


def idl_version(major: int, minor: int, patch: int) -> int:
    """The u32 ``api_version`` answers for an interface at ``major.minor`` (patch 0)."""
    return (
        (major & 0x3FF) << VERSION_MAJOR_SHIFT
        | (minor & 0x3FF) << VERSION_MINOR_SHIFT
        | (patch & 0xFFF)
    )


def release(obj: Any) -> None:
    """Drop an output object (a stub, an ``ObjRef``, an ``NsObject``; a local one: no-op)."""
    if isinstance(obj, StubBase) or (obj is not None and not isinstance(obj, PyObject)):
        obj.release()


class Suite:
    """The Rust suite's constants (mod.rs:4-12, ITest.idl) over one namespace ``ns``."""

    def __init__(self, ns: Any) -> None:
        self.ns = ns
        self.SUCCESS_FLAG: int = ns.SUCCESS_FLAG
        # mod.rs:4-9 TRUTH, mod.rs:11-12 TRUTH2
        self.TRUTH = ns.Collection(a=0, b=1, c=2, d=3)
        self.TRUTH2 = ns.SingleEncapsulated(inner=0)
        self.MISMATCH = ns.ITest1.MISMATCH

    def mismatch(self, what: str) -> QteeError:
        """test1.rs's ``Err(itest1::MISMATCH)``."""
        return QteeError(self.MISMATCH, what)

    # ------------------------------------------------------------ mod.rs:384-475
    def singular_object(self, o: Any, version: tuple[int, int] = (2, 0)) -> int:
        """``test_singular_object`` (mod.rs:384-475) on the ITest1 stub ``o``: every
        check an assertion of its own; None is BADOBJ (mod.rs:390-392).  ``version``:
        what ``api_version`` must answer (mod.rs:467-472: ITest1 is 2.0; an ITest3 or
        ITest4 answers its own, 1.0)."""
        if o is None:
            return BADOBJ
        f = self.SUCCESS_FLAG
        ns = self.ns
        # mod.rs:393
        assert o.single_in(f) is None
        # mod.rs:394-397 (empty buffers: lenout 0)
        assert o.single_primitive_in(b"", f, unused2_len=0) == b""
        # mod.rs:398-410 ((unused2, output, unused4, output2, unused5) in IDL order)
        assert o.multiple_primitive(b"", f & 0xFFFF, None, f, unused2_len=0, unused5_len=0) == (
            b"",
            f & 0xFFFF,
            None,
            f,
            b"",
        )
        # mod.rs:411-420
        assert o.bundled_with_unbundled(ns.SingleEncapsulated(inner=f), f, self.TRUTH) is None
        # mod.rs:421-429
        assert o.primitive_plus_struct_in(ns.SingleEncapsulated(inner=f), f) is None
        # mod.rs:430
        assert o.in_struct(self.TRUTH) is None
        # mod.rs:431
        assert o.in_small_struct(self.TRUTH2) is None
        # mod.rs:432
        assert o.add_1000(5) == 1005
        # mod.rs:433
        assert o.struct_array_in((self.TRUTH, self.TRUTH)) is None
        # mod.rs:434-437 (capacity 2)
        s_out = o.struct_array_out(s_out_len=2)
        # mod.rs:438
        assert len(s_out) == 2
        # mod.rs:439
        assert s_out[0] == self.TRUTH
        # mod.rs:440
        assert s_out[1] == self.TRUTH
        # mod.rs:441
        arr, magic = o.primitive_array_in_struct()
        # mod.rs:442
        assert tuple(arr.a) == (7, 8)
        # mod.rs:443
        assert arr.c[0] == ns.F2(a=9, b=7)
        # mod.rs:444
        assert arr.c[1] == ns.F2(a=8, b=9)
        # mod.rs:445
        assert arr.d == f & 0xFFFF
        # mod.rs:446
        assert magic == f
        # mod.rs:448
        assert o.single_out() == f
        # mod.rs:449-452 (the Python stub also answers the empty out buffer)
        assert o.single_primitive_out(b"", unused2_len=0) == (b"", f)
        # mod.rs:453-461
        assert o.primitive_plus_struct_out() == (ns.SingleEncapsulated(inner=f), f)
        # mod.rs:462
        assert o.out_struct() == self.TRUTH
        # mod.rs:463
        assert o.out_small_struct() == self.TRUTH2
        # mod.rs:465
        assert o.well_documented_method(f) == f
        # mod.rs:467-472
        self.api_version_check(o, *version)
        return 0

    def api_version_check(self, o: Any, major: int, minor: int) -> None:
        """mod.rs:467-472 (ITest1: 2.0), main.rs:28-33 and c.rs:27-32 (ITest3: 1.0):
        ``api_version()`` answers ``IDLVersion::new(major, minor, 0)``."""
        expected = idl_version(major, minor, 0)
        # mod.rs:469
        assert o.api_version() == expected
        # mod.rs:470-472
        assert (expected >> VERSION_MAJOR_SHIFT, expected >> VERSION_MINOR_SHIFT & 0x3FF) == (
            major,
            minor,
        )
        assert expected & 0xFFF == 0

    # ------------------------------------------------------------ test2.rs:326-363
    def entrypoint(self, o: Any, new: Callable[[int], object]) -> None:
        """``ITest2::entrypoint`` (test2.rs:326-363) on the ITest1 stub ``o``; ``new``
        makes an ITest1 of the caller's side (``ITest1::new``)."""
        ns = self.ns
        f = self.SUCCESS_FLAG
        stub = ns.ITest1.Stub
        # test2.rs:330
        assert self.singular_object(o) == 0
        # test2.rs:332-337
        assert o.test_obj_array_in((new(1), None, new(2))) == f
        # test2.rs:338
        objects, flag = o.test_obj_array_out()
        try:
            # test2.rs:339
            assert flag == f
            # test2.rs:340-342
            assert len(objects) == 3
            for obj in objects:
                assert self.singular_object(obj) == 0
        finally:
            for obj in objects:
                release(obj)
        valid_ps = (f,) * 4
        # test2.rs:344-354
        output = o.objects_in_struct(
            ns.ObjInStruct(
                p1=valid_ps,
                first_obj=new(1),
                p2=valid_ps,
                should_be_empty=None,
                p3=valid_ps,
                second_obj=new(2),
            )
        )
        try:
            # test2.rs:355
            assert tuple(output.p1) == valid_ps
            # test2.rs:356
            assert tuple(output.p2) == valid_ps
            # test2.rs:357
            assert tuple(output.p3) == valid_ps
            # test2.rs:358
            assert self.singular_object(_as_stub(stub, output.first_obj)) == 0
            # test2.rs:359
            assert output.should_be_empty is None
            # test2.rs:360
            assert self.singular_object(_as_stub(stub, output.second_obj)) == 0
        finally:
            release(output.first_obj)
            release(output.second_obj)


def _as_stub(stub: type[StubBase], obj: object) -> Any:
    return None if obj is None else obj if isinstance(obj, StubBase) else stub(obj)


class ITest1Methods:
    """test1.rs:9-265 (``itest1_impl!``): every ITest1 method the Rust type implements.

    Mixed before an ``ITest1.Skeleton`` (or ITest3's, ITest4's) and the object's kind."""

    SUITE: ClassVar[Suite]
    #: How this side makes another ITest1 (test1.rs:205-207, 233, 237).
    NEW: ClassVar[Callable[[int], object]]

    def __init__(self, value: int = 0) -> None:
        self.value = value  # test1.rs:271-281

    def no_args(self) -> None:  # test1.rs:12-14
        return None

    def add_1000(self, a: int) -> int:  # test1.rs:16-18
        return a + 1000

    def in_struct(self, input: Any) -> None:  # test1.rs:20-30
        if input != self.SUITE.TRUTH:
            raise self.SUITE.mismatch(f"in_struct got {input}")

    def out_struct(self) -> Any:  # test1.rs:32-36
        return self.SUITE.TRUTH

    def in_small_struct(self, input: Any) -> None:  # test1.rs:38-48
        if input != self.SUITE.TRUTH2:
            raise self.SUITE.mismatch(f"in_small_struct got {input}")

    def out_small_struct(self) -> Any:  # test1.rs:50-54
        return self.SUITE.TRUTH2

    def single_out(self) -> int:  # test1.rs:56-58
        return 0xDEAD

    def single_in(self, input: int) -> None:  # test1.rs:60-67
        if input != 0xDEAD:
            raise self.SUITE.mismatch(f"single_in got {input:#x}")

    def single_primitive_in(  # test1.rs:69-77 (the out buffer left empty: lenout 0)
        self, unused: bytes, input: int, *, unused2_len: int
    ) -> bytes:
        self.single_in(input)
        return b""

    def single_primitive_out(  # test1.rs:79-86
        self, unused: bytes, *, unused2_len: int
    ) -> tuple[bytes, int]:
        return b"", self.single_out()

    def multiple_primitive(  # test1.rs:88-105
        self,
        unused: bytes,
        input: int,
        unused3: object,
        input2: int,
        *,
        unused2_len: int,
        unused5_len: int,
    ) -> tuple[bytes, int, object, int, bytes]:
        f = self.SUITE.SUCCESS_FLAG
        if not (input == f & 0xFFFF and input2 == f):
            raise self.SUITE.mismatch(f"multiple_primitive got {input:#x}, {input2:#x}")
        return b"", f & 0xFFFF, None, f, b""

    def primitive_plus_struct_in(self, encapsulated: Any, magic: int) -> None:  # :107-118
        f = self.SUITE.SUCCESS_FLAG
        if not (encapsulated.inner == f and magic == f):
            raise self.SUITE.mismatch(f"primitive_plus_struct_in got {encapsulated}, {magic}")

    def primitive_plus_struct_out(self) -> tuple[Any, int]:  # test1.rs:120-129
        f = self.SUITE.SUCCESS_FLAG
        return self.SUITE.ns.SingleEncapsulated(inner=f), f

    def primitive_array_in_struct(self) -> tuple[Any, int]:  # test1.rs:131-140
        ns = self.SUITE.ns
        f = self.SUITE.SUCCESS_FLAG
        c = (ns.F2(a=9, b=7), ns.F2(a=8, b=9))
        return ns.ArrInStruct(a=(7, 8), c=c, d=f & 0xFFFF), f

    def bundled_with_unbundled(self, bundled: Any, magic: int, unbundled: Any) -> None:  # :142
        f = self.SUITE.SUCCESS_FLAG
        if not (bundled.inner == f and magic == f and unbundled == self.SUITE.TRUTH):
            raise self.SUITE.mismatch(f"bundled_with_unbundled got {bundled}, {unbundled}")

    def struct_array_in(self, s_in: tuple[Any, ...]) -> None:  # test1.rs:156-167
        for s in s_in:
            if s != self.SUITE.TRUTH:
                raise self.SUITE.mismatch(f"struct_array_in got {s}")

    def struct_array_out(self, *, s_out_len: int) -> tuple[Any, ...]:  # test1.rs:169-179
        return (self.SUITE.TRUTH,) * s_out_len

    def well_documented_method(self, foo: int) -> int:  # test1.rs:181-187
        f = self.SUITE.SUCCESS_FLAG
        if foo != f:
            raise self.SUITE.mismatch(f"well_documented_method got {foo:#x}")
        return f

    def test_obj_array_in(self, o_in: tuple[Any, ...]) -> int:  # test1.rs:189-198
        for o in o_in:
            if o is not None:
                assert self.SUITE.singular_object(o) == 0  # test1.rs:194
        return self.SUITE.SUCCESS_FLAG

    def test_obj_array_out(self) -> tuple[tuple[object, ...], int]:  # test1.rs:200-211
        return (self.NEW(0), self.NEW(1), self.NEW(2)), self.SUITE.SUCCESS_FLAG

    def objects_in_struct(self, input: Any) -> Any:  # test1.rs:213-239
        suite = self.SUITE
        f = suite.SUCCESS_FLAG
        stub = suite.ns.ITest1.Stub
        # test1.rs:217-220
        assert suite.singular_object(_as_stub(stub, input.first_obj)) == 0
        # test1.rs:221-224
        assert suite.singular_object(_as_stub(stub, input.second_obj)) == 0
        # test1.rs:225
        assert input.should_be_empty is None
        # test1.rs:227-229 (the Rust checks p1 three times; p2 and p3 are meant)
        assert all(x == f for x in input.p1)
        assert all(x == f for x in input.p2)
        assert all(x == f for x in input.p3)
        return suite.ns.ObjInStruct(
            p1=(f,) * 4,
            first_obj=self.NEW(1),
            p2=(f,) * 4,
            should_be_empty=None,
            p3=(f,) * 4,
            second_obj=self.NEW(2),
        )

    def delete(self, key: float) -> None:  # test1.rs:241-244
        return None

    def derive_v0(self, a: int) -> None:  # test1.rs:245-248
        return None

    def derive_v1(self, a: int) -> None:  # test1.rs:249-252
        return None

    def derive_v2(self, a: int) -> None:  # test1.rs:253-256
        return None

    def derive_v255(self) -> int:  # test1.rs:257-260
        return 0xDEAD

    def derive_v2p2(self, a: int) -> None:  # test1.rs:261-264
        return None


class ITest3Methods(ITest1Methods):
    """test1.rs:287-301 (``generate_itest3_impl!``): ITest1's methods and extra_test3."""

    def extra_test3(self) -> int:  # test1.rs:296-298
        return self.SUITE.SUCCESS_FLAG


class ITest4Methods(ITest3Methods):
    """ITest4 (ITest3.idl) has no Rust implementation; this one answers extra_test4 as
    extra_test3 does, to check two levels of inheritance through the stubs."""

    def extra_test4(self) -> int:
        return self.SUITE.SUCCESS_FLAG


class ITest2Methods:
    """test2.rs:317-364: the entry point drives the ITest1 it is given."""

    SUITE: ClassVar[Suite]
    NEW: ClassVar[Callable[[int], object]]

    def entrypoint(self, o: Any) -> None:  # test2.rs:326-363
        self.SUITE.entrypoint(o, type(self).NEW)


@dataclass(frozen=True)
class Impls:
    """The implementations over one namespace, per side (see :func:`suite`)."""

    suite: Suite
    #: Both ends local (plain PyObjects).
    ITest1Local: type
    ITest2Local: type
    ITest3Local: type
    #: Served by a client: ITest1/3 as callback objects; ITest2 a local object whose
    #: entry point makes callback objects to hand to the ITest1 it drives.
    ITest1Cb: type
    ITest2Client: type
    #: Served in the secure world: sub-objects (SecureObject) and TAs.
    ITest1Secure: type
    ITest1Ta: type
    ITest2Ta: type
    ITest3Ta: type
    ITest4Ta: type


def _cls(name: str, bases: tuple[type, ...], suite: Suite, new: object = None) -> type:
    attrs: dict[str, Any] = {"SUITE": suite, "__qualname__": name}
    cls = type(name, bases, attrs)
    cls.NEW = cls if new is None else new  # type: ignore[attr-defined]
    return cls


def suite(ns: Any) -> Impls:
    """The Rust suite's implementations over ``ns`` (needs ITest1..ITest4: ITest3.idl)."""
    s = Suite(ns)
    one = ns.ITest1.Skeleton
    two = ns.ITest2.Skeleton
    three = ns.ITest3.Skeleton
    four = ns.ITest4.Skeleton
    local = _cls("ITest1Local", (ITest1Methods, one), s)
    cb = _cls("ITest1Cb", (ITest1Methods, one, CallbackObject), s)
    secure = _cls("ITest1Secure", (ITest1Methods, one, SecureObject), s)
    return Impls(
        suite=s,
        ITest1Local=local,
        ITest2Local=_cls("ITest2Local", (ITest2Methods, two), s, local),
        ITest3Local=_cls("ITest3Local", (ITest3Methods, three), s, local),
        ITest1Cb=cb,
        ITest2Client=_cls("ITest2Client", (ITest2Methods, two), s, cb),
        ITest1Secure=secure,
        ITest1Ta=_cls("ITest1Ta", (ITest1Methods, one, TrustedApp), s, secure),
        ITest2Ta=_cls("ITest2Ta", (ITest2Methods, two, TrustedApp), s, secure),
        ITest3Ta=_cls("ITest3Ta", (ITest3Methods, three, TrustedApp), s, secure),
        ITest4Ta=_cls("ITest4Ta", (ITest4Methods, four, TrustedApp), s, secure),
    )


__all__ = ["BADOBJ", "Impls", "Suite", "idl_version", "release", "suite"]
