"""QTEE's interface files (``qtee/idl/*.idl``), read once, as the model's services use them.

The services qtee models (``qtee.secure``, the supplicant's callback objects) take their
interface's facts from the shipped file rather than restating them: the error enum
(:func:`errors`), op numbers (:func:`op_number`), each op's argument shape as the C
backend lays it out (:func:`idl_op`, an :func:`objects.op` whose number and shape are the
IDL method's) and class UIDs (:func:`const`).  ``IFoo`` is read from ``IFoo.idl`` the
first time it is asked for, and kept.
"""

from __future__ import annotations

import enum
import functools
import importlib.resources
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from objects import op
from objects.idl import IdlFile, IdlWarning, Interface, layout, read_idl

__all__ = ["IDL_METHOD", "const", "errors", "idl_op", "interface", "op_number"]

F = TypeVar("F", bound=Callable[..., Any])

#: The attribute :func:`idl_op` sets on the method it declares: ``"IFoo.method"``.
IDL_METHOD = "__qtee_idl_method__"

_DIR = Path(str(importlib.resources.files("qtee") / "idl"))


@functools.cache
def _file(stem: str) -> IdlFile:
    """``qtee/idl/<stem>.idl``, read once.  Its warnings (a method named ``register``,
    which other languages' backends rename) are about other backends, not the model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IdlWarning)
        return read_idl(_DIR / f"{stem}.idl")


def interface(name: str) -> Interface:
    """The interface ``name`` as ``qtee/idl/<name>.idl`` declares it."""
    return _file(name).interface(name)


def errors(name: str, module: str, extra: Mapping[str, int] | None = None) -> Any:
    """Interface ``name``'s errors as an ``IntEnum`` named after it (members
    ``ERROR_<x>`` from 10, as the IDL numbers them), living in ``module`` (the module that
    exports it, so it pickles by reference).  ``extra``: errors the model answers that the
    file does not declare (each must come after the file's)."""
    iface = interface(name)
    members = {e.name: e.value for e in iface.all_errors}
    for key, value in (extra or {}).items():
        if key in members or value <= max(members.values(), default=9):
            raise ValueError(f"{name}: extra error {key} = {value} overlaps the IDL's")
        members[key] = value
    cls = enum.IntEnum(name, members, module=module)  # type: ignore[misc]
    cls.__doc__ = f"{name}'s errors (qtee/idl/{name}.idl)."
    return cls


def op_number(name: str, method: str) -> int:
    """The op number of ``method`` of interface ``name``."""
    return interface(name).method(method).id


def const(file: str, name: str) -> int:
    """The file-level integer constant ``name`` of ``qtee/idl/<file>.idl``."""
    for c in _file(file).consts:
        if c.name == name:
            return int(c.value)
    raise KeyError(f"{file}.idl has no const {name!r}")


def idl_op(name: str, method: str, *, capacities: bool = False) -> Callable[[F], F]:
    """:func:`objects.op` for ``method`` of interface ``name``: its op number, and the
    shape its arguments have on the wire (each input and output buffer's fixed size or
    any, the numbers of objects), as the C skeleton checks them."""
    lay = layout(interface(name).method(method))
    mark = op(
        lay.op,
        ib=lay.ib_sizes,
        ob=lay.ob_sizes,
        io=lay.counts[2],
        oo=lay.counts[3],
        capacities=capacities,
    )

    def declare(fn: F) -> F:
        fn = mark(fn)
        setattr(fn, IDL_METHOD, f"{name}.{method}")
        return fn

    return declare
