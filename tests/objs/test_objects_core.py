"""The generic object core (results, errors, refcounts, tables); QTEE's results and counts."""

from __future__ import annotations

import errno
import pickle
import random
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import objects
from objects import (
    ENOTSUPP,
    CyclicAllocator,
    DecodeError,
    DriverError,
    IdrAllocator,
    ObjectResult,
    ObjectTable,
    QteeBaseError,
    QteeError,
    Refcounted,
    RefcountError,
    UsageError,
    canonical_result,
    errno_name,
    register_results,
    result_from_u32,
    result_name,
    result_to_u32,
)
from qtee import USERSPACE_ONLY_RESULTS, Counts, Result

# --------------------------------------------------------------------------- results

EXPECTED_RESULTS = {
    "OK": 0,
    "ERROR": 1,
    "ERROR_INVALID": 2,
    "ERROR_SIZE_IN": 3,
    "ERROR_SIZE_OUT": 4,
    "ERROR_MEM": 5,
    "ERROR_USERBASE": 10,
    "ERROR_DEFUNCT": -90,
    "ERROR_ABORT": -91,
    "ERROR_BADOBJ": -92,
    "ERROR_NOSLOTS": -93,
    "ERROR_MAXARGS": -94,
    "ERROR_MAXDATA": -95,
    "ERROR_UNAVAIL": -96,
    "ERROR_KMEM": -97,
    "ERROR_REMOTE": -98,
    "ERROR_BUSY": -99,
    "ERROR_AUTH": -100,
    "ERROR_REPLAY": -101,
    "ERROR_MAXREPLAY": -102,
    "ERROR_TIMEOUT": -103,
}


def test_result_enum_is_exactly_the_spec_table() -> None:
    assert {m.name: m.value for m in Result} == EXPECTED_RESULTS
    assert len(Result) == len(EXPECTED_RESULTS)  # no aliases hiding a duplicate value


def test_userspace_only_results() -> None:
    assert isinstance(USERSPACE_ONLY_RESULTS, frozenset)
    assert {
        Result.ERROR_MEM,
        Result.ERROR_AUTH,
        Result.ERROR_REPLAY,
        Result.ERROR_MAXREPLAY,
    } == USERSPACE_ONLY_RESULTS


@pytest.mark.parametrize(
    ("signed", "raw"),
    [
        (0, 0),
        (1, 1),
        (10, 10),
        (-90, 0xFFFF_FFA6),
        (-96, 0xFFFF_FFA0),
        (-103, 0xFFFF_FF99),
        (-1, 0xFFFF_FFFF),
        (-(2**31), 0x8000_0000),
        (2**31 - 1, 0x7FFF_FFFF),
    ],
)
def test_result_u32_exact(signed: int, raw: int) -> None:
    assert result_to_u32(signed) == raw
    assert result_from_u32(raw) == signed


def test_known_results_come_back_as_enum_members() -> None:
    assert result_from_u32(0xFFFF_FFA0) is Result.ERROR_UNAVAIL
    assert result_from_u32(0) is Result.OK
    unknown = result_from_u32(0xFFFF_FFFE)
    assert unknown == -2
    assert type(unknown) is int


@given(st.integers(-(2**31), 2**31 - 1))
def test_result_round_trip_signed(value: int) -> None:
    raw = result_to_u32(value)
    assert 0 <= raw <= 0xFFFF_FFFF
    assert raw == value % 2**32
    assert result_from_u32(raw) == value


@given(st.integers(0, 2**32 - 1))
def test_result_round_trip_u32(raw: int) -> None:
    assert result_to_u32(result_from_u32(raw)) == raw


@pytest.mark.parametrize("bad", [2**31, -(2**31) - 1, 2**40])
def test_result_to_u32_out_of_range(bad: int) -> None:
    with pytest.raises(ValueError):
        result_to_u32(bad)


@pytest.mark.parametrize("bad", [-1, 2**32, 2**64])
def test_result_from_u32_out_of_range(bad: int) -> None:
    with pytest.raises(ValueError):
        result_from_u32(bad)


@pytest.mark.parametrize("bad", [1.0, "1", None, True, b"\x01"])
def test_result_conversions_reject_non_int(bad: object) -> None:
    with pytest.raises(TypeError):
        result_to_u32(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        result_from_u32(bad)  # type: ignore[arg-type]


def test_result_name() -> None:
    assert result_name(-96) == "ERROR_UNAVAIL"
    assert result_name(0) == "OK"
    assert result_name(10) == "ERROR_USERBASE"
    assert result_name(13) == "USERBASE+3"
    assert result_name(7) == "7"
    assert result_name(-5) == "-5"


def test_objects_has_no_qcomtee_names() -> None:
    """Issue 17 (objects generic): the transport's results, its counts word and its
    argument codes live in qtee; objects names none of the Qualcomm driver's things."""
    root = Path(objects.__file__).parent
    for path in sorted(root.glob("*.py")):
        text = path.read_text()
        assert "qcomtee" not in text.lower(), path.name
        assert "counts word" not in text and "``counts``" not in text, path.name
    assert {int(m) for m in ObjectResult} == {0, 1, 2, 3, 4, 10}
    assert not hasattr(objects, "Result")
    assert not hasattr(objects, "Counts")


def test_a_registered_table_names_and_returns_its_codes() -> None:
    """Issue 17: qtee registers its result table with objects' generic conversions."""
    assert result_from_u32(2) is Result.ERROR_INVALID
    assert canonical_result(ObjectResult.ERROR_INVALID) is Result.ERROR_INVALID
    assert QteeError(-90).name == "ERROR_DEFUNCT"
    with pytest.raises(TypeError):
        register_results(dict)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- errors


def test_driver_error_is_an_oserror_with_errno() -> None:
    e = DriverError(errno.EINVAL, "bad attr")
    assert isinstance(e, OSError)
    assert isinstance(e, QteeBaseError)
    assert e.errno == errno.EINVAL == 22
    assert e.code == 22
    assert e.detail == "bad attr"
    assert str(e).startswith("[EINVAL] ")
    assert "bad attr" in str(e)
    with pytest.raises(OSError) as info:
        raise DriverError(errno.EFAULT)
    assert info.value.errno == 14


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOSPC, errno.EFAULT, ENOTSUPP])
def test_driver_error_pickles(code: int) -> None:
    e = DriverError(code, "detail text")
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is DriverError
    assert back.errno == code
    assert back.detail == "detail text"
    assert str(back) == str(e)


def test_enotsupp() -> None:
    assert ENOTSUPP == 524
    e = DriverError(ENOTSUPP)
    assert e.errno == 524
    assert str(e) == "[ENOTSUPP] Operation not supported"
    assert errno_name(524) == "ENOTSUPP"
    assert errno_name(22) == "EINVAL"
    assert errno_name(512) == "ERESTARTSYS"
    assert errno_name(99999) == "99999"


@pytest.mark.parametrize("bad", [0, -22, None, "22"])
def test_driver_error_needs_positive_errno(bad: object) -> None:
    with pytest.raises(ValueError):
        DriverError(bad)  # type: ignore[arg-type]


def test_qtee_error_carries_result() -> None:
    e = QteeError(-96, "no such op")
    assert e.result == -96
    assert isinstance(e, QteeBaseError)
    assert not isinstance(e, OSError)
    assert "ERROR_UNAVAIL" in str(e)
    assert "no such op" in str(e)
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is QteeError
    assert (back.result, back.detail) == (-96, "no such op")
    assert QteeError(12).result == 12


@pytest.mark.parametrize("bad", [0, False, True, 1.0, None])
def test_qtee_error_rejects_zero_and_non_int(bad: object) -> None:
    with pytest.raises(ValueError):
        QteeError(bad)  # type: ignore[arg-type]


def test_error_hierarchy() -> None:
    assert issubclass(UsageError, ValueError)
    assert issubclass(UsageError, QteeBaseError)
    assert issubclass(DecodeError, ValueError)
    assert issubclass(DecodeError, QteeBaseError)
    assert not issubclass(DecodeError, UsageError)
    assert issubclass(RefcountError, UsageError)


# --------------------------------------------------------------------------- counts

nibble = st.integers(0, 15)


@given(nibble, nibble, nibble, nibble)
def test_counts_pack_unpack(ib: int, ob: int, io: int, oo: int) -> None:
    c = Counts(ib, ob, io, oo)
    word = c.pack()
    assert word == ib | ob << 4 | io << 8 | oo << 12
    assert word < 0x10000
    assert Counts.unpack(word) == c
    assert c.total == ib + ob + io + oo
    assert (c.first_ob, c.first_io, c.first_oo) == (ib, ib + ob, ib + ob + io)


@given(st.integers(0x1_0000, 0xFFFF_FFFF))
def test_counts_unpack_rejects_high_bits(word: int) -> None:
    with pytest.raises(DecodeError):
        Counts.unpack(word)


@pytest.mark.parametrize("word", [-1, 2**32, "0", None])
def test_counts_unpack_rejects_non_u32(word: object) -> None:
    with pytest.raises(DecodeError):
        Counts.unpack(word)  # type: ignore[arg-type]


def test_counts_exact_words() -> None:
    assert Counts(1, 2, 3, 4).pack() == 0x4321
    assert Counts.unpack(0xF00F) == Counts(15, 0, 0, 15)
    assert Counts.unpack(0xFFFF) == Counts(15, 15, 15, 15)


@pytest.mark.parametrize("field", ["ib", "ob", "io", "oo"])
def test_counts_rejects_16_and_negative(field: str) -> None:
    with pytest.raises(UsageError):
        Counts(**{field: 16})
    with pytest.raises(UsageError):
        Counts(**{field: -1})
    with pytest.raises(TypeError):
        Counts(**{field: True})


# --------------------------------------------------------------------------- refcounts


class Entry(Refcounted):
    __slots__ = ("released",)

    def __init__(self) -> None:
        super().__init__()
        self.released = 0

    def on_release(self) -> None:
        self.released += 1


def test_refcounted_get_put() -> None:
    e = Entry()
    assert e.refs == 1
    assert e.get() is True
    assert e.refs == 2
    assert e.put() is False
    assert e.released == 0
    assert e.put() is True
    assert e.released == 1
    assert e.refs == 0
    assert e.get() is False  # kref_get_unless_zero
    assert e.refs == 0
    with pytest.raises(RefcountError):
        e.put()
    assert e.refs == 0
    assert e.released == 1


@given(st.lists(st.booleans(), max_size=60))
def test_refcounted_against_model(ops: list[bool]) -> None:
    """True = get, False = put; the model is an int that never comes back from zero."""
    e, refs = Entry(), 1
    for is_get in ops:
        if is_get:
            assert e.get() is (refs > 0)
            if refs > 0:
                refs += 1
        elif refs == 0:
            with pytest.raises(RefcountError):
                e.put()
        else:
            refs -= 1
            assert e.put() is (refs == 0)
        assert e.refs == refs
        assert e.released == (1 if refs == 0 else 0)


# --------------------------------------------------------------------------- object table


def test_table_insert_lookup_erase() -> None:
    t: ObjectTable[Entry] = ObjectTable(IdrAllocator(0), name="t")
    a, b = Entry(), Entry()
    assert t.insert(a) == 0
    assert t.insert(b) == 1
    assert len(t) == 2
    assert 0 in t and 1 in t and 2 not in t
    assert sorted(t) == [0, 1]
    assert t.items() == [(0, a), (1, b)]
    assert t.lookup(0) is a
    assert t.lookup_get(0) is a
    assert a.refs == 2
    assert t.lookup_get(5) is None
    assert t.erase(0) is a
    assert t.erase(0) is None
    assert 0 not in t.allocator
    assert t.lookup_get(0) is None
    assert t.insert(Entry()) == 0  # recycled lowest-free id


def test_table_lookup_get_refuses_dying_entry() -> None:
    t: ObjectTable[Entry] = ObjectTable(IdrAllocator(0))
    e = Entry()
    ident = t.insert(e)
    assert e.put() is True
    assert t.lookup_get(ident) is None
    assert e.refs == 0
    assert t.lookup(ident) is e  # still stored, just not handed out


def test_table_plain_entries() -> None:
    t: ObjectTable[str] = ObjectTable(CyclicAllocator(10, 12))
    assert [t.insert("a"), t.insert("b")] == [10, 11]
    assert t.lookup_get(10) == "a"


def test_table_erase_if_aba() -> None:
    t: ObjectTable[list[int]] = ObjectTable(IdrAllocator(0))
    old = [1]
    ident = t.insert(old)
    assert t.erase(ident) is old
    new = [1]  # equal but not the same entry
    assert t.insert(new) == ident  # the id is recycled
    assert t.erase_if(ident, old) is False  # ABA: must not remove the new entry
    assert t.lookup(ident) is new
    assert ident in t.allocator
    assert t.erase_if(ident, new) is True
    assert ident not in t.allocator
    assert len(t) == 0
    assert t.erase_if(ident, new) is False


def test_table_reserve_replace() -> None:
    t: ObjectTable[str] = ObjectTable(IdrAllocator(0))
    r = t.reserve()
    assert r == 0
    assert t.lookup(r) is None
    assert r in t.allocator
    assert t.insert("x") == 1
    t.replace(r, "r")
    assert t.lookup(r) == "r"
    with pytest.raises(UsageError):
        t.replace(7, "nope")
    assert t.erase(r) == "r"
    r2 = t.reserve()
    assert t.erase(r2) is None  # reserved, no entry: id still freed
    assert r2 not in t.allocator


def test_table_drain() -> None:
    t: ObjectTable[str] = ObjectTable(IdrAllocator(0))
    for s in "abc":
        t.insert(s)
    t.erase(1)
    assert t.drain() == [(0, "a"), (2, "c")]
    assert len(t) == 0
    assert len(t.allocator) == 0
    assert t.drain() == []
    assert t.insert("d") == 0


def test_table_full() -> None:
    t: ObjectTable[str] = ObjectTable(IdrAllocator(0, 2))
    t.insert("a")
    t.insert("b")
    with pytest.raises(DriverError) as info:
        t.insert("c")
    assert info.value.errno == errno.ENOSPC
    assert len(t) == 2


def test_table_needs_an_allocator() -> None:
    with pytest.raises(TypeError):
        ObjectTable({})  # type: ignore[arg-type]


def test_table_threads_end_empty() -> None:
    """8 threads insert, look up (own and others' ids), put and erase concurrently."""
    n_threads, iterations = 8, 400
    t: ObjectTable[Entry] = ObjectTable(IdrAllocator(0, 64))
    barrier = threading.Barrier(n_threads)
    errors: list[BaseException] = []
    made: list[list[Entry]] = [[] for _ in range(n_threads)]

    def worker(k: int) -> None:
        rng = random.Random(k)
        try:
            barrier.wait()
            for _ in range(iterations):
                e = Entry()
                made[k].append(e)
                ident = t.insert(e)
                got = t.lookup_get(ident)
                assert got is e
                got.put()
                other = t.lookup_get(rng.randrange(64))  # may be anyone's, or dying
                if other is not None:
                    assert other.refs >= 1  # ours, at least
                    other.put()
                assert t.erase_if(ident, e) is True
                e.put()
        except BaseException as exc:  # re-raised in the main thread
            errors.append(exc)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=60)
    finally:
        sys.setswitchinterval(old)
    assert not errors, errors[0]
    assert len(t) == 0
    assert len(t.allocator) == 0
    entries = [e for per in made for e in per]
    assert len(entries) == n_threads * iterations
    assert all(e.refs == 0 and e.released == 1 for e in entries)
