"""How a method's arguments travel: the layout the Mink IDL compiler's C backend uses.

A Mink invocation carries four kinds of arguments, in this order in its ``ObjectArg a[]``:
input buffers (BI), output buffers (BO), input objects (OI), output objects (OO); its
counts word is ``ObjectCounts_pack(nBI, nBO, nOI, nOO)`` (a nibble each).  The C backend
maps a method's parameters onto them so:

* input primitives and small structs (at most 16 bytes) are *small*: two or more of them
  travel together in one input buffer, the *bundle*, which is the first input buffer; a
  single one travels alone as its own buffer, in its place.  The bundle's members are
  ordered by alignment, largest first, keeping declaration order among equals (the
  compiler's legacy option orders them by size instead: ``by_size=True``), and laid out
  back to back.  Outputs the same: an output bundle is the first output buffer;
* a big struct, an array of primitives or structs (``type name[]``) and a ``buffer``
  travel as their own buffer, in declaration order after the bundle; an output array's
  buffer has the capacity the caller gives (in elements) and comes back with the length
  written, in whole elements (the C stub's ``*name_lenout = a[i].b.size / sizeof(T)``);
* an object is one object argument, an object array ``interface name[N]`` is N; a struct
  holding objects sends its bytes with the object fields zeroed (``Object_NULL``) and each
  object as an object argument, before the plain object parameters of its direction;
* all fixed-size buffers (a bundle, a lone small value, a struct) are checked by the C
  skeleton: wrong counts, or a fixed-size buffer of another size, is
  ``Object_ERROR_INVALID`` (2) and the method is not called; ``release`` (0xFFFF) and
  ``retain`` (0xFFFE) are accepted only with counts 0.

Values: a primitive is an ``int`` or ``float``; a struct is an instance of its Python class
(:func:`struct_class`, or the class a :class:`MethodLayout` is given), read by field name;
a struct field declared as an array is a sequence of its elements; ``buffer`` and
``uint8[]`` are ``bytes``, other arrays are tuples of their elements; an object is any
object (None is ``Object_NULL``); an object array is a sequence of N objects.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from objects._errors import QteeError, UsageError
from objects._results import ObjectResult
from objects.idl._values import (
    object_paths,
    pack_primitive,
    pack_struct,
    py_name,
    struct_class,
    unpack_struct,
    with_objects,
)
from objects.idl.model import (
    BUNDLED_SIZE_MAX,
    Buffer,
    Direction,
    InterfaceType,
    Method,
    Param,
    Primitive,
    Struct,
)

__all__ = [
    "OP_RELEASE",
    "OP_RETAIN",
    "MethodLayout",
    "Slot",
    "check_lifecycle",
    "counts_pack",
    "counts_unpack",
    "layout",
    "py_name",
    "struct_class",
]

#: ``Object_OP_release`` and ``Object_OP_retain``: the method ids a skeleton answers itself.
OP_RELEASE: Final = 0xFFFF
OP_RETAIN: Final = 0xFFFE
#: Most arguments of one kind (a nibble of the counts word).
_MAX_PER_KIND: Final = 15


def counts_pack(n_bi: int, n_bo: int, n_oi: int, n_oo: int) -> int:
    """``ObjectCounts_pack``: four 4-bit counts, BI in the low nibble."""
    for what, n in (("BI", n_bi), ("BO", n_bo), ("OI", n_oi), ("OO", n_oo)):
        if not isinstance(n, int) or not 0 <= n <= _MAX_PER_KIND:
            raise UsageError(f"a count of {what} is an int in 0..15, not {n!r}")
    return n_bi | n_bo << 4 | n_oi << 8 | n_oo << 12


def counts_unpack(k: int) -> tuple[int, int, int, int]:
    """(nBI, nBO, nOI, nOO) of a counts word (``ObjectCounts_numBI`` ..)."""
    return (k & 0xF, k >> 4 & 0xF, k >> 8 & 0xF, k >> 12 & 0xF)


def check_lifecycle(op: int, counts: int) -> int | None:
    """What a C skeleton answers for ``release``/``retain`` before its own methods: None
    when ``op`` is neither, else 0 (accepted) with counts 0 and ``ERROR_INVALID`` with any
    argument.  (The skeleton matches on ``ObjectOp_methodID(op)``, the low 16 bits.)"""
    if op & 0xFFFF not in (OP_RELEASE, OP_RETAIN):
        return None
    return 0 if counts == 0 else int(ObjectResult.ERROR_INVALID)


# ------------------------------------------------------------------ the layout
@dataclass(frozen=True, slots=True)
class Slot:
    """One buffer argument: a bundle (``params`` its members, in bundle order) or one
    parameter's own buffer; ``size`` is fixed (checked by the skeleton) or None."""

    params: tuple[Param, ...]
    size: int | None
    bundle: bool = False

    @property
    def param(self) -> Param:
        return self.params[0]


def _kind(p: Param) -> str:
    """small | struct | array | buffer | object | objects."""
    if isinstance(p.type, InterfaceType):
        return "objects" if p.is_array else "object"
    if isinstance(p.type, Buffer):
        return "buffer"
    if p.is_array:
        if p.bound is not None:
            raise UsageError(f"{p.name}: only objects may be bounded arrays")
        return "array"
    if isinstance(p.type, Primitive):
        return "small"
    if isinstance(p.type, Struct):
        if p.type.size <= BUNDLED_SIZE_MAX:
            if object_paths(p.type):
                raise UsageError(
                    f"{p.name}: a small struct holding objects ({p.type.name}) cannot be "
                    "passed: the C backend counts no object argument for it"
                )
            return "small"
        return "struct"
    raise UsageError(f"{p.name}: unknown parameter type {p.type!r}")


def _elem_size(p: Param) -> int:
    if isinstance(p.type, Buffer):
        return 1
    assert isinstance(p.type, Primitive | Struct)
    return p.type.size


def _size(p: Param) -> int:
    """A small or struct parameter's size (its type's)."""
    assert isinstance(p.type, Primitive | Struct)
    return p.type.size


def _align(p: Param) -> int:
    assert isinstance(p.type, Primitive | Struct)
    return p.type.align


def _ordered(small: list[Param], by_size: bool) -> tuple[Param, ...]:
    """The bundle's members, stable-sorted largest alignment (or size) first."""
    key = _size if by_size else _align
    return tuple(sorted(small, key=lambda p: -key(p)))


def _slots(params: list[Param], by_size: bool) -> tuple[Slot, ...]:
    small = [p for p in params if _kind(p) == "small"]
    slots: list[Slot] = []
    if len(small) > 1:
        members = _ordered(small, by_size)
        slots.append(Slot(members, sum(_size(m) for m in members), True))
    for p in params:
        kind = _kind(p)
        if kind == "small" and len(small) > 1:
            continue
        if kind in ("small", "struct"):
            slots.append(Slot((p,), _size(p)))
        elif kind in ("array", "buffer"):
            slots.append(Slot((p,), None))
    return tuple(slots)


def _objects(params: list[Param]) -> tuple[tuple[Param, int], ...]:
    """(param, how many) of a direction's object arguments: structs' objects first."""
    out: list[tuple[Param, int]] = []
    for p in params:
        if _kind(p) == "struct":
            assert isinstance(p.type, Struct)
            n = len(object_paths(p.type))
            if n:
                out.append((p, n))
    for p in params:
        kind = _kind(p)
        if kind == "object":
            out.append((p, 1))
        elif kind == "objects":
            if p.bound is None:
                raise UsageError(f"{p.name}: an object array needs a bound (interface {p.name}[N])")
            out.append((p, p.bound))
    return tuple(out)


def layout(
    method: Method,
    *,
    by_size: bool = False,
    classes: Mapping[str, Callable[..., Any]] | None = None,
) -> MethodLayout:
    """The C backend's layout of ``method`` (``by_size``: the legacy bundle order).
    ``classes``: struct name -> the class built for its values (default
    :func:`struct_class`)."""
    if not isinstance(method, Method):
        raise UsageError(f"layout takes a model.Method, not {type(method).__name__}")
    ins = [p for p in method.params if p.direction is Direction.IN]
    outs = [p for p in method.params if p.direction is Direction.OUT]
    lay = MethodLayout(
        method=method,
        by_size=bool(by_size),
        bi=_slots(ins, by_size),
        bo=_slots(outs, by_size),
        oi=_objects(ins),
        oo=_objects(outs),
        classes=dict(classes or {}),
    )
    for what, n in zip(
        ("input buffers", "output buffers", "input objects", "output objects"),
        lay.counts,
        strict=True,
    ):
        if n > _MAX_PER_KIND:
            raise UsageError(f"{method.name}: {n} {what}; a call carries at most 15 of a kind")
    return lay


@dataclass(frozen=True, slots=True)
class MethodLayout:
    """Where each parameter of a method travels, and the (un)packing both sides do.

    Caller side: :meth:`pack_inputs` then :meth:`unpack_outputs`; callee side (what the C
    ``*_invoke.h`` skeleton does): :meth:`check`, :meth:`unpack_inputs`,
    :meth:`pack_outputs`."""

    method: Method
    by_size: bool
    #: Input and output buffers, in ``a[]`` order.
    bi: tuple[Slot, ...]
    bo: tuple[Slot, ...]
    #: Object arguments: (parameter, how many), in ``a[]`` order.
    oi: tuple[tuple[Param, int], ...]
    oo: tuple[tuple[Param, int], ...]
    classes: Mapping[str, Callable[..., Any]] = field(default_factory=dict, compare=False)

    @property
    def op(self) -> int:
        return self.method.id

    @property
    def counts(self) -> tuple[int, int, int, int]:
        """(nBI, nBO, nOI, nOO)."""
        return (len(self.bi), len(self.bo), sum(n for _, n in self.oi), sum(n for _, n in self.oo))

    @property
    def k(self) -> int:
        """The counts word, ``ObjectCounts_pack(nBI, nBO, nOI, nOO)``."""
        return counts_pack(*self.counts)

    @property
    def ib_sizes(self) -> tuple[int | None, ...]:
        """Each input buffer's fixed size (None: any length), what the skeleton checks."""
        return tuple(s.size for s in self.bi)

    @property
    def ob_sizes(self) -> tuple[int | None, ...]:
        return tuple(s.size for s in self.bo)

    @property
    def inputs(self) -> tuple[Param, ...]:
        """The in-parameters, in declaration order (what :meth:`pack_inputs` takes)."""
        return tuple(p for p in self.method.params if p.direction is Direction.IN)

    @property
    def outputs(self) -> tuple[Param, ...]:
        """The out-parameters, in declaration order (what :meth:`unpack_outputs` gives)."""
        return tuple(p for p in self.method.params if p.direction is Direction.OUT)

    @property
    def out_arrays(self) -> tuple[Param, ...]:
        """The outputs whose capacity the caller chooses (arrays and ``buffer``), in
        declaration order: :meth:`pack_inputs` takes one length (in elements) for each."""
        return tuple(s.param for s in self.bo if s.size is None)

    def _make(self, st: Struct) -> Callable[..., Any]:
        return self.classes.get(st.name) or struct_class(st)

    # ---------------------------------------------------------------- caller side
    def pack_inputs(
        self, values: Sequence[object], out_lens: Sequence[int] = ()
    ) -> tuple[int, tuple[bytes, ...], tuple[int, ...], tuple[object, ...]]:
        """(op, input buffers, output capacities in bytes, input objects) for a call
        with ``values`` (the in-parameters in declaration order) and ``out_lens`` (the
        capacity of each :attr:`out_arrays` in elements, in order)."""
        name = self.method.name
        by_name = self._by_name(self.inputs, values, "input", "takes")
        arrays = self.out_arrays
        if len(out_lens) != len(arrays):
            raise UsageError(
                f"{name} takes {len(arrays)} output length(s) "
                f"({', '.join(p.name for p in arrays) or 'none'}), not {len(out_lens)}"
            )
        ib, struct_objs = self._pack_slots(self.bi, by_name)
        caps: list[int] = []
        lens = iter(out_lens)
        for slot in self.bo:
            if slot.size is not None:
                caps.append(slot.size)
                continue
            n = next(lens)
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise UsageError(
                    f"{name}: the length of {slot.param.name} is an int >= 0, not {n!r}"
                )
            caps.append(n * _elem_size(slot.param))
        io = self._pack_objects(self.oi, by_name, struct_objs)
        return self.op, ib, tuple(caps), io

    def _by_name(
        self, params: tuple[Param, ...], values: Sequence[object], what: str, verb: str
    ) -> dict[str, object]:
        """``values`` (one per parameter of ``params``, in order) by parameter name."""
        name = self.method.name
        if isinstance(values, str | bytes) or not isinstance(values, Sequence):
            raise UsageError(f"{name}: the {what}s are a sequence, not {values!r}")
        if len(values) != len(params):
            raise UsageError(f"{name} {verb} {len(params)} {what}(s), not {len(values)}")
        return {p.name: v for p, v in zip(params, values, strict=True)}

    def _pack_slots(
        self, slots: tuple[Slot, ...], by_name: dict[str, object]
    ) -> tuple[tuple[bytes, ...], dict[str, list[object]]]:
        """The buffers of ``slots``, and the objects each struct parameter holds."""
        struct_objs: dict[str, list[object]] = {}
        buffers: list[bytes] = []
        for slot in slots:
            if slot.bundle:
                buffers.append(
                    b"".join(self._pack_value(m, by_name[m.name], None) for m in slot.params)
                )
            else:
                p = slot.param
                objs: list[object] = []
                buffers.append(self._pack_value(p, by_name[p.name], objs))
                struct_objs[p.name] = objs
        return tuple(buffers), struct_objs

    def _pack_objects(
        self,
        objects: tuple[tuple[Param, int], ...],
        by_name: dict[str, object],
        struct_objs: dict[str, list[object]],
    ) -> tuple[object, ...]:
        """The object arguments of ``objects`` (a direction's object parameters and how
        many objects each gives): a struct's objects, an object, an array's elements."""
        out: list[object] = []
        for p, n in objects:
            v = by_name[p.name]
            if _kind(p) == "struct":
                out.extend(struct_objs[p.name])
            elif not p.is_array:
                out.append(v)
            else:
                if isinstance(v, str | bytes) or not isinstance(v, Sequence) or len(v) != n:
                    raise UsageError(
                        f"{self.method.name}: {p.name} is a sequence of {n} objects, not {v!r}"
                    )
                out.extend(v)
        return tuple(out)

    def _pack_value(self, p: Param, v: object, objs: list[object] | None) -> bytes:
        what = f"{self.method.name}: {p.name}"
        if isinstance(p.type, Buffer):
            if not isinstance(v, bytes | bytearray | memoryview):
                raise UsageError(f"{what} is a buffer: bytes, not {type(v).__name__}")
            return bytes(v)
        if p.is_array:
            if p.type is Primitive.UINT8 and isinstance(v, bytes | bytearray | memoryview):
                return bytes(v)
            if isinstance(v, str) or not isinstance(v, Sequence | bytes | bytearray):
                raise UsageError(f"{what} is an array: a sequence, not {v!r}")
            if isinstance(p.type, Primitive):
                return b"".join(pack_primitive(p.type, x, f"{what}[{k}]") for k, x in enumerate(v))
            assert isinstance(p.type, Struct)
            return b"".join(pack_struct(p.type, x, [], f"{what}[{k}]") for k, x in enumerate(v))
        if isinstance(p.type, Primitive):
            return pack_primitive(p.type, v, what)
        assert isinstance(p.type, Struct)
        return pack_struct(p.type, v, objs if objs is not None else [], what)

    def unpack_outputs(
        self, ob: Sequence[bytes | bytearray | memoryview], oo: Sequence[object] = ()
    ) -> tuple[Any, ...]:
        """The out-parameters' values, in declaration order, from the output buffers (as
        the callee left them: an array's is as long as what was written) and objects.

        A fixed-size output shorter than its size reads as zeros past its end (the C
        stub's bundle starts zeroed); an array's length is its bytes over its element's
        size, rounded down (``a[i].b.size / sizeof(T)``)."""
        name = self.method.name
        if len(ob) != len(self.bo) or len(oo) != self.counts[3]:
            raise UsageError(
                f"{name} gives {len(self.bo)} output buffer(s) and {self.counts[3]} "
                f"object(s), not {len(ob)} and {len(oo)}"
            )
        values: dict[str, Any] = {}
        for slot, data in zip(self.bo, ob, strict=True):
            self._read_slot(slot, bytes(data), values)
        self._read_objects(self.oo, tuple(oo), values)
        return tuple(values[p.name] for p in self.outputs)

    def _read_slot(self, slot: Slot, data: bytes, values: dict[str, Any]) -> None:
        if slot.size is not None and len(data) < slot.size:
            data = data + bytes(slot.size - len(data))
        if slot.bundle:
            offset = 0
            for m in slot.params:
                values[m.name], offset = self._read_one(m, data, offset)
            return
        p = slot.param
        if slot.size is not None:
            values[p.name], _ = self._read_one(p, data, 0)
            return
        if isinstance(p.type, Buffer):
            values[p.name] = data
            return
        size = _elem_size(p)
        n = len(data) // size
        if isinstance(p.type, Primitive):
            if p.type.code == "B":
                values[p.name] = data[:n]
            else:
                values[p.name] = struct.unpack_from(f"<{n}{p.type.code}", data)
            return
        assert isinstance(p.type, Struct)
        items = []
        for k in range(n):
            v, _ = unpack_struct(p.type, data, k * size, self._make)
            items.append(v)
        values[p.name] = tuple(items)

    def _read_one(self, p: Param, data: bytes, offset: int) -> tuple[Any, int]:
        if isinstance(p.type, Primitive):
            (v,) = struct.unpack_from("<" + p.type.code, data, offset)
            return v, offset + p.type.size
        assert isinstance(p.type, Struct)
        return unpack_struct(p.type, data, offset, self._make)

    def _read_objects(
        self, slots: tuple[tuple[Param, int], ...], objs: tuple[object, ...], values: dict[str, Any]
    ) -> None:
        at = 0
        for p, n in slots:
            got = objs[at : at + n]
            at += n
            if _kind(p) == "struct":
                assert isinstance(p.type, Struct)
                values[p.name] = with_objects(p.type, values[p.name], got, self._make)
            elif p.is_array:
                values[p.name] = got
            else:
                values[p.name] = got[0]

    # ---------------------------------------------------------------- callee side
    def check(
        self, ib_sizes: Sequence[int], ob_caps: Sequence[int], n_io: int, n_oo: int
    ) -> str | None:
        """Why the C skeleton refuses this call with ``ERROR_INVALID`` (None: it accepts):
        counts other than the method's, or a fixed-size buffer of another size."""
        got = (len(ib_sizes), len(ob_caps), n_io, n_oo)
        if got != self.counts:
            return (
                f"{self.method.name} takes counts (BI, BO, OI, OO) = {self.counts}, "
                f"the call has {got}"
            )
        for kind, sizes, slots in (("ib", ib_sizes, self.bi), ("ob", ob_caps, self.bo)):
            for k, (size, slot) in enumerate(zip(sizes, slots, strict=True)):
                if slot.size is not None and size != slot.size:
                    return f"{kind}[{k}] is {size} bytes, {self.method.name} takes {slot.size}"
        return None

    def unpack_inputs(
        self,
        ib: Sequence[bytes | bytearray | memoryview],
        ob_caps: Sequence[int] = (),
        io: Sequence[object] = (),
        n_oo: int | None = None,
    ) -> tuple[tuple[Any, ...], tuple[int, ...]]:
        """The skeleton's view of a call: (the in-parameters' values in declaration
        order, each :attr:`out_arrays`' capacity in elements).  A call the skeleton
        refuses raises :class:`QteeError` ``ERROR_INVALID`` (see :meth:`check`)."""
        why = self.check(
            [len(b) for b in ib], ob_caps, len(io), self.counts[3] if n_oo is None else n_oo
        )
        if why is not None:
            raise QteeError(ObjectResult.ERROR_INVALID, why)
        values: dict[str, Any] = {}
        for slot, data in zip(self.bi, ib, strict=True):
            self._read_slot(slot, bytes(data), values)
        self._read_objects(self.oi, tuple(io), values)
        lens = tuple(
            cap // _elem_size(slot.param)
            for slot, cap in zip(self.bo, ob_caps, strict=True)
            if slot.size is None
        )
        return tuple(values[p.name] for p in self.inputs), lens

    def pack_outputs(
        self, values: Sequence[object]
    ) -> tuple[tuple[bytes, ...], tuple[object, ...]]:
        """(output buffers, output objects) for the out-parameters' ``values`` in
        declaration order (an array's buffer is as long as its elements)."""
        by_name = self._by_name(self.outputs, values, "output", "gives")
        ob, struct_objs = self._pack_slots(self.bo, by_name)
        return ob, self._pack_objects(self.oo, by_name, struct_objs)
