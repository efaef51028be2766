"""Mink IDL: read ``.idl`` files as the Mink IDL compiler does, for Python stubs and skeletons.

Generic Mink (no QTEE in it): the lowered records (:mod:`objects.idl.model`) are what the
reader produces and what the packing and the Python backends read.
"""

from objects.idl import model
from objects.idl.model import *  # noqa: F403

__all__ = list(model.__all__)
