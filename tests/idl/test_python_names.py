"""Python names of IDL names: the same under ``load()`` and ``qtee idl gen``, never colliding.

Issue 19 point 4 (the Python backend): a parameter named ``self`` (legal IDL) is renamed
``_self`` as keywords are renamed (with the reader's warning at the place); a parameter
that would collide with an output length keyword ``<name>_len`` or with another
parameter after renaming gets a trailing ``_``; constants are renamed alike by both paths.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import textwrap
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

from objects.idl import IdlFile, IdlWarning, load, parse_idl
from objects.idl.gen import generate

IDL = textwrap.dedent(
    """\
    const uint32 None = 7;

    interface IKw {
      const uint32 True = 1;
      method ok(in uint32 self, out uint32 twice);
      method lens(in uint32 data_len, out buffer data);
      method clash(in uint32 class, in uint32 x_len, in uint32 x_len_, out uint32[] x);
    };
    """
)

#: The Python parameters of each stub method, after ``self``.
NAMES = {
    "ok": ["_self"],
    "lens": ["data_len_", "data_len"],
    "clash": ["_class", "x_len_", "x_len__", "x_len"],
}


def _read(path: str = "kw.idl") -> tuple[IdlFile, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        file = parse_idl(IDL, path)
    return file, [str(w.message) for w in caught if issubclass(w.category, IdlWarning)]


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_names_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _params(cls: type, name: str) -> list[str]:
    return list(inspect.signature(getattr(cls, name)).parameters)[1:]


def test_renamed_parameters_are_warned_at_their_place() -> None:
    """The reader warns where each renamed parameter is: ``self`` as a reserved word,
    the collisions naming what they would collide with and the name given."""
    _, found = _read()
    assert "kw.idl:5:23: parameter `self` is a reserved word in Python; " in "".join(found)
    assert (
        "kw.idl:6:25: parameter `data_len` of method `lens`: `data_len` would collide with "
        "the keyword `data_len` (the length of output `data`); the Python backend names it "
        "`data_len_`"
    ) in found
    assert (
        "kw.idl:7:60: parameter `x_len_` of method `clash`: `x_len_` would collide with "
        "parameter `x_len`; the Python backend names it `x_len__`"
    ) in found
    assert "kw.idl:7:26: parameter `class` is a reserved word in Python; " in "".join(found)


def _impl(skeleton: type) -> Any:
    class Impl(skeleton):  # type: ignore[misc, valid-type]
        def ok(self, _self: int) -> int:
            return 2 * _self

        def lens(self, data_len_: int, *, data_len: int) -> bytes:
            return bytes(range(data_len_))[:data_len]

        def clash(self, _class: int, x_len_: int, x_len__: int, *, x_len: int) -> tuple[int, ...]:
            return (_class, x_len_, x_len__, x_len)

    return Impl()


def _check(ns: Any) -> None:
    stub = ns.IKw.Stub(_impl(ns.IKw.Skeleton))
    for method, names in NAMES.items():
        assert _params(ns.IKw.Stub, method) == names
    assert stub.ok(21) == stub.ok(_self=21) == 42
    assert stub.lens(5, data_len=3) == stub.lens(data_len_=5, data_len=3) == b"\x00\x01\x02"
    assert stub.clash(_class=1, x_len_=2, x_len__=3, x_len=4) == (1, 2, 3, 4)
    assert (ns._None, ns.IKw._True) == (7, 1)
    assert not hasattr(ns, "None")


def test_load_renames_and_calls() -> None:
    """``load()`` builds the stub (it raised "duplicate parameter name: 'self'" from
    inspect.Signature) with the renamed names; constants renamed as ``gen`` renames them."""
    file, _ = _read()
    _check(load(file))


def test_gen_renames_alike_and_imports(tmp_path: Path) -> None:
    """``qtee idl gen`` wrote ``def ok(self, self: int)`` (a SyntaxError on import); the
    module now imports and its names are ``load()``'s."""
    file, _ = _read(str(tmp_path / "kw.idl"))
    mod = _import(generate(file, tmp_path))
    _check(mod)
    loaded = load(file)
    for method in NAMES:
        assert _params(mod.IKw.Stub, method) == _params(loaded.IKw.Stub, method)
        assert _params(mod.IKw.Skeleton, method) == _params(loaded.IKw.Stub, method)
