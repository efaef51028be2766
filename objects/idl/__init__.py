"""Mink IDL: read ``.idl`` files as the Mink IDL compiler does, for Python stubs and skeletons.

Generic Mink (no QTEE in it): the lowered records (:mod:`objects.idl.model`) are what the
reader (:func:`read_idl`, :func:`parse_idl`) produces and what the packing and the Python
backends read.
"""

from objects.idl import model
from objects.idl.model import *  # noqa: F403
from objects.idl.reader import IdlError, IdlWarning, parse_idl, read_idl

__all__ = list(model.__all__)
__all__ += ["IdlError", "IdlWarning", "parse_idl", "read_idl"]
