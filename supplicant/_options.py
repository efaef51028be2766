"""The supplicant's options, checked before anything starts: one function per option.

``qtee supplicant`` (the daemon, tee-supplicant) and ``qtee run`` (the model's own
supplicant, inside the program) take the same ``--storage``, ``--ta-dir`` and ``--plugin``;
both check them here, so the same mistake is the same line (``qtee VERB: <message>``,
exit 2) and ``qtee run`` never starts a program whose model would not start.  Each
function raises a :class:`UsageError` whose message names the option, the value and why,
in one line.
"""

from __future__ import annotations

import os
import uuid as uuidlib

from objects import UsageError
from qtee._cli.ta_modules import find_ta_module
from supplicant._optee import SuppPlugin, plugin_from_spec

__all__ = ["check_plugin", "check_storage", "check_ta_dir", "load_plugin", "one_line"]


def one_line(text: object) -> str:
    """``text`` with its whitespace runs (newlines too) as single spaces."""
    return " ".join(str(text).split())


def check_storage(path: str, option: str = "--storage") -> None:
    """Make the storage directory ``path`` (and its parents) if missing, as tee-supplicant
    makes its file-system root; a :class:`UsageError` when it cannot be used."""
    why = None
    if os.path.exists(path) and not os.path.isdir(path):
        why = "not a directory"
    else:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            why = f"cannot create it: {one_line(exc.strerror or exc)}"
        else:
            if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
                why = "not writable (the storage listener writes its files there)"
    if why is not None:
        raise UsageError(f"{option} {path}: {why}")


def check_ta_dir(path: str) -> None:
    """``--ta-dir``: a directory that is there (TA images are read from it, never made)."""
    if not os.path.isdir(path):
        why = "not a directory" if os.path.exists(path) else "no such directory"
        raise UsageError(f"--ta-dir {path}: {why}")


def load_plugin(spec: str) -> tuple[uuidlib.UUID, SuppPlugin]:
    """``--plugin UUID=MODULE:FUNCTION``: MODULE imported (a module name, the current
    directory first, or a ``.py`` file) and FUNCTION a callable of it
    (:func:`~supplicant.plugin_from_spec`); its UUID and the function."""
    try:
        return plugin_from_spec(spec)
    except (ValueError, TypeError, UsageError) as exc:
        raise UsageError(f"--plugin {one_line(exc)}") from None
    except Exception as exc:  # the module's own code failed
        raise UsageError(
            f"--plugin {spec}: importing it failed: {type(exc).__name__}: {one_line(exc)}"
        ) from None


def check_plugin(spec: str) -> str:
    """:func:`load_plugin`'s checks, for a plugin another process loads: the spec with
    MODULE as :func:`~qtee._cli.ta_modules.find_ta_module` found it (a file's absolute
    path), so that that process, or this one after a ``chdir``, loads the same plugin."""
    uuid, _fn = load_plugin(spec)
    head, _, name = spec.rpartition(":")
    return f"{uuid}={find_ta_module(head.partition('=')[2])}:{name}"
