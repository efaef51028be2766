"""TA modules named on a command line (``--ta-module``): a module name or a ``.py`` file.

A module name is looked up as ``python -m`` looks a module up: the current directory
first, then ``sys.path``.  A path (it contains a ``/`` or ends in ``.py``) is a Python
file, loaded as a module named after the file, with its directory put first on
``sys.path`` (as ``python FILE`` does) so that it can import its neighbours.  Importing
the module registers its TAs; nothing here knows what a TA is.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Final

from objects import UsageError

if TYPE_CHECKING:
    import argparse

__all__ = ["add_ta_module_option", "find_ta_module", "import_ta_module", "is_path"]

_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def add_ta_module_option(parser: argparse.ArgumentParser, where: str = "") -> None:
    """The ``--ta-module MODULE`` option (repeatable: ``args.ta_module``, a list) of the
    verbs that host a model (``qtee serve``, ``qtee run``); ``where`` says whose model."""
    parser.add_argument(
        "--ta-module",
        action="append",
        default=[],
        metavar="MODULE",
        help=f"import MODULE {where}first (it registers its TAs): a module name (the current "
        "directory is searched first) or a path to a .py file; repeatable",
    )


def is_path(text: str) -> bool:
    """Whether ``text`` names a file (it has a ``/`` or ends in ``.py``), not a module."""
    return os.sep in text or (os.altsep is not None and os.altsep in text) or text.endswith(".py")


def _search_first(directory: str) -> None:
    if directory not in sys.path:
        sys.path.insert(0, directory)


def find_ta_module(text: str, *, cwd: str | None = None) -> str:
    """Check that ``text`` names a TA module, without running it; return what
    :func:`import_ta_module` takes: the file's absolute path, or the module name.

    ``cwd`` (default: the current directory) is searched first for a module name, and
    is where a relative path starts.  A :class:`UsageError` says what is wrong in one
    line: no such file, not a ``.py`` file, no such module."""
    if not isinstance(text, str) or not text:
        raise UsageError(f"a TA module is a module name or a .py file, not {text!r}")
    cwd = os.getcwd() if cwd is None else cwd
    if is_path(text):
        path = os.path.abspath(os.path.join(cwd, text))
        if not os.path.exists(path):
            raise UsageError(f"{text}: no such file")
        if not os.path.isfile(path) or not path.endswith(".py"):
            raise UsageError(f"{text}: not a .py file")
        return path
    if not _NAME.fullmatch(text):
        raise UsageError(f"{text}: not a module name, nor a path to a .py file")
    _search_first(cwd)
    try:
        found = importlib.util.find_spec(text) is not None
    except ModuleNotFoundError:  # a parent package is missing
        found = False
    if not found:
        raise UsageError(f"{text}: no such module (looked in {cwd} first, then on sys.path)")
    return text


def import_ta_module(text: str) -> ModuleType:
    """Import the TA module ``text``: a path to a ``.py`` file or a module name (as
    :func:`find_ta_module` returns them).  What the module's own code raises is raised
    as it is; a second import of the same file returns the module already loaded."""
    if not is_path(text):
        return importlib.import_module(text)
    path = os.path.abspath(text)
    name = os.path.splitext(os.path.basename(path))[0]
    loaded = sys.modules.get(name)
    if loaded is not None:
        origin = getattr(loaded, "__file__", None)
        if origin is not None and os.path.realpath(origin) == os.path.realpath(path):
            return loaded
        where = f"from {origin}" if origin else "built in"
        raise UsageError(
            f"{text}: a module named {name!r} is already imported ({where}); rename the file"
        )
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"{text}: not a .py file")
    module = importlib.util.module_from_spec(spec)
    _search_first(os.path.dirname(path))
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module
