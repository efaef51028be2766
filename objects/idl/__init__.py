"""Mink IDL: read ``.idl`` files as the Mink IDL compiler does, for Python stubs and skeletons.

Generic Mink (no QTEE in it): the lowered records (:mod:`objects.idl.model`) are what the
reader (:func:`read_idl`, :func:`parse_idl`) produces and what the packing and the Python
backends read.
"""

from objects.idl import model
from objects.idl.gen import generate, module_text
from objects.idl.model import *  # noqa: F403
from objects.idl.packing import (
    MethodLayout,
    Slot,
    check_lifecycle,
    counts_pack,
    counts_unpack,
    layout,
    struct_class,
)
from objects.idl.reader import IdlError, IdlWarning, parse_idl, read_idl
from objects.idl.runtime import (
    OP_VERSION,
    Namespace,
    SkeletonBase,
    StubBase,
    load,
    namespace,
    pack_version,
)

__all__ = list(model.__all__)
__all__ += ["IdlError", "IdlWarning", "parse_idl", "read_idl"]
__all__ += [
    "OP_VERSION",
    "MethodLayout",
    "Namespace",
    "SkeletonBase",
    "Slot",
    "StubBase",
    "check_lifecycle",
    "counts_pack",
    "counts_unpack",
    "generate",
    "layout",
    "load",
    "module_text",
    "namespace",
    "pack_version",
    "struct_class",
]
