"""Random valid IDL round-trips: a model, printed as IDL, reads back as the same model.

Issue 19 point 1-2: consts, structs, interfaces with inheritance chains, every kind of
parameter; the ops continue across the chain (mir.rs) and errors count from 10.  The
printer lives here: it writes what the grammar (``idl_grammar.pest``) accepts, with the
separators drawn among spaces, newlines and comments.
"""

from __future__ import annotations

import warnings

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from objects.idl import (
    Buffer,
    Const,
    Direction,
    Error,
    IdlFile,
    IdlWarning,
    Interface,
    InterfaceType,
    Method,
    Param,
    Primitive,
    Struct,
    StructField,
    Version,
    parse_idl,
)
from objects.idl._keywords import reserved_in

FILE = "gen.idl"
GRAMMAR_WORDS = {
    "method",
    "error",
    "const",
    "struct",
    "interface",
    "include",
    "in",
    "out",
    "buffer",
    "version",
    "api_version",
}


def _usable(name: str) -> bool:
    return (
        not reserved_in(name, "struct")
        and not reserved_in(name, "method")
        and name not in GRAMMAR_WORDS
        and not name.startswith(("int", "uint", "float", "interface"))
    )


_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
NAME = st.builds(
    str.__add__,
    st.sampled_from(_LETTERS),
    st.text(alphabet=_LETTERS + "0123456789_", max_size=7),
).filter(_usable)
PRIMS = st.sampled_from(list(Primitive))


@st.composite
def idl_files(draw: st.DrawFn) -> tuple[IdlFile, str]:
    used: set[str] = set()
    sep = draw(st.sampled_from([" ", "\n  ", " // note\n ", " /* c */ ", "\t"]))

    def take() -> str:
        name = draw(NAME.filter(lambda n: n not in used))
        used.add(name)
        return name

    consts = []
    for _ in range(draw(st.integers(0, 2))):
        prim = draw(PRIMS.filter(lambda p: not p.is_float))
        lo, hi = (
            (0, 2 ** (8 * prim.size) - 1)
            if prim.idl_name.startswith("u")
            else (-(2 ** (8 * prim.size - 1)), 2 ** (8 * prim.size - 1) - 1)
        )
        value = draw(st.integers(lo, hi))
        text = draw(st.sampled_from([str(value), ("-" if value < 0 else "") + hex(abs(value))]))
        consts.append(Const(take(), prim, value, text))
    structs = []
    for _ in range(draw(st.integers(0, 2))):
        prim = draw(PRIMS)
        fields = tuple(
            StructField(take(), prim, n, arr)
            for n, arr in draw(
                st.lists(
                    st.one_of(st.just((1, False)), st.tuples(st.integers(1, 5), st.just(True))),
                    min_size=1,
                    max_size=3,
                )
            )
        )
        structs.append(Struct(take(), fields, FILE))
    interfaces: list[Interface] = []
    iface_names = [take() for _ in range(draw(st.integers(1, 4)))]
    for index, iname in enumerate(iface_names):
        base = draw(st.sampled_from([None, *interfaces]))
        op = len(base.all_methods) if base else 0
        code = 10 + (len(base.all_errors) if base else 0)
        errors = tuple(Error(take(), code + i) for i in range(draw(st.integers(0, 2))))
        methods = []
        version = Version(1, 0)
        for i in range(draw(st.integers(0, 3))):
            params = []
            for direction in Direction:
                arrays = draw(st.booleans())
                for _ in range(draw(st.integers(0, 3))):
                    kind = draw(
                        st.sampled_from(["prim", "prim[]", "buffer", "obj", "struct", "struct[]"])
                    )
                    if kind == "obj":
                        target = draw(st.sampled_from([None, *iface_names]))
                        if arrays:
                            params.append(
                                Param(
                                    take(),
                                    direction,
                                    InterfaceType(target),
                                    True,
                                    draw(st.integers(2, 4)),
                                )
                            )
                        else:
                            params.append(Param(take(), direction, InterfaceType(target)))
                    elif kind == "buffer":
                        params.append(Param(take(), direction, Buffer.BUFFER))
                    elif kind.startswith("struct") and structs:
                        s = draw(st.sampled_from(structs))
                        params.append(Param(take(), direction, s, kind.endswith("[]")))
                    else:
                        params.append(Param(take(), direction, draw(PRIMS), kind.endswith("[]")))
            bump = draw(st.sampled_from([None, None, (0, 0), (0, 1), (1, 0)]))
            mversion = None
            if bump is not None:
                version = Version(version.major + bump[0], version.minor + bump[1])
                mversion = version
            methods.append(Method(take(), op + i, tuple(params), mversion))
        iface_consts = tuple(
            Const(take(), Primitive.UINT32, 7, "7") for _ in range(draw(st.integers(0, 1)))
        )
        interfaces.append(Interface(iname, base, tuple(methods), errors, iface_consts, FILE))
        del index
    model = IdlFile(FILE, (), tuple(consts), tuple(structs), tuple(interfaces))
    return model, print_idl(model, sep)


def _type(t: object) -> str:
    if isinstance(t, Primitive):
        return t.idl_name
    if isinstance(t, InterfaceType):
        return t.name or "interface"
    if isinstance(t, Struct):
        return t.name
    assert t is Buffer.BUFFER
    return "buffer"


def print_idl(f: IdlFile, sep: str) -> str:
    """The tiny printer: one declaration after another, ``sep`` between tokens."""
    out = []
    for c in f.consts:
        out.append(f"const {c.type.idl_name}{sep}{c.name}{sep}={sep}{c.text};")
    for s in f.structs:
        fields = []
        for fd in s.fields:
            arr = f"[{sep}{fd.count}{sep}]" if fd.is_array else ""
            fields.append(f"{_type(fd.type)}{arr}{sep}{fd.name};")
        out.append(f"struct {s.name}{sep}{{{sep}{sep.join(fields)}{sep}}};")
    for i in f.interfaces:
        items = [f"error {e.name}{sep};" for e in i.errors]
        items += [f"const uint32 {c.name} = {c.text};" for c in i.consts]
        for m in i.methods:
            params = []
            for p in m.params:
                arr = "" if not p.is_array else "[]" if p.bound is None else f"[{p.bound}]"
                params.append(f"{p.direction.value} {_type(p.type)}{arr}{sep}{p.name}")
            attr = f"#[version = {m.version}]\n  " if m.version else ""
            items.append(f"{attr}method {m.name}{sep}({sep}{(',' + sep).join(params)}{sep});")
        base = f"{sep}:{sep}{i.base.name}" if i.base else ""
        out.append(f"interface {i.name}{base}{sep}{{\n  " + "\n  ".join(items) + "\n};")
    return "\n".join(out) + "\n"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(idl_files())
def test_printed_model_reads_back_the_same(case: tuple[IdlFile, str]) -> None:
    """A random valid file reads back to the model it was printed from (ops across
    inheritance, errors from 10, versions, param kinds, struct layout)."""
    model, text = case
    with warnings.catch_warnings():
        warnings.simplefilter("error", IdlWarning)
        got = parse_idl(text, name=FILE)
    assert got.consts == model.consts
    assert got.structs == model.structs
    assert got.interfaces == model.interfaces
    for want in model.interfaces:
        assert got.interface(want.name).version == want.version
